"""GGUF in and out: llama.cpp's single-file format (metadata, tokenizer and tensors, quantized
or not).

``read_gguf`` reads the ``llama`` and ``gpt2`` architectures through gguf-py's ``GGUFReader``,
dequantizes every tensor to fp32 and names the type the file stores its matrices in; by
default ``gptkit.load`` quantizes them back to that type's counterpart in
:mod:`gptkit.model.quant` (:data:`KEPT_AS`). ``load_gguf`` gives the fp32 model alone.
``save_gguf`` writes models with ``GGUFWriter`` under llama.cpp's metadata keys and tensor
names, so llama.cpp runs the file.

References: the GGUF specification (ggml ``docs/gguf.md``); llama.cpp
``convert_hf_to_gguf.py`` (tensor names, the q/k row permutation) and ``src/llama-model.cpp``
(which tensors each architecture needs); gguf-py (reader, writer, block quantizers).

Each architecture is a declarative table of :class:`Rule` rows: a llama.cpp tensor name, the
gptkit parameter it fills, and at most two named transforms, ``part`` (a slice of a fused
gptkit matrix: q/k/v of ``attn.qkv``, gate/up of ``mlp.fc``) and ``rope``. The same table
serves both directions.

RoPE layout. gptkit rotates the pairs (j, j + hs/2) of each head (Hugging Face's
"rotate_half"); llama.cpp rotates adjacent pairs (2j, 2j + 1). So q and k rows are stored
permuted within each head::

    gptkit, one head:   r0  r1  ... r31 | r32 r33 ... r63
    GGUF,   one head:   r0  r32 r1  r33 ... r31 r63
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    Keys,
    LlamaFileType,
)
from gguf.quants import dequantize, quantize

from gptkit.checkpoint.native import checked_config, model_from_state, refuse_non_finite
from gptkit.checkpoint.quantized import require_float
from gptkit.config import ModelConfig
from gptkit.errors import GptkitError
from gptkit.files import atomic_path
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer
from gptkit.tokenizer.bpe import BPETokenizer
from gptkit.tokenizer.vocab import GGUFVocab, from_vocab, to_vocab

__all__ = ["ARCHITECTURES", "DTYPES", "KEPT_AS", "GGUFModel", "load_gguf", "read_gguf", "save_gguf"]

Q = GGMLQuantizationType
#: tensor types gptkit dequantizes on load (all through gguf-py's numpy dequantizers)
LOADABLE = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)  # fmt: skip
#: the quantization mode (gptkit.model.quant) that holds each stored type of a file's block
#: matrices without losing what it stores, or the least that can: 2 to 4 bits -> int4
#: (group 32: Q4_1 and Q4_K blocks land on their own grid, see quant.py), 5 to 8 bits ->
#: int8, 16-bit floats -> bf16, F32 -> None (fp32). ``gptkit.load``'s default.
KEPT_AS: dict[str, str | None] = {
    "F32": None, "F16": "bf16", "BF16": "bf16",
    "Q8_0": "int8", "Q6_K": "int8", "Q5_0": "int8", "Q5_1": "int8", "Q5_K": "int8",
    "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q3_K": "int4", "Q2_K": "int4",
}  # fmt: skip
#: save_gguf dtype -> llama.cpp's file type
DTYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
          "q8_0": LlamaFileType.MOSTLY_Q8_0}  # fmt: skip
MAGIC = b"GGUF"


# -- the tables -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One tensor: ``gguf`` (llama.cpp name) <-> ``ours`` (gptkit name); ``{i}`` is the block.

    Args:
        part: the slice of a fused gptkit matrix this tensor is (a key of ``_PART_ROWS``).
        rope: rows are permuted between rotate-half and interleaved pairs (q and k).
        when: the tensor exists only for configs with this property (a key of ``_WHEN``).
    """

    gguf: str
    ours: str
    part: str | None = None
    rope: bool = False
    when: str | None = None


#: rows of each part of a fused gptkit matrix, in their order within it
_PART_ROWS: dict[str, Callable[[ModelConfig], int]] = {
    "q": lambda c: c.n_head * c.head_size,
    "k": lambda c: c.kv_heads * c.head_size,
    "v": lambda c: c.kv_heads * c.head_size,
    "gate": lambda c: c.hidden_size,
    "up": lambda c: c.hidden_size,
}
_FUSED = {"attn.qkv": ("q", "k", "v"), "mlp.fc": ("gate", "up")}
_ROPE_HEADS: dict[str, Callable[[ModelConfig], int]] = {
    "q": lambda c: c.n_head,
    "k": lambda c: c.kv_heads,
}
_WHEN: dict[str, Callable[[ModelConfig], bool]] = {
    "bias": lambda c: c.bias,
    "untied": lambda c: not c.tie_embeddings,
}

LLAMA_TENSORS = (
    Rule("token_embd.weight", "wte.weight"),
    Rule("output_norm.weight", "norm_f.weight"),
    Rule("output.weight", "lm_head.weight", when="untied"),
    Rule("blk.{i}.attn_norm.weight", "blocks.{i}.norm_1.weight"),
    Rule("blk.{i}.attn_q.weight", "blocks.{i}.attn.qkv.weight", part="q", rope=True),
    Rule("blk.{i}.attn_k.weight", "blocks.{i}.attn.qkv.weight", part="k", rope=True),
    Rule("blk.{i}.attn_v.weight", "blocks.{i}.attn.qkv.weight", part="v"),
    Rule("blk.{i}.attn_q.bias", "blocks.{i}.attn.qkv.bias", part="q", rope=True, when="bias"),
    Rule("blk.{i}.attn_k.bias", "blocks.{i}.attn.qkv.bias", part="k", rope=True, when="bias"),
    Rule("blk.{i}.attn_v.bias", "blocks.{i}.attn.qkv.bias", part="v", when="bias"),
    Rule("blk.{i}.attn_output.weight", "blocks.{i}.attn.proj.weight"),
    Rule("blk.{i}.attn_output.bias", "blocks.{i}.attn.proj.bias", when="bias"),
    Rule("blk.{i}.ffn_norm.weight", "blocks.{i}.norm_2.weight"),
    Rule("blk.{i}.ffn_gate.weight", "blocks.{i}.mlp.fc.weight", part="gate"),
    Rule("blk.{i}.ffn_up.weight", "blocks.{i}.mlp.fc.weight", part="up"),
    Rule("blk.{i}.ffn_gate.bias", "blocks.{i}.mlp.fc.bias", part="gate", when="bias"),
    Rule("blk.{i}.ffn_up.bias", "blocks.{i}.mlp.fc.bias", part="up", when="bias"),
    Rule("blk.{i}.ffn_down.weight", "blocks.{i}.mlp.proj.weight"),
    Rule("blk.{i}.ffn_down.bias", "blocks.{i}.mlp.proj.bias", when="bias"),
)

# GPT-2's fused attention matrix is stored whole, rows [q; k; v] like gptkit's.
GPT2_TENSORS = (
    Rule("token_embd.weight", "wte.weight"),
    Rule("position_embd.weight", "wpe.weight"),
    Rule("output_norm.weight", "norm_f.weight"),
    Rule("output_norm.bias", "norm_f.bias"),
    Rule("output.weight", "lm_head.weight", when="untied"),
    Rule("blk.{i}.attn_norm.weight", "blocks.{i}.norm_1.weight"),
    Rule("blk.{i}.attn_norm.bias", "blocks.{i}.norm_1.bias"),
    Rule("blk.{i}.attn_qkv.weight", "blocks.{i}.attn.qkv.weight"),
    Rule("blk.{i}.attn_qkv.bias", "blocks.{i}.attn.qkv.bias"),
    Rule("blk.{i}.attn_output.weight", "blocks.{i}.attn.proj.weight"),
    Rule("blk.{i}.attn_output.bias", "blocks.{i}.attn.proj.bias"),
    Rule("blk.{i}.ffn_norm.weight", "blocks.{i}.norm_2.weight"),
    Rule("blk.{i}.ffn_norm.bias", "blocks.{i}.norm_2.bias"),
    Rule("blk.{i}.ffn_up.weight", "blocks.{i}.mlp.fc.weight"),
    Rule("blk.{i}.ffn_up.bias", "blocks.{i}.mlp.fc.bias"),
    Rule("blk.{i}.ffn_down.weight", "blocks.{i}.mlp.proj.weight"),
    Rule("blk.{i}.ffn_down.bias", "blocks.{i}.mlp.proj.bias"),
)


@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture as gptkit switches, metadata keys and tensors.

    ``bias`` True: the architecture always has biases (written as zeros for a bias-free
    model); None: read from the file (any ``blk.*.bias`` tensor).
    """

    switches: dict[str, Any]  # ModelConfig fields the architecture fixes
    hparams: dict[str, str]  # ModelConfig field -> metadata key template ({arch})
    tensors: tuple[Rule, ...]
    bias: bool | None = None


_COMMON_HPARAMS = {
    "block_size": Keys.LLM.CONTEXT_LENGTH,
    "n_embd": Keys.LLM.EMBEDDING_LENGTH,
    "n_layer": Keys.LLM.BLOCK_COUNT,
    "mlp_hidden": Keys.LLM.FEED_FORWARD_LENGTH,
    "n_head": Keys.Attention.HEAD_COUNT,
}
_REQUIRED = ("block_size", "n_embd", "n_layer", "n_head")

ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch(
        switches=dict(
            norm="rmsnorm",
            pos_emb="rope",
            mlp="swiglu",
            norm_position="pre",
            attention_pattern="dense",
        ),
        hparams=_COMMON_HPARAMS
        | {
            "n_kv_head": Keys.Attention.HEAD_COUNT_KV,
            "norm_eps": Keys.Attention.LAYERNORM_RMS_EPS,
            "rope_theta": Keys.Rope.FREQ_BASE,
        },
        tensors=LLAMA_TENSORS,
    ),
    "gpt2": Arch(
        switches=dict(
            norm="layernorm",
            pos_emb="learned",
            mlp="gelu_tanh",
            norm_position="pre",
            attention_pattern="dense",
        ),
        hparams=_COMMON_HPARAMS | {"norm_eps": Keys.Attention.LAYERNORM_EPS},
        tensors=GPT2_TENSORS,
        bias=True,
    ),
}


def _rules(arch: Arch, config: ModelConfig) -> list[Rule]:
    """The table with ``{i}`` expanded over the blocks and absent tensors dropped."""
    out = []
    for rule in arch.tensors:
        if rule.when is not None and not _WHEN[rule.when](config):
            continue
        if "{i}" not in rule.gguf:
            out.append(rule)
            continue
        out += [
            replace(rule, gguf=rule.gguf.format(i=i), ours=rule.ours.format(i=i))
            for i in range(config.n_layer)
        ]
    return out


def _fused_key(ours: str) -> tuple[str, ...]:
    return next(parts for key, parts in _FUSED.items() if f".{key}." in f".{ours}")


def _part_slice(config: ModelConfig, ours: str, part: str) -> slice:
    start = 0
    for p in _fused_key(ours):
        rows = _PART_ROWS[p](config)
        if p == part:
            return slice(start, start + rows)
        start += rows
    raise AssertionError(f"{part} is not a part of {ours}")


def _to_rotate_half(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved q/k rows -> gptkit's rotate-half rows (per head)."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, hs // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _to_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """gptkit's rotate-half q/k rows -> llama.cpp's interleaved rows (per head)."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, 2, hs // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# -- reading ----------------------------------------------------------------------------


# The fewest bytes one metadata key/value and one tensor description can take: a count
# larger than what is left of the file divided by these is a lie, refused before a loop.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, 1 dim, type, offset
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Reader(GGUFReader):
    """gguf-py's reader, made safe for hostile files and with its hot spot off ``np.memmap``.

    Safety: every read is checked against the file's end, and every count (keys, tensors,
    array items) against the bytes left, before the reader loops over it; gguf-py trusts
    them, so an array count of 2⁴⁰ made it loop for hours.

    Speed: the reader slices its memory map twice per metadata string, and slicing a memmap
    runs Python code (``memmap.__array_finalize__``) each time; a vocabulary of ~50k tokens
    and ~50k merges makes that 2.5 s for SmolLM2. The same slices of a plain ndarray view of
    the map cost 0.7 s; values and tensor data are unchanged (tests compare with GGUFReader).
    """

    def _get(
        self, offset: int, dtype: Any, count: int = 1, override_order: Any = None
    ) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        dtype, count = np.dtype(dtype), int(count)
        if offset < 0 or count < 0 or offset + dtype.itemsize * count > len(plain):
            raise ValueError(
                f"a read of {count} x {dtype.itemsize} bytes at offset {offset} runs past the "
                f"end of the file ({len(plain)} bytes)"
            )
        arr = plain[offset : offset + dtype.itemsize * count].view(dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))

    def _left(self, offset: int) -> int:
        return len(self.data) - offset

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
        if raw_type == GGUFValueType.ARRAY:
            item_type = int(self._get(orig_offs, np.uint32)[0])
            count = int(self._get(orig_offs + 4, np.uint64)[0])
            scalar = self.gguf_scalar_to_np.get(GGUFValueType(item_type))
            least = np.dtype(scalar).itemsize if scalar is not None else 8  # string: its length
            if count * least > self._left(orig_offs + 12):
                raise ValueError(f"an array of {count} items does not fit in the file")
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_fields(self, offs: int, count: int) -> int:
        if int(count) * _MIN_KV_BYTES > self._left(offs):
            raise ValueError(f"{int(count)} metadata keys do not fit in the file")
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs: int, count: int) -> Any:
        if int(count) * _MIN_TENSOR_INFO_BYTES > self._left(offs):
            raise ValueError(f"{int(count)} tensor descriptions do not fit in the file")
        return super()._build_tensor_info(offs, count)


def _check_layout(reader: GGUFReader, origin: str) -> None:
    """The tensors' data as llama.cpp's ``gguf_init_from_file`` requires it: each at most 4-D
    with whole quantization blocks per row, its byte size type x shape, and the tensors packed
    in order, each at the aligned end of the one before, inside the file. A flipped type or
    an offset into another tensor breaks the chain and is refused here."""
    expected, end = 0, 0
    for t in reader.tensors:
        dims = [int(d) for d in t.field.parts[3]]
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        if not 1 <= len(dims) <= _MAX_DIMS or min(dims) < 1 or dims[0] % block:
            raise GptkitError(
                f"{origin}: tensor {t.name} has shape {dims}, which is not a valid "
                f"{t.tensor_type.name} tensor; the file is corrupted"
            )
        n_bytes = math.prod(dims) // block * type_size
        offset = int(t.field.parts[5][0])
        if offset != expected:
            raise GptkitError(
                f"{origin}: tensor {t.name} starts at data offset {offset}, expected {expected} "
                f"(tensors must be packed in order, {reader.alignment}-byte aligned, without "
                "overlap); the file is corrupted"
            )
        end = reader.data_offset + offset + n_bytes
        if end > len(reader.data):
            raise GptkitError(
                f"{origin}: tensor {t.name} ends at byte {end}, past the end of the file "
                f"({len(reader.data)} bytes); the file is truncated"
            )
        expected = offset + -(-n_bytes // reader.alignment) * reader.alignment
    if end and len(reader.data) > reader.data_offset + expected:
        raise GptkitError(
            f"{origin}: {len(reader.data) - reader.data_offset - expected} bytes follow the "
            "last tensor; a tensor's type or shape does not match its data (corrupted file)"
        )


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise GptkitError(f"GGUF file {path} does not exist; check the path")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise GptkitError(
            f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r}); "
            "pass a .gguf file written by llama.cpp, gguf-py or gptkit"
        )
    try:
        reader = _Reader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise GptkitError(
            f"{path} is truncated or corrupted ({e}); download or export it again"
        ) from None
    reader.origin = str(path)  # for messages
    _check_layout(reader, str(path))
    return reader


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except (UnicodeDecodeError, IndexError, ValueError) as e:
        origin = getattr(reader, "origin", "the GGUF file")
        raise GptkitError(
            f"{origin}: metadata {key} is unreadable ({e}); it is corrupted"
        ) from None


def _float(value: float) -> float:
    # Metadata floats are float32; take the shortest decimal that is the same float32
    # (1e-05 rather than 9.999999747378752e-06), so configs round-trip equal.
    return float(str(np.float32(value)))


def _read_config(
    reader: GGUFReader, name: str, arch: Arch, tensors: dict[str, Any], origin: str
) -> ModelConfig:
    values: dict[str, Any] = {}
    for field, template in arch.hparams.items():
        value = _field(reader, template.format(arch=name))
        if value is None and field in _REQUIRED:
            raise GptkitError(
                f"{origin} has no {template.format(arch=name)} metadata; it is not a complete "
                f"{name} GGUF"
            )
        if isinstance(value, list):
            raise GptkitError(
                f"{origin}: {template.format(arch=name)} holds one value per layer "
                f"({value[:4]}...); gptkit needs the same value for every layer"
            )
        if value is not None and not isinstance(value, int | float):
            raise GptkitError(
                f"{origin}: {template.format(arch=name)} is {value!r}, not a number; the file "
                "is corrupted"
            )
        if value is not None:
            values[field] = _float(value) if isinstance(value, float) else int(value)
    if "token_embd.weight" not in tensors:
        raise GptkitError(f"{origin} has no token_embd.weight tensor; it holds no model")
    embd_shape = [int(d) for d in reversed(tensors["token_embd.weight"].shape.tolist())]
    values["vocab_size"] = embd_shape[0]
    declared = _field(reader, Keys.LLM.VOCAB_SIZE.format(arch=name))
    if declared is not None and int(declared) != embd_shape[0]:
        raise GptkitError(
            f"{origin}: token_embd.weight has {embd_shape[0]} rows but {name}.vocab_size says "
            f"{declared}; the file is inconsistent"
        )
    n_embd, n_head = values["n_embd"], values["n_head"]
    if values.get("n_kv_head") == n_head:
        values["n_kv_head"] = None
    if values.get("mlp_hidden") == 4 * n_embd:
        values["mlp_hidden"] = None
    head_size = n_embd // n_head if n_head else 0
    for key in (Keys.Rope.DIMENSION_COUNT, Keys.Attention.KEY_LENGTH, Keys.Attention.VALUE_LENGTH):
        value = _field(reader, key.format(arch=name))
        if value is not None and int(value) != head_size:
            raise GptkitError(
                f"{origin}: {key.format(arch=name)} is {value} but n_embd / n_head is "
                f"{head_size}; gptkit supports full-width heads only"
            )
    scaling = _field(reader, Keys.Rope.SCALING_TYPE.format(arch=name))
    if scaling not in (None, "none"):
        raise GptkitError(f"{origin}: RoPE scaling {scaling!r} is not supported by gptkit")
    bias = arch.bias
    if bias is None:
        bias = any(t.startswith("blk.") and t.endswith(".bias") for t in tensors)
    config = checked_config(
        {**values, **arch.switches, "bias": bias, "tie_embeddings": "output.weight" not in tensors},
        origin,
    )
    blocks = {int(m.group(1)) for t in tensors if (m := re.match(r"blk\.(\d+)\.", t))}
    if blocks != set(range(config.n_layer)):
        raise GptkitError(
            f"{origin}: {Keys.LLM.BLOCK_COUNT.format(arch=name)} is {config.n_layer} but the "
            f"file holds tensors of {len(blocks)} blocks; the file is inconsistent"
        )
    return config


def _dequantize(tensor: Any) -> np.ndarray:
    if tensor.tensor_type == Q.F32:
        return np.array(tensor.data, dtype=np.float32)  # a copy: the reader's data is a mmap
    return dequantize(tensor.data, tensor.tensor_type)


def _read_state(
    model: GPT, arch: Arch, tensors: dict[str, Any], origin: str
) -> dict[str, torch.Tensor]:
    """The model's state dict from the file's tensors (``model`` gives the shapes)."""
    config = model.config
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rules = _rules(arch, config)
    unexpected = sorted(set(tensors) - {r.gguf for r in rules})
    missing = [r.gguf for r in rules if r.gguf not in tensors]
    if unexpected or missing:
        what = [f"unexpected {unexpected[:3]}"] if unexpected else []
        what += [f"missing {missing[:3]}"] if missing else []
        raise GptkitError(
            f"{origin}: the tensors do not fit gptkit's table for this architecture "
            f"({'; '.join(what)}); the model uses features gptkit does not have"
        )
    pieces: dict[str, dict[str | None, torch.Tensor]] = {}
    for rule in rules:
        t = tensors[rule.gguf]
        if t.tensor_type not in LOADABLE:
            raise GptkitError(
                f"{origin}: tensor {rule.gguf} has type {t.tensor_type.name}, which gptkit "
                f"cannot dequantize; supported types: {', '.join(q.name for q in LOADABLE)}"
            )
        want = shapes[rule.ours]
        if rule.part is not None:
            want = (_PART_ROWS[rule.part](config), *want[1:])
        have = tuple(int(d) for d in reversed(t.shape.tolist()))
        if have != want:
            raise GptkitError(
                f"{origin}: tensor {rule.gguf} has shape {have} but the metadata "
                f"(n_embd={config.n_embd}, n_head={config.n_head}, n_kv_head="
                f"{config.kv_heads}, ffn={config.hidden_size}) implies {want}; the file is "
                "inconsistent"
            )
        w = torch.from_numpy(_dequantize(t)).reshape(want)
        if rule.rope:
            w = _to_rotate_half(w, _ROPE_HEADS[rule.part](config))  # type: ignore[index]
        pieces.setdefault(rule.ours, {})[rule.part] = w
    state = {}
    for ours, parts in pieces.items():
        if None in parts:
            state[ours] = parts[None]
        else:
            state[ours] = torch.cat([parts[p] for p in _fused_key(ours)], dim=0)
    return state


def _read_tokenizer(reader: GGUFReader, origin: str) -> BPETokenizer | None:
    kind = _field(reader, Keys.Tokenizer.MODEL)
    if kind is None:
        return None
    if kind != "gpt2":
        extra = " (SentencePiece)" if kind == "llama" else ""
        raise GptkitError(
            f"{origin}: tokenizer model {kind!r}{extra} (tokenizer.ggml.model) is not "
            "supported; gptkit reads byte-level BPE ('gpt2') vocabularies"
        )
    keys = Keys.Tokenizer
    vocab = GGUFVocab(
        tokens=_field(reader, keys.LIST, []),
        merges=_field(reader, keys.MERGES, []),
        token_types=_field(reader, keys.TOKEN_TYPE, []),
        # Files converted before llama.cpp named pre-tokenizers (2024) lack the key; their
        # byte-level vocabularies split as GPT-2 does (transformers assumes the same).
        pre=_field(reader, keys.PRE, "gpt-2"),
        bos_id=_field(reader, keys.BOS_ID),
        eos_id=_field(reader, keys.EOS_ID),
        unk_id=_field(reader, keys.UNK_ID),
        pad_id=_field(reader, keys.PAD_ID),
        add_bos=_field(reader, keys.ADD_BOS),
        chat_template=_field(reader, keys.CHAT_TEMPLATE),
    )
    return from_vocab(vocab, origin)


class GGUFModel(NamedTuple):
    """What :func:`read_gguf` reads: the fp32 model, the tokenizer (None when the file has
    none), and ``weight_type``, the type most of the blocks' matrices are stored in (by
    element count; a name of :data:`KEPT_AS`, such as "Q4_1")."""

    model: GPT
    tokenizer: BPETokenizer | None
    weight_type: str


def _weight_type(tensors: dict[str, Any]) -> str:
    """The stored type of most of the blocks' matrices (a file may keep a few in another
    type, as Q4_K_M files keep some in Q6_K), by element count."""
    count: collections.Counter[str] = collections.Counter()
    for name, t in tensors.items():
        if name.startswith("blk.") and len(t.shape) == 2:
            count[t.tensor_type.name] += int(t.n_elements)
    return count.most_common(1)[0][0] if count else "F32"


def load_gguf(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPT, BPETokenizer | None]:
    """Model (eval mode, fp32) and tokenizer of a GGUF file (:func:`read_gguf` without the
    weight type); ``gptkit.load`` keeps a quantized file quantized instead."""
    model, tokenizer, _ = read_gguf(path, device)
    return model, tokenizer


def read_gguf(path: str | Path, device: str | torch.device = "cpu") -> GGUFModel:
    """Model (eval mode, fp32), tokenizer and weight type of a GGUF file.

    Args:
        path: a ``.gguf`` file of architecture ``llama`` or ``gpt2``; quantized tensors
            (Q8_0, Q4_0/1, Q5_0/1, K-quants) are dequantized to fp32.
        device: where the model's weights go.

    Returns:
        A :class:`GGUFModel`: ``(model, tokenizer, weight_type)``.
    """
    path = Path(path)
    reader = _open(path)
    origin = str(path)
    name = _field(reader, Keys.General.ARCHITECTURE)
    if name not in ARCHITECTURES:
        raise GptkitError(
            f"{origin}: architecture {name!r} is not supported; gptkit loads "
            f"{', '.join(ARCHITECTURES)} GGUF files"
        )
    arch = ARCHITECTURES[name]
    tensors = {t.name: t for t in reader.tensors}
    config = _read_config(reader, name, arch, tensors, origin)
    tokenizer = _read_tokenizer(reader, origin)
    with torch.device("meta"):
        model = GPT(config)
    state = _read_state(model, arch, tensors, origin)
    refuse_non_finite(state, origin)
    model = model_from_state(config, state, device, origin)
    return GGUFModel(model, tokenizer, _weight_type(tensors))


# -- writing ----------------------------------------------------------------------------


def _arch_for(config: ModelConfig) -> str:
    for name, arch in ARCHITECTURES.items():
        if all(getattr(config, k) == v for k, v in arch.switches.items()):
            return name
    needs = "; ".join(
        f"{name}: " + ", ".join(f"{k}={v}" for k, v in arch.switches.items())
        for name, arch in ARCHITECTURES.items()
    )
    have = ", ".join(f"{k}={getattr(config, k)}" for k in ARCHITECTURES["llama"].switches)
    raise GptkitError(f"this model ({have}) matches no GGUF architecture gptkit writes ({needs})")


def _export_state(model: GPT, arch: Arch) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model's weights as fp32 CPU tensors; zero biases where the architecture needs
    biases the model lacks."""
    config = model.config
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if arch.bias and not config.bias:
        config = config.replace(bias=True)
        with torch.device("meta"):
            ref = GPT(config).state_dict()
        state |= {k: torch.zeros(v.shape) for k, v in ref.items() if k not in state}
    return config, state


def _export_tensor(state: dict[str, torch.Tensor], rule: Rule, config: ModelConfig) -> np.ndarray:
    w = state[rule.ours]
    if rule.part is not None:
        w = w[_part_slice(config, rule.ours, rule.part)]
    if rule.rope:
        w = _to_interleaved(w, _ROPE_HEADS[rule.part](config))  # type: ignore[index]
    return w.contiguous().numpy()


def _encode(array: np.ndarray, dtype: str) -> tuple[np.ndarray, Q | None]:
    """The stored bytes of one tensor: norms, biases and f32 files stay fp32; q8_0 needs rows
    of whole 32-value blocks and falls back to f16 otherwise (as llama.cpp's converter)."""
    if array.ndim < 2 or dtype == "f32":
        return array.astype(np.float32, copy=False), None
    if dtype == "q8_0" and array.shape[-1] % 32 == 0:
        return quantize(array, Q.Q8_0), Q.Q8_0
    return array.astype(np.float16), None


def _write_vocab(writer: GGUFWriter, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for add, value in (
        (writer.add_bos_token_id, vocab.bos_id),
        (writer.add_eos_token_id, vocab.eos_id),
        (writer.add_unk_token_id, vocab.unk_id),
        (writer.add_pad_token_id, vocab.pad_id),
    ):
        if value is not None:
            add(value)
    writer.add_add_bos_token(bool(vocab.add_bos))
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def save_gguf(
    model: GPT, tokenizer: Tokenizer | None, path: str | Path, dtype: str = "f32"
) -> Path:
    """Write ``model`` (and its tokenizer) as a GGUF file llama.cpp can run, atomically.

    Args:
        model: a Llama-style (rmsnorm, rope, swiglu) or GPT-2-style (layernorm, learned
            positions, tanh-GELU) pre-norm model; it becomes architecture ``llama`` or ``gpt2``.
        tokenizer: a byte-level BPE tokenizer, or None to write weights only.
        path: the ``.gguf`` file to write.
        dtype: "f32", "f16" or "q8_0" for the matrices; norms and biases stay fp32.

    Returns:
        ``path``.
    """
    if dtype not in DTYPES:
        raise GptkitError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    require_float(model, "a GGUF file")
    path = Path(path)
    name = _arch_for(model.config)
    arch = ARCHITECTURES[name]
    config, state = _export_state(model, arch)
    vocab = to_vocab(tokenizer, config.vocab_size) if tokenizer is not None else None
    if vocab is not None and len(vocab.tokens) > config.vocab_size:
        raise GptkitError(
            f"the tokenizer has {len(vocab.tokens)} ids but the model only {config.vocab_size}; "
            "they do not belong together"
        )
    hparams = {
        **{f: getattr(config, f) for f in arch.hparams},
        "n_kv_head": config.kv_heads,
        "mlp_hidden": config.hidden_size,
    }
    with atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, name)
        try:
            writer.add_type("model")
            writer.add_name(path.stem)
            writer.add_file_type(DTYPES[dtype])
            if dtype == "q8_0":
                writer.add_quantization_version(GGML_QUANT_VERSION)
            writer.add_vocab_size(config.vocab_size)
            for field, template in arch.hparams.items():
                value, key = hparams[field], template.format(arch=name)
                if isinstance(value, float):
                    writer.add_float32(key, value)
                else:
                    writer.add_uint32(key, int(value))
            if config.pos_emb == "rope":
                writer.add_rope_dimension_count(config.head_size)
            if vocab is not None:
                _write_vocab(writer, vocab)
            for rule in _rules(arch, config):
                data, raw_dtype = _encode(_export_tensor(state, rule, config), dtype)
                writer.add_tensor(rule.gguf, data, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path
