"""Checkpoints in and out: ``load(source)`` resolves any source gptkit can run."""

from __future__ import annotations

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


def load(source: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer | None]:
    """``model, tokenizer = load(source)``: a checkpoint directory or a training run directory.

    The model comes back in eval mode on ``device``; the tokenizer is None (with a warning)
    when the source has none.
    """
    directory = resolve_checkpoint(source)
    model, tokenizer = load_checkpoint(directory, device)
    if tokenizer is None:
        import warnings

        warnings.warn(f"{directory} has no tokenizer files; tokenizer is None", stacklevel=2)
    return model, tokenizer
