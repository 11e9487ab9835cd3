"""Speculative decoding of SmolLM2-135M (bf16) against the same model decoding alone.

The target is ``models/SmolLM2-135M-Instruct.Q4_1.gguf`` in bf16 (``quantize="bf16"``, the
fast bf16 path of ``bench/decode.py``). Two drafts, side by side in one run, greedy:

- ``int4``: the same model quantized to int4 on a copy (``draft="int4"``);
- ``lookup``: prompt lookup decoding, no model (``draft="lookup"``).

The prompt (``--task``) asks for an edit of a short article: each sentence as a bullet
point, wording kept (the default, ``edit``; SmolLM2 writes the article out again nearly word
for word: an answer that copies its prompt, as edits of text and code do, which is where
lookup helps), for a three-sentence summary of it (``summary``: a 135M model paraphrases
more than it lifts), or for a 20-line snippet written out again with a variable renamed
(``code``; it rewrites more than it copies).
Measured per engine: tokens/s from the prompt to the last new token (prefill included; the
same for all), the share of proposals that stood, tokens per forward of the model, and
whether the greedy ids equal the target's alone (if not, how many leading ones do). The
measured runs go round the engines, one run each per round. In bf16 the ids may part where
the model's logits nearly tie: the check attends with k + 1 query rows at once, whose bf16
sums round differently from one row's (the linear layers give every row the same bits); in
fp32 they are equal (as in ``tests/test_speculative.py``).

::

    python bench/speculative.py                  # compiled (the first run compiles: minutes)
    python bench/speculative.py --no-compile     # eager
    python bench/speculative.py --task summary   # a summary (or --task code: a code edit)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

CODE = '''def summarize(orders, tax_rate=0.2):
    """Totals per customer, with tax, of a list of orders."""
    total = {}
    for order in orders:
        customer = order["customer"]
        amount = order["quantity"] * order["price"]
        if order.get("discount"):
            amount = amount * (1 - order["discount"])
        total[customer] = total.get(customer, 0) + amount
    for customer in total:
        total[customer] = round(total[customer] * (1 + tax_rate), 2)
    return total


def top_customers(orders, n=3):
    """The n customers who spent the most."""
    total = summarize(orders)
    ranked = sorted(total.items(), key=lambda item: item[1], reverse=True)
    return [customer for customer, _ in ranked[:n]]
'''
ARTICLE = (
    "The town of Millbrook finished restoring the Alder River last spring, eleven years after "
    "the old paper mill closed. Engineers removed two concrete weirs that had blocked fish for "
    "a century, replanted four kilometres of bank with willow and alder, and rebuilt the "
    "gravel beds where salmon lay their eggs. The project cost 6.2 million euros, of which "
    "the regional government paid two thirds and a group of local families raised the rest "
    "through a cooperative. In the first autumn after the work, volunteers counted 340 salmon "
    "moving upstream, against none in the ten years before. Flooding in the lower town has "
    "also fallen, because the wider banks hold water that used to spill into the streets. Not "
    "everyone is pleased: two farmers lost part of their fields to the new floodplain and say "
    "the compensation was too small, and anglers complain that new rules close the river to "
    "fishing for three months a year. The council plans to publish a full report on the "
    "river's health next year."
)
TASKS = {
    # an edit: the article's sentences as bullet points, wording kept
    "edit": (
        "Rewrite this article as a list of bullet points, one per sentence, keeping the "
        f"wording.\n\n{ARTICLE}"
    ),
    # a summary: SmolLM2 paraphrases, so few of lookup's proposals stand
    "summary": f"Summarize this article in three sentences.\n\n{ARTICLE}",
    # a code edit: the answer would copy the code (a 135M model rewrites more than it copies)
    "code": (
        "Here is some Python code. Write it out again exactly, with one change: the variable "
        f"`total` is renamed to `spent`.\n\n```python\n{CODE}```"
    ),
}

Run = tuple[list[int], float, Any]  # greedy ids, tokens/s, the decoder (its counts)


def runner(model: Any, ids: list[int], cfg: Any, eos: int, draft: Any, k: int, compile: bool):
    """One engine: the target alone (``draft`` None) or with a draft; warmed up once."""
    from gptkit.generate import generate_ids
    from gptkit.generate.speculative import SpeculativeDecoder

    def run() -> Run:
        if draft is None:
            decoder: Any = generate_ids(model, [ids], cfg, eos, compile=compile)
        else:
            decoder = SpeculativeDecoder(model, [ids], cfg, draft, k, eos_id=eos, compile=compile)
        t0 = time.perf_counter()
        tokens = [ev.token for events in decoder for ev in events]
        return tokens, len(tokens) / (time.perf_counter() - t0), decoder

    run()  # warm-up (and compilation)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--draft-tokens", type=int, default=4, help="k for the int4 draft")
    parser.add_argument("--lookup-tokens", type=int, default=8, help="k for prompt lookup")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="decode eagerly")
    parser.add_argument("--task", choices=sorted(TASKS), default="edit", help="the prompt")
    args = parser.parse_args()
    if not args.model.exists():
        raise SystemExit(f"{args.model} is absent; `make models` fetches it")
    torch.set_num_threads(args.threads)

    import gptkit
    from gptkit.config import SampleConfig
    from gptkit.generate.speculative import LookupDraft, ModelDraft, int4_draft
    from gptkit.tokenizer.chat import apply_chat_template

    compile = not args.no_compile
    model, tok = gptkit.load(args.model, quantize="bf16")
    assert tok is not None and tok.eos_id is not None
    text = apply_chat_template(tok, [{"role": "user", "content": TASKS[args.task]}])
    ids = tok.encode(text)
    cfg = SampleConfig(temperature=0.0, max_new_tokens=args.new_tokens)
    engines: dict[str, Callable[[], Run]] = {}
    for name, draft, k in (
        ("bf16 alone", None, 0),
        ("bf16 + int4 draft", ModelDraft(int4_draft(model), compile), args.draft_tokens),
        ("bf16 + lookup", LookupDraft(), args.lookup_tokens),
    ):
        print(f"warming up {name}", file=sys.stderr, flush=True)
        engines[name] = runner(model, ids, cfg, tok.eos_id, draft, k, compile)
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    last: dict[str, Run] = {}
    for _ in range(args.reps):
        for name, run in engines.items():
            last[name] = run()
            speeds[name].append(last[name][1])
    base_ids, base = last["bf16 alone"][0], statistics.median(speeds["bf16 alone"])
    how = "eager" if args.no_compile else "compiled"
    print(
        f"\nSmolLM2-135M bf16, batch 1, {len(ids)}-token {args.task} prompt, greedy, up to "
        f"{args.new_tokens} new tokens ({len(base_ids)} made), {how}, {args.threads} threads, "
        f"torch {torch.__version__}; median of {args.reps} (tokens/s)\n"
    )
    print(
        f"| {'engine':<20} | {'k':>2} | {'tok/s':>7} | {'ratio':>5} | accepted | tok/fwd |"
        " same ids |"
    )
    print(f"|{'-' * 22}|----|{'-' * 9}|-------|----------|---------|----------|")
    for (name, (tokens, _, decoder)), k in zip(
        last.items(), (0, args.draft_tokens, args.lookup_tokens), strict=True
    ):
        speed = statistics.median(speeds[name])
        rate = f"{decoder.acceptance_rate:8.2f}" if k else f"{'-':>8}"
        per = f"{len(tokens) / decoder.rounds:7.2f}" if k else f"{1:7.2f}"
        # "yes", or how many leading tokens equal the target's alone
        pairs = enumerate(zip(tokens, base_ids, strict=False))
        lead = next((i for i, (a, b) in pairs if a != b), None)
        lead = min(len(tokens), len(base_ids)) if lead is None else lead
        same = "yes" if tokens == base_ids else str(lead)
        print(
            f"| {name:<20} | {k:>2} | {speed:>7.1f} | {speed / base:>5.2f} | {rate} | {per} |"
            f" {same:>8} |"
        )
    print(f"\n{tok.decode(base_ids)}", file=sys.stderr)


if __name__ == "__main__":
    main()
