"""Element-wise ops of the model with their CPU fast paths: dropout, dropout fused with the
residual add, exact GELU, layer norm written in bf16 for the next matmul, and RMSNorm.

Each public function computes what its docstring's torch formula does; on a CPU with the
compiled kernels (``kernels/elementwise.cpp``) it runs one pass over memory instead, and
saves less for backward. References: Srivastava et al. 2014 (dropout); Hendrycks & Gimpel
2016 (GELU); Ba et al. 2016 (layer norm).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gptkit.model.kernels import cpu_kernels, decode_kernels
from gptkit.model.ops.masks import keep_mask, kernel_mask, pack_bits, unpack_bits

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
        ctx.kernels = cpu_kernels() if on_cpu else None
        if ctx.kernels is not None:
            ctx.mask, ctx.dtype = kernel_mask(p), x.dtype
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
        ctx.kernels, ctx.mask = kernels, kernel_mask(p)
        ctx.scale, ctx.dtype = 1.0 / (1.0 - p), y.dtype
        return kernels.dropout_add(x.contiguous(), y.contiguous(), *ctx.mask, ctx.scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad = grad.contiguous()
        return grad, ctx.kernels.dropout(grad, *ctx.mask, ctx.scale, ctx.dtype), None, None


def dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout, ``F.dropout(x, p)``'s semantics (``x`` itself when ``p`` is 0), on
    :func:`~gptkit.model.ops.masks.keep_mask`'s cheaper random numbers."""
    if p == 0.0:
        return x
    return _DropoutFunction.apply(x, p)


def dropout_add(x: Tensor, y: Tensor, p: float) -> Tensor:
    """``x + dropout(y, p)``: the residual connection; one pass on a CPU with the compiled
    kernels."""
    if p > 0.0 and x.device.type == "cpu" and x.shape == y.shape:
        kernels = cpu_kernels()
        if kernels is not None and x.dtype in _KERNEL_DTYPES and y.dtype in _KERNEL_DTYPES:
            return _DropoutAddFunction.apply(x, y, p, kernels)
    return x + dropout(y, p)


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


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(x, approximate=approximate)``. In bf16 CPU training (the erf form, ``x``
    contiguous, the compiled kernels there) a backward in one pass
    (``kernels/elementwise.cpp``: 1.5-2x faster than torch's there)."""
    fast = (
        approximate == "none"
        and x.requires_grad
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.is_contiguous()
    )
    kernels = cpu_kernels() if fast else None
    if kernels is not None:
        return _GELU.apply(x, kernels)
    return F.gelu(x, approximate=approximate)


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


def layer_norm_for_matmul(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` for a matmul to read. In CPU training
    under bf16 autocast, layer norm and autocast's cast to bf16 in one pass by the compiled
    kernel (the fp32 residual stream stays fp32; torch would write the norm in fp32 and
    cast it), with the autocast matmul reading the same bf16 values."""
    fused = (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.is_contiguous()
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    kernels = cpu_kernels() if fused else None
    if kernels is None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return _LayerNormToBF16.apply(x, weight, bias, eps, kernels)


def inference_kernels(*tensors: Tensor) -> Any:
    """``decode.cpp``'s kernels for an eager inference call (under ``torch.no_grad`` or
    ``torch.inference_mode``) on these CPU tensors, else None: not while autograd records
    (their sums round differently from torch's, so a forward with grad enabled stays torch's
    bit for bit), not while torch.compile traces (inductor fuses these ops itself)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if any(t.device.type != "cpu" for t in tensors):
        return None
    return decode_kernels()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``F.rms_norm(x, (C,), weight, eps)``. At CPU inference one pass of the compiled kernel
    (``kernels/decode.cpp``): torch's CPU RMSNorm is six ops, whose set-up dominates a
    decoding step's small rows."""
    kernels = inference_kernels(x, weight)
    usable = x.dtype in _KERNEL_DTYPES and weight.dtype == torch.float32
    if kernels is None or not (usable and x.is_contiguous() and weight.is_contiguous()):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return kernels.rms_norm(x, weight, eps, x.dtype)
