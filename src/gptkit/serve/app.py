"""The HTTP layer: an OpenAI-compatible API and a web chat page over one :class:`Engine`.

Thin routes, as vLLM's ``entrypoints/openai/api_server.py`` and llama.cpp's server
(``tools/server/README.md``) are arranged: each route parses a request into a
:mod:`gptkit.serve.protocol` schema, hands it to :class:`~gptkit.serve.serving.Serving`
(which knows the API's meaning but no HTTP), and sends back its response object as JSON or
its chunks as Server-Sent Events; every failure becomes the OpenAI API's error object with
its status (API reference, "Error codes")::

    bad JSON, wrong types, bad values, unsupported fields    400 invalid_request_error
    JSON nested deeper than MAX_JSON_DEPTH, NaN, Infinity    400 invalid_request_error
    prompt + reply longer than the context                   400 context_length_exceeded
    missing or wrong API key (when one is set)               401 invalid_api_key
    unknown model, unknown route                             404
    the body not sent within read_timeout                    408 request_timeout
    body over the size limit (a declared one at once)        413 request_too_large
    the engine's waiting line is full                        503 server_busy (Retry-After)
    generation failed                                        500 (a stream sends an error event)

Streams follow the API's SSE format: ``data: {chunk}`` events, a final usage chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``. A client that goes away
cancels its engine requests, so its rows leave the batch at the next step.

Security defaults: the server binds 127.0.0.1; ``api_key`` guards every route but
``/health`` and the static page (the page asks for the key and keeps it in memory only);
request bodies, their nesting and ``max_tokens`` are bounded; the page is served with a
strict Content-Security-Policy (scripts and styles from this server only, no inline code).
Slow clients cannot hold connections open ("slow loris"): a connection whose request head
has not arrived within ``read_timeout`` is closed (:func:`head_timeout_protocol`, around
uvicorn's HTTP protocol, which times out only idle keep-alive connections), and a body
that has not arrived by then gets 408, as nginx's ``client_header_timeout`` and
``client_body_timeout`` do. A client that leaves while its body is read, or before a
non-streamed reply is ready, ends its request without a traceback in the log.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gptkit.errors import GptkitError
from gptkit.inspect.chat import answer_attention
from gptkit.serve.engine import Engine
from gptkit.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorDetail,
    ErrorResponse,
    ModelList,
)
from gptkit.serve.serving import (
    GenerationFailed,
    Job,
    ModelNotFound,
    ServerBusy,
    Serving,
    ServingError,
)

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_READ_TIMEOUT = 30.0  # seconds for a request's head, and again for its body
MAX_JSON_DEPTH = 64  # nesting of a request body; a JSON schema needs far less
Schema = TypeVar("Schema", bound=BaseModel)
T = TypeVar("T")

# The page loads chat.js and style.css from this server and talks only to it.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# each kind of serving error -> (status, OpenAI error type); subclasses before ServingError
_STATUSES: dict[type[ServingError], tuple[int, str]] = {
    ModelNotFound: (404, "invalid_request_error"),
    ServerBusy: (503, "server_error"),
    GenerationFailed: (500, "server_error"),
    ServingError: (400, "invalid_request_error"),
}


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_tokens_limit: int | None = None,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> FastAPI:
    """The FastAPI application serving ``engine``'s model as ``model_name``.

    The caller starts and shuts down the engine (see :func:`serve`).

    Args:
        engine: a started :class:`Engine`; its tokenizer renders and encodes prompts.
        model_name: the model's id in ``/v1/models``; requests naming another get 404.
        api_key: when set, every route but ``/health`` and the page needs
            ``Authorization: Bearer <api_key>``.
        max_body_bytes: larger request bodies get 413.
        max_tokens_limit: the most ``max_tokens`` a request may ask for (default: the
            context); also the reply limit of a chat request that names none.
        read_timeout: seconds a request body may take to arrive (408 after); the head's
            limit is the server's (see :func:`server_config`).
    """
    app = FastAPI(title="gptkit", docs_url=None, redoc_url=None, openapi_url=None)
    for kind, handler in _ERROR_HANDLERS.items():
        app.add_exception_handler(kind, handler)  # type: ignore[arg-type]
    app.get("/health")(health)
    app.get("/", include_in_schema=False)(page)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    serving = Serving(engine, model_name, max_tokens_limit)
    key = api_key.encode() if api_key else None
    app.include_router(_api(serving, key, BodyLimits(max_body_bytes, read_timeout)))
    return app


@dataclass(frozen=True)
class BodyLimits:
    """How large a request body may be (bytes) and how long it may take (seconds)."""

    max_bytes: int
    timeout: float


def _api(serving: Serving, key: bytes | None, limits: BodyLimits) -> APIRouter:
    """The OpenAI API's routes under /v1 (no schema pages: fewer routes to guard)."""

    async def guard(request: Request) -> None:
        authorize(request, key)

    api = APIRouter(prefix="/v1", dependencies=[Depends(guard)])

    @api.get("/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[serving.card()]).model_dump())

    @api.get("/models/{name:path}")
    async def get_model(name: str) -> JSONResponse:
        serving.check_model(name)
        return JSONResponse(serving.card().model_dump())

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, ChatCompletionRequest, limits)
        return await respond(request, serving, await serving.start_chat(body), body.stream)

    @api.post("/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request, CompletionRequest, limits)
        return await respond(request, serving, await serving.start_completion(body), body.stream)

    @api.post("/attention")
    async def attention(request: Request) -> JSONResponse:
        """The web chat's attention map of an answer (:mod:`gptkit.inspect.chat`), computed
        in a thread on the reference path beside the engine's decoding."""
        body = await read_body(request, ChatCompletionRequest, limits)
        serving.check_model(body.model)
        messages = [m.as_template_message() for m in body.messages]
        model, tokenizer = serving.engine.model, serving.tokenizer
        try:
            found = await asyncio.to_thread(answer_attention, model, tokenizer, messages)
        except GptkitError as e:
            raise APIError(400, str(e), param="messages") from None
        return JSONResponse(found)

    return api


async def health() -> dict[str, str]:
    return {"status": "ok"}


async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)


# -- responses -------------------------------------------------------------------------------


async def respond(request: Request, serving: Serving, job: Job, stream: bool) -> Response:
    """The job's response: Server-Sent Events, or one JSON object once every choice is done."""
    if stream:
        return event_stream(job, serving.chunks(job))
    reply = await unless_disconnected(request, job, serving.result(job))
    return JSONResponse(reply.model_dump())


async def unless_disconnected(request: Request, job: Job, work: Awaitable[T]) -> T:
    """Await ``work``; a client that goes away first cancels the job's engine requests."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # this handler was cancelled (the server stops)
        task.cancel()
        job.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    # The client left first. A cancelled task is not done until it has unwound, so its
    # result() would raise InvalidStateError: wait for it, and read its end so that an
    # exception it raised meanwhile is not logged as never retrieved.
    task.cancel()
    job.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()
    raise APIError(400, "the client disconnected")


def event_stream(job: Job, events: AsyncIterator[BaseModel]) -> StreamingResponse:
    """``data: {chunk}`` events, then ``data: [DONE]``; a failure after the status was sent
    becomes an error event. The job is cancelled when the stream ends or the client leaves."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {event.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as e:  # the status is sent already: tell the client in-band
            yield f"data: {ErrorResponse(error=api_error(e).detail).model_dump_json()}\n\n"
        finally:  # also runs when the client disconnects (the task is cancelled)
            job.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)


# -- errors ----------------------------------------------------------------------------------


class APIError(Exception):
    """An error that the client gets as the OpenAI error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.detail).model_dump()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A one-line message for pydantic errors, and the top-level field at fault."""
    parts = []
    for err in list(errors)[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    first_loc = errors[0].get("loc", ()) if errors else ()
    param = str(first_loc[0]) if first_loc else None
    return "invalid request: " + "; ".join(parts) + more, param


def api_error(exc: Exception) -> APIError:
    """Any failure as the OpenAI error object with its status."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ServingError):
        status, kind = next(v for k, v in _STATUSES.items() if isinstance(exc, k))
        retry = {"Retry-After": "1"} if isinstance(exc, ServerBusy) else None
        return APIError(status, str(exc), kind, exc.param, exc.code, headers=retry)
    if isinstance(exc, RequestValidationError):
        message, param = _validation_message(exc.errors())
        return APIError(400, message, param=param)
    # The traceback goes to the server's log; the client gets one line.
    return APIError(500, f"the server failed: {type(exc).__name__}: {exc}", type="server_error")


async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    return api_error(exc).response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see GET /v1/models"
    else:
        message = f"{request.method} {request.url.path}: {exc.detail}"
    return APIError(exc.status_code, message, headers=exc.headers).response()


_ERROR_HANDLERS: dict[type[Exception], Any] = {
    APIError: _error_response,
    ServingError: _error_response,
    RequestValidationError: _error_response,
    StarletteHTTPException: _http_error,
    Exception: _error_response,
}


def authorize(request: Request, key: bytes | None) -> None:
    """Refuse a request without the API key (when the server has one)."""
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(
            401,
            "this server needs an API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
    if not hmac.compare_digest(given.strip().encode(), key):
        raise APIError(401, "the API key is wrong", code="invalid_api_key")


def _too_large(size: str, limits: BodyLimits) -> APIError:
    return APIError(
        413,
        f"the request body has {size}; this server takes at most {limits.max_bytes} bytes "
        "(see --max-body-bytes)",
        code="request_too_large",
    )


async def _raw_body(request: Request, limits: BodyLimits) -> bytes:
    """The body's bytes, at most ``limits.max_bytes``, within ``limits.timeout`` seconds.

    A declared Content-Length over the limit is refused before anything is read. A body
    without one that runs over is read on and dropped (up to a bound), so that the client,
    still sending, receives the 413 instead of a reset connection."""
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise _too_large(f"{declared} bytes", limits)
    size, parts = 0, []
    try:
        async with asyncio.timeout(limits.timeout):
            async for part in request.stream():
                size += len(part)
                if size <= limits.max_bytes:
                    parts.append(part)
                elif size > 32 * limits.max_bytes:
                    break
    except TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {limits.timeout:g} s "
            f"({size} bytes came); send it at once",
            code="request_timeout",
        ) from None
    except ClientDisconnect:  # nobody will read the answer; end without a traceback
        raise APIError(400, "the client disconnected while sending the body") from None
    if size > limits.max_bytes:
        raise _too_large(f"more than {limits.max_bytes} bytes", limits)
    return b"".join(parts)


def _finite(text: str) -> float:
    """A JSON number as a float, refusing one that overflows to infinity (1e999)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a float")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON; send a finite number")


def _depth_over(data: Any, limit: int) -> bool:
    """Whether ``data`` nests lists and objects deeper than ``limit`` (without recursion,
    so that no depth can overflow the stack)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if not isinstance(value, dict | list):
            continue
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object: strict UTF-8, finite numbers, bounded nesting."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    too_deep = APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise APIError(
            400,
            f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
        ) from None
    except ValueError as e:  # from _finite or _no_constant
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # the parser's own stack guard
        raise too_deep from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    if _depth_over(data, MAX_JSON_DEPTH):
        raise too_deep
    return data


async def read_body(request: Request, schema: type[Schema], limits: BodyLimits) -> Schema:
    """The body, bounded in size and time, strictly UTF-8, valid JSON of bounded depth,
    validated against ``schema``."""
    data = parse_json(await _raw_body(request, limits))
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        message, param = _validation_message(e.errors())
        raise APIError(400, message, param=param) from None


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- the server ---------------------------------------------------------------------------


def head_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection whose request head (request line and
    headers) has not arrived ``seconds`` after the connection opened or, on a kept-alive
    connection, after the head's first byte. uvicorn itself times out only idle kept-alive
    connections, so without this a client sending a byte now and then holds a connection
    and its socket forever (a "slow loris" attack)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadTimeout(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(seconds, self._head_too_slow)

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request head arrived whole
                self._stop_head_timer()
            elif self._head_timer is None and (cycle is None or cycle.response_complete):
                self._head_timer = self.loop.call_later(seconds, self._head_too_slow)

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeadTimeout


def server_config(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> Any:
    """The uvicorn configuration that :func:`serve` runs ``app`` with (tests use it too):
    request heads bounded in time (:func:`head_timeout_protocol`), idle kept-alive
    connections closed after 5 s, and 5 s for open streams to end on shutdown."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=head_timeout_protocol(read_timeout),
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    )


def default_model_name(source: str) -> str:
    """The model's id in the API when --model-name is not given: the base name of the file
    or directory served (never its path, which would tell every client where it lives); a
    hub id, not a local path, as given."""
    path = Path(source).expanduser()
    if not path.exists():
        return source
    return path.resolve().name or source


# -- the command --------------------------------------------------------------------------


def _check_address(host: str, port: int) -> None:
    """Raise a clear error when ``host:port`` cannot be listened on (unknown, in use)."""
    if not 0 <= port <= 65535:
        raise GptkitError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise GptkitError(f"--host {host} is not a known address ({e})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise GptkitError(
                f"cannot listen on {host}:{port} ({e.strerror}); choose another --port, or "
                "stop the program that uses it"
            ) from None


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    max_tokens_limit: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch: int = 16,
    max_queue: int = 64,
    max_context: int | None = None,
    device: str = "cpu",
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
    quantize: Literal["auto", "none", "bf16", "int8", "int4"] = "auto",
    compile: bool = True,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a web chat page at /.

    Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming
    with "stream": true), GET /health, and the chat page at /.

    Args:
        model: any source gptkit loads (checkpoint, run directory, HF directory, .gguf).
        host: the address to listen on; 127.0.0.1 reaches only this machine, 0.0.0.0 every
            interface (then set --api-key).
        port: the TCP port.
        api_key: requests must send "Authorization: Bearer KEY" (all but /health and the
            page); default: the GPTKIT_API_KEY environment variable, else no key.
        model_name: the model's id in the API; default: the base name of --model (a hub
            id as given).
        max_tokens_limit: the most max_tokens a request may ask for; default: the context.
        max_body_bytes: larger request bodies are refused (413).
        max_batch: at most this many requests decode together.
        max_queue: at most this many requests wait; more get 503 (retry later).
        max_context: use at most this many tokens of the model's context.
        device: cpu, cuda, mps.
        log_level: uvicorn's log level.
        quantize: quantize the weights on load (see `gptkit quantize`); auto keeps a
            quantized GGUF quantized (Q4_* as int4, Q8_0 as int8), none loads it as fp32.
        compile: decode a lone request through torch.compile, once its graph is compiled
            in the background (requests are served eagerly meanwhile).
        read_timeout: seconds a client has to send a request's head, and again its body;
            a slower connection is closed (head) or answered 408 (body).
    """
    import uvicorn

    from gptkit.checkpoint import load

    api_key = api_key or os.environ.get("GPTKIT_API_KEY") or None
    for flag, value in (
        ("--max-tokens-limit", max_tokens_limit),
        ("--max-body-bytes", max_body_bytes),
    ):
        if value is not None and value < 1:
            raise GptkitError(f"{flag} must be at least 1, got {value}")
    if not read_timeout > 0:
        raise GptkitError(f"--read-timeout must be positive seconds, got {read_timeout}")
    _check_address(host, port)  # before the model loads, so that a busy port fails fast
    net, tok = load(model, device=device, quantize=quantize)
    if tok is None:
        raise GptkitError(f"{model} has no tokenizer; serving needs one")
    engine = Engine(
        net,
        tok,
        max_batch=max_batch,
        max_queue=max_queue,
        max_context=max_context,
        compile=compile,
    )
    name = model_name or default_model_name(model)
    app = create_app(
        engine,
        name,
        api_key,
        max_body_bytes=max_body_bytes,
        max_tokens_limit=max_tokens_limit,
        read_timeout=read_timeout,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(
            f"warning: listening on {host} without an API key: anyone who reaches this port "
            "can use the model; set --api-key or GPTKIT_API_KEY",
            file=sys.stderr,
        )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {name} (context {engine.context} tokens) at http://{shown}:{port}/ "
        f"(web chat at /, OpenAI API at /v1{', API key required' if api_key else ''})",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(server_config(app, host, port, log_level, read_timeout))

    def http() -> None:  # the HTTP side in a thread; the model stays on this one
        try:
            server.run()
        finally:
            engine.stop()  # uvicorn stopped (or could not start): so does the engine

    thread = threading.Thread(target=http, name="gptkit-http", daemon=True)
    # uvicorn handles signals in the main thread only: SIGTERM and SIGINT stop the engine's
    # loop here (SIGINT too, as `gptkit train` does: a shell starts a background job with
    # SIGINT ignored, which Python would keep)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        engine.run(ready=thread.start)  # see Engine.run: torch's threads stay on this thread
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.shutdown()  # requests still running end with an error, and their streams
        server.should_exit = True
        thread.join(timeout=15)
    if not server.started:
        raise GptkitError(f"could not listen on {host}:{port} (see the log above)")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM or SIGINT as Ctrl-C: the engine loop stops and the server shuts down
    gracefully."""
    raise KeyboardInterrupt
