"""``gptkit demo``: the whole path on data every Python install carries.

It gathers Python source files from the standard library of the running interpreter, trains a
byte-level BPE tokenizer on them, prepares token shards, pretrains a small GPT with a live
progress bar, evaluates it, writes a checkpoint and a loss curve, and prints generated code.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from gptkit.errors import GptkitError

# Parts of the standard library that are not representative Python code (test suites,
# generated tables, vendored packages).
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "site-packages",
    "__pycache__",
    "pydoc_data",
    "encodings",
    "config-3",
    "distutils",
}
MARKER = ".gptkit-demo"


def stdlib_sources(limit_bytes: int, seed: int = 0) -> list[Path]:
    """Python files of this interpreter's standard library, a seeded sample of about
    ``limit_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not (set(p.relative_to(root).parts[:-1]) & _SKIP_DIRS)
        and not any(part.startswith("config-") for part in p.parts)
        and 200 < p.stat().st_size < 250_000
    )
    if not files:
        raise GptkitError(f"found no Python sources under {root}; pass your own data to prepare")
    random.Random(seed).shuffle(files)
    chosen, total = [], 0
    for p in files:
        if total >= limit_bytes:
            break
        chosen.append(p)
        total += p.stat().st_size
    return chosen


def demo(
    out: str = "gptkit-demo",
    corpus_mb: float = 3.0,
    vocab_size: int = 2048,
    max_steps: int | None = None,
    samples: int = 3,
    max_new_tokens: int = 150,
    seed: int = 1337,
    progress: bool = True,
) -> dict:
    """Train a small GPT on Python's own standard library and print code it writes.

    Args:
        out: working directory (data/, run/); a previous demo there is replaced.
        corpus_mb: megabytes of standard-library source to train on.
        vocab_size: byte-level BPE vocabulary size.
        max_steps: optimizer steps (default: the "demo" preset's).
        samples: code samples to print at the end.
        max_new_tokens: tokens per sample.
        seed: seed for the corpus sample, training and sampling.
        progress: show progress bars.
    """
    from gptkit.checkpoint import load
    from gptkit.data.prepare import prepare
    from gptkit.generate import generate
    from gptkit.train import train

    t0 = time.perf_counter()
    work = Path(out)
    if work.exists():
        if not (work / MARKER).exists():
            raise GptkitError(
                f"{work} exists and is not a gptkit demo directory; choose another --out"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("created by `gptkit demo`; safe to delete\n")

    files = stdlib_sources(int(corpus_mb * 1e6), seed)
    print(
        f"[1/4] corpus: {len(files)} files of Python {sys.version.split()[0]}'s standard library",
        file=sys.stderr,
    )
    meta = prepare(
        [str(f) for f in files],
        str(work / "data"),
        tokenizer="bpe",
        vocab_size=vocab_size,
        seed=seed,
        progress=progress,
    )
    print(
        f"[2/4] tokens: {meta['splits']['train']['tokens']:,} train, "
        f"{meta['splits']['val']['tokens']:,} validation (vocabulary {meta['vocab_size']})",
        file=sys.stderr,
    )
    print("[3/4] pretraining (Ctrl-C stops early and keeps a checkpoint)", file=sys.stderr)
    result = train(
        work / "data",
        work / "run",
        preset="demo",
        progress=progress,
        seed=seed,
        max_steps=max_steps,
    )
    model, tokenizer = load(work / "run")
    assert tokenizer is not None
    val = result["val_loss"]
    ppl = math.exp(val) if val is not None else float("nan")
    print(
        f"[4/4] validation loss {val:.3f} nats/token (perplexity {ppl:.1f}); "
        f"checkpoint {result['checkpoint']}; loss curve {result['loss_png']}",
        file=sys.stderr,
    )
    # No trailing space: byte-level BPE tokens carry their leading space (" name").
    prompts = ["def", "class", "import os\n\n\ndef"][:samples]
    prompts += ["def"] * (samples - len(prompts))
    texts = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=0.7,
        top_k=40,
        seed=seed,
    )
    for i, (p, t) in enumerate(zip(prompts, texts, strict=True), 1):
        print(f"\n----- sample {i} (prompt {p!r}) -----\n{p}{t}")
    elapsed = time.perf_counter() - t0
    print(f'\ndone in {elapsed:.0f} s; try: gptkit generate --model {work / "run"} "def"')
    return result | {"seconds": elapsed, "samples": texts}
