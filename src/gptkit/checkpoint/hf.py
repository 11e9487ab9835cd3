"""Hugging Face checkpoints in and out: GPT-2, OpenAI GPT (GPT-1) and Llama.

A Hugging Face model directory holds ``config.json`` (with ``model_type`` and
``architectures``), the weights (``model.safetensors``, shards listed in
``model.safetensors.index.json``, or a pickled ``pytorch_model.bin``) and the tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``, or ``vocab.json`` + ``merges.txt``).

Each family is one :class:`Family`: how its ``config.json`` fields name ours, and a weight
table of rows ``(our name, their name(s), transform)``; ``{i}`` in a name stands for the layer
index. :func:`from_hf` and :func:`to_hf` read the same table in opposite directions, so a
model that loads also exports, and the inverse of every transform is next to it::

    ours                          theirs                                        transform
    blocks.{i}.attn.qkv.weight    transformer.h.{i}.attn.c_attn.weight           transpose Conv1D
    blocks.{i}.attn.qkv.weight    model.layers.{i}.self_attn.{q,k,v}_proj.weight concat q,k,v
    blocks.{i}.mlp.fc.weight      model.layers.{i}.mlp.{gate,up}_proj.weight     concat gate,up

References: the model classes of Hugging Face transformers (``modeling_gpt2.py``,
``modeling_openai.py``, ``modeling_llama.py``), read for their parameter names and semantics.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gptkit.checkpoint.native import checked_config, model_from_state, refuse_non_finite
from gptkit.checkpoint.quantized import require_float
from gptkit.config import ModelConfig
from gptkit.errors import GptkitError
from gptkit.files import atomic_dir
from gptkit.model import GPT
from gptkit.model.gpt import Norm
from gptkit.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from gptkit.tokenizer import find_tokenizer as _find_tokenizer

__all__ = [
    "FAMILIES",
    "HANDLED_APART",
    "Family",
    "config_from_hf",
    "config_to_hf",
    "export_family",
    "family_of",
    "from_hf",
    "hub_snapshot",
    "is_hf_dir",
    "load_hf_dir",
    "read_hf_weights",
    "save_hf",
    "to_hf",
]

# -- transforms: each a named pair of inverse functions ----------------------------------------


@dataclass(frozen=True)
class Transform:
    """How the Hugging Face tensors of one table row become ours, and back."""

    name: str
    to_ours: Callable[[Sequence[Tensor], ModelConfig], Tensor]
    to_hf: Callable[[Tensor, ModelConfig], list[Tensor]]


def _qkv_sizes(c: ModelConfig) -> list[int]:
    return [c.n_head * c.head_size, c.kv_heads * c.head_size, c.kv_heads * c.head_size]


COPY = Transform("copy", lambda ts, c: ts[0], lambda t, c: [t])
# transformers' Conv1D (GPT-1, GPT-2) stores its weight as (in, out); nn.Linear as (out, in).
CONV1D = Transform("transpose Conv1D", lambda ts, c: ts[0].t(), lambda t, c: [t.t()])
QKV = Transform(
    "concat q,k,v", lambda ts, c: torch.cat(list(ts)), lambda t, c: list(t.split(_qkv_sizes(c)))
)
GATE_UP = Transform(
    "concat gate,up", lambda ts, c: torch.cat(list(ts)), lambda t, c: list(t.chunk(2))
)

#: a weight table: (our name, their name or names, transform); ``{i}`` is the layer index
WeightMap = tuple[tuple[str, str | tuple[str, ...], Transform], ...]

# -- the tables ------------------------------------------------------------------------------

# GPT-1 and GPT-2 blocks share names; only their order of operations differs (post- vs pre-LN),
# and that is our norm_position switch, not a weight.
_CONV1D_BLOCK: WeightMap = (
    ("blocks.{i}.norm_1.weight", "transformer.h.{i}.ln_1.weight", COPY),
    ("blocks.{i}.norm_1.bias", "transformer.h.{i}.ln_1.bias", COPY),
    ("blocks.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight", CONV1D),
    ("blocks.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias", COPY),
    ("blocks.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight", CONV1D),
    ("blocks.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias", COPY),
    ("blocks.{i}.norm_2.weight", "transformer.h.{i}.ln_2.weight", COPY),
    ("blocks.{i}.norm_2.bias", "transformer.h.{i}.ln_2.bias", COPY),
    ("blocks.{i}.mlp.fc.weight", "transformer.h.{i}.mlp.c_fc.weight", CONV1D),
    ("blocks.{i}.mlp.fc.bias", "transformer.h.{i}.mlp.c_fc.bias", COPY),
    ("blocks.{i}.mlp.proj.weight", "transformer.h.{i}.mlp.c_proj.weight", CONV1D),
    ("blocks.{i}.mlp.proj.bias", "transformer.h.{i}.mlp.c_proj.bias", COPY),
)

GPT2_WEIGHTS: WeightMap = (
    ("wte.weight", "transformer.wte.weight", COPY),
    ("wpe.weight", "transformer.wpe.weight", COPY),
    *_CONV1D_BLOCK,
    ("norm_f.weight", "transformer.ln_f.weight", COPY),
    ("norm_f.bias", "transformer.ln_f.bias", COPY),
    ("lm_head.weight", "lm_head.weight", COPY),
)

OPENAI_GPT_WEIGHTS: WeightMap = (
    ("wte.weight", "transformer.tokens_embed.weight", COPY),
    ("wpe.weight", "transformer.positions_embed.weight", COPY),
    *_CONV1D_BLOCK,
    ("lm_head.weight", "lm_head.weight", COPY),
)

_L = "model.layers.{i}."
LLAMA_WEIGHTS: WeightMap = (
    ("wte.weight", "model.embed_tokens.weight", COPY),
    ("blocks.{i}.norm_1.weight", _L + "input_layernorm.weight", COPY),
    (
        "blocks.{i}.attn.qkv.weight",
        tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"),
        QKV,
    ),
    ("blocks.{i}.attn.qkv.bias", tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"), QKV),
    ("blocks.{i}.attn.proj.weight", _L + "self_attn.o_proj.weight", COPY),
    ("blocks.{i}.attn.proj.bias", _L + "self_attn.o_proj.bias", COPY),
    ("blocks.{i}.norm_2.weight", _L + "post_attention_layernorm.weight", COPY),
    ("blocks.{i}.mlp.fc.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), GATE_UP),
    ("blocks.{i}.mlp.fc.bias", (_L + "mlp.gate_proj.bias", _L + "mlp.up_proj.bias"), GATE_UP),
    ("blocks.{i}.mlp.proj.weight", _L + "mlp.down_proj.weight", COPY),
    ("blocks.{i}.mlp.proj.bias", _L + "mlp.down_proj.bias", COPY),
    ("norm_f.weight", "model.norm.weight", COPY),
    ("lm_head.weight", "lm_head.weight", COPY),
)


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture and how it maps onto :class:`ModelConfig` and our weights.

    Attributes:
        architecture: the ``architectures`` entry transformers loads for causal LM.
        model_type: ``config.json``'s ``model_type``.
        prefix: the base model's prefix; a saved base model (``GPT2Model``) lacks it.
        fixed: the ModelConfig switches every model of the family has.
        fields: (our field, their key) pairs copied as they are.
        defaults: transformers' class defaults for keys a ``config.json`` may leave out.
        activation: their key naming the MLP activation, and its values -> our ``mlp``.
        weights: the weight table.
        buffers: regexes of their state-dict entries that are not weights (causal masks,
            rotary tables) and are dropped.
    """

    architecture: str
    model_type: str
    prefix: str
    fixed: dict[str, Any]
    fields: tuple[tuple[str, str], ...]
    defaults: dict[str, Any]
    weights: WeightMap
    activation: tuple[str, dict[str, str]] | None = None
    buffers: tuple[str, ...] = ()
    base_architectures: tuple[str, ...] = ()


#: every layer attends to all earlier positions (GPT-3's banded layers have no twin here)
_DENSE = dict(attention_pattern="dense")
#: ModelConfig fields handled beside the tables (activation, hidden size, heads, RoPE, biases;
#: attention_window only matters to banded layers). A new ModelConfig switch belongs in a
#: family's ``fixed`` or ``fields``, or here; a test checks that none is forgotten.
HANDLED_APART = frozenset(
    # labels, task_format: a classification head is not exported; the language model under
    # it is. head_dim: Llama's own field; the GPT families need n_embd / n_head.
    {
        "mlp",
        "mlp_hidden",
        "n_kv_head",
        "rope_theta",
        "bias",
        "attention_window",
        "labels",
        "task_format",
        "head_dim",
    }
)

_GPT_FIELDS = (
    ("vocab_size", "vocab_size"),
    ("block_size", "n_positions"),
    ("n_layer", "n_layer"),
    ("n_head", "n_head"),
    ("n_embd", "n_embd"),
    ("norm_eps", "layer_norm_epsilon"),
    ("dropout", "resid_pdrop"),
    ("tie_embeddings", "tie_word_embeddings"),
    ("init_std", "initializer_range"),
)
_GPT_DEFAULTS = dict(
    n_embd=768,
    n_layer=12,
    n_head=12,
    layer_norm_epsilon=1e-5,
    resid_pdrop=0.1,
    tie_word_embeddings=True,
    initializer_range=0.02,
)

GPT2 = Family(
    architecture="GPT2LMHeadModel",
    base_architectures=("GPT2Model",),
    model_type="gpt2",
    prefix="transformer.",
    fixed=dict(_DENSE, norm="layernorm", norm_position="pre", pos_emb="learned", bias=True),
    fields=(*_GPT_FIELDS, ("mlp_hidden", "n_inner")),
    defaults=_GPT_DEFAULTS
    | dict(vocab_size=50257, n_positions=1024, n_inner=None, activation_function="gelu_new"),
    # transformers' ACT2FN: "gelu" is exact, "gelu_new" and "gelu_pytorch_tanh" the tanh form.
    activation=(
        "activation_function",
        {"gelu_new": "gelu_tanh", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"},
    ),
    weights=GPT2_WEIGHTS,
    buffers=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",),
)

OPENAI_GPT = Family(
    architecture="OpenAIGPTLMHeadModel",
    base_architectures=("OpenAIGPTModel",),
    model_type="openai-gpt",
    prefix="transformer.",
    fixed=dict(_DENSE, norm="layernorm", norm_position="post", pos_emb="learned", bias=True),
    fields=_GPT_FIELDS,
    defaults=_GPT_DEFAULTS | dict(vocab_size=40478, n_positions=512, afn="gelu"),
    # modeling_openai.ACT_FNS maps "gelu" to the tanh approximation (gelu_new), as GPT-1's own
    # finetune-transformer-lm code computed it.
    activation=("afn", {"gelu": "gelu_tanh"}),
    weights=OPENAI_GPT_WEIGHTS,
    buffers=(r"transformer\.h\.\d+\.attn\.bias", r"transformer\.position_ids"),
)

LLAMA = Family(
    architecture="LlamaForCausalLM",
    base_architectures=("LlamaModel",),
    model_type="llama",
    prefix="model.",
    fixed=dict(_DENSE, norm="rmsnorm", norm_position="pre", pos_emb="rope", mlp="swiglu"),
    fields=(
        ("vocab_size", "vocab_size"),
        ("block_size", "max_position_embeddings"),
        ("n_layer", "num_hidden_layers"),
        ("n_head", "num_attention_heads"),
        ("n_embd", "hidden_size"),
        ("norm_eps", "rms_norm_eps"),
        ("dropout", "attention_dropout"),
        ("tie_embeddings", "tie_word_embeddings"),
        ("init_std", "initializer_range"),
    ),
    defaults=dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        initializer_range=0.02,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    ),
    weights=LLAMA_WEIGHTS,
    buffers=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
)

FAMILIES: tuple[Family, ...] = (GPT2, OPENAI_GPT, LLAMA)


def _supported() -> str:
    return ", ".join(f"{f.architecture} (model_type {f.model_type!r})" for f in FAMILIES)


def family_of(cfg: dict[str, Any]) -> Family:
    """The family a Hugging Face ``config.json`` (as a dict) belongs to."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    for fam in FAMILIES:
        known = (fam.architecture, *fam.base_architectures)
        if model_type in (fam.model_type, None) and (
            any(a in known for a in archs) or (model_type and not archs)
        ):
            return fam
    what = f"model_type {model_type!r}" if model_type else "no model_type"
    raise GptkitError(
        f"gptkit cannot load a Hugging Face {what} with architectures {archs}; "
        f"supported: {_supported()}"
    )


# -- configs -------------------------------------------------------------------------------


def _rope_theta(cfg: dict[str, Any]) -> float:
    """RoPE base from a transformers 4 (``rope_theta``, ``rope_scaling``) or 5
    (``rope_parameters``) config; scaled variants are refused."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise GptkitError(f"rope parameters {params!r} are not supported (one global RoPE only)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise GptkitError(
            f"RoPE scaling {kind!r} is not implemented in gptkit; supported: plain RoPE "
            "(rope_type 'default') with any rope_theta"
        )
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise GptkitError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _llama_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    n_head, C = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim")
    if cfg["hidden_act"] != "silu":
        raise GptkitError(f"hidden_act {cfg['hidden_act']!r} is not supported; Llama uses 'silu'")
    if bool(cfg["attention_bias"]) != bool(cfg["mlp_bias"]):
        raise GptkitError(
            f"attention_bias={cfg['attention_bias']} with mlp_bias={cfg['mlp_bias']} is not "
            "supported; gptkit's bias switch covers attention and MLP together"
        )
    n_kv = cfg.get("num_key_value_heads") or n_head
    return dict(
        n_kv_head=n_kv if n_kv != n_head else None,
        # a pruned Llama's heads keep their width while n_head shrinks
        head_dim=head_dim if head_dim not in (None, C // n_head) else None,
        mlp_hidden=cfg["intermediate_size"],
        rope_theta=_rope_theta(cfg),
        bias=bool(cfg["attention_bias"]),
    )


def _gpt2_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    for key, ok in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if cfg.get(key, ok) != ok:
            raise GptkitError(f"GPT-2 with {key}={cfg[key]} is not supported (only {key}={ok})")
    return {}


_FROM_HF_EXTRA: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "gpt2": _gpt2_from_hf,
    "llama": _llama_from_hf,
}


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Our :class:`ModelConfig` for a Hugging Face ``config.json`` (as a dict).

    Raises GptkitError for architectures and options gptkit does not implement, naming what
    it supports.
    """
    fam = family_of(cfg)
    cfg = fam.defaults | {k: v for k, v in cfg.items() if v is not None}
    try:
        out: dict[str, Any] = dict(fam.fixed)
        out.update({ours: cfg[theirs] for ours, theirs in fam.fields})
        if fam.activation is not None:
            key, names = fam.activation
            if cfg[key] not in names:
                raise GptkitError(
                    f"{fam.architecture} with {key}={cfg[key]!r} is not supported; "
                    f"supported: {sorted(names)}"
                )
            out["mlp"] = names[cfg[key]]
        out.update(_FROM_HF_EXTRA.get(fam.model_type, lambda c: {})(cfg))
    except KeyError as e:
        raise GptkitError(f"{fam.model_type} config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise GptkitError(
            f"{fam.model_type} config.json holds a value of the wrong type or size ({e})"
        ) from None
    if not isinstance(out["dropout"], int | float | None):
        raise GptkitError(f"{fam.model_type} config.json: dropout {out['dropout']!r} is no number")
    out["dropout"] = float(out["dropout"] or 0.0)
    return checked_config(out, f"{fam.model_type} config.json")


def _mismatch(fam: Family, config: ModelConfig) -> list[str]:
    """Why ``config`` is not a model of ``fam`` (empty when it is)."""
    why = [
        f"{k}={getattr(config, k)!r} (needs {v!r})"
        for k, v in fam.fixed.items()
        # A bias-free GPT exports with zero biases: the same function.
        if getattr(config, k) != v and k != "bias"
    ]
    if fam.activation is not None and config.mlp not in fam.activation[1].values():
        why.append(f"mlp={config.mlp!r} (needs one of {sorted(set(fam.activation[1].values()))})")
    if fam is not LLAMA and config.head_size * config.n_head != config.n_embd:
        why.append(f"head_dim={config.head_dim} (needs n_embd / n_head)")
    if fam is OPENAI_GPT and config.hidden_size != 4 * config.n_embd:
        why.append(f"mlp_hidden={config.hidden_size} (needs 4 * n_embd)")
    return why


def export_family(config: ModelConfig) -> Family:
    """The Hugging Face family ``config`` exports as, or a GptkitError saying why none fits."""
    reasons = []
    for fam in FAMILIES:
        why = _mismatch(fam, config)
        if not why:
            return fam
        reasons.append(f"{fam.architecture}: {', '.join(why)}")
    raise GptkitError(
        "this model has no Hugging Face twin, so it cannot be exported (" + "; ".join(reasons) + ")"
    )


def config_to_hf(config: ModelConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """The ``config.json`` dict transformers builds ``config``'s twin from."""
    fam = export_family(config)
    out: dict[str, Any] = {"architectures": [fam.architecture], "model_type": fam.model_type}
    out.update({theirs: getattr(config, ours) for ours, theirs in fam.fields})
    if fam.activation is not None:
        key, names = fam.activation
        out[key] = next(theirs for theirs, ours in names.items() if ours == config.mlp)
    if fam.model_type in ("gpt2", "openai-gpt"):
        out.update(embd_pdrop=config.dropout, attn_pdrop=config.dropout)
    if fam is LLAMA:
        out.update(
            num_key_value_heads=config.kv_heads,
            intermediate_size=config.hidden_size,
            head_dim=config.head_size,
            hidden_act="silu",
            attention_bias=config.bias,
            mlp_bias=config.bias,
            # transformers 4 reads rope_theta, 5 reads rope_parameters.
            rope_theta=config.rope_theta,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        )
    out["bos_token_id"] = tokenizer.bos_id if tokenizer is not None else None
    out["eos_token_id"] = tokenizer.eos_id if tokenizer is not None else None
    return out


# -- weights -------------------------------------------------------------------------------


def _rows(table: WeightMap, n_layer: int) -> Iterator[tuple[str, tuple[str, ...], Transform]]:
    """The table with ``{i}`` expanded for every layer."""
    for ours, theirs, transform in table:
        names = (theirs,) if isinstance(theirs, str) else theirs
        for i in range(n_layer) if "{i}" in ours else (0,):
            yield ours.format(i=i), tuple(n.format(i=i) for n in names), transform


def _our_names(config: ModelConfig) -> set[str]:
    with torch.device("meta"):
        names = set(GPT(config).state_dict())
    if config.tie_embeddings:
        names.discard("lm_head.weight")
    return names


def from_hf(
    state: dict[str, Tensor], fam: Family, config: ModelConfig, origin: str = "the checkpoint"
) -> dict[str, Tensor]:
    """Our state dict from a Hugging Face one, read through ``fam``'s table.

    A tied head stored anyway and non-weight buffers are dropped; every other name must be
    used, and every weight our model has must be there.
    """
    if not any(k.startswith(fam.prefix) for k in state):  # a saved base model: no prefix
        state = {k if k.startswith("lm_head.") else fam.prefix + k: v for k, v in state.items()}
    wanted = _our_names(config)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for ours, theirs, transform in _rows(fam.weights, config.n_layer):
        if ours not in wanted:
            continue
        absent = [n for n in theirs if n not in state]
        if absent:
            missing += absent
            continue
        try:
            out[ours] = transform.to_ours([state[n] for n in theirs], config)
        except RuntimeError as e:
            raise GptkitError(
                f"{origin}: cannot {transform.name} {list(theirs)} into {ours} ({e}); "
                "config.json and the weights come from different models"
            ) from None
        used.update(theirs)
    buffers = [re.compile(p) for p in fam.buffers]
    unexpected = sorted(
        k
        for k in state
        if k not in used
        and not any(b.fullmatch(k) for b in buffers)
        and not (k == "lm_head.weight" and config.tie_embeddings)
    )
    if missing or unexpected:
        parts = ([f"missing {missing[:3]}"] if missing else []) + (
            [f"unexpected {unexpected[:3]}"] if unexpected else []
        )
        raise GptkitError(
            f"weights in {origin} do not match a {fam.architecture} with this config.json "
            f"({'; '.join(parts)})"
        )
    return out


def _with_zero_biases(model: GPT) -> dict[str, Tensor]:
    """Our state with zero biases wherever the model has none (GPT-1/2 always carry biases)."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | Norm) and module.bias is None and name != "lm_head":
            w = module.weight
            state[f"{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return state


def to_hf(model: GPT, fam: Family | None = None) -> dict[str, Tensor]:
    """The Hugging Face state dict of ``model`` by its family's table (contiguous CPU tensors
    that share no memory, ready for safetensors)."""
    config = model.config
    fam = fam or export_family(config)
    state = dict(model.state_dict())
    if fam.fixed.get("bias") and not config.bias:  # "zero biases": the same function
        state, config = _with_zero_biases(model), config.replace(bias=True)
    out: dict[str, Tensor] = {}
    for ours, theirs, transform in _rows(fam.weights, config.n_layer):
        if ours not in state or (ours == "lm_head.weight" and config.tie_embeddings):
            continue
        for name, tensor in zip(theirs, transform.to_hf(state[ours], config), strict=True):
            out[name] = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return out


# -- directories -----------------------------------------------------------------------------

CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
#: how to get a model when a source cannot be found (said by every such error)
GET_A_MODEL = "get one with `make models` (SmolLM2-135M-Instruct into models/) or pass a path"
#: what ``hub_snapshot`` downloads: config, safetensors weights, tokenizer files
HUB_FILES = [
    CONFIG,
    "generation_config.json",
    "model*.safetensors",
    SAFETENSORS_INDEX,
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GptkitError(f"cannot read {path} ({e}); a Hugging Face model needs it") from None
    if not isinstance(cfg, dict):
        raise GptkitError(f"{path} is not a JSON object")
    return cfg


def is_hf_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose ``config.json`` is a Hugging Face model config
    (supported or not: loading then says which architectures gptkit runs)."""
    p = Path(path)
    try:
        cfg = json.loads((p / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(cfg, dict)
        and "format" not in cfg  # gptkit's own config.json
        and ("model_type" in cfg or "architectures" in cfg)
    )


def _gist(e: Exception) -> str:
    """The cause in one short line, from torch's many-line load errors."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    for n, line in enumerate(lines):
        if marker in line:
            rest = line.split(marker, 1)[1].strip() or " ".join(lines[n + 1 : n + 2])
            return rest.split(". ")[0]
    return lines[0].split(". ")[0] if lines else type(e).__name__


def _read_file(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as e:
        raise GptkitError(
            f"{path} is truncated or corrupted ({_gist(e)}); download it again"
        ) from None
    except pickle.UnpicklingError as e:
        # weights_only=True: a pickle that would run code is refused, never executed.
        raise GptkitError(
            f"torch.load(weights_only=True) refused {path}: it is damaged or holds Python "
            f"objects besides tensors ({_gist(e)}); use the checkpoint's model.safetensors"
        ) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise GptkitError(f"{path} is not a state dict of tensors")
    return state


def _shard_files(d: Path, index: str) -> list[Path]:
    """The shard files an index names, each confined to ``d``: a name that resolves outside
    the directory (``../``, an absolute path, a symlink out) is refused, never read."""
    try:
        weight_map = json.loads((d / index).read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise GptkitError(f"{d / index} is not a shard index ({e})") from None
    root, out = d.resolve(), []
    for name in names:
        if not isinstance(name, str) or not name:
            raise GptkitError(f"{d / index} lists a shard name {name!r} that is not a file name")
        path = (d / name).resolve()
        if not path.is_relative_to(root):
            raise GptkitError(
                f"{d / index} lists {name!r}, which is outside {d}; refusing to read it"
            )
        if not path.is_file():
            raise GptkitError(f"{d / index} lists {name}, which is missing")
        out.append(path)
    return out


def read_hf_weights(directory: str | Path) -> dict[str, Tensor]:
    """All tensors of a Hugging Face directory: one file, or shards named by an index."""
    d = Path(directory)
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PICKLE, PICKLE_INDEX)):
        if (d / single).is_file():
            return _read_file(d / single)
        if (d / index).is_file():
            state: dict[str, Tensor] = {}
            for shard in _shard_files(d, index):
                state.update(_read_file(shard))
            return state
    raise GptkitError(
        f"{d} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} with its shards, "
        f"or {PICKLE}"
    )


def _adds_bos(tokenizer_json: Path, bos: str) -> bool:
    """Whether tokenizer.json's post-processor puts ``bos`` first (how transformers 5 and
    Llama 3 declare it, instead of ``add_bos_token``)."""
    try:
        proc = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("post_processor")
    except (OSError, ValueError):
        return False
    procs = (proc or {}).get("processors", [proc]) if isinstance(proc, dict) else []
    for p in procs:
        if isinstance(p, dict) and p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0]
            return isinstance(first, dict) and first.get("SpecialToken", {}).get("id") == bos
    return False


def load_hf_dir(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer | None]:
    """``model, tokenizer`` from a Hugging Face model directory (GPT-2, OpenAI GPT, Llama).

    Args:
        path: the directory (``config.json``, weights, tokenizer files).
        device: where the model's (fp32) weights go.

    Returns:
        The model in eval mode and the tokenizer; the tokenizer is None, with a warning, when
        the directory has no ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise GptkitError(f"{directory} is not a directory")
    hf_cfg = _read_config(directory)
    fam = family_of(hf_cfg)
    config = config_from_hf(hf_cfg)
    origin = str(directory)
    state = from_hf(read_hf_weights(directory), fam, config, origin)
    refuse_non_finite(state, origin)
    model = model_from_state(config, state, device, origin)
    tokenizer = None
    if _find_tokenizer(directory) is not None:
        tokenizer = load_tokenizer(directory)
        tok_json, template = directory / "tokenizer.json", directory / "chat_template.jinja"
        bos = tokenizer.bos_token
        if bos and not tokenizer.add_bos and tok_json.is_file() and _adds_bos(tok_json, bos):
            tokenizer.add_bos = True
        if tokenizer.chat_template is None and template.is_file():  # transformers 5 puts it here
            tokenizer.chat_template = template.read_text(encoding="utf-8")
    else:
        warnings.warn(
            f"{directory} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
            "tokenizer is None",
            stacklevel=2,
        )
    return model.eval(), tokenizer


def _char_tokenizer_json(tok: CharTokenizer) -> str:
    """A character tokenizer as a ``tokenizers`` pipeline: one token per character."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {c: i for i, c in enumerate(tok.chars)}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(list(tok.special_tokens))
    return hf.to_str()


def _save_tokenizer(tokenizer: Tokenizer, directory: Path, max_length: int) -> None:
    if isinstance(tokenizer, CharTokenizer):
        (directory / "tokenizer.json").write_text(_char_tokenizer_json(tokenizer))
        tokenizer._save_config(directory)
    elif isinstance(tokenizer, BPETokenizer):
        tokenizer.save(directory)
    else:
        raise GptkitError(f"cannot export a {type(tokenizer).__name__} as a Hugging Face tokenizer")
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    unk = json.loads((directory / "tokenizer.json").read_text())["model"].get("unk_token")
    # The generic fast tokenizer runs tokenizer.json exactly as written, in transformers 4 and 5.
    cfg.update(
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    if unk is not None:
        cfg["unk_token"] = unk
    specials = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token") if cfg.get(k)}
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def save_hf(model: GPT, tokenizer: Tokenizer | None, out_dir: str | Path) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face directory that
    ``AutoModelForCausalLM`` and ``AutoTokenizer`` load.

    Args:
        model: a GPT whose config matches GPT-2, OpenAI GPT or Llama (else GptkitError, naming
            the switches that do not fit).
        tokenizer: written as tokenizer.json + tokenizer_config.json, or None.
        out_dir: built under a temporary name, then renamed into place (an existing export
            there is replaced; any other non-empty directory is refused).

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_hf_dir(out))):
        raise GptkitError(
            f"{out} exists and is not a Hugging Face model directory; export into a new or "
            "empty directory"
        )
    require_float(model, "a Hugging Face directory")
    fam = export_family(model.config)
    hf_config = config_to_hf(model.config, tokenizer)
    hf_config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    state = to_hf(model, fam)
    with atomic_dir(out) as tmp:
        (tmp / CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(state, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp, model.config.block_size)
    return out


def hub_snapshot(repo_id: str, revision: str | None = None, local_only: bool = False) -> Path:
    """Download a model from the Hugging Face hub (config, safetensors and tokenizer files
    only) and return its local directory; files already in the cache are not fetched again.

    Args:
        repo_id: e.g. ``"openai-community/gpt2"``.
        revision: a branch, tag or commit; None is the default branch.
        local_only: look in the hub cache only, never the network.

    Raises:
        GptkitError: in one line, when huggingface_hub is missing, the machine is offline
            (and the cache lacks the model), or the download fails.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise GptkitError(
            f"{repo_id!r} is not a local path, and downloading it from the Hugging Face hub "
            "needs huggingface_hub: pip install huggingface_hub (or pip install 'gptkit[hub]'); "
            f"or {GET_A_MODEL}"
        ) from None
    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=local_only
        )
    except LocalEntryNotFoundError:  # what the hub raises when it cannot be reached
        offline = "" if local_only else ", and the hub cannot be reached (offline)"
        raise GptkitError(
            f"{repo_id!r} is not in the Hugging Face cache{offline}; {GET_A_MODEL}"
        ) from None
    except Exception as e:  # unknown repo, gated repo, a failed transfer: said plainly
        raise GptkitError(
            f"{repo_id!r} is not a local path, and downloading it from the Hugging Face hub "
            f"failed ({type(e).__name__}: {_gist(e)}); check the path, the hub id and the network"
        ) from None
    return Path(path)
