"""The model's variants: GPT-3's banded attention, shapes, and the meta-device build."""

from __future__ import annotations

import torch
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
