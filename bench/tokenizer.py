"""GPT-2 BPE encoding speed on tiny Shakespeare: gptkit against tiktoken and tokenizers.

All three encode with GPT-2's own files (``../shared/data/gpt2``: ``encoder.json`` and
``vocab.bpe``; tiktoken's encoding is built from them, nothing is downloaded), one thread
each, the text (1,115,394 bytes) two ways:

- whole: the file as one string;
- lines: each line (ends kept) a call of its own: gptkit's ``encode_batch``, tiktoken's
  ``encode_ordinary`` in a loop, tokenizers' ``encode_batch`` (RAYON_NUM_THREADS=1).

Figures are MB/s (10^6 bytes of UTF-8), the median of ``--reps`` timed runs after a warm-up;
the ids of every encoder are checked equal. gptkit's C encoder keeps a cache of pieces it has
merged, and tiktoken keeps none across calls, so gptkit's main rows use a fresh tokenizer
(empty cache) for every timed run; the warm rows encode again with the cache the previous
run filled. "tokenizers" is gptkit's own path before the C encoder (and its fallback).

::

    python bench/tokenizer.py
    python bench/tokenizer.py --reps 9
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers' batches: one thread too

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TEXT = SHARED / "tinyshakespeare" / "input.txt"
GPT2 = SHARED / "gpt2"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def timed(run: Callable[[Any], Any], reps: int, setup: Callable[[], Any] | None = None) -> dict:
    """Seconds of ``run`` (median and all), after one untimed warm-up; ``setup`` runs
    untimed before each run and hands it its argument. The garbage collector is off while
    a run is timed (as in ``timeit``): the 40,000 lists of a run would otherwise trigger
    full collections over the results kept from earlier runs."""
    arg = setup() if setup else None
    out = run(arg)  # warm-up
    times = []
    for _ in range(reps):
        arg = setup() if setup else None
        out = None
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            out = run(arg)
            times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return {"s": statistics.median(times), "runs": times, "ids": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    for path in (TEXT, GPT2 / "encoder.json", GPT2 / "vocab.bpe"):
        if not path.exists():
            raise SystemExit(f"{path} is absent; the shared data directory holds it")

    import tiktoken
    import tokenizers
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from gptkit.tokenizer import BPETokenizer

    load_before = os.getloadavg()
    text = TEXT.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    mb = len(text.encode("utf-8")) / 1e6
    ranks = data_gym_to_mergeable_bpe_ranks(str(GPT2 / "vocab.bpe"), str(GPT2 / "encoder.json"))
    tt = tiktoken.Encoding(
        "gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    base = BPETokenizer.from_gpt2_files(GPT2 / "encoder.json", GPT2 / "vocab.bpe")
    hf = base._tok  # the tokenizers pipeline gptkit encoded with before

    t0 = time.perf_counter()
    if not BPETokenizer(hf, base.eos_token).fast:
        raise SystemExit("gptkit's C encoder is not built: `pip install -e .` with a C compiler")
    build_s = time.perf_counter() - t0

    def fresh() -> BPETokenizer:
        tok = BPETokenizer(hf, base.eos_token)
        tok._fast_path()  # build the C encoder's tables outside the timed run
        return tok

    warm = fresh()
    reps = args.reps
    rows: dict[str, dict[str, dict]] = {"whole": {}, "lines": {}}
    rows["whole"]["tiktoken"] = timed(lambda _: tt.encode_ordinary(text), reps)
    rows["whole"]["gptkit, fresh cache"] = timed(lambda tok: tok.encode(text), reps, fresh)
    rows["whole"]["gptkit, warm cache"] = timed(lambda _: warm.encode(text), reps)
    rows["whole"]["tokenizers"] = timed(
        lambda _: hf.encode(text, add_special_tokens=False).ids, reps
    )
    rows["lines"]["tiktoken"] = timed(lambda _: [tt.encode_ordinary(s) for s in lines], reps)
    rows["lines"]["gptkit, fresh cache"] = timed(lambda tok: tok.encode_batch(lines), reps, fresh)
    rows["lines"]["gptkit, warm cache"] = timed(lambda _: warm.encode_batch(lines), reps)
    rows["lines"]["tokenizers"] = timed(
        lambda _: [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)], reps
    )
    load_after = os.getloadavg()

    for mode, found in rows.items():
        want = found["tiktoken"]["ids"]
        for name, r in found.items():
            if r["ids"] != want:
                raise SystemExit(f"{mode}: {name}'s ids differ from tiktoken's")

    print(
        f"\nGPT-2 BPE on tiny Shakespeare ({mb * 1e6:,.0f} bytes, "
        f"{len(rows['whole']['tiktoken']['ids']):,} tokens, {len(lines):,} lines), 1 thread; "
        f"median of {reps} (MB/s); tiktoken {tiktoken.__version__}, "
        f"tokenizers {tokenizers.__version__}, Python {sys.version.split()[0]}\n"
    )
    ratio = "vs tiktoken"
    print(f"| {'encoder':<20} | {'whole':>7} | {ratio:>11} | {'lines':>7} | {ratio:>11} |")
    print(f"|{'-' * 22}|{'-' * 9}|{'-' * 13}|{'-' * 9}|{'-' * 13}|")
    for name in rows["whole"]:
        cells = []
        for mode in ("whole", "lines"):
            seconds, anchor = rows[mode][name]["s"], rows[mode]["tiktoken"]["s"]
            cells += [f"{mb / seconds:>7.1f}", f"{anchor / seconds:>11.2f}"]
        print(f"| {name:<20} | " + " | ".join(cells) + " |")
    cold, hot = (mb / rows["whole"][f"gptkit, {c} cache"]["s"] for c in ("fresh", "warm"))
    print(
        f"\nids equal to tiktoken's in every row. The cache: fresh {cold:.1f} vs warm {hot:.1f} "
        "MB/s on the whole text "
        f"({warm._fast_path().encoder.cache_len:,} pieces cached). Building gptkit's C encoder "
        f"from the tokenizer (once per tokenizer, first encode): {build_s * 1e3:.0f} ms. "
        f"Load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f}."
    )
    for mode, found in rows.items():
        for name, r in found.items():
            runs = ", ".join(f"{mb / s:.1f}" for s in r["runs"])
            print(f"  {mode:<5} {name:<20} runs (MB/s): {runs}")


if __name__ == "__main__":
    main()
