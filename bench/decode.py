"""Batch-1 decoding and prefill of SmolLM2-135M: gptkit against transformers and llama.cpp.

All three read the same file, ``models/SmolLM2-135M-Instruct.Q4_1.gguf`` (transformers and
gptkit's fp32 dequantize it; gptkit's int4 re-quantizes it onto the file's own grid), and see
the same 200-token prompt (the start of tiny Shakespeare, as the anchor scripts in
``../shared/anchors`` use). Measured, after a warm-up:

- prefill: tokens/s of one forward over the prompt that yields the next token's logits
  (transformers with ``logits_to_keep=1``, as its ``generate`` prefills; llama.cpp's
  ``eval`` of the prompt);
- decode: tokens/s of 128 greedy steps, one token each, after the prompt.

The "default" row is gptkit as a user gets it with no options: ``gptkit.load(FILE)`` (which
keeps the Q4_1 file as int4) and the decoding loop of ``gptkit.generate`` with its default
``compile="auto"``; the load and the first call (the warm-up, where any compilation
happens) are timed and printed apart from the measured runs.

::

    python bench/decode.py                                         # gptkit and transformers
    python bench/decode.py --llama-python /work/bench-venv/bin/python   # and llama.cpp

``--prompt-tokens 2048`` (or 8192) measures a long context: the prompt is that many tokens
from the start of tiny Shakespeare, and decoding runs at that depth.

``--llama-python`` names an interpreter that has ``llama_cpp`` (llama-cpp-python), run in a
subprocess so it never enters this project's environment. Prints a table of each figure
with its anchor and the ratio; every row comes from this one run, whose measured runs go
round the engines (one run of each per round). The first compiled run of
a mode compiles (minutes on 2 busy cores; torch caches it on disk for the next run).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

LLAMA_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from llama_cpp import Llama
    args = json.loads(sys.argv[1])
    llm = Llama(model_path=args["model"], n_threads=args["threads"],
                n_threads_batch=args["threads"], n_ctx=args["ctx"], n_batch=512, seed=0,
                verbose=False)
    n_vocab = llm.n_vocab()
    def run(ids, new):
        llm.reset(); llm._ctx.kv_cache_clear()
        t0 = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
        out = []
        for _ in range(new):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
            out.append(int(np.argmax(logits)))
            if len(out) < new:
                llm.eval([out[-1]])
        return out, t1 - t0, time.perf_counter() - t1
    run(args["ids"], 8)
    print("ready", flush=True)
    for _ in sys.stdin:  # one measured run per line
        out, tp, td = run(args["ids"], args["new"])
        result = {"prefill": len(args["ids"]) / tp, "decode": (args["new"] - 1) / td, "tokens": out}
        print(json.dumps(result), flush=True)
    """
)

Run = tuple[list[int], float, float]  # greedy tokens, prefill tok/s, decode tok/s


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    ids = tokenizer.encode(TEXT.read_text()[: max(900, 6 * n)])[:n]  # ~4 characters a token
    if len(ids) < n:
        raise SystemExit(f"the prompt text gives {len(ids)} tokens, fewer than {n}")
    return ids


def gptkit_runner(
    model: torch.nn.Module, ids: list[int], new: int, compile: bool
) -> Callable[[], Run]:
    """Prefill and decode tokens/s through gptkit's Decoder, greedy, no eos stop."""
    from gptkit.config import SampleConfig
    from gptkit.generate import generate_ids

    cfg = SampleConfig(temperature=0.0, max_new_tokens=new, stop_at_eos=False)

    def run() -> Run:
        decoder = generate_ids(model, [ids], cfg, compile=compile)
        t0 = time.perf_counter()
        tokens = [next(decoder)[0].token]
        t1 = time.perf_counter()
        tokens += [events[0].token for events in decoder]
        return tokens, len(ids) / (t1 - t0), (new - 1) / (time.perf_counter() - t1)

    run()  # warm-up (and compilation) at the measured cache length
    return run


def default_runner(path: Path, ids: list[int], new: int) -> Callable[[], Run]:
    """gptkit with no options: ``gptkit.load(path)``, then ``generate``'s loop and defaults
    (``compile="auto"``); the load and the first call are reported on stderr."""
    import gptkit
    from gptkit.config import SampleConfig
    from gptkit.generate import generate_ids

    t0 = time.perf_counter()
    model, _ = gptkit.load(path)
    loaded = time.perf_counter() - t0
    cfg = SampleConfig(temperature=0.0, max_new_tokens=new, stop_at_eos=False)

    def run() -> Run:
        decoder = generate_ids(model, [ids], cfg, compile="auto")  # generate()'s default
        t0 = time.perf_counter()
        tokens = [next(decoder)[0].token]
        t1 = time.perf_counter()
        tokens += [events[0].token for events in decoder]
        t2 = time.perf_counter()
        run.compiled = decoder.compile  # type: ignore[attr-defined]
        return tokens, len(ids) / (t1 - t0), (new - 1) / (t2 - t1)

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    print(
        f"gptkit default: load {loaded:.1f} s, first call {first:.1f} s "
        f"({'compiled' if run.compiled else 'eager'})",  # type: ignore[attr-defined]
        file=sys.stderr,
        flush=True,
    )
    return run


def transformers_runner(
    path: Path, dtype: torch.dtype, ids: list[int], new: int
) -> Callable[[], Run]:
    """transformers on the same GGUF (dequantized), greedy ``generate``; decode tokens/s
    leaves the measured prefill time out, as the anchor script does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    model.eval()
    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    kw = dict(do_sample=False, use_cache=True, attention_mask=mask, pad_token_id=2)

    @torch.inference_mode()
    def run() -> Run:
        t0 = time.perf_counter()
        model(input_ids=x, attention_mask=mask, logits_to_keep=1)
        tp = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=new, min_new_tokens=new, **kw)
        total = time.perf_counter() - t0
        return out[0, len(ids) :].tolist(), len(ids) / tp, new / max(total - tp, 1e-9)

    with torch.inference_mode():
        model.generate(x, max_new_tokens=8, min_new_tokens=8, **kw)
    return run


def llamacpp_runner(
    python: str, path: Path, ids: list[int], new: int, threads: int
) -> Callable[[], Run]:
    """llama.cpp in a subprocess that stays up and runs once per request."""
    ctx = max(2048, len(ids) + new + 64)
    args = {"model": str(path), "ids": ids, "new": new, "threads": threads, "ctx": ctx}
    proc = subprocess.Popen(
        [python, "-c", LLAMA_SCRIPT, json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def line() -> str:
        text = proc.stdout.readline()  # type: ignore[union-attr]
        if not text:
            raise SystemExit(f"llama.cpp run failed:\n{proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        return text

    line()  # "ready": loaded and warmed up

    def run() -> Run:
        proc.stdin.write("run\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        r = json.loads(line())
        return r["tokens"], r["prefill"], r["decode"]

    return run


def same_prefix(a: list[int], b: list[int]) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return f"{n}/{min(len(a), len(b))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--modes",
        default="default,fp32,bf16,int4",
        help="gptkit modes to run; default: gptkit with no options",
    )
    parser.add_argument("--no-compile", action="store_true", help="decode gptkit eagerly")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--llama-python", help="an interpreter with llama_cpp installed")
    args = parser.parse_args()
    if not args.model.exists():
        raise SystemExit(f"{args.model} is absent; `make models` fetches it")
    torch.set_num_threads(args.threads)

    import gptkit
    from gptkit.compress import quantize

    base, tok = gptkit.load(args.model, quantize=None)  # fp32, quantized below per mode
    assert tok is not None
    ids = prompt_ids(tok, args.prompt_tokens)
    new, reps = args.new_tokens, args.reps
    modes = [m for m in args.modes.split(",") if m]
    # Every engine is loaded and warmed up first, then the measured runs go round the
    # engines, one run each per round: drift in the machine's speed (other jobs, clocks)
    # then falls on all of them alike.
    runners: dict[str, Callable[[], Run]] = {}
    for mode in modes:
        if mode == "default":
            runners["gptkit default"] = default_runner(args.model, ids, new)
            continue
        model = base if mode == "fp32" else quantize(copy.deepcopy(base), mode)
        runners[f"gptkit {mode}"] = gptkit_runner(model, ids, new, not args.no_compile)
    if not args.no_transformers:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            runners[f"transformers {name}"] = transformers_runner(args.model, dtype, ids, new)
    if args.llama_python:
        runners["llama.cpp Q4_1"] = llamacpp_runner(
            args.llama_python, args.model, ids, new, args.threads
        )
    results = {name: {"prefill": [], "decode": [], "tokens": []} for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            tokens, prefill, decode = run()
            r = results[name]
            r["tokens"] = tokens
            r["prefill"].append(prefill)
            r["decode"].append(decode)
    for name, r in results.items():
        print(f"{name}: {summary(r)}", file=sys.stderr, flush=True)
    ours = {name.split()[1]: r for name, r in results.items() if name.startswith("gptkit ")}
    anchors = {name: r for name, r in results.items() if not name.startswith("gptkit ")}

    # Each gptkit mode against the anchor with the same arithmetic where there is one.
    pairs = [
        ("fp32", "transformers fp32"),
        ("bf16", "transformers bf16"),
        ("int8", "transformers bf16"),
        ("int4", "transformers bf16"),
        ("int4", "llama.cpp Q4_1"),
        ("default", "llama.cpp Q4_1"),
        ("default", "transformers bf16"),
    ]
    how = "eager" if args.no_compile else "compiled"
    print(
        f"\nSmolLM2-135M, batch 1, {len(ids)}-token prompt, {new} new tokens, "
        f"{args.threads} threads, torch {torch.__version__}; median of {reps} (tokens/s)\n"
    )
    print(f"| {'benchmark':<44} | {'gptkit':>8} | {'anchor':>8} | {'ratio':>6} | greedy ids |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 8}|------------|")
    for mode, anchor in pairs:
        if mode not in ours or anchor not in anchors:
            continue
        a, b = ours[mode], anchors[anchor]
        match = same_prefix(a["tokens"], b["tokens"])
        for what in ("prefill", "decode"):
            g, r = statistics.median(a[what]), statistics.median(b[what])
            label = f"{what} gptkit {mode} ({how if mode != 'default' else 'as loaded'})"
            label += f" vs {anchor}"
            print(f"| {label:<44} | {g:>8.1f} | {r:>8.1f} | {g / r:>6.2f} | {match:>10} |")
    for mode in ours:  # modes without an anchor above still get their figures
        if not any(m == mode and a in anchors for m, a in pairs):
            print(f"gptkit {mode}: {summary(ours[mode])}")


def summary(r: dict[str, Any]) -> str:
    return (
        f"prefill {statistics.median(r['prefill']):.0f} tok/s, "
        f"decode {statistics.median(r['decode']):.1f} tok/s "
        f"(runs: {', '.join(f'{x:.1f}' for x in r['decode'])})"
    )


if __name__ == "__main__":
    main()
