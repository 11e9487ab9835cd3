"""LoRA: trainable low-rank adapters wrapped around a frozen model's Linear layers.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models". A frozen weight
W (out × in) gets a low-rank update: ``y = W x + (alpha / r) · B A x`` with A (r × in)
Kaiming-uniform-initialised and B (out × r) zero-initialised, so a fresh adapter changes
nothing; dropout acts on the adapter's input only.

::

    x ─┬─► W (frozen) ─────────────────────────────────────────┐
       │                                                       + ──► y
       └─► dropout ─► A (r × in) ─► B (out × r) ─► · alpha/r ──┘

The model file stays pure: :func:`apply_lora` swaps ``nn.Linear`` modules for
:class:`LoRALinear` in place. A wrapper keeps the base ``weight``/``bias`` under their names, so
a LoRA model's state dict is the base state dict plus ``<module>.lora_a`` and
``<module>.lora_b``; :func:`merge_lora` folds the adapters in and leaves a plain model.

An adapter directory (:func:`save_adapter`, :func:`load_adapter`)::

    adapter.safetensors    only the adapter tensors: "blocks.0.attn.qkv.lora_a" (r, in),
                           "blocks.0.attn.qkv.lora_b" (out, r), ...
    adapter_config.json    {"format": "gptkit.lora/1",
                            "lora": {"rank", "alpha", "dropout", "targets"},
                            "base_model": {ModelConfig fields of the model it was trained on},
                            "weights_sha256": hash of adapter.safetensors}

QLoRA (Dettmers et al. 2023): :meth:`LoRALinear.quantize_base` swaps the frozen base for a
quantized layer of :mod:`gptkit.model.quant` (which computes the input's gradient through
the dequantized weight); the state dict still shows ``weight``/``bias``, dequantized, so
checkpoints and adapters are the same files, and merging folds the update into the
dequantized weight.

Each file is written atomically, the tensors first; the config, written last, names the
tensors' hash, so a pair torn by a killed process is detected on load.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gptkit.config import ModelConfig, _JsonMixin
from gptkit.errors import GptkitError, shape_mismatch
from gptkit.files import atomic_path, atomic_write_json

FORMAT = "gptkit.lora/1"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
DEFAULT_TARGETS = ("qkv", "proj", "fc")
#: ModelConfig fields that do not change the weights' shapes or the function at inference
_IRRELEVANT_FIELDS = ("dropout", "init_std")


@dataclass(frozen=True)
class LoRAConfig(_JsonMixin):
    """The settings of a model's adapters; stored in ``adapter_config.json``.

    ``targets`` name Linear modules by the end of their path: ``"qkv"``, ``"proj"`` (both
    projections), ``"attn.proj"``, ``"mlp.proj"``, ``"fc"``, ``"lm_head"``, or a full path
    such as ``"blocks.3.attn.qkv"``.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise GptkitError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise GptkitError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise GptkitError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise GptkitError(
                f"LoRA targets must be non-empty module names, got {list(self.targets)}; "
                f"for example {list(DEFAULT_TARGETS)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus a trainable low-rank update (module docstring has the diagram).

    ``weight`` and ``bias`` are the wrapped layer's own Parameters (not copies), under the
    same names. ``merge()`` folds ``scale · B A`` into ``weight`` and drops the adapter.
    After :meth:`quantize_base`, ``base`` is a quantized layer that computes the frozen
    product instead, and ``weight`` is None.
    """

    base: nn.Module | None

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_a: nn.Parameter | None = nn.Parameter(
            torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype)
        )
        self.lora_b: nn.Parameter | None = nn.Parameter(
            torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype)
        )
        # nn.Linear's own init, as in the paper's reference code: a random A, and B = 0 so
        # the wrapped layer starts as the base layer exactly.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.merged = False
        self.base = None
        self._register_state_dict_hook(_plain_base_state)

    def quantize_base(self, quantized: nn.Module) -> None:
        """Compute the frozen product with ``quantized`` (a layer of
        :mod:`gptkit.model.quant` holding this layer's weight and bias) from now on."""
        self.base = quantized.train(self.training)
        self.weight = None
        self.register_parameter("bias", None)

    def base_weight(self) -> Tensor:
        """The frozen weight (out × in), dequantized if the base is quantized."""
        if self.base is not None:
            return self.base.dequantized()  # type: ignore[operator]
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x) if self.base is not None else F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        assert self.lora_a is not None and self.lora_b is not None
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)  # (..., out)
        return y + update * self.scale

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``scale · B A`` (out × in) in fp32."""
        assert self.lora_a is not None and self.lora_b is not None
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` and drop ``lora_a``/``lora_b`` (idempotent)."""
        if self.merged:
            return
        if self.base is not None:  # a quantized base: the sum goes into a dequantized weight
            bias = self.base.bias
            self.weight = nn.Parameter(self.base_weight().float(), requires_grad=False)
            self.bias = nn.Parameter(bias.detach().clone(), False) if bias is not None else None
            self.base = None
        merged = self.weight.float() + self.delta_weight()
        self.weight.copy_(merged.to(self.weight.dtype))
        self.lora_a = None
        self.lora_b = None
        self.merged = True

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, rank={self.rank}, alpha={self.alpha}, "
            f"merged={self.merged}"
        )


def _plain_base_state(
    module: LoRALinear, state: dict[str, Tensor], prefix: str, metadata: Any
) -> None:
    """State dict hook: a quantized base appears as the plain ``weight`` and ``bias`` it
    stands for (dequantized, fp32), so checkpoints of QLoRA runs are ordinary ones."""
    base = module.base
    if base is None:
        return
    for key in [k for k in state if k.startswith(prefix + "base.")]:
        del state[key]
    state[prefix + "weight"] = module.base_weight()
    if base.bias is not None:
        state[prefix + "bias"] = base.bias.detach()


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _linear_names(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}


def _available(names: list[str]) -> list[str]:
    """The short target names that pick layers of this model ("qkv", "attn.proj", ...)."""
    short = set()
    for n in names:
        parts = n.split(".")
        short.add(parts[-1])
        if len(parts) > 1:
            short.add(".".join(parts[-2:]))
    return sorted(short)


def _tied_to_embedding(model: nn.Module, layer: nn.Linear) -> bool:
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    return any(layer.weight is w for w in embeddings)


def select_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The paths of the Linear modules ``targets`` pick, in model order.

    Raises GptkitError for a target that matches nothing (listing the available names) and for
    a layer whose weight is tied to the token embedding.
    """
    linears = _linear_names(model)
    unknown = [t for t in targets if not any(_matches(n, t) for n in linears)]
    if unknown:
        raise GptkitError(
            f"LoRA target(s) {unknown} match no Linear layer of the model; "
            f"available targets: {_available(list(linears))}"
        )
    chosen = [n for n in linears if any(_matches(n, t) for t in targets)]
    for n in chosen:
        if _tied_to_embedding(model, linears[n]):
            raise GptkitError(
                f"LoRA cannot wrap {n}: its weight is tied to the token embedding "
                "(tie_embeddings=True), so an update would change the input embedding too; "
                f"drop {n!r} from the targets"
            )
    return chosen


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear) and not m.merged}


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds unmerged LoRA adapters."""
    return bool(_lora_layers(model))


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in ``model``, in the mode (train or eval) of the one it
    replaces."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module.train(getattr(parent, child).training)
    setattr(parent, child, module)


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS,
) -> nn.Module:
    """Wrap the targeted Linear layers of ``model`` in :class:`LoRALinear`, in place, and
    freeze every base parameter; only the adapters' ``lora_a``/``lora_b`` require grad.

    Args:
        model: a GPT (or any module with Linear layers).
        rank: r, the rank of the update.
        alpha: the update is scaled by alpha / r.
        dropout: dropout probability on the adapters' input (training mode only).
        targets: module names to wrap, matched against the end of each module path:
            "qkv", "proj" (attn.proj and mlp.proj), "attn.proj", "mlp.proj", "fc",
            "lm_head" (not when tied to the embedding), or full paths; a string may list
            several separated by commas.

    Returns:
        ``model``, with ``model.lora_config`` (a :class:`LoRAConfig`) recording the settings.
    """
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    config = LoRAConfig(
        rank=rank, alpha=float(alpha), dropout=float(dropout), targets=tuple(targets)
    )
    if has_lora(model):
        raise GptkitError(
            "the model already has LoRA adapters; merge them first (merge_lora) or start from "
            "the base model"
        )
    chosen = select_targets(model, config.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for path in chosen:
        base = model.get_submodule(path)
        assert isinstance(base, nn.Linear)
        replace_module(model, path, LoRALinear(base, config.rank, config.alpha, config.dropout))
    model.lora_config = config
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place, leaving plain ``nn.Linear`` layers.

    The result's state dict has exactly the base model's keys, so ``save_checkpoint``,
    ``save_hf`` and ``save_gguf`` take it; all its parameters require grad again, as in a
    freshly built model. A model without adapters is returned unchanged. To keep training the
    adapters, merge a copy: ``merge_lora(copy.deepcopy(model))``.
    """
    layers = _lora_layers(model)
    if not layers:
        return model
    for path, layer in layers.items():
        layer.merge()
        plain = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
        )
        plain.weight = layer.weight
        plain.bias = layer.bias
        replace_module(model, path, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    if "lora_config" in vars(model):
        del model.lora_config
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only (``<module>.lora_a``, ``<module>.lora_b``), detached."""
    out = {}
    for path, layer in _lora_layers(model).items():
        assert layer.lora_a is not None and layer.lora_b is not None
        out[f"{path}.lora_a"] = layer.lora_a.detach()
        out[f"{path}.lora_b"] = layer.lora_b.detach()
    return out


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict without the adapter tensors: the frozen base weights, unmerged."""
    adapters = set(lora_state_dict(model))
    return {k: v for k, v in model.state_dict().items() if k not in adapters}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (after :func:`apply_lora`: the adapters only)."""
    return [p for p in model.parameters() if p.requires_grad]


def _config_of(model: nn.Module) -> LoRAConfig:
    config = getattr(model, "lora_config", None)
    if not has_lora(model) or not isinstance(config, LoRAConfig):
        raise GptkitError(
            "the model has no LoRA adapters to save; call apply_lora (or load_adapter) first"
        )
    return config


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` into ``directory``.

    Other files in ``directory`` are left alone, so this can fill a checkpoint directory
    that is being assembled. Returns the directory.
    """
    config = _config_of(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    base = getattr(model, "config", None)
    meta = {
        "format": FORMAT,
        "lora": config.to_dict(),
        "base_model": base.to_dict() if isinstance(base, ModelConfig) else None,
        "weights_sha256": _sha256(directory / ADAPTER_WEIGHTS),
    }
    atomic_write_json(directory / ADAPTER_CONFIG, meta)
    return directory


def is_adapter(directory: str | Path) -> bool:
    """Whether ``directory`` holds an adapter written by :func:`save_adapter`."""
    try:
        meta = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` (format checked; ``lora`` as a LoRAConfig)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise GptkitError(f"{path} is missing; {directory} is not a LoRA adapter directory")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GptkitError(f"{path} is unreadable ({e}); save the adapter again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise GptkitError(
            f"{path} has format {got!r}, expected {FORMAT!r}; it is no gptkit adapter"
        )
    try:
        meta["lora"] = LoRAConfig.from_dict(meta["lora"])
    except (KeyError, TypeError) as e:
        raise GptkitError(f"{path} has no valid 'lora' settings ({e}); save it again") from None
    return meta


def _check_base(recorded: dict[str, Any] | None, model: nn.Module, origin: Path) -> None:
    config = getattr(model, "config", None)
    if recorded is None or not isinstance(config, ModelConfig):
        return
    try:
        theirs = ModelConfig.from_dict(recorded).to_dict()
    except (GptkitError, TypeError) as e:
        raise GptkitError(f"{origin}: the recorded base model config is invalid ({e})") from None
    ours = config.to_dict()
    diffs = [
        f"{k} {theirs[k]!r} vs model {ours[k]!r}"
        for k in ours
        if k not in _IRRELEVANT_FIELDS and ours[k] != theirs[k]
    ]
    if diffs:
        raise GptkitError(
            f"the adapter in {origin} was trained on a different base model ({'; '.join(diffs)}); "
            "load it onto the model it was trained from"
        )


def _check_tensors(
    tensors: dict[str, Tensor], model: nn.Module, config: LoRAConfig, origin: Path
) -> None:
    """That ``tensors`` are exactly the adapters ``config`` puts on ``model``, shapes too."""
    expected: dict[str, tuple[int, ...]] = {}
    for path in select_targets(model, config.targets):
        layer = model.get_submodule(path)
        assert isinstance(layer, nn.Linear)
        expected[f"{path}.lora_a"] = (config.rank, layer.in_features)
        expected[f"{path}.lora_b"] = (layer.out_features, config.rank)
    problem = shape_mismatch(expected, {k: tuple(v.shape) for k, v in tensors.items()})
    if problem:
        raise GptkitError(
            f"the adapter in {origin} does not fit the model ({problem}); "
            "load it onto the model it was trained from"
        )


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply LoRA to ``model`` with the settings saved in ``directory`` and load the adapter
    tensors into it. Everything is checked before the model is touched: a base model config
    other than the recorded one, missing, unexpected or misshapen tensors, and a torn or
    corrupted file each raise GptkitError. Returns ``model``.
    """
    if has_lora(model):
        raise GptkitError(
            "the model already has LoRA adapters; load the adapter onto the base model"
        )
    directory = Path(directory)
    meta = read_adapter_config(directory)
    config: LoRAConfig = meta["lora"]
    _check_base(meta.get("base_model"), model, directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise GptkitError(f"{weights} is missing; the adapter is incomplete, save it again")
    if meta.get("weights_sha256") not in (None, _sha256(weights)):
        raise GptkitError(
            f"{weights} does not match {ADAPTER_CONFIG} (a save was interrupted or the file "
            "was changed); save the adapter again"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise GptkitError(f"{weights} is truncated or corrupted ({e}); save it again") from None
    _check_tensors(tensors, model, config, directory)
    apply_lora(model, config.rank, config.alpha, config.dropout, config.targets)
    with torch.no_grad():
        for path, layer in _lora_layers(model).items():
            assert layer.lora_a is not None and layer.lora_b is not None
            layer.lora_a.copy_(tensors[f"{path}.lora_a"])
            layer.lora_b.copy_(tensors[f"{path}.lora_b"])
    return model


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "base_state_dict",
    "has_lora",
    "is_adapter",
    "load_adapter",
    "lora_state_dict",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
    "select_targets",
    "trainable_parameters",
]
