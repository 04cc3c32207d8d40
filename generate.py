"""Generation: prefill, decode through the KV cache, the context window, sampling (temperature,
top-k, top-p). Used by infer.py, the training loop's TensorBoard samples and bench.py.

The window rule: the model sees at most `context_length` tokens, what it was trained on. When
the window is full it drops to its newest half and goes on from there: the KV-cache path
prefills that half again, the no-cache path just feeds it, so both produce the same tokens.

The KV cache holds only the positions a generation can reach (prompt + new tokens, at most the
window), rounded up to a power of two: each decode step attends over the cache, so a short reply
from a model with a long window stays fast, and a compiled step sees few distinct shapes.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import KVCache, Transformer

# A CPU decode step is little compute, so per-call costs count: the C++ wrapper launches kernels
# without Python, and memory planning makes the step's buffers one allocation instead of one each.
# A one-row product reads its whole weight for one output row: inductor's decompose_mm_pass makes
# it a reduction kernel of its own, which streams the weight faster than the BLAS call does
# (docs/generation.md).
# The pass's bound on a one-row product's other dimensions: inductor's default (2,048) would leave
# the vocabulary head, the largest weight of all, to BLAS; this one covers any vocabulary.
ONE_ROW_REDUCTION_MAX_DIM = 1 << 18
# The bound is in the options too, though the pass reads it at import (cpu_compile_options), so
# that inductor's on-disk cache never hands back a step compiled under another bound.
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True, "memory_planning": True,
                       "post_grad_fusion_options": {"decompose_mm_pass": {
                           "cpu_max_other_dimension_decomposition": ONE_ROW_REDUCTION_MAX_DIM}}}
MIN_CACHE_POSITIONS = 64
# compile_decode_step's graphs, per model (for as long as it lives): a few sampling settings and
# shapes each, the least recently used dropped first
COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
COMPILED_STEPS_PER_MODEL = 8
GREEDY_BELOW = 1e-3   # a lower temperature is greedy: dividing logits by it would overflow
MAX_TEMPERATURE = 2.0  # OpenAI's bound; above it a sample is near-uniform noise
MAX_TOP_K = 1 << 24
MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn, checked one way for infer.py, serve.py and the training
    loop's samples: temperature 0 (or below GREEDY_BELOW) is greedy, top_k 0 and top_p 1 are
    off."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def problem(self) -> tuple[str, str]:
        """(the setting, what is wrong with it and what to give instead), or ("", "")."""
        def number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and (
                math.isfinite(value))

        if not (number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            return "temperature", (f"must be a number in [0, {MAX_TEMPERATURE:g}], got "
                                   f"{self.temperature!r} — 0 is greedy")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
                and 0 <= self.top_k <= MAX_TOP_K):
            return "top_k", (f"must be an integer in [0, {MAX_TOP_K}], got {self.top_k!r} — "
                             "0 is off")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            return "top_p", (f"must be in (0, 1], got {self.top_p!r} — 1 is off; for the "
                             "likeliest token every time, set temperature to 0")
        return "", ""


def cache_positions(prompt_length: int, max_new_tokens: int, context_length: int) -> int:
    """KV cache positions for a generation: what it can reach, as a power of two, within the
    window (a generation longer than the window slides through all of it)."""
    reach = min(prompt_length, context_length) + max_new_tokens
    return min(context_length, max(MIN_CACHE_POSITIONS, 1 << (reach - 1).bit_length()))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                uniform: torch.Tensor) -> torch.Tensor:
    """logits: (B, vocab) -> (B,) ids, row b picked by uniform[b] in [0, 1) (fp64) through the
    inverse of its distribution (inverse_cdf): multinomial's CPU kernel costs more than the rest
    of the sampling together when one token per row is drawn. A temperature below GREEDY_BELOW
    is greedy; top_k <= 0 and top_p >= 1 disable those filters."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    # Shifting by the max first keeps a tiny temperature from overflowing to inf (then nan).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if 0 < top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        logits = without_nucleus_tail(logits, top_p)
    return inverse_cdf(logits.softmax(dim=-1), uniform)


def without_nucleus_tail(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """logits (B, vocab) with -inf for each token whose better-ranked tokens already cover top_p
    (a float, or (B, 1) for each row its own) of the probability; the best one stays."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    sorted_probs = sorted_logits.softmax(dim=-1)
    drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probs (B, n), each row's weights (any total), and uniform (B,) in [0, 1) -> (B,) the
    index each uniform falls on in its row's cumulative distribution, summed in fp64 so that
    its last value is the row's whole mass; a weight of zero is never picked."""
    cumulative = probs.double().cumsum(dim=-1)
    picked = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)
    return picked.clamp(max=probs.shape[-1] - 1).squeeze(-1)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """logits (B, vocab) -> (B,) ids, every row by its own settings, as sample_next draws one:
    temperature (B,) (below GREEDY_BELOW: greedy), top_k (B,) (<= 0: off), top_p (B,) (>= 1:
    off), and uniform (B,), each row's draw in [0, 1). A row's token depends on its own inputs
    only: only the rows with top_p < 1 are sorted (a whole-vocabulary sort per row would cost
    more than the batch's forward on a small model), and top-k keeps what is at least a row's
    own k-th largest logit."""
    vocab = logits.shape[-1]
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature.clamp(
        min=GREEDY_BELOW)[:, None]
    filtered = top_k > 0
    if filtered.any():
        kept = torch.where(filtered, top_k.clamp(max=vocab), 1)
        largest = torch.topk(scaled, int(kept.max()), dim=-1).values
        kth_largest = largest.gather(-1, kept[:, None] - 1)
        scaled = scaled.masked_fill(filtered[:, None] & (scaled < kth_largest), float("-inf"))
    nucleus = (top_p < 1).nonzero().squeeze(-1)
    if len(nucleus):
        scaled[nucleus] = without_nucleus_tail(scaled[nucleus], top_p[nucleus, None])
    sampled = inverse_cdf(scaled.softmax(dim=-1), uniform)
    return torch.where(temperature < GREEDY_BELOW, logits.argmax(dim=-1), sampled)


def row_uniforms(seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """(B,) uniforms in [0, 1): row b's draw number draws[b] from the stream of seeds[b] (int64,
    both). A hash of the two, not a generator's state, so a row's draws depend on nothing else
    in the batch. Values stay below 2**32 between the steps, so no product overflows int64."""
    def mix(x: torch.Tensor) -> torch.Tensor:
        x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
        x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
        return (x >> 16) ^ x

    first = mix(mix(seeds & MASK32) ^ mix((seeds >> 32) & MASK32) ^ (draws & MASK32))
    second = mix(first ^ 0x5BD1E995)
    return ((first >> 8).double() * 2 ** 24 + (second >> 8).double()) / 2 ** 48


def compile_decoder(forward: Callable, device: torch.device, dynamic: bool | None = None
                    ) -> Callable:
    """`forward`, a function that runs the model, compiled for decoding on `device`. On a CPU
    attention runs as plain operations (SDPA's math backend), which inductor fuses with the
    step's other kernels: the flash kernel would be a call of its own, with its own buffers, in
    every layer."""
    if device.type != "cpu":
        return torch.compile(forward, dynamic=dynamic)
    options = cpu_compile_options()

    def attention_as_math(*args, **kwargs) -> Any:
        with sdpa_kernel([SDPBackend.MATH]):
            return forward(*args, **kwargs)

    planned = torch.compile(attention_as_math, dynamic=dynamic, options=options)
    compiled = planned

    def step(*args, **kwargs) -> Any:
        # Inductor's memory planner walks its pool tree recursively, and on some deep graphs it
        # passes Python's recursion limit: such a step compiles again without the planning.
        nonlocal compiled
        try:
            return compiled(*args, **kwargs)
        except Exception as error:
            if compiled is not planned or not caused_by_recursion(error):
                raise
            compiled = torch.compile(attention_as_math, dynamic=dynamic,
                                     options={**options, "memory_planning": False})
            return compiled(*args, **kwargs)

    return step


def cpu_compile_options() -> dict:
    """CPU_COMPILE_OPTIONS, with decompose_mm_pass's one-row bound raised to
    ONE_ROW_REDUCTION_MAX_DIM: the pass reads its bounds once, when inductor imports it, so
    compile options arrive too late to change them."""
    from torch._inductor.fx_passes import decompose_mem_bound_mm
    decompose_mem_bound_mm.cpu_max_other_dimension_decomposition = ONE_ROW_REDUCTION_MAX_DIM
    return CPU_COMPILE_OPTIONS


def compile_decode_step(model: Transformer, caches: list[KVCache],
                        sample: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                        settings: tuple, *example: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A CPU decode step compiled into one call: the model's forward of idx (B, 1) at input_pos
    through `caches`, then sample(logits (B, vocab), uniform, finished), which `settings` (a
    tuple) names. `example` is (idx, input_pos, uniform, finished) as each call passes them. The
    weights and the caches are the graph's inputs, handed over by reference on each call: it
    reads the weights as they are and writes the caches in place. Traced with make_fx rather than
    through dynamo, whose work on each call (guards, gathering every weight from the module tree)
    costs more than a small model's kernels; kept per model for these shapes and settings."""
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    names = list(state)
    held = [*state.values(), *(tensor for cache in caches for tensor in (cache.k, cache.v))]
    # what the trace bakes in besides the settings: the module tree (names, train or eval mode),
    # autocast, and each input's layout
    key = (settings, tuple(names), tuple(module.training for module in model.modules()),
           torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
           *((tensor.shape, tensor.stride(), tensor.dtype) for tensor in (*example, *held)))
    steps = COMPILED_STEPS.setdefault(model, {})
    compiled = steps.pop(key, None) or traced_and_compiled(model, names, sample,
                                                           [*example, *held])
    steps[key] = compiled  # the newest last: the oldest is dropped first
    if len(steps) > COMPILED_STEPS_PER_MODEL:
        del steps[next(iter(steps))]
    return lambda *inputs: compiled(*inputs, *held)


def traced_and_compiled(model: Transformer, names: list[str], sample: Callable,
                        inputs: list[torch.Tensor]) -> Callable[..., torch.Tensor]:
    """compile_decode_step's graph: inputs are the step's four, the weights in `names`' order,
    then each cache's keys and values."""
    options = cpu_compile_options()

    def flat_step(idx: torch.Tensor, input_pos: torch.Tensor, uniform: torch.Tensor,
                  finished: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        kv = tensors[len(names):]
        views = [KVCache(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)]
        logits = torch.func.functional_call(
            model, dict(zip(names, tensors)), (idx,),
            {"caches": views, "input_pos": input_pos, "last_only": True})[0]
        return sample(logits[:, -1].float(), uniform, finished)

    def compiled_with(options: dict) -> Callable:
        with sdpa_kernel([SDPBackend.MATH]):
            graph = make_fx(flat_step, tracing_mode="fake")(*inputs)
            return torch._inductor.compile(graph, inputs, options=options)

    try:
        return compiled_with(options)
    except Exception as error:  # the memory planner's recursion: see compile_decoder
        if not caused_by_recursion(error):
            raise
        return compiled_with({**options, "memory_planning": False})


def caused_by_recursion(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is a RecursionError."""
    while error is not None:
        if isinstance(error, RecursionError):
            return True
        error = error.__cause__ or error.__context__
    return False


@torch.inference_mode()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, context_length: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None,
             compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next (B,) token ids after prompt (B, T), one step at a time, by the window rule
    above; temperature 0 is greedy (and draws nothing from `generator`). Stops once every row has
    produced eos_id (finished rows repeat it). compile=True compiles the decode step (without the
    cache, the forward)."""
    batch_size, device = prompt.shape[0], prompt.device
    # The window is the first `length` columns of one buffer, written in place: no step
    # allocates it anew, and the no-cache path's compiled forward always sees one stride.
    buffer = torch.empty(batch_size, context_length + 1, dtype=prompt.dtype, device=device)
    length = min(prompt.shape[1], context_length)
    buffer[:, :length] = prompt[:, -length:]
    positions = torch.arange(context_length, device=device)
    cache_length = cache_positions(length, max_new_tokens, context_length)
    caches = model.new_caches(batch_size, cache_length) if use_cache else None

    def sample(logits: torch.Tensor, uniform: torch.Tensor, finished: torch.Tensor
               ) -> torch.Tensor:
        """logits (B, vocab) -> (B,) ids; eos_id for the rows already `finished`, which it marks
        (in place) with those that just produced it."""
        token = sample_next(logits, temperature, top_k, top_p, uniform)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        return token

    def next_token_after(idx: torch.Tensor, caches: list[KVCache] | None,
                         input_pos: torch.Tensor | None, uniform: torch.Tensor,
                         finished: torch.Tensor) -> torch.Tensor:
        logits = model(idx, caches=caches, input_pos=input_pos, last_only=True)[0]
        return sample(logits[:, -1].float(), uniform, finished)

    def cached_step(idx: torch.Tensor, input_pos: torch.Tensor, uniform: torch.Tensor,
                    finished: torch.Tensor) -> torch.Tensor:
        return next_token_after(idx, caches, input_pos, uniform, finished)

    uncached_step = (compile_decoder(next_token_after, device) if compile and not use_cache
                     else next_token_after)
    decode_step = None  # built at the first decode step, for its shapes
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    greedy = temperature < GREEDY_BELOW  # draws nothing from the generator
    no_draw = torch.zeros(batch_size, dtype=torch.float64, device=device) if greedy else None
    refill = True  # the cache holds none of the window yet
    for _ in range(max_new_tokens):
        uniform = no_draw if greedy else torch.rand(batch_size, generator=generator,
                                                    device=device, dtype=torch.float64)
        if not use_cache:
            next_token = uncached_step(buffer[:, :length], None, None, uniform, finished)
        elif refill:  # prefill the whole window, eagerly: it happens once per half window
            next_token = next_token_after(buffer[:, :length], caches, positions[:length],
                                          uniform, finished)
            refill = False
        else:  # one new position: the token sampled last
            inputs = (next_token[:, None], positions[length - 1:length], uniform, finished)
            if decode_step is None:
                decode_step = cached_step
                if compile:
                    settings = ((0.0, 0, 1.0) if greedy else (temperature, top_k, top_p),
                                eos_id)
                    decode_step = (
                        compile_decode_step(model, caches, sample, settings, *inputs)
                        if device.type == "cpu" else compile_decoder(cached_step, device))
            next_token = decode_step(*inputs)
        yield next_token
        if eos_id is not None and bool(finished.all()):
            return
        buffer[:, length] = next_token
        length += 1
        if length > context_length:  # full: go on from the newest half
            kept = max(1, context_length // 2)
            buffer[:, :kept] = buffer[:, length - kept:length].clone()
            length, refill = kept, True
