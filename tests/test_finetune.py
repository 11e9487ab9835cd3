"""Supervised fine-tuning through the one training loop: full and LoRA, resume, merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_losses, run_val_losses, tiny_model

import gptkit
from gptkit.checkpoint import save_checkpoint
from gptkit.errors import GptkitError
from gptkit.model.lora import has_lora
from gptkit.tokenizer import CharTokenizer
from gptkit.train import train

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(10)]


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sft")
    data = root / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tok = CharTokenizer.train(["".join(r["prompt"] + r["completion"] for r in ROWS)])
    save_checkpoint(root / "base", tiny_model(tok.vocab_size, block_size=16, seed=1), tok)
    return data, root / "base"


FAST = dict(preset="tiny", batch_size=16, eval_every=10, eval_batches=2, progress=False)


def test_full_sft_learns_the_answers(task: tuple[Path, Path], tmp_path: Path) -> None:
    data, base = task
    result = train(data, tmp_path, init_from=str(base), max_steps=60, lr=3e-3, **FAST)
    vals = run_val_losses(tmp_path)
    assert vals[-1] < vals[0] - 0.5, vals
    assert result["step"] == 60


def test_lora_sft_trains_adapters_only_and_merges(task: tuple[Path, Path], tmp_path: Path) -> None:
    data, base = task
    result = train(
        data, tmp_path, init_from=str(base), max_steps=40, lr=1e-2, lora_rank=4, merge=True, **FAST
    )
    # The loss of step 1 is the untrained model's; a tiny random base leaves LoRA little to
    # steer, but the drop is clear.
    assert run_val_losses(tmp_path)[-1] < run_losses(tmp_path)[1] - 0.25
    ckpt = Path(result["checkpoint"])
    assert (ckpt / "adapter.safetensors").exists()
    tuned, tok = gptkit.load(ckpt)
    assert has_lora(tuned)
    base_model, _ = gptkit.load(base)
    for name, p in base_model.state_dict().items():  # the base weights stay as they were
        torch.testing.assert_close(tuned.state_dict()[name], p, rtol=0, atol=0)
    merged, _ = gptkit.load(result["merged"])
    assert not has_lora(merged)
    ids = torch.tensor([tok.encode("3+4=")])
    torch.testing.assert_close(merged(ids), tuned(ids), rtol=1e-5, atol=1e-5)


def test_lora_sft_resume_equals_uninterrupted(task: tuple[Path, Path], tmp_path: Path) -> None:
    data, base = task
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    kw = dict(
        FAST,
        init_from=str(base),
        max_steps=12,
        save_every=6,
        keep_checkpoints=5,
        lora_rank=4,
        lora_dropout=0.1,
        lr=1e-2,
    )
    train(data, full, **kw)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000006", resumed / "checkpoints" / "step-0000006")
    train(data, resumed, resume=True, progress=False)
    a, b = run_losses(full), run_losses(resumed)
    assert sorted(b) == list(range(7, 13))
    assert all(a[s] == b[s] for s in b), [(s, a[s], b[s]) for s in b]


def test_sft_needs_a_model_and_good_rows(task: tuple[Path, Path], tmp_path: Path) -> None:
    data, base = task
    with pytest.raises(GptkitError, match="needs a model to start from"):
        train(data, tmp_path / "a", **FAST)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "1+1="}) + "\n")
    with pytest.raises(GptkitError, match=r"bad\.jsonl:2: .*'prompt' and 'completion'"):
        train(bad, tmp_path / "b", init_from=str(base), **FAST)
