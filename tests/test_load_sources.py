"""One loader for every command: each verb that takes ``--model`` runs on each kind of source
(native checkpoint, training run, quantized checkpoint, Hugging Face directory, GGUF file),
and ``gptkit.load``'s own options: dtype, quantize on load, known names resolved from local
copies (a fake hub cache, ``models/*.gguf``) and the one-line errors when none is there.
Nothing here touches the network."""

from __future__ import annotations

import copy
import io
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_model

import gptkit
from gptkit.checkpoint import load, save_checkpoint, save_quantized
from gptkit.checkpoint.gguf import save_gguf
from gptkit.checkpoint.hf import save_hf
from gptkit.cli import main
from gptkit.errors import GptkitError
from gptkit.model.quant import quantization, quantize
from gptkit.tokenizer import BPETokenizer

KINDS = ("native", "run", "quantized", "hf", "gguf")
#: (kind, verb) pairs that must fail, with the line that says why; every other pair runs
REFUSED = {
    ("quantized", "quantize"): "already quantized",
    ("quantized", "export"): "is quantized",
    # HF and GGUF hold the language model only: the classification head is not exported
    ("hf", "classify"): "no classification head",
    ("gguf", "classify"): "no classification head",
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, chatml_tokenizer: BPETokenizer) -> dict:
    """One tiny chat model with a classification head, as each kind of source (the HF
    directory and the GGUF file written by ``gptkit export``)."""
    root = tmp_path_factory.mktemp("sources")
    model = tiny_model(chatml_tokenizer.vocab_size, block_size=64)
    model.add_classifier(("neg", "pos"))
    save_checkpoint(root / "native", model, chatml_tokenizer)
    save_checkpoint(root / "run" / "checkpoints" / "step-0000010", model, chatml_tokenizer)
    save_quantized(root / "int8", quantize(copy.deepcopy(model), "int8"), chatml_tokenizer)
    native = str(root / "native")
    assert main(["export", "--model", native, "--out", str(root / "hf")]) == 0
    gguf = str(root / "m.gguf")
    assert main(["export", "--model", native, "--format", "gguf", "--out", gguf]) == 0
    (root / "text.txt").write_text(SAMPLE_TEXT)
    paths = dict(native="native", run="run", quantized="int8", hf="hf", gguf="m.gguf")
    return {"root": root, **{kind: root / name for kind, name in paths.items()}}


def _argv(verb: str, model: Path, root: Path) -> list[str]:
    """The command line of ``verb`` on ``model``: small and greedy."""
    out = str(root / f"{verb}-{model.name}")
    short = ["--max-new-tokens", "3", "--temperature", "0"]
    text = str(root / "text.txt")
    return {
        "generate": ["generate", "--model", str(model), "hello", *short, "--no-stream"],
        "chat": ["chat", "--model", str(model), *short],
        "export": ["export", "--model", str(model), "--out", out],
        "quantize": ["quantize", "--model", str(model), "--mode", "int8", "--out", out],
        "classify": ["classify", "--model", str(model), "--text", "hello"],
        "eval": ["eval", "--model", str(model), "--task", "text", "--data", text, "--no-progress"],
    }[verb]


@pytest.mark.parametrize("verb", ["generate", "chat", "export", "quantize", "classify", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_verb_takes_every_source(
    kind: str,
    verb: str,
    sources: dict,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))  # chat's one message
    code = main(_argv(verb, sources[kind], sources["root"]))
    err = capsys.readouterr().err
    refused = REFUSED.get((kind, verb))
    if refused is None:
        assert code == 0, err
    else:
        assert code == 2 and any(refused in line for line in err.splitlines()), err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", KINDS)
def test_serve_takes_every_source(
    kind: str, sources: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gptkit serve`` in-process: uvicorn's server, however it is started, answers one
    completion request through a test client instead of listening."""
    import uvicorn
    from fastapi.testclient import TestClient

    replies: list[Any] = []

    def run(server: uvicorn.Server, sockets: Any = None) -> None:
        server.started = True
        with TestClient(server.config.app) as client:
            body = {"model": "m", "prompt": "hello", "max_tokens": 3, "temperature": 0}
            replies.append(client.post("/v1/completions", json=body))

    monkeypatch.setattr(uvicorn.Server, "run", run)
    argv = ["serve", "--model", str(sources[kind]), "--model-name", "m"]
    assert main([*argv, "--port", str(_free_port()), "--log-level", "warning"]) == 0
    assert replies[0].status_code == 200, replies[0].text
    assert replies[0].json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_lossless_sources_generate_the_same_text(
    sources: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = {}
    for kind in ("native", "run", "hf", "gguf"):
        assert main(_argv("generate", sources[kind], sources["root"])) == 0
        texts[kind] = capsys.readouterr().out
    assert len(set(texts.values())) == 1, texts


# -- the loader's options -------------------------------------------------------------------


def test_one_loader() -> None:
    assert gptkit.load is load


def test_dtype_casts_and_device_stays_positional(sources: dict) -> None:
    model, _ = load(sources["native"], "cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = gptkit.load(sources["gguf"], dtype=torch.float32)  # GGUF loads as fp32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(GptkitError, match="unknown dtype 'int3'; choose one of float32"):
        load(sources["native"], dtype="int3")
    with pytest.raises(GptkitError, match=r"is quantized \(int8\).*without dtype="):
        load(sources["quantized"], dtype="bfloat16")


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_foreign_sources_quantize_on_load(kind: str, sources: dict) -> None:
    model, tok = load(sources[kind], quantize="bf16", dtype="bfloat16")
    config = quantization(model)
    assert config is not None and config.mode == "bf16" and tok is not None
    stored, _ = load(sources["quantized"], quantize="int8")  # the stored mode: accepted
    assert quantization(stored) == quantization(load(sources["quantized"])[0])


# -- known names ------------------------------------------------------------------------------


@pytest.fixture
def no_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, and a working directory without models/."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return cache


def test_known_name_finds_the_hub_cache(no_hub_cache: Path, bpe_tokenizer: BPETokenizer) -> None:
    model = tiny_model(bpe_tokenizer.vocab_size)
    repo = no_hub_cache / "models--openai-community--gpt2"
    save_hf(model, bpe_tokenizer, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    again, tok = gptkit.load("gpt2")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids))
    assert tok is not None


def test_known_name_finds_models_gguf(no_hub_cache: Path, bpe_tokenizer: BPETokenizer) -> None:
    model = tiny_model(bpe_tokenizer.vocab_size, norm="rmsnorm", pos_emb="rope", mlp="swiglu")
    Path("models").mkdir()
    save_gguf(model, bpe_tokenizer, Path("models") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    again, _ = gptkit.load("smollm2-135m")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    with pytest.raises(GptkitError, match="smollm2-360m"):  # another size is not taken for it
        _offline_load("smollm2-360m", no_hub_cache)


def _offline_load(name: str, cache: Path) -> None:
    """``load(name)`` with a hub that cannot be reached (as huggingface_hub reports it)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id: str, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("cannot reach the hub and the files are not cached")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub, "snapshot_download", offline)
        load(name)


def test_known_name_offline_says_so_in_one_line(no_hub_cache: Path) -> None:
    with pytest.raises(GptkitError) as caught:
        _offline_load("smollm2-135m", no_hub_cache)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("smollm2-135m: ")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in message and "offline" in message
    assert "make models" in message


def test_known_name_without_huggingface_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(GptkitError) as caught:
        load("gpt2")
    message = str(caught.value)
    assert "\n" not in message and "pip install huggingface_hub" in message
    assert "make models" in message and "openai-community/gpt2" in message


def test_unknown_source_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match=r"does not exist.*gpt2, gpt2-medium.*make models"):
        load(tmp_path / "nothing-here")
