"""Checkpoints: save/load keeps outputs, and damaged ones fail with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, tiny_model

from gptkit.checkpoint import load, save_checkpoint
from gptkit.errors import GptkitError
from gptkit.tokenizer import CharTokenizer


@pytest.fixture
def saved(tmp_path: Path, char_tokenizer: CharTokenizer) -> Path:
    model = tiny_model(char_tokenizer.vocab_size)
    return save_checkpoint(tmp_path / "ckpt", model, char_tokenizer)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_load_gives_equal_logits(
    name: str, tmp_path: Path, char_tokenizer: CharTokenizer
) -> None:
    model = tiny_model(char_tokenizer.vocab_size, **FAMILIES[name])
    save_checkpoint(tmp_path, model, char_tokenizer)
    again, tok = load(tmp_path)
    assert tok is not None and tok.hash == char_tokenizer.hash
    ids = torch.randint(0, char_tokenizer.vocab_size, (2, 20))
    torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
    if model.config.tie_embeddings:
        assert again.lm_head.weight is again.wte.weight


def test_truncated_weights(saved: Path) -> None:
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(GptkitError, match="truncated or corrupted"):
        load(saved)


def test_corrupted_header(saved: Path) -> None:
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\xff" * 12
    weights.write_bytes(bytes(data))
    with pytest.raises(GptkitError, match="truncated or corrupted"):
        load(saved)


def test_missing_weights(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(GptkitError, match="missing"):
        load(saved)


def test_config_that_does_not_fit_the_weights(saved: Path) -> None:
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model"]["n_embd"] = 48
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GptkitError, match="sha256"):  # the manifest catches the edit first
        load(saved)
    with pytest.raises(GptkitError, match="shape mismatch"):
        load(saved, verify=False)


def test_unreadable_config(saved: Path) -> None:
    (saved / "config.json").write_text("{")
    with pytest.raises(GptkitError, match="not a gptkit checkpoint"):
        load(saved)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(GptkitError, match="not a gptkit checkpoint"):
        load(tmp_path)


def test_missing_tokenizer_warns(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, tiny_model(), None)
    with pytest.warns(UserWarning, match="no tokenizer"):
        model, tok = load(tmp_path)
    assert tok is None and model.config.vocab_size == 64
