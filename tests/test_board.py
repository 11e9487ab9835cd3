"""``gptkit train --tensorboard DIR``: the event files hold metrics.jsonl's numbers as
scalars, the gradient norm and model FLOP/s, and weight and gradient histograms; a resumed
run continues the same curves. Skips when the optional tensorboard package is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import SAMPLE_TEXT, run_metrics, tiny_config

from gptkit.checkpoint import load
from gptkit.data.prepare import prepare
from gptkit.train import train
from gptkit.train.board import flops_per_token

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(SAMPLE_TEXT * 20)
    prepare([str(root / "a.txt")], str(root / "data"), tokenizer="char", progress=False)
    return root / "data"


def events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_tensorboard_writes_scalars_and_histograms(corpus: Path, tmp_path: Path) -> None:
    board = tmp_path / "tb"
    kw = dict(preset="tiny", max_steps=6, log_every=2, eval_every=3, progress=False)
    train(corpus, tmp_path / "run", tensorboard=str(board), histogram_every=3, **kw)
    acc = events(board)
    rows = run_metrics(tmp_path / "run")
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert scalars(acc, "train/loss") == pytest.approx(losses)  # metrics.jsonl's numbers
    assert scalars(acc, "train/lr").keys() == losses.keys()
    assert sorted(scalars(acc, "val/loss")) == [r["step"] for r in rows if "val_loss" in r]
    norms = scalars(acc, "train/grad_norm")
    assert norms.keys() == losses.keys() and all(v > 0 for v in norms.values())
    tok_s = {r["step"]: r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    flops = scalars(acc, "perf/model_flops_per_s")
    assert all(flops[s] > 0 for s in tok_s)
    tags = acc.Tags()["histograms"]
    assert "weights/wte.weight" in tags and "gradients/blocks.0.attn.qkv.weight" in tags
    assert [e.step for e in acc.Histograms("weights/wte.weight")] == [3, 6]
    model, _ = load(tmp_path / "run")
    hist = acc.Histograms("weights/wte.weight")[-1].histogram_value
    assert hist.num == model.wte.weight.numel()
    assert hist.min < 0 < hist.max  # the weights step 6 updated (drawn before its update)


def test_resumed_run_continues_the_curves(corpus: Path, tmp_path: Path) -> None:
    board = tmp_path / "tb"
    kw = dict(preset="tiny", log_every=1, eval_every=0, histogram_every=0, progress=False)
    train(corpus, tmp_path, max_steps=8, save_every=4, keep_checkpoints=5,
          tensorboard=str(board), **kw)  # fmt: skip
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000008")  # killed after step 4's save
    train(corpus, tmp_path, resume=True, progress=False)
    losses = scalars(events(board), "train/loss")
    assert sorted(losses) == list(range(1, 9))  # steps 5..8 once, from the resumed run
    rows = {r["step"]: r["loss"] for r in run_metrics(tmp_path) if "loss" in r}
    assert losses == pytest.approx(rows)


def test_flops_per_token_follows_palm() -> None:
    cfg = tiny_config(n_layer=2, n_embd=32, n_head=2, block_size=16)
    assert flops_per_token(cfg, 16, 1000) == 6 * 1000 + 12 * 2 * 32 * 16
