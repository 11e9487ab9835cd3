"""Log-probabilities: what each generated token scored, its most likely alternatives, and
the scores of a given text (prompt scoring, as evaluation harnesses ask for with ``echo``).

Which distribution: the log-softmax of the model's raw logits, before the repetition and
OpenAI penalties, the temperature and the top-k/top-p/min-p filters. The OpenAI API and
vLLM report the same (vLLM's default ``logprobs_mode="raw_logprobs"``), so a token's score
says what the model thinks of it, whatever the sampling settings; under greedy decoding
with no penalty the chosen token is always the top alternative.

Nothing here runs unless a row asks for it (:class:`~gptkit.config.SampleConfig`'s
``logprobs`` is not None): plain decoding pays no extra softmax. A token is shown as the
tokenizer decodes it alone (a byte-level BPE token holding part of a UTF-8 character shows
U+FFFD), as the OpenAI API's ``token`` field does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.tokenizer.base import Tokenizer

MAX_TOP_LOGPROBS = 20  # the OpenAI API's bound on top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``k`` most likely ids at its position (best
    first), all from the same raw distribution."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: Tensor, token: int, k: int) -> TokenLogprob:
    """Score ``token`` under the raw logits ``(V,)`` of its position, with the top ``k``."""
    logp = logits.float().log_softmax(dim=-1)  # (V,)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        values, ids = logp.topk(min(k, logp.shape[-1]))
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logp[token]), top)


def prompt_logprobs(
    model: GPT, ids: Sequence[int], k: int = 0, vocab_size: int | None = None
) -> list[TokenLogprob | None]:
    """The scores of every token of ``ids`` given the ones before it, from one uncached
    forward; the first token has none (None), as in the OpenAI API's ``echo`` answers.

    Args:
        model: the GPT; it runs in inference mode on its own device.
        ids: the text's token ids, at most the model's context long.
        k: also the k most likely ids at each position (0 to 20).
        vocab_size: score only ids below this (the tokenizer's size, when the model's
            embedding is padded past it).
    """
    ids = [int(t) for t in ids]
    if len(ids) > model.config.block_size:
        raise GptkitError(
            f"cannot score {len(ids)} tokens: the model's context is "
            f"{model.config.block_size}; shorten the text"
        )
    V = vocab_size or model.config.vocab_size
    device = next(model.parameters()).device
    with torch.inference_mode():
        x = torch.tensor([ids], device=device)  # (1, T)
        logits = model(x)[0, :-1, :V].float()  # (T-1, V): position t predicts ids[t+1]
        logp = logits.log_softmax(dim=-1)
        chosen = logp.gather(-1, x[0, 1:, None])[:, 0].tolist()  # (T-1,)
        tops: list[tuple[tuple[int, float], ...]] = [()] * len(chosen)
        if k > 0:
            values, top_ids = logp.topk(min(k, V))  # (T-1, k)
            pairs = zip(top_ids.tolist(), values.tolist(), strict=True)
            tops = [tuple(zip(i, v, strict=True)) for i, v in pairs]
    scored = [TokenLogprob(t, c, top) for t, c, top in zip(ids[1:], chosen, tops, strict=True)]
    return [None, *scored]


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """How a token is shown on its own (its text when decoded alone)."""
    return tokenizer.decode([token])


@dataclass
class Generation:
    """What :func:`gptkit.generate` returns with ``details=True``: one prompt's continuation
    and, per generated token, what it scored.

    Attributes:
        text: the continuation (cut before a stop string, without the eos token).
        token_ids: the generated ids, without a final eos (they may run past the text when a
            stop string cut it inside a token).
        tokens: each of ``token_ids`` as text (decoded alone).
        logprobs: each token's log-probability (raw model distribution; see the module
            docstring), or None when ``logprobs`` was not asked for.
        top_logprobs: per token, its k most likely alternatives as ``{text: logprob}``
            (best first), or None when ``logprobs`` was not asked for.
        finish_reason: "eos", "length" or "stop".
        prompt_tokens: how many prompt tokens the model read.
    """

    text: str
    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float] | None
    top_logprobs: list[dict[str, float]] | None
    finish_reason: str | None
    prompt_tokens: int = 0


def top_dict(tokenizer: Tokenizer, scored: TokenLogprob) -> dict[str, float]:
    """The alternatives of one position as ``{text: logprob}``, best first."""
    return {token_text(tokenizer, t): lp for t, lp in scored.top}
