"""Running evaluations: perplexity over text, metrics over generated answers, whole reports.

Perplexity uses the sliding-window scheme of Hugging Face's "Perplexity of fixed-length
models" guide, arranged so that every token is scored exactly once::

    tokens  s t0 t1 t2 t3 t4 t5 t6 t7 t8 t9     (s: the start token, never scored)
    win 1  [s t0 t1 t2 t3 t4 t5 t6]             inputs; predicts t0..t7, scores t0..t7
    win 2       [t1 t2 t3 t4 t5 t6 t7 t8]       inputs; predicts t2..t9, scores t8..t9
                                                (block_size 8, stride 4; cut at the end)

Each window holds ``block_size`` inputs and predicts the token after each of them; window
``k`` ends ``stride`` tokens after window ``k - 1`` (the last one at the end of the text) and
scores only the targets its predecessor did not, so each has at least
``block_size - stride`` tokens of left context. Every text gets the tokenizer's bos token
(models that expect one) or end-of-text token as its first context, as lm-eval-harness does
for rolling log-likelihoods, so its first token is scored too; ``bits_per_byte`` (total NLL
in bits over the UTF-8 bytes of the text) then compares models with different tokenizers.

Generation tasks decode greedily in batches through :func:`gptkit.generate.generate`; the
prompts and data readers are in :mod:`gptkit.eval.tasks`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gptkit.errors import GptkitError
from gptkit.eval.calculator import calculator as gsm8k_calculator
from gptkit.eval.classification import CLASSIFICATION_TASKS, classification_eval
from gptkit.eval.code import HumanEvalScorer, require_execute
from gptkit.eval.examples import Example, find_data
from gptkit.eval.metrics import GENERATION_METRICS
from gptkit.eval.multiple_choice import multiple_choice_eval
from gptkit.eval.recommend import movielens_eval
from gptkit.eval.tasks import TASKS, default_data
from gptkit.files import atomic_write_json
from gptkit.generate import generate
from gptkit.generate.chat import apply_chat_template
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer

TaskName = Literal[
    "text",
    "gsm8k",
    "multi30k",
    "tatoeba",
    "scitldr",
    "self_instruct",
    "humaneval",
    "sgd",
    "movielens",
    "nq_open",
    "hellaswag",
    "piqa",
    "sst2",
    "sms_spam",
    "classify",
]
TASK_NAMES: tuple[str, ...] = get_args(TaskName)
_HEAD_CHUNK = 2048  # positions per lm_head call: bounds the (positions, vocab) logits


# -- perplexity ----------------------------------------------------------------------------


def sliding_windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of ``n`` ids that score ids ``1 .. n-1`` once each.

    Returns ``(begin, end, first)`` triples: the window's inputs are ``ids[begin:end]``, its
    targets ``ids[begin+1:end+1]``, and it scores the targets ``ids[first:end+1]``.
    """
    if not 1 <= stride <= block_size:
        raise GptkitError(f"stride must be between 1 and block_size ({block_size}), got {stride}")
    windows: list[tuple[int, int, int]] = []
    last = n - 1  # index of the last target
    scored = 0  # targets 1..scored are done
    end = min(block_size, last)
    while scored < last:
        windows.append((max(0, end - block_size), end, scored + 1))
        scored = end
        end = min(end + stride, last)
    return windows


def start_id(tokenizer: Tokenizer) -> int | None:
    """The id put before a scored text, so that its first token is predicted too: the
    tokenizer's bos where it adds one, else its end-of-text id (GPT-2's way), else None."""
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        return tokenizer.bos_id
    return tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id


def _read_texts(texts_or_file: str | Path | Sequence[str]) -> list[str]:
    if isinstance(texts_or_file, str | Path):
        path = Path(texts_or_file)
        if not path.is_file():
            raise GptkitError(f"text file {path} does not exist; check the --data path")
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise GptkitError(
                f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it first"
            ) from None
    return list(texts_or_file)


def perplexity(
    model: GPT,
    tokenizer: Tokenizer,
    texts_or_file: str | Path | Sequence[str],
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Token-level negative log-likelihood of text under ``model``, by sliding windows.

    Args:
        model: the GPT (evaluated on its own device and dtype, in eval mode).
        tokenizer: the model's tokenizer.
        texts_or_file: a path (str or Path) of a UTF-8 text file, or a list of texts, each
            scored on its own.
        block_size: window length; default and maximum the model's context.
        stride: how far each window moves; default block_size // 2. Smaller gives each token
            more context and costs more forward passes.
        batch_size: windows per forward pass.
        progress: show a progress bar over the windows.

    Returns:
        ``loss`` (mean nats per scored token), ``perplexity`` (exp of it), ``bits_per_byte``
        (total NLL in bits / UTF-8 bytes of the text), ``tokens`` (scored), ``bytes``, and
        the ``block_size``, ``stride`` and number of ``windows`` used.
    """
    context = model.config.block_size
    block_size = block_size or context
    if not 1 <= block_size <= context:
        raise GptkitError(
            f"block_size must be between 1 and the model's context ({context}), got {block_size}"
        )
    stride = stride or max(1, block_size // 2)
    if batch_size < 1:
        raise GptkitError(f"batch_size must be at least 1, got {batch_size}")
    texts = _read_texts(texts_or_file)
    start = start_id(tokenizer)
    seqs = []
    for text in texts:
        ids = tokenizer.encode(text, allow_special=False)
        seqs.append(([start] if start is not None else []) + ids)
    jobs = [
        (i, w) for i, ids in enumerate(seqs) for w in sliding_windows(len(ids), block_size, stride)
    ]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if not jobs:
        raise GptkitError("the text has no token to score; give a longer text")

    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(jobs), desc="perplexity", unit="window", disable=not progress)
    try:
        with torch.inference_mode():
            for b in range(0, len(jobs), batch_size):
                batch = jobs[b : b + batch_size]
                T = max(end - begin for _, (begin, end, _) in batch)
                x = torch.zeros(len(batch), T, dtype=torch.long)  # right-padded; causal
                rows, cols, targets = [], [], []
                for r, (i, (begin, end, first)) in enumerate(batch):
                    ids = seqs[i]
                    x[r, : end - begin] = torch.tensor(ids[begin:end])
                    # target ids[t] is predicted at input position t - 1 - begin
                    rows += [r] * (end + 1 - first)
                    cols += range(first - 1 - begin, end - begin)
                    targets += ids[first : end + 1]
                h = model.hidden(x.to(device))  # (B, T, C)
                h = h[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
                y = torch.tensor(targets, device=device)  # (M,)
                for c in range(0, len(targets), _HEAD_CHUNK):
                    logits = model.lm_head(h[c : c + _HEAD_CHUNK]).float()  # (m, V)
                    nll = F.cross_entropy(logits, y[c : c + _HEAD_CHUNK], reduction="sum")
                    total += nll.item()
                count += len(targets)
                bar.update(len(batch))
                bar.set_postfix(loss=f"{total / count:.4f}")
    finally:
        bar.close()
        model.train(was_training)
    loss = total / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else float("nan"),
        "tokens": count,
        "bytes": n_bytes,
        "block_size": block_size,
        "stride": stride,
        "windows": len(jobs),
    }


# -- generation tasks ----------------------------------------------------------------------

MetricSpec = Sequence[str] | Mapping[str, Callable[[Sequence[str], Sequence[Any]], Any]]


def _metric_fns(metrics: MetricSpec) -> dict[str, Callable[..., Any]]:
    if isinstance(metrics, Mapping):
        return dict(metrics)
    unknown = [m for m in metrics if m not in GENERATION_METRICS]
    if unknown:
        raise GptkitError(f"unknown metric(s) {unknown}; choose from {sorted(GENERATION_METRICS)}")
    return {m: GENERATION_METRICS[m] for m in metrics}


def _prompt_text(tokenizer: Tokenizer, example: Example, chat: bool, i: int) -> str:
    if "prompt" not in example and not (chat and "messages" in example):
        raise GptkitError(f"example {i} has no 'prompt'")
    if "reference" not in example:
        raise GptkitError(f"example {i} has no 'reference'")
    if not chat:
        return example["prompt"]
    messages = example.get("messages") or [{"role": "user", "content": example["prompt"]}]
    return apply_chat_template(tokenizer, messages)


def generation_eval(
    model: GPT,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    metrics: MetricSpec,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat: bool = False,
    stop: Sequence[str] | None = None,
    progress: bool = True,
    tool: Callable[[str], str | None] | None = None,
) -> dict[str, Any]:
    """Greedy answers to ``examples`` and their scores.

    Args:
        model, tokenizer: what to evaluate.
        examples: dicts with ``prompt`` and ``reference`` (a string or a list of them), and
            for chat models optionally ``messages``.
        metrics: names from :data:`gptkit.eval.metrics.GENERATION_METRICS`, or a mapping of
            name -> function(predictions, references) returning a number or a dict of them.
        max_new_tokens: the longest answer, in tokens.
        batch_size: prompts decoded together (batched greedy equals one-by-one).
        chat: render ``messages`` (or the prompt as one user message) with the tokenizer's
            chat template; otherwise the plain ``prompt`` is continued.
        stop: strings that end an answer (for example "\\n\\n"); eos always ends one.
        progress: show a progress bar over the examples.
        tool: written into the answers as they are decoded (see ``tool`` of
            :func:`gptkit.generate.generate`), such as the GSM8K calculator.

    Returns:
        ``metrics`` (name -> score), ``n`` (examples), ``seconds``, ``truncated_prompts``
        (prompts longer than the model's context, whose oldest tokens were dropped) and
        ``predictions`` (per example: id, prompt, reference, prediction).
    """
    fns = _metric_fns(metrics)
    if batch_size < 1:
        raise GptkitError(f"batch_size must be at least 1, got {batch_size}")
    prompts = [_prompt_text(tokenizer, ex, chat, i) for i, ex in enumerate(examples)]
    context = model.config.block_size
    truncated = sum(len(tokenizer.encode_prompt(p)) > context for p in prompts)
    # Batches of similar length waste less on padding; the order does not change the output.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    t0 = time.perf_counter()
    bar = tqdm(total=len(prompts), desc="generate", unit="example", disable=not progress)
    try:
        with warnings.catch_warnings():
            # counted above and reported once, instead of a warning per prompt
            warnings.filterwarnings("ignore", message=r"prompt \d+ has \d+ tokens but the model")
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                outs = generate(
                    model,
                    tokenizer,
                    [prompts[i] for i in idx],
                    max_new_tokens=max_new_tokens,
                    temperature=0.0,
                    stop=list(stop) if stop else None,
                    tool=tool,
                )
                for i, out in zip(idx, outs, strict=True):
                    outputs[i] = out.strip()
                bar.update(len(idx))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if truncated:
        warnings.warn(
            f"{truncated} of {len(prompts)} prompts were longer than the model's context "
            f"({context} tokens) and lost their oldest tokens",
            stacklevel=2,
        )
    references = [ex["reference"] for ex in examples]
    scores: dict[str, float] = {}
    for name, fn in fns.items():
        value = fn(outputs, references)
        scores.update(value if isinstance(value, Mapping) else {name: float(value)})
    predictions = [
        {"id": ex.get("id", i), "prompt": p, "reference": ex["reference"], "prediction": out}
        for i, (ex, p, out) in enumerate(zip(examples, prompts, outputs, strict=True))
    ]
    return {
        "metrics": scores,
        "n": len(examples),
        "seconds": seconds,
        "truncated_prompts": truncated,
        "predictions": predictions,
    }


# -- the whole evaluation ------------------------------------------------------------------


def _data_path(task: str, data: str | None) -> Path:
    if task in ("sst2", "sms_spam", "classify"):
        if data is not None:
            if not Path(data).is_file():
                raise GptkitError(f"--data {data} is not a file; check the path")
            return Path(data)
        if task == "classify":
            raise GptkitError("task classify needs a labelled file; pass --data PATH")
        return find_data(CLASSIFICATION_TASKS[task].default_data, task)
    if data is not None:
        path = Path(data)
        if not path.exists():
            raise GptkitError(f"--data {path} does not exist; check the path")
        if path.is_dir() and task not in ("text", "multi30k"):
            return path / Path(TASKS[task].default_data).name
        return path
    if task == "text":
        raise GptkitError("task text needs a text file; pass --data PATH")
    return default_data(task)


def _print_table(result: dict[str, Any]) -> None:
    head = f"{result['task']} · {result['model']} · {result['data']}"
    n = result.get("n")
    if n is not None:
        head += f" · {n} examples"
    print(f"{head} · {result['seconds']:.1f} s")
    width = max(len(k) for k in result["metrics"])
    for name, value in result["metrics"].items():
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4f}"
        print(f"  {name:<{width}}  {shown:>12}")
    if "confusion_matrix" in result:
        names = result["labels"]
        corner = "gold \\ predicted"
        w = max(len(n) for n in [*names, corner])
        print(f"  {corner:<{w}}  " + "  ".join(f"{n:>8}" for n in names))
        for n, row in zip(names, result["confusion_matrix"], strict=True):
            print(f"  {n:<{w}}  " + "  ".join(f"{c:>8}" for c in row))


def evaluate_model(
    model: str,
    task: TaskName,
    data: str | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    chat: bool | None = None,
    block_size: int | None = None,
    stride: int | None = None,
    report: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    execute: bool = False,
    timeout: float = 10.0,
    labels: str | None = None,
    calculator: bool = False,
    quantize: str | None = None,
) -> dict[str, Any]:
    """Evaluate a model on text (perplexity), classification or a generation task.

    Args:
        model: a checkpoint or run directory (quantized ones too), a Hugging Face directory,
            or a .gguf file.
        task: text (perplexity and bits per byte of --data); sst2, sms_spam or classify (a
            labelled --data file): accuracy, macro-F1 and the confusion matrix; gsm8k (exact
            match on the final number), multi30k (English to German: BLEU, chrF), tatoeba
            (English to Chinese: BLEU with sacrebleu's zh tokenizer, chrF), scitldr
            (ROUGE-1/2/L), self_instruct (ROUGE-L), humaneval (Python functions; pass@1 by
            running each problem's tests on the program, which needs --execute), sgd
            (service-desk turns of Schema-Guided Dialogue: tool-call exact match, argument
            F1, false calls, reply BLEU and ROUGE-L), movielens (each user's last rating
            predicted from the rest: HR@10 and NDCG@10 over the full catalogue, beside the
            most-popular and co-occurrence baselines), nq_open (closed-book questions, few-shot:
            exact match and token F1 against any gold answer), hellaswag and piqa (zero-shot
            multiple choice by log-likelihood: acc, and acc_norm per character of the choice,
            as lm-evaluation-harness reports them).
        data: the data file (or directory); default the task's file under $GPTKIT_DATA or
            shared/data (see gptkit.eval.examples.find_data).
        limit: evaluate only the first N examples.
        max_new_tokens: the longest answer in tokens; default the task's (gsm8k 256,
            self_instruct 128, humaneval 384, others 64).
        batch_size: prompts decoded together, or windows per forward pass for text.
        chat: use the model's chat template; default: when the tokenizer carries one.
        block_size: for text, the window length (default the model's context).
        stride: for text, how far each window moves (default block_size // 2).
        report: write the scores and every prediction to this JSON file.
        device: cpu, cuda, mps.
        progress: show progress bars.
        execute: allow humaneval to run the code the model writes, on this machine: do it
            in a sandbox (a container or VM without network access or secrets).
        timeout: for humaneval, wall-clock seconds per program before it is killed.
        labels: for classification, comma-separated label names (default: the model's
            head, else the task's: sst2 negative,positive; sms_spam ham,spam).
        calculator: for gsm8k, the calculator of Cobbe et al. (2021): when the model writes
            an annotation such as ``<<48/2=``, the result ``24>>`` is written for it. Models
            learn to write annotations from ``gptkit sft-data --task gsm8k --calculator``.
        quantize: evaluate the model quantized (bf16, int8, int4; see ``gptkit quantize``):
            batched generation of SmolLM2 in bf16 ran 1.7x faster than fp32 here. Compare
            models evaluated alike.
    """
    from gptkit.checkpoint import load

    if task not in TASK_NAMES:
        raise GptkitError(f"unknown task {task!r}; choose from {', '.join(TASK_NAMES)}")
    if task == "humaneval":
        require_execute(execute)  # before loading anything
    if calculator and task != "gsm8k":
        raise GptkitError(f"--calculator is for --task gsm8k, not {task}")
    path = _data_path(task, data)
    net, tok = load(model, device=device, quantize=quantize)
    if tok is None:
        raise GptkitError(f"{model} has no tokenizer; evaluation needs one")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"task": task, "model": str(model), "data": str(path)}
    if task in ("sst2", "sms_spam", "classify"):
        names = [n.strip() for n in labels.split(",")] if labels else None
        out = classification_eval(
            net, tok, path, task, names, limit, batch_size=batch_size, progress=progress
        )
        result |= {k: out[k] for k in ("metrics", "n", "labels", "confusion_matrix")}
        result["settings"] = {"limit": limit, "method": out["method"]}
        result["predictions"] = out["predictions"]
    elif task == "movielens":
        out = movielens_eval(net, tok, path, limit, batch_size=batch_size, progress=progress)
        result |= {k: out[k] for k in ("metrics", "n", "settings", "predictions")}
    elif task in ("hellaswag", "piqa"):
        examples = TASKS[task].read(path, limit=limit)
        out = multiple_choice_eval(net, tok, examples, batch_size=batch_size, progress=progress)
        result |= {k: out[k] for k in ("metrics", "n", "predictions")}
        result["settings"] = {"limit": limit, "batch_size": batch_size, "method": "zero-shot"}
    elif task == "text":
        scores = perplexity(net, tok, path, block_size, stride, batch_size, progress)
        result["metrics"] = {k: scores[k] for k in ("loss", "perplexity", "bits_per_byte")}
        result["metrics"] |= {k: scores[k] for k in ("tokens", "bytes")}
        result["settings"] = {k: scores[k] for k in ("block_size", "stride", "windows")}
    else:
        spec = TASKS[task]
        examples = spec.read(path, limit=limit)
        if chat is None:
            chat = tok.chat_template is not None
        new = max_new_tokens or spec.max_new_tokens
        scorer = HumanEvalScorer(chat, execute, timeout) if task == "humaneval" else None
        out = generation_eval(
            net,
            tok,
            examples,
            {"pass@1": scorer} if scorer is not None else spec.metrics,
            max_new_tokens=new,
            batch_size=batch_size,
            chat=chat,
            stop=None if chat else spec.stop,
            progress=progress,
            tool=gsm8k_calculator if calculator else None,
        )
        result["metrics"] = out["metrics"]
        result["n"] = out["n"]
        result["settings"] = {
            "limit": limit,
            "max_new_tokens": new,
            "batch_size": batch_size,
            "chat": chat,
            "stop": [] if chat else list(spec.stop),
            "decoding": "greedy",
        }
        if task == "gsm8k":
            result["settings"]["calculator"] = calculator
        result["truncated_prompts"] = out["truncated_prompts"]
        result["predictions"] = out["predictions"]
        if scorer is not None:  # per problem: the program that ran, passed, and why not
            result["settings"]["timeout"] = timeout
            for row, run in zip(result["predictions"], scorer.results, strict=True):
                row.update(run)
    if quantize is not None:
        result.setdefault("settings", {})["quantize"] = quantize
    result["seconds"] = time.perf_counter() - t0
    if report is not None:
        atomic_write_json(report, result)
    _print_table(result)
    return result
