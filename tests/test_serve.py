"""The OpenAI-compatible server, driven by the official ``openai`` client against a real
uvicorn server on a tiny model (llama.cpp's server tests do the same): usage counts,
finish reasons, streaming invariants, concurrency, cancellation, every bad input."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import REPO, running_server, tiny_model

from gptkit.checkpoint import save_checkpoint
from gptkit.cli import main
from gptkit.generate import generate
from gptkit.model import GPT
from gptkit.tokenizer import BPETokenizer
from gptkit.tokenizer.chat import apply_chat_template

openai = pytest.importorskip("openai")

CONTEXT = 128
HELLO = [{"role": "user", "content": "hello"}]


class Recorder:
    """The engine as the app sees it, keeping every request it submits."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.requests: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def submit(self, prompt_ids: list[int], params: Any) -> Any:
        request = self.engine.submit(prompt_ids, params)
        self.requests.append(request)
        return request


@pytest.fixture(scope="module")
def model(chatml_tokenizer: BPETokenizer) -> GPT:
    return tiny_model(chatml_tokenizer.vocab_size, block_size=CONTEXT)


@pytest.fixture(scope="module")
def server(model: GPT, chatml_tokenizer: BPETokenizer) -> Iterator[SimpleNamespace]:
    recorders: list[Recorder] = []

    def wrap(engine: Any) -> Recorder:
        recorders.append(Recorder(engine))
        return recorders[0]

    with running_server(model, chatml_tokenizer, wrap=wrap) as s:
        s.recorder = recorders[0]
        yield s


def client_for(url: str, key: str = "unused") -> Any:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(server: SimpleNamespace) -> Any:
    return client_for(server.url)


def raw(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """One HTTP request with exactly these bytes: (status, parsed JSON body, headers)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request(
            method, path, body=body, headers={"Content-Type": "application/json"} | (headers or {})
        )
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    parsed = (
        json.loads(data)
        if data and response.getheader("content-type", "").startswith("application/json")
        else data
    )
    return response.status, parsed, {k.lower(): v for k, v in response.getheaders()}


def assert_error(body: Any, fragment: str = "", param: str | None = None) -> None:
    """``body`` is the OpenAI error object, and its message mentions ``fragment``."""
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert fragment.lower() in body["error"]["message"].lower(), body
    if param is not None:
        assert body["error"]["param"] == param, body


def prompt_tokens(tok: BPETokenizer, messages: list[dict[str, str]]) -> int:
    return len(tok.encode_prompt(apply_chat_template(tok, messages)))


def assert_serving(client: Any) -> None:
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def chat_stream(client: Any, messages: list[dict[str, str]], **kw: Any) -> SimpleNamespace:
    """Run a streamed chat request: the joined text per choice, reasons, usage, chunks."""
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **kw,
        )
    )
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return SimpleNamespace(texts=texts, reasons=reasons, usage=chunks[-1].usage, chunks=chunks)


# -- the API ------------------------------------------------------------------------------


def test_models_and_health(server: SimpleNamespace, client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    status, body, _ = raw(server.url, "GET", "/health")
    assert (status, body) == (200, {"status": "ok"})


def test_chat_usage_and_length(client: Any, model: GPT, chatml_tokenizer: BPETokenizer) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=8, temperature=0
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == prompt_tokens(chatml_tokenizer, HELLO)
    assert reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    # The same text as the library's own greedy decoding of the rendered prompt.
    rendered = apply_chat_template(chatml_tokenizer, HELLO)
    assert choice.message.content == generate(
        model, chatml_tokenizer, rendered, max_new_tokens=8, temperature=0
    )


def test_streamed_chat_equals_non_streamed(client: Any, chatml_tokenizer: BPETokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Speak, speak."},
    ]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    streamed = chat_stream(client, messages, max_tokens=10, temperature=0)
    first, last = streamed.chunks[0], streamed.chunks[-1]
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant"
    assert streamed.texts == {0: whole.choices[0].message.content}
    assert streamed.reasons == {0: whole.choices[0].finish_reason}
    assert last.choices == [] and last.usage == whole.usage  # the include_usage chunk
    assert whole.usage.prompt_tokens == prompt_tokens(chatml_tokenizer, messages)
    assert len({c.id for c in streamed.chunks}) == 1
    # Without stream_options there is no usage chunk.
    plain = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert all(c.usage is None and c.choices for c in plain)


def test_completions(
    server: SimpleNamespace, client: Any, model: GPT, chatml_tokenizer: BPETokenizer
) -> None:
    tok = chatml_tokenizer
    reply = client.completions.create(model="tiny", prompt="def add", max_tokens=6, temperature=0)
    expected = generate(model, tok, "def add", max_new_tokens=6, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(tok.encode_prompt("def add"))
    assert reply.usage.completion_tokens == 6

    pieces = list(
        client.completions.create(
            model="tiny",
            prompt="def add",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in pieces if c.choices) == expected
    assert pieces[-1].usage == reply.usage

    # Token ids work as a prompt; a list of prompts gets n choices each, in order.
    by_ids = client.completions.create(
        model="tiny", prompt=tok.encode_prompt("def add"), max_tokens=6, temperature=0
    )
    assert by_ids.choices[0].text == expected
    several = client.completions.create(
        model="tiny", prompt=["def add", "class"], n=2, max_tokens=4, temperature=0
    )
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(["def add", "def add", "class", "class"]):
        assert several.choices[i].text == generate(
            model, tok, prompt, max_new_tokens=4, temperature=0
        )
    assert several.usage.prompt_tokens == len(tok.encode_prompt("def add")) + len(
        tok.encode_prompt("class")
    )
    assert several.usage.completion_tokens == 16


def test_stop_strings(client: Any) -> None:
    full = (
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
        .choices[0]
        .message.content
    )
    assert len(full) >= 6, full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.index(stop)]
    for stops in (stop, [stop, "never-seen"]):
        reply = client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=12, temperature=0, stop=stops
        )
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens < 12
        streamed = chat_stream(client, HELLO, max_tokens=12, temperature=0, stop=stops)
        assert streamed.texts == {0: expected} and streamed.reasons == {0: "stop"}
        assert streamed.usage == reply.usage


def test_n_choices_and_seeds(client: Any) -> None:
    def sample(n: int, seed: int) -> Any:
        return client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=6, temperature=1.0, n=n, seed=seed
        )

    three = sample(3, seed=7)
    texts = [c.message.content for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in sample(3, seed=7).choices]  # reproducible
    assert texts[0] == sample(1, seed=7).choices[0].message.content  # choice j uses seed + j
    assert texts[1] == sample(1, seed=8).choices[0].message.content
    assert len(set(texts)) > 1
    lengths = [6 if c.finish_reason == "length" else None for c in three.choices]
    if None not in lengths:
        assert three.usage.completion_tokens == 18
    assert three.usage.prompt_tokens == sample(1, seed=7).usage.prompt_tokens  # counted once
    streamed = chat_stream(client, HELLO, max_tokens=6, temperature=1.0, n=3, seed=7)
    assert streamed.texts == dict(enumerate(texts))
    assert streamed.usage == three.usage


def test_concurrent_streams_equal_alone(server: SimpleNamespace, client: Any) -> None:
    prompts = [
        [{"role": "user", "content": f"question {i}: " + "speak " * (i % 5)}] for i in range(16)
    ]
    alone = []
    for messages in prompts:
        reply = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=16, temperature=0
        )
        alone.append((reply.choices[0].message.content, reply.choices[0].finish_reason))
    assert len(set(alone)) > 1  # the prompts lead to different replies
    server.engine.stats.max_active = 0  # the high-water mark of this test alone
    start = threading.Barrier(16)

    def one(messages: list[dict[str, str]]) -> tuple[str, str]:
        start.wait()
        streamed = chat_stream(client, messages, max_tokens=16, temperature=0)
        return streamed.texts[0], streamed.reasons[0]

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, prompts))
    assert together == alone
    assert server.engine.stats.max_active > 1  # they were decoded in one batch


# -- bad input ----------------------------------------------------------------------------

GOOD = {"model": "tiny", "messages": HELLO, "max_tokens": 2}
CHAT = "/v1/chat/completions"


def body(**changes: Any) -> bytes:
    return json.dumps(GOOD | changes).encode()


BAD_REQUESTS = {
    "malformed JSON": (
        "POST",
        CHAT,
        b'{"model": "tiny", "messages": [',
        400,
        "not valid JSON",
        None,
    ),
    "invalid UTF-8": (
        "POST",
        CHAT,
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        "UTF-8",
        None,
    ),
    "not an object": ("POST", CHAT, b"[1, 2]", 400, "JSON object", None),
    "wrong type": ("POST", CHAT, body(temperature="hot"), 400, "valid number", "temperature"),
    "wrong messages type": ("POST", CHAT, body(messages="hello"), 400, "messages", "messages"),
    "negative max_tokens": (
        "POST",
        CHAT,
        body(max_tokens=-1),
        400,
        "greater than or equal to 1",
        "max_tokens",
    ),
    "max_tokens over the limit": (
        "POST",
        CHAT,
        body(max_tokens=CONTEXT + 1),
        400,
        f"at most {CONTEXT}",
        "max_tokens",
    ),
    "empty messages": ("POST", CHAT, body(messages=[]), 400, "at least 1", "messages"),
    "unknown role": (
        "POST",
        CHAT,
        body(messages=[{"role": "robot", "content": "x"}]),
        400,
        "role",
        "messages",
    ),
    "temperature out of range": (
        "POST",
        CHAT,
        body(temperature=3),
        400,
        "less than or equal to 2",
        "temperature",
    ),
    "empty stop string": ("POST", CHAT, body(stop=[""]), 400, "stop string", "stop"),
    "unsupported field": (
        "POST",
        CHAT,
        body(logit_bias={"1": 5}),
        400,
        "'logit_bias' is not supported",
        None,
    ),
    "prompt too long": (
        "POST",
        CHAT,
        body(messages=[{"role": "user", "content": "speak " * 200}]),
        400,
        f"context is {CONTEXT} tokens",
        "messages",
    ),
    "unknown model": ("POST", CHAT, body(model="gpt-9"), 404, "'gpt-9' does not exist", "model"),
    "empty prompt list": ("POST", "/v1/completions", b'{"prompt": []}', 400, "empty", "prompt"),
    "token id outside the vocabulary": (
        "POST",
        "/v1/completions",
        b'{"prompt": [1, 99999]}',
        400,
        "99999",
        "prompt",
    ),
    "unknown route": ("GET", "/v1/nothing", None, 404, "no route", None),
    "wrong method": ("GET", CHAT, None, 405, "not allowed", None),
    "several MB": (
        "POST",
        CHAT,
        body(messages=[{"role": "user", "content": "x" * 3_000_000}]),
        413,
        "at most 1000000",
        None,
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors(server: SimpleNamespace, client: Any, case: str) -> None:
    method, path, data, status, fragment, param = BAD_REQUESTS[case]
    got, error, _ = raw(server.url, method, path, data)
    assert got == status, error
    assert_error(error, fragment, param)
    assert_serving(client)


def test_client_sees_typed_errors(client: Any) -> None:
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.chat.completions.create(model="gpt-9", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="context is 128 tokens"):
        client.completions.create(model="tiny", prompt="speak " * 200)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=-5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    assert_serving(client)


# -- cancellation and failures ------------------------------------------------------------


def hook_first_block(model: GPT, hook: Callable[..., None]) -> Any:
    """Run ``hook`` before every prefill and decode forward of ``model``."""
    return model.blocks[0].register_forward_pre_hook(lambda module, args: hook())


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_generation(
    server: SimpleNamespace, client: Any, model: GPT, stream: bool
) -> None:
    handle = hook_first_block(model, lambda: time.sleep(0.005))  # 100 tokens would take 0.5 s+
    try:
        before = len(server.recorder.requests)
        u = urllib.parse.urlsplit(server.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("POST", CHAT, body=body(max_tokens=100, stream=stream))
        if stream:
            response = conn.getresponse()
            assert response.status == 200
            assert response.readline().startswith(b"data: ")  # the stream has begun
        else:
            wait_for(lambda: len(server.recorder.requests) > before)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        request = server.recorder.requests[before]
        wait_for(lambda: request.cancelled)
        wait_for(lambda: server.engine.stats.active == 0)
        assert len(request.generated) < 100
    finally:
        handle.remove()
    assert_serving(client)


def test_failed_request_leaves_server_running(client: Any, model: GPT) -> None:
    failures = [RuntimeError("injected failure")]

    def fail_once() -> None:
        if failures:
            raise failures.pop()

    handle = hook_first_block(model, fail_once)
    try:
        with pytest.raises(openai.InternalServerError, match="generation failed"):
            client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
        failures.append(RuntimeError("injected failure"))
        with pytest.raises(openai.APIError, match="generation failed"):
            list(client.chat.completions.create(model="tiny", messages=HELLO, stream=True))
    finally:
        handle.remove()
    assert_serving(client)


def test_queue_full_is_503_and_recovers(model: GPT, chatml_tokenizer: BPETokenizer) -> None:
    gate, entered = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(30)

    engine_kwargs = {"max_batch": 1, "max_queue": 1}
    with running_server(model, chatml_tokenizer, engine_kwargs=engine_kwargs) as s:
        handle = hook_first_block(model, hold)
        results: list[tuple[int, Any, dict[str, str]]] = []
        threads: list[threading.Thread] = []

        def send() -> None:
            t = threading.Thread(target=lambda: results.append(raw(s.url, "POST", CHAT, body())))
            t.start()
            threads.append(t)

        try:
            send()
            wait_for(entered.is_set)  # the first request holds the only row
            for _ in range(4):  # the others wait, until the line is full
                waiting = s.engine.stats.waiting
                send()
                wait_for(lambda w=waiting: s.engine.stats.waiting > w or len(results) > 0)
                if results:
                    break
            status, error, headers = results[0]
            assert status == 503
            assert_error(error, "retry later")
            assert error["error"]["code"] == "server_busy" and headers["retry-after"] == "1"
        finally:
            handle.remove()
            gate.set()
            for t in threads:
                t.join(30)
        assert sorted(r[0] for r in results) == [200] * (len(results) - 1) + [503]
        # more choices than the server ever holds (1 row + 1 waiting): a 400, not "retry"
        status, error, _ = raw(s.url, "POST", CHAT, body(n=3))
        assert status == 400 and error["error"]["param"] == "n"
        assert_error(error, "more than this server holds at once")
        assert_serving(client_for(s.url))


# -- the API key, eos, the page -----------------------------------------------------------


def eos_model(tok: BPETokenizer) -> GPT:
    """A model whose every prediction is the eos token."""
    net = tiny_model(tok.vocab_size, block_size=CONTEXT, tie_embeddings=False)
    with torch.no_grad():
        assert net.norm_f is not None and net.norm_f.bias is not None
        net.norm_f.weight.zero_()
        net.norm_f.bias.fill_(1.0)
        net.lm_head.weight.zero_()
        net.lm_head.weight[tok.eos_id] = 1.0
    return net


def test_api_key_guards_the_api(chatml_tokenizer: BPETokenizer) -> None:
    with running_server(eos_model(chatml_tokenizer), chatml_tokenizer, api_key="sekret") as s:
        with pytest.raises(openai.AuthenticationError, match="API key is wrong"):
            client_for(s.url, "wrong").chat.completions.create(model="tiny", messages=HELLO)
        for method, path in (("GET", "/v1/models"), ("POST", CHAT), ("POST", "/v1/completions")):
            status, error, _ = raw(s.url, method, path, body())
            assert status == 401
            assert_error(error, "Authorization: Bearer")
            assert error["error"]["code"] == "invalid_api_key"
        for path in ("/health", "/", "/static/chat.js"):  # open: the page asks for the key
            assert raw(s.url, "GET", path)[0] == 200
        good = client_for(s.url, "sekret")
        reply = good.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5)
        # eos at once: an empty reply that ended by itself
        assert reply.choices[0].message.content == ""
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens <= 1
        streamed = chat_stream(good, HELLO, max_tokens=5)
        assert streamed.texts == {0: ""} and streamed.reasons == {0: "stop"}


def test_page_is_self_contained(server: SimpleNamespace) -> None:
    status, page, headers = raw(server.url, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    html = page.decode()
    assert 'src="static/chat.js"' in html and 'href="static/style.css"' in html
    for name in ("index.html", "chat.js", "style.css"):
        text = (REPO / "src/gptkit/serve/static" / name).read_text()
        assert "http://" not in text and "https://" not in text, f"{name} loads something remote"
        if name != "index.html":
            assert raw(server.url, "GET", f"/static/{name}")[0] == 200
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "serve/static/*" in pyproject  # the page ships in the wheel


# -- the command --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(tmp_path: Path, chatml_tokenizer: BPETokenizer) -> None:
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, tiny_model(chatml_tokenizer.vocab_size, block_size=64), chatml_tokenizer)
    port = free_port()
    env = os.environ | {"GPTKIT_API_KEY": "from-env", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gptkit", "serve", "--model", str(ckpt), "--port", str(port)]
    cmd += ["--log-level", "warning"]
    # started as a shell starts a background job, SIGINT ignored: Ctrl-C must still stop it
    ignore = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=ignore)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                return raw(url, "GET", "/health")[0] == 200
            except OSError:
                return False

        wait_for(up, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            client_for(url).models.list()
        client = client_for(url, "from-env")
        assert [m.id for m in client.models.list().data] == [ckpt.name]  # never the path
        reply = client.chat.completions.create(model=ckpt.name, messages=HELLO, max_tokens=3)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"serving {ckpt.name} (context 64 tokens) at http://127.0.0.1:{port}/" in err


def test_serve_command_reports_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path), "--port", str(port)]) == 2
    assert "choose another --port" in capsys.readouterr().err
