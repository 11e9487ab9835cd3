"""Shakespeare characters on a CPU: nanoGPT's CPU recipe trained by gptkit and by nanoGPT
side by side, and the time each takes to a validation loss of 1.88.

The recipe (nanoGPT README, "I only have a macbook"): 4 layers, 4 heads, 128 wide, context 64,
batch 12, 2000 iterations, dropout 0, lr 1e-3 cosine to 1e-4, 100 warm-up steps, eval on 20
batches. nanoGPT reports a validation loss of about 1.88.

The time-to-target race also runs gptkit's ``shakespeare-char-fast`` preset (3 layers,
batch 32, Muon, bf16, 240 steps), which stops at the first evaluation at or below the target.
Each time counts from the first training step to the evaluation that reaches the target,
evaluations included (nanoGPT's: the sum of its logged iteration times, which include its
evaluations; model building and data loading are outside both).

    python bench/train_shakespeare_char.py                       # gptkit only
    python bench/train_shakespeare_char.py --nanogpt PATH        # both, in one run

PATH is a nanoGPT checkout (a work tree with train.py, or a bare git directory such as the
one `fetch` brings); it is copied to a temporary directory and never into this repository.
Prints two tables: the recipe (final validation loss, wall time, training tokens/s) and the
time to the target loss, with gptkit/nanoGPT ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, iters=2000)


def run_gptkit(
    data: Path,
    work: Path,
    preset: str,
    iters: int | None,
    precision: str | None,
    target: float,
    stop_at_target: bool,
) -> dict:
    from gptkit.train import keep_freed_memory, train

    keep_freed_memory()  # the allocator setting `gptkit train` applies to its process
    t0 = time.perf_counter()
    r = train(
        data,
        work / f"gptkit-{preset}",
        preset=preset,
        max_steps=iters,
        save_every=0,
        precision=precision,
        target_loss=target if stop_at_target else None,
        progress=True,
    )
    evals = [
        json.loads(line)
        for line in (work / f"gptkit-{preset}" / "metrics.jsonl").read_text().splitlines()
        if '"val_loss"' in line
    ]
    hit = next((e for e in evals if e["val_loss"] <= target), None)
    return {
        "val_loss": r["val_loss"],
        "wall_s": time.perf_counter() - t0,
        "tokens_per_s": r["tokens_per_s"],
        "precision": r["precision"],
        "steps": r["step"],
        "target_step": hit["step"] if hit else None,
        "target_s": hit["elapsed_s"] if hit else None,
        "train_s": evals[-1]["elapsed_s"] if evals else None,
    }


def _checkout(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    if (src / "train.py").exists():
        subprocess.run(["cp", "-r", f"{src}/.", str(dest)], check=True)
    else:  # a bare git directory
        archive = subprocess.run(
            ["git", f"--git-dir={src}", "archive", "HEAD"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def write_nanogpt_data(text_path: Path, data_dir: Path) -> None:
    """The files nanoGPT's data/shakespeare_char/prepare.py writes (without its download)."""
    text = text_path.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(len(text) * 0.9)
    np.array([stoi[c] for c in text[:n]], dtype=np.uint16).tofile(data_dir / "train.bin")
    np.array([stoi[c] for c in text[n:]], dtype=np.uint16).tofile(data_dir / "val.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)


def run_nanogpt(src: Path, text_path: Path, work: Path, iters: int, target: float) -> dict:
    repo = _checkout(src, work / "nanoGPT")
    write_nanogpt_data(text_path, repo / "data" / "shakespeare_char")
    cmd = [
        sys.executable,
        "train.py",
        "config/train_shakespeare_char.py",
        "--device=cpu",
        "--compile=False",
        "--eval_iters=20",
        "--log_interval=1",
        "--block_size=64",
        "--batch_size=12",
        "--n_layer=4",
        "--n_head=4",
        "--n_embd=128",
        f"--max_iters={iters}",
        f"--lr_decay_iters={iters}",
        "--dropout=0.0",
        "--always_save_checkpoint=False",
    ]
    t0 = time.perf_counter()
    log = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if log.returncode != 0:
        raise SystemExit(f"nanoGPT failed:\n{log.stdout[-2000:]}\n{log.stderr[-2000:]}")
    its = [
        (int(i), float(t))
        for i, t in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", log.stdout)
    ]
    evals = [
        (int(i), float(v))
        for i, v in re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", log.stdout)
    ]
    ms = statistics.median(t for i, t in its if i >= 5 and i % 250 != 0)
    # The evaluation at step N runs at the start of iteration N, inside its logged time.
    hit = next((i for i, v in evals if v <= target), None)
    target_s = None if hit is None else sum(t for i, t in its if i <= hit) / 1e3
    train_s = sum(t for _, t in its) / 1e3
    return {
        "val_loss": evals[-1][1],
        "wall_s": wall,
        "tokens_per_s": RECIPE["batch_size"] * RECIPE["block_size"] / (ms / 1e3),
        "precision": "fp32",
        "steps": iters,
        "target_step": hit,
        "target_s": target_s,
        "train_s": train_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="tiny Shakespeare input.txt")
    p.add_argument("--nanogpt", type=Path, help="nanoGPT checkout or git dir to run alongside")
    p.add_argument("--iters", type=int, default=RECIPE["iters"])
    p.add_argument("--precision", help="gptkit precision (default: the preset's, fp32)")
    p.add_argument("--target", type=float, default=1.88, help="the validation loss to race to")
    p.add_argument("--fast-preset", default="shakespeare-char-fast", help="gptkit's racer")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found: pass --data PATH to tiny Shakespeare input.txt")
    import torch

    from gptkit.data.prepare import prepare

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "gptkit-data"
        prepare([str(args.data)], str(data), tokenizer="char", progress=False, shuffle=False)
        recipe = run_gptkit(
            data, work, "nanogpt-cpu", args.iters, args.precision, args.target, False
        )
        results = {"gptkit": recipe}
        if args.nanogpt:
            results["nanoGPT"] = run_nanogpt(args.nanogpt, args.data, work, args.iters, args.target)
        fast = run_gptkit(data, work, args.fast_preset, None, None, args.target, True)
    print(f"\nnanoGPT CPU recipe, {args.iters} iterations, {threads} threads")
    print(f"{'':<10} {'val loss':>9} {'wall s':>8} {'train tok/s':>12}  precision")
    for name, r in results.items():
        print(
            f"{name:<10} {r['val_loss']:>9.4f} {r['wall_s']:>8.1f} {r['tokens_per_s']:>12,.0f}"
            f"  {r['precision']}"
        )
    if "nanoGPT" in results:
        g, n = results["gptkit"], results["nanoGPT"]
        print(
            f"{'ratio':<10} {g['val_loss'] / n['val_loss']:>9.3f} {g['wall_s'] / n['wall_s']:>8.2f}"
            f" {g['tokens_per_s'] / n['tokens_per_s']:>12.2f}  (gptkit / nanoGPT)"
        )
    race = {"nanoGPT recipe": results.get("nanoGPT"), "gptkit recipe": recipe}
    race[f"gptkit {args.fast_preset}"] = fast
    print(f"\ntime to validation loss <= {args.target}")
    print(f"{'':<34} {'step':>6} {'seconds':>8} {'vs nanoGPT':>11}")
    # Where nanoGPT misses the target, its whole run is a lower bound on its time to it.
    n = results.get("nanoGPT") or {}
    anchor, bound = n.get("target_s") or n.get("train_s"), "" if n.get("target_s") else ">"
    for name, r in race.items():
        if r is None:
            continue
        if r["target_s"] is None:
            missed = f"not reached in {r['steps']} steps"
            print(f"{name:<34} {missed:>15} (val {r['val_loss']:.4f}, {r.get('train_s', 0):.1f} s)")
            continue
        speedup = f"{bound}{anchor / r['target_s']:.2f}x" if anchor else "-"
        print(f"{name:<34} {r['target_step']:>6} {r['target_s']:>8.1f} {speedup:>11}")
    results["fast"] = fast
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
