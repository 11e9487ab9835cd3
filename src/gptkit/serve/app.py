"""The HTTP layer: an OpenAI-compatible API and a web chat page over one :class:`Engine`.

Thin routes, as vLLM's ``entrypoints/openai/api_server.py`` and llama.cpp's server
(``tools/server/README.md``) are arranged: each route parses a request into a
:mod:`gptkit.serve.protocol` schema, turns it into token ids and engine submissions, and
maps the engine's chunks to JSON or to Server-Sent Events; every failure becomes the OpenAI
API's error object with its status (API reference, "Error codes")::

    bad JSON, wrong types, bad values, unsupported fields    400 invalid_request_error
    prompt + reply longer than the context                   400 context_length_exceeded
    missing or wrong API key (when one is set)               401 invalid_api_key
    unknown model, unknown route                             404
    body over the size limit                                 413 request_too_large
    the engine's waiting line is full                        503 server_busy (Retry-After)
    generation failed                                        500 (a stream sends an error event)

Streams follow the API's SSE format: ``data: {chunk}`` events, a final usage chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``. A client that goes away
cancels its engine requests, so its rows leave the batch at the next step.

Security defaults: the server binds 127.0.0.1; ``api_key`` guards every route but
``/health`` and the static page (the page asks for the key and keeps it in memory only);
request bodies and ``max_tokens`` are bounded; the page is served with a strict
Content-Security-Policy (scripts and styles from this server only, no inline code).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptkit.errors import GptkitError
from gptkit.serve.engine import (
    Chunk,
    Engine,
    EngineError,
    EngineStopped,
    GenParams,
    PromptTooLong,
    QueueFull,
)
from gptkit.serve.engine import Request as EngineRequest
from gptkit.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
)
from gptkit.tokenizer.chat import apply_chat_template

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 1_000_000
Schema = TypeVar("Schema", bound=BaseModel)

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


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_tokens_limit: int | None = None,
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
    """
    tokenizer = engine.tokenizer
    token_limit = max_tokens_limit or engine.context
    key = api_key.encode() if api_key else None

    app = FastAPI(
        title="gptkit",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # no schema pages: fewer routes to guard
    )

    # -- errors -----------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc.errors())
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models"
        else:
            message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server's log; the client gets one line.
        message = f"the server failed: {type(exc).__name__}: {exc}"
        return APIError(500, message, type="server_error").response()

    # -- helpers ----------------------------------------------------------------------

    async def authorize(request: Request) -> None:
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

    async def read_body(request: Request, schema: type[Schema]) -> Schema:
        """The body, bounded, strictly UTF-8, valid JSON, validated against ``schema``."""
        size, parts = 0, []
        declared = request.headers.get("content-length", "")
        too_big = declared.isdigit() and int(declared) > max_body_bytes
        # Over the limit, the rest is read and dropped (up to a bound) so that the client,
        # still sending, receives the 413 instead of a reset connection.
        async for part in request.stream():
            size += len(part)
            too_big = too_big or size > max_body_bytes
            if not too_big:
                parts.append(part)
            if size > 32 * max_body_bytes:
                break
        if too_big:
            shown = f"{declared} bytes" if declared.isdigit() else f"more than {size} bytes"
            raise APIError(
                413,
                f"the request body has {shown}; this server takes at most {max_body_bytes} "
                "(see --max-body-bytes)",
                code="request_too_large",
            )
        raw = b"".join(parts)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise APIError(
                400,
                f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
            ) from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            message, param = _validation_message(e.errors())
            raise APIError(400, message, param=param) from None

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{model_name}'",
                param="model",
                code="model_not_found",
            )

    def gen_params(body: ChatCompletionRequest | CompletionRequest, choice: int) -> GenParams:
        if isinstance(body, ChatCompletionRequest):
            asked, default = body.token_limit(), token_limit
        else:  # the OpenAI API's default for completions is 16 tokens
            asked, default = body.max_tokens, min(16, token_limit)
        if asked is not None and asked > token_limit:
            raise APIError(
                400,
                f"max_tokens is {asked}, but this server allows at most {token_limit} "
                f"(the model's context is {engine.context} tokens)",
                param="max_tokens",
            )
        temperature, top_p = body.temperature, body.top_p
        if top_p == 0:  # only the most likely token survives: greedy
            temperature, top_p = 0.0, 1.0
        # Choice j of n gets seed + j: n seeded choices differ, and choice 0 is what the
        # same request with n=1 gives.
        seed = None if body.seed is None else (body.seed + choice) % 2**63
        try:
            return GenParams(
                max_tokens=asked or default,
                temperature=temperature,
                top_p=top_p,
                top_k=body.top_k,
                seed=seed,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                stop=body.stop_strings(),
            )
        except GptkitError as e:
            raise APIError(400, str(e)) from None

    def submit(
        prompts: list[list[int]], body: ChatCompletionRequest | CompletionRequest, param: str
    ) -> list[EngineRequest]:
        """``n`` engine requests per prompt, in choice order; all or none are submitted."""
        params = [gen_params(body, j) for j in range(body.n)]
        requests: list[EngineRequest] = []
        try:
            for ids in prompts:
                for p in params:
                    requests.append(engine.submit(ids, p))
        except Exception as e:
            for r in requests:
                r.cancel()
            if isinstance(e, PromptTooLong):
                raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
            if isinstance(e, QueueFull | EngineStopped):
                raise APIError(
                    503,
                    str(e),
                    type="server_error",
                    code="server_busy",
                    headers={"Retry-After": "1"},
                ) from None
            if isinstance(e, GptkitError):
                raise APIError(400, str(e), param=param) from None
            raise
        return requests

    def generation_failed(error: Exception) -> APIError:
        # The engine's message says what failed ("generation failed during decode: ...").
        return APIError(500, str(error), type="server_error")

    async def collect(request: Request, requests: list[EngineRequest]) -> list[tuple[str, Chunk]]:
        """Wait for every request's text and last chunk; a client that leaves cancels them."""

        async def gather() -> list[tuple[str, Chunk]]:
            texts: list[list[str]] = [[] for _ in requests]
            last: list[Chunk | None] = [None] * len(requests)
            async with contextlib.aclosing(_merged(requests)) as chunks:
                async for i, chunk in chunks:
                    texts[i].append(chunk.text)
                    last[i] = chunk
            return [("".join(t), c) for t, c in zip(texts, last, strict=True) if c is not None]

        work = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client left, or this handler was cancelled
                work.cancel()
                for r in requests:
                    r.cancel()
        if work.cancelled():
            raise APIError(400, "the client disconnected")
        try:
            results = work.result()
        except EngineError as e:
            raise generation_failed(e) from None
        if len(results) != len(requests):
            raise generation_failed(EngineError("a request ended without a reply"))
        return results

    def sse(payload: BaseModel | dict[str, Any]) -> str:
        data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
        return f"data: {data}\n\n"

    def event_stream(
        requests: list[EngineRequest], events: AsyncIterator[str]
    ) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
                yield "data: [DONE]\n\n"
            except Exception as e:  # the status is sent already: tell the client in-band
                if isinstance(e, APIError):
                    error = e
                elif isinstance(e, EngineError):
                    error = generation_failed(e)
                else:
                    message = f"the server failed: {type(e).__name__}: {e}"
                    error = APIError(500, message, type="server_error")
                yield sse(ErrorResponse(error=error.detail))
            finally:  # also runs when the client disconnects (the task is cancelled)
                for r in requests:
                    r.cancel()

        return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)

    # -- routes -----------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    def card() -> ModelCard:
        return ModelCard(id=model_name, created=now(), max_model_len=engine.context)

    @api.get("/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[card()]).model_dump())

    @api.get("/models/{name:path}")
    async def get_model(name: str) -> JSONResponse:
        check_model(name)
        return JSONResponse(card().model_dump())

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, ChatCompletionRequest)
        check_model(body.model)
        messages = [m.as_template_message() for m in body.messages]

        def encode() -> list[int]:
            return tokenizer.encode_prompt(apply_chat_template(tokenizer, messages))

        try:
            ids = await run_in_threadpool(encode)  # long prompts must not stall other streams
        except GptkitError as e:
            raise APIError(400, str(e), param="messages") from None
        requests = submit([ids], body, "messages")
        rid, created = new_id("chatcmpl"), now()

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse(
                ChatCompletionChunk(
                    id=rid, created=created, model=model_name, choices=choices, usage=usage
                )
            )

        if body.stream:

            async def events() -> AsyncIterator[str]:
                for i in range(len(requests)):
                    yield chunk(
                        [ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))]
                    )
                completion = 0
                async with contextlib.aclosing(_merged(requests)) as pieces:
                    async for i, piece in pieces:
                        if piece.text:
                            yield chunk([ChatChunkChoice(index=i, delta=Delta(content=piece.text))])
                        if piece.finish_reason is not None:
                            completion += piece.completion_tokens
                            reason = _finish(piece)
                            yield chunk(
                                [ChatChunkChoice(index=i, delta=Delta(), finish_reason=reason)]
                            )
                if body.include_usage():
                    yield chunk([], Usage.of(len(ids), completion))

            return event_stream(requests, events())

        results = await collect(request, requests)
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=_finish(last))
            for i, (text, last) in enumerate(results)
        ]
        usage = Usage.of(len(ids), sum(last.completion_tokens for _, last in results))
        reply = ChatCompletion(
            id=rid, created=created, model=model_name, choices=choices, usage=usage
        )
        return JSONResponse(reply.model_dump())

    @api.post("/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request, CompletionRequest)
        check_model(body.model)

        def encode() -> list[list[int]]:
            out = []
            for p in body.prompts():
                ids = tokenizer.encode_prompt(p) if isinstance(p, str) else list(p)
                if not ids:  # an empty prompt starts from bos (or eos), as generate() does
                    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
                    ids = [start] if start is not None else []
                out.append(ids)
            return out

        prompts = await run_in_threadpool(encode)
        requests = submit(prompts, body, "prompt")
        prompt_tokens = sum(len(ids) for ids in prompts)
        rid, created = new_id("cmpl"), now()

        def completion(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
            return Completion(
                id=rid, created=created, model=model_name, choices=choices, usage=usage
            )

        if body.stream:

            async def events() -> AsyncIterator[str]:
                generated = 0
                async with contextlib.aclosing(_merged(requests)) as pieces:
                    async for i, piece in pieces:
                        reason = _finish(piece) if piece.finish_reason is not None else None
                        if reason is not None:
                            generated += piece.completion_tokens
                        if piece.text or reason is not None:
                            choice = CompletionChoice(
                                index=i, text=piece.text, finish_reason=reason
                            )
                            yield sse(completion([choice]))
                if body.include_usage():
                    yield sse(completion([], Usage.of(prompt_tokens, generated)))

            return event_stream(requests, events())

        results = await collect(request, requests)
        choices = [
            CompletionChoice(index=i, text=text, finish_reason=_finish(last))
            for i, (text, last) in enumerate(results)
        ]
        usage = Usage.of(prompt_tokens, sum(last.completion_tokens for _, last in results))
        return JSONResponse(completion(choices, usage).model_dump())

    app.include_router(api)
    return app


def _finish(chunk: Chunk) -> Literal["stop", "length"]:
    return "length" if chunk.finish_reason == "length" else "stop"


async def _merged(requests: list[EngineRequest]) -> AsyncIterator[tuple[int, Chunk]]:
    """``(index, chunk)`` from several engine requests as they come; an error in one ends
    the whole iteration with that error."""
    if len(requests) == 1:
        async for chunk in requests[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, req: EngineRequest) -> None:
        try:
            async for chunk in req:
                queue.put_nowait((i, chunk))
        except Exception as e:
            queue.put_nowait((i, e))
        else:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    try:
        running = len(requests)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


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
        model_name: the model's id in the API; default: --model as given.
        max_tokens_limit: the most max_tokens a request may ask for; default: the context.
        max_body_bytes: larger request bodies are refused (413).
        max_batch: at most this many requests decode together.
        max_queue: at most this many requests wait; more get 503 (retry later).
        max_context: use at most this many tokens of the model's context.
        device: cpu, cuda, mps.
        log_level: uvicorn's log level.
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
    _check_address(host, port)  # before the model loads, so that a busy port fails fast
    net, tok = load(model, device=device)
    if tok is None:
        raise GptkitError(f"{model} has no tokenizer; serving needs one")
    engine = Engine(net, tok, max_batch=max_batch, max_queue=max_queue, max_context=max_context)
    name = model_name or model
    app = create_app(
        engine,
        name,
        api_key,
        max_body_bytes=max_body_bytes,
        max_tokens_limit=max_tokens_limit,
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
    engine.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    finally:
        engine.shutdown()
