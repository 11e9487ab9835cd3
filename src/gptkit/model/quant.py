"""Quantized linear layers, and the round-to-nearest transform that swaps a model's
``nn.Linear`` layers for them.

The layers live with the model (the loader rebuilds them from a checkpoint); the model file
stays pure: :func:`quantize` replaces Linear modules in place (as :mod:`gptkit.model.lora`
does for adapters), and every quantized layer takes and returns the model's dtype (fp32),
casting to its kernel's dtype inside, so norms, residuals, RoPE and the KV cache are
untouched.

Modes (a name each, the same in the Python API, the CLI and a checkpoint's config.json)::

    mode      stored weights                             kernel (CPU), activations
    bf16      bf16                                       F.linear, bf16
    int8      int8, one fp32 scale per output row        aten._weight_int8pack_mm, bf16
    int4      4-bit, a bf16 (scale, zero) pair per       aten._weight_int4pack_mm_for_cpu,
              group_size inputs of each row              bf16

The output head has a mode of its own (``lm_head``); "auto" gives it bf16 under bf16, the
int8 weight-only kernel under int8 (the accurate choice), and ``int8-dynamic`` under int4
(the fast one): int8 weights with the activation vector quantized per call (fbgemm's W8A8
GEMM, as ``torch.ao``'s dynamic Linear). Measured on SmolLM2-135M, one core, loss on 256
tokens of held-out Shakespeare (fp32: 3.575 nats)::

    head           ms/token   loss with int4 blocks
    int8-dynamic     1.1      3.580 - 3.596 (varies with the blocks' mode and the CPU)
    int4             1.7      3.643
    int8             4.8      3.578

and a dynamic head's logits are fp32, where the bf16-output kernels round logits near 20
to steps of 0.125 (greedy ties). Dynamic int8 is not offered for the blocks: one scale for
a whole activation vector cannot hold SmolLM2's outlier channels (its mlp.proj inputs
above all; the loss went from 3.58 to 4.50), and fbgemm's packed weights are opaque to
``torch.compile``.

Quantizers (round to nearest):

- int8, per output channel, symmetric: ``s = max|w_row| / 127``, ``q = round(w / s)`` in
  [-127, 127], ``w ≈ q · s`` (torchao's int8 weight-only; LLM.int8() without outliers).
- int4, per group of ``group_size`` consecutive inputs, asymmetric (min-max), in the layout
  of the "tinygemm" kernel that gpt-fast and torchao's int4 weight-only use:
  ``s = (max - min) / 15``, ``z = min + 8 s``, ``q = round((w - min) / s)`` in [0, 15],
  ``w ≈ (q - 8) · s + z``. This is llama.cpp's Q4_1 (``w ≈ q · d + m``) with ``d = s`` and
  ``m = z - 8 s``, so a Q4_1 GGUF re-quantized with group 32 keeps its own grid (group 64
  does not: SmolLM2's perplexity rises by a third).

The tied output head (``lm_head`` sharing ``wte.weight``) is quantized as its own layer from
the embedding's values; the embedding itself stays fp32 and keeps working for lookups.

References: gpt-fast ``quantize.py`` (int8 / int4 weight-only, the tinygemm int4 layout);
torchao ``quantization/`` (``int4_weight_only``, ``int8_weight_only``,
``int8_dynamic_activation_int8_weight``); PyTorch ``torch.ao.nn.quantized.dynamic.Linear``
(fbgemm dynamic quantization); Dettmers et al. 2022 (LLM.int8()); llama.cpp ``ggml-quants.c``
(Q4_1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.config import _JsonMixin
from gptkit.errors import GptkitError
from gptkit.model.gpt import GPT
from gptkit.model.kernels import cpu_supports, decode_kernels
from gptkit.model.lora import LoRALinear, has_lora, replace_module

MODES = ("bf16", "int8", "int4")
#: what the output head may be: a mode, dynamic int8, or "none" (left as it is)
HEAD_MODES = (*MODES, "int8-dynamic", "none")
#: the head's mode under "auto" (see the module docstring for the measurements)
AUTO_HEAD = {"bf16": "bf16", "int8": "int8", "int4": "int8-dynamic"}
#: group sizes the int4 kernel accepts
GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantConfig(_JsonMixin):
    """How a model is quantized; stored in a quantized checkpoint's ``config.json``."""

    mode: str = "int4"  # the blocks' Linear layers: one of MODES
    group_size: int = 32  # int4 only: inputs that share one (scale, zero) pair
    lm_head: str = "auto"  # the output head: one of HEAD_MODES, or auto (AUTO_HEAD)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise GptkitError(
                f"unknown quantization mode {self.mode!r}; choose one of {', '.join(MODES)}"
            )
        if self.group_size not in GROUP_SIZES:
            raise GptkitError(
                f"int4 group_size must be one of {GROUP_SIZES}, got {self.group_size!r}"
            )
        if self.lm_head == "auto":
            object.__setattr__(self, "lm_head", AUTO_HEAD[self.mode])
        if self.lm_head not in HEAD_MODES:
            raise GptkitError(
                f"unknown lm_head mode {self.lm_head!r}; choose auto or one of "
                f"{', '.join(HEAD_MODES)}"
            )


# -- quantizers (pure functions on a weight matrix) ------------------------------------------


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``(q (N, K) int8, scale (N,) fp32)``, w ≈ q · scale.

    The scale is rounded to bf16 first, so the bf16 kernel sees exactly the scale the
    integers were rounded against."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).bfloat16().float()  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Asymmetric group-wise int4: ``(q (N, K) uint8 in [0, 15], scales_and_zeros
    (K / group_size, N, 2) bf16)``, w ≈ (q - 8) · scale + zero (the tinygemm layout)."""
    w = w.detach().float()
    N, K = w.shape
    if K % group_size:
        raise GptkitError(
            f"int4 group_size {group_size} does not divide the layer's {K} inputs; "
            f"choose a group size that divides {K} (32 divides every gptkit width)"
        )
    g = w.reshape(N, K // group_size, group_size)  # (N, G, gs)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (N, G)
    scale = ((hi - lo) / 15).clamp(min=1e-6).bfloat16()
    zero = (lo + 8 * scale.float()).bfloat16()
    # Round against the stored bf16 scale and zero, so dequantization meets the same grid.
    low = zero.float() - 8 * scale.float()
    q = torch.round((g - low[..., None]) / scale.float()[..., None]).clamp(0, 15)
    q = q.reshape(N, K).to(torch.uint8)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return q, scales_and_zeros  # (N, K), (G, N, 2)


def dequantize_int4(q: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """The fp32 weight (N, K) an int4 layer computes with (for tests and error reports)."""
    scale = scales_and_zeros[..., 0].float().repeat_interleave(group_size, 0).T  # (N, K)
    zero = scales_and_zeros[..., 1].float().repeat_interleave(group_size, 0).T
    return (q.float() - 8) * scale + zero


def _pack_nibbles(q: Tensor) -> Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8; column 2j in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def _unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of :func:`_pack_nibbles`."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def gemv_tiles(q: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """The operand of ``kernels/decode.cpp``'s ``int4_gemv`` for int4 values q (N, K) and
    their (scale, zero) pairs (G, N, 2) bf16: rows eight at a time (the last tile padded with
    zero weights), per group 32 columns at a time in four 32-byte chunks, chunk c's byte
    4r + j holding row r's column 8c + j (low nibble) and 8c + 4 + j (high nibble), then the
    tile's eight scales and eight zeros: (ceil(N/8), G, 4 · group_size + 32) uint8."""
    N, K = q.shape
    pad = -N % 8
    sz = scales_and_zeros.transpose(0, 1)  # (N, G, 2)
    if pad:  # (8 - 8) · 0 + 0 = 0
        q, sz = F.pad(q, (0, 0, 0, pad), value=8), F.pad(sz, (0, 0, 0, 0, 0, pad))
    T, G, S = (N + pad) // 8, K // group_size, group_size // 32
    # column k = g·group + s·32 + c·8 + h·4 + j, row t·8 + r -> (T, G, S, c, h, r, j)
    q = q.to(torch.uint8).view(T, 8, G, S, 4, 2, 4).permute(0, 2, 3, 4, 5, 1, 6)
    nibbles = (q[..., 0, :, :] | (q[..., 1, :, :] << 4)).reshape(T, G, S * 128)
    pairs = sz.reshape(T, 8, G, 2).permute(0, 2, 3, 1).contiguous()  # (T, G, 2, 8) bf16
    return torch.cat([nibbles, pairs.view(torch.uint8).reshape(T, G, 32)], -1).contiguous()


# -- quantized layers --------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """Base of the quantized layers: ``y = x Wᵀ + b`` for x (..., K) in any float dtype, y in
    x's dtype. Subclasses hold their weights as buffers (what a checkpoint stores) and may
    derive a kernel-specific form of them in :meth:`prepare` (never stored: it can depend
    on the CPU)."""

    mode: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(bias.detach().float().clone(), False) if bias is not None else None
        self.register_load_state_dict_post_hook(lambda module, _: module.prepare())

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> QuantLinear:
        raise NotImplementedError

    @classmethod
    def empty(
        cls, in_features: int, out_features: int, bias: bool, config: QuantConfig
    ) -> QuantLinear:
        """A layer of the right shapes to load a state dict into (zero weights)."""
        linear = nn.Linear(in_features, out_features, bias, device="meta")
        linear.weight = nn.Parameter(torch.zeros(out_features, in_features), False)
        if bias:
            linear.bias = nn.Parameter(torch.zeros(out_features), False)
        return cls.from_linear(linear, config)

    def prepare(self) -> None:
        """Rebuild the kernel's form of the weights from the buffers (after a load)."""

    def _matmul(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def dequantized(self) -> Tensor:
        """The fp32 weight (N, K) this layer computes with."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, self.in_features)
        if x.requires_grad and torch.is_grad_enabled():  # LoRA below: the input needs a grad
            y = _FrozenMatmul.apply(x2d, self)
        else:
            y = self._matmul(x2d)  # (B*T, N)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}"


class _FrozenMatmul(torch.autograd.Function):
    """``layer._matmul(x)`` with a gradient for x alone, ``dy · W`` on the dequantized
    weight (the int4 and int8 kernels have no derivative; the weight is frozen): what lets
    LoRA adapters below a quantized layer learn (QLoRA, Dettmers et al. 2023)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: QuantLinear) -> Tensor:
        ctx.layer, ctx.dtype = layer, x.dtype
        return layer._matmul(x).to(x.dtype)  # cast here: the gradient then comes unrounded

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        w = ctx.layer.dequantized()  # (N, K), rebuilt per call rather than kept in memory
        return (grad.float() @ w).to(ctx.dtype), None


# oneDNN's matmul on a weight it has laid out in its own blocked format ahead of time:
# F.linear on a plain bf16 weight has oneDNN reorder the weight on every call, which costs
# as much as a batch-1 product itself. A custom op, since torch.compile's own lowering of
# mkldnn._linear_pointwise takes frozen (constant) weights only.
_lib = torch.library.Library("gptkit", "DEF")
_lib.define("bf16_linear(Tensor x, Tensor packed, int out_features) -> Tensor")
_lib.impl(
    "bf16_linear",
    lambda x, packed, n: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
    "CompositeExplicitAutograd",
)


@torch.library.register_fake("gptkit::bf16_linear")
def _bf16_linear_shape(x: Tensor, packed: Tensor, out_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _packs_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):  # a build without these ops
        return False


PACKS_BF16 = _packs_bf16()


class BF16Linear(QuantLinear):
    """bf16 weights and activations (half of fp32's bytes; native bf16 dot products).

    On a CPU with native bf16, :meth:`prepare` also keeps the weight in oneDNN's blocked
    layout (``packed``, not stored in checkpoints; as many bytes again as ``weight``): on
    SmolLM2-135M it makes a decode step's products 1.4x and a 200-token prefill's 1.07x
    faster than F.linear. Like the int4 layer's packed form, it is derived once: after
    changing ``weight`` in place, call :meth:`prepare` (``load_state_dict`` does).
    """

    mode = "bf16"
    #: the dtype the model computes attention in around these layers (read by the model's
    #: attention, so a bf16 model attends in bf16 too)
    compute_dtype = torch.bfloat16
    packed: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.prepare()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> QuantLinear:
        return cls(linear.weight, linear.bias)

    def prepare(self) -> None:
        # A plain attribute: oneDNN's opaque tensor cannot be copied, cast or moved as
        # buffers are, so _apply and deepcopy rebuild it instead.
        w = self.weight
        ok = w.device.type == "cpu" and w.dtype == torch.bfloat16 and PACKS_BF16
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w) if ok else None

    def _apply(self, fn: Any, recurse: bool = True) -> BF16Linear:
        self.packed = None
        super()._apply(fn, recurse)
        self.prepare()
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "packed": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.prepare()

    def dequantized(self) -> Tensor:
        return self.weight.float()

    def _matmul(self, x: Tensor) -> Tensor:
        x = x.to(torch.bfloat16)
        if self.packed is not None and x.device.type == "cpu" and not x.requires_grad:
            return torch.ops.gptkit.bf16_linear(x, self.packed, self.out_features)
        return F.linear(x, self.weight)


class Int8Linear(QuantLinear):
    """Weight-only int8 (W8A16): int8 rows and fp32 scales; bf16 activations."""

    mode = "int8"
    scale_bf16: Tensor

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("weight", qweight.contiguous())  # (N, K) int8
        self.register_buffer("scale", scale.float().contiguous())  # (N,)
        self.prepare()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> QuantLinear:
        return cls(*quantize_int8(linear.weight), linear.bias)

    def prepare(self) -> None:
        self.register_buffer("scale_bf16", self.scale.bfloat16(), persistent=False)

    def dequantized(self) -> Tensor:
        return self.weight.float() * self.scale[:, None]  # the scale is bf16-exact

    def _matmul(self, x: Tensor) -> Tensor:
        x = x.to(torch.bfloat16).contiguous()
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale_bf16)


def _has_vnni() -> bool:
    """Whether the CPU has AVX512-VNNI: its int8 dot products accumulate in int32, so fbgemm
    may use all 8 bits of the activations. Without it, 7 bits (``reduce_range``, as
    ``torch.ao``'s dynamic Linear does), so the int16 sums of vpmaddubsw cannot saturate."""
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_vnni" in f.read()
    except OSError:
        return False


_HAS_VNNI = _has_vnni()


class Int8DynamicLinear(Int8Linear):
    """Dynamic W8A8: the int8 weights of :class:`Int8Linear`, and activations quantized per
    call (one scale per tensor) for fbgemm's int8 GEMM, with fp32 in and out."""

    mode = "int8-dynamic"

    def prepare(self) -> None:
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch's quantized tensors warn of their deprecation
            warnings.simplefilter("ignore")
            q = torch._make_per_channel_quantized_tensor(
                self.weight.cpu(), self.scale.double().cpu(), zero_points, 0
            )
            # Not a buffer: an opaque fbgemm object, rebuilt from the int8 buffers.
            self._packed = torch.ops.quantized.linear_prepack(q, None)

    def _matmul(self, x: Tensor) -> Tensor:
        x = x.float().contiguous()
        return torch.ops.quantized.linear_dynamic(x, self._packed, not _HAS_VNNI)


#: CPUs where eager inference multiplies int4 layers through ``kernels/decode.cpp``'s
#: ``int4_gemv`` (activations as int8, integer dot products): AVX2 without AVX-512, where it
#: beats torch's int4 kernel 2-3x at any number of rows, and an fp32 GEMM on the dequantized
#: weight up to 200 rows and more (SmolLM2's layers on an AMD EPYC Zen 1); torch's kernel
#: elsewhere
INT4_GEMV = cpu_supports("avx2") and not cpu_supports("avx512")


class Int4Linear(QuantLinear):
    """Group-wise int4 weights (two per byte) and bf16 (scale, zero) pairs; bf16 activations.

    The kernel wants the weight in a CPU-specific tiled layout and an output width that is
    a multiple of 16: :meth:`prepare` pads the rows with zeros and packs them, and the
    output is cut back to ``out_features``. Where :data:`INT4_GEMV` holds, eager inference
    goes through ``kernels/decode.cpp``'s ``int4_gemv`` instead, on the weight in its tiles
    (:func:`gemv_tiles`).
    """

    mode = "int4"
    packed: Tensor
    padded_scales: Tensor

    def __init__(
        self, qweight: Tensor, scales_and_zeros: Tensor, group_size: int, bias: Tensor | None
    ):
        super().__init__(qweight.shape[1] * 2, qweight.shape[0], bias)
        self.group_size = group_size
        self.register_buffer("weight", qweight.contiguous())  # (N, K/2) uint8, two per byte
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())  # (G, N, 2)
        self.prepare()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> QuantLinear:
        q, sz = quantize_int4(linear.weight, config.group_size)
        return cls(_pack_nibbles(q), sz, config.group_size, linear.bias)

    def prepare(self) -> None:
        q = _unpack_nibbles(self.weight).int()  # (N, K)
        pad = -self.out_features % 16
        sz = self.scales_and_zeros
        if pad:
            q = F.pad(q, (0, 0, 0, pad), value=8)  # (q - 8) · s + 0 = 0 in the padded rows
            sz = F.pad(sz, (0, 0, 0, pad))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.cpu(), 1)
        self.register_buffer("packed", packed.to(self.weight.device), persistent=False)
        self.register_buffer("padded_scales", sz.contiguous(), persistent=False)
        tiles = None
        if INT4_GEMV:
            tiles = gemv_tiles(q[: self.out_features], self.scales_and_zeros, self.group_size)
        self.register_buffer("gemv_tiles", tiles, persistent=False)

    def dequantized(self) -> Tensor:
        q = _unpack_nibbles(self.weight)
        return dequantize_int4(q, self.scales_and_zeros, self.group_size)

    def _matmul(self, x: Tensor) -> Tensor:
        gemv = self._gemv(x)
        x = x.to(torch.bfloat16).contiguous()  # both kernels read bf16 rows
        if gemv:  # traced by torch.compile: the same kernel, as an op in the graph
            compiling = torch.compiler.is_compiling()
            kernel = torch.ops.gptkit.int4_gemv if compiling else decode_kernels().int4_gemv
            return kernel(x, self.gemv_tiles, self.out_features, self.group_size)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.padded_scales
        )
        return y[:, : self.out_features] if y.shape[1] != self.out_features else y

    def _gemv(self, x: Tensor) -> bool:
        """Whether ``int4_gemv`` multiplies: inference (eval mode) of fp32 or bf16 rows on a
        CPU where :data:`INT4_GEMV` holds, its kernels compiled. Training (QLoRA) keeps
        torch's kernel: bf16 activations, not int8."""
        if self.training or self.gemv_tiles is None or x.device.type != "cpu":
            return False
        return x.dtype in (torch.float32, torch.bfloat16) and decode_kernels() is not None


@torch.library.custom_op("gptkit::int4_gemv", mutates_args=())
def _int4_gemv_op(x: Tensor, tiles: Tensor, out_features: int, group_size: int) -> Tensor:
    """``int4_gemv`` where torch.compile traces an int4 layer (eager calls skip the op's
    dispatch, which costs as much as a small product)."""
    return decode_kernels().int4_gemv(x, tiles, out_features, group_size)


@_int4_gemv_op.register_fake
def _(x: Tensor, tiles: Tensor, out_features: int, group_size: int) -> Tensor:
    return x.new_empty((x.shape[0], out_features), dtype=torch.bfloat16)


LAYERS: dict[str, type[QuantLinear]] = {
    cls.mode: cls for cls in (BF16Linear, Int8Linear, Int8DynamicLinear, Int4Linear)
}


# -- whole models ------------------------------------------------------------------------------


def _plan(model: GPT, config: QuantConfig) -> dict[str, type[QuantLinear]]:
    """Path -> layer class for every Linear a quantization replaces: each block's in
    ``config.mode``, and the head in ``config.lm_head``. A classification head (a few rows)
    stays as it is."""
    plan: dict[str, type[QuantLinear]] = {
        name: LAYERS[config.mode]
        for name, module in model.named_modules()
        if name.startswith("blocks.") and isinstance(module, nn.Linear)
    }
    if config.lm_head != "none":
        plan["lm_head"] = LAYERS[config.lm_head]
    return plan


def quantization(model: nn.Module) -> QuantConfig | None:
    """The :class:`QuantConfig` a model was quantized with, or None (read off its layers)."""
    blocks = [m for n, m in model.named_modules() if n.startswith("blocks.")]
    layers = [m for m in blocks if isinstance(m, QuantLinear)]
    if not layers:
        return None
    group = next((m.group_size for m in layers if isinstance(m, Int4Linear)), 32)
    head = getattr(model, "lm_head", None)
    if isinstance(head, Int4Linear):
        group = head.group_size
    head_mode = head.mode if isinstance(head, QuantLinear) else "none"
    return QuantConfig(layers[0].mode, group, head_mode)


def quantize(
    model: GPT,
    mode: str | QuantConfig = "int4",
    group_size: int = 32,
    lm_head: str = "auto",
) -> GPT:
    """Quantize ``model``'s Linear layers in place and return it (in eval mode).

    Args:
        model: a GPT; LoRA adapters must be merged first.
        mode: "bf16", "int8" or "int4" for the blocks' layers (or a :class:`QuantConfig`).
        group_size: int4 only: inputs per (scale, zero) pair, 32, 64, 128 or 256; it must
            divide every layer's input width.
        lm_head: the output head's mode: "auto" (bf16, int8, int8-dynamic under bf16, int8,
            int4), a mode, "int8-dynamic", or "none" to leave it as it is.
    """
    config = mode if isinstance(mode, QuantConfig) else QuantConfig(mode, group_size, lm_head)
    done = quantization(model)
    if done is not None:
        raise GptkitError(
            f"the model is already quantized ({done.mode}); quantize a full-precision model"
        )
    if has_lora(model):
        raise GptkitError("the model has unmerged LoRA adapters; merge them first (merge_lora)")
    if next(model.parameters()).device.type != "cpu" and "int4" in (config.mode, config.lm_head):
        raise GptkitError("int4 runs on the CPU kernel only; move the model to the CPU first")
    for path, layer in _plan(model, config).items():
        linear = model.get_submodule(path)
        assert isinstance(linear, nn.Linear)
        replace_module(model, path, layer.from_linear(linear, config))
    return model.eval()


def quantized_skeleton(model: GPT, config: QuantConfig) -> GPT:
    """Swap in quantized layers of the right shapes (contents arbitrary), to load a quantized
    state dict into; works on a model built on the meta device."""
    for path, layer in _plan(model, config).items():
        linear = model.get_submodule(path)
        assert isinstance(linear, nn.Linear)
        bias = linear.bias is not None
        with torch.device("cpu"):
            new = layer.empty(linear.in_features, linear.out_features, bias, config)
        replace_module(model, path, new)
    return model


def quantize_base(model: GPT, mode: str, group_size: int = 32) -> GPT:
    """QLoRA (Dettmers et al. 2023): quantize, in place, the frozen base weight under each
    LoRA adapter to ``mode`` (int8 or int4); the adapters stay in full precision and train.
    Layers without an adapter stay as they are. Returns ``model``.

    The model's state dict still shows each adapted layer's base as a plain fp32 ``weight``
    (dequantized; see :meth:`LoRALinear.quantize_base`), so a checkpoint of it loads
    anywhere, and quantizing that weight again gives the same integers back.
    """
    if not has_lora(model):
        raise GptkitError("quantize_base wants a LoRA model; apply_lora first (or quantize)")
    if mode not in ("int8", "int4"):
        raise GptkitError(f"QLoRA quantizes the base to int8 or int4, not {mode!r}")
    config = QuantConfig(mode, group_size, lm_head="none")
    for module in model.modules():
        if isinstance(module, LoRALinear) and module.base is None and not module.merged:
            linear = nn.Linear(module.in_features, module.out_features, False, device="meta")
            linear.weight, linear.bias = module.weight, module.bias
            module.quantize_base(LAYERS[mode].from_linear(linear, config))
    return model
