"""Serve a trained model over OpenAI's API, with a chat page at /:

    python serve.py --ckpt_path checkpoints/chat_model.pth [--host 127.0.0.1] [--port 8000]

POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not), GET
/v1/models, /health and /metrics (Prometheus), and the tokenizer endpoints lm-evaluation-harness
reads (/tokenizer_info, /tokenize, /detokenize). The HTTP side parses, checks, queues and
streams; the engine (engine.py) steps every running request together in the main thread, where
torch's thread pool lives, and HTTP runs in a thread beside it. A full queue answers 503 with
Retry-After; a client that disconnects frees its row at the next step; SIGTERM ends running
streams with an error event and [DONE], answers waiting requests 503, and exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from answers import SHUTDOWN, CancellingStream, Wake, finished, sse, stream_chunks, usage
from checkpoints import TrainedModel, load_trained
from completions import ApiError, Completion, chat_completion, logprobs, text_completion
from engine import Closed, Engine
from guard import Guard, allowed_hosts, error_response, read_json
from quantize import DTYPES, resolve_dtype
from utils import ArgumentParser, UserError, require, require_within, run_cli

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "chat.html")
WARM_UP_SECONDS = 60  # start-up compile budget: widths past it compile when first needed


@dataclass
class Server:
    trained: TrainedModel
    engine: Engine
    model_name: str
    api_key: str | None
    max_queue: int
    allowed_hosts: tuple[str, ...] = ()  # empty: any Host (not bound to a loopback address)
    cors_origins: tuple[str, ...] = ()
    stopping: bool = False
    cancelled_requests: int = 0
    created: int = field(default_factory=lambda: int(time.time()))

    def finished(self, completion: Completion) -> None:
        """On the engine's thread, when a request is done: count a client's cancel."""
        if any(choice.finish_reason == "cancelled" for choice in completion.choices):
            self.cancelled_requests += 1
            tokens = sum(len(choice.tokens) for choice in completion.choices)
            print(f"a request was cancelled by its client after {tokens} tokens",
                  file=sys.stderr, flush=True)


def metrics(server: Server) -> str:
    """Prometheus' text format: no request's content, only counts and times."""
    engine = server.engine
    rows = [("slm_requests_waiting", "gauge", "requests waiting for a row", len(engine.waiting)),
            ("slm_requests_running", "gauge", "requests being generated", len(engine.rows)),
            ("slm_tokens_generated_total", "counter", "tokens sampled", engine.tokens_generated),
            ("slm_steps_total", "counter", "engine steps", engine.steps),
            ("slm_step_seconds_total", "counter", "seconds spent in steps",
             engine.step_seconds_total),
            ("slm_step_seconds", "gauge", "the last step's seconds", engine.last_step_seconds),
            ("slm_batch_size", "gauge", "rows in the last step", engine.last_batch_size),
            ("slm_requests_cancelled_total", "counter", "requests their client left",
             server.cancelled_requests)]
    return "".join(f"# HELP {name} {text}\n# TYPE {name} {kind}\n{name} {value}\n"
                   for name, kind, text, value in rows)


def make_app(server: Server) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    trained, tokenizer, engine = server.trained, server.trained.tokenizer, server.engine

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        what, code = {404: (f"no route {request.url.path}", "not_found"),
                      405: (f"{request.method} is not allowed on {request.url.path}",
                            "method_not_allowed")}.get(err.status_code,
                                                       (str(err.detail), "invalid_request"))
        return error_response(ApiError(err.status_code, f"{what} — see the server's docs "
                                       "(docs/serving.md)", None, code))

    app.add_middleware(Guard, allowed_hosts=server.allowed_hosts,
                       cors_origins=server.cors_origins, api_key=server.api_key)

    async def accept(request: Request, parse: Callable[[dict, TrainedModel], Completion]
                     ) -> tuple[Completion, Wake]:
        """A completion request checked (body, model, parameters: tokenizing and templating
        off the event loop) and queued for the engine."""
        body = await read_json(request)
        model = body.get("model")
        if model is not None and model != server.model_name:
            raise ApiError(404, f"the model {model!r} does not exist here — this server serves "
                           f"{server.model_name!r}", "model", "model_not_found")
        completion = await asyncio.to_thread(parse, body, trained)
        if server.stopping:
            raise SHUTDOWN
        if len(completion.choices) > server.max_queue:
            raise ApiError(400, f"the request holds {len(completion.choices)} prompts, more "
                           f"than the server's queue takes ({server.max_queue}) — send fewer",
                           "prompt", "invalid_value")
        if len(engine.waiting) + len(completion.choices) > server.max_queue:
            raise ApiError(503, f"the server is busy ({len(engine.waiting)} requests are "
                           "waiting) — retry shortly", None, "server_busy")
        wake = Wake(asyncio.get_running_loop())
        completion.notify, completion.on_finished = wake, server.finished
        try:
            for choice in completion.choices:
                engine.submit(choice)
        except Closed:  # the server began to stop since the check above
            for choice in completion.choices:
                choice.cancelled.set()
            raise SHUTDOWN from None
        return completion, wake

    def head(kind: str) -> dict:
        return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-"
                      f"{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": server.model_name}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        completion, wake = await accept(request, chat_completion)
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
                async for event in stream_chunks(completion, wake, chunk):
                    yield event

            return CancellingStream(events(), completion)
        if not await finished(completion, wake, request):
            return Response(status_code=204)  # its client has gone: no one reads this
        choice = completion.choices[0]
        return JSONResponse({**head("chat.completion"), "choices": [{
            "index": 0, "message": {"role": "assistant", "content": choice.text},
            "logprobs": None, "finish_reason": choice.finish_reason}],
            "usage": usage(completion)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        completion, wake = await accept(request, text_completion)
        if completion.stream:
            stream_head = head("text_completion")

            def chunk(index: int, text: str | None, reason: str | None) -> dict:
                return {**stream_head, "choices": [{"index": index, "text": text or "",
                                                    "logprobs": None, "finish_reason": reason}]}

            return CancellingStream(stream_chunks(completion, wake, chunk), completion)
        if not await finished(completion, wake, request):
            return Response(status_code=204)  # its client has gone: no one reads this
        if completion.logprobs is not None:  # the model's work: on the engine's thread
            try:
                scored = await asyncio.wrap_future(engine.call(lambda: [
                    logprobs(trained, completion, choice) for choice in completion.choices]))
            except Closed:
                raise SHUTDOWN from None
        choices = []
        for choice in completion.choices:
            echoed = (await asyncio.to_thread(tokenizer.decode, choice.prompt)
                      if completion.echo else "")
            choices.append({"index": choice.index, "text": echoed + choice.text,
                            "finish_reason": choice.finish_reason, "logprobs":
                            scored[choice.index] if completion.logprobs is not None else None})
        answer = {**head("text_completion"), "choices": choices, "usage": usage(completion)}
        # off the event loop: an echo's logprobs are a large body to serialise
        return Response(await asyncio.to_thread(json.dumps, answer, ensure_ascii=False),
                        media_type="application/json")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": server.created,
            "owned_by": "slm", "context_length": trained.context_length}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "stopping" if server.stopping else "ok",
                "queued": len(engine.waiting), "running": len(engine.rows),
                "cancelled_requests": server.cancelled_requests}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics(server), media_type="text/plain; version=0.0.4")

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
        return {"tokens": await asyncio.to_thread(tokenizer.encode, text)}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        ids = (await read_json(request)).get("tokens")
        vocab = trained.model.config.vocab_size
        if not (isinstance(ids, list) and all(isinstance(i, int) and 0 <= i < vocab
                                              for i in ids)):
            raise ApiError(400, f"tokens must be a list of token ids in [0, {vocab})", "tokens",
                           "invalid_value")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, ids)}

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
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights and products for decoding: auto (fp32 unless int8 or "
                        "bf16 measures faster here and agrees with fp32; decided once), fp32, "
                        "bf16 (native bf16 only), int8 (docs/generation.md)")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda", "mps"),
                        help="default: training.device of the checkpoint's config")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="requests generated at once, each a row of the KV cache")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the decode step for each batch width at start-up, within "
                        f"about {WARM_UP_SECONDS} s (default; later starts read inductor's "
                        "cache); --no-compile starts at once and decodes eagerly")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait; more are answered 503 with Retry-After")
    parser.add_argument("--allowed-hosts", default="",
                        help="comma-separated Host names to answer besides the loopback ones "
                        "(bound to a loopback address, others are refused)")
    parser.add_argument("--cors-origin", default="",
                        help="comma-separated origins (https://app.example) whose pages may "
                        "call the API from a browser (default: only the server's own page)")
    args = parser.parse_args()
    require_within("--port", args.port, 0, 65535)
    require_within("--max-batch", args.max_batch, 1, 4096)
    require_within("--max-queue", args.max_queue, 1, 1 << 20)
    require(args.api_key is None or args.api_key.strip(), "the API key is empty (from --api-key "
            "or SLM_API_KEY), which would let anyone in — give a real key, or leave both unset "
            "for a server without one")
    return args


def require_free_port(host: str, port: int) -> None:
    """Refuse a port that is taken before the model loads and compiles, not a minute later."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as error:
        raise UserError(f"could not listen on {host}:{port} ({error.strerror}) — choose another "
                        "--host or --port, or stop what uses it") from None


def main() -> None:
    args = parse_args()
    require_free_port(args.host, args.port)
    trained = resolve_dtype(load_trained(args.ckpt_path, device_name=args.device),
                            args.dtype, args.ckpt_path, compiled=args.compile)
    name = args.model_name or os.path.basename(os.path.normpath(args.ckpt_path))
    engine = Engine(trained.model, trained.context_length, trained.precision, args.max_batch,
                    compile=args.compile)
    if args.compile:
        start = time.perf_counter()
        widths = engine.warm_up(WARM_UP_SECONDS)
        print(f"compiled the decode step for {', '.join(map(str, widths))} rows at once in "
              f"{time.perf_counter() - start:.0f} s (wider batches run eagerly)",
              file=sys.stderr, flush=True)
    server = Server(trained, engine, name, args.api_key, args.max_queue,
                    allowed_hosts(args.host, args.allowed_hosts),
                    tuple(origin.strip() for origin in args.cors_origin.split(",")
                          if origin.strip()))
    http = uvicorn.Server(uvicorn.Config(make_app(server), host=args.host, port=args.port,
                                         log_level="warning", timeout_graceful_shutdown=3))
    http.install_signal_handlers = lambda: None  # the main thread's handlers stop everything
    listener = threading.Thread(target=http.run, daemon=True)
    listener.start()
    while not http.started:
        if not listener.is_alive():
            raise UserError(f"could not listen on {args.host}:{args.port} (see the line above) "
                            "— choose another --port, or stop what uses it")
        time.sleep(0.05)
    stop = threading.Event()

    def stop_serving(*_: object) -> None:
        server.stopping = True  # new requests: 503
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_serving)
    print(f"serving {name} ({trained.model.num_params():,} parameters, {trained.context_length}"
          f"-token window) at http://{args.host}:{args.port}/", flush=True)
    engine.run(stop)  # the model's thread: the main one, where torch's thread pool lives
    engine.close("shutdown")  # streams end with an error event, the waiting get 503
    http.should_exit = True
    listener.join(timeout=10)
    print("stopped", flush=True)


if __name__ == "__main__":
    run_cli(main)
