"""Muon, the wsd schedule, stopping at a target loss, and fp32 attention under bf16 autocast."""

from __future__ import annotations

import copy
import itertools
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, run_losses, tiny_config

from gptkit.checkpoint import load
from gptkit.config import TrainConfig
from gptkit.data.prepare import prepare
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.model.ops.sdpa import _slow_bf16_sdpa_backward
from gptkit.train import lr_at, make_optimizer, optim, train
from gptkit.train.optim import Muon, orthogonalize


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(SAMPLE_TEXT * 20)
    prepare([str(root / "a.txt")], str(root / "data"), tokenizer="char", progress=False)
    return root / "data"


@pytest.mark.parametrize("native_bf16", [True, False])
def test_orthogonalize_keeps_singular_vectors_and_flattens_singular_values(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool
) -> None:
    """In bf16 where the CPU has it natively, in fp32 elsewhere: the same result."""
    monkeypatch.setattr(optim, "PACKS_BF16", native_bf16)
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 64, 32), (2, 24, 96)]:
        m = torch.randn(shape, generator=g) * torch.logspace(-1, 0, shape[-1])  # condition 10
        out = orthogonalize(m)
        assert out.dtype == (torch.bfloat16 if native_bf16 else torch.float32)
        out = out.float()
        assert out.shape == m.shape
        s = torch.linalg.svdvals(out)
        assert s.min() > 0.6 and s.max() < 1.25, s  # every direction near unit size
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        polar = u @ vh  # the exact semi-orthogonal factor
        cos = (out * polar).sum((-2, -1)) / (out.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert (cos > 0.95).all(), cos


def _model_and_grads(seed: int = 0) -> tuple[GPT, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = GPT(tiny_config(bias=True))
    grads = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(3)]
    return model, grads


def _run(model: GPT, opt: torch.optim.Optimizer, grads: list[dict[str, torch.Tensor]]) -> None:
    for step in grads:
        for n, p in model.named_parameters():
            p.grad = step[n].clone()
        opt.step()


def test_muon_matches_torch_muon_and_adamw() -> None:
    """The hidden matrices follow torch.optim.Muon and the rest torch.optim.AdamW."""
    cfg = TrainConfig(optimizer="muon", lr=1e-2, muon_lr=0.05, weight_decay=0.1)
    ours, grads = _model_and_grads()
    theirs, _ = _model_and_grads()
    opt = make_optimizer(ours, cfg)
    assert isinstance(opt, Muon)
    for group in opt.param_groups:
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
    _run(ours, opt, grads)

    hidden = [p for n, p in theirs.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    ids = {id(p) for p in hidden}
    rest = [p for p in theirs.parameters() if id(p) not in ids]
    ref = [
        torch.optim.Muon(hidden, lr=0.05, weight_decay=0.1, momentum=0.95, nesterov=True),
        torch.optim.AdamW(
            [
                {"params": [p for p in rest if p.dim() == 2], "weight_decay": 0.1},
                {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=1e-2,
            betas=(0.9, 0.99),
            eps=1e-8,
        ),
    ]
    for step in grads:
        for n, p in theirs.named_parameters():
            p.grad = step[n].clone()
        for o in ref:
            o.step()
    start, _ = _model_and_grads()
    for (n, a), b, s in zip(
        ours.named_parameters(), theirs.parameters(), start.parameters(), strict=True
    ):
        assert (b - s).abs().max() > 0, n
        if id(b) in ids:  # bf16 Newton-Schulz differs from fp32's by ~3%; two orders by ~4%
            assert (a - b).norm() < 0.1 * (b - s).norm(), n
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


def test_muon_state_round_trips_through_state_dict() -> None:
    cfg = TrainConfig(optimizer="muon", lr=1e-2, muon_lr=0.05)
    a, grads = _model_and_grads()
    opt_a = make_optimizer(a, cfg)
    _run(a, opt_a, grads[:2])
    b = GPT(a.config)
    b.load_state_dict(a.state_dict())
    opt_b = make_optimizer(b, cfg)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if read from a file
    _run(a, opt_a, grads[2:])
    _run(b, opt_b, grads[2:])
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_muon_run_learns_and_resumes_exactly(corpus: Path, tmp_path: Path) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    kw = dict(
        preset="tiny",
        optimizer="muon",
        muon_lr=0.02,
        schedule="wsd",
        max_steps=16,
        save_every=8,
        keep_checkpoints=5,
        progress=False,
    )
    r = train(corpus, full, **kw)
    losses = run_losses(full)
    assert r["loss"] < losses[1] - 0.5  # it learns
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000008", resumed / "checkpoints" / "step-0000008")
    train(corpus, resumed, resume=True, progress=False)
    b = run_losses(resumed)
    assert all(losses[s] == b[s] for s in b), [(s, losses[s], b[s]) for s in b]
    for (n, p), q in zip(
        load(full)[0].state_dict().items(), load(resumed)[0].state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), n


def test_wsd_schedule_is_flat_then_linear_to_min() -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=100, schedule="wsd")
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[10] == 1.0
    assert all(x == 1.0 for x in lrs[10:60])  # stable until the last 40%
    assert lrs[80] == pytest.approx(0.5)  # half-way down the cooldown
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lr_at(100, cfg) == 0.0 and lr_at(150, cfg) == 0.0


def test_bad_optimizer_settings_are_named() -> None:
    with pytest.raises(GptkitError, match="drop --fsdp"):
        TrainConfig(optimizer="muon", fsdp=True)
    with pytest.raises(GptkitError, match="optimizer must be adamw or muon"):
        TrainConfig(optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(GptkitError, match="cooldown"):
        TrainConfig(schedule="wsd", cooldown=0.0)


def test_training_stops_at_the_target_loss(corpus: Path, tmp_path: Path) -> None:
    r = train(
        corpus,
        tmp_path,
        preset="tiny",
        max_steps=200,
        eval_every=5,
        target_loss=3.0,
        save_every=0,
        progress=False,
    )
    hit = r["target_reached"]
    assert hit["val_loss"] <= 3.0 and r["step"] == hit["step"] < 200
    assert 0 < hit["seconds"] <= r["wall_s"]
    assert load(r["checkpoint"])[0] is not None  # the stopping step is saved


def test_bf16_training_attention_runs_in_fp32_where_torch_is_slow() -> None:
    short = torch.zeros(2, 4, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    long = torch.zeros(2, 4, 256, 64, dtype=torch.bfloat16, requires_grad=True)
    assert _slow_bf16_sdpa_backward(short) and not _slow_bf16_sdpa_backward(long)
    assert not _slow_bf16_sdpa_backward(short.detach())  # inference keeps bf16
    torch.manual_seed(0)
    model = GPT(tiny_config())
    x = torch.randint(0, 64, (4, 32))
    ref = model(x).float()
    ref.square().mean().backward()
    ref_grad = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    grad = model.blocks[0].attn.qkv.weight.grad
    assert torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.99
