"""Quantized SmolLM2-135M: perplexity on held-out text, decode speed and size, per mode.

Each mode of ``gptkit.compress.quantize`` (:mod:`gptkit.model.quant`) against the fp32
model it comes from (the anchor), all in one run on ``models/SmolLM2-135M-Instruct.Q4_1.gguf``:

- perplexity on the last ``--tokens`` tokens of tiny Shakespeare (the held-out end of the
  file), in windows of ``--window`` tokens, every token but each window's first scored;
- decode tokens/s, batch 1, greedy, 128 new tokens after a 200-token prompt (compiled, as
  ``bench/decode.py`` measures it; ``--no-compile`` for eager);
- the checkpoint's size on disk (``gptkit quantize`` output; fp32: a native checkpoint).

::

    python bench/quantize.py                    # fp32, bf16, int8, int4
    python bench/quantize.py --modes int4 --no-compile
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import MODEL, TEXT, gptkit_runner, prompt_ids  # bench/decode.py


def perplexity(model: torch.nn.Module, ids: list[int], window: int) -> float:
    nll, n = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            x = torch.tensor([ids[start : start + window]])
            if x.shape[1] < 2:
                break
            logits = model(x)[0, :-1].float()
            nll += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
            n += x.shape[1] - 1
    return math.exp(nll / n)


def size_mib(model: torch.nn.Module, tokenizer, quantized: bool) -> float:
    from gptkit.checkpoint import save_checkpoint
    from gptkit.compress import save_quantized

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt"
        (save_quantized if quantized else save_checkpoint)(out, model, tokenizer)
        return (out / "model.safetensors").stat().st_size / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--modes", default="fp32,bf16,int8,int4")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if not args.model.exists():
        raise SystemExit(f"{args.model} is absent; `make models` fetches it")
    torch.set_num_threads(args.threads)

    import gptkit
    from gptkit.compress import quantize

    base, tok = gptkit.load(args.model, quantize=None)  # the fp32 anchor
    assert tok is not None
    text = TEXT.read_text()
    held_out = tok.encode(text[-40 * args.tokens :])[-args.tokens :]  # ~10 chars a token
    prompt = prompt_ids(tok, 200)
    rows = {}
    for mode in ["fp32", *[m for m in args.modes.split(",") if m and m != "fp32"]]:
        model = base if mode == "fp32" else quantize(copy.deepcopy(base), mode)
        t0 = time.perf_counter()
        ppl = perplexity(model, held_out, args.window)
        t_ppl = time.perf_counter() - t0
        run = gptkit_runner(model, prompt, args.new_tokens, not args.no_compile)
        runs = [run() for _ in range(args.reps)]  # (tokens, prefill tok/s, decode tok/s)
        rows[mode] = {
            "ppl": ppl,
            "decode": statistics.median(r[2] for r in runs),
            "prefill": statistics.median(r[1] for r in runs),
            "size": size_mib(model, tok, mode != "fp32"),
        }
        print(f"{mode}: {rows[mode]} (perplexity in {t_ppl:.0f} s)", file=sys.stderr, flush=True)
        if mode != "fp32":
            del model

    how = "eager" if args.no_compile else "compiled"
    print(
        f"\nSmolLM2-135M ({args.model.name}): perplexity on the last {len(held_out)} tokens of "
        f"tiny Shakespeare (windows of {args.window}); batch-1 decode ({how}) and prefill of a "
        f"200-token prompt; {args.threads} threads, torch {torch.__version__}. Anchor: fp32.\n"
    )
    ref = rows["fp32"]
    print(f"| {'benchmark':<28} | {'gptkit':>8} | {'anchor':>8} | {'ratio':>6} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
    for mode, r in rows.items():
        if mode == "fp32":
            continue
        for key, label in (
            ("ppl", "perplexity"),
            ("decode", "decode tok/s"),
            ("prefill", "prefill tok/s"),
            ("size", "weights MiB"),
        ):
            name = f"{label} {mode}"
            print(f"| {name:<28} | {r[key]:>8.2f} | {ref[key]:>8.2f} | {r[key] / ref[key]:>6.2f} |")


if __name__ == "__main__":
    main()
