"""Training speed and memory on nanoGPT's default Shakespeare-char config, side by side.

The config (nanoGPT ``config/train_shakespeare_char.py``): 6 layers, 6 heads, 384 wide,
context 256, batch 64, dropout 0.2, vocabulary 65 characters. Each side trains ``--iters``
steps in its own process (evaluation off); the first ``--warmup`` steps are left out of the
timing. Reported per side: median ms/step, training tokens/s, model FLOPs utilisation (MFU,
nanoGPT's own FLOP count, 6N + 12·L·T·C per token, against ``--peak`` GFLOP/s, the issue's
780, and against the bf16 matmul peak the script measures in the same run, as
``../shared/anchors/peak.py`` does) and peak resident memory (the process's max RSS).
nanoGPT runs as it does on a CPU: fp32 (its autocast is for CUDA only). gptkit runs with
its defaults (bf16 autocast where the CPU has native bf16, fused AdamW, and its compiled
attention and element-wise kernels where the CPU has AVX512-BF16).

    python bench/train_speed.py                          # gptkit only
    python bench/train_speed.py --nanogpt PATH           # both, in one run

PATH is a nanoGPT checkout (a work tree, or a bare git directory such as `fetch` brings); it
is copied to a temporary directory, never into this repository.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_shakespeare_char import DEFAULT_DATA, _checkout, write_nanogpt_data  # noqa: E402

CONFIG = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, vocab_size=65)
PEAK_BF16 = 780.0  # GFLOP/s, 2 threads, measured by ../shared/anchors/peak.py


def flops_per_token(c: dict) -> float:
    """nanoGPT's estimate_mfu count: 6 N (N without the position table) + 12 L T C."""
    L, C, T, V = c["n_layer"], c["n_embd"], c["block_size"], c["vocab_size"]
    n = L * 12 * C * C + V * C  # blocks + (tied) embedding
    return 6 * n + 12 * L * T * C


def measure_peak(threads: int = 2, reps: int = 5) -> float:
    """The bf16 matmul GFLOP/s this machine reaches now, as ``../shared/anchors/peak.py``
    measures it (torch.matmul into a preallocated output, median of ``reps`` timed loops of
    at least 0.5 s): the best of its large shapes."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (8192, 768, 3072), (8192, 3072, 768)):
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        c = torch.empty(m, n, dtype=torch.bfloat16)
        torch.matmul(a, b, out=c)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        inner = max(1, int(0.5 / (time.perf_counter() - t0)))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.matmul(a, b, out=c)
            times.append((time.perf_counter() - t0) / inner)
        best = max(best, 2 * m * k * n / statistics.median(times) / 1e9)
    return best


def timed(cmd: list[str], cwd: Path) -> tuple[str, float]:
    """Run ``cmd``; its stdout+stderr and its peak RSS in GB (via GNU time)."""
    out = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{text[-3000:]}")
    rss = re.findall(r"MAXRSS_KB (\d+)", text)
    return text, int(rss[-1]) / 1e6


def run_gptkit(data_txt: Path, work: Path, iters: int, warmup: int, extra: list[str]) -> dict:
    from gptkit.data.prepare import prepare

    data = work / "gptkit-data"
    prepare([str(data_txt)], str(data), tokenizer="char", progress=False, shuffle=False)
    run = work / "gptkit-run"
    # the train verb, as a user runs it: its entry point also applies the process-wide
    # allocator setting (gptkit.train.keep_freed_memory) that train() itself leaves alone
    cmd = [sys.executable, "-m", "gptkit", "train", "--data", str(data), "--out", str(run)]
    cmd += ["--preset", "shakespeare-char", "--max-steps", str(iters), "--eval-every", "0"]
    cmd += ["--save-every", "0", "--log-every", "1", "--eval-batches", "1", *extra]
    _, rss = timed(cmd, REPO)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    tokens = CONFIG["batch_size"] * CONFIG["block_size"]
    # tokens_per_s is a running mean, so step k ended at k·tokens/tokens_per_s(k) seconds.
    ends = [r["step"] * tokens / r["tokens_per_s"] for r in rows]
    steps = [b - a for a, b in itertools.pairwise(ends)][warmup - 1 :]
    return {"ms_per_step": 1e3 * statistics.median(steps), "peak_rss_gb": rss}


def run_nanogpt(src: Path, data_txt: Path, work: Path, iters: int, warmup: int) -> dict:
    repo = _checkout(src, work / "nanoGPT")
    write_nanogpt_data(data_txt, repo / "data" / "shakespeare_char")
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu"]
    cmd += ["--compile=False", "--eval_iters=1", "--log_interval=1", "--eval_interval=100000"]
    cmd += [f"--max_iters={iters}", "--always_save_checkpoint=False"]
    text, rss = timed(cmd, repo)
    its = re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", text)
    ms = [float(t) for i, t in its if int(i) >= warmup]
    return {"ms_per_step": statistics.median(ms), "peak_rss_gb": rss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="tiny Shakespeare input.txt")
    p.add_argument("--nanogpt", type=Path, help="nanoGPT checkout or git dir to run alongside")
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--peak", type=float, default=PEAK_BF16, help="GFLOP/s for the MFU")
    p.add_argument("--gptkit-args", default="", help="extra `gptkit train` flags, quoted")
    args = p.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found: pass --data PATH to tiny Shakespeare input.txt")
    tokens = CONFIG["batch_size"] * CONFIG["block_size"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        extra = args.gptkit_args.split()
        results["gptkit"] = run_gptkit(args.data, work, args.iters, args.warmup, extra)
        if args.nanogpt:
            results["nanoGPT"] = run_nanogpt(args.nanogpt, args.data, work, args.iters, args.warmup)
    measured = measure_peak()
    fpt = flops_per_token(CONFIG)
    print(f"\nnanoGPT default Shakespeare-char config, {args.iters} steps ({args.warmup} warm-up)")
    print(
        f"bf16 matmul peak measured in this run: {measured:.0f} GFLOP/s "
        f"(the issue's figure: {args.peak:.0f})"
    )
    print(
        f"| side | ms/step | tokens/s | MFU vs {args.peak:.0f} | MFU vs measured {measured:.0f} "
        "| peak RSS |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        tps = tokens / (r["ms_per_step"] / 1e3)
        r["tokens_per_s"], r["mfu"] = tps, tps * fpt / (args.peak * 1e9)
        print(
            f"| {name} | {r['ms_per_step']:,.0f} | {tps:,.0f} | {100 * r['mfu']:.0f}% | "
            f"{100 * tps * fpt / (measured * 1e9):.0f}% | {r['peak_rss_gb']:.2f} GB |"
        )
    if "nanoGPT" in results:
        g, n = results["gptkit"], results["nanoGPT"]
        print(
            f"| ratio gptkit/nanoGPT | {g['ms_per_step'] / n['ms_per_step']:.2f} | "
            f"{g['tokens_per_s'] / n['tokens_per_s']:.2f}x | | | "
            f"{g['peak_rss_gb'] / n['peak_rss_gb']:.2f}x |"
        )


if __name__ == "__main__":
    main()
