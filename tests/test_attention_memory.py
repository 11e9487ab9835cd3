"""Dropout attention that recomputes its probabilities in backward (and dropout that keeps
its mask as bits): same outputs and gradients as the materialised formula with the same
random mask, and far fewer bytes saved for backward."""

from __future__ import annotations

import math

import pytest
import torch

from gptkit.model.gpt import Dropout
from gptkit.model.ops import sdpa
from gptkit.model.ops.masks import keep_mask, pack_bits, unpack_bits
from gptkit.model.ops.sdpa import attention_with_dropout


def reference_attention(q, k, v, mask, p, seed):
    """The formula written out, drawing the mask exactly as the fast path does."""
    nh, nkv = q.shape[1], k.shape[1]
    if nkv != nh:
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    T, S = q.shape[2], k.shape[2]
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    torch.manual_seed(seed)
    keep = keep_mask(tuple(att.shape), p, att.device)
    return (att * keep / (1 - p)) @ v


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_bits_round_trip(n: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(bits, (n,)), mask)


@pytest.mark.parametrize(
    ("B", "nh", "nkv", "T", "S", "masked"),
    [
        (2, 2, 2, 130, 130, False),  # causal, three query tiles
        (3, 4, 2, 70, 70, False),  # grouped-query heads
        (2, 2, 2, 20, 50, False),  # queries after a prefix of keys
        (2, 2, 2, 40, 40, True),  # an explicit mask
    ],
)
def test_recomputed_attention_equals_the_formula(B, nh, nkv, T, S, masked) -> None:
    g = torch.Generator().manual_seed(T + S)
    q = torch.randn(B, nh, T, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, nkv, S, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, nkv, S, 16, generator=g, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(T, S, generator=g) < 0.7
        mask[:, 0] = True  # every query sees a key
    dout = torch.randn(B, nh, T, 16, generator=g, dtype=torch.float64)

    want = reference_attention(q, k, v, mask, 0.2, seed=5)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    torch.manual_seed(5)
    got = attention_with_dropout(q, k, v, mask, 0.2)
    got_grads = torch.autograd.grad(got, (q, k, v), dout)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_attention_saves_no_probabilities() -> None:
    B, H, T = 4, 4, 128
    q, k, v = (torch.randn(B, H, T, 16, requires_grad=True) for _ in range(3))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attention_with_dropout(q, k, v, None, 0.2)
    qkv_bytes = 3 * q.numel() * 4
    probs_bytes = B * H * T * T * 4
    assert sum(saved) < qkv_bytes + probs_bytes / 8  # q, k, v and the mask's bits
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference_attention(q, k, v, None, 0.2, seed=0)
    assert sum(saved) > 2 * probs_bytes  # what autograd keeps for the written-out formula


def test_dropout_equals_the_formula_and_saves_bits() -> None:
    x = torch.randn(6, 33, requires_grad=True)
    drop = Dropout(0.3).train()
    torch.manual_seed(1)
    y = drop(x)
    torch.manual_seed(1)
    keep = keep_mask(tuple(x.shape), 0.3, x.device)
    torch.testing.assert_close(y, x * keep / 0.7)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(gx, keep / 0.7)
    assert torch.equal(drop.eval()(x), x)


# -- the compiled kernel (kernels/attention.cpp): bf16 on CPUs with AVX512-BF16 -----------

needs_kernel = pytest.mark.skipif(
    not torch.cpu._is_avx512_bf16_supported(),
    reason="the compiled attention kernel needs a CPU with AVX512-BF16",
)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


def heads(qkv: torch.Tensor, nh: int, nkv: int, T: int, hs: int):
    """q (B, nh, T, hs) of the last T positions, k and v (B, nkv, S, hs): views of one
    projection output, as the model passes them (row stride (nh + 2 nkv) hs)."""
    B, S, _ = qkv.shape
    q, k, v = qkv.split([nh * hs, nkv * hs, nkv * hs], -1)
    q = q[:, S - T :].reshape(B, T, nh, hs).transpose(1, 2)
    k, v = (t.reshape(B, S, nkv, hs).transpose(1, 2) for t in (k, v))
    return q, k, v


@needs_kernel
@pytest.mark.parametrize(
    ("B", "nh", "nkv", "T", "S", "hs"),
    [
        (2, 6, 6, 256, 256, 64),  # nanoGPT's Shakespeare heads, four query blocks
        (3, 4, 2, 70, 70, 32),  # grouped-query heads, a partial block
        (2, 2, 2, 21, 50, 16),  # queries after a prefix of keys, odd sizes
        (1, 3, 3, 150, 150, 32),  # few heads: a task per query block
        (1, 2, 2, 100, 160, 16),  # the same after a prefix
        (1, 2, 2, 1, 1, 16),  # one position
    ],
)
def test_compiled_kernel_matches_the_formula(B, nh, nkv, T, S, hs) -> None:
    from gptkit.model.kernels import cpu_kernels

    assert cpu_kernels() is not None, "the kernels did not compile"
    g = torch.Generator().manual_seed(T + S)
    qkv = torch.randn(B, S, (nh + 2 * nkv) * hs, generator=g).bfloat16().requires_grad_()
    dout = torch.randn(B, nh, T, hs, generator=g).bfloat16()
    torch.manual_seed(5)
    got = attention_with_dropout(*heads(qkv, nh, nkv, T, hs), None, 0.2)
    assert got.transpose(1, 2).is_contiguous()  # the kernel's (B, T, H, hs) layout
    (got_grad,) = torch.autograd.grad(got, qkv, dout)

    qkv64 = qkv.detach().double().requires_grad_()
    want = reference_attention(*heads(qkv64, nh, nkv, T, hs), None, 0.2, seed=5)
    (want_grad,) = torch.autograd.grad(want, qkv64, dout.double())
    # bf16 inputs and probabilities, fp32 sums: about 3e-3 measured
    assert relative_error(got, want) < 1e-2
    assert relative_error(got_grad, want_grad) < 1e-2


@needs_kernel
def test_kernel_and_python_tiles_agree_and_the_switch_works(monkeypatch) -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = heads(torch.randn(2, 100, 3 * 4 * 32, generator=g).bfloat16(), 4, 4, 100, 32)
    torch.manual_seed(7)
    fast = attention_with_dropout(q, k, v, None, 0.1)
    with monkeypatch.context() as m:  # the Python tiles, keep_mask still the kernels' hash
        m.setattr(sdpa, "_attention_kernel", lambda q, mask: None)
        torch.manual_seed(7)
        slow = attention_with_dropout(q, k, v, None, 0.1)
    assert slow.is_contiguous() and not fast.is_contiguous()  # the two paths did run
    assert relative_error(fast, slow.double()) < 2e-2  # the same mask: both bf16 roundings
    monkeypatch.setenv("GPTKIT_KERNELS", "0")
    assert attention_with_dropout(q, k, v, None, 0.1).is_contiguous()  # switched off


def test_kernel_build_failure_warns_and_falls_back(monkeypatch) -> None:
    from torch.utils import cpp_extension

    from gptkit.model import kernels

    def fail(**_: object) -> None:
        raise RuntimeError("c++ -O3 ... \nattention.cpp:1: error: no AVX512-BF16 here\nninja")

    monkeypatch.setattr(cpp_extension, "load", fail)
    with pytest.warns(UserWarning, match=r"error: no AVX512-BF16 here.*slower Python path"):
        assert kernels._build.__wrapped__("cpu") is None


@needs_kernel
@pytest.mark.parametrize(("T", "S"), [(200, 200), (37, 90)])
def test_inference_op_equals_sdpa(T: int, S: int) -> None:
    from gptkit.model.ops.sdpa import causal_attention

    g = torch.Generator().manual_seed(S)
    q = torch.randn(1, 9, T, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 9, S, 64, generator=g).bfloat16() for _ in range(2))
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask
    )
    got = causal_attention(q, k, v)
    assert got.shape == want.shape and relative_error(got, want) < 1e-2


@needs_kernel
def test_qkv_attention_equals_the_kernel_on_split_heads() -> None:
    """Training attention straight from the qkv projection's output (one (B, T, 3C)
    gradient, no concatenation) computes what the kernel does on q, k, v split off it."""
    from gptkit.model.kernels import cpu_kernels

    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 100, 3 * 4 * 32, generator=g).bfloat16().requires_grad_()
    dout = torch.randn(2, 4, 100, 32, generator=g).bfloat16()
    torch.manual_seed(9)
    fused = sdpa._QKVAttention.apply(qkv, 4, 0.1, cpu_kernels())
    (fused_grad,) = torch.autograd.grad(fused, qkv, dout)
    torch.manual_seed(9)
    split = attention_with_dropout(*heads(qkv, 4, 4, 100, 32), None, 0.1)
    (split_grad,) = torch.autograd.grad(split, qkv, dout)
    assert torch.equal(fused, split) and torch.equal(fused_grad, split_grad)


@needs_kernel
def test_bf16_quantized_model_attends_in_the_kernel() -> None:
    """A bf16-quantized model hands fp32 between its layers; its inference attention runs in
    the bf16 kernel (as the op compiled prefill calls), close to fp32 SDPA's logits."""
    from conftest import tiny_model
    from torch.profiler import profile

    from gptkit.compress import quantize

    model = tiny_model(
        n_embd=64, n_head=4, n_kv_head=2, pos_emb="rope", norm="rmsnorm", mlp="swiglu"
    )
    x = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        q = quantize(model, "bf16")
        with profile() as prof:
            got = q(x)
    assert any(e.name == "gptkit::causal_attention" for e in prof.events())
    assert relative_error(got, want.double()) < 2e-2
