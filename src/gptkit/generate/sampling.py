"""Pure logits -> next-token functions: no model, no state, nothing modified in place.

Each step of decoding turns the last position's logits ``(B, V)`` into one id per row:

    logits ─► repetition penalty ─► temperature ─► top-k ─► top-p ─► min-p ─► softmax ─► draw

References: Keskar et al. 2019 (CTRL, the repetition penalty); Fan et al. 2018 (top-k);
Holtzman et al. 2020 (nucleus / top-p sampling); Nguyen et al. 2024 ("Turning Up the Heat:
Min-p Sampling for Creative and Coherent LLM Outputs", min-p). The order of the filters follows the
Hugging Face ``generate`` logits processors, so the same settings mean the same thing.
``temperature == 0`` is greedy decoding: the penalty still applies, the filters do not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gptkit.config import SampleConfig

#: token history: a (B, V) bool tensor of ids already seen, or one id sequence per row
History = Tensor | Sequence[Sequence[int]]


def seen_mask(history: History, batch_size: int, vocab_size: int, device: torch.device) -> Tensor:
    """``(B, V)`` bool: True where row ``b`` already holds token ``v``. Ids outside the
    vocabulary are ignored (they can never be sampled, so they need no penalty)."""
    if isinstance(history, Tensor) and history.dtype == torch.bool:
        return history.to(device)
    mask = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)
    for b, ids in enumerate(history):
        idx = torch.as_tensor(list(ids), dtype=torch.long, device=device)
        idx = idx[(idx >= 0) & (idx < vocab_size)]
        mask[b, idx] = True
    return mask


def apply_repetition_penalty(logits: Tensor, history: History, penalty: float) -> Tensor:
    """CTRL's penalty on every token already in the sequence: a positive logit is divided by
    ``penalty``, a negative one multiplied, so ``penalty > 1`` always makes a repeat less
    likely. A token counts once however often it occurred."""
    if penalty == 1.0:
        return logits
    seen = seen_mask(history, logits.shape[0], logits.shape[-1], logits.device)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency_penalty(
    logits: Tensor, counts: Tensor, presence: float, frequency: float
) -> Tensor:
    """The OpenAI API's additive penalties: ``logit - frequency * count - presence * [count >
    0]``, where ``counts`` ``(B, V)`` says how often each token was generated so far.
    Positive values make repeats less likely, negative ones more likely."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide by ``temperature`` (> 0): below 1 sharpens the distribution, above 1 flattens."""
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: Tensor, k: int | None) -> Tensor:
    """Keep the ``k`` largest logits of each row (all that tie with the k-th), -inf elsewhere."""
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float | None) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to
    at least ``p`` (always at least one token), -inf elsewhere."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    # Mass of the tokens strictly more likely than each one: a token is kept while the set
    # before it is still short of p. The most likely token has 0 before it and always stays
    # (said outright: a p below float32's smallest number compares as 0).
    before = F.pad(probs.cumsum(dim=-1)[..., :-1], (1, 0))  # (B, V)
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float | None) -> Tensor:
    """Min-p filter: keep the tokens whose probability is at least ``min_p`` times the most
    likely token's, -inf elsewhere (the most likely token always stays). Compared in log
    space, ``logit - max >= log(min_p)``, so no softmax is needed."""
    if min_p is None or min_p <= 0.0:
        return logits
    top = logits.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(logits - top < math.log(min_p), float("-inf"))


def filtered_probs(logits: Tensor, cfg: SampleConfig) -> Tensor:
    """The distribution (B, V) a token is sampled from: fp32 ``logits`` after the
    temperature, then top-k, top-p and min-p, softmaxed (the one place these filters meet,
    for plain sampling and for speculative decoding's acceptance test)."""
    logits = apply_temperature(logits, cfg.temperature)
    logits = top_p_filter(top_k_filter(logits, cfg.top_k), cfg.top_p)
    return min_p_filter(logits, cfg.min_p).softmax(dim=-1)


def sample_next(
    logits: Tensor,
    history: History | None,
    cfg: SampleConfig,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Pick the next id of every row.

    Args:
        logits: ``(B, V)`` scores of the next token (any float dtype; computed in fp32).
        history: the ids each row holds so far (for the repetition penalty), or None.
        cfg: temperature, top_k, top_p, min_p and repetition_penalty are read from it.
        generator: the random source; one per row makes each row's draw independent of the
            others in the batch. None uses a freshly seeded generator (never the global RNG).

    Returns:
        ``(B,)`` long tensor of ids.
    """
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, cfg)  # (B, V)
    if generator is None:
        generator = torch.Generator(device=logits.device)
        generator.seed()
    if isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).view(-1)
    if len(generator) != probs.shape[0]:
        raise ValueError(f"got {len(generator)} generators for {probs.shape[0]} rows")
    draws = [torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generator)]
    return torch.cat(draws)
