"""Shared test helpers: tiny configs and models, tokenizers, paths to the shared data."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gptkit.config import ModelConfig, SampleConfig
from gptkit.model import GPT
from gptkit.tokenizer import EOT, BPETokenizer, CharTokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPTKIT_DATA", REPO.parent / "shared" / "data"))
# eval finds its data sets through GPTKIT_DATA (or shared/data beside the working
# directory): point it at the same directory, wherever pytest is started from
os.environ["GPTKIT_DATA"] = str(SHARED_DATA)

SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "def add(a, b):\n    return a + b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"
) * 4

#: one tiny config per block family: GPT-2, GPT-1, sinusoidal, Llama-style, GPT-3 banded
FAMILIES = {
    "gpt2": {},
    "gpt1": dict(norm_position="post", mlp="gelu"),
    "sinusoidal": dict(pos_emb="sinusoidal"),
    "llama": dict(
        norm="rmsnorm",
        pos_emb="rope",
        mlp="swiglu",
        n_kv_head=1,
        bias=False,
        tie_embeddings=False,
    ),
    "gpt3": dict(attention_pattern="alternating", attention_window=5),
}


def tiny_config(vocab_size: int = 64, **overrides: object) -> ModelConfig:
    base = dict(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    return ModelConfig(**(base | overrides))  # type: ignore[arg-type]


def tiny_model(vocab_size: int = 64, seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(vocab_size, **overrides)).eval()


def run_metrics(run: Path) -> list[dict]:
    """The rows of a training run's metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_losses(run: Path) -> dict[int, float]:
    """Training loss by step."""
    return {r["step"]: r["loss"] for r in run_metrics(run) if "loss" in r}


def run_val_losses(run: Path) -> list[float]:
    """Validation losses, in order."""
    return [r["val_loss"] for r in run_metrics(run) if "val_loss" in r]


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (set GPTKIT_DATA to the shared data directory)")
    return p


@pytest.fixture(params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> dict:
    return FAMILIES[request.param]


@pytest.fixture(scope="session")
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer.train([SAMPLE_TEXT])


@pytest.fixture(scope="session")
def bpe_tokenizer() -> BPETokenizer:
    return BPETokenizer.train(iter([SAMPLE_TEXT]), vocab_size=300, show_progress=False)


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    return shared_path("gpt2")


#: GPT-2's split regex, as tiktoken writes it
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="session")
def gpt2(gpt2_dir: Path) -> BPETokenizer:
    """GPT-2's tokenizer from the shared encoder.json and vocab.bpe."""
    return BPETokenizer.from_gpt2_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")


@pytest.fixture(scope="session")
def tiktoken_gpt2(gpt2_dir: Path) -> Any:
    """tiktoken's gpt2 encoding, built from the same local files (nothing is downloaded)."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    d = str(gpt2_dir)
    ranks = data_gym_to_mergeable_bpe_ranks(f"{d}/vocab.bpe", f"{d}/encoder.json")
    return tiktoken.Encoding(
        "gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )


@pytest.fixture(scope="session")
def chatml_tokenizer() -> BPETokenizer:
    """A byte-level BPE with ChatML's markers as special tokens and a chat template; its eos is
    ``<|im_end|>``, as in chat models."""
    from gptkit.tokenizer.chat import CHATML

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = BPETokenizer.train(iter([SAMPLE_TEXT]), 320, special=special, show_progress=False)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


@contextlib.contextmanager
def running_server(
    model: GPT,
    tokenizer: Any,
    name: str = "tiny",
    engine_kwargs: dict[str, Any] | None = None,
    wrap: Callable[[Any], Any] | None = None,
    **app_kwargs: Any,
) -> Iterator[SimpleNamespace]:
    """A real gptkit server (uvicorn, in a thread) on a free port of 127.0.0.1.

    Yields ``url`` (``http://127.0.0.1:PORT``), ``engine`` and ``app``. ``wrap`` may replace
    the engine the app sees (to record requests); ``app_kwargs`` go to ``create_app``.
    """
    import uvicorn

    from gptkit.serve.app import create_app
    from gptkit.serve.engine import Engine

    engine = Engine(model, tokenizer, **(engine_kwargs or {}))
    engine.start()
    app = create_app(wrap(engine) if wrap else engine, name, **app_kwargs)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            engine.shutdown()
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", engine=engine, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.shutdown()


def run_ids(
    model: GPT, prompts: list, cfg: SampleConfig | None = None, eos_id: int | None = None, **kw: Any
) -> list[list[int]]:
    """Every row's generated ids, from the id-level loop (greedy, 24 tokens by default)."""
    from gptkit.generate.generator import generate_ids

    cfg = cfg or SampleConfig(temperature=0.0, max_new_tokens=24)
    out: list[list[int]] = [[] for _ in prompts]
    for events in generate_ids(model, prompts, cfg, eos_id, **kw):
        for ev in events:
            out[ev.row].append(ev.token)
    return out
