"""Serve a trained model over OpenAI's API, with a chat page at /:

    python serve.py --ckpt_path checkpoints/chat_model.pth [--host 127.0.0.1] [--port 8000]

POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not), GET
/v1/models and /health, and the tokenizer endpoints lm-evaluation-harness reads (/tokenizer_info,
/tokenize, /detokenize). Requests queue for one generation loop (in the main thread; HTTP runs
in a thread beside it), so they never share a model state and /health answers during a long
reply. A full queue answers 503 with Retry-After; a client that disconnects stops its generation
at the next token.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from checkpoints import TrainedModel, load_trained
from completions import (ApiError, Completion, chat_completion, generate_choice, logprobs,
                         text_completion)
from utils import ArgumentParser, UserError, require_within, run_cli

MAX_BODY_BYTES = 4 << 20
FLUSH_SECONDS = 0.02  # streamed text goes out at least this often (sooner for a slow model)
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "chat.html")
OPEN_PATHS = ("/", "/health")  # the page (it asks for the key) and liveness need no key


@dataclass
class Job:
    """A request's work for the generation loop, and the events it sends back: ("text",
    index, piece) as text is ready, then ("done", completion) or ("error", ApiError). Text
    gathers for up to FLUSH_SECONDS and goes out together: each wake-up of the event loop
    takes the interpreter lock from the generation loop, so waking once per token would
    slow a fast model's decode."""
    work: Callable[[Callable[[], bool], Callable[..., None]], Completion]
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)
    pending: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    flush_at: float = 0.0  # when text last went out, or is due to (time.monotonic())

    def emit(self, *event: Any) -> None:
        with self.lock:
            self.pending.append(event)
            first = len(self.pending) == 1
        try:
            if event[0] != "text":
                self.loop.call_soon_threadsafe(self.ready.set)
            elif first:
                now = time.monotonic()
                delay = max(0.0, self.flush_at + FLUSH_SECONDS - now)
                self.flush_at = now + delay
                self.loop.call_soon_threadsafe(self.loop.call_later, delay, self.ready.set)
        except RuntimeError:  # the event loop has closed at shutdown: no one is listening
            self.cancelled.set()

    async def events(self) -> list[tuple]:
        """The events sent since the last call (waiting for one)."""
        while True:
            await self.ready.wait()
            with self.lock:
                events, self.pending = self.pending, []
                self.ready.clear()
            if events:
                return events


@dataclass
class Server:
    trained: TrainedModel
    model_name: str
    api_key: str | None
    jobs: queue.Queue
    cancelled_requests: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


def run_jobs(server: Server) -> None:
    """The generation loop: one job at a time, in arrival order; None ends it."""
    while (job := server.jobs.get()) is not None:
        if job.cancelled.is_set():  # its client left while it waited
            server.cancelled_requests += 1
            continue
        try:
            completion = job.work(job.cancelled.is_set, job.emit)
            if "cancelled" in completion.finish_reasons:
                server.cancelled_requests += 1
                print(f"a request was cancelled by its client after "
                      f"{sum(map(len, completion.sampled))} tokens", file=sys.stderr, flush=True)
            job.emit("done", completion)
        except ApiError as err:
            job.emit("error", err)
        except Exception as err:  # a bug: the request gets a 500, the thread serves on
            traceback.print_exc()
            job.emit("error", ApiError(500, f"generation failed: {err}", None, "server_error"))


def completion_work(server: Server, completion: Completion) -> Callable:
    """The job that generates every choice of `completion`, streaming text as it comes."""
    trained = server.trained

    def work(cancelled: Callable[[], bool], emit: Callable[..., None]) -> Completion:
        seed = completion.seed if completion.seed is not None else torch.seed()
        generator = torch.Generator(device=trained.device).manual_seed(seed)
        for index in range(len(completion.prompts)):
            for piece in generate_choice(trained, completion, index, generator, cancelled):
                emit("text", index, piece)
            if cancelled():
                break
            if completion.logprobs is not None:
                completion.choice_logprobs.append(logprobs(trained, completion, index))
        return completion

    return work


def submit(server: Server, work: Callable) -> Job:
    job = Job(work, asyncio.get_running_loop())
    try:
        server.jobs.put_nowait(job)
    except queue.Full:
        raise ApiError(503, f"the server is busy ({server.jobs.maxsize} requests are waiting) — "
                       "retry shortly", None, "server_busy") from None
    return job


def error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 503 else None
    return JSONResponse({"error": {"message": err.message, "type": err.kind, "param": err.param,
                                   "code": err.code}}, err.status, headers)


async def read_json(request: Request) -> dict:
    """The request's JSON object; a body over MAX_BODY_BYTES is refused unread."""
    too_big = ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB — send less")
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
        raise too_big
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_big
    try:
        parsed = json.loads(body)
    except ValueError as err:
        raise ApiError(400, f"the body is not valid JSON ({err}) — send a JSON object") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "the body must be a JSON object")
    return parsed


def usage(completion: Completion) -> dict:
    prompt, generated = sum(map(len, completion.prompts)), sum(map(len, completion.sampled))
    return {"prompt_tokens": prompt, "completion_tokens": generated,
            "total_tokens": prompt + generated}


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream_events(job: Job, chunk: Callable[[int, str | None, str | None], dict],
                        completion: Completion) -> AsyncIterator[str]:
    """Server-sent events of a job: a chunk per piece of text (pieces that arrived together
    for one choice are one chunk), a last one per choice with its finish reason, usage if
    asked, then [DONE]. A disconnect cancels the job."""
    try:
        while True:
            events, texts = await job.events(), []
            for kind, *rest in events:
                if kind == "text" and texts and texts[-1][0] == rest[0]:
                    texts[-1][1] += rest[1]
                elif kind == "text":
                    texts.append(rest)
            out = [sse(chunk(index, text, None)) for index, text in texts]
            kind, *rest = events[-1]
            if kind == "error":
                out.append(sse({"error": {"message": rest[0].message, "type": rest[0].kind,
                                          "param": rest[0].param, "code": rest[0].code}}))
            elif kind == "done":
                out += [sse(chunk(index, None, reason))
                        for index, reason in enumerate(completion.finish_reasons)
                        if reason != "cancelled"]
                if completion.include_usage:
                    out.append(sse({**chunk(0, None, None), "choices": [],
                                    "usage": usage(completion)}))
            yield "".join(out)
            if kind != "text":
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op once the job is done; else its client has gone


async def finished(job: Job) -> Completion:
    try:
        while True:
            kind, *rest = (await job.events())[-1]
            if kind == "error":
                raise rest[0]
            if kind == "done":
                return rest[0]
    finally:
        job.cancelled.set()  # a no-op once the job is done; else the server is stopping


def make_app(server: Server) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    trained, tokenizer = server.trained, server.trained.tokenizer

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on "
                f"{request.url.path}"}.get(err.status_code, str(err.detail))
        return error_response(ApiError(err.status_code, f"{what} — see the server's docs "
                                       "(docs/serving.md)", None, "not_found"))

    @app.middleware("http")
    async def check_key(request: Request, call_next: Callable) -> Response:
        if server.api_key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), server.api_key.encode()):
                return error_response(ApiError(401, "missing or wrong API key — send "
                                               "Authorization: Bearer KEY", None,
                                               "invalid_api_key"))
        return await call_next(request)

    async def accept(request: Request, parse: Callable[[dict, TrainedModel], Completion]
                     ) -> tuple[Completion, Job]:
        """A completion request checked (body, model, parameters) and queued."""
        body = await read_json(request)
        model = body.get("model")
        if model is not None and model != server.model_name:
            raise ApiError(404, f"the model {model!r} does not exist here — this server serves "
                           f"{server.model_name!r}", "model", "model_not_found")
        completion = parse(body, trained)
        return completion, submit(server, completion_work(server, completion))

    def head(kind: str) -> dict:
        return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-"
                      f"{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": server.model_name}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        completion, job = await accept(request, chat_completion)
        if completion.stream:
            stream_head = head("chat.completion.chunk")

            def chunk(index: int, text: str | None, reason: str | None) -> dict:
                delta = {} if text is None else {"content": text}
                return {**stream_head, "choices": [{"index": index, "delta": delta,
                                                    "logprobs": None, "finish_reason": reason}]}

            async def events() -> AsyncIterator[str]:
                yield sse({**stream_head, "choices": [{"index": 0, "delta": {
                    "role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}]})
                async for event in stream_events(job, chunk, completion):
                    yield event

            return StreamingResponse(events(), media_type="text/event-stream")
        await finished(job)
        return JSONResponse({**head("chat.completion"), "choices": [{
            "index": 0, "message": {"role": "assistant", "content": completion.texts[0]},
            "logprobs": None, "finish_reason": completion.finish_reasons[0]}],
            "usage": usage(completion)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        completion, job = await accept(request, text_completion)
        if completion.stream:
            stream_head = head("text_completion")

            def chunk(index: int, text: str | None, reason: str | None) -> dict:
                return {**stream_head, "choices": [{"index": index, "text": text or "",
                                                    "logprobs": None, "finish_reason": reason}]}

            return StreamingResponse(stream_events(job, chunk, completion),
                                     media_type="text/event-stream")
        await finished(job)
        choices = []
        for index, prompt in enumerate(completion.prompts):
            echoed = tokenizer.decode(prompt) if completion.echo else ""
            choices.append({"index": index, "text": echoed + completion.texts[index],
                            "finish_reason": completion.finish_reasons[index], "logprobs":
                            completion.choice_logprobs[index] if completion.choice_logprobs
                            else None})
        return JSONResponse({**head("text_completion"), "choices": choices,
                             "usage": usage(completion)})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": server.created,
            "owned_by": "slm", "context_length": trained.context_length}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": server.jobs.qsize(),
                "cancelled_requests": server.cancelled_requests}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        special = {"bos_token": tokenizer.chat.special_tokens.get("bos_token"),
                   "eos_token": tokenizer.end_of_text,
                   "pad_token": tokenizer.chat.special_tokens.get("pad_token")}
        return {**{key: token for key, token in special.items() if token},
                "chat_template": tokenizer.chat.template,
                "model_max_length": trained.context_length}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        text = (await read_json(request)).get("prompt")
        if not isinstance(text, str):
            raise ApiError(400, "prompt must be a string", "prompt", "invalid_type")
        return {"tokens": tokenizer.encode(text)}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        ids = (await read_json(request)).get("tokens")
        vocab = trained.model.config.vocab_size
        if not (isinstance(ids, list) and all(isinstance(i, int) and 0 <= i < vocab
                                              for i in ids)):
            raise ApiError(400, f"tokens must be a list of token ids in [0, {vocab})", "tokens",
                           "invalid_value")
        return {"prompt": tokenizer.decode(ids)}

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    return app


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description="Serve a trained model over OpenAI's API, with a chat "
                            "page at /.")
    parser.add_argument("--ckpt_path", default="checkpoints/best_model.pth",
                        help="checkpoint written by train.py, or a Hugging Face Llama directory")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None,
                        help="the model id clients send (default: the checkpoint's file or "
                        "directory name)")
    parser.add_argument("--api-key", default=os.environ.get("SLM_API_KEY"),
                        help="require Authorization: Bearer KEY (default: $SLM_API_KEY; none)")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda", "mps"),
                        help="default: training.device of the checkpoint's config")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait; more are answered 503 with Retry-After")
    args = parser.parse_args()
    require_within("--port", args.port, 0, 65535)
    require_within("--max-queue", args.max_queue, 1, 1 << 20)
    return args


def main() -> None:
    args = parse_args()
    trained = load_trained(args.ckpt_path, device_name=args.device)
    name = args.model_name or os.path.basename(os.path.normpath(args.ckpt_path))
    server = Server(trained, name, args.api_key or None, queue.Queue(args.max_queue))
    # The model runs in the main thread, where torch's intra-op thread pool lives (a second
    # thread would start a pool of its own and decode slower); HTTP runs in a thread beside it.
    http = uvicorn.Server(uvicorn.Config(make_app(server), host=args.host, port=args.port,
                                         log_level="warning", timeout_graceful_shutdown=2))

    def serve_http() -> None:
        http.run()
        server.jobs.put(None)  # ends run_jobs once the requests in flight are answered

    listener = threading.Thread(target=serve_http, daemon=True)
    listener.start()
    while not http.started:
        if not listener.is_alive():
            raise UserError(f"could not listen on {args.host}:{args.port} (see the line above) "
                            "— choose another --port, or stop what uses it")
        time.sleep(0.05)
    for signum in (signal.SIGINT, signal.SIGTERM):  # stop taking requests, end the streams
        signal.signal(signum, lambda *_: setattr(http, "should_exit", True))
    print(f"serving {name} ({trained.model.num_params():,} parameters, {trained.context_length}"
          f"-token window) at http://{args.host}:{args.port}/", flush=True)
    run_jobs(server)
    print("stopped", flush=True)


if __name__ == "__main__":
    run_cli(main)
