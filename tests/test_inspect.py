"""Looking inside the model (gptkit.inspect): attention weights against softmax(QKᵀ/√d +
mask) computed by hand from each layer's weights (GQA, RoPE and GPT-3's banded layers
included), the logit lens against the logits, token losses against ``gptkit eval``, and the
files ``gptkit inspect`` writes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, tiny_model

from gptkit.errors import GptkitError
from gptkit.eval import perplexity
from gptkit.inspect import attention, entropy, logit_lens, rollout, token_losses
from gptkit.model import GPT
from gptkit.model.quant import quantize
from gptkit.tokenizer import BPETokenizer


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), -1)


def by_hand(model: GPT, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's softmax(QKᵀ/√hs + mask), (nh, T, T), from the layer's weights and the
    input its block receives (caught by a hook), with RoPE and GQA written out here."""
    inputs: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0][0])) for b in model.blocks]
    with torch.no_grad():
        model(ids[None])
    for h in hooks:
        h.remove()
    c = model.config
    nh, nkv, hs, T = c.n_head, c.kv_heads, c.head_size, ids.numel()
    out = []
    for i, (block, x) in enumerate(zip(model.blocks, inputs, strict=True)):
        h = block.norm_1(x) if c.norm_position == "pre" else x
        w, b = block.attn.qkv.weight, block.attn.qkv.bias
        qkv = h @ w.T + (b if b is not None else 0)
        q = qkv[:, : nh * hs].reshape(T, nh, hs).transpose(0, 1)
        k = qkv[:, nh * hs : (nh + nkv) * hs].reshape(T, nkv, hs).transpose(0, 1)
        if c.pos_emb == "rope":  # rotate (i, i + hs/2) pairs by angle pos * theta^(-2i/hs)
            angle = torch.arange(T)[:, None] * c.rope_theta ** (-torch.arange(0, hs, 2) / hs)
            cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k[[j * nkv // nh for j in range(nh)]]  # query head j reads key head j // (nh/nkv)
        scores = q @ k.transpose(1, 2) / math.sqrt(hs)
        t, s = torch.arange(T)[:, None], torch.arange(T)[None]
        allowed = s <= t
        if c.is_local_layer(i):
            allowed &= t - s < c.attention_window
        out.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1))
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_attention_equals_softmax_by_hand(name: str) -> None:
    overrides = FAMILIES[name] | (dict(n_head=4, n_kv_head=2) if name == "llama" else {})
    model = tiny_model(**overrides)
    ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(1))
    weights = attention(model, ids)
    c = model.config
    assert weights.shape == (c.n_layer, c.n_head, 12, 12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(c.n_layer, c.n_head, 12))
    for layer, expected in zip(weights, by_hand(model, ids), strict=True):
        torch.testing.assert_close(layer, expected, rtol=1e-5, atol=1e-6)
    if name == "gpt3":  # the banded layer sees only the last 5 positions
        local = [i for i in range(c.n_layer) if c.is_local_layer(i)]
        assert local and (weights[local[0], :, 11, :7] == 0).all()
        assert (weights[local[0], :, 11, 7:] > 0).all()


def test_model_is_untouched_and_the_hooks_do_not_leak() -> None:
    model = tiny_model(**FAMILIES["llama"])
    calls: list[int] = []
    model.blocks[0].attn.register_forward_pre_hook(lambda m, a: calls.append(1))
    attention(model, [1, 2, 3])
    assert calls == [1]  # the model's own hooks still run in the inspected forward
    hooks = [(m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    assert sum(len(f) + len(p) for f, p in hooks) == 1  # and no hook of inspection stayed


def test_quantized_model_and_rollout() -> None:
    model = quantize(tiny_model(**FAMILIES["llama"]), "int8")
    ids = torch.arange(10)
    weights = attention(model, ids)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    lens = logit_lens(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(lens[-1], model(ids[None])[0].float())
    roll = rollout(weights)
    torch.testing.assert_close(roll.sum(-1), torch.ones(10))
    assert (roll.triu(1) == 0).all()  # causal all the way through


@pytest.mark.parametrize("name", ["gpt2", "gpt1", "llama"])
def test_logit_lens_last_layer_is_the_logits(name: str) -> None:
    model = tiny_model(**FAMILIES[name])
    ids = torch.tensor([5, 9, 2, 40, 7])
    lens = logit_lens(model, ids)
    assert lens.shape == (model.config.n_layer, 5, 64)
    with torch.no_grad():
        logits = model(ids[None])[0]
    torch.testing.assert_close(lens[-1], logits)
    assert not torch.equal(lens[0], lens[-1])  # an earlier layer guesses otherwise


def test_token_losses_average_to_eval_perplexity(
    bpe_tokenizer: BPETokenizer, tmp_path: Path
) -> None:
    model = tiny_model(bpe_tokenizer.vocab_size, block_size=64)
    text = "def add(a, b):\n    return a + b\n"
    path = tmp_path / "t.txt"
    path.write_text(text)
    scores = perplexity(model, bpe_tokenizer, str(path), progress=False)
    start = bpe_tokenizer.eos_id
    ids = [start, *bpe_tokenizer.encode(text, allow_special=False)]
    losses = token_losses(model, ids)
    assert losses.shape == (len(ids) - 1,) and scores["tokens"] == len(ids) - 1
    assert losses.mean().item() == pytest.approx(scores["loss"], rel=1e-5)


def test_entropy_of_uniform_and_certain_rows() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf, -math.inf]])
    torch.testing.assert_close(entropy(logits), torch.tensor([math.log(4), 0.0]))


def test_bad_ids_are_refused() -> None:
    model = tiny_model()
    with pytest.raises(GptkitError, match="one sequence"):
        attention(model, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(GptkitError, match="vocabulary"):
        attention(model, [1, 99])
    with pytest.raises(GptkitError, match="context"):
        attention(model, list(range(40)))
    with pytest.raises(GptkitError, match="two tokens"):
        token_losses(model, [3])
