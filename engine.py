"""The engine: every active request stepped together. A batch-1 decode step reads every weight
to make one token; one step for all rows reads them once for all of them.

    engine = Engine(model, context_length, precision, max_batch=16)
    engine.submit(Request(prompt_ids, max_tokens=64, end_id=eot_id, temperature=0.0))
    engine.run_until_idle()     # or engine.run(stop) on the thread that owns the model

Each step it admits waiting requests while rows are free (each prefilled alone into its row of
the cache), runs one forward for every active row, samples each row by its own settings, and
retires the rows that finished (end token, max_tokens, cancelled). A request joins at the next
step; nobody waits for the batch.

The cache is one buffer per layer, (rows, kv_heads, positions, head_dim), each row at its own
positions (model.KVCache). Its positions cover the longest active row's reach, a power of two
as generate.cache_positions sizes it, and grow when a longer request joins; its rows are as many
as `max_batch` and the memory bound allow. Active rows are rows 0..n-1: a finished row is
replaced by the last one. The window rule applies per row: a row that fills the window drops to
its newest half and is prefilled again, as generate.py does for one sequence.

Rows are independent: a row's tokens are those of the same request alone, up to rounding (a
batched product sums in another order), and its samples come from its own seeded stream
(generate.row_uniforms), whatever else is in the batch.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from generate import (GREEDY_BELOW, MIN_CACHE_POSITIONS, cache_positions, compile_decoder,
                      row_uniforms, sample_rows)
from model import KVCache, Transformer
from runtime import autocast_context
from utils import host_memory_bytes

IDLE_WAIT_SECONDS = 0.1   # how long run() sleeps with nothing to do before it looks at `stop`


def decode_widths(rows: int) -> list[int]:
    """The batch widths a compiled decode step is built for: powers of two below `rows` (the
    cache's rows), and `rows` itself."""
    return [1 << power for power in range(rows.bit_length()) if 1 << power < rows] + [rows]


def decode_width(count: int, rows: int) -> int:
    """The narrowest of decode_widths(rows) that holds `count` active rows."""
    return next(width for width in decode_widths(rows) if width >= count)


class Closed(Exception):
    """The engine takes no more work: close() was called (the server is stopping)."""


@dataclass(eq=False)
class Request:
    """One request's state: its prompt and settings, then the tokens it made and how it
    finished ("stop": its end token, "length": max_tokens, "cancelled")."""
    prompt: list[int]
    max_tokens: int
    end_id: int | None = None  # the token that ends the reply (None: only max_tokens does)
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # <= 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    # on the engine thread, after each token and once more when it finished; setting
    # finish_reason in it ends the request (a stop string)
    on_update: Callable[[Request], None] | None = None
    tokens: list[int] = field(default_factory=list)  # sampled, the end token included
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    window: list[int] = field(default_factory=list)  # what the model sees now (the engine's)


class Engine:
    """Owns the model and its cache; call step(), run() or run_until_idle() from one thread,
    submit() from any."""

    def __init__(self, model: Transformer, context_length: int, precision: str = "fp32",
                 max_batch: int = 16, cache_bytes: int | None = None, compile: bool = False):
        self.model, self.context_length, self.precision = model, context_length, precision
        self.max_batch = max_batch
        self.device = model.embed_tokens.weight.device
        # the decode step compiled once per batch width (decode_widths) by warm_up; the cache's
        # positions are a dynamic dimension, so a longer request compiles nothing new. A width
        # warm_up did not reach runs eagerly: no request waits for a compile.
        self.compiled = compile_decoder(model, self.device, dynamic=False) if compile else None
        self.compiled_widths: set[int] = set()
        c = model.config
        itemsize = 2 if precision in ("bf16", "fp16") else 4
        # keys and values of every layer, one position of one row
        self.position_bytes = 2 * c.num_layers * c.num_kv_heads * (c.embed_dim // c.num_heads
                                                                    ) * itemsize
        self.cache_bytes = cache_bytes or (
            torch.cuda.mem_get_info(self.device)[0] // 2 if self.device.type == "cuda"
            else host_memory_bytes() // 4)
        self.waiting: collections.deque[Request] = collections.deque()
        self.arrived = threading.Condition()
        self.rows: list[Request] = []
        self.caches: list[KVCache] = []
        self.positions = 0  # the cache's positions per row (0: no cache yet)
        self.refill: set[Request] = set()  # rows that dropped to half a window: prefill again
        self.calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = (
            collections.deque())
        # what /metrics shows: counters since the start, and the last step's
        self.steps, self.tokens_generated, self.step_seconds_total = 0, 0, 0.0
        self.last_step_seconds, self.last_batch_size = 0.0, 0
        self.closed = False

    def submit(self, request: Request) -> None:
        """Queue `request` for the next step. Its prompt holds 1..context_length tokens; once
        closed, Closed is raised."""
        if not 0 < len(request.prompt) <= self.context_length or request.max_tokens < 1:
            raise ValueError(f"a request needs 1..{self.context_length} prompt tokens and "
                             f"max_tokens >= 1, got {len(request.prompt)} and "
                             f"{request.max_tokens}")
        request.window = list(request.prompt)
        with self.arrived:
            if self.closed:
                raise Closed
            self.waiting.append(request)
            self.arrived.notify()

    def call(self, work: Callable[[], Any]) -> concurrent.futures.Future:
        """Run work() on the engine's thread before its next step (other uses of the model,
        such as scoring a prompt's logprobs); -> its future (Closed once closed)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.arrived:
            if self.closed:
                future.set_exception(Closed())
                return future
            self.calls.append((work, future))
            self.arrived.notify()
        return future

    def close(self, reason: str) -> None:
        """Take no more work, and finish every running and waiting request with `reason`."""
        with self.arrived:
            self.closed = True
            waiting, self.waiting = list(self.waiting), collections.deque()
            calls, self.calls = list(self.calls), collections.deque()
        for _, future in calls:
            future.set_exception(Closed())
        self._fail_running(reason)
        for request in waiting:
            self._finish(request, reason)

    def _fail_running(self, reason: str) -> None:
        for request in list(self.rows):
            self._finish(request, reason)
        self.caches, self.positions = [], 0

    def run(self, stop: threading.Event) -> None:
        """Step while there is work, and wait for requests while there is none, until `stop`.
        A step that fails (out of memory, a bug) finishes its running requests as "error"; the
        engine serves on."""
        while not stop.is_set():
            with self.arrived:
                if not self.rows and not self.waiting and not self.calls:
                    self.arrived.wait(IDLE_WAIT_SECONDS)
                if not self.rows and not self.waiting and not self.calls:
                    continue
            try:
                self.step()
            except Exception:  # the requests in it get the error; the server serves on
                traceback.print_exc()
                self._fail_running("error")

    def run_until_idle(self) -> None:
        while self.rows or self.waiting:
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """Calls, then admit, prefill, one forward for all rows, sample, retire."""
        start = time.perf_counter()
        with autocast_context(self.device, self.precision):
            while self.calls:
                work, future = self.calls.popleft()
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(work())
                    except Exception as err:  # the caller's to raise
                        future.set_exception(err)
            with self.arrived:
                left = [request for request in self.waiting if request.cancelled.is_set()]
                for request in left:
                    self.waiting.remove(request)
            for row in left + [row for row in self.rows if row.cancelled.is_set()]:
                self._finish(row, "cancelled")
            self._admit()
            for row in list(self.refill):
                self.refill.discard(row)
                self._prefill(row)
            self.last_batch_size = len(self.rows)
            if self.rows:
                self._decode()
        if not self.rows:  # idle: the cache's memory goes back, the next request sizes its own
            self.caches, self.positions = [], 0
        self.last_step_seconds = time.perf_counter() - start
        self.step_seconds_total += self.last_step_seconds
        self.steps += 1

    def _rows_allowed(self, positions: int) -> int:
        return max(1, min(self.max_batch, self.cache_bytes // (positions * self.position_bytes)))

    def _reach(self, request: Request) -> int:
        return cache_positions(len(request.prompt), request.max_tokens, self.context_length)

    def _admit(self) -> None:
        """Take waiting requests while rows are free."""
        while True:
            with self.arrived:
                if not self.waiting:
                    return
                request = self.waiting[0]
                positions = max(self.positions, self._reach(request))
                if len(self.rows) >= self._rows_allowed(positions):
                    return  # it waits for a row to free
                self.waiting.popleft()
            if positions != self.positions or not self.caches:
                self._resize(positions)
            self.rows.append(request)
            self._prefill(request)

    def _resize(self, positions: int) -> None:
        """A cache of `positions` per row, as many rows as allowed; the active rows kept."""
        old, kept = self.caches, min(self.positions, positions)
        self.caches = self.model.new_caches(self._rows_allowed(positions), positions)
        for new_cache, old_cache in zip(self.caches, old):
            rows = len(self.rows)
            new_cache.k[:rows, :, :kept] = old_cache.k[:rows, :, :kept]
            new_cache.v[:rows, :, :kept] = old_cache.v[:rows, :, :kept]
        self.positions = positions

    def _prefill(self, row: Request) -> None:
        """Fill the row's cache with its window alone and sample its next token."""
        index, length = self.rows.index(row), len(row.window)
        views = [KVCache(cache.k[index:index + 1], cache.v[index:index + 1])
                 for cache in self.caches]
        logits = self.model(torch.tensor([row.window], device=self.device), caches=views,
                            input_pos=torch.arange(length, device=self.device),
                            last_only=True)[0]
        self._take([row], self._sample([row], logits[:, -1]))

    def _decode(self) -> None:
        """One forward for every active row: each feeds its last token at its own position."""
        rows = list(self.rows)
        self._take(rows, self._sample(rows, self._next_logits(rows)))

    def _next_logits(self, rows: list[Request]) -> torch.Tensor:
        """(rows, vocab): each row's logits after its last token. Compiled, the batch is padded
        to its width (decode_widths) with rows that write at position 0 of cache rows no
        request holds."""
        count = len(rows)
        width = decode_width(count, len(self.caches[0].k))
        width = width if width in self.compiled_widths else count
        last = torch.zeros(width, 1, dtype=torch.long, device=self.device)
        last[:count, 0] = torch.tensor([row.window[-1] for row in rows], device=self.device)
        positions = torch.zeros(width, 1, dtype=torch.long, device=self.device)
        positions[:count, 0] = torch.tensor([len(row.window) - 1 for row in rows],
                                            device=self.device)
        views = [KVCache(cache.k[:width], cache.v[:width]) for cache in self.caches]
        forward = self.model
        if width in self.compiled_widths:
            forward = self.compiled
            for view in views:
                torch._dynamo.mark_dynamic(view.k, 2)
                torch._dynamo.mark_dynamic(view.v, 2)
        return forward(last, caches=views, input_pos=positions)[0][:count, -1]

    @torch.inference_mode()
    def warm_up(self, budget_seconds: float) -> list[int]:
        """Compile the decode step for width 1, then each wider one while `budget_seconds` last
        (a width not reached runs eagerly); -> the widths compiled. Call it before the first
        request."""
        if self.rows or self.waiting:
            raise ValueError("warm_up() replaces the cache: call it before the first request")
        if self.compiled is None:
            return []
        widths, start = [], time.perf_counter()
        positions = min(MIN_CACHE_POSITIONS, self.context_length)
        with autocast_context(self.device, self.precision):  # the cache dtype steps will use
            self.caches = self.model.new_caches(self._rows_allowed(positions), positions)
            for width in decode_widths(len(self.caches[0].k)):
                if widths and time.perf_counter() - start > budget_seconds:
                    break
                self.compiled_widths.add(width)
                self._next_logits([Request([0], 1, window=[0]) for _ in range(width)])
                widths.append(width)
        self.caches = []
        return widths

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        """Every row's next token by its own settings, with one transfer to the host."""
        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        if all(row.temperature < GREEDY_BELOW for row in rows):  # no distribution to sort
            return logits.argmax(dim=-1).tolist()

        uniform = row_uniforms(column([row.seed for row in rows], torch.int64),
                               column([len(row.tokens) for row in rows], torch.int64))
        return sample_rows(logits.float(), column([row.temperature for row in rows],
                                                  torch.float32),
                           column([row.top_k for row in rows], torch.int64),
                           column([row.top_p for row in rows], torch.float32),
                           uniform).tolist()

    def _take(self, rows: list[Request], tokens: list[int]) -> None:
        """Record each row's new token; finish the rows it ends, apply the window rule."""
        self.tokens_generated += len(tokens)
        for row, token in zip(rows, tokens):
            row.tokens.append(token)
            row.window.append(token)
            if row.on_update is not None:
                row.on_update(row)
            if row.finish_reason is not None:  # its on_update ended it
                self._finish(row, row.finish_reason)
            elif token == row.end_id:
                self._finish(row, "stop")
            elif len(row.tokens) >= row.max_tokens:
                self._finish(row, "length")
            elif len(row.window) > self.context_length:  # full: go on from the newest half
                row.window = row.window[-max(1, self.context_length // 2):]
                self.refill.add(row)

    def _finish(self, row: Request, reason: str) -> None:
        """Retire a row: the last active row takes its place in the cache."""
        if row in self.rows:
            index, last = self.rows.index(row), len(self.rows) - 1
            if index != last:
                for cache in self.caches:
                    cache.k[index] = cache.k[last]
                    cache.v[index] = cache.v[last]
                self.rows[index] = self.rows[last]
            self.rows.pop()
            self.refill.discard(row)
        row.finish_reason = reason
        if row.on_update is not None:
            row.on_update(row)
        row.done.set()
