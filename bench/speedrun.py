"""CPU speedrun: nanoGPT's Shakespeare-char validation loss (1.47) in 15 minutes on 2 cores.

nanoGPT's default Shakespeare-char config reaches a validation loss of 1.4697 after 5,000
iterations of 64 x 256 characters (its README; a few minutes on a GPU). This script runs
``gptkit train --preset shakespeare-char-speedrun`` as a user runs it and times the whole
command (start-up, training, its evaluations, the final checkpoint), then scores the final
model on nanoGPT's validation split exactly: the last 10% of tiny Shakespeare, every position
of consecutive 256-character windows (nanoGPT's estimate samples such windows at random).

With ``--nanogpt PATH`` it also times nanoGPT's default config at its best on this machine
(a temporary copy with bf16 autocast on the CPU and ``--compile=True``, as
``bench/train_speed.py`` runs it) over ``--nanogpt-iters`` iterations and projects its 5,000
iterations from the median step: the time nanoGPT needs here for the same loss.

    python bench/speedrun.py                       # the speedrun alone
    python bench/speedrun.py --nanogpt PATH        # and nanoGPT's projected time
    python bench/speedrun.py --gptkit-args "--dropout 0"   # an ablation

PATH is a nanoGPT checkout (a work tree, or a bare git directory such as `fetch` brings); it
is copied to a temporary directory, never into this repository.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_shakespeare_char import DEFAULT_DATA  # noqa: E402
from train_speed import CONFIGS, run_nanogpt  # noqa: E402

PRESET = "shakespeare-char-speedrun"
NANOGPT_ITERS, NANOGPT_LOSS = 5000, 1.4697  # nanoGPT README, config/train_shakespeare_char.py


def val_loss(run: Path, data: Path, window: int = 256) -> float:
    """Mean cross-entropy of the run's final model over every position of consecutive
    ``window``-token windows of the validation split (each window's first token is context)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    import gptkit

    model, _ = gptkit.load(str(run))
    meta = json.loads((data / "meta.json").read_text())
    shard = meta["splits"]["val"]["shards"][0]["file"]
    ids = torch.from_numpy(np.fromfile(data / shard, dtype=np.uint16).astype(np.int64))
    n = (len(ids) - 1) // window
    x = ids[: n * window].view(n, window)
    y = ids[1 : n * window + 1].view(n, window)
    total = 0.0
    with torch.inference_mode():
        for i in range(0, n, 32):
            logits = model(x[i : i + 32]).float()
            total += F.cross_entropy(logits.flatten(0, 1), y[i : i + 32].flatten(), reduction="sum")
    return float(total) / y.numel()


def run_speedrun(text: Path, work: Path, extra: list[str]) -> dict:
    from gptkit.data.prepare import prepare

    data = work / "data"
    prepare([str(text)], str(data), tokenizer="char", progress=False, shuffle=False)
    run = work / "run"
    cmd = [sys.executable, "-m", "gptkit", "train", "--data", str(data), "--out", str(run)]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--preset", PRESET, *extra], cwd=REPO, check=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    steps = max(r["step"] for r in rows)
    return {"wall_s": wall, "steps": steps, "evals": evals, "val_loss": val_loss(run, data)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="tiny Shakespeare input.txt")
    p.add_argument("--nanogpt", type=Path, help="nanoGPT checkout or git dir to time alongside")
    p.add_argument("--nanogpt-iters", type=int, default=8, help="nanoGPT steps to time")
    p.add_argument("--gptkit-args", default="", help="extra `gptkit train` flags, quoted")
    args = p.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found: pass --data PATH to tiny Shakespeare input.txt")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        r = run_speedrun(args.data, work, args.gptkit_args.split())
        nano = None
        if args.nanogpt:
            speed_args = argparse.Namespace(iters=args.nanogpt_iters, warmup=3)
            c = CONFIGS["shakespeare-char"]
            nano = run_nanogpt(
                "shakespeare-char", c, args.nanogpt, args.data, work, speed_args, True
            )
    print(f"\n{PRESET}: {r['steps']} steps in {r['wall_s']:.0f} s ({r['wall_s'] / 60:.1f} min)")
    for e in r["evals"]:
        print(
            f"  step {e['step']:>5} {e['elapsed_s']:>6.0f} s  sampled val loss {e['val_loss']:.4f}"
        )
    print(f"validation loss, whole split: {r['val_loss']:.4f} (target {NANOGPT_LOSS})")
    if nano is not None:
        projected = NANOGPT_ITERS * nano["ms_per_step"] / 1e3
        print(
            f"nanoGPT at its best here: {nano['ms_per_step']:,.0f} ms/step x {NANOGPT_ITERS} = "
            f"{projected / 3600:.1f} h to {NANOGPT_LOSS}; speed-up {projected / r['wall_s']:.1f}x"
        )
    if not math.isfinite(r["val_loss"]) or r["val_loss"] > NANOGPT_LOSS:
        print("target missed")


if __name__ == "__main__":
    main()
