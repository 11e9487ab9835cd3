"""The training loop: it learns, resumes exactly, survives Ctrl-C, and refuses bad states."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SAMPLE_TEXT, run_losses, run_metrics, run_val_losses, shared_path

from gptkit.checkpoint import load
from gptkit.config import TrainConfig
from gptkit.data.prepare import prepare
from gptkit.errors import GptkitError
from gptkit.files import list_checkpoints
from gptkit.model import GPT
from gptkit.train import lr_at, train
from gptkit.train.optim import param_groups


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shakespeare")
    prepare(
        [str(shared_path("tinyshakespeare", "input.txt"))],
        str(out),
        tokenizer="char",
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(SAMPLE_TEXT * 20)
    out = root / "data"
    prepare([str(root / "a.txt")], str(out), tokenizer="char", progress=False)
    return out


def test_tiny_model_lowers_val_loss_on_shakespeare(shakespeare: Path, tmp_path: Path) -> None:
    result = train(
        shakespeare,
        tmp_path,
        preset="tiny",
        max_steps=80,
        eval_every=20,
        eval_batches=4,
        batch_size=16,
        progress=False,
    )
    vals = run_val_losses(tmp_path)
    vocab = json.loads((shakespeare / "meta.json").read_text())["vocab_size"]
    assert len(vals) == 4
    assert vals[-1] < vals[0] - 0.3, vals
    assert vals[-1] < math.log(vocab) - 1.0  # far better than a uniform guess
    assert result["step"] == 80 and Path(result["checkpoint"]).is_dir()
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_equals_uninterrupted_run(small_corpus: Path, tmp_path: Path) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    # Dropout on, so the global RNG state must be restored too.
    kw = dict(
        preset="tiny", max_steps=16, save_every=8, keep_checkpoints=5, dropout=0.1, progress=False
    )
    train(small_corpus, full, **kw)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000008", resumed / "checkpoints" / "step-0000008")
    train(small_corpus, resumed, resume=True, progress=False)
    a, b = run_losses(full), run_losses(resumed)
    assert sorted(b) == list(range(9, 17))
    assert all(a[s] == b[s] for s in b), [(s, a[s], b[s]) for s in b]
    model_a, _ = load(full)
    model_b, _ = load(resumed)
    for (name, p), q in zip(
        model_a.state_dict().items(), model_b.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name


def test_resume_trims_metrics_of_the_killed_run(small_corpus: Path, tmp_path: Path) -> None:
    train(
        small_corpus,
        tmp_path,
        preset="tiny",
        max_steps=12,
        save_every=6,
        keep_checkpoints=5,
        progress=False,
    )
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000012")  # as if killed after step 6's save
    train(small_corpus, tmp_path, resume=True, progress=False)
    steps = [r["step"] for r in run_metrics(tmp_path) if "loss" in r]
    assert steps == list(range(1, 13))  # no step logged twice


def test_ctrl_c_saves_a_checkpoint_that_resumes(small_corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "gptkit",
        "train",
        "--data",
        str(small_corpus),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--max-steps",
        "100000",
        "--save-every",
        "0",
        "--eval-every",
        "0",
        "--log-every",
        "1",
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    ((step, ckpt),) = list_checkpoints(run)
    assert step >= 3 and max(run_losses(run)) == step
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == step
    train(small_corpus, run, resume=True, max_steps=step + 2, progress=False)
    assert max(run_losses(run)) == step + 2


def test_checkpoint_write_is_atomic(
    small_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gptkit.checkpoint.native as native

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        train(small_corpus, tmp_path, preset="tiny", max_steps=2, progress=False)
    root = tmp_path / "checkpoints"
    assert list(root.iterdir()) == []  # no half-written checkpoint, no temporary left


def test_refuses_to_overwrite_or_resume_nothing(small_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="no checkpoint to resume"):
        train(small_corpus, tmp_path, preset="tiny", resume=True, progress=False)
    train(small_corpus, tmp_path, preset="tiny", max_steps=2, progress=False)
    with pytest.raises(GptkitError, match="already holds a run"):
        train(small_corpus, tmp_path, preset="tiny", max_steps=2, progress=False)
    with pytest.raises(GptkitError, match="cannot change model field"):
        train(small_corpus, tmp_path, resume=True, n_layer=3, progress=False)


def test_checkpoint_with_other_tokenizer_is_refused(small_corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text(SAMPLE_TEXT * 20)
    bpe_data = tmp_path / "bpe"
    prepare(
        [str(tmp_path / "b.txt")], str(bpe_data), tokenizer="bpe", vocab_size=300, progress=False
    )
    train(small_corpus, tmp_path / "char_run", preset="tiny", max_steps=2, progress=False)
    with pytest.raises(GptkitError, match="different tokenizer"):
        train(
            bpe_data,
            tmp_path / "ft",
            preset="tiny",
            init_from=tmp_path / "char_run" / "checkpoints" / "step-0000002",
            progress=False,
        )


def test_unknown_option_and_preset(small_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="unknown training option"):
        train(small_corpus, tmp_path, preset="tiny", n_layers=3, progress=False)
    with pytest.raises(GptkitError, match="unknown preset"):
        train(small_corpus, tmp_path, preset="huge", progress=False)


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="does not exist"):
        train(tmp_path / "nope", tmp_path / "out", preset="tiny")
    with pytest.raises(GptkitError, match=r"no meta\.json"):
        train(tmp_path, tmp_path / "out", preset="tiny")


def test_schedule_warms_up_then_decays_to_min() -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # half-way down the cosine
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[110] == lrs[119] == pytest.approx(0.1)


def test_weight_decay_only_on_matrices() -> None:
    from conftest import tiny_config

    model = GPT(tiny_config())
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()  # the tied head is counted once


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_is_reused_without_new_page_faults() -> None:
    # A 64 MB block allocated, touched and freed over and over: by default glibc maps each
    # one fresh (16384 page faults every time); after keep_freed_memory() the heap keeps
    # freed blocks, and once it has grown to fit (a few rounds: torch's 64-byte-aligned
    # blocks need a little more than a freed one), blocks come back without faults.
    code = """
import resource, torch
from gptkit.train import keep_freed_memory

def faults(rounds):
    out = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(2**26, dtype=torch.uint8)
        block.fill_(1)
        del block
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out

default = faults(3)
applied = keep_freed_memory()
kept = faults(16)
print(applied, default[-1], sum(kept[-4:]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    applied, default, kept = out.stdout.split()
    assert applied == "True"
    assert int(default) > 2**26 // 4096 // 2  # fresh pages: half of the block's 16384 at least
    assert int(kept) < 400
