"""The training objectives, which differ only in their data and their loss.

- ``lm``: next-token cross-entropy over random windows of prepared token shards
  (GPT-2, Radford et al. 2019; nanoGPT's ``get_batch``);
- ``sft``: the same cross-entropy over fine-tuning examples whose prompt tokens carry no
  loss (labels ``IGNORE``), optionally packed several to a row;
- ``classify``: GPT-1's fine-tuning objective (Radford et al. 2018, section 3.2), the label
  cross-entropy at each row's extract token plus λ times the next-token loss;
- distillation: the LM objective's windows with a teacher's temperature-softened
  distribution beside each (Hinton et al. 2015, "Distilling the Knowledge in a Neural
  Network"): ``alpha · T² · KL(p_T ‖ q_T) + (1 - alpha) · CE``, the T² keeping the soft
  term's gradients on the scale of the hard one's as T grows.

Each objective gives the loop an :class:`ObjectiveData`: a sampler of training batches and
a validation that scores the model into a metrics row. :func:`batch_loss` tells the
objectives apart by the form of the batch alone, so the loop has one step for all three.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptkit.data.loader import BatchSampler, TokenShards
from gptkit.data.tasks import (
    IGNORE,
    ExampleSampler,
    LabelledSampler,
    PackedSampler,
    collate_labelled,
    load_examples,
    split_examples,
    with_task_tokens,
)
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer
from gptkit.train import distributed
from gptkit.train.distributed import Ranks

#: scores the model on held-out data into a metrics row (without its step), or None when
#: there is nothing to score; the argument is the run's start on ``time.perf_counter``
Validate = Callable[[GPT, float], "dict[str, Any] | None"]


@dataclass
class ObjectiveData:
    """What an objective feeds the loop: training batches and a validation."""

    sampler: Any  # .next() -> a batch of CPU tensors; .state_dict() / .load_state_dict()
    validate: Validate


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on ``device``, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# -- the loss --------------------------------------------------------------------------------


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    flat = logits.float().view(-1, logits.size(-1))
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE)


def batch_loss(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], lm_weight: float = 0.5
) -> torch.Tensor:
    """The loss of one batch, by its form:

    - ``(ids, targets)``: next-token cross-entropy (pretraining, SFT);
    - ``(ids, targets, segments)``: the same over packed examples;
    - ``(ids, targets, labels, last)``: GPT-1's fine-tuning objective, the label
      cross-entropy at each row's extract token plus ``lm_weight`` (λ) times the
      next-token loss on the same text, and ``(ids, targets, labels, last, owner, slot)``
      the same for examples of several sequences (:func:`head_logits`);
    - ``(ids, targets, teacher_logp, teacher_idx, settings)``: distillation
      (:func:`distill_loss`, ``settings`` = [temperature, alpha]; see :class:`TeacherSampler`).
    """
    if len(batch) in (2, 3):
        x, y = batch[:2]
        kw = {"segments": batch[2]} if len(batch) == 3 else {}
        scored = y != IGNORE
        if bool(scored.all()):  # pretraining: every position has a target
            return _cross_entropy(model(x, **kw), y)
        # SFT masks its prompts: the head runs on the scored positions alone (the mean over
        # them is what ignore_index gives)
        return F.cross_entropy(model(x, only=scored, **kw).float(), y[scored])
    if len(batch) == 5:  # distillation (classification batches hold 4 or 6 tensors)
        x, y, teacher_logp, teacher_idx, settings = batch
        temperature, alpha = settings.tolist()
        return distill_loss(model(x), y, teacher_logp, teacher_idx, temperature, alpha)
    x, y, labels, last, *views = batch
    h = model.hidden(x)  # (N, T, C): one row per sequence
    loss = F.cross_entropy(head_logits(model, h, last, *views).float(), labels)
    if lm_weight > 0:
        loss = loss + lm_weight * _cross_entropy(model.lm_head(h), y)
    return loss


def head_logits(
    model: torch.nn.Module,
    h: torch.Tensor,
    last: torch.Tensor,
    owner: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """The classification head's logits (B, K) from hidden states ``h`` (N, T, C) read at
    each row's extract token ``last`` (N,). Without ``owner`` each row is an example (N = B).
    With it, rows of one example are combined as GPT-1 does (Radford et al. 2018, 3.3):
    similarity adds the two orders' states before the head; choice scores each answer's
    row (a one-output head) and sets the score at ``slot`` among its example's K answers
    (-inf where an example has fewer), for a softmax over the choices."""
    feats = h[torch.arange(h.shape[0], device=h.device), last]  # (N, C)
    if owner is None or slot is None:
        return model.cls_head(feats)
    B = len(owner.unique_consecutive())
    if model.config.task_format == "choice":
        scores = model.cls_head(feats)[:, 0]  # (N,)
        out = scores.new_full((B, int(slot.max()) + 1), float("-inf"))
        out[owner, slot] = scores
        return out
    summed = feats.new_zeros(B, feats.shape[1]).index_add_(0, owner, feats)  # (B, C)
    return model.cls_head(summed)


def add_task_tokens(model: GPT, tokenizer: Tokenizer) -> Tokenizer:
    """GPT-1's start, delimiter and extract tokens (Radford et al. 2018, 3.3) in
    ``tokenizer`` and in ``model``, whose embedding (and untied output head) gains a row,
    drawn like the model's own initial weights, for each id it lacks; its other rows are
    untouched. Returns the tokenizer with the tokens (the one a checkpoint then carries)."""
    tok = with_task_tokens(tokenizer)
    V, old = tok.vocab_size, model.config.vocab_size
    if old >= V:  # a padded vocabulary has rows to spare
        return tok
    w = model.wte.weight
    wte = nn.Embedding(V, w.shape[1], device=w.device, dtype=w.dtype)
    with torch.no_grad():
        nn.init.normal_(wte.weight, 0.0, model.config.init_std)
        wte.weight[:old] = w
    model.wte = wte
    if model.config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    else:
        head = nn.Linear(w.shape[1], V, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            nn.init.normal_(head.weight, 0.0, model.config.init_std)
            head.weight[:old] = model.lm_head.weight
        model.lm_head = head
    model.config = model.config.replace(vocab_size=V)
    return tok


def set_task_head(model: GPT, labels: tuple[str, ...], fmt: str | None) -> None:
    """A fresh classification head over ``labels`` for input format ``fmt``, which the
    model's config records (checkpoints carry it, so classifying encodes as training did)."""
    model.add_classifier(labels)
    model.config = model.config.replace(task_format=fmt)


def distill_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_idx: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha · T² · KL(p_T ‖ q_T) + (1 - alpha) · CE(logits, targets)``, the KL averaged
    over positions.

    Args:
        logits: the student's logits (B, T, V).
        targets: next tokens (B, T).
        teacher_logp: the teacher's log-probabilities at temperature T: (B, T, V), or
            (B, T, k) over its k most likely tokens (renormalized over them).
        teacher_idx: (B, T, k) the vocabulary ids of those k tokens; empty for the whole
            vocabulary.
        temperature: T, dividing both models' logits.
        alpha: the weight of the soft term.
    """
    V = logits.size(-1)
    flat = logits.float().reshape(-1, V)
    logq = F.log_softmax(flat / temperature, dim=-1)  # (N, V)
    logp = teacher_logp.float().reshape(-1, teacher_logp.size(-1))  # (N, V) or (N, k)
    if teacher_idx.numel():  # top-k: the student's log-probabilities of the teacher's tokens
        logq = logq.gather(-1, teacher_idx.reshape(-1, teacher_idx.size(-1)))
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    loss = alpha * temperature**2 * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(flat, targets.reshape(-1))
    return loss


class TeacherSampler:
    """LM batches with the teacher's soft targets beside them: ``next()`` draws ``(x, y)``
    from ``inner`` and runs the frozen teacher on ``x`` in inference mode (under the run's
    autocast), giving the 5-tensor batch :func:`batch_loss` reads as distillation. The
    teacher is deterministic, so the state is the inner sampler's and a resumed run sees
    the same soft targets."""

    def __init__(
        self,
        inner: Any,
        teacher: GPT,
        temperature: float,
        alpha: float,
        top_k: int,
        device: torch.device,
        precision: str,
    ) -> None:
        self.inner, self.teacher, self.top_k = inner, teacher.eval(), top_k
        self.device, self.precision = device, precision
        self.settings = torch.tensor([float(temperature), float(alpha)])

    @torch.inference_mode()
    def _soft_targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.precision):
            logits = self.teacher(x.to(self.device)).float()  # (B, T, V)
        T = float(self.settings[0])
        if self.top_k:
            values, idx = logits.topk(self.top_k, dim=-1)  # (B, T, k)
            return F.log_softmax(values / T, dim=-1), idx
        return F.log_softmax(logits / T, dim=-1), torch.empty(0, dtype=torch.long)

    def next(self) -> tuple[torch.Tensor, ...]:
        x, y = self.inner.next()
        logp, idx = self._soft_targets(x)
        # clones made outside inference mode: autograd may save them for the backward pass
        return x, y, logp.clone(), idx.clone(), self.settings.clone()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


# -- scoring held-out data -------------------------------------------------------------------


@torch.no_grad()
def label_scores(
    model: GPT,
    examples: list,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Label loss, accuracy and the predicted probabilities over ``examples`` (Labelled;
    for the choice format, over each example's choices, 0 past its last)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    choice = model.config.task_format == "choice"
    K = max(len(ex.views) for ex in examples) if choice else len(model.config.labels)
    probs = torch.zeros(len(examples), K)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        x, _, _, last, *views = collate_labelled([examples[i] for i in idx])
        with autocast(device, precision):
            h = model.hidden(x.to(device))
            logits = head_logits(model, h, last.to(device), *(v.to(device) for v in views))
        p = logits.float().softmax(-1).cpu()
        probs[idx, : p.shape[1]] = p
    model.train(was_training)
    gold = torch.tensor([ex.label for ex in examples])
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), gold).item()
    acc = (probs.argmax(-1) == gold).float().mean().item()
    return {"loss": loss, "accuracy": acc, "probs": probs, "gold": gold}


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module, sampler: Any, batches: int, device: torch.device, precision: str
) -> float:
    """Mean loss over ``batches`` batches of ``sampler`` (positions labelled IGNORE excluded)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(batches):
        batch = tuple(t.to(device) for t in sampler.next())
        with autocast(device, precision):
            total += batch_loss(model, batch, 0.0).item()
    model.train(was_training)
    return total / batches


def evaluate(
    model: torch.nn.Module,
    arrays: list,
    block_size: int,
    batch_size: int,
    batches: int,
    device: torch.device,
    precision: str,
    seed: int = 0,
) -> float:
    """Mean next-token loss over ``batches`` fixed random batches (the same ones every call)."""
    sampler = BatchSampler(arrays, block_size, batch_size, seed=seed)
    return mean_loss(model, sampler, batches, device, precision)


def _validate_loss(
    make_val: Callable[[], Any] | None, batches: int, device: torch.device, precision: str
) -> Validate:
    """Validation loss and perplexity over ``batches`` fresh batches of ``make_val()`` (the
    same batches every time); every rank scores its rows (FSDP needs them all anyway)."""

    def validate(model: GPT, start: float) -> dict[str, Any] | None:
        if make_val is None:
            return None
        val = mean_loss(model, make_val(), batches, device, precision)
        val = distributed.mean_over_ranks(torch.tensor(val, device=device)).item()
        elapsed = round(time.perf_counter() - start, 3)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)), "elapsed_s": elapsed}

    return validate


# -- the three objectives' data --------------------------------------------------------------


def lm_data(
    shards: TokenShards,
    block_size: int,
    batch_size: int,
    eval_batches: int,
    seed: int,
    *,
    ranks: Ranks,
    device: torch.device,
    precision: str,
) -> ObjectiveData:
    """Random windows of the shards; each rank draws its own rows of every global batch."""
    share = {"rank": ranks.rank, "world_size": ranks.world_size}
    sampler = BatchSampler(shards.split("train"), block_size, batch_size, seed, **share)
    make_val = None
    if shards.num_tokens("val") > block_size:
        val_arrays = shards.split("val")
        make_val = lambda: BatchSampler(val_arrays, block_size, batch_size, seed=0, **share)
    return ObjectiveData(sampler, _validate_loss(make_val, eval_batches, device, precision))


def sft_data(
    data: str | Path,
    val_data: str | None,
    tokenizer: Tokenizer,
    chat: bool | None,
    pack: bool,
    block_size: int,
    batch_size: int,
    eval_batches: int,
    seed: int,
    *,
    ranks: Ranks,
    device: torch.device,
    precision: str,
) -> ObjectiveData:
    """Fine-tuning examples (the last 5% held out unless ``val_data``), one or packed
    several to a row; every rank draws the global batch and keeps its share of it."""
    examples = load_examples(data, tokenizer, block_size + 1, chat)
    if val_data:
        train_ex, val_ex = examples, load_examples(val_data, tokenizer, block_size + 1, chat)
    else:
        train_ex, val_ex = split_examples(examples)
    rows = batch_size * ranks.world_size
    if pack:
        sampler: Any = PackedSampler(train_ex, rows, block_size, seed)
    else:
        sampler = ExampleSampler(train_ex, rows, seed)
    if ranks.world_size > 1:
        sampler = distributed.RankShare(sampler, ranks)
    make_val = None
    if val_ex:
        make_val = lambda: ExampleSampler(val_ex, batch_size, shuffle=False)
        eval_batches = min(eval_batches, math.ceil(len(val_ex) / batch_size))
    return ObjectiveData(sampler, _validate_loss(make_val, eval_batches, device, precision))


def distill_data(
    lm: ObjectiveData,
    teacher: GPT,
    temperature: float,
    alpha: float,
    top_k: int,
    device: torch.device,
    precision: str,
) -> ObjectiveData:
    """The LM objective's data with the teacher's soft targets on every training batch;
    validation stays the student's own next-token loss (comparable with plain training)."""
    sampler = TeacherSampler(lm.sampler, teacher, temperature, alpha, top_k, device, precision)
    return ObjectiveData(sampler, lm.validate)


def classify_data(
    train_ex: list,
    val_ex: list,
    batch_size: int,
    seed: int,
    device: torch.device,
    precision: str,
) -> ObjectiveData:
    """Labelled examples (read before the model gets its head, whose labels they name),
    validated by label loss and accuracy over all of ``val_ex``."""

    def validate(model: GPT, start: float) -> dict[str, Any] | None:
        if not val_ex:
            return None
        scores = label_scores(model, val_ex, batch_size, device, precision)
        return {"val_loss": scores["loss"], "val_acc": scores["accuracy"]}

    return ObjectiveData(LabelledSampler(train_ex, batch_size, seed), validate)
