"""Scaled dot-product attention, the implementations behind :func:`attention`.

All compute ``softmax(q kᵀ / sqrt(hs) + bias) ⊙ keep / (1 - p) @ v`` (Vaswani et al. 2017;
dropout on the weights, Srivastava et al. 2014), causal or under a boolean mask, and
differ in where they run:

- the compiled kernel (``kernels/attention.cpp``): causal bf16 attention on a CPU with
  AVX512-BF16, training (with dropout, :class:`_DropoutAttention`, or straight from the qkv
  projection's output, :class:`_QKVAttention`) and inference (the ``gptkit::causal_attention``
  op, which torch.compile'd prefill calls without a graph break);
- Python tiles that recompute the probabilities in backward (:class:`_DropoutAttention`):
  training with dropout everywhere else (SDPA has no fused CPU kernel with dropout);
- ``F.scaled_dot_product_attention`` for the rest, in fp32 where torch's bf16 CPU backward
  is slow (:func:`_slow_bf16_sdpa_backward`).

The FlashAttention papers (Dao et al. 2022, 2023) describe the same recomputation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gptkit.model.kernels import cpu_kernels
from gptkit.model.ops.elementwise import inference_kernels
from gptkit.model.ops.masks import keep_mask, kernel_mask, pack_bits, unpack_bits


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _attention_tiles(
    B: int, H: int, T: int, S: int, causal: bool
) -> list[tuple[slice, slice, int]]:
    """(batch rows, query rows, keys 0..kend) of each tile :class:`_DropoutAttention` works on.

    Tiles of 64 query rows let a causal layer skip the keys after each tile's last query
    (with 4 tiles, 3/8 of the products), and a few batch rows per tile keep its (b, H, 64, S)
    products in the CPU's cache (about 2**19 elements) across the ops that use them.
    """
    bt = min(T, 64)
    bb = max(1, min(B, 2**19 // (H * bt * S)))
    tiles = []
    for r in range(0, T, bt):
        kend = min(S, r + bt + S - T) if causal else S
        for b in range(0, B, bb):
            tiles.append((slice(b, b + bb), slice(r, min(r + bt, T)), kend))
    return tiles


class _DropoutAttention(torch.autograd.Function):
    """Attention with dropout on the weights that keeps no (B, H, T, S) tensor for backward.

    Forward and backward walk the same tiles (see :func:`_attention_tiles`); backward
    recomputes each tile's probabilities from q and k instead of reading them back, and the
    dropout mask from its bits. Saved: q, k, v as the tiles read them (contiguous, q and v
    scaled: the bytes of the qkv projection's output, which saving views of it would keep),
    the mask's bits and the attention mask. Autograd on the materialised formula saves the
    probabilities twice (before and after dropout, 16-bit under bf16 autocast) and a byte of
    mask per weight: 126 MB per layer at nanoGPT's Shakespeare size (batch 64, 6 heads,
    context 256), against 3 MB of bits here. The recomputed Q·Kᵀ costs about 2% of a layer's
    training FLOPs there, less than the causal tiles skip. The random numbers are those
    ``keep_mask(att.shape)`` draws, so the result equals the materialised formula's (same
    seed, same mask) to rounding.

    Causal bf16 attention on a CPU with AVX512-BF16 runs in the compiled kernel instead
    (``kernels/attention.cpp``: the same computation, the same mask, fp32 sums; it saves the
    q, k, v views, the output and each row's log-sum-exp, and makes the mask from its seed
    where it needs it, in forward and again in backward). These tiles define what it
    computes and serve every other case.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float) -> Tensor:
        B, H, T, S = *q.shape[:3], k.shape[2]
        ctx.p = p
        ctx.kernel = _attention_kernel(q, mask)
        if ctx.kernel is not None:  # the compiled kernel (kernels/attention.cpp) reads q,
            q, k, v = (_pairable(t) for t in (q, k, v))  # k, v in place, scales itself and
            ctx.mask = kernel_mask(p)  # makes the mask
            ctx.scales = 1.0 / math.sqrt(q.shape[-1]), 1.0 / (1.0 - p)
            out, lse = ctx.kernel.attention_forward(q, k, v, *ctx.mask, *ctx.scales)
            ctx.save_for_backward(q, k, v, out, lse)
            return out  # laid out as (B, T, H, hs): the output projection reads it in place
        if p > 0.0:
            keep = keep_mask((B, H, T, S), p, q.device)
        else:
            keep = torch.ones((B, H, T, S), dtype=torch.bool, device=q.device)
        with _no_autocast(q.device):
            qs, kc, vs, bias = _DropoutAttention._inputs(q, k, v, mask, p)
            ctx.save_for_backward(qs, kc, vs, pack_bits(keep), mask)
            out = torch.empty_like(qs)
            for bs, rows, kend in _attention_tiles(B, H, T, S, mask is None):
                s = qs[bs, :, rows] @ kc[bs, :, :kend].transpose(-2, -1)
                prob = s.add_(bias[bs, :, rows, :kend]).softmax(-1)
                prob.mul_(keep[bs, :, rows, :kend].view(torch.uint8))
                out[bs, :, rows] = prob @ vs[bs, :, :kend]
        return out

    @staticmethod
    def _inputs(
        q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q scaled by 1/sqrt(hs), k, v scaled by 1/(1 - p), contiguous; the mask as an
        additive bias (0 or -inf) broadcast to (B, H, T, S)."""
        B, H, T = q.shape[:3]
        S = k.shape[2]
        qs, kc, vs = _DropoutAttention._scaled(q, k, v, p)
        return qs, kc, vs, _DropoutAttention._bias(mask, B, H, T, S, q)

    @staticmethod
    def _scaled(q: Tensor, k: Tensor, v: Tensor, p: float) -> tuple[Tensor, Tensor, Tensor]:
        """q / sqrt(hs), k, v / (1 - p), contiguous, each in one pass (a product of a
        transposed view keeps its strides, so ``.contiguous()`` after it would copy again)."""
        qs, kc, vs = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        torch.mul(q, 1.0 / math.sqrt(q.shape[-1]), out=qs)
        kc.copy_(k)
        torch.mul(v, 1.0 / (1.0 - p), out=vs)
        return qs, kc, vs

    @staticmethod
    def _bias(mask: Tensor | None, B: int, H: int, T: int, S: int, like: Tensor) -> Tensor:
        """The attention mask as an additive bias (0 or -inf), broadcast to (B, H, T, S)."""
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=like.device).tril(S - T)
        bias = torch.zeros(mask.shape, dtype=like.dtype, device=like.device)
        return bias.masked_fill_(~mask, float("-inf")).expand(B, H, T, S)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        p = ctx.p
        if ctx.kernel is not None:
            q, k, v, out, lse = ctx.saved_tensors
            dout = _pairable(dout.to(q.dtype))
            args = (q, k, v, out, dout, lse, *ctx.mask, *ctx.scales, _NO_GRAD)
            dq, dk, dv = ctx.kernel.attention_backward(*args)
            return dq, dk, dv, None, None
        qs, kc, vs, bits, mask = ctx.saved_tensors
        B, H, T, hs = qs.shape
        S = kc.shape[2]
        keep = unpack_bits(bits, (B, H, T, S))
        with _no_autocast(qs.device):
            bias = _DropoutAttention._bias(mask, B, H, T, S, qs)
            dout = dout.to(qs.dtype).contiguous()
            dq, dk, dv = torch.empty_like(qs), torch.zeros_like(kc), torch.zeros_like(vs)
            for bs, rows, kend in _attention_tiles(B, H, T, S, mask is None):
                kt, d = kc[bs, :, :kend], dout[bs, :, rows]
                s = qs[bs, :, rows] @ kt.transpose(-2, -1)
                prob = s.add_(bias[bs, :, rows, :kend]).softmax(-1)
                del s
                keep_t = keep[bs, :, rows, :kend].view(torch.uint8).to(prob.dtype)
                dprob = (d @ vs[bs, :, :kend].transpose(-2, -1)).mul_(keep_t)
                ds = torch._softmax_backward_data(dprob, prob, -1, prob.dtype)
                del dprob
                dv[bs, :, :kend] += prob.mul_(keep_t).transpose(-2, -1) @ d
                dq[bs, :, rows] = ds @ kt
                dk[bs, :, :kend] += ds.transpose(-2, -1) @ qs[bs, :, rows]
            dq.mul_(1.0 / math.sqrt(hs))
            dv.mul_(1.0 / (1.0 - p))
        return dq, dk, dv, None, None


class _QKVAttention(torch.autograd.Function):
    """Causal self-attention by the compiled kernel straight from the qkv projection's
    output (B, T, 3 H hs), with dropout ``p``: backward writes dq, dk and dv into one
    gradient of that shape, which the projection's backward reads as it is (splitting q, k
    and v off the projection makes autograd concatenate their three gradients). For equal
    query and key heads without rotary embeddings or a cache; the same computation and mask
    as :class:`_DropoutAttention`'s kernel path."""

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, nh: int, p: float, kernel: Any) -> Tensor:
        ctx.nh, ctx.kernel = nh, kernel
        q, k, v = _QKVAttention._heads(qkv, nh)
        ctx.mask = kernel_mask(p)
        ctx.scales = 1.0 / math.sqrt(q.shape[-1]), 1.0 / (1.0 - p)
        out, lse = kernel.attention_forward(q, k, v, *ctx.mask, *ctx.scales)
        ctx.save_for_backward(qkv, out, lse)
        return out  # (B, H, T, hs) laid out as (B, T, H, hs)

    @staticmethod
    def _heads(qkv: Tensor, nh: int) -> tuple[Tensor, Tensor, Tensor]:
        B, T, W = qkv.shape
        parts = qkv.view(B, T, 3, nh, W // (3 * nh))
        return tuple(parts[:, :, i].transpose(1, 2) for i in range(3))  # type: ignore[return-value]

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor, None, None, None]:
        qkv, out, lse = ctx.saved_tensors
        q, k, v = _QKVAttention._heads(qkv, ctx.nh)
        dqkv = torch.empty_like(qkv)
        dout = _pairable(dout.to(qkv.dtype))
        ctx.kernel.attention_backward(q, k, v, out, dout, lse, *ctx.mask, *ctx.scales, dqkv)
        return dqkv, None, None, None


_NO_GRAD = torch.empty(0, dtype=torch.bfloat16)  # attention_backward: allocate dq, dk, dv


def _pairable(t: Tensor) -> Tensor:
    """``t`` as the attention kernel reads it: the last dimension contiguous and every other
    stride (and the offset) even, so that two neighbouring bf16 make one 32-bit load."""
    if t.stride(-1) == 1 and all(s % 2 == 0 for s in (*t.stride()[:-1], t.storage_offset())):
        return t
    return t.contiguous()


@torch.library.custom_op("gptkit::causal_attention", mutates_args=())
def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of q (B, H, T, hs) over k, v (B, H, S, hs) (the last T of S
    positions) by the compiled kernel, without dropout; the result is laid out as
    (B, T, H, hs). An op so that torch.compile'd prefill calls it as it is."""
    kernel = _attention_kernel(q, None)
    assert kernel is not None, "causal_attention needs the compiled kernel"
    q, k, v = (_pairable(t) for t in (q, k, v))
    out, _ = kernel.attention_forward(q, k, v, 0, 0, 1.0 / math.sqrt(q.shape[-1]), 1.0)
    return out


@causal_attention.register_fake
def _causal_attention_shape(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    B, H, T, hs = q.shape
    return q.new_empty((B, T, H, hs)).transpose(1, 2)


def _attention_kernel(q: Tensor, mask: Tensor | None, dtype: torch.dtype | None = None) -> Any:
    """The compiled attention kernel where it applies (causal, bf16 on a CPU with
    AVX512-BF16, head size a multiple of 16) to ``q`` (as ``dtype`` if given), else None."""
    if mask is not None or (dtype or q.dtype) != torch.bfloat16 or q.device.type != "cpu":
        return None
    if q.shape[-1] % 16:
        return None
    return cpu_kernels()


def attention_with_dropout(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float
) -> Tensor:
    """Training attention with dropout on the weights: SDPA's reference math (SDPA has no
    fused CPU kernel with dropout) with :func:`keep_mask`'s cheaper random numbers, computed
    tile by tile and recomputed in backward (:class:`_DropoutAttention`). ``mask`` None is
    causal; True in ``mask`` means attend."""
    nh, nkv = q.shape[1], k.shape[1]
    if nkv != nh:  # grouped-query heads: each key/value head serves nh / nkv query heads
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    return _DropoutAttention.apply(q, k.to(q.dtype), v.to(q.dtype), mask, p)  # (B, nh, T, hs)


def _slow_bf16_sdpa_backward(q: Tensor) -> bool:
    """Whether to run this attention in fp32 under bf16 autocast: on a CPU, torch's bf16
    flash-attention backward is 1.3-3x slower than its fp32 one for short sequences and
    narrow heads (T=64 hs=32: 11.3 vs 3.1 ms; T=128 hs=64: 22.3 vs 13.2; T=256 hs=32: 20.9 vs
    15.7), while at T=256 hs=64 bf16 is 10% faster."""
    T, hs = q.shape[-2:]
    return (
        q.requires_grad and q.dtype == torch.bfloat16 and q.device.type == "cpu" and T * hs <= 8192
    )


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """``F.scaled_dot_product_attention`` in q's dtype, computed in fp32 where its bf16
    backward is slow."""
    dtype = q.dtype
    fp32 = _slow_bf16_sdpa_backward(q)
    if fp32:
        q, k, v = q.float(), k.float(), v.float()
    with _no_autocast(q.device) if fp32 else contextlib.nullcontext():
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=k.shape[1] != q.shape[1],
        ).to(dtype)  # (B, nh, T, hs)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    dtype: torch.dtype | None = None,
    qkv: Tensor | None = None,
) -> Tensor:
    """Attention of q (B, nh, T, hs) over k, v (B, nkv, S, hs), the queries being the last T
    of S positions: what ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
    dropout_p=dropout_p, is_causal=mask is None, enable_gqa=True)`` computes, with
    :func:`~gptkit.model.ops.masks.keep_mask`'s dropout masks. Returns (B, nh, T, hs) in q's
    dtype, which may be laid out as (B, T, nh, hs) (the output projection reads it in place).

    Args:
        mask: True = attend, broadcast to (B, nh, T, S); None is causal.
        dropout_p: dropout on the attention weights (0 at inference).
        dtype: the dtype the layer that made q computes in (a bf16-quantized model hands
            fp32 on): inference attends in it where the compiled kernel is. None: q's
            dtype.
        qkv: the projection output (B, T, 3 nh hs) that q, k, v are views of, untouched, or
            None: causal bf16 training in the compiled kernel then reads it in place and
            writes one gradient for it (splitting q, k and v off the projection makes
            autograd concatenate their three gradients).
    """
    nh, nkv = q.shape[1], k.shape[1]
    if qkv is not None and mask is None and nkv == nh:
        kernel = _attention_kernel(q, None)
        if kernel is not None and qkv.requires_grad and qkv.is_contiguous():
            return _QKVAttention.apply(qkv, nh, dropout_p, kernel)  # dq, dk, dv in one
    kernel = _attention_kernel(q, mask) is not None
    if dropout_p > 0.0 or (kernel and q.requires_grad):
        return attention_with_dropout(q, k, v, mask, dropout_p)
    out_dtype, compute = q.dtype, dtype is not None and not q.requires_grad
    if not kernel and compute and _attention_kernel(q, mask, dtype) is not None:
        q, kernel = q.to(dtype), True
    if kernel:  # inference: the compiled kernel without dropout, as an op torch.compile sees
        if nkv != nh:
            k, v = (t.repeat_interleave(nh // nkv, dim=1) for t in (k, v))
        return torch.ops.gptkit.causal_attention(q, k.to(q.dtype), v.to(q.dtype)).to(out_dtype)
    few = _few_rows_kernel(q, k, v, mask) if dropout_p == 0.0 else None
    if few is not None:
        return few.masked_attention(q, k, v, mask, q.dtype)
    return _sdpa(q, k, v, mask)


#: the most query rows :func:`_few_rows_kernel` takes: decoding steps, speculative checks
FEW_ROWS = 16


def _few_rows_kernel(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Any:
    """The compiled kernels where ``masked_attention`` (``kernels/decode.cpp``) applies: CPU
    inference of at most :data:`FEW_ROWS` query rows under a (B or 1, 1, T, S) boolean mask,
    over a cache read in place (fp32 or bf16; grouped heads not repeated). There SDPA's set-up,
    its repeated keys and the cache's cast cost more than the arithmetic (a SmolLM2 decoding
    step: 0.28 ms of its 0.3 ms per layer at 256 positions). Else None."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    if q.shape[2] > FEW_ROWS or q.shape[-1] > 256 or q.shape[1] % k.shape[1]:
        return None
    dtypes = {q.dtype, k.dtype, v.dtype} <= {torch.float32, torch.bfloat16}
    dense = q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    return inference_kernels(q, k, v) if dtypes and dense else None
