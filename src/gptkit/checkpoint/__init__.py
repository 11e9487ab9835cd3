"""Checkpoints in and out: THE loader, ``load(source)``, for any source gptkit can run.

Sources (see :mod:`gptkit.checkpoint.sources` for how a name becomes a path)::

    a gptkit checkpoint, or a training run (its newest checkpoint)   native.py
    a quantized checkpoint (``gptkit quantize``)                      quantized.py
    a Hugging Face directory (GPT-2, OpenAI GPT, Llama)               hf.py
    a .gguf file                                                      gguf.py
    a hub id (org/name) or a known name (gpt2, smollm2-135m, ...)     sources.py, then hf.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from gptkit.checkpoint.hf import is_hf_dir, load_hf_dir
from gptkit.checkpoint.native import (
    is_native,
    load_checkpoint,
    read_model_config,
    read_train_state,
    save_checkpoint,
)
from gptkit.checkpoint.quantized import is_quantized, load_quantized, save_quantized
from gptkit.checkpoint.sources import KNOWN_MODELS, is_gguf, resolve
from gptkit.errors import GptkitError
from gptkit.files import latest_checkpoint
from gptkit.model import GPT
from gptkit.model.quant import PACKS_BF16, QuantConfig, quantization
from gptkit.model.quant import quantize as quantize_model
from gptkit.tokenizer import Tokenizer

__all__ = [
    "DTYPES",
    "KNOWN_MODELS",
    "is_quantized",
    "load",
    "load_checkpoint",
    "load_quantized",
    "read_model_config",
    "read_train_state",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_quantized",
]

#: the dtypes ``load(dtype=)`` takes by name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _read(
    path: Path, device: str | torch.device, verify: bool = True
) -> tuple[GPT, Tokenizer | None, str | None]:
    """Model and tokenizer of a local source, as stored, and a GGUF file's weight type (the
    type its blocks' matrices are stored in, before they were dequantized; else None)."""
    if path.is_file():
        if not is_gguf(path):
            raise GptkitError(
                f"{path} is a file but not a GGUF model; pass a .gguf file or a model directory"
            )
        from gptkit.checkpoint.gguf import read_gguf  # gguf-py, only when a file needs it

        return read_gguf(path, device)
    if is_quantized(path):
        return *load_quantized(path, device, verify), None
    if not is_native(path) and is_hf_dir(path):
        return *load_hf_dir(path, device), None
    directory = resolve_checkpoint(path)
    model, tokenizer = load_checkpoint(directory, device, verify)
    if tokenizer is None:
        warnings.warn(f"{directory} has no tokenizer files; tokenizer is None", stacklevel=3)
    return model, tokenizer, None


def _kept_as(path: Path, weight_type: str | None, device: torch.device) -> str | None:
    """``quantize="auto"``: the mode that keeps a quantized GGUF quantized (its type's entry
    in :data:`~gptkit.checkpoint.gguf.KEPT_AS`), said in one line on stderr; None (fp32) for
    any other source, an F32 file, a device other than the CPU (where the int4 and int8
    kernels are), and 16-bit floats on a CPU without native bf16 (where bf16 is slower)."""
    if weight_type in (None, "F32") or device.type != "cpu":
        return None
    from gptkit.checkpoint.gguf import KEPT_AS

    mode = KEPT_AS.get(weight_type)
    if mode == "bf16" and not PACKS_BF16:  # quant.py's test for oneDNN's native bf16
        print(
            f"{path.name}: {weight_type} weights loaded as fp32 (no native bf16 on this CPU)",
            file=sys.stderr,
        )
        return None
    if mode is not None:
        print(
            f"{path.name}: {weight_type} weights kept as {mode} "
            "(quantize=None / --quantize none for fp32)",
            file=sys.stderr,
        )
    return mode


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype: None, a name in :data:`DTYPES`, or one of its values."""
    named = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if dtype is not None and named not in DTYPES.values():
        raise GptkitError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return named


def load(
    source: str | Path,
    device: str | torch.device | None = None,
    *,
    quantize: str | None = "auto",
    dtype: str | torch.dtype | None = None,
    verify: bool = True,
) -> tuple[GPT, Tokenizer | None]:
    """``model, tokenizer = load(source)`` for any model gptkit runs: ``gptkit.load``.

    Args:
        source: a gptkit checkpoint or training run directory, a quantized checkpoint
            (written by ``gptkit quantize``), a Hugging Face model directory (GPT-2, OpenAI
            GPT, Llama: safetensors, sharded safetensors or ``pytorch_model.bin``), a
            ``.gguf`` file, a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct``
            (downloaded and cached when the machine is online), or a known name
            (:data:`KNOWN_MODELS`: gpt2, smollm2-135m, ...; a local copy first).
        device: where the model goes (default the CPU; int4 runs on the CPU only).
        quantize: quantize the weights on load: "bf16", "int8" or "int4" (see
            :mod:`gptkit.model.quant`); None (or "none") keeps them as loaded: fp32 for
            GGUF and HF weights. "auto" (the default) keeps a quantized GGUF file quantized
            on the CPU, in the mode its type maps to (Q4_0, Q4_1, Q4_K, Q2_K, Q3_K -> int4;
            Q5_*, Q6_K, Q8_0 -> int8; F16, BF16 -> bf16 where the CPU has native bf16),
            saying so in one line on stderr; with ``dtype`` given, or for any other
            source, it is None. A quantized checkpoint loads as it was saved, and refuses
            another mode.
        dtype: cast the floating weights ("float32", "bfloat16", "float16" or a torch
            dtype) before any quantization; None keeps them as stored (GGUF and HF weights
            load as fp32).
        verify: check a gptkit checkpoint's files against the sha256 sums in its
            ``manifest.json`` (about a second per GB; False skips it). Every source's sizes,
            shapes and values (no NaN or infinity) are checked either way.

    Returns:
        The model in eval mode and the tokenizer; the tokenizer is None (with a warning)
        when the source has none.
    """
    cast = _torch_dtype(dtype)
    if quantize == "none" or (quantize == "auto" and dtype is not None):
        quantize = None  # a cast asks for floating weights
    if quantize not in (None, "auto"):
        QuantConfig(quantize)  # a bad mode name fails before the (slow) load
    path = resolve(source)
    model, tokenizer, weight_type = _read(path, device or "cpu", verify)
    stored = quantization(model)
    if quantize == "auto":
        quantize = None if stored else _kept_as(path, weight_type, torch.device(device or "cpu"))
    if stored is not None:
        if quantize is not None and quantize != stored.mode:
            raise GptkitError(
                f"{source} is already quantized ({stored.mode}); load it without "
                f"quantize=, or quantize the original model to {quantize}"
            )
        if cast not in (None, torch.float32):
            raise GptkitError(
                f"{source} is quantized ({stored.mode}): its layers keep their own dtypes; "
                "load it without dtype="
            )
        return model, tokenizer
    if cast is not None:
        model = model.to(cast)
    if quantize is not None:
        model = quantize_model(model, quantize)
    return model, tokenizer
