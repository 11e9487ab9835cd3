"""Quantized checkpoints: the directory ``gptkit quantize`` writes, and reading it back.

A quantized checkpoint directory is self-describing, like a native one::

    model-int4/
      config.json        {"format": "gptkit.quantized/1", "model": {ModelConfig fields},
                          "quantization": {"mode": "int4", "group_size": 32,
                                           "lm_head": "int8-dynamic"}}
      model.safetensors  the quantized model's state: int8 / packed-int4 weights and their
                         scales under the layers' own names ("blocks.0.attn.qkv.weight",
                         "...scales_and_zeros"), everything else as it was (fp32)
      tokenizer.json     (+ tokenizer_config.json)
      manifest.json      the sha256 of every other file, checked on load

Only portable tensors are stored: int4 values two per byte in a plain row-major layout, not
the CPU kernel's tiled layout (which depends on the CPU), so loading re-packs them; a load
gives back exactly the model that was saved.

:func:`gptkit.checkpoint.load` reads these directories through :func:`load_quantized`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptkit.checkpoint.native import checked_config, refuse_non_finite
from gptkit.errors import GptkitError, shape_mismatch
from gptkit.files import atomic_dir, atomic_write_json, verify_manifest, write_manifest
from gptkit.model import GPT
from gptkit.model.gpt import sinusoidal_table
from gptkit.model.quant import QuantConfig, quantization, quantized_skeleton
from gptkit.tokenizer import Tokenizer, load_tokenizer

FORMAT = "gptkit.quantized/1"
CONFIG, WEIGHTS = "config.json", "model.safetensors"


def is_quantized(directory: str | Path) -> bool:
    """Whether ``directory`` holds a quantized gptkit checkpoint."""
    try:
        data = json.loads((Path(directory) / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def require_float(model: GPT, what: str) -> None:
    """Refuse a quantized ``model`` where a format stores float weights (``what``): its
    layers hold integers and scales that the format's readers would take for weights."""
    config = quantization(model)
    if config is not None:
        raise GptkitError(
            f"the model is quantized ({config.mode}), and {what} is written from float "
            "weights; export the full-precision model it was quantized from"
        )


def _stored_state(model: GPT) -> dict[str, torch.Tensor]:
    """The state to write: a head still tied to the embedding is stored once."""
    state = model.state_dict()
    if model.config.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_quantized(directory: str | Path, model: GPT, tokenizer: Tokenizer | None) -> Path:
    """Write a quantized model (and its tokenizer) as a checkpoint directory, atomically."""
    config = quantization(model)
    if config is None:
        raise GptkitError("the model is not quantized; quantize it first (gptkit.compress)")
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        atomic_write_json(
            tmp / CONFIG,
            {"format": FORMAT, "model": model.config.to_dict(), "quantization": config.to_dict()},
        )
        save_file(_stored_state(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        write_manifest(tmp)
    return directory


def load_quantized(
    directory: str | Path, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[GPT, Tokenizer | None]:
    """Model (eval mode, quantized as it was saved) and tokenizer of a quantized checkpoint;
    ``verify`` checks its files against the sha256 sums of its ``manifest.json``."""
    directory = Path(directory)
    if verify:
        verify_manifest(directory)
    try:
        data = json.loads((directory / CONFIG).read_text())
        config = checked_config(data["model"], str(directory / CONFIG))
        qconfig = QuantConfig.from_dict(data["quantization"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise GptkitError(f"{directory / CONFIG} is unreadable ({e}); re-quantize") from None
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise GptkitError(
            f"{directory / WEIGHTS} is missing, truncated or corrupted ({e}); re-quantize"
        ) from None
    refuse_non_finite(state, str(directory / WEIGHTS))
    with torch.device("meta"):
        model = GPT(config)
    quantized_skeleton(model, qconfig)
    tied = config.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight", None)
    problem = shape_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problem:  # checked on the meta device, before memory is allocated for the model
        raise GptkitError(f"weights in {directory / WEIGHTS} do not fit its config ({problem})")
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=False)  # re-packs each quantized layer (its hook)
    if tied:
        model.lm_head.weight = model.wte.weight
    if config.pos_emb == "sinusoidal":  # a non-persistent buffer: rebuild it
        model.sinusoid = sinusoidal_table(config.block_size, config.n_embd).to(device)
    tokenizer = load_tokenizer(directory) if (directory / "tokenizer.json").exists() else None
    return model.eval(), tokenizer
