"""The eager decoding step on a CPU: ``model.hidden(x, cache)`` for one new token per row, in
fewer, fused calls.

A decoding step of a small model is mostly set-up, not arithmetic. SmolLM2-135M int4 on 2
cores (AMD EPYC Zen 4): its matmuls take about 4 ms of a 14.7 ms step through the model's
modules; the rest goes to some 40 torch calls per layer (rotary embedding, cache writes,
dtype casts, masks, SDPA with repeated keys). Here a layer is its two norms, its four
products and two kernels of ``kernels/decode.cpp``: ``rope_store`` (q and k rotated, k and
v written into the cache) and ``masked_attention`` (the new tokens over the cache, grouped
heads read in place): 9.6 ms a step, the same numbers bit for bit. Where every product is
an int4 layer that ``int4_gemv`` serves (AVX2 without AVX-512), one call of the kernel
``int4_blocks`` runs all the blocks, the same kernels in the same order (SmolLM2 on an AMD
EPYC Zen 1: 15.0 ms a step layer by layer, 8.9 in one call). :func:`decode_hidden` is
tested against ``model.hidden`` for every family and layer kind it takes; it returns None
where it does not apply (training or autograd, more than one token per row, post-norm or
banded layers, forward hooks on the blocks, no compiled kernels), and the caller runs the
model.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gptkit.model.gpt import GPT, Block, Norm
from gptkit.model.kernels import decode_kernels
from gptkit.model.kv_cache import KVCache
from gptkit.model.quant import QuantLinear

#: quantized layers whose product reads bf16 rows and writes bf16 (``QuantLinear._matmul``)
BF16_IN = ("int4", "int8", "bf16")


class _Known(NamedTuple):
    """What :func:`applies` keeps of a model: the identity of its first and last blocks'
    layers when its plan was made (a model quantized, given LoRA adapters or merged
    afterwards gets new layers, and a new plan), its plan (see :func:`_plan`), the hook
    dicts of its blocks' modules and, for the "int4" plan, where each operand of
    ``int4_blocks`` is held (a module's own dict and key: read each step, so weights swapped
    for new tensors are seen)."""

    layers: tuple[int, ...]
    plan: str | None
    hooks: list[dict[int, Any]]
    operands: list[tuple[dict[str, Any], str]]


_plans: weakref.WeakKeyDictionary[GPT, _Known] = weakref.WeakKeyDictionary()


def _layers(model: GPT) -> tuple[int, ...]:
    first, last = model.blocks[0], model.blocks[-1]
    return tuple(
        id(m)
        for b in (first, last)
        for m in (b.attn, b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj, b.norm_1)  # type: ignore[union-attr]
    )


def _plan(model: GPT) -> str | None:
    """How this step computes the model's blocks: "bf16" (fp32 RMSNorms and SwiGLU around
    bf16-reading quantized layers without biases: the norms and the attention write bf16 for
    the products, the rounding the layers would do), "int4" (the same, all of them int4
    layers that ``int4_gemv`` serves: every block in one call of ``int4_blocks``), "modules"
    (the block's own modules around the two kernels), or None (post-norm or banded layers:
    not this step)."""
    c = model.config
    if c.norm_position != "pre" or any(b.local for b in model.blocks):  # type: ignore[union-attr]
        return None
    if model.wte.weight.dtype != torch.float32:
        return "modules"
    for block in model.blocks:
        linears = _linears(block)  # type: ignore[arg-type]
        norms = (block.norm_1, block.norm_2)  # type: ignore[union-attr]
        if not all(isinstance(n, Norm) and n.kind == "rmsnorm" for n in norms):
            return "modules"
        if any(n.weight.dtype != torch.float32 for n in norms) or block.mlp.kind != "swiglu":  # type: ignore[union-attr]
            return "modules"
        if not all(isinstance(m, QuantLinear) and m.mode in BF16_IN for m in linears):
            return "modules"
        if any(m.bias is not None for m in linears):
            return "modules"
    return "int4" if _int4_gemv_layers(model) else "bf16"


def _int4_gemv_layers(model: GPT) -> bool:
    """Whether every product of the blocks is an int4 layer ``int4_gemv`` serves (its tiles
    made: see ``quant.INT4_GEMV``), all with one group size and widths a multiple of eight,
    the norms one eps: the operands of the ``int4_blocks`` kernel."""
    layers = [m for b in model.blocks for m in _linears(b)]
    groups = {getattr(m, "group_size", None) for m in layers}
    eps = {n.eps for b in model.blocks for n in (b.norm_1, b.norm_2)}  # type: ignore[union-attr]
    tiles = all(m._buffers.get("gemv_tiles") is not None for m in layers)
    widths = all(m.out_features % 8 == 0 for m in layers)  # whole tiles: the kernel's widths
    return tiles and widths and len(groups) == 1 and len(eps) == 1


def _linears(block: Block) -> tuple[Any, Any, Any, Any]:
    return block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj  # type: ignore[union-attr]


def _hooked(hooks: list[dict[int, Any]]) -> bool:
    """Whether a forward hook watches a model's blocks or what they hold (inspection and
    pruning hook blocks and attention; ``hooks``: their modules' hook dicts, which
    registering a hook adds to), or every module: the step, which calls few of them, must
    stand aside."""
    from torch.nn.modules import module

    if module._global_forward_hooks or module._global_forward_pre_hooks:
        return True
    return any(hooks)


def _hook_dicts(model: GPT) -> list[dict[int, Any]]:
    modules = list(model.blocks.modules())
    return [m._forward_hooks for m in modules] + [m._forward_pre_hooks for m in modules]


def applies(model: GPT, idx: Tensor, cache: KVCache | None) -> tuple[Any, str] | None:
    """The compiled kernels and the plan where :func:`decode_hidden` applies, else None."""
    if cache is None or idx.dim() != 2 or idx.shape[1] != 1 or idx.device.type != "cpu":
        return None
    if model.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if cache.length + 1 > cache.max_len or not cache.k[0].is_contiguous():
        return None
    layers = _layers(model)
    known = _plans.get(model)
    if known is None or known.layers != layers:
        plan = _plan(model)
        operands = _operands(model) if plan == "int4" else []
        known = _plans[model] = _Known(layers, plan, _hook_dicts(model), operands)
    if known.plan is None or _hooked(known.hooks):
        return None
    kernels = decode_kernels()
    return (kernels, known.plan) if kernels is not None else None


def _operands(model: GPT) -> list[tuple[dict[str, Any], str]]:
    """Where ``int4_blocks``'s six operands a layer are held, in its order."""
    found: list[tuple[dict[str, Any], str]] = []
    for block in model.blocks:
        qkv, proj, fc, mlp_proj = _linears(block)  # type: ignore[arg-type]
        for norm, first, second in ((block.norm_1, qkv, proj), (block.norm_2, fc, mlp_proj)):
            found.append((norm._parameters, "weight"))  # type: ignore[union-attr]
            found += ((first._buffers, "gemv_tiles"), (second._buffers, "gemv_tiles"))
    return found


class _Step(NamedTuple):
    """What every layer of one step shares: rotary cos and sin (B, hs) (empty: none), each
    row's position (B,), the mask (B, 1, 1, S) and the compiled kernels."""

    rope: tuple[Tensor, Tensor]
    pos: Tensor
    mask: Tensor
    kernels: Any

    def attend(
        self,
        attn: Any,
        qkv: Tensor,
        kv: tuple[Tensor, Tensor],
        q_dtype: torch.dtype,
        dtype: torch.dtype,
    ) -> Tensor:
        """q, k, v from the projection's output qkv (B, 1, W), rotated in ``q_dtype`` (the
        dtype the model's projection hands on), k and v into the cache, and the attention
        (B, nh, 1, hs) in ``dtype``."""
        (k, v), pos = kv, self.pos  # the attention reads the caches up to the mask's length
        q = self.kernels.rope_store(qkv, *self.rope, k, v, pos, attn.nh, attn.nkv, q_dtype)
        return self.kernels.masked_attention(q, k, v, self.mask, dtype)


def _block(block: Block, x: Tensor, kv: tuple[Tensor, Tensor], step: _Step) -> Tensor:
    """One pre-norm block for x (B, 1, C): what ``block(x, rope, kv, pos, mask)`` computes,
    its norms, linears and MLP the block's own modules."""
    a = block.attn
    qkv = a.qkv(block.norm_1(x))
    y = step.attend(a, qkv.contiguous(), kv, qkv.dtype, qkv.dtype)  # (B, nh, 1, hs)
    x = x + a.proj(y.view(x.shape[0], 1, a.nh * a.hs))
    return x + block.mlp(block.norm_2(x))


def _bf16_block(block: Block, x: Tensor, kv: tuple[Tensor, Tensor], step: _Step) -> Tensor:
    """:func:`_block` for the "bf16" plan (see :func:`_plan`), x (B, C) fp32: each product
    reads bf16 rows written by the kernel before it (the norm, the attention) and its bf16
    result goes on as fp32, as the layers' forwards do, so the numbers are the same."""
    a, m, n1, n2, bf16 = block.attn, block.mlp, block.norm_1, block.norm_2, torch.bfloat16
    qkv = _product(a.qkv, step.kernels.rms_norm(x, n1.weight, n1.eps, bf16), step)  # (B, W)
    y = step.attend(a, qkv.unsqueeze(1).contiguous(), kv, x.dtype, bf16)  # (B, nh, 1, hs)
    x = x + _product(a.proj, y.view(x.shape[0], a.nh * a.hs), step)
    h = _product(m.fc, step.kernels.rms_norm(x, n2.weight, n2.eps, bf16), step)
    gate, up = h.float().chunk(2, -1)
    return x + _product(m.proj, (F.silu(gate) * up).to(bf16), step)


def _product(layer: Any, x: Tensor, step: _Step) -> Tensor:
    """``layer._matmul(x)`` for contiguous rows x; an int4 layer that takes ``int4_gemv``
    straight to it (the layer's own checks, asked again for every product, cost a third as
    much as a small product on a slow core)."""
    tiles = layer._buffers.get("gemv_tiles")
    if tiles is not None:
        return step.kernels.int4_gemv(x, tiles, layer.out_features, layer.group_size)
    return layer._matmul(x)


def _int4_blocks(model: GPT, x: Tensor, cache: KVCache, step: _Step) -> Tensor:
    """:func:`_bf16_block` for every block in one call of the ``int4_blocks`` kernel (plan
    "int4"), x (B, C) fp32."""
    weights = [held[key] for held, key in _plans[model].operands]
    a, norm = model.blocks[0].attn, model.blocks[0].norm_1  # type: ignore[union-attr]
    group = a.qkv.group_size
    return step.kernels.int4_blocks(
        x, weights, cache.k, cache.v, *step.rope, step.pos, step.mask, a.nh, a.nkv, norm.eps, group
    )


def decode_hidden(model: GPT, idx: Tensor, cache: KVCache | None) -> Tensor | None:
    """``model.hidden(idx, cache)`` for idx (B, 1) (the cache advanced by one position the
    same way), or None where this step does not apply (see the module docstring)."""
    found = applies(model, idx, cache)
    if found is None:
        return None
    kernels, plan = found
    assert cache is not None
    pos = cache.pos  # (B,): the slot each row's token goes to
    x = model.wte(idx)  # (B, 1, C)
    if model.embed_scale != 1.0:
        x = x * model.embed_scale
    if model.wpe is not None:
        x = x + model.wpe(pos[:, None])
    elif model.config.pos_emb == "sinusoidal":
        x = x + model.sinusoid[pos][:, None]
    none = torch.empty(0)
    rope = (none, none)
    if model.rope is not None:
        table = model.rope[:, pos]  # (2, B, hs)
        rope = (table[0], table[1])
    keys = torch.arange(cache.length + 1)
    mask = (keys <= pos[:, None])[:, None, None]  # (B, 1, 1, S): slot <= position
    step = _Step(rope, pos, mask, kernels)
    if plan == "int4":
        x = _int4_blocks(model, x[:, 0], cache, step)[:, None]
    elif plan == "modules":
        for i, block in enumerate(model.blocks):
            x = _block(block, x, (cache.k[i], cache.v[i]), step)  # type: ignore[arg-type]
    else:  # (B, C): the products take rows
        x = x[:, 0]
        for i, block in enumerate(model.blocks):
            x = _bf16_block(block, x, (cache.k[i], cache.v[i]), step)  # type: ignore[arg-type]
        x = x[:, None]
    cache.pos = cache.pos + 1
    cache.length += 1
    return model.norm_f(x) if model.norm_f is not None else x
