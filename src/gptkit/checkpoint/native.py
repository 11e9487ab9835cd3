"""gptkit's own checkpoint directory: self-describing, written atomically, loaded without pickle.

::

    step-0000500/
      config.json            {"format": "gptkit.model/1", "model": {ModelConfig fields}}
      model.safetensors      weights (a tied head is stored once)
      tokenizer.json         (+ tokenizer_config.json) the tokenizer the model was trained with
      train_state.json       step, schedule, data position, RNG states, metrics  [training only]
      optimizer.safetensors  AdamW moments                                       [training only]
      adapter.safetensors    LoRA adapters (+ adapter_config.json) over the base weights  [LoRA]
      manifest.json          the sha256 of every other file, checked on load (gptkit.files)

The directory is built under a temporary name and renamed into place, so a killed process
never leaves a half-written checkpoint.

Nothing read from a checkpoint is trusted before it is checked: the config's fields by type
and against :data:`LIMITS` (so a ``n_layer`` of 10⁷ cannot hang the build), the weights'
shapes against the config before any memory is allocated, and their values for NaN/inf
(llama.cpp's ``gguf_init_from_file`` and safetensors' header checks follow the same rule).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptkit.config import ModelConfig
from gptkit.errors import GptkitError, shape_mismatch
from gptkit.files import atomic_dir, atomic_write_json, verify_manifest, write_manifest
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


#: upper bounds on a config's sizes, far above any released model (Llama 3.1 405B has 126
#: layers and 128k context; the largest vocabularies are ~256k): a value beyond them is a
#: damaged or hostile file, refused before a model is built from it
LIMITS = {
    "vocab_size": 1 << 24,
    "block_size": 1 << 20,
    "n_layer": 1024,
    "n_head": 1024,
    "n_kv_head": 1024,
    "n_embd": 1 << 16,
    "mlp_hidden": 1 << 18,
    "attention_window": 1 << 20,
}
#: open intervals the float fields must lie in (a negative epsilon makes every norm NaN)
FLOAT_RANGES = {"norm_eps": (0.0, 1.0), "rope_theta": (0.0, math.inf)}


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


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a ModelConfig field's type (int, float, bool, str, a
    Literal, ``X | None``, ``tuple[str, ...]``)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return value in args
    if type(None) in args:  # X | None
        return value is None or any(_type_ok(value, a) for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list | tuple) and all(_type_ok(v, args[0]) for v in value)
    if hint is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def checked_config(values: Any, origin: str) -> ModelConfig:
    """A ModelConfig from untrusted ``values`` (a JSON object, or fields read from a GGUF or
    Hugging Face file): every field's type and :data:`LIMITS` are checked first, so a bad
    file is one clear GptkitError rather than a TypeError or a hang while building."""
    if not isinstance(values, dict):
        raise GptkitError(
            f"{origin}: the model config is {type(values).__name__}, not a JSON object of "
            "ModelConfig fields; the checkpoint is damaged"
        )
    hints = typing.get_type_hints(ModelConfig)
    for name, value in values.items():
        if name in hints and not _type_ok(value, hints[name]):
            hint = hints[name]
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise GptkitError(
                f"{origin}: model field {name} is {value!r}, which is not a valid {kind}; "
                "the config is damaged"
            )
        if name in LIMITS and value is not None and not 0 < value <= LIMITS[name]:
            raise GptkitError(
                f"{origin}: model field {name} = {value} is outside 1..{LIMITS[name]}; "
                "the file is damaged or not a model"
            )
        low, high = FLOAT_RANGES.get(name, (-math.inf, math.inf))
        if name in FLOAT_RANGES and not low < value < high:
            raise GptkitError(
                f"{origin}: model field {name} = {value} is outside ({low:g}, {high:g}); "
                "the file is damaged or not a model"
            )
    try:
        return ModelConfig.from_dict(values)
    except GptkitError as e:
        raise GptkitError(f"{origin}: {e}") from None


def _all_finite(t: torch.Tensor) -> bool:
    # One reduction instead of a boolean tensor (~10x faster): a NaN or an infinity makes
    # the sum non-finite. A non-finite sum of finite values (overflow) gets the exact check.
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def refuse_non_finite(state: dict[str, torch.Tensor], origin: str) -> None:
    """Refuse weights holding NaN or infinity: they would generate garbage quietly."""
    for name, t in state.items():
        if t.is_floating_point() and not _all_finite(t):
            raise GptkitError(
                f"{origin}: weight {name} holds NaN or infinite values; the checkpoint is "
                "damaged (or training diverged): use an earlier checkpoint"
            )


def rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _rng_bytes(state: Any, origin: str) -> bytearray:
    """The bytes of a saved RNG state, checked to be the size of this torch's CPU state."""
    try:
        raw = bytearray(base64.b64decode(state, validate=True))
    except (binascii.Error, TypeError, ValueError):
        raw = bytearray()
    if len(raw) != torch.get_rng_state().numel():
        raise GptkitError(
            f"{origin}: the saved RNG state is damaged; resume from another checkpoint"
        )
    return raw


def set_rng_state(state: str, origin: str = "the checkpoint") -> None:
    raw = torch.frombuffer(_rng_bytes(state, origin), dtype=torch.uint8)
    try:
        torch.set_rng_state(raw)
    except RuntimeError as e:
        raise GptkitError(f"{origin}: the saved RNG state is refused ({e})") from None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().to("cpu").contiguous()
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, groups: Any) -> None:
    verify_manifest(directory, [OPTIMIZER])
    path = directory / OPTIMIZER
    tensors = _read_safetensors(path)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, _, name = key.partition(".")
        if not idx.isdigit() or not name:
            raise GptkitError(f"{path}: tensor name {key!r} is not <index>.<moment>; damaged")
        state.setdefault(int(idx), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise GptkitError(
            f"{path} does not fit this model's optimizer ({str(e).splitlines()[0]}); resume "
            "from another checkpoint, or start afresh"
        ) from None


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
        write_manifest(tmp)
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
    path = directory / CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GptkitError(f"{path} is unreadable ({e}); the checkpoint is damaged") from None
    if not isinstance(data, dict) or "model" not in data:
        raise GptkitError(f'{path} has no "model" object; the checkpoint is damaged')
    return checked_config(data["model"], str(path))


def _check_shapes(model: GPT, state: dict[str, torch.Tensor], origin: str) -> None:
    """``state`` must fill ``model`` exactly (compared on the meta device, before any memory
    is allocated for the model)."""
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


def _check_blocks(config: ModelConfig, names: Any, origin: str) -> None:
    """The weights must hold blocks 0 .. n_layer-1, checked before a model of n_layer
    blocks is built."""
    found = {int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))}
    if found and found != set(range(config.n_layer)):
        raise GptkitError(
            f"{origin}: the config says n_layer={config.n_layer} but the weights hold "
            f"{len(found)} blocks (up to {max(found)}); the config and weights do not match"
        )


def load_weights(model: GPT, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` strictly, turning torch's error into one line that lists the mismatches."""
    _check_shapes(model, state, origin)
    model.load_state_dict(state, strict=False)


def model_from_state(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    origin: str = "the checkpoint",
) -> GPT:
    """A model (eval mode) built from ``config`` and filled with ``state``, without first
    allocating and initialising random weights."""
    _check_blocks(config, state, origin)
    with torch.device("meta"):
        model = GPT(config)
    _check_shapes(model, state, origin)
    model = model.to_empty(device=device)
    load_weights(model, {k: v.to(device) for k, v in state.items()}, origin)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    if config.pos_emb == "sinusoidal":  # a non-persistent buffer: rebuild it
        model.sinusoid = sinusoidal_table(config.block_size, config.n_embd).to(device)
    return model.eval()


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[GPT, Tokenizer | None]:
    """Model (eval mode) and tokenizer of a gptkit checkpoint directory.

    Args:
        directory: the checkpoint directory.
        device: where the weights go.
        verify: check the files read against the sha256 sums of ``manifest.json`` (about
            1 s per GB); False skips that check.
    """
    directory = Path(directory)
    if verify:
        verify_manifest(directory, skip=(OPTIMIZER, TRAIN_STATE))  # checked when resuming
    config = read_model_config(directory)
    state = _read_safetensors(directory / WEIGHTS)
    refuse_non_finite(state, str(directory / WEIGHTS))
    model = model_from_state(config, state, device, str(directory / WEIGHTS))
    if is_adapter(directory):  # a LoRA run: the base weights plus its adapters, unmerged
        load_adapter(model, directory)
        model.eval()
    tokenizer = load_tokenizer(directory) if (directory / "tokenizer.json").exists() else None
    return model, tokenizer


def read_train_state(directory: Path) -> dict[str, Any]:
    """``train_state.json`` of a checkpoint, checked for what resuming reads: the step, the
    RNG and sampler states, the optimizer's parameter groups and the training config."""
    path = directory / TRAIN_STATE
    if not path.is_file():
        raise GptkitError(f"{directory} has no {TRAIN_STATE}: it is not a resumable checkpoint")
    verify_manifest(directory, [TRAIN_STATE])
    try:
        state = json.loads(path.read_text())
    except ValueError as e:
        raise GptkitError(f"{path} is corrupted ({e}); resume from an earlier checkpoint") from None
    _check_train_state(state, str(path))
    return state


def _check_train_state(state: Any, origin: str) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise GptkitError(f"{origin}: {what}; resume from an earlier checkpoint")

    need(isinstance(state, dict), "it is not a JSON object")
    step = state.get("step")
    need(isinstance(step, int) and not isinstance(step, bool) and step >= 0, "no valid step")
    _rng_bytes(state.get("rng"), origin)
    need(isinstance(state.get("sampler"), dict), "no valid sampler state")
    need(isinstance(state.get("train"), dict), "no valid training config")
    groups = state.get("optimizer_param_groups")
    need(
        isinstance(groups, list) and all(isinstance(g, dict) for g in groups),
        "no valid optimizer parameter groups",
    )
    world = state.get("world_size", 1)
    need(isinstance(world, int) and world >= 1, "world_size is not a positive integer")
    loss = state.get("loss")
    need(loss is None or isinstance(loss, int | float), "loss is not a number")
