"""Checkpoints in and out: ``load(source)`` resolves any source gptkit can run."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from gptkit.checkpoint.native import (
    is_native,
    load_checkpoint,
    read_model_config,
    read_train_state,
    save_checkpoint,
)
from gptkit.errors import GptkitError
from gptkit.files import latest_checkpoint
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer

__all__ = [
    "load",
    "load_checkpoint",
    "read_model_config",
    "read_train_state",
    "resolve_checkpoint",
    "save_checkpoint",
]


def resolve_checkpoint(source: str | Path) -> Path:
    """The checkpoint directory ``source`` names: a checkpoint itself, or a training run's
    output directory (its newest complete checkpoint)."""
    path = Path(source)
    if not path.exists():
        raise GptkitError(f"model source {path} does not exist; pass a checkpoint directory")
    if path.is_dir() and is_native(path):
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
    raise GptkitError(
        f"{path} is not a gptkit checkpoint: expected a directory with config.json and "
        "model.safetensors, or a training run directory with checkpoints/step-*"
    )


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def load(source: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer | None]:
    """``model, tokenizer = load(source)`` for any model gptkit runs.

    ``source`` is one of: a gptkit checkpoint directory or training run directory; a Hugging
    Face model directory (GPT-2, OpenAI GPT, Llama: safetensors, sharded safetensors or
    ``pytorch_model.bin``); a ``.gguf`` file; or a Hugging Face hub id such as
    ``HuggingFaceTB/SmolLM2-135M-Instruct`` (downloaded and cached when the machine is
    online). The model comes back in eval mode on ``device``; the tokenizer is None (with a
    warning) when the source has none.
    """
    path = Path(source)
    if path.is_file():
        if not _is_gguf(path):
            raise GptkitError(
                f"{path} is a file but not a GGUF model; pass a .gguf file or a model directory"
            )
        from gptkit.checkpoint.gguf import load_gguf

        return load_gguf(path, device)
    if path.is_dir():
        if not is_native(path):
            from gptkit.checkpoint.hf import is_hf_dir, load_hf_dir

            if is_hf_dir(path):
                return load_hf_dir(path, device)
        directory = resolve_checkpoint(path)
        model, tokenizer = load_checkpoint(directory, device)
        if tokenizer is None:
            warnings.warn(f"{directory} has no tokenizer files; tokenizer is None", stacklevel=2)
        return model, tokenizer
    if not path.exists() and _looks_like_hub_id(str(source)):
        from gptkit.checkpoint.hf import hub_snapshot, load_hf_dir

        return load_hf_dir(hub_snapshot(str(source)), device)
    raise GptkitError(
        f"model source {source} does not exist; pass a checkpoint directory, a Hugging Face "
        "model directory, a .gguf file or a hub id (org/name)"
    )
