"""Zero-shot multiple choice by log-likelihood: HellaSwag, PIQA, and any (context, choices) set.

Each choice is scored as the summed log-probability of ``" " + choice`` given the context,
as lm-evaluation-harness (Gao et al., "A framework for few-shot language model
evaluation", ``lm_eval/api/task.py``, ``multiple_choice`` output type) does::

    acc       argmax_i  sum_t log p(cont_i[t] | context, cont_i[:t])
    acc_norm  argmax_i  (the same sum) / len(choice_i)      (characters of the choice)

so ``acc_norm`` does not favour short endings. The tokens are split as the harness splits
them: a context's trailing spaces move to the continuation, the continuation's ids are
those of ``encode(context + continuation)`` after the ``len(encode(context))`` first, an
empty context becomes the start token, and a pair longer than the model's context loses its
oldest context tokens.

The context is computed once for all its choices: a batch of contexts is prefilled into a
KV cache, each row is copied to one row per choice (:meth:`KVCache.keep`), and the choices
are run over it in one forward::

    prefill  [ctx_0 . . .]  [ctx_1 . .]            rows: contexts, right-padded
    keep     ctx_0 ctx_0 ctx_0 ctx_0 ctx_1 ctx_1   rows: one per choice
    choices  [c00 .] [c01] [c02 . .] ... [c11 .]   rows: continuations, right-padded

Data: HellaSwag (Zellers et al. 2019; the text export of its validation set in
``shared/data/hellaswag``) preprocessed as the harness's ``hellaswag/utils.py`` does, and
PIQA (Bisk et al. 2020) worded as the harness's ``piqa.yaml``: ``Question: {goal}\\nAnswer:``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gptkit.errors import GptkitError
from gptkit.eval.examples import (
    Example,
    check_limit,
    limit_reached,
    read_jsonl,
    read_lines,
    row_field,
)
from gptkit.model import GPT
from gptkit.model.kv_cache import KVCache
from gptkit.tokenizer import Tokenizer

_HEAD_CHUNK = 2048  # positions per lm_head call: bounds the (positions, vocab) logits


# -- the readers ---------------------------------------------------------------------------


def _choice_example(
    where: str, context: str, choices: list[str], label: int, messages: str
) -> Example:
    if not 0 <= label < len(choices):
        raise GptkitError(f"{where}: label {label} is not the index of one of the choices")
    return dict(
        id=where,
        prompt=context,
        messages=[{"role": "user", "content": messages}],
        reference=choices[label],
        choices=choices,
        label=label,
    )


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleaning of HellaSwag text (WikiHow markup, double spaces)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _capitalize_last_fragment(context: str) -> str:
    # The harness builds the context as ctx_a + " " + ctx_b.capitalize(); the export keeps
    # only the joined text, whose ctx_b is the unfinished sentence after the last ". ".
    head, dot, tail = context.rpartition(". ")
    return head + dot + tail[:1].upper() + tail[1:]


def read_hellaswag(path: str | Path, limit: int | None = None) -> list[Example]:
    """HellaSwag's 6-line text export: ``label: context``, the gold index, four endings.

    Args:
        path: ``hellaswag_val_full.txt`` (or the directory holding it).
        limit: read at most this many tasks.
    """
    check_limit(limit)
    path = Path(path)
    if path.is_dir():
        path = path / "hellaswag_val_full.txt"
    lines = [line for _, line in read_lines(path)]
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise GptkitError(
            f"{path} has {len(lines)} lines, not a multiple of 6 (context, gold index, four "
            "endings per task); is it the HellaSwag text export?"
        )
    examples: list[Example] = []
    for k in range(0, len(lines), 6):
        where = f"{path}:{k + 1}"
        gold = lines[k + 1].strip()
        if gold not in ("0", "1", "2", "3"):
            raise GptkitError(f"{path}:{k + 2}: expected the gold index 0-3, got {gold!r}")
        context = _capitalize_last_fragment(hellaswag_preprocess(lines[k]))
        endings = [hellaswag_preprocess(e) for e in lines[k + 2 : k + 6]]
        message = "Which ending is the most likely?\n\n" + context
        examples.append(_choice_example(where, context, endings, int(gold), message))
        if limit_reached(examples, limit):
            break
    return examples


def read_piqa(path: str | Path, limit: int | None = None) -> list[Example]:
    """PIQA: ``valid.jsonl`` (goal, sol1, sol2) with ``valid-labels.lst`` beside it.

    Args:
        path: the jsonl file (its labels are ``<stem>-labels.lst``) or the directory.
        limit: read at most this many examples.
    """
    check_limit(limit)
    path = Path(path)
    if path.is_dir():
        path = path / "valid.jsonl"
    labels_path = path.with_name(path.name.removesuffix(".jsonl") + "-labels.lst")
    if not labels_path.is_file():
        raise GptkitError(f"{labels_path} does not exist; PIQA's labels file must be beside {path}")
    labels = [line.strip() for _, line in read_lines(labels_path) if line.strip()]
    examples: list[Example] = []
    for n, (where, row) in enumerate(read_jsonl(path)):
        if n >= len(labels):
            raise GptkitError(f"{labels_path} has {len(labels)} labels but {path} has more rows")
        if labels[n] not in ("0", "1"):
            raise GptkitError(f"{labels_path}:{n + 1}: expected 0 or 1, got {labels[n]!r}")
        goal = row_field(where, row, "goal", str)
        sols = [row_field(where, row, f"sol{i}", str) for i in (1, 2)]
        context = f"Question: {goal}\nAnswer:"
        examples.append(_choice_example(where, context, sols, int(labels[n]), goal))
        if limit_reached(examples, limit):
            break
    return examples


MULTIPLE_CHOICE_READERS = {"hellaswag": read_hellaswag, "piqa": read_piqa}


# -- scoring -------------------------------------------------------------------------------


def split_pair(
    tokenizer: Tokenizer, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Context and continuation ids as the harness splits them (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise GptkitError("an empty context needs a bos or eos token; this tokenizer has none")
        return [start], tokenizer.encode(continuation, allow_special=False)
    whole = tokenizer.encode(context + continuation, allow_special=False)
    n = len(tokenizer.encode(context, allow_special=False))
    return whole[:n], whole[n:]


def _score_batch(
    model: GPT, contexts: list[list[int]], conts: list[list[list[int]]]
) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, greedy) of each continuation of each context; one prefill a context."""
    param = next(model.parameters())
    device = param.device
    n_ctx = [len(c) for c in contexts]
    longest = max(len(c) for cs in conts for c in cs)
    cache = KVCache(model.config, len(contexts), max(n_ctx) + longest, device, param.dtype)
    x = torch.zeros(len(contexts), max(n_ctx), dtype=torch.long)  # right-padded
    for r, c in enumerate(contexts):
        x[r, : len(c)] = torch.tensor(c)
    h_ctx = model.hidden(x.to(device), cache)  # (B, Tc, C)
    last = h_ctx[torch.arange(len(contexts), device=device), torch.tensor(n_ctx, device=device) - 1]
    cache.set_pos(n_ctx)
    owner = [r for r, cs in enumerate(conts) for _ in cs]  # context row of each choice row
    cache.keep(torch.tensor(owner, device=device))
    flat = [c for cs in conts for c in cs]
    y = torch.zeros(len(flat), longest, dtype=torch.long)
    for r, c in enumerate(flat):
        y[r, : len(c)] = torch.tensor(c)
    h_cont = model.hidden(y.to(device), cache)  # (N, Tn, C)
    # token t of a continuation is predicted by the context's last state (t = 0) or by the
    # continuation's state t - 1
    states = []
    for r, c in enumerate(flat):
        states.append(last[owner[r] : owner[r] + 1])
        states.append(h_cont[r, : len(c) - 1])
    h = torch.cat(states)  # (M, C)
    targets = torch.tensor([t for c in flat for t in c], device=device)
    logp, greedy = [], []
    for s in range(0, len(targets), _HEAD_CHUNK):
        logits = model.lm_head(h[s : s + _HEAD_CHUNK]).float()  # (m, V)
        lp = torch.log_softmax(logits, -1)
        tgt = targets[s : s + _HEAD_CHUNK]
        logp.append(lp.gather(-1, tgt[:, None])[:, 0])
        greedy.append(lp.argmax(-1) == tgt)
    lps, greedys = torch.cat(logp).tolist(), torch.cat(greedy).tolist()
    out: list[list[tuple[float, bool]]] = []
    i = 0
    for cs in conts:
        row = []
        for c in cs:
            row.append((sum(lps[i : i + len(c)]), all(greedys[i : i + len(c)])))
            i += len(c)
        out.append(row)
    return out


def _fit(context: list[int], conts: list[list[int]], block_size: int) -> list[int]:
    """The context's newest ids that leave room for its longest continuation."""
    room = block_size - max(len(c) for c in conts)
    if room < 1:
        raise GptkitError(
            f"a continuation of {block_size - room} tokens does not fit the model's context "
            f"({block_size}) after one context token; shorten the choices"
        )
    return context[-room:]


def _batches(
    keys: list[tuple[int, ...]],
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]],
    batch_size: int,
    block_size: int,
) -> Iterator[list[tuple[int, ...]]]:
    """Up to ``batch_size`` contexts at a time, fewer where the longest context and the
    longest continuation of a batch would not fit the model's context together (a padded
    position past it has no position embedding)."""
    batch: list[tuple[int, ...]] = []
    n_ctx = n_cont = 0
    for k in keys:
        longest = max(len(c) for _, c in groups[k])
        fits = max(n_ctx, min(len(k), block_size - longest)) + max(n_cont, longest) <= block_size
        if batch and (len(batch) == batch_size or not fits):
            yield batch
            batch, n_ctx, n_cont = [], 0, 0
        batch.append(k)
        n_ctx = max(n_ctx, min(len(k), block_size - longest))
        n_cont = max(n_cont, longest)
    if batch:
        yield batch


def loglikelihoods(
    model: GPT,
    tokenizer: Tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    progress: bool = True,
) -> list[tuple[float, bool]]:
    """Log-likelihood of each ``(context, continuation)`` and whether it is the greedy one.

    Requests that share a context share its prefill; ``batch_size`` contexts (with all their
    continuations) go through the model together.

    Args:
        model, tokenizer: what to score with (quantized models too).
        requests: pairs of texts; the continuation usually starts with a space.
        batch_size: contexts per forward pass.
        progress: show a progress bar over the contexts.

    Returns:
        Per request, in order: the summed log-probability (nats) of the continuation's
        tokens and whether each of them is the argmax of its distribution.
    """
    if batch_size < 1:
        raise GptkitError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = split_pair(tokenizer, context, continuation)
        if not cont:
            raise GptkitError(f"request {i} has an empty continuation; nothing to score")
        groups.setdefault(tuple(ctx), []).append((i, cont))
    # long contexts first: a bad fit shows at once, and similar lengths pad less
    keys = sorted(groups, key=len, reverse=True)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(keys), desc="loglikelihood", unit="context", disable=not progress)
    try:
        with torch.inference_mode():
            for batch in _batches(keys, groups, batch_size, model.config.block_size):
                conts = [[c for _, c in groups[k]] for k in batch]
                block = model.config.block_size
                ctxs = [_fit(list(k), cs, block) for k, cs in zip(batch, conts, strict=True)]
                for k, scores in zip(batch, _score_batch(model, ctxs, conts), strict=True):
                    for (i, _), score in zip(groups[k], scores, strict=True):
                        results[i] = score
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return results


# -- the task ------------------------------------------------------------------------------


def choice_scores(examples: Sequence[Example], lls: Sequence[Sequence[float]]) -> dict[str, Any]:
    """``acc`` and ``acc_norm`` (the harness's: log-likelihood over the choice's characters)
    of per-choice log-likelihoods ``lls`` against each example's ``label``."""
    if not examples:
        raise GptkitError("no examples to score")
    hits, hits_norm = 0, 0
    for ex, ll in zip(examples, lls, strict=True):
        lengths = [max(len(c), 1) for c in ex["choices"]]
        pick = max(range(len(ll)), key=lambda i: ll[i])
        pick_norm = max(range(len(ll)), key=lambda i: ll[i] / lengths[i])
        hits += pick == ex["label"]
        hits_norm += pick_norm == ex["label"]
    n = len(examples)
    return {"acc": hits / n, "acc_norm": hits_norm / n}


def multiple_choice_eval(
    model: GPT,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every choice of every example zero-shot and report acc and acc_norm.

    Args:
        model, tokenizer: what to evaluate.
        examples: dicts with ``prompt`` (the context), ``choices`` (texts; each is scored as
            ``" " + choice``) and ``label`` (the gold index), as the readers here return.
        batch_size: examples per forward pass (each with all its choices).
        progress: show a progress bar.

    Returns:
        ``metrics`` (acc, acc_norm), ``n`` and ``predictions`` (per example: id, label, the
        log-likelihood of each choice, and the picks by acc and acc_norm).
    """
    for i, ex in enumerate(examples):
        if not {"prompt", "choices", "label"} <= ex.keys():
            raise GptkitError(f"example {i} needs 'prompt', 'choices' and 'label'")
    requests = [(ex["prompt"], " " + c) for ex in examples for c in ex["choices"]]
    scores = loglikelihoods(model, tokenizer, requests, batch_size, progress)
    lls, i = [], 0
    for ex in examples:
        lls.append([ll for ll, _ in scores[i : i + len(ex["choices"])]])
        i += len(ex["choices"])
    predictions = []
    for ex, ll in zip(examples, lls, strict=True):
        norm = [v / max(len(c), 1) for v, c in zip(ll, ex["choices"], strict=True)]
        predictions.append(
            {
                "id": ex.get("id"),
                "label": ex["label"],
                "loglikelihoods": ll,
                "pred": max(range(len(ll)), key=ll.__getitem__),
                "pred_norm": max(range(len(norm)), key=norm.__getitem__),
            }
        )
    return {"metrics": choice_scores(examples, lls), "n": len(examples), "predictions": predictions}
