"""gptkit's own checkpoint directory: self-describing, written atomically, loaded without pickle.

::

    step-0000500/
      config.json            {"format": "gptkit.model/1", "model": {ModelConfig fields}}
      model.safetensors      weights (a tied head is stored once)
      tokenizer.json         (+ tokenizer_config.json) the tokenizer the model was trained with
      train_state.json       step, schedule, data position, RNG states, metrics  [training only]
      optimizer.safetensors  AdamW moments                                       [training only]
      adapter.safetensors    LoRA adapters (+ adapter_config.json) over the base weights  [LoRA]

The directory is built under a temporary name and renamed into place, so a killed process
never leaves a half-written checkpoint.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptkit.config import ModelConfig
from gptkit.errors import GptkitError, shape_mismatch
from gptkit.files import atomic_dir, atomic_write_json
from gptkit.model import GPT
from gptkit.model.gpt import sinusoidal_table
from gptkit.model.lora import base_state_dict, has_lora, is_adapter, load_adapter, save_adapter
from gptkit.tokenizer import Tokenizer, load_tokenizer

FORMAT = "gptkit.model/1"
CONFIG, WEIGHTS, TRAIN_STATE, OPTIMIZER = (
    "config.json",
    "model.safetensors",
    "train_state.json",
    "optimizer.safetensors",
)


def is_native(directory: Path) -> bool:
    try:
        return json.loads((directory / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """The weights to store: contiguous CPU tensors, a tied head stored once, LoRA adapters
    left out (they are stored beside, by :func:`save_adapter`)."""
    state = base_state_dict(model) if has_lora(model) else model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def set_rng_state(state: str) -> None:
    raw = torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8)
    torch.set_rng_state(raw)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().to("cpu").contiguous()
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, groups: Any) -> None:
    tensors = _read_safetensors(directory / OPTIMIZER)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    directory: str | Path,
    model: GPT,
    tokenizer: Tokenizer | None,
    train_state: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write a complete checkpoint directory atomically; returns its path."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        atomic_write_json(tmp / CONFIG, {"format": FORMAT, "model": model.config.to_dict()})
        save_file(model_state(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if has_lora(model):
            save_adapter(model, tmp)
        if optimizer is not None:
            tensors, groups = _optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / OPTIMIZER))
            train_state = dict(train_state or {}, optimizer_param_groups=groups)
        if train_state is not None:
            atomic_write_json(tmp / TRAIN_STATE, train_state)
    return directory


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise GptkitError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise GptkitError(
            f"{path} is truncated or corrupted ({e}); use an earlier checkpoint or re-export it"
        ) from None


def read_model_config(directory: Path) -> ModelConfig:
    try:
        data = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise GptkitError(
            f"{directory / CONFIG} is unreadable ({e}); the checkpoint is damaged"
        ) from None
    return ModelConfig.from_dict(data["model"])


def load_weights(model: GPT, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` strictly, turning torch's error into one line that lists the mismatches."""
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    problem = shape_mismatch(
        {k: tuple(v.shape) for k, v in expected.items()},
        {k: tuple(v.shape) for k, v in state.items()},
    )
    if problem:
        raise GptkitError(
            f"weights in {origin} do not fit the model config ({problem}); "
            "the config.json and the weights come from different models"
        )
    model.load_state_dict(state, strict=False)


def model_from_state(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    origin: str = "the checkpoint",
) -> GPT:
    """A model (eval mode) built from ``config`` and filled with ``state``, without first
    allocating and initialising random weights."""
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device)
    load_weights(model, {k: v.to(device) for k, v in state.items()}, origin)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    if config.pos_emb == "sinusoidal":  # a non-persistent buffer: rebuild it
        model.sinusoid = sinusoidal_table(config.block_size, config.n_embd).to(device)
    return model.eval()


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer | None]:
    """Model (eval mode) and tokenizer of a gptkit checkpoint directory."""
    directory = Path(directory)
    config = read_model_config(directory)
    state = _read_safetensors(directory / WEIGHTS)
    model = model_from_state(config, state, device, str(directory / WEIGHTS))
    if is_adapter(directory):  # a LoRA run: the base weights plus its adapters, unmerged
        load_adapter(model, directory)
        model.eval()
    tokenizer = load_tokenizer(directory) if (directory / "tokenizer.json").exists() else None
    return model, tokenizer


def read_train_state(directory: Path) -> dict[str, Any]:
    path = directory / TRAIN_STATE
    if not path.is_file():
        raise GptkitError(f"{directory} has no {TRAIN_STATE}: it is not a resumable checkpoint")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise GptkitError(f"{path} is corrupted ({e}); resume from an earlier checkpoint") from None
