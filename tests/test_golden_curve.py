"""The golden loss curve: a fixed tiny run's first 30 training losses equal a stored curve.

A silent change in numerics (initialisation, loss, schedule, optimizer, data order) moves
these losses and fails here loudly, where the behavioural tests (loss goes down, resume
equals an uninterrupted run) would still pass. The habit is torchtitan's
``tests/assets/losses/`` and minGPT's trainer test.

The run goes through the real ``gptkit.train.train``: a char tokenizer over a few hundred
characters of built-in text, a 2-layer, 32-wide model, batch 8 of 32 tokens, seed 1337, 30
steps. It is made independent of the CPU's kernel paths:

- ``precision="fp32"`` (no bf16 autocast, whose use depends on AVX512-BF16/AMX) and
  ``dropout=0.0`` (no dropout masks, whose generator is a fast path of its own);
- one thread, so no reduction is split differently between runs;
- ``device="cpu"`` and ``compile=False``.

What still differs between CPUs (AMD AVX-512, Intel AMX, AVX2) is how the fp32 matmul and
AdamW kernels block and order their sums: a last-bit difference (~1e-7 relative) per
operation. Measured on an AMD EPYC, splitting the same sums over 2 threads instead of 1 moves
the 30 losses by at most 8e-8 relative. ``rtol=1e-4`` leaves three orders of magnitude for
another CPU's kernels, while a real change in numerics moves the curve by far more (one more
warm-up step: 9e-3).

To regenerate the curve after an intended change in numerics, run

    GPTKIT_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_curve.py

and commit ``tests/assets/golden_loss.json`` with the reason in the message.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import run_losses

from gptkit.data.prepare import prepare
from gptkit.train import train

GOLDEN = Path(__file__).parent / "assets" / "golden_loss.json"
STEPS = 30
RTOL = 1e-4

TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die, to sleep;\n"
    "No more; and by a sleep to say we end\n"
    "The heart-ache and the thousand natural shocks\n"
    "That flesh is heir to: 'tis a consummation\n"
    "Devoutly to be wish'd.\n"
)

#: the whole configuration, spelled out so that a changed preset cannot move the curve
CONFIG = dict(
    preset=None,
    n_layer=2,
    n_head=2,
    n_embd=32,
    block_size=32,
    dropout=0.0,
    batch_size=8,
    max_steps=STEPS,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=5,
    eval_every=0,
    eval_batches=1,
    save_every=0,
    log_every=1,
    precision="fp32",
    device="cpu",
    compile=False,
    seed=1337,
)


def golden_run(tmp_path: Path) -> list[float]:
    """The 30 training losses of the fixed run, on one thread."""
    (tmp_path / "text.txt").write_text(TEXT)
    data = tmp_path / "data"
    prepare([str(tmp_path / "text.txt")], str(data), tokenizer="char", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(data, tmp_path / "run", progress=False, **CONFIG)
    finally:
        torch.set_num_threads(threads)
    losses = run_losses(tmp_path / "run")
    return [losses[step] for step in range(1, STEPS + 1)]


def test_first_30_losses_equal_the_golden_curve(tmp_path: Path) -> None:
    losses = golden_run(tmp_path)
    if os.environ.get("GPTKIT_REGEN_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"config": CONFIG, "rtol": RTOL, "losses": losses}) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert golden["config"] == CONFIG, "the config changed: regenerate the curve (see above)"
    assert len(golden["losses"]) == STEPS
    assert losses[-1] < losses[0] - 0.5  # the run learns: a curve worth guarding
    bad = [
        f"step {s}: {got!r} vs golden {want!r}"
        for s, (got, want) in enumerate(zip(losses, golden["losses"], strict=True), 1)
        if not math.isclose(got, want, rel_tol=RTOL)
    ]
    assert not bad, "\n".join(bad)
