"""Classifying texts with a fine-tuned classification head (GPT-1's task head).

Each text (or pair, or context with its choices) is encoded as in training, in the input
format the model's head was trained with (:func:`gptkit.data.tasks.encode_views`; Radford
et al. 2018, Fig. 1), the batch is padded on the chosen side, and the head reads the hidden
state of each row's extract token (similarity: both orders' states added; choice: one score
per answer, a softmax over them, :func:`gptkit.train.objectives.head_logits`). Padding is a
segment of its own, so a text gets the same probabilities alone, right-padded or
left-padded in a batch of any lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from gptkit.data.tasks import encode_views
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer
from gptkit.train.objectives import head_logits


def pad_batch(
    rows: list[list[int]], side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Ids (B, T), segments (None for right padding, where causal attention suffices) and
    the index of each row's last real token."""
    T = max(len(r) for r in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    if side == "right":
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
        return x, None, torch.tensor([len(r) - 1 for r in rows])
    seg = torch.ones(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, T - len(r) :] = torch.tensor(r)
        seg[i, : T - len(r)] = 0
    return x, seg, torch.full((len(rows),), T - 1)


@torch.no_grad()
def classify(
    model: GPT,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    batch_size: int = 32,
    padding: Literal["right", "left"] = "right",
    progress: bool = False,
    choices: Sequence[Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Predict a label for each text (or text pair), or the right answer among choices.

    Args:
        model: a model with a classification head (``gptkit finetune classify``).
        tokenizer: its tokenizer.
        texts: the texts to classify (for a choice head: the contexts).
        pairs: second texts of text pairs, one per text (entailment, similarity, ...).
        batch_size: texts per forward pass (batches are formed by length).
        padding: which side short rows are padded on; the result does not depend on it.
        progress: show a progress bar.
        choices: for a head trained with ``--format choice``, the answers of each text.

    Returns:
        Per text: ``label`` (the most probable name) and ``probs`` (name -> probability);
        for a choice head, ``label`` is the index of the most probable answer, ``choice``
        its text and ``probs`` one probability per answer.
    """
    rows = _encoded(model, tokenizer, texts, pairs, choices)
    if batch_size < 1:
        raise GptkitError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: max(map(len, rows[i])))
    probs: list[list[float]] = [[] for _ in rows]
    was_training = model.training
    model.eval()
    with tqdm(total=len(rows), desc="classify", disable=not progress) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            p = _probs(model, [rows[i] for i in idx], padding, device)
            for j, i in enumerate(idx):
                probs[i] = p[j, : len(rows[i]) if choices is not None else None].tolist()
            bar.update(len(idx))
    model.train(was_training)
    if choices is not None:
        best = [max(range(len(p)), key=p.__getitem__) for p in probs]
        return [
            {"label": k, "choice": choices[i][k], "probs": probs[i]} for i, k in enumerate(best)
        ]
    names = model.config.labels
    return [
        {
            "label": names[max(range(len(p)), key=p.__getitem__)],
            "probs": dict(zip(names, p, strict=True)),
        }
        for p in probs
    ]


def _encoded(
    model: GPT,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    choices: Sequence[Sequence[str]] | None,
) -> list[list[list[int]]]:
    """Each input's sequences in the head's format, after checking the inputs fit it."""
    fmt = model.config.task_format
    if model.cls_head is None or not model.config.labels:
        raise GptkitError(
            "this model has no classification head; train one with `gptkit finetune classify`"
        )
    if (fmt == "choice") != (choices is not None):
        raise GptkitError(
            "this model's head picks among choices: pass choices= (one list per text)"
            if fmt == "choice"
            else "choices= needs a head trained with `gptkit finetune classify --format choice`"
        )
    for name, given in (("pairs", pairs), ("choices", choices)):
        if given is not None and len(given) != len(texts):
            raise GptkitError(f"{len(texts)} texts but {len(given)} {name}; give one per text")
    block = model.config.block_size
    inputs = [
        [t] if pairs is None else [t, pairs[i]] for i, t in enumerate(texts)
    ] if choices is None else [[t, *choices[i]] for i, t in enumerate(texts)]  # fmt: skip
    return [encode_views(tokenizer, x, fmt, block, f"text {i}") for i, x in enumerate(inputs)]


def _probs(
    model: GPT, examples: list[list[list[int]]], padding: Literal["right", "left"], device: Any
) -> torch.Tensor:
    """Probabilities (B, K) of a batch of examples, each one or several sequences."""
    rows = [r for ex in examples for r in ex]
    x, seg, last = pad_batch(rows, padding)
    h = model.hidden(x.to(device), segments=None if seg is None else seg.to(device))
    views: tuple[torch.Tensor, ...] = ()
    if len(rows) > len(examples):
        owner = torch.tensor([b for b, ex in enumerate(examples) for _ in ex], device=device)
        slot = torch.tensor([k for ex in examples for k in range(len(ex))], device=device)
        views = (owner, slot)
    return head_logits(model, h, last.to(device), *views).float().softmax(-1).cpu()
