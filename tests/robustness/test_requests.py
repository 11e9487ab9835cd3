"""Hostile requests against one real server on a tiny model: each is answered 4xx, none 5xx
or hanging, nothing is logged as an error, and a normal request is served afterwards.

The cases are generated: malformed and deeply nested JSON, every sampling field at the values
that break sampling (1e-300, 5e-324, 1e300, NaN, Infinity, 1e999, wrong types), stop strings
too many and too long, bad messages and prompts, unsupported fields, unknown routes and
methods, and broken HTTP framing (sent on raw sockets, as an attacker would). Then the
connection-level attacks: slow-loris heads and bodies, an oversized declared length, and
clients that leave while their body is read or before their reply is ready.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import tiny_model

from gptkit.serve.app import create_app, default_model_name, server_config
from gptkit.serve.engine import Engine
from gptkit.serve.protocol import MAX_STOP_CHARS
from gptkit.tokenizer import BPETokenizer

CONTEXT = 128
READ_TIMEOUT = 1.5  # the server's head and body limits in these tests
MAX_BODY = 1_000_000
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BASE_CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BASE_COMPLETION: dict[str, Any] = {"prompt": "hi", "max_tokens": 2}


# -- the server --------------------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Keeps every record at ERROR or above (a traceback in the server's log is one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(chatml_tokenizer: BPETokenizer) -> Iterator[SimpleNamespace]:
    """The server as `gptkit serve` configures it (server_config), on a free port."""
    import uvicorn

    model = tiny_model(chatml_tokenizer.vocab_size, block_size=CONTEXT)
    engine = Engine(model, chatml_tokenizer, max_batch=4, max_queue=8)
    engine.start()
    app = create_app(engine, "tiny", read_timeout=READ_TIMEOUT, max_body_bytes=MAX_BODY)
    config = server_config(app, port=0, log_level="warning", read_timeout=READ_TIMEOUT)
    config.lifespan = "off"
    uv = uvicorn.Server(config)
    errors = ErrorLog()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "asyncio", "gptkit")]
    for logger in loggers:
        logger.addHandler(errors)
    thread = threading.Thread(target=uv.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield SimpleNamespace(port=port, engine=engine, errors=errors)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        engine.shutdown()
        for logger in loggers:
            logger.removeHandler(errors)


def read_status(sock: socket.socket) -> tuple[int, bytes]:
    """The status code and body of the response on ``sock`` (Connection: close)."""
    data = b""
    while True:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return 0, b""  # closed without an answer
    return int(head.split(b" ", 2)[1]), body


def exchange(port: int, raw: bytes, timeout: float = 20.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_status(sock)


def http(
    method: str, path: str, body: bytes = b"", headers: dict[str, str | None] | None = None
) -> bytes:
    """A raw HTTP/1.1 request; a header given as None is left out."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    fields: dict[str, str | None] = {"Content-Type": "application/json"}
    fields |= {"Content-Length": str(len(body))} | (headers or {})
    lines += [f"{k}: {v}" for k, v in fields.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- the generated cases -------------------------------------------------------------------

#: sampling fields -> values each must refuse (the ones that blow up sampling first)
BAD_VALUES: dict[str, list[Any]] = {
    "temperature": [1e-300, 5e-324, 1e-39, 1e-6, -1e-300, -1, 2.0001, 1e300, "hot", [], {}],
    "top_p": [1e-300, 5e-324, 1e-6, -1e-300, -0.1, 1.5, 1e300, "x", [0.5]],
    "top_k": [0, -1, 1.5, -(10**400), "many", [5]],
    "min_p": [-1e-300, -1, 1.01, 1e300, {}],
    "repetition_penalty": [0, 1e-300, 5e-324, 1e-3, -1, 1e300, 1e3, "x"],
    "presence_penalty": [2.5, -2.5, 1e300, -1e300, "x"],
    "frequency_penalty": [2.5, -2.5, 1e300, -1e300, None],
    "n": [0, -1, 129, 10**30, 1.5, "two"],
    "max_tokens": [-1, 10**30, 10**9, CONTEXT + 1, 1.5, "ten"],
    "seed": [-1, 2**63, 10**40, 1.5, "s"],
    "length_penalty": [1e300, -1e300, 11, -11, "x"],
    "stop": [
        ["a", "b", "c", "d", "e"],
        "",
        [""],
        ["x" * (MAX_STOP_CHARS + 1)],
        "y" * 100_000,
        ["z" * 250_000, "w" * 250_000],
        [1],
        {"a": 1},
        [["nested"]],
    ],
    "stream": ["maybe", [], {}, 5],
    "stream_options": ["x", [1]],
    "best_of": [3, 0, -1],
    "response_format": [
        {"type": "xml"},
        {"type": "json_schema"},
        "json",
        {"type": "json_schema", "json_schema": {"schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}},
    ],
    "logit_bias": [{"1": 5}],
    "functions": [[{"name": "f"}]],
    "suffix": ["tail"],
    "model": ["other", "../../../etc/passwd", 5, ["tiny"]],
}
# non-finite numbers written as JSON text (json.dumps would refuse or rename them)
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]
NON_FINITE_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"]

CHAT_ONLY: dict[str, list[Any]] = {
    "messages": [
        [],
        {},
        "hi",
        [{"role": "wizard", "content": "x"}],
        [{"content": "x"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "user", "content": "x", "name": 5}],
        [None],
        [{"role": "user", "content": "hello " * 400}],  # longer than the context
    ],
    "max_tokens": [0],
    "max_completion_tokens": [0, -1, 10**9],
    "logprobs": [5, "sure", []],
    "top_logprobs": [21, -1, 3],  # 3: without logprobs
}
COMPLETION_ONLY: dict[str, list[Any]] = {
    "prompt": [
        [],
        [-1],
        [10**12],
        [[1, 2], [-5]],
        [1.5],
        [{"a": 1}],
        None,
        5,
        [["a"]],
        [1] * (CONTEXT + 1),  # longer than the context
        "hello " * 400,
    ],
    "logprobs": [21, -1, "x"],
    "echo": ["loud", []],
}
BEAMS: list[dict[str, Any]] = [
    {"use_beam_search": True, "stream": True},
    {"use_beam_search": True, "temperature": 0.5},
    {"use_beam_search": True, "best_of": 129},
    {"use_beam_search": True, "n": 3, "best_of": 2},
    {"use_beam_search": True, "top_p": 0.5},
    {"use_beam_search": True, "logprobs": 2},
]


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def field_cases() -> Iterator[tuple[str, bytes]]:
    """Each bad value of each field, on both routes where it applies."""
    for route, base, only in (
        (CHAT, BASE_CHAT, CHAT_ONLY),
        (COMPLETIONS, BASE_COMPLETION, COMPLETION_ONLY),
    ):
        short = "chat" if route == CHAT else "cmpl"
        for field, values in (BAD_VALUES | only).items():
            for i, value in enumerate(values):
                body = json.dumps(base | {field: value}).encode()
                yield f"{short}-{field}-{i}", http("POST", route, body)
        for field in NON_FINITE_FIELDS:
            for text in NON_FINITE:
                body = json.dumps(base | {field: 0.5})[:-1] + f', "{field}": {text}}}'
                yield f"{short}-{field}-{text}", http("POST", route, body.encode())
        for i, extra in enumerate(BEAMS):
            yield f"{short}-beams-{i}", http("POST", route, json.dumps(base | extra).encode())


def body_cases() -> Iterator[tuple[str, bytes]]:
    """Bodies that are not a JSON object, or nest too deeply to parse safely."""
    raw = [
        b"",
        b"{",
        b"[]",
        b"null",
        b"1",
        b'"x"',
        b'{"messages": }',
        b"\xff\xfe{}",
        b'{"messages": "\xc3\x28"}',
        b"\xef\xbb\xbf{}",  # a byte-order mark
        b"{}garbage",
        b'{"a": 1,}',
        b"{'single': 'quotes'}",
        nested(100_000).encode(),
        ('{"a":' * 50_000 + "1" + "}" * 50_000).encode(),
    ]
    for i, body in enumerate(raw):
        yield f"body-{i}", http("POST", CHAT, body)
    for depth in (65, 200, 5_000, 90_000):  # 90k: the deepest that fits the body limit
        chat = '{"messages": ' + nested(depth, '{"role": "user", "content": "x"}') + "}"
        yield f"deep-messages-{depth}", http("POST", CHAT, chat.encode())
        cmpl = '{"prompt": ' + nested(depth) + "}"
        yield f"deep-prompt-{depth}", http("POST", COMPLETIONS, cmpl.encode())
        extra = json.dumps(BASE_CHAT)[:-1] + ', "extension": ' + nested(depth) + "}"
        yield f"deep-unknown-field-{depth}", http("POST", CHAT, extra.encode())
        schema = '{"type": "json_schema", "json_schema": {"name": "x", "schema": '
        schema += '{"items": ' * depth + "{}" + "}" * depth + "}}"
        fmt = json.dumps(BASE_CHAT)[:-1] + ', "response_format": ' + schema + "}"
        yield f"deep-schema-{depth}", http("POST", CHAT, fmt.encode())


def http_cases() -> Iterator[tuple[str, bytes]]:
    """Unknown routes and methods, and broken framing."""
    ok = json.dumps(BASE_CHAT).encode()
    yield "get-chat", http("GET", CHAT)
    for i, bad in enumerate([b"{", nested(100_000).encode(), b'{"messages": []}', b"[]"]):
        yield f"attention-{i}", http("POST", "/v1/attention", bad)  # the web chat's map
    yield "put-chat", http("PUT", CHAT, ok)
    yield "delete-models", http("DELETE", "/v1/models")
    yield "unknown-route", http("POST", "/v1/embeddings", ok)
    yield "unknown-model", http("GET", "/v1/models/other")
    yield "traversal", http("GET", "/static/../../../../etc/passwd")
    yield "traversal-encoded", http("GET", "/static/%2e%2e/%2e%2e/etc/passwd")
    yield "long-url", http("GET", "/v1/" + "a" * 20_000)
    yield "declared-huge", http("POST", CHAT, b"", {"Content-Length": str(10**11)})
    yield "declared-over", http("POST", CHAT, b"", {"Content-Length": str(MAX_BODY + 1)})
    yield "length-negative", http("POST", CHAT, ok, {"Content-Length": "-1"})
    yield "length-text", http("POST", CHAT, ok, {"Content-Length": "abc"})
    yield "length-twice", http("POST", CHAT, ok, {"Content-Length": f"{len(ok)}, 5"})
    chunked: dict[str, str | None] = {"Transfer-Encoding": "chunked"}
    yield "chunked-and-length", http("POST", CHAT, ok, chunked)
    yield "chunked-bad", http("POST", CHAT, b"zz\r\n" + ok + b"\r\n0\r\n\r\n", chunked)
    big = b"a" * (MAX_BODY + 10)
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (big[:600_000], big[600_000:]))
    yield (
        "chunked-over",
        http("POST", CHAT, body + b"0\r\n\r\n", chunked | {"Content-Length": None}),
    )
    yield "length-empty", http("POST", CHAT, ok, {"Content-Length": ""})
    yield "bad-header-name", http("POST", CHAT, ok, {"Bad Name": "x"})
    yield "bad-request-line", b"GARBAGE\r\n\r\n"
    yield "http-0.9", b"GET /\r\n\r\n"
    yield "no-host", b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n"


CASES = [*field_cases(), *body_cases(), *http_cases()]


def test_there_are_at_least_200_cases() -> None:
    assert len(CASES) >= 200, len(CASES)
    assert len({name for name, _ in CASES}) == len(CASES)  # every case named once


@pytest.mark.parametrize("raw", [raw for _, raw in CASES], ids=[name for name, _ in CASES])
def test_hostile_request_gets_a_4xx(server: SimpleNamespace, raw: bytes) -> None:
    status, body = exchange(server.port, raw)
    assert 400 <= status < 500, (status, body[:300])
    if body.startswith(b"{"):  # ours: the OpenAI error object with a one-line message
        error = json.loads(body)["error"]
        assert error["message"] and "\n" not in error["message"]


# -- connection-level attacks ----------------------------------------------------------------


def test_slow_head_is_cut_off(server: SimpleNamespace) -> None:
    """Slow loris: a head sent a few bytes at a time is closed after the read timeout."""
    sockets = []
    for _ in range(8):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        sockets.append(sock)
    start = time.monotonic()
    for sock in sockets:
        while True:  # keep dribbling a header until the server hangs up
            try:
                sock.sendall(b"X-a: b\r\n")
                if not sock.recv(1, socket.MSG_DONTWAIT):
                    break
            except BlockingIOError:
                time.sleep(0.1)
            except OSError:
                break
            assert time.monotonic() - start < 15, "the slow head was never cut off"
        sock.close()
    # a silent connection is closed too
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        assert sock.recv(1) == b""


def test_oversized_head_gets_400(server: SimpleNamespace) -> None:
    """A head larger than h11's limit (16 KiB) is refused once that much has come (the
    request is not finished, so the server has read all that was sent: no reset)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(http("POST", CHAT, b"", {"X-Pad": "p" * 20_000})[:-4])
        status, _ = read_status(sock)
    assert status == 400


def test_slow_body_gets_408(server: SimpleNamespace) -> None:
    body = json.dumps(BASE_CHAT).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(http("POST", CHAT, body)[: -len(body)] + body[:5])
        status, reply = read_status(sock)
    assert status == 408 and b"did not arrive within" in reply


def test_declared_huge_length_is_refused_at_once(server: SimpleNamespace) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(http("POST", CHAT, b"", {"Content-Length": str(10**11)}))
        sock.settimeout(READ_TIMEOUT / 2)  # well before the body timeout
        status, reply = read_status(sock)
    assert status == 413 and b"100000000000 bytes" in reply


def test_client_leaving_mid_body_and_before_its_reply(server: SimpleNamespace) -> None:
    """Leaving while the body is read, and before a non-streamed reply, ends the request
    without a traceback (checked by the last test, which reads the server's error log)."""
    body = json.dumps(BASE_CHAT | {"max_tokens": 100}).encode()
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(http("POST", CHAT, body)[: -len(body) // 2])
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(http("POST", CHAT, body))
            time.sleep(0.05)
    time.sleep(0.5)


def test_model_id_is_the_base_name(tmp_path: Any) -> None:
    model = tmp_path / "deep" / "dir" / "my-model.gguf"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"")
    assert default_model_name(str(model)) == "my-model.gguf"
    assert default_model_name(str(model.parent) + "/") == "dir"
    assert default_model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


#: values at the edges of what is accepted: each must be served, none may fail sampling
EDGES: list[dict[str, Any]] = [
    {"temperature": 1e-5},
    {"temperature": 2.0},
    {"temperature": 2.0, "top_p": 1e-5},
    {"top_p": 0},
    {"top_k": 1},
    {"top_k": 10**400},
    {"min_p": 5e-324},
    {"min_p": 1.0},
    {"repetition_penalty": 0.01},
    {"repetition_penalty": 100},
    {"repetition_penalty": 0.01, "temperature": 1e-5},
    {"presence_penalty": 2, "frequency_penalty": -2},
    {"presence_penalty": -2, "frequency_penalty": 2, "temperature": 1e-5},
    {"seed": 2**63 - 1, "n": 3},
    {"logprobs": True, "top_logprobs": 20},
    {"stop": ["s" * MAX_STOP_CHARS] * 4},
    {"use_beam_search": True, "best_of": 2, "length_penalty": 10},
    {"use_beam_search": True, "best_of": 2, "length_penalty": -10},
]


@pytest.mark.parametrize("fields", EDGES, ids=[",".join(map(str, e)) for e in EDGES])
def test_edge_values_are_served(server: SimpleNamespace, fields: dict[str, Any]) -> None:
    failed = server.engine.stats.failed
    body = json.dumps(BASE_CHAT | {"max_tokens": 8} | fields).encode()
    status, reply = exchange(server.port, http("POST", CHAT, body))
    assert status == 200, reply[:300]
    assert server.engine.stats.failed == failed


def test_normal_request_served_afterwards_and_no_errors_logged(server: SimpleNamespace) -> None:
    """Run last: after every case above, the server still answers, and logged no error."""
    for route, base in ((CHAT, BASE_CHAT), (COMPLETIONS, BASE_COMPLETION)):
        status, body = exchange(server.port, http("POST", route, json.dumps(base).encode()))
        assert status == 200, body[:300]
        assert json.loads(body)["usage"]["completion_tokens"] >= 1
    assert server.engine.stats.failed == 0
    logged = [
        r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in server.errors.records
    ]
    assert not logged, logged[:3]


def test_stop_hold_back_equals_the_plain_search() -> None:
    """The Detokenizer releases text up to the longest end that could begin a stop string,
    and cuts at the first stop string; its failure-table bookkeeping must agree with
    checking every prefix of every stop string on the whole text."""
    import random

    from gptkit.generate.core import Detokenizer

    class Letters:  # id i decodes to one letter
        def decode(self, ids: list[int]) -> str:
            return "".join("abc"[i] for i in ids)

    def plain_held(text: str, stops: list[str]) -> int:
        ends = [k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])]
        return max(ends, default=0)

    rng = random.Random(0)
    for _ in range(2000):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 8))) for _ in range(rng.randint(1, 4))]
        detok = Detokenizer(Letters(), stops)  # type: ignore[arg-type]
        text, released = "", ""
        for token in rng.choices(range(3), k=rng.randint(1, 16)):
            released += detok.push(token)
            text += "abc"[token]
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                assert detok.stopped and detok.text == text[: min(hits)]
                break
            assert released == text[: len(text) - plain_held(text, stops)], (text, stops)
