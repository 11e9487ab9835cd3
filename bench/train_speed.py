"""Training speed and memory, side by side: gptkit, nanoGPT as it runs on a CPU, nanoGPT at
its best, and transformers.

Two configurations (``--config``):

- ``shakespeare-char`` (default): nanoGPT's ``config/train_shakespeare_char.py``: 6 layers,
  6 heads, 384 wide, context 256, batch 64, dropout 0.2, 65 characters.
- ``gpt2``: GPT-2 small (124M: 12 layers, 12 heads, 768 wide, context 1024, biases, dropout
  0), GPT-2 BPE tokens of tiny Shakespeare, batch ``--batch-size`` (default 8) of 1,024.

Each side trains ``--iters`` steps in its own process (no evaluation, no gradient
accumulation, the same batch); the first ``--warmup`` steps (compilation) are left out.
Sides:

- **gptkit**: ``gptkit train --preset NAME`` with its defaults (bf16 autocast where the CPU
  has native bf16, fused AdamW, its attention and element-wise kernels).
- **nanoGPT** (``--nanogpt PATH``): as its README runs on a CPU (fp32, ``--compile=False``).
- **nanoGPT best** (same flag): a temporary copy patched to use bf16 autocast on the CPU
  (its ``ctx`` line) and run with ``--compile=True``: the one-line change a user would make.
- **transformers** (``--transformers``): ``GPT2LMHeadModel`` of the same shape, SDPA
  attention, bf16 autocast, fused AdamW.

Reported per side: median ms/step, training tokens/s, model FLOPs utilisation (nanoGPT's
FLOP count, 6N + 12·L·T·C per token) against the bf16 matmul peak measured in the same run
(as ``../shared/anchors/peak.py`` measures it), and peak resident memory (max RSS).
Ratios are gptkit's over each other side.

    python bench/train_speed.py --nanogpt PATH                       # Shakespeare-char
    python bench/train_speed.py --config gpt2 --nanogpt PATH --transformers

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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_shakespeare_char import DEFAULT_DATA, _checkout, write_nanogpt_data  # noqa: E402

GPT2_BPE = REPO.parent / "shared" / "data" / "gpt2"
CONFIGS = {
    "shakespeare-char": dict(
        n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, vocab_size=65,
        dropout=0.2, bias=False, iters=12,
    ),
    "gpt2": dict(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8, vocab_size=50257,
        dropout=0.0, bias=True, iters=8,
    ),
}  # fmt: skip
# nanoGPT's CPU autocast: its ctx line, then the one a user would write instead
NANOGPT_CTX = (
    "ctx = nullcontext() if device_type == 'cpu' else "
    "torch.amp.autocast(device_type=device_type, dtype=ptdtype)"
)
NANOGPT_BEST_CTX = "ctx = torch.amp.autocast(device_type=device_type, dtype=torch.bfloat16)"


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


def logged_steps(cmd: list[str], cwd: Path, warmup: int) -> dict:
    """Run a trainer that logs nanoGPT's ``iter N: loss L, time Tms`` lines: the median step
    time after ``warmup`` steps and the peak RSS."""
    text, rss = timed(cmd, cwd)
    its = re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", text)
    ms = [float(t) for i, t in its if int(i) >= warmup]
    return {"ms_per_step": statistics.median(ms), "peak_rss_gb": rss}


def write_tokens(name: str, text_path: Path, dest: Path) -> None:
    """train.bin / val.bin as nanoGPT's prepare scripts write them (GPT-2 BPE for gpt2;
    characters and meta.pkl for shakespeare-char)."""
    if name == "shakespeare-char":
        write_nanogpt_data(text_path, dest)
        return
    from gptkit.tokenizer import BPETokenizer

    tok = BPETokenizer.from_gpt2_files(GPT2_BPE / "encoder.json", GPT2_BPE / "vocab.bpe")
    text = text_path.read_text()
    n = int(len(text) * 0.9)
    np.array(tok.encode(text[:n]), dtype=np.uint16).tofile(dest / "train.bin")
    np.array(tok.encode(text[n:]), dtype=np.uint16).tofile(dest / "val.bin")


def run_gptkit(name: str, c: dict, text: Path, work: Path, args: argparse.Namespace) -> dict:
    from gptkit.data.prepare import prepare

    data = work / "gptkit-data"
    kind = dict(tokenizer="char") if name == "shakespeare-char" else dict(
        tokenizer="gpt2", tokenizer_path=str(GPT2_BPE)
    )  # fmt: skip
    prepare([str(text)], str(data), progress=False, shuffle=False, **kind)
    run = work / "gptkit-run"
    # the train verb, as a user runs it: its entry point also applies the process-wide
    # allocator setting (gptkit.train.keep_freed_memory) that train() itself leaves alone
    cmd = [sys.executable, "-m", "gptkit", "train", "--data", str(data), "--out", str(run)]
    cmd += ["--preset", name, "--max-steps", str(args.iters), "--eval-every", "0"]
    cmd += ["--save-every", "0", "--log-every", "1", "--eval-batches", "1"]
    cmd += ["--batch-size", str(c["batch_size"]), "--grad-accum", "1"]
    _, rss = timed([*cmd, *args.gptkit_args.split()], REPO)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    tokens = c["batch_size"] * c["block_size"]
    # tokens_per_s is a running mean, so step k ended at k·tokens/tokens_per_s(k) seconds.
    ends = [r["step"] * tokens / r["tokens_per_s"] for r in rows]
    steps = [b - a for a, b in itertools.pairwise(ends)][args.warmup - 1 :]
    return {"ms_per_step": 1e3 * statistics.median(steps), "peak_rss_gb": rss}


def run_nanogpt(
    name: str, c: dict, src: Path, text: Path, work: Path, args: argparse.Namespace, best: bool
) -> dict:
    repo = _checkout(src, work / ("nanoGPT-best" if best else "nanoGPT"))
    dataset = "shakespeare_char" if name == "shakespeare-char" else "shakespeare"
    (repo / "data" / dataset).mkdir(parents=True, exist_ok=True)
    write_tokens(name, text, repo / "data" / dataset)
    cmd = [sys.executable, "train.py"]
    if name == "shakespeare-char":
        cmd += ["config/train_shakespeare_char.py"]
    else:  # train.py's defaults are GPT-2 small; ours has biases and one step per batch
        cmd += [f"--dataset={dataset}", "--bias=True", "--dropout=0.0", "--block_size=1024"]
    cmd += [f"--batch_size={c['batch_size']}", "--gradient_accumulation_steps=1"]
    cmd += ["--device=cpu", "--eval_iters=1", "--log_interval=1", "--eval_interval=100000"]
    cmd += [f"--max_iters={args.iters}", "--always_save_checkpoint=False"]
    if best:
        script = repo / "train.py"
        source = script.read_text()
        if NANOGPT_CTX not in source:
            raise SystemExit("nanoGPT's train.py has changed: its CPU autocast line is not found")
        script.write_text(source.replace(NANOGPT_CTX, NANOGPT_BEST_CTX))
        cmd += ["--compile=True", "--dtype=bfloat16"]
    else:
        cmd += ["--compile=False"]
    return logged_steps(cmd, repo, args.warmup)


TRANSFORMERS_STEP = """
import json, sys, time, numpy as np, torch
from transformers import GPT2Config, GPT2LMHeadModel
c = json.loads(sys.argv[1]); iters = int(sys.argv[3])
cfg = GPT2Config(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
    n_positions=c["block_size"], vocab_size=c["vocab_size"], resid_pdrop=c["dropout"],
    embd_pdrop=c["dropout"], attn_pdrop=c["dropout"])
cfg._attn_implementation = "sdpa"
model = GPT2LMHeadModel(cfg).train()
opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), fused=True)
data = np.fromfile(sys.argv[2], dtype=np.uint16).astype(np.int64)
B, T = c["batch_size"], c["block_size"]
for i in range(iters):
    t0 = time.perf_counter()
    at = np.random.randint(0, len(data) - T - 1, B)
    x = torch.from_numpy(np.stack([data[a : a + T] for a in at]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    print(f"iter {i}: loss {loss.item():.4f}, time {1e3 * (time.perf_counter() - t0):.1f}ms")
"""


def run_transformers(name: str, c: dict, text: Path, work: Path, args: argparse.Namespace) -> dict:
    data = work / "transformers-data"
    data.mkdir()
    write_tokens(name, text, data)
    cmd = [sys.executable, "-c", TRANSFORMERS_STEP, json.dumps(c), str(data / "train.bin")]
    return logged_steps([*cmd, str(args.iters)], REPO, args.warmup)


def report(name: str, c: dict, results: dict, peak: float, args: argparse.Namespace) -> None:
    tokens, fpt = c["batch_size"] * c["block_size"], flops_per_token(c)
    print(f"\n{name}: batch {c['batch_size']} x {c['block_size']}, {args.iters} steps "
          f"({args.warmup} warm-up), {os.cpu_count()} CPUs")  # fmt: skip
    print(f"bf16 matmul peak measured in this run: {peak:.0f} GFLOP/s")
    print("| side | ms/step | tokens/s | MFU of measured peak | peak RSS | gptkit speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    g = results["gptkit"]["ms_per_step"]
    for side, r in results.items():
        tps = tokens / (r["ms_per_step"] / 1e3)
        print(
            f"| {side} | {r['ms_per_step']:,.0f} | {tps:,.0f} | "
            f"{100 * tps * fpt / (peak * 1e9):.0f}% | {r['peak_rss_gb']:.2f} GB | "
            f"{r['ms_per_step'] / g:.2f}x |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="shakespeare-char")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="tiny Shakespeare input.txt")
    p.add_argument("--nanogpt", type=Path, help="nanoGPT checkout or git dir to run alongside")
    p.add_argument("--nanogpt-modes", default="plain,best", help="plain (fp32), best, or both")
    p.add_argument("--transformers", action="store_true", help="also run transformers")
    p.add_argument("--batch-size", type=int, help="rows of a step (default: the config's)")
    p.add_argument("--iters", type=int, help="steps per side (default: the config's)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--gptkit-args", default="", help="extra `gptkit train` flags, quoted")
    args = p.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found: pass --data PATH to tiny Shakespeare input.txt")
    c = dict(CONFIGS[args.config])
    c["batch_size"] = args.batch_size or c["batch_size"]
    args.iters = args.iters or c["iters"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["gptkit"] = run_gptkit(args.config, c, args.data, work, args)
        modes = args.nanogpt_modes.split(",") if args.nanogpt else []
        for best in [m == "best" for m in modes]:
            side = "nanoGPT best (bf16 autocast, compiled)" if best else "nanoGPT (fp32)"
            results[side] = run_nanogpt(args.config, c, args.nanogpt, args.data, work, args, best)
        if args.transformers:
            results["transformers (bf16 autocast)"] = run_transformers(
                args.config, c, args.data, work, args
            )
    report(args.config, c, results, measure_peak(), args)


if __name__ == "__main__":
    main()
