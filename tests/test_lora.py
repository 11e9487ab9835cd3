"""LoRA adapters: exact no-op when fresh, merged == unmerged, only adapters train (and learn),
adapter files round-trip, bad input, cached == uncached generation; every family of
conftest.FAMILIES, and SmolLM2's GGUF when it is present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, REPO, tiny_model
from safetensors.torch import load_file, save_file

from gptkit.checkpoint import load_checkpoint, save_checkpoint
from gptkit.errors import GptkitError
from gptkit.generate import generate
from gptkit.model import GPT
from gptkit.model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    base_state_dict,
    has_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from gptkit.train.optim import param_groups

ALL_TARGETS = ("qkv", "proj", "fc")


def targets_for(model: GPT) -> tuple[str, ...]:
    """Every wrappable layer: the head too when it is not tied to the embedding."""
    return ALL_TARGETS if model.config.tie_embeddings else (*ALL_TARGETS, "lm_head")


def randomize_adapters(model: GPT, seed: int = 1, std: float = 0.05) -> None:
    """Non-zero B (a fresh adapter is an exact no-op, which would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def ids(seed: int = 0, B: int = 2, T: int = 12, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_lora_linear_init_forward_and_merge() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    x = torch.randn(3, 5, 16)
    ref = base(x)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    assert layer.weight is base.weight and layer.bias is base.bias  # the same Parameters
    assert layer.lora_a.shape == (4, 16) and layer.lora_a.abs().sum() > 0
    assert layer.lora_b.shape == (24, 4) and not layer.lora_b.any()
    assert set(layer.state_dict()) == {"weight", "bias", "lora_a", "lora_b"}
    assert torch.equal(layer(x), ref)
    with torch.no_grad():
        layer.lora_b.normal_()
    expected = ref + 2.0 * (x @ layer.lora_a.T @ layer.lora_b.T)  # scale = alpha / r = 2
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    assert layer.merged and layer.lora_a is None and set(layer.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(layer(x), expected)


def test_lora_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(8, 8), rank=2, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fresh_lora_leaves_outputs_unchanged(name: str) -> None:
    model = tiny_model(**FAMILIES[name])
    x = ids()
    ref = model(x)
    apply_lora(model, rank=4, alpha=8.0, targets=targets_for(model))
    assert has_lora(model)
    assert torch.equal(model(x), ref)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_merged_equals_unmerged_and_saves_as_plain_model(name: str, tmp_path: Path) -> None:
    model = tiny_model(**FAMILIES[name])
    base_keys = set(model.state_dict())
    x = ids()
    apply_lora(model, rank=4, alpha=8.0, targets=targets_for(model))
    randomize_adapters(model)
    unmerged = model(x)
    assert not torch.allclose(unmerged, tiny_model(**FAMILIES[name])(x))  # the adapters act
    assert set(base_state_dict(model)) == base_keys

    merge_lora(model)
    assert not has_lora(model) and not hasattr(model, "lora_config")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == base_keys
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(x), unmerged)
    save_checkpoint(tmp_path / "ckpt", model, None)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(loaded(x), unmerged)


def test_only_adapters_require_grad_and_reach_the_optimizer() -> None:
    model = tiny_model(**FAMILIES["llama"])
    apply_lora(model, rank=4, targets=("qkv", "attn.proj", "lm_head"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        f"blocks.{i}.attn.{m}.lora_{ab}" for i in range(2) for m in ("qkv", "proj") for ab in "ab"
    } | {"lm_head.lora_a", "lm_head.lora_b"}
    assert trainable == expected
    assert not isinstance(model.blocks[0].mlp.proj, LoRALinear)  # "attn.proj" picks one
    named = dict(model.named_parameters())
    adapters = {id(named[n]) for n in expected}
    assert {id(p) for p in trainable_parameters(model)} == adapters
    assert set(lora_state_dict(model)) == expected
    grouped = [p for g in param_groups(model, 0.1) for p in g["params"]]
    assert len(grouped) == len(adapters) and {id(p) for p in grouped} == adapters
    C, V, qkv_out = 32, 64, 32 + 2 * 16  # n_kv_head=1, head size 16
    per_layer = 4 * (C + qkv_out) + 4 * (C + C)
    assert sum(p.numel() for p in trainable_parameters(model)) == 2 * per_layer + 4 * (C + V)


def test_lora_learns_a_token_mapping_with_a_frozen_base() -> None:
    """Map 8 source tokens to fixed targets at every position: chance is 1/64.

    The untied head is wrapped too: behind a frozen final norm, a frozen random head with
    GPT-2's small init caps how far the logits can move (the loss plateaus though argmax
    learns the map).
    """
    model = tiny_model(seed=3, **FAMILIES["llama"]).train()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8.0, targets=(*ALL_TARGETS, "lm_head"))
    g = torch.Generator().manual_seed(0)
    src = torch.randperm(64, generator=g)[:8]
    dst = torch.randint(0, 64, (8,), generator=g)
    mapping = torch.zeros(64, dtype=torch.long)
    mapping[src] = dst

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = src[torch.randint(0, 8, (16, 16), generator=g)]
        return x, mapping[x]

    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-2)
    x0, y0 = batch()
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(model(x0).flatten(0, 1), y0.flatten()).item()
    for _ in range(100):
        x, y = batch()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = batch()
    with torch.no_grad():
        logits = model(x)
    last = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    accuracy = (logits.argmax(-1) == y).float().mean().item()
    assert last < 0.25 * first, (first, last)
    assert accuracy > 0.9, accuracy
    for k, v in base_state_dict(model).items():  # the base never moved
        assert torch.equal(v, frozen[k]), k


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_adapter_round_trip(name: str, tmp_path: Path) -> None:
    model = tiny_model(**FAMILIES[name])
    apply_lora(model, rank=4, alpha=4.0, dropout=0.1, targets=targets_for(model))
    randomize_adapters(model)
    x = ids()
    out = model(x)
    save_adapter(model, tmp_path / "adapter")
    tensors = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert set(tensors) == set(lora_state_dict(model))
    assert all(k.endswith((".lora_a", ".lora_b")) for k in tensors)
    size = (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    assert size < 0.5 * sum(v.numel() * 4 for v in base_state_dict(model).values())
    meta = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert meta["format"] == "gptkit.lora/1"
    assert LoRAConfig.from_dict(meta["lora"]) == model.lora_config
    assert meta["base_model"] == model.config.to_dict()

    fresh = load_adapter(tiny_model(**FAMILIES[name]), tmp_path / "adapter")
    assert fresh.lora_config == model.lora_config
    assert torch.equal(fresh(x), out)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(tensors)


def test_bad_input_raises_one_clear_error_each(tmp_path: Path) -> None:
    tied = tiny_model()  # GPT-2 family: lm_head shares the embedding's weight
    with pytest.raises(GptkitError, match=r"match no Linear.*available targets: \[.*'qkv'"):
        apply_lora(tied, targets=("qkv", "c_attn"))
    with pytest.raises(GptkitError, match="tied to the token embedding"):
        apply_lora(tied, targets=("lm_head",))
    with pytest.raises(GptkitError, match="rank must be a positive integer"):
        apply_lora(tied, rank=0)
    assert not has_lora(tied) and all(p.requires_grad for p in tied.parameters())
    apply_lora(tied)
    with pytest.raises(GptkitError, match="already has LoRA"):
        apply_lora(tied)
    with pytest.raises(GptkitError, match="no LoRA adapters to save"):
        save_adapter(tiny_model(), tmp_path / "none")

    randomize_adapters(tied)
    good = tmp_path / "adapter"
    save_adapter(tied, good)
    with pytest.raises(GptkitError, match=r"different base model \(n_embd 32 vs model 48"):
        load_adapter(tiny_model(n_embd=48), good)
    with pytest.raises(GptkitError, match="not a LoRA adapter directory"):
        load_adapter(tiny_model(), tmp_path / "nowhere")

    # tensors that do not fit, under a config that claims the right base: checked by shape
    tensors = load_file(str(good / ADAPTER_WEIGHTS))
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((good / ADAPTER_CONFIG).read_text())
    del meta["weights_sha256"]
    (bad / ADAPTER_CONFIG).write_text(json.dumps(meta))
    save_file(
        {k: v[:2] if k.endswith("lora_a") else v for k, v in tensors.items()}, bad / ADAPTER_WEIGHTS
    )
    target = tiny_model()
    with pytest.raises(GptkitError, match=r"does not fit the model.*shape mismatch"):
        load_adapter(target, bad)
    assert not has_lora(target)  # nothing was changed
    save_file({k: v for k, v in tensors.items() if "blocks.1" not in k}, bad / ADAPTER_WEIGHTS)
    with pytest.raises(GptkitError, match=r"does not fit the model \(missing \['blocks.1"):
        load_adapter(target, bad)

    # a tensors file replaced after its config was written (a torn save)
    save_file({k: v * 2 for k, v in tensors.items()}, good / ADAPTER_WEIGHTS)
    with pytest.raises(GptkitError, match=r"does not match adapter_config\.json"):
        load_adapter(tiny_model(), good)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cached_generation_equals_uncached_with_lora(name: str, char_tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size, **FAMILIES[name])
    apply_lora(model, rank=4, alpha=16.0, targets=targets_for(model))
    randomize_adapters(model, std=0.2)
    kw = dict(max_new_tokens=40, temperature=0.0, stop_at_eos=False)
    prompts = ["First", "def add"]
    cached = generate(model, char_tokenizer, prompts, use_cache=True, **kw)
    assert cached == generate(model, char_tokenizer, prompts, use_cache=False, **kw)


def _smollm2() -> Path:
    env = os.environ.get("GPTKIT_SMOLLM2_GGUF")
    path = Path(env) if env else REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is absent (run `make models` or set GPTKIT_SMOLLM2_GGUF)")
    return path


def test_lora_on_smollm2_gguf(tmp_path: Path) -> None:
    from gptkit import load

    model, tok = load(_smollm2(), quantize=None)
    assert tok is not None
    x = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        ref = model(x)
        if model.config.tie_embeddings:
            with pytest.raises(GptkitError, match="tied to the token embedding"):
                apply_lora(model, targets=("lm_head",))
        apply_lora(model, rank=8, alpha=16.0)
        assert torch.equal(model(x), ref)
        randomize_adapters(model, std=0.02)
        unmerged = model(x)
        save_adapter(model, tmp_path / "adapter")
        assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size < 10_000_000
        merge_lora(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(unmerged, ref)
