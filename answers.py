"""How a request's answer goes back, for serve.py: server-sent events as its text grows, or a
wait for the whole of it, both cancelling the request when its client leaves, and the error a
request that ended badly answers with. The engine's thread wakes the HTTP side through `Wake`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from completions import ApiError, Completion
from guard import error_body

FLUSH_SECONDS = 0.02  # streamed text goes out at least this often (sooner for a slow model)
DISCONNECT_POLL_SECONDS = 0.25  # how often a non-streaming request checks for its client


class Wake:
    """Wakes the HTTP side of a request from the engine's thread, at most every FLUSH_SECONDS:
    each wake-up of the event loop takes the interpreter lock from the engine, so waking once
    per token would slow a fast model's decode."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.ready = loop, asyncio.Event()
        self.lock, self.scheduled, self.due = threading.Lock(), False, 0.0

    def __call__(self) -> None:
        with self.lock:
            if self.scheduled:
                return
            now = time.monotonic()
            delay = max(0.0, self.due + FLUSH_SECONDS - now)
            self.scheduled, self.due = True, now + delay
        try:
            self.loop.call_soon_threadsafe(self.loop.call_later, delay, self._fire)
        except RuntimeError:  # the event loop has closed at shutdown: no one is listening
            pass

    def _fire(self) -> None:
        with self.lock:
            self.scheduled = False
        self.ready.set()

    async def wait(self) -> None:
        await self.ready.wait()
        self.ready.clear()


def usage(completion: Completion) -> dict:
    prompt = sum(len(choice.prompt) for choice in completion.choices)
    generated = sum(len(choice.tokens) for choice in completion.choices)
    return {"prompt_tokens": prompt, "completion_tokens": generated,
            "total_tokens": prompt + generated}


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SHUTDOWN = ApiError(503, "the server is shutting down — retry against a running one", None,
                    "server_shutting_down")
FAILED = ApiError(500, "generation failed on the server (its log says why) — retry, or report "
                  "the log's error", None, "server_error")


def ended_badly(completion: Completion) -> ApiError | None:
    """The error a finished request answers with: the server stopped, or its step failed."""
    reasons = {choice.finish_reason for choice in completion.choices}
    return SHUTDOWN if "shutdown" in reasons else FAILED if "error" in reasons else None


class CancellingStream(StreamingResponse):
    """Server-sent events whose request is cancelled however the response ends, a client gone
    before the first event included (the events' own code never runs then)."""

    def __init__(self, events: AsyncIterator[str], completion: Completion):
        super().__init__(events, media_type="text/event-stream")
        self.completion = completion

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for choice in self.completion.choices:
                choice.cancelled.set()  # a no-op once it is done; else its client has gone


async def stream_chunks(completion: Completion, wake: Wake,
                        chunk: Callable[[int, str | None, str | None], dict]
                        ) -> AsyncIterator[str]:
    """Server-sent events of a request: a chunk per choice with new text, a last one per choice
    with its finish reason, usage if asked, then [DONE]; an error event instead if the server
    stopped or the step failed."""
    sent = [0] * len(completion.choices)
    while True:
        await wake.wait()
        out = []
        with completion.lock:
            for choice in completion.choices:
                if choice.sendable > sent[choice.index]:
                    out.append(sse(chunk(choice.index, choice.text[
                        sent[choice.index]:choice.sendable], None)))
                    sent[choice.index] = choice.sendable
            done = all(choice.final for choice in completion.choices)
        if done:
            problem = ended_badly(completion)
            if problem is not None:
                out.append(sse(error_body(problem)))
            else:
                out += [sse(chunk(choice.index, None, choice.finish_reason))
                        for choice in completion.choices]
                if completion.include_usage:
                    out.append(sse({**chunk(0, None, None), "choices": [],
                                    "usage": usage(completion)}))
            out.append("data: [DONE]\n\n")
        yield "".join(out)
        if done:
            return


async def finished(completion: Completion, wake: Wake, request: Request) -> bool:
    """Wait for every choice; -> False when the client left first (its choices are cancelled
    and no answer is due)."""
    try:
        while not all(choice.final for choice in completion.choices):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), DISCONNECT_POLL_SECONDS)
            if await request.is_disconnected():
                return False
    finally:
        for choice in completion.choices:
            choice.cancelled.set()  # a no-op once it is done; else its client has gone
    problem = ended_badly(completion)
    if problem is not None:
        raise problem
    return True
