"""Classifying texts with a fine-tuned classification head (GPT-1's task head).

Each text (or pair) is encoded as in training (:func:`gptkit.data.tasks.encode_texts`), the
batch is padded on the chosen side, and the head reads the hidden state of each row's
extract token. Padding is a segment of its own, so a text gets the same probabilities
alone, right-padded or left-padded in a batch of any lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from gptkit.data.tasks import encode_texts
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer


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
) -> list[dict[str, Any]]:
    """Predict a label for each text (or text pair).

    Args:
        model: a model with a classification head (``gptkit finetune classify``).
        tokenizer: its tokenizer.
        texts: the texts to classify.
        pairs: second texts of text pairs, one per text (entailment, similarity, ...).
        batch_size: texts per forward pass (batches are formed by length).
        padding: which side short rows are padded on; the result does not depend on it.
        progress: show a progress bar.

    Returns:
        Per text: ``label`` (the most probable name) and ``probs`` (name -> probability).
    """
    names = model.config.labels
    if model.cls_head is None or not names:
        raise GptkitError(
            "this model has no classification head; train one with `gptkit finetune classify`"
        )
    if pairs is not None and len(pairs) != len(texts):
        raise GptkitError(f"{len(texts)} texts but {len(pairs)} pairs; give one pair per text")
    if batch_size < 1:
        raise GptkitError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    rows = [
        encode_texts(tokenizer, [t] if pairs is None else [t, pairs[i]], model.config.block_size)
        for i, t in enumerate(texts)
    ]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    probs = torch.zeros(len(rows), len(names))
    was_training = model.training
    model.eval()
    with tqdm(total=len(rows), desc="classify", disable=not progress) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            x, seg, last = pad_batch([rows[i] for i in idx], padding)
            logits = model.classify(
                x.to(device), last.to(device), None if seg is None else seg.to(device)
            )
            probs[idx] = logits.float().softmax(-1).cpu()
            bar.update(len(idx))
    model.train(was_training)
    return [
        {"label": names[int(p.argmax())], "probs": dict(zip(names, p.tolist(), strict=True))}
        for p in probs
    ]
