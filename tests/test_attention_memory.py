"""Dropout attention that recomputes its probabilities in backward (and dropout that keeps
its mask as bits): same outputs and gradients as the materialised formula with the same
random mask, and far fewer bytes saved for backward."""

from __future__ import annotations

import math

import pytest
import torch

from gptkit.model.gpt import Dropout, attention_with_dropout, keep_mask, pack_bits, unpack_bits


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
