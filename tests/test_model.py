"""The model's variants: GPT-3's banded attention, shapes, and the meta-device build."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from gptkit.config import PRESETS, ModelConfig
from gptkit.model import GPT


def test_banded_attention_with_a_wide_band_equals_dense() -> None:
    ids = torch.randint(0, 64, (2, 20))
    dense = tiny_model(seed=3)
    wide = tiny_model(seed=3, attention_pattern="alternating", attention_window=20)
    narrow = tiny_model(seed=3, attention_pattern="alternating", attention_window=3)
    torch.testing.assert_close(wide(ids), dense(ids), rtol=0, atol=1e-6)
    assert not torch.allclose(narrow(ids)[:, 3:], dense(ids)[:, 3:], atol=1e-4)
    # Within the band the two agree: the first 3 positions see the same keys.
    torch.testing.assert_close(narrow(ids)[:, :3], dense(ids)[:, :3], rtol=0, atol=1e-6)


def test_banded_layers_ignore_tokens_beyond_the_band() -> None:
    # Layer 0 is dense and mixes every earlier token in, so check the banded layers' mask.
    model = tiny_model(attention_pattern="alternating", attention_window=4)
    pos = torch.arange(10)[None]
    dense, local = model._masks(pos, None)
    assert dense is None  # dense layers use SDPA's causal fast path
    i, j = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    assert torch.equal(local[0, 0], (j <= i) & (i - j < 4))
    assert [b.local for b in model.blocks] == [False, True]


def test_logits_shape_and_dtype() -> None:
    model = tiny_model()
    logits = model(torch.randint(0, 64, (3, 7)))
    assert logits.shape == (3, 7, 64) and logits.dtype == torch.float32


def test_gpt3_175b_builds_on_the_meta_device_without_memory() -> None:
    cfg = ModelConfig(**PRESETS["gpt3-175b"].model)
    with torch.device("meta"):
        model = GPT(cfg)
    assert 174e9 < model.num_params() < 176e9
    assert all(p.is_meta for p in model.parameters())


def test_fast_dropout_keeps_the_right_fraction_and_scale() -> None:
    from gptkit.model.gpt import Dropout
    from gptkit.model.ops.masks import keep_mask

    torch.manual_seed(0)
    keep = keep_mask((1000, 1000), 0.2, torch.device("cpu"))
    assert abs(keep.float().mean().item() - 0.8) < 0.002
    drop = Dropout(0.2).train()
    x = torch.ones(1000, 1000)
    y = drop(x)
    assert set(y.unique().tolist()) == {0.0, 1.25}
    assert abs(y.mean().item() - 1.0) < 0.01
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("kernels", ["1", "0"])  # keep.h's hash, or numpy's two streams
def test_cpu_dropout_masks_follow_the_seed_not_the_threads(monkeypatch, kernels) -> None:
    from gptkit.model.ops.masks import keep_mask

    monkeypatch.setenv("GPTKIT_KERNELS", kernels)
    cpu, shape = torch.device("cpu"), (3, 700, 100)  # large: two halves, two streams
    threads = torch.get_num_threads()
    masks = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            torch.manual_seed(5)
            masks.append(keep_mask(shape, 0.1, cpu))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
    first, second = masks[0].view(2, -1).float()  # the halves are independent streams
    assert abs(first.mean().item() - 0.9) < 0.003 and abs(second.mean().item() - 0.9) < 0.003
    assert abs(torch.corrcoef(torch.stack((first, second)))[0, 1].item()) < 0.01
    assert not torch.equal(keep_mask(shape, 0.1, cpu), masks[0])  # the generator moved on


def test_attention_with_dropout_zero_equals_sdpa() -> None:
    from gptkit.model.ops.sdpa import attention_with_dropout

    torch.manual_seed(0)
    q = torch.randn(2, 4, 7, 8)
    k, v = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)  # grouped-query: 2 kv heads
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
    )
    torch.testing.assert_close(attention_with_dropout(q, k, v, None, 1e-9), want)
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True
    )
    torch.testing.assert_close(attention_with_dropout(q, k, v, mask, 1e-9), want)


def test_rope_table_gives_rope_tables_and_follows_the_model() -> None:
    from conftest import FAMILIES

    from gptkit.model.gpt import rope_tables

    model = tiny_model(**FAMILIES["llama"])
    c = model.config
    pos = torch.tensor([[0, 3, 7, c.block_size - 1]])
    cos, sin = rope_tables(pos, c.head_size, c.rope_theta)
    torch.testing.assert_close(model.rope[0][pos][:, None], cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.rope[1][pos][:, None], sin, rtol=0, atol=1e-6)
    # a dtype cast leaves the table fp32; a model built on the meta device gets a real one
    assert model.to(torch.bfloat16).rope.dtype == torch.float32
    with torch.device("meta"):
        empty = GPT(c)
    assert empty.rope.is_meta
    empty = empty.to_empty(device="cpu")
    assert not empty.rope.is_meta and torch.equal(empty.rope, model.rope)
    assert GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8)).rope is None


@pytest.mark.skipif(
    not torch.cpu._is_avx512_bf16_supported(),
    reason="the compiled attention kernel needs a CPU with AVX512-BF16",
)
@pytest.mark.parametrize("dropout", [0.2, 0.0])
def test_bf16_training_with_the_attention_kernel_matches_torch(monkeypatch, dropout) -> None:
    # head size 16 takes the compiled kernel under bf16 autocast; without it the Python tiles
    # (with dropout) or SDPA (without)
    model = tiny_model(n_embd=64, n_head=4, dropout=dropout).train()
    x = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(1)
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    fast_loss, fast = loss_and_grads()
    from gptkit.model.ops import sdpa  # attention without the kernel; the same dropout masks

    monkeypatch.setattr(sdpa, "_attention_kernel", lambda q, mask: None)
    slow_loss, slow = loss_and_grads()
    assert not all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))  # two paths ran
    assert abs(fast_loss.item() - slow_loss.item()) < 1e-2 * slow_loss.item()
    for a, b in zip(fast, slow, strict=True):
        assert (a - b).norm() <= 3e-2 * b.norm() + 1e-6
