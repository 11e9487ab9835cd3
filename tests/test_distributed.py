"""Data-parallel training: 2 processes (torchrun, gloo on CPU) take the same steps as 1.

One torchrun launch (2 ranks, this file run as a script) trains four tiny runs in one process
group: plain DDP through the CLI, DDP resumed from a one-process checkpoint, FSDP with
activation checkpointing, and FSDP resumed from a one-process checkpoint. The tests compare
them with a one-process reference whose batch is the union of the ranks' batches
(``--batch-size 8`` vs ``--batch-size 4`` × 2 ranks), step by step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE_TEXT, run_losses, run_metrics, run_val_losses

from gptkit.checkpoint import load
from gptkit.data.loader import BatchSampler
from gptkit.data.prepare import prepare
from gptkit.data.tasks import ExampleSampler, load_examples
from gptkit.errors import GptkitError
from gptkit.tokenizer import CharTokenizer
from gptkit.train import train
from gptkit.train.distributed import Ranks, RankShare, keep_global_batch

STEPS = 6
#: the one-process reference; the 2-rank runs use batch_size=4 each (the same global batch)
COMMON = dict(
    preset="tiny",
    max_steps=STEPS,
    save_every=3,
    eval_every=3,
    keep_checkpoints=5,
    precision="fp32",
    progress=False,
)
RTOL = 1e-4


def close(a: dict[int, float], b: dict[int, float]) -> bool:
    return sorted(a) == sorted(b) and all(np.isclose(a[s], b[s], rtol=RTOL, atol=0) for s in a)


# -- the loader splits one global batch ------------------------------------------------------


def test_ranks_read_disjoint_parts_of_one_global_batch() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 50, n).astype(np.uint16) for n in (500, 300, 900)]
    whole = BatchSampler(arrays, 16, 8, seed=3)
    ranks = [BatchSampler(arrays, 16, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        x, y = whole.next()
        parts = [s.next() for s in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
    # The position is the same on every rank, so it resumes under any world size.
    assert ranks[0].state_dict() == ranks[1].state_dict() == whole.state_dict()
    again = BatchSampler(arrays, 16, 4, seed=3, rank=1, world_size=2)
    again.load_state_dict(whole.state_dict())
    assert torch.equal(again.next()[0], whole.next()[0][4:])
    with pytest.raises(GptkitError, match="outside a world"):
        BatchSampler(arrays, 16, 4, rank=2, world_size=2)


def test_rank_share_splits_fine_tuning_batches(tmp_path: Path) -> None:
    rows = [{"prompt": f"Q{i}: ", "completion": "A" * (i % 5 + 1)} for i in range(20)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = CharTokenizer.train([SAMPLE_TEXT + "QA0123456789: "])
    examples = load_examples(path, tok, 33, chat=False)
    whole = ExampleSampler(examples, 6, seed=1)
    parts = [RankShare(ExampleSampler(examples, 6, seed=1), Ranks(r, 2)) for r in (0, 1)]
    for _ in range(4):
        batch = whole.next()
        mine = [p.next() for p in parts]
        for i, t in enumerate(batch):
            assert torch.equal(t, torch.cat([m[i] for m in mine]))


def test_resume_keeps_the_global_batch() -> None:
    from gptkit.config import TrainConfig

    cfg = TrainConfig(batch_size=4)
    assert keep_global_batch(cfg, 2, Ranks(0, 1), False).batch_size == 8
    assert keep_global_batch(cfg, 1, Ranks(0, 2), False).batch_size == 2
    assert keep_global_batch(cfg, 2, Ranks(0, 1), True).batch_size == 4  # --batch-size wins
    with pytest.raises(GptkitError, match="does not split over 3"):
        keep_global_batch(cfg, 1, Ranks(0, 3), False)


# -- two processes against one ---------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process reference, then one torchrun launch of 2 ranks (see ``_worker``)."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "a.txt").write_text(SAMPLE_TEXT * 20)
    prepare([str(root / "a.txt")], str(root / "data"), tokenizer="char", progress=False)
    train(root / "data", root / "ref", batch_size=8, **COMMON)
    for name in ("ddp_resumed", "fsdp_resumed"):  # 2-rank runs that resume a 1-process one
        (root / name / "checkpoints").mkdir(parents=True)
        step3 = root / "ref" / "checkpoints" / "step-0000003"
        shutil.copytree(step3, root / name / "checkpoints" / step3.name)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, __file__, str(root)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root


def test_two_processes_take_the_steps_of_one(runs: Path) -> None:
    ref, ddp = run_losses(runs / "ref"), run_losses(runs / "ddp")
    assert close(ref, ddp), (ref, ddp)
    assert np.allclose(run_val_losses(runs / "ref"), run_val_losses(runs / "ddp"), rtol=RTOL)
    # Rank 0 alone wrote the metrics and the checkpoints: each step once, nothing stray.
    assert [r["step"] for r in run_metrics(runs / "ddp") if "loss" in r] == list(range(1, 7))
    names = sorted(p.name for p in (runs / "ddp" / "checkpoints").iterdir())
    assert names == ["step-0000003", "step-0000006"]
    a, _ = load(runs / "ref")
    b, _ = load(runs / "ddp")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_one_process_checkpoint_resumes_in_two(runs: Path) -> None:
    ref = run_losses(runs / "ref")
    for name in ("ddp_resumed", "fsdp_resumed"):
        resumed = run_losses(runs / name)
        assert close({s: ref[s] for s in resumed}, resumed), (name, ref, resumed)
        assert sorted(resumed) == [4, 5, 6]


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_in_one(runs: Path, tmp_path: Path, run: str) -> None:
    (tmp_path / "checkpoints").mkdir()
    step3 = runs / run / "checkpoints" / "step-0000003"
    shutil.copytree(step3, tmp_path / "checkpoints" / step3.name)
    train(runs / "data", tmp_path, resume=True, progress=False)  # batch 4 × 2 -> 8 × 1
    ref, resumed = run_losses(runs / "ref"), run_losses(tmp_path)
    assert sorted(resumed) == [4, 5, 6]
    assert close({s: ref[s] for s in resumed}, resumed), (ref, resumed)


def test_fsdp_with_activation_checkpointing_matches_ddp(runs: Path) -> None:
    ddp, fsdp = run_losses(runs / "ddp"), run_losses(runs / "fsdp")
    assert close(ddp, fsdp), (ddp, fsdp)
    a, _ = load(runs / "ddp")
    b, _ = load(runs / "fsdp")  # gathered from the shards into one ordinary checkpoint
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_activation_checkpointing_in_one_process(runs: Path, tmp_path: Path) -> None:
    train(runs / "data", tmp_path, batch_size=8, activation_checkpointing=True, **COMMON)
    ref, ac = run_losses(runs / "ref"), run_losses(tmp_path)
    assert close(ref, ac), (ref, ac)
    model, _ = load(tmp_path)  # a plain checkpoint: the block classes were swapped, not the keys
    assert type(model.blocks[0]).__name__ == "Block"


# -- the ranks' side of the launch ------------------------------------------------------------


def _worker(root: Path) -> None:
    """Run by each of the 2 ranks: four runs in one process group (started by the first)."""
    from gptkit.cli import main

    torch.set_num_threads(1)
    data = str(root / "data")
    argv = ["train", "--data", data, "--out", str(root / "ddp"), "--batch-size", "4"]
    for k, v in COMMON.items():
        if k != "progress":
            argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main([*argv, "--no-progress"]) == 0
    train(data, root / "ddp_resumed", resume=True, progress=False)  # batch 8 × 1 -> 4 × 2
    kw = dict(COMMON, fsdp=True, activation_checkpointing=True)
    train(data, root / "fsdp", batch_size=4, **kw)
    train(data, root / "fsdp_resumed", resume=True, fsdp=True, progress=False)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
