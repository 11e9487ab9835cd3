"""LoRA on a quantized base (QLoRA): a fresh adapter changes nothing, the input's gradient
runs through the dequantized weight, only adapters train, re-quantizing a checkpoint's
dequantized base gives the same integers (so a run resumes exactly), and the adapters
merge into a dequantized model."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, run_losses, tiny_model

from gptkit.checkpoint import load
from gptkit.compress import quantize
from gptkit.data.prepare import prepare
from gptkit.errors import GptkitError
from gptkit.model.lora import LoRALinear, apply_lora, has_lora, merge_lora
from gptkit.model.quant import LAYERS, QuantConfig, QuantLinear, quantize_base
from gptkit.train import train

LLAMA = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", n_kv_head=1, bias=False,
             tie_embeddings=False, n_embd=64, n_head=4)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qlora")
    (root / "a.txt").write_text(SAMPLE_TEXT * 20)
    prepare([str(root / "a.txt")], str(root / "data"), tokenizer="char", progress=False)
    return root / "data"


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fresh_adapters_equal_the_quantized_model(mode: str) -> None:
    model = tiny_model(**LLAMA)
    plain = quantize(copy.deepcopy(model), mode, lm_head="none")
    quantize_base(apply_lora(model, rank=4), mode)
    assert all(
        isinstance(m.base, QuantLinear) for m in model.modules() if isinstance(m, LoRALinear)
    )
    torch.testing.assert_close(model(_ids()), plain(_ids()), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gradient_goes_through_the_dequantized_weight(mode: str) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    layer = LoRALinear(linear, rank=4, alpha=8.0)
    q = LAYERS[mode].from_linear(linear, QuantConfig(mode))
    layer.quantize_base(q)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).square().sum().backward()
    w = q.dequantized() + layer.delta_weight()  # what the layer computes with
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y, x @ w.T + linear.bias, rtol=2e-2, atol=2e-2)  # bf16
    grad_ref = 2 * y @ w  # d(sum y²)/dx
    torch.testing.assert_close(x.grad, grad_ref, rtol=1e-4, atol=1e-4)
    assert layer.lora_a.grad is not None and layer.lora_b.grad is not None
    assert not any(p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_requantizing_the_dequantized_base_is_exact(mode: str) -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(128, 80, bias=False)
    config = QuantConfig(mode)
    first = LAYERS[mode].from_linear(linear, config)
    linear.weight.data = first.dequantized()
    second = LAYERS[mode].from_linear(linear, config)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_qlora_run_trains_adapters_only_resumes_and_merges(corpus: Path, tmp_path: Path) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    kw = dict(preset="tiny", n_embd=64, lora_rank=4, quantize="int4", max_steps=8,
              save_every=4, keep_checkpoints=5, lr=1e-2, log_every=1, progress=False)  # fmt: skip
    summary = train(corpus, full, merge=True, **kw)
    losses = run_losses(full)
    assert losses[8] < losses[1]
    (resumed / "checkpoints").mkdir(parents=True)
    step4 = full / "checkpoints" / "step-0000004"
    shutil.copytree(step4, resumed / "checkpoints" / step4.name)
    train(corpus, resumed, resume=True, progress=False)
    b = run_losses(resumed)
    assert all(losses[s] == b[s] for s in b), [(s, losses[s], b[s]) for s in b]
    tuned, _ = load(full)  # a LoRA checkpoint over the dequantized base
    assert has_lora(tuned)
    base = full / "checkpoints" / "step-0000008"
    requantized = quantize_base(load(base)[0], "int4")  # as a resumed run rebuilds it
    merged, _ = load(summary["merged"])
    assert not has_lora(merged) and not any(isinstance(m, QuantLinear) for m in merged.modules())
    ids = _ids() % tuned.config.vocab_size
    torch.testing.assert_close(merged(ids), merge_lora(copy.deepcopy(tuned))(ids))
    torch.testing.assert_close(merged(ids), requantized(ids), rtol=0.05, atol=0.05)


def test_quantize_needs_lora(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="--lora-rank"):
        train(corpus, tmp_path, preset="tiny", quantize="int4", max_steps=1, progress=False)
    with pytest.raises(GptkitError, match="int8 or int4"):
        train(corpus, tmp_path / "b", preset="tiny", quantize="bf16", max_steps=1, progress=False)
