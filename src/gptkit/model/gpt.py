"""The decoder-only transformer: every family gptkit runs is this one file, switched by config.

References: Vaswani et al. 2017 (attention, sinusoidal positions); Radford et al. 2018
(GPT-1: post-LN blocks, learned positions); Radford et al. 2019 (GPT-2: pre-LN, scaled
residual init); Su et al. 2021 (RoPE); Zhang & Sennrich 2019 (RMSNorm); Shazeer 2020 (SwiGLU);
Ainslie et al. 2023 (grouped-query attention).

Shape legend: B batch, T new tokens, S cached + new tokens, C n_embd, nh query heads,
nkv key/value heads, hs head size, V vocabulary, H MLP hidden size.

The model is pure single-device code: no optimizer, no I/O, no distributed logic.
Read top-down: leaf modules first, :class:`GPT` last.
"""

from __future__ import annotations

import contextlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.config import ModelConfig
from gptkit.errors import GptkitError
from gptkit.model.kv_cache import KVCache


def random_quarters(n: int, device: torch.device) -> Tensor:
    """``n`` uniform int16 values from the global generator: one 64-bit integer per four
    (``bernoulli_`` draws one random number per element and costs about 4x more on a CPU,
    where dropout's random numbers otherwise cost as much as the model's matmuls)."""
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return words.view(torch.int16)[:n]


# the second thread of CPU dropout masks, and the process that started it
_rng_pool: tuple[int, ThreadPoolExecutor] | None = None


def _fill_keep(out: Tensor, seed: int, threshold: int) -> None:
    """``out`` (bool, flat) := 16-bit values of SFC64 seeded with ``seed`` >= threshold.
    numpy alone, which releases the GIL and starts no threads (a torch op here would start
    an OpenMP team for this thread, whose spinning slowed training steps by 7%)."""
    words = np.random.SFC64(seed).random_raw((out.numel() + 3) // 4)
    np.greater_equal(words.view(np.int16)[: out.numel()], threshold, out=out.numpy())


def _cpu_keep_mask(n: int, threshold: int) -> Tensor:
    """The CPU masks of :func:`keep_mask`: torch's generator (mt19937) is single-threaded
    and makes 32 random bits in 2.8 ns here, which put dropout's random numbers at a tenth
    of a training step on nanoGPT's Shakespeare config. numpy's SFC64 makes 64 bits in
    about 3 ns and releases the GIL, so two threads fill the two halves of a large mask,
    each half from its own stream. Seeded from torch's global generator: a seed (and a
    checkpoint's saved RNG state) gives the same masks, whatever the thread timing."""
    global _rng_pool
    seed = _seed()
    mask = torch.empty(n, dtype=torch.bool)
    if n < 2**16:
        _fill_keep(mask, seed, threshold)
        return mask
    half = (n // 2 + 3) // 4 * 4  # on a 64-bit word boundary
    if torch.get_num_threads() < 2:  # the same two streams, one after the other
        _fill_keep(mask[:half], seed, threshold)
        _fill_keep(mask[half:], seed + 1, threshold)
        return mask
    if _rng_pool is None or _rng_pool[0] != os.getpid():  # none yet, or a forked child
        _rng_pool = os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="gptkit-dropout")
    other = _rng_pool[1].submit(_fill_keep, mask[half:], seed + 1, threshold)
    _fill_keep(mask[:half], seed, threshold)
    other.result()
    return mask


def _cpu_kernels() -> Any:
    from gptkit.model.kernels import cpu_kernels

    return cpu_kernels()


def _seed() -> int:
    """A mask's seed, from torch's global generator (so a seed or a checkpoint's saved RNG
    state gives the same masks)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _threshold32(p: float) -> int:
    """The 32-bit hash value below which ``kernels/keep.h`` drops an element."""
    return min(round(p * 2**32), 2**32 - 1)


def _kernel_mask(p: float) -> tuple[int, int]:
    """(seed, threshold) of a fresh ``keep.h`` mask for the kernels; (0, 0), drawing
    nothing, without dropout."""
    return (_seed(), _threshold32(p)) if p > 0.0 else (0, 0)


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """A random bool mask, True with probability ``1 - p``. On a CPU with the compiled
    kernels: ``kernels/keep.h``'s hash of (seed, row, column) over the last dimension (to
    2**-32; the very mask the attention and dropout kernels make in place); on other CPUs
    uniform 16-bit values from numpy's SFC64 (see :func:`_cpu_keep_mask`; to 1/65536), and
    elsewhere from :func:`random_quarters`."""
    if device.type == "cpu":
        kernels = _cpu_kernels()
        if kernels is not None:
            cols = shape[-1] if shape else 1
            rows = math.prod(shape) // cols if cols else 0
            return kernels.keep_mask(_seed(), _threshold32(p), rows, cols).view(shape)
    threshold = round(p * 65536) - 32768  # the values are uniform in [-32768, 32767]
    if device.type == "cpu":
        return _cpu_keep_mask(math.prod(shape), threshold).view(shape)
    return (random_quarters(math.prod(shape), device) >= threshold).view(shape)


def _int64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_PACK = _int64(0x0102040810204080)  # byte i of a word (0 or 1) -> bit 56 + i of the product
_SPREAD = _int64(0x0101010101010101)  # a byte copied into all eight bytes of a word
_BIT_I = _int64(0x8040201008040201)  # bit i of byte i


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as uint8 bits (element 8j + i is bit i of byte j): the eighth of the
    memory that saving the bool mask for backward would take. On a CPU numpy's packbits
    (7x faster than the torch arithmetic below, which serves other devices)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
    flat = mask.reshape(-1).view(torch.uint8)
    if flat.numel() % 8:
        flat = F.pad(flat, (0, 8 - flat.numel() % 8))
    words = flat.contiguous().view(torch.int64)  # eight 0/1 bytes per word
    return ((words * _PACK) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def unpack_bits(bits: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`: the bool tensor of ``shape``."""
    if bits.device.type == "cpu":
        flat = np.unpackbits(bits.numpy(), count=math.prod(shape), bitorder="little")
        return torch.from_numpy(flat.view(np.bool_)).view(shape)
    words = (bits.to(torch.int64) * _SPREAD).bitwise_and_(_BIT_I)  # byte i: bit i alone
    words = ((words + 0x7F7F7F7F7F7F7F7F) >> 7).bitwise_and_(_SPREAD)  # byte i: 0 or 1
    return words.view(torch.uint8)[: math.prod(shape)].view(torch.bool).view(shape)


_KERNEL_DTYPES = (torch.bfloat16, torch.float32)  # what kernels/elementwise.cpp reads


class _DropoutFunction(torch.autograd.Function):
    """``x * keep / (1 - p)`` with ``keep = keep_mask(x.shape)``. On a CPU with the compiled
    kernels one pass that makes the mask as it goes (``kernels/elementwise.cpp``), and backward
    makes it again from the seed, so nothing is saved; elsewhere only the bits of ``keep``
    are saved (autograd would keep a byte per element, and ``torch.where`` is 5x slower
    than this multiply on a CPU)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float) -> Tensor:
        ctx.scale = 1.0 / (1.0 - p)
        on_cpu = x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES
        ctx.kernels = _cpu_kernels() if on_cpu else None
        if ctx.kernels is not None:
            ctx.mask, ctx.dtype = _kernel_mask(p), x.dtype
            return ctx.kernels.dropout(x.contiguous(), *ctx.mask, ctx.scale, x.dtype)
        keep = keep_mask(tuple(x.shape), p, x.device)
        ctx.save_for_backward(pack_bits(keep))
        ctx.shape = tuple(x.shape)
        # x * 1 * scale rounds as x * scale does: the result equals nn.Dropout's formula.
        return (x * keep.view(torch.uint8)).mul_(ctx.scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if ctx.kernels is not None:
            return ctx.kernels.dropout(grad.contiguous(), *ctx.mask, ctx.scale, ctx.dtype), None
        (bits,) = ctx.saved_tensors
        keep = unpack_bits(bits, ctx.shape)
        return (grad * keep.view(torch.uint8)).mul_(ctx.scale), None


class _DropoutAddFunction(torch.autograd.Function):
    """``x + dropout(y)`` in one pass by the compiled kernel (the residual connection after
    a layer), rounding as the two ops do; backward hands ``grad`` to ``x`` and the dropped
    ``grad`` in ``y``'s dtype to ``y`` (the cast and the mask in one pass)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, p: float, kernels: Any) -> Tensor:
        ctx.kernels, ctx.mask = kernels, _kernel_mask(p)
        ctx.scale, ctx.dtype = 1.0 / (1.0 - p), y.dtype
        return kernels.dropout_add(x.contiguous(), y.contiguous(), *ctx.mask, ctx.scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad = grad.contiguous()
        return grad, ctx.kernels.dropout(grad, *ctx.mask, ctx.scale, ctx.dtype), None, None


class Dropout(nn.Module):
    """Inverted dropout (``nn.Dropout``'s semantics) on :func:`keep_mask`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _DropoutFunction.apply(x, self.p)

    def residual(self, x: Tensor, y: Tensor) -> Tensor:
        """``x + self(y)``: one pass on a CPU with the compiled kernels."""
        if self.training and self.p > 0.0 and x.device.type == "cpu" and x.shape == y.shape:
            kernels = _cpu_kernels()
            if kernels is not None and x.dtype in _KERNEL_DTYPES and y.dtype in _KERNEL_DTYPES:
                return _DropoutAddFunction.apply(x, y, self.p, kernels)
        return x + self(y)


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
            ctx.mask = _kernel_mask(p)  # makes the mask
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
        ctx.mask = _kernel_mask(p)
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
    return _cpu_kernels()


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


class Norm(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind, self.eps = config.norm, config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        use_bias = config.bias and config.norm == "layernorm"
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if use_bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    def for_matmul(self, x: Tensor) -> Tensor:
        """``self(x)`` for a matmul to read: in CPU training under bf16 autocast, layer norm
        and autocast's cast to bf16 in one pass by the compiled kernel (the fp32 residual
        stream stays fp32; torch would write the norm in fp32 and cast it)."""
        fused = (
            self.kind == "layernorm"
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.is_contiguous()
            and torch.is_grad_enabled()
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        kernels = _cpu_kernels() if fused else None
        if kernels is None:
            return self(x)
        return _LayerNormToBF16.apply(x, self.weight, self.bias, self.eps, kernels)


class _LayerNormToBF16(torch.autograd.Function):
    """Layer norm of fp32 ``x`` written in bf16 (``kernels/elementwise.cpp``), saving x and
    each row's mean and 1/std; backward takes the bf16 gradient and returns fp32 ones."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, kernels: Any
    ) -> Tensor:
        b = bias.detach() if bias is not None else weight.new_empty(0)
        y, mean, rstd = kernels.layer_norm_forward(x, weight.detach(), b, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.kernels, ctx.has_bias = kernels, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None, None, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        grad = grad.to(torch.bfloat16).contiguous()
        args = (grad, x, mean, rstd, weight.detach(), ctx.has_bias)
        dx, dw, db = ctx.kernels.layer_norm_backward(*args)
        return dx, dw, db if ctx.has_bias else None, None, None


def rope_tables(positions: Tensor, head_size: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin for rotary embeddings, (B, 1, T, hs), computed in fp32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_size, 2, device=positions.device).float() / head_size)
    )
    freqs = positions[..., None].float() * inv_freq  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hs)
    return emb.cos(), emb.sin()


def rope_table(n_pos: int, head_size: int, theta: float, device: torch.device) -> Tensor:
    """:func:`rope_tables` of positions 0..n_pos-1 stacked, (2, n_pos, hs) fp32: row p of
    [0] and [1] is cos and sin at position p, the same numbers :func:`rope_tables` gives."""
    cos, sin = rope_tables(torch.arange(n_pos, device=device)[None], head_size, theta)
    return torch.stack((cos[0, 0], sin[0, 0]))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + hs/2) of each head (the Hugging Face "rotate_half" layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def sinusoidal_table(n_pos: int, dim: int) -> Tensor:
    """The fixed encoding of Vaswani et al.: sin on even dimensions, cos on odd ones."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table


class Attention(nn.Module):
    """Causal multi-head self-attention with grouped-query heads and an optional KV cache.

    ::

        x ─► qkv ─┬─ q (B, nh, T, hs) ──(rope)──┐
                  ├─ k (B, nkv, T, hs) ─(rope)──┼─► cache ─► SDPA ─► proj ─► y
                  └─ v (B, nkv, T, hs) ─────────┘
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hs = config.n_head, config.kv_heads, config.head_size
        self.qkv = nn.Linear(config.n_embd, (self.nh + 2 * self.nkv) * self.hs, bias=config.bias)
        self.proj = nn.Linear(self.nh * self.hs, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        cache: tuple[Tensor, Tensor] | None,
        slots: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)
        p = self.dropout if self.training else 0.0
        if rope is None and cache is None and mask is None and self.nkv == self.nh:
            kernel = _attention_kernel(qkv, None) if self.hs % 16 == 0 else None
            if kernel is not None and qkv.requires_grad and qkv.is_contiguous():
                y = _QKVAttention.apply(qkv, self.nh, p, kernel)  # training: dq, dk, dv in one
                return self.proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))
        q, k, v = qkv.split([self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs], -1)
        q = q.view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            assert slots is not None
            k_cache, v_cache = cache
            if B == 1:  # torch.compile writes index_copy_ in place; scatter_ copies the cache
                k_cache.index_copy_(2, slots[0], k.to(k_cache.dtype))
                v_cache.index_copy_(2, slots[0], v.to(v_cache.dtype))
            else:
                index = slots[:, None, :, None].expand(B, self.nkv, T, self.hs)
                k_cache.scatter_(2, index, k.to(k_cache.dtype))
                v_cache.scatter_(2, index, v.to(v_cache.dtype))
            S = mask.shape[-1] if mask is not None else T
            k, v = k_cache[:, :, :S].to(q.dtype), v_cache[:, :, :S].to(q.dtype)  # (B, nkv, S, hs)
        kernel = _attention_kernel(q, mask) is not None
        if p > 0.0 or (kernel and q.requires_grad):
            y = attention_with_dropout(q, k, v, mask, p)
            y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)  # (B, T, C)
            return self.proj(y)
        # A bf16-quantized model (its layers compute in bf16, handing fp32 on) attends in
        # bf16 as well, where the kernel is: 0.32 against 0.99 ms a SmolLM2 prefill layer.
        dtype, bf16 = q.dtype, getattr(self.qkv, "bf16_attention", False) and not q.requires_grad
        if not kernel and bf16 and _attention_kernel(q, mask, torch.bfloat16) is not None:
            q, kernel = q.bfloat16(), True
        if kernel:  # inference: the compiled kernel without dropout, as an op torch.compile sees
            if self.nkv != self.nh:
                k, v = (t.repeat_interleave(self.nh // self.nkv, dim=1) for t in (k, v))
            y = torch.ops.gptkit.causal_attention(q, k.to(q.dtype), v.to(q.dtype)).to(dtype)
            return self.proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))
        fp32 = _slow_bf16_sdpa_backward(q)
        if fp32:
            q, k, v = q.float(), k.float(), v.float()
        with _no_autocast(q.device) if fp32 else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=self.nkv != self.nh,
            ).to(dtype)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)  # (B, T, C)
        return self.proj(y)


def _slow_bf16_sdpa_backward(q: Tensor) -> bool:
    """Whether to run this attention in fp32 under bf16 autocast: on a CPU, torch's bf16
    flash-attention backward is 1.3-3x slower than its fp32 one for short sequences and
    narrow heads (T=64 hs=32: 11.3 vs 3.1 ms; T=128 hs=64: 22.3 vs 13.2; T=256 hs=32: 20.9 vs
    15.7), while at T=256 hs=64 bf16 is 10% faster."""
    T, hs = q.shape[-2:]
    return (
        q.requires_grad and q.dtype == torch.bfloat16 and q.device.type == "cpu" and T * hs <= 8192
    )


class MLP(nn.Module):
    """GELU MLP (GPT-1/2) or SwiGLU (Llama): ``proj(silu(gate(x)) * up(x))`` with gate and up
    fused into one ``fc`` matrix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        H = config.hidden_size
        out = 2 * H if self.kind == "swiglu" else H
        self.fc = nn.Linear(config.n_embd, out, bias=config.bias)
        self.proj = nn.Linear(H, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, H) or (B, T, 2H)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "gelu" and h.requires_grad and h.dtype == torch.bfloat16:
            h = gelu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.proj(h)


class _GELU(torch.autograd.Function):
    """``F.gelu`` (the erf form) whose backward is the compiled kernel's one pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernels: Any) -> Tensor:
        ctx.save_for_backward(x)
        ctx.kernels = kernels
        return F.gelu(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return ctx.kernels.gelu_backward(grad.contiguous(), x), None


def gelu(x: Tensor) -> Tensor:
    """``F.gelu(x)``; for a contiguous bf16 CPU tensor with the compiled kernels, a backward
    in one pass (``kernels/elementwise.cpp``: 1.5-2x faster than torch's there)."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.is_contiguous():
        kernels = _cpu_kernels()
        if kernels is not None:
            return _GELU.apply(x, kernels)
    return F.gelu(x)


class Block(nn.Module):
    """pre-LN (GPT-2, Llama): x + f(norm(x));  post-LN (GPT-1): norm(x + f(x))."""

    def __init__(self, config: ModelConfig, local: bool = False):
        super().__init__()
        self.local = local  # banded attention over the last attention_window positions
        self.pre = config.norm_position == "pre"
        self.norm_1 = Norm(config)
        self.attn = Attention(config)
        self.norm_2 = Norm(config)
        self.mlp = MLP(config)
        self.drop = Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        cache: tuple[Tensor, Tensor] | None,
        slots: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        if self.pre:
            y = self.attn(self.norm_1.for_matmul(x), rope, cache, slots, mask)
            x = self.drop.residual(x, y)
            return self.drop.residual(x, self.mlp(self.norm_2.for_matmul(x)))
        x = self.norm_1(self.drop.residual(x, self.attn(x, rope, cache, slots, mask)))
        return self.norm_2(self.drop.residual(x, self.mlp(x)))


class GPT(nn.Module):
    """``model(ids)`` -> logits ``(B, T, V)``; ``model(ids, cache=KVCache(...))`` decodes
    incrementally. ``hidden`` gives the final hidden states for task heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wpe = nn.Embedding(config.block_size, C) if config.pos_emb == "learned" else None
        if config.pos_emb == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(config.block_size, C), False)
        self.embed_scale = math.sqrt(C) if config.pos_emb == "sinusoidal" else 1.0
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, local=config.is_local_layer(i)) for i in range(config.n_layer)
        )
        self.norm_f = Norm(config) if config.norm_position == "pre" else None
        # Rotary cos/sin of every position, looked up per forward: a plain attribute, not a
        # buffer, so that it stays fp32 under model.to(dtype), stays out of state dicts and
        # of DDP's buffer broadcasts, and is rebuilt (not copied) by _apply on a device move.
        # (Computed per forward instead, torch.compile recomputes the trigonometry inside
        # every layer's kernels: 4% of a SmolLM2 prefill.)
        self.rope: Tensor | None = self._rope_table(self.wte.weight.device)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # GPT-1's task head: label logits from the final token's hidden state.
        self.cls_head = nn.Linear(C, len(config.labels)) if config.labels else None
        if not self.wte.weight.is_meta:  # on the meta device there is nothing to fill
            self.apply(self._init_weights)
            # GPT-2: scale the init of projections into the residual stream, 1/sqrt(2 n_layer).
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, 0.0, config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _rope_table(self, device: torch.device) -> Tensor | None:
        c = self.config
        if c.pos_emb != "rope":
            return None
        return rope_table(c.block_size, c.head_size, c.rope_theta, device)

    def _apply(self, fn: Any, recurse: bool = True) -> GPT:
        # .to(), .cuda(), to_empty(), .half() ...: the rope table follows the embedding's device
        super()._apply(fn, recurse)
        if self.rope is not None and self.rope.device != self.wte.weight.device:
            self.rope = self._rope_table(self.wte.weight.device)
        return self

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe else 0)
        return n

    def add_classifier(self, labels: tuple[str, ...] | list[str]) -> None:
        """Give the model a fresh classification head over ``labels`` (replacing any)."""
        self.config = self.config.replace(labels=tuple(labels))
        w = self.wte.weight
        self.cls_head = nn.Linear(self.config.n_embd, len(labels), device=w.device, dtype=w.dtype)
        nn.init.normal_(self.cls_head.weight, 0.0, self.config.init_std)
        nn.init.zeros_(self.cls_head.bias)

    def _positions(self, B: int, T: int, device: torch.device, cache: KVCache | None) -> Tensor:
        if cache is None:
            if self.config.block_size < T:
                raise GptkitError(
                    f"sequence of {T} tokens is longer than the context ({self.config.block_size})"
                )
            return torch.arange(T, device=device).expand(B, T)
        if cache.length + T > cache.max_len:
            raise GptkitError(
                f"the KV cache holds {cache.max_len} positions; {cache.length} used + {T} new "
                "do not fit (generation slides the window for you)"
            )
        return cache.pos[:, None] + torch.arange(T, device=device)  # (B, T)

    @staticmethod
    def _segment_masks(segments: Tensor) -> tuple[Tensor, Tensor]:
        """Positions and the dense mask of a batch of segments (see :meth:`hidden`)."""
        T = segments.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
        allowed = (segments[:, :, None] == segments[:, None, :]) & causal  # (B, T, T)
        pos = allowed.sum(-1) - 1  # index within the segment
        return pos, allowed[:, None]  # (B, T), (B, 1, T, T)

    def _masks(self, pos: Tensor, cache: KVCache | None) -> tuple[Tensor | None, Tensor | None]:
        """Boolean attention masks (True = attend), dense and locally banded.

        ``None`` means plain causal attention over the new tokens (SDPA's fast path). Key
        slot s is visible to a query at position p when s <= p (dense) and, for the banded
        layers of GPT-3's alternating pattern, also p - s < attention_window.
        """
        T = pos.shape[1]
        if cache is not None and cache.length > 0:
            keys = torch.arange(cache.length + T, device=pos.device)  # slot == position
        else:
            keys = torch.arange(T, device=pos.device)
        q = pos[:, None, :, None]  # (B, 1, T, 1)
        mask = keys <= q if cache is not None and cache.length > 0 else None  # (B, 1, T, S)
        local = None
        if self.config.attention_pattern == "alternating":
            local = (keys <= q) & (q - keys < self.config.attention_window)
        return mask, local

    def hidden(
        self, idx: Tensor, cache: KVCache | None = None, segments: Tensor | None = None
    ) -> Tensor:
        """Final hidden states (B, T, C), after the last norm.

        ``segments`` (B, T) integers lay several sequences side by side in a row: a token
        attends only to earlier tokens of its own segment, and positions restart at 0 with
        each segment. Padding is a segment of its own (left or right), packed examples are
        segments 1, 2, ...; the result at every real token is what that sequence alone gives.
        """
        B, T = idx.shape
        seg_mask = None
        if segments is None:
            pos = self._positions(B, T, idx.device, cache)  # (B, T)
        else:
            if cache is not None:
                raise GptkitError("segments and a KV cache cannot be combined")
            self._positions(B, T, idx.device, None)  # checks the length
            pos, seg_mask = self._segment_masks(segments.to(idx.device))
        x = self.wte(idx)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.wpe is not None:
            x = x + self.wpe(pos)
        elif self.config.pos_emb == "sinusoidal":
            x = x + self.sinusoid[pos]
        x = self.drop(x)
        rope = None
        if self.rope is not None:
            table = self.rope[:, pos]  # (2, B, T, hs)
            rope = table[0, :, None], table[1, :, None]  # cos, sin: (B, 1, T, hs)
        mask, local_mask = self._masks(pos, cache)
        if seg_mask is not None:
            mask = seg_mask
            if local_mask is not None:
                local_mask = seg_mask & (
                    pos[:, None, :, None] - pos[:, None, None, :] < self.config.attention_window
                )
        for i, block in enumerate(self.blocks):
            layer_cache = (cache.k[i], cache.v[i]) if cache is not None else None
            layer_mask = local_mask if block.local else mask
            x = block(x, rope, layer_cache, pos if cache is not None else None, layer_mask)
        if cache is not None:
            cache.pos = cache.pos + T
            cache.length += T
        return self.norm_f(x) if self.norm_f is not None else x

    def forward(
        self,
        idx: Tensor,
        cache: KVCache | None = None,
        segments: Tensor | None = None,
        only: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V) for token ids (B, T); with ``only``, a bool (B, T) mask, the
        logits (N, V) of its N selected positions alone (fine-tuning scores the completion
        tokens only, and the head over a large vocabulary costs as much as many layers)."""
        h = self.hidden(idx, cache, segments)
        return self.lm_head(h if only is None else h[only])

    def classify(self, idx: Tensor, last: Tensor, segments: Tensor | None = None) -> Tensor:
        """Label logits (B, K): the head applied to the hidden state at index ``last[b]`` of
        each row (the extract token that ends each example)."""
        if self.cls_head is None:
            raise GptkitError("this model has no classification head; fine-tune one first")
        h = self.hidden(idx, segments=segments)
        return self.cls_head(h[torch.arange(idx.shape[0], device=idx.device), last])
