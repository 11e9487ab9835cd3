"""The element-wise kernels (kernels/elementwise.cpp) and dropout's counter-based keep mask
(kernels/keep.h): the mask is the hash the header writes down (checked against the same
formula in torch ops) and keeps 1 - p of the elements with no visible pattern; dropout
equals x * keep / (1 - p) with nothing saved for backward, fused with the residual add bit
for bit; GELU's backward is as close to the exact formula as torch's."""

from __future__ import annotations

import pytest
import torch

from gptkit.model.gpt import Dropout
from gptkit.model.ops import gelu
from gptkit.model.ops.masks import keep_mask

pytestmark = pytest.mark.skipif(
    not torch.cpu._is_avx512_bf16_supported(),
    reason="the compiled kernels need a CPU with AVX512-BF16",
)

M32 = 0xFFFFFFFF


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32 in int64, without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def reference_keep(seed: int, threshold: int, rows: int, cols: int) -> torch.Tensor:
    """keep.h's formula, written out in int64 torch ops."""
    s0, s1 = seed & M32, seed >> 32
    r = torch.arange(rows, dtype=torch.int64)
    key = mix((mix((r & M32) ^ s0) + (r >> 32)) & M32)
    col = mix(mix(torch.arange(cols, dtype=torch.int64) ^ s1))
    return mix(key[:, None] ^ col[None, :]) >= threshold


def kernels():
    from gptkit.model.kernels import cpu_kernels

    k = cpu_kernels()
    assert k is not None, "the kernels did not compile"
    return k


@pytest.mark.parametrize(
    ("seed", "p", "rows", "cols"),
    [(0, 0.2, 5, 16), (12345, 0.1, 7, 33), (2**63 - 2, 0.5, 3, 1), ((7 << 32) | 9, 0.9, 40, 100)],
)
def test_the_kernel_mask_is_the_written_formula(seed, p, rows, cols) -> None:
    threshold = min(round(p * 2**32), 2**32 - 1)
    got = kernels().keep_mask(seed, threshold, rows, cols)
    assert torch.equal(got, reference_keep(seed, threshold, rows, cols))


def test_keep_mask_draws_its_seed_from_torch() -> None:
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    torch.manual_seed(3)
    got = keep_mask((2, 3, 50), 0.25, torch.device("cpu"))
    want = reference_keep(seed, round(0.25 * 2**32), 6, 50).view(2, 3, 50)
    assert torch.equal(got, want)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_mask_keeps_one_minus_p_without_pattern(p: float) -> None:
    torch.manual_seed(0)
    keep = keep_mask((2000, 512), p, torch.device("cpu")).float()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    # neighbouring rows, neighbouring columns, the same position under two seeds
    pairs = [
        (keep[:-1].flatten(), keep[1:].flatten()),
        (keep[:, :-1].flatten(), keep[:, 1:].flatten()),
        (keep.flatten(), keep_mask((2000, 512), p, torch.device("cpu")).float().flatten()),
    ]
    for a, b in pairs:
        assert abs(torch.corrcoef(torch.stack((a, b)))[0, 1].item()) < 4 / n**0.5
    assert keep.sum(1).std() < 2 * (512 * p * (1 - p)) ** 0.5  # rows vary as binomials


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dropout_kernel_equals_the_formula_and_saves_nothing(dtype) -> None:
    x = torch.randn(4, 7, 33, dtype=dtype, requires_grad=True)
    drop = Dropout(0.3).train()
    saved: list[torch.Tensor] = []
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = drop(x)
    assert saved == []  # backward makes the mask again from the seed
    torch.manual_seed(1)
    keep = keep_mask(tuple(x.shape), 0.3, x.device)
    assert torch.equal(y, x * keep * (1 / 0.7))
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, g * keep * (1 / 0.7))


def test_dropout_kernel_and_python_path_agree(monkeypatch) -> None:
    x = torch.randn(64, 100)
    torch.manual_seed(2)
    fast = Dropout(0.2).train()(x)
    monkeypatch.setenv("GPTKIT_KERNELS", "0")  # numpy's masks: another stream, same law
    torch.manual_seed(2)
    slow = Dropout(0.2).train()(x)
    assert not torch.equal(fast, slow)
    for y in (fast, slow):
        kept = y != 0
        assert torch.allclose(y[kept], x[kept] / 0.8)
        assert abs(kept.float().mean().item() - 0.8) < 0.02


@pytest.mark.parametrize(
    ("xdtype", "ydtype"),
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32,) * 2],
)
def test_fused_residual_dropout_equals_the_two_ops(xdtype, ydtype) -> None:
    """x + dropout(y) in one pass (the residual after a bf16 layer onto an fp32 stream):
    the same values and gradients, bit for bit, as the two ops with the same mask."""
    drop = Dropout(0.3).train()
    x = torch.randn(4, 5, 37, dtype=xdtype, requires_grad=True)
    y = torch.randn(4, 5, 37, dtype=ydtype, requires_grad=True)
    torch.manual_seed(1)
    fused = drop.residual(x, y)
    assert type(fused.grad_fn).__name__ == "_DropoutAddFunctionBackward"
    torch.manual_seed(1)
    plain = x + drop(y)
    assert fused.dtype == plain.dtype and torch.equal(fused, plain)
    g = torch.randn_like(plain)
    got, want = torch.autograd.grad(fused, (x, y), g), torch.autograd.grad(plain, (x, y), g)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_gelu_backward_kernel_is_as_close_to_the_formula_as_torch() -> None:
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(300, 257, generator=g)).bfloat16().requires_grad_()  # odd length
    dy = torch.randn(300, 257, generator=g).bfloat16()
    y = gelu(x)
    assert type(y.grad_fn).__name__ == "_GELUBackward"
    assert torch.equal(y, torch.nn.functional.gelu(x))
    (got,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(torch.nn.functional.gelu(x64), x64, dy.double())
    torch_bf16 = torch.ops.aten.gelu_backward(dy, x.detach())

    def err(t: torch.Tensor) -> float:
        return float((t.double() - exact).norm() / exact.norm())

    assert got.dtype == torch.bfloat16 and err(got) <= 1.05 * err(torch_bf16) + 1e-6
    ulp = 2**-7 * torch_bf16.float().abs() + 1e-6  # a bf16 rounding at most
    assert ((got.float() - torch_bf16.float()).abs() <= ulp).all()


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_to_bf16_is_as_close_to_the_formula_as_torch(bias: bool) -> None:
    """Layer norm of the fp32 residual stream written in bf16 for the next matmul (training
    under bf16 autocast): output and gradients as close to fp64 as torch's norm-then-cast."""
    from gptkit.config import ModelConfig
    from gptkit.model.gpt import Norm

    norm = Norm(ModelConfig(vocab_size=8, n_layer=1, n_head=2, n_embd=72, bias=bias))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = (2 * torch.randn(3, 50, 72, generator=g) + 0.5).requires_grad_()
    dy = torch.randn(3, 50, 72, generator=g).bfloat16()
    params = [x, *norm.parameters()]

    def run(fused: bool) -> list[torch.Tensor]:
        with torch.autocast("cpu", torch.bfloat16):
            y = norm.for_matmul(x) if fused else norm(x).to(torch.bfloat16)
        assert y.dtype == torch.bfloat16
        assert (type(y.grad_fn).__name__ == "_LayerNormToBF16Backward") == fused
        return [y, *torch.autograd.grad(y, params, dy)]

    wide = [p.detach().double().requires_grad_() for p in params]
    y64 = torch.nn.functional.layer_norm(wide[0], (72,), *wide[1:], eps=norm.eps)
    exact = [y64.detach(), *torch.autograd.grad(y64, wide, dy.double())]
    for got, torch_way, want in zip(run(True), run(False), exact, strict=True):
        err = [float((t.detach().double() - want).norm() / want.norm()) for t in (got, torch_way)]
        assert got.dtype == torch_way.dtype and err[0] <= 1.1 * err[1] + 1e-7
