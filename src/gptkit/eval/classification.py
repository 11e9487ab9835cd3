"""Classification evaluation: accuracy, macro-F1 and the confusion matrix of a labelled file.

A model with a classification head (``gptkit finetune classify``) is scored through the
head; a head trained with ``--format choice`` picks one of each row's ``choices`` (Radford et
al. 2018, Fig. 1), and is scored by accuracy over the right answers' positions. A model
without one is scored zero-shot, which gives the base-model figure a
fine-tuned head is compared with: each label name is a possible answer to a question about
the text, and the label whose tokens the model finds most probable after the question wins
(the log-likelihood ranking lm-eval-harness uses for multiple choice).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gptkit.data.tasks import read_labelled, resolve_label
from gptkit.errors import GptkitError
from gptkit.eval.metrics import classification_scores
from gptkit.generate import classify
from gptkit.generate.chat import apply_chat_template
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer


@dataclass(frozen=True)
class ClassificationTask:
    """A shipped classification set: its file, label names and zero-shot question."""

    name: str
    default_data: str  # under the data directory (GPTKIT_DATA, shared/data)
    labels: tuple[str, ...]  # head order; integer labels in the file index these
    question: str  # {text} and {options} are filled in


CLASSIFICATION_TASKS: dict[str, ClassificationTask] = {
    t.name: t
    for t in [
        ClassificationTask(
            "sst2",
            "sst2/dev.tsv",
            ("negative", "positive"),
            "Movie review: {text}\nIs the sentiment of this review {options}?",
        ),
        ClassificationTask(
            "sms_spam",
            "sms_spam/SMSSpamCollection",
            ("ham", "spam"),
            "SMS message: {text}\nIs this message {options}?",
        ),
    ]
}
GENERIC_QUESTION = "Text: {text}\nWhich label fits this text: {options}?"


@torch.no_grad()
def score_options(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    options: Sequence[str],
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Log-likelihood (N, K) of each option's tokens following each prompt.

    When every option is a single token (the usual case for label words), one forward pass
    per prompt scores all of them; otherwise each (prompt, option) pair is its own row.
    """
    device = next(model.parameters()).device
    context = model.config.block_size
    opt_ids = [tokenizer.encode(o, allow_special=False) for o in options]
    if any(not o for o in opt_ids):
        raise GptkitError("an option encodes to no tokens; every label needs some text")
    single = all(len(o) == 1 for o in opt_ids)
    # a row: (ids, where the scored tokens start, the option(s) it scores)
    rows: list[tuple[list[int], int, list[list[int]]]] = []
    for p in prompts:
        p_ids = tokenizer.encode_prompt(p)
        if single:
            kept = p_ids[-context:]
            rows.append((kept, len(kept), opt_ids))
            continue
        for o in opt_ids:
            kept = p_ids[-max(1, context - len(o)) :]
            rows.append((kept + o, len(kept), [o]))
    scores = torch.zeros(len(rows), len(options) if single else 1)
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for b in tqdm(range(0, len(order), batch_size), desc="score", disable=not progress):
        idx = order[b : b + batch_size]
        T = max(len(rows[i][0]) for i in idx)
        x = torch.zeros(len(idx), T, dtype=torch.long)
        for j, i in enumerate(idx):
            x[j, : len(rows[i][0])] = torch.tensor(rows[i][0])
        h = model.hidden(x.to(device))  # (b, T, C); the head runs on scored positions only
        for j, i in enumerate(idx):
            ids, start, opts = rows[i]
            if single:
                logp = F.log_softmax(model.lm_head(h[j, start - 1]).float(), -1)
                scores[i] = logp[[o[0] for o in opts]].cpu()
                continue
            logp = F.log_softmax(model.lm_head(h[j, start - 1 : len(ids) - 1]).float(), -1)
            targets = torch.tensor(ids[start:], device=logp.device)
            scores[i, 0] = logp.gather(1, targets[:, None]).sum().cpu()
    model.train(was_training)
    return scores.view(len(prompts), len(options))


def _question(tokenizer: Tokenizer, template: str, text: str, names: Sequence[str]) -> str:
    options = ", ".join(names[:-1]) + f" or {names[-1]}"
    question = template.format(text=text, options=options)
    if tokenizer.chat_template:
        prompt = question + " Answer with one word."
        return apply_chat_template(tokenizer, [{"role": "user", "content": prompt}])
    return question + "\nAnswer:"


def classification_eval(
    model: GPT,
    tokenizer: Tokenizer,
    path: str | Path,
    task: str | None = None,
    labels: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` on the labelled file ``path`` (see :func:`read_labelled`).

    Args:
        model, tokenizer: what to evaluate; with a classification head it is used, without
            one the label names are ranked zero-shot.
        path: the labelled file.
        task: a name in :data:`CLASSIFICATION_TASKS` (its label names and question), or None.
        labels: the label names; default the head's, else the task's.
        limit: evaluate only the first N examples.
        batch_size: texts per forward pass.
        progress: show a progress bar.

    Returns ``metrics`` (accuracy, macro_f1), ``confusion_matrix`` with its ``labels``,
    ``n``, ``method`` (head or zero-shot) and per-example ``predictions``.
    """
    spec = CLASSIFICATION_TASKS.get(task or "")
    head = model.cls_head is not None and bool(model.config.labels)
    if head and model.config.task_format == "choice":
        return _choice_eval(model, tokenizer, path, limit, batch_size, progress)
    names = tuple(labels or (model.config.labels if head else ()) or (spec.labels if spec else ()))
    if not names:
        raise GptkitError(
            "the model has no classification head and the labels are unknown; pass --labels "
            "(comma-separated names)"
        )
    if head and names != model.config.labels:
        raise GptkitError(
            f"the model's head predicts {list(model.config.labels)}, not {list(names)}; "
            "drop --labels"
        )
    rows = []
    for where, texts, label in read_labelled(path):
        if label is None:
            raise GptkitError(f"{where}: the row has no label to score against")
        rows.append((where, texts, names[resolve_label(label, names, where)]))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise GptkitError(f"{path} holds no examples")
    t0 = time.perf_counter()
    texts = [r[1][0] for r in rows]
    pairs = [r[1][1] for r in rows] if all(len(r[1]) == 2 for r in rows) else None
    if head:
        out = classify(model, tokenizer, texts, pairs, batch_size, progress=progress)
        predicted = [o["label"] for o in out]
        probs = [o["probs"] for o in out]
        method = "head"
    else:
        template = spec.question if spec else GENERIC_QUESTION
        joined = [t if pairs is None else f"{t}\n{pairs[i]}" for i, t in enumerate(texts)]
        prompts = [_question(tokenizer, template, t, names) for t in joined]
        lead = "" if tokenizer.chat_template else " "
        scores = score_options(
            model, tokenizer, prompts, [lead + n for n in names], batch_size, progress
        )
        predicted = [names[int(i)] for i in scores.argmax(-1)]
        soft = scores.softmax(-1)
        probs = [dict(zip(names, p.tolist(), strict=True)) for p in soft]
        method = "zero-shot"
    gold = [r[2] for r in rows]
    scores_ = classification_scores(predicted, gold, names)
    return {
        "metrics": {"accuracy": scores_["accuracy"], "macro_f1": scores_["macro_f1"]},
        "labels": list(names),
        "confusion_matrix": scores_["confusion_matrix"],
        "n": len(rows),
        "method": method,
        "seconds": time.perf_counter() - t0,
        "predictions": [
            {"id": r[0], "reference": r[2], "prediction": p, "probs": pr}
            for r, p, pr in zip(rows, predicted, probs, strict=True)
        ],
    }


def _choice_eval(
    model: GPT,
    tokenizer: Tokenizer,
    path: str | Path,
    limit: int | None,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """:func:`classification_eval` for a choice head: rows are a context, its choices and
    the index of the right one; the "labels" are the choices' positions."""
    rows = []
    for where, texts, label in read_labelled(path):
        if len(texts) < 3 or label is None or not label.isdigit() or int(label) >= len(texts) - 1:
            raise GptkitError(
                f'{where}: a multiple-choice row needs "text", "choices" (two or more) '
                'and "label", the index of the right choice'
            )
        rows.append((where, texts, int(label)))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise GptkitError(f"{path} holds no examples")
    t0 = time.perf_counter()
    out = classify(
        model, tokenizer, [r[1][0] for r in rows], batch_size=batch_size, progress=progress,
        choices=[r[1][1:] for r in rows],
    )  # fmt: skip
    names = tuple(str(k) for k in range(max(len(r[1]) - 1 for r in rows)))
    predicted, gold = [str(o["label"]) for o in out], [str(r[2]) for r in rows]
    scores = classification_scores(predicted, gold, names)
    return {
        "metrics": {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]},
        "labels": list(names),
        "confusion_matrix": scores["confusion_matrix"],
        "n": len(rows),
        "method": "head (choice)",
        "seconds": time.perf_counter() - t0,
        "predictions": [
            {"id": r[0], "reference": g, "prediction": p, "probs": o["probs"]}
            for r, g, p, o in zip(rows, gold, predicted, out, strict=True)
        ],
    }
