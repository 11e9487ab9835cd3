"""Pruned and distilled SmolLM2-135M: held-out perplexity, decode speed and size per method.

Pruning (``--part prune``): each method of ``gptkit.compress.prune`` against the dense fp32
model it comes from (the anchor), on ``models/SmolLM2-135M-Instruct.Q4_1.gguf``:

- perplexity on the last ``--tokens`` tokens of tiny Shakespeare (the held-out text of
  ``bench/quantize.py``), in windows of ``--window`` tokens;
- decode tokens/s, batch 1, greedy, eager, ``--new-tokens`` after a 200-token prompt
  (unstructured zeros are stored and multiplied densely, so only structured pruning can
  change it);
- the weights' size as stored (a native checkpoint's tensors; int4 for the dense model and
  one pruned model). Unstructured rows skip the decode measurement: their zeros are
  multiplied densely, at the dense model's speed;
- a quality figure that is not perplexity: zero-shot PIQA ``acc_norm`` on the first
  ``--mc-limit`` questions of ``shared/data/piqa`` (as ``gptkit eval --task piqa``; 0 skips).

Calibration: the first ``--calib-rows`` x ``--calib-length`` tokens of Pride and Prejudice
(``shared/data/gutenberg/1342-0.txt``); recovery (``--recover-steps``) fine-tunes on the next
part of that book, so neither touches the held-out Shakespeare. Unstructured methods at
``--sparsities``; structured at ``--structured`` (heads: SmolLM2 has 3 KV groups, so any
fraction removes one of them, 33%); recovery for the rows in ``--recover``.

Distillation (``--part distill``): a ~28M student with SmolLM2's tokenizer, trained
``--steps`` steps on the start of tiny Shakespeare (all but its held-out end) with the plain
LM loss and, from the same initialisation, distilled from SmolLM2; the perplexity of both and
of the teacher on the held-out end. Then SmolLM2 with 25% of its MLP channels pruned, trained
``--pruned-steps`` steps on the same text with the LM loss (a recovery fine-tune) and, from
the same pruned weights, distilled from the unpruned SmolLM2.

::

    python bench/compress.py                  # pruning table (~15 min on 2 busy cores)
    python bench/compress.py --part distill   # distillation table
    python bench/compress.py --part qlora     # LoRA over an fp32, int8 and int4 base
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import MODEL, REPO, TEXT, gptkit_runner, prompt_ids  # bench/decode.py
from quantize import perplexity  # bench/quantize.py

BOOK = REPO.parent / "shared" / "data" / "gutenberg" / "1342-0.txt"
PIQA = REPO.parent / "shared" / "data" / "piqa"


def piqa_acc_norm(model: torch.nn.Module, tok, limit: int) -> float | None:
    """Zero-shot PIQA acc_norm on the first ``limit`` questions (None when 0 or absent)."""
    from gptkit.eval.multiple_choice import multiple_choice_eval, read_piqa

    if not limit or not PIQA.is_dir():
        return None
    examples = read_piqa(PIQA, limit)
    return multiple_choice_eval(model, tok, examples, progress=False)["metrics"]["acc_norm"]


def decode_speed(model: torch.nn.Module, prompt: list[int], new: int, reps: int) -> float:
    run = gptkit_runner(model, prompt, new, False)
    return statistics.median(run()[2] for _ in range(reps))


def size_mib(model: torch.nn.Module, int4: bool = False) -> float:
    """The bytes of the tensors a checkpoint stores (the tied head once): a native
    checkpoint's weights, or with ``int4`` those of ``gptkit quantize --mode int4``."""
    from gptkit.checkpoint.native import model_state
    from gptkit.compress import quantize

    state = quantize(copy.deepcopy(model), "int4").state_dict() if int4 else model_state(model)
    return sum(t.numel() * t.element_size() for t in state.values()) / 2**20


def prepared_book(tok, source: Path, work: Path, start: int, chars: int) -> Path:
    """``chars`` characters of ``source`` from ``start``, prepared with ``tok``."""
    from gptkit.data.prepare import prepare

    work.mkdir(parents=True, exist_ok=True)
    text = work / "text.txt"
    text.write_text(source.read_text()[start : start + chars])
    tok.save(work / "tok")
    prepare([str(text)], str(work / "data"), tokenizer=str(work / "tok"), progress=False)
    return work / "data"


def prune_table(args: argparse.Namespace) -> None:
    import gptkit
    from gptkit.checkpoint import save_checkpoint
    from gptkit.compress import calibration_ids, prune, weight_sparsity
    from gptkit.compress.prune import recover

    base, tok = gptkit.load(args.model, quantize=None)
    held_out = tok.encode(TEXT.read_text()[-40 * args.tokens :])[-args.tokens :]
    prompt = prompt_ids(tok, 200)
    calib = calibration_ids(BOOK, tok, args.calib_rows, args.calib_length)
    work = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    recover_data = None
    blocks = base.num_params(embeddings=False)
    rows: list[tuple[str, dict]] = []

    def measure(name: str, model: torch.nn.Module, seconds: float, speed: bool = True) -> None:
        row = {
            "ppl": perplexity(model, held_out, args.window),
            "decode": decode_speed(model, prompt, args.new_tokens, args.reps) if speed else None,
            "zeros": weight_sparsity(model),
            "removed": 1 - model.num_params(embeddings=False) / blocks,
            "size": size_mib(model),
            "seconds": seconds,
            "piqa": piqa_acc_norm(model, tok, args.mc_limit),
        }
        rows.append((name, row))
        print(f"{name}: {row}", file=sys.stderr, flush=True)

    measure("dense", base, 0.0)
    plan = [(m, s) for m in ("magnitude", "wanda") for s in args.sparsities]
    plan += [("2:4", 0.5), ("2:4 magnitude", 0.5)]
    plan += [(m, s) for m in ("heads", "channels", "layers") for s in args.structured]
    done_heads = False
    for method, s in plan:
        if method == "heads" and done_heads:
            continue  # every fraction removes one of the 3 KV groups
        done_heads = done_heads or method == "heads"
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        if method == "2:4 magnitude":
            prune(model, "2:4")
        else:
            prune(model, method, None if method == "2:4" else s, calib)
        seconds = time.perf_counter() - t0
        label = f"{method} {s:.0%}" if method != "heads" else "heads 1/3 KV groups"
        measure(label, model, seconds, speed=method in ("heads", "channels", "layers"))
        if method == "channels" and abs(s - 0.25) < 1e-9:
            rows[-1][1]["size_int4"] = size_mib(model, int4=True)
        if args.recover_steps and any(label.startswith(r) for r in args.recover):
            if recover_data is None:
                recover_data = prepared_book(tok, BOOK, work / "book", 20_000, 400_000)
            save_checkpoint(work / "pruned", model, tok)
            t0 = time.perf_counter()
            tuned = recover(work / "pruned", recover_data, args.recover_steps, seq_len=256)
            measure(f"{label} + {args.recover_steps} steps", tuned, time.perf_counter() - t0)
        del model
    rows[0][1]["size_int4"] = size_mib(base, int4=True)
    print(
        f"\nSmolLM2-135M ({args.model.name}, fp32): perplexity on the last {len(held_out)} "
        f"tokens of tiny Shakespeare (windows of {args.window}); batch-1 eager decode of "
        f"{args.new_tokens} tokens after 200; calibration {args.calib_rows}x"
        f"{args.calib_length} tokens of Pride and Prejudice; {args.threads} threads, torch "
        f"{torch.__version__}.\n"
    )
    piqa = f"PIQA acc_norm (first {args.mc_limit})"
    print(f"| model | zeros | block params removed | perplexity | {piqa} ", end="")
    print("| decode tok/s | MiB | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        mib = f"{r['size']:.0f}" + (f" (int4 {r['size_int4']:.0f})" if "size_int4" in r else "")
        speed = "as dense" if r["decode"] is None else f"{r['decode']:.1f}"
        acc = "-" if r["piqa"] is None else f"{r['piqa']:.3f}"
        print(
            f"| {name} | {r['zeros']:.0%} | {r['removed']:.0%} | {r['ppl']:.2f} | {acc} | "
            f"{speed} | {mib} | {r['seconds']:.0f} |"
        )


def distill_table(args: argparse.Namespace) -> None:
    import gptkit
    from gptkit.compress import distill
    from gptkit.train import train

    teacher, tok = gptkit.load(args.model, quantize=None)
    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    text = TEXT.read_text()
    cut = len(text) - 40 * args.tokens  # the held-out end stays out of training
    data = prepared_book(tok, TEXT, work / "shakespeare", 0, cut)
    held_out = tok.encode(text[-40 * args.tokens :])[-args.tokens :]
    student = dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, mlp_hidden=1024,
                   norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False,
                   block_size=512)  # fmt: skip
    common = dict(max_steps=args.steps, batch_size=8, seq_len=128, lr=2e-3, min_lr=2e-4,
                  warmup_steps=20, eval_every=0, save_every=0, progress=False,
                  seed=0, **student)  # fmt: skip
    t0 = time.perf_counter()
    plain = train(data, work / "plain", preset="tiny", **common)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    kd = distill(str(args.model), "tiny", data, work / "kd", temperature=args.temperature,
                 alpha=args.alpha, **common)  # fmt: skip
    t_kd = time.perf_counter() - t0
    results = {
        "teacher (SmolLM2-135M)": (perplexity(teacher, held_out, args.window), 0.0),
        "student, LM loss": (perplexity(gptkit.load(work / "plain")[0], held_out, 128), t_plain),
        "student, distilled": (perplexity(gptkit.load(work / "kd")[0], held_out, 128), t_kd),
    }
    if args.pruned_steps:
        results |= pruned_rows(args, teacher, tok, data, held_out, work)
    print(
        f"\nStudent {plain['params'] / 1e6:.1f}M parameters ({kd['params'] / 1e6:.1f}M), "
        f"{args.steps} steps of 8x128 tokens of tiny Shakespeare (its held-out end excluded), "
        f"T={args.temperature}, alpha={args.alpha}; perplexity on the last {len(held_out)} "
        f"tokens (students: windows of 128; teacher: {args.window}).\n"
    )
    print("| model | perplexity | train s |")
    print("|---|---|---|")
    for name, (ppl, s) in results.items():
        print(f"| {name} | {ppl:.2f} | {s:.0f} |")


def pruned_rows(args, teacher, tok, data: Path, held_out: list[int], work: Path) -> dict:
    """SmolLM2 with 25% of its MLP channels pruned, then fine-tuned (LM loss) or distilled
    from the unpruned model: the same steps, data and starting weights."""
    import gptkit
    from gptkit.checkpoint import save_checkpoint
    from gptkit.compress import calibration_ids, distill, prune
    from gptkit.compress.prune import recover

    pruned = copy.deepcopy(teacher)
    prune(pruned, "channels", 0.25, calibration_ids(BOOK, tok, args.calib_rows, args.calib_length))
    save_checkpoint(work / "pruned", pruned, tok)
    kw = dict(batch_size=4, seq_len=256, lr=1e-4, min_lr=1e-5, warmup_steps=5, progress=False,
              seed=0)  # fmt: skip
    steps = args.pruned_steps
    t0 = time.perf_counter()
    tuned = recover(work / "pruned", data, steps, **kw)
    t_tuned = time.perf_counter() - t0
    t0 = time.perf_counter()
    distill(str(args.model), str(work / "pruned"), data, work / "pruned-kd", max_steps=steps,
            temperature=args.temperature, alpha=args.alpha, eval_every=0, save_every=0,
            **kw)  # fmt: skip
    t_kd = time.perf_counter() - t0
    kd = gptkit.load(work / "pruned-kd")[0]
    return {
        "SmolLM2, 25% channels pruned": (perplexity(pruned, held_out, args.window), 0.0),
        f"  + {steps} steps LM loss": (perplexity(tuned, held_out, args.window), t_tuned),
        f"  + {steps} steps distilled": (perplexity(kd, held_out, args.window), t_kd),
    }


def qlora_table(args: argparse.Namespace) -> None:
    """LoRA (rank 8 on qkv, proj, fc) over SmolLM2's fp32, int8 and int4 base: the bytes of
    the model's weights and the seconds per training step (batch 4 x 128 tokens)."""
    import gptkit
    from gptkit.model.lora import apply_lora
    from gptkit.model.quant import quantize_base
    from gptkit.train.objectives import autocast, batch_loss
    from gptkit.train.setup import resolve_precision

    base, tok = gptkit.load(args.model, quantize=None)
    ids = torch.tensor(tok.encode(BOOK.read_text()[:20_000])[: 4 * 129]).view(4, 129)
    batch = (ids[:, :-1], ids[:, 1:])
    precision = resolve_precision("auto", torch.device("cpu"))
    print(f"precision {precision}, {args.threads} threads")
    print("| base | weights MiB | s/step | loss |")
    print("|---|---|---|---|")
    for mode in ("fp32", "int8", "int4"):
        model = apply_lora(copy.deepcopy(base), rank=8)
        if mode != "fp32":
            quantize_base(model, mode)
        model.train()
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
        mib = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times = []
        for _ in range(args.reps + 1):
            t0 = time.perf_counter()
            with autocast(torch.device("cpu"), precision):
                loss = batch_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        print(f"| {mode} | {mib:.0f} | {statistics.median(times[1:]):.2f} | {loss.item():.3f} |")
        del model, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("prune", "distill", "qlora"), default="prune")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens to score")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5, 0.7])
    parser.add_argument("--structured", type=float, nargs="+", default=[0.1, 0.25, 0.4])
    parser.add_argument("--calib-rows", type=int, default=4)
    parser.add_argument("--calib-length", type=int, default=128)
    parser.add_argument("--recover-steps", type=int, default=10)
    parser.add_argument("--recover", nargs="*", default=["heads", "channels 25%", "layers 25%"])
    parser.add_argument("--steps", type=int, default=150, help="distill: training steps")
    parser.add_argument(
        "--pruned-steps",
        type=int,
        default=40,
        help="distill: steps for the pruned SmolLM2 rows (0 skips them)",
    )
    parser.add_argument(
        "--mc-limit", type=int, default=200, help="prune: PIQA questions scored per row (0 skips)"
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()
    if not args.model.exists():
        raise SystemExit(f"{args.model} is absent; `make models` fetches it")
    torch.set_num_threads(args.threads)
    {"prune": prune_table, "distill": distill_table, "qlora": qlora_table}[args.part](args)


if __name__ == "__main__":
    main()
