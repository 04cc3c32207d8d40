"""What a request must pass before the API reads it, for serve.py: a Host this server answers
to (a page's own domain pointed at 127.0.0.1, DNS rebinding, is refused), a browser Origin that
is the server's own page or allowed by --cors-origin, the API key, and a body that is
application/json (a cross-site form cannot send it without asking), within MAX_BODY_BYTES,
valid JSON, no deeper than MAX_JSON_DEPTH and with no lone surrogate in any string. Each
refusal is an ApiError in OpenAI's shape.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from completions import ApiError

MAX_BODY_BYTES = 4 << 20
MAX_JSON_DEPTH = 64       # deeper bodies are refused: nothing in the API nests this deep
OPEN_PATHS = ("/", "/health", "/metrics")  # the page (it asks for the key), liveness, metrics
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


def error_body(err: ApiError) -> dict:
    return {"error": {"message": err.message, "type": err.kind, "param": err.param,
                      "code": err.code}}


def error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 503 else None
    return JSONResponse(error_body(err), err.status, headers)


def body_problem(body: dict) -> tuple[str, str]:
    """(the field, what is wrong) for a body nested deeper than MAX_JSON_DEPTH or holding a
    string with a lone surrogate (JSON's \\ud800 escapes), which is no text; ("", "") if
    none. Walked without recursion, so no depth of input can overflow the stack."""
    pending: list[tuple[Any, str, int]] = [(body, "body", 0)]
    while pending:
        value, where, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            return where, f"nests deeper than {MAX_JSON_DEPTH} levels — send a flatter body"
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where, "holds a lone UTF-16 surrogate, which is no text — send valid " \
                    "Unicode"
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
            value, list) else ()
        pending += [(item, f"{where}[{key!r}]" if depth else str(key), depth + 1)
                    for key, item in items]
    return "", ""


async def read_json(request: Request) -> dict:
    """The request's JSON object; a body over MAX_BODY_BYTES is refused unread, and a body
    that is not application/json (what a cross-site form sends without asking) is refused."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the body must be sent as application/json, not {kind or 'none'} "
                       "— set Content-Type: application/json", None, "unsupported_media_type")
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
    except RecursionError:  # nested past the parser's own limit
        raise ApiError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels — send a "
                       "flatter body") from None
    except ValueError as err:
        raise ApiError(400, f"the body is not valid JSON ({err}) — send a JSON object") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "the body must be a JSON object")
    where, problem = body_problem(parsed)
    if problem:
        raise ApiError(400, f"{where} {problem}", where, "invalid_value")
    return parsed


def allowed_hosts(bind: str, extra: str) -> tuple[str, ...]:
    """The Host names answered: bound to a loopback address, the loopback names, that address
    and `extra`; bound to another, any (an empty tuple) unless `extra` names some."""
    names = tuple(name.strip().lower() for name in extra.split(",") if name.strip())
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind).is_loopback
    except ValueError:  # a host name
        loopback = False
    bound = f"[{bind}]" if ":" in bind else bind
    return (*LOOPBACK_NAMES, bound.lower(), *names) if loopback else names


def host_problem(allowed_hosts: tuple[str, ...], cors_origins: tuple[str, ...],
                 request: Request) -> ApiError | None:
    """A request whose Host is not this server's names (DNS rebinding: a page's own domain
    pointed at 127.0.0.1), or whose browser Origin is another site's, is refused."""
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if allowed_hosts and name.lower() not in allowed_hosts:
        return ApiError(403, f"Host {host!r} is not one this server answers to — use "
                        "http://127.0.0.1, or start it with --allowed-hosts NAME", None,
                        "host_not_allowed")
    origin = request.headers.get("origin")
    # its own page: the same host and port, http or https (behind a proxy that ends TLS)
    own = origin is not None and origin.partition("://")[2].lower() == host.lower()
    if origin is not None and not own and origin not in cors_origins:
        return ApiError(403, f"requests from the page at {origin} are refused — open the "
                        "server's own page, or start it with --cors-origin ORIGIN", None,
                        "origin_not_allowed")
    return None


class Guard:
    """Host, Origin and key checks before any route, and CORS headers for --cors-origin pages.
    Plain ASGI, not a BaseHTTPMiddleware, so a route still sees its client disconnect."""

    def __init__(self, app: Callable, allowed_hosts: tuple[str, ...],
                 cors_origins: tuple[str, ...], api_key: str | None):
        self.app, self.allowed_hosts, self.cors_origins = app, allowed_hosts, cors_origins
        self.api_key = api_key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        origin = request.headers.get("origin")
        cors = [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin"),
                (b"access-control-allow-headers", b"Authorization, Content-Type"),
                (b"access-control-allow-methods", b"GET, POST")] if (
            origin in self.cors_origins) else []

        async def send_with_cors(message: dict) -> None:  # so the page can read any answer
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        problem = host_problem(self.allowed_hosts, self.cors_origins, request)
        if problem is None and cors and request.method == "OPTIONS":  # a browser's preflight
            return await Response(status_code=204)(scope, receive, send_with_cors)
        if problem is None and self.api_key and request.url.path not in OPEN_PATHS:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    given.strip().encode(), self.api_key.encode()):
                problem = ApiError(401, "missing or wrong API key — send Authorization: "
                                   "Bearer KEY", None, "invalid_api_key")
        if problem is not None:
            return await error_response(problem)(scope, receive, send_with_cors)
        await self.app(scope, receive, send_with_cors)
