"""Beam search over the KV cache, with the semantics of transformers' ``generate(num_beams=N)``.

Every prompt keeps ``N`` running hypotheses (beams). One batched forward gives the next-token
log-probabilities of every beam of every prompt; of the ``N·V`` continuations of a prompt the
``2N`` with the best summed log-probability are kept (twice as many, so that ``N`` remain when
some end on eos). Those among the first ``N`` that end (eos, or ``max_new_tokens`` reached)
join the prompt's finished hypotheses with the score ``sum(log p) / L**length_penalty``
(``L``: generated tokens, eos included); the best ``N`` that do not end become the next beams,
and the cache rows follow them (:meth:`KVCache.keep`: a gather, the prefix is never
recomputed)::

    prompts ─► prefill once ─► each cache row copied to N rows; beam scores [0, -1e9, ...]
      ┌─► log_softmax (G·N, V) ─► ban repeated n-grams ─► + beam scores ─► top 2N per prompt
      │      ├─ ending, among the first N ─► the prompt's finished list (best N kept)
      │      └─ the best N not ending ─► beams; cache.keep(their source rows)
      └── one step (G·N, 1) ◄── until every prompt is done or max_new_tokens

A prompt is done (its rows leave the batch) when its finished list holds ``N`` hypotheses
and, by ``early_stopping``: ``True`` at once; ``False`` when the best running beam's score
over its current length**length_penalty no longer beats the worst finished one
(transformers' heuristic); ``"never"`` the same bound taken at ``max_new_tokens`` when
``length_penalty > 0`` (canonical beam search). The first step's scores ``[0, -1e9, ...]``
make the ``N`` copies of a prompt propose their continuations once.

References: transformers ``GenerationMixin._beam_search`` (v4.50+; tests/reference/test_beam.py
checks sequences and scores against it), ``NoRepeatNGramLogitsProcessor`` after fairseq's
``sequence_generator`` for ``no_repeat_ngram_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from gptkit.errors import GptkitError
from gptkit.generate.core import Detokenizer, check_prompt, prefill, prompt_ids, step
from gptkit.model import GPT, KVCache
from gptkit.tokenizer.base import Tokenizer

EarlyStopping = bool | Literal["never"]
_NEG = -1.0e9  # transformers' score for "not a candidate": finite, so sums stay ordered


@dataclass(frozen=True)
class BeamConfig:
    """Beam search settings; names and defaults are transformers' ``GenerationConfig``'s.

    Attributes:
        num_beams: hypotheses kept per prompt (1 is greedy decoding).
        max_new_tokens: at most this many tokens per hypothesis.
        length_penalty: a finished hypothesis scores ``sum(log p) / L**length_penalty``;
            > 0 favours longer ones, < 0 shorter ones.
        early_stopping: True, False or "never" (see the module docstring).
        num_return_sequences: the best this many hypotheses are returned (<= num_beams).
        no_repeat_ngram_size: > 0: no n-gram of this size occurs twice (prompt included).
        stop_at_eos: a hypothesis ends on the eos id.
    """

    num_beams: int = 4
    max_new_tokens: int = 200
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    num_return_sequences: int = 1
    no_repeat_ngram_size: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise GptkitError(
                f"num_beams ({self.num_beams}) and max_new_tokens ({self.max_new_tokens}) "
                "must be at least 1"
            )
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise GptkitError(
                f"num_return_sequences is {self.num_return_sequences}: give 1 to num_beams "
                f"({self.num_beams}); beam search returns at most num_beams hypotheses"
            )
        if self.no_repeat_ngram_size < 0:
            raise GptkitError("no_repeat_ngram_size must be >= 0 (0 is off)")
        if not isinstance(self.early_stopping, bool) and self.early_stopping != "never":
            raise GptkitError(
                f"early_stopping is {self.early_stopping!r}: give True, False or 'never'"
            )


@dataclass(frozen=True)
class Beam:
    """One finished hypothesis.

    Attributes:
        tokens: the generated ids (the eos id last when it ended on eos).
        score: ``sum(log p) / len(tokens)**length_penalty`` (transformers'
            ``sequences_scores``).
        finish_reason: "eos", "length", or "stop" (a stop string cut its text).
        text: its text, without the eos token and cut before a stop string (the text API
            fills it; :func:`beam_search` leaves it empty).
    """

    tokens: tuple[int, ...]
    score: float
    finish_reason: Literal["eos", "length", "stop"]
    text: str = ""


class _Finished:
    """The best ``n`` finished hypotheses of one prompt, best first."""

    def __init__(self, n: int):
        self.n = n
        self.beams: list[Beam] = []

    def add(self, beam: Beam) -> None:
        self.beams.append(beam)
        self.beams.sort(key=lambda b: -b.score)  # stable: earlier ones win ties
        del self.beams[self.n :]

    @property
    def full(self) -> bool:
        return len(self.beams) == self.n


def banned_ngram_tokens(ids: Sequence[int], n: int) -> list[int]:
    """The tokens that would repeat an ``n``-gram of ``ids`` if they came next: those that
    followed each earlier occurrence of the last ``n - 1`` ids (fairseq, transformers)."""
    if n <= 0 or len(ids) < n:
        return []
    ids = list(ids)
    prefix = ids[len(ids) - n + 1 :]
    return [ids[i + n - 1] for i in range(len(ids) - n + 1) if ids[i : i + n - 1] == prefix]


class _Search:
    """The state of one beam search over a batch of prompts (see :func:`beam_search`).

    ``live`` lists the prompts still searching, in batch order; prompt ``live[g]``'s beams
    are batch rows ``g·N .. g·N + N - 1`` of ``cache``, ``tokens[g]`` and ``scores[g]``.
    """

    def __init__(self, model: GPT, prompts: list[list[int]], cfg: BeamConfig, eos: int | None):
        self.model, self.cfg, self.prompts, self.eos = model, cfg, prompts, eos
        G, N = len(prompts), cfg.num_beams
        self.finished = [_Finished(N) for _ in prompts]
        self.live = list(range(G))
        param = next(model.parameters())
        need = max(len(p) for p in prompts) + cfg.max_new_tokens - 1  # the last is never fed
        self.cache = KVCache(model.config, G, need, param.device, param.dtype)
        self.tokens = torch.zeros(G, N, 0, dtype=torch.long)  # (G, N, t) ids of the beams
        self.scores = torch.full((G, N), _NEG, device=param.device)  # (G, N) sum of log p
        self.scores[:, 0] = 0.0

    def first_logits(self) -> Tensor:
        """Prefill every prompt once, then copy its cache row and logits to its N beams."""
        logits = prefill(self.model, self.prompts, self.cache)  # (G, V)
        rows = torch.arange(len(self.prompts), device=logits.device)
        rows = rows.repeat_interleave(self.cfg.num_beams)  # (G·N,)
        self.cache.keep(rows)
        return logits[rows]

    def advance(self, logits: Tensor, vocab: int) -> bool:
        """Choose the next beams from the logits (G·N, V) of the current ones; True while a
        step remains to be run."""
        G, N, t = len(self.live), self.cfg.num_beams, self.tokens.shape[2]
        logp = F.log_softmax(logits[:, :vocab].float(), dim=-1)  # (G·N, V)
        self._ban_ngrams(logp)
        total = (logp.view(G, N, vocab) + self.scores[:, :, None]).view(G, N * vocab)
        top, index = total.topk(min(2 * N, N * vocab))  # (G, 2N), best first
        src, token = (index // vocab).cpu(), (index % vocab).cpu()  # beam of origin, token
        last = t + 1 == self.cfg.max_new_tokens
        ends = torch.full_like(token, last, dtype=torch.bool)
        if self.eos is not None:
            ends |= token == self.eos
        self._finish(top, src, token, ends)
        # the next beams: the best N continuations that do not end
        self.scores, pick = (top + ends.to(top.device).float() * _NEG).topk(N)  # (G, N)
        pick = pick.cpu()
        src, token = src.gather(1, pick), token.gather(1, pick)  # (G, N)
        self.tokens = torch.cat([self._of(src), token[:, :, None]], dim=2)  # (G, N, t + 1)
        if last:
            return False
        return self._drop_done(src)

    def _of(self, src: Tensor) -> Tensor:
        """The ids (G, K, t) of the beams ``src`` (G, K) came from."""
        return self.tokens.gather(1, src[:, :, None].expand(-1, -1, self.tokens.shape[2]))

    def _ban_ngrams(self, logp: Tensor) -> None:
        """-inf for every token that would repeat an n-gram of its beam's prompt and ids."""
        n = self.cfg.no_repeat_ngram_size
        if n <= 0:
            return
        G, N, t = self.tokens.shape
        for r, beam in enumerate(self.tokens.view(G * N, t).tolist()):
            banned = banned_ngram_tokens(self.prompts[self.live[r // N]] + beam, n)
            if banned:
                logp[r, banned] = float("-inf")

    def _finish(self, top: Tensor, src: Tensor, token: Tensor, ends: Tensor) -> None:
        """Add the ending continuations among the first N of each prompt to its finished list
        (the N after them are a reserve of running beams only, as in transformers)."""
        N = self.cfg.num_beams
        first = ends[:, :N]
        if not bool(first.any()):
            return
        length = self.tokens.shape[2] + 1
        scores = (top[:, :N] / length**self.cfg.length_penalty).tolist()
        seqs = self._of(src[:, :N]).tolist()  # (G, N, t)
        for g, j in first.nonzero().tolist():
            tok = int(token[g, j])
            reason: Literal["eos", "length"] = "eos" if tok == self.eos else "length"
            beam = Beam((*seqs[g][j], tok), scores[g][j], reason)
            self.finished[self.live[g]].add(beam)

    def _drop_done(self, src: Tensor) -> bool:
        """Reorder the cache rows to follow the new beams, leaving out the prompts that are
        done; True while a prompt is left."""
        N = self.cfg.num_beams
        keep = [g for g in range(len(self.live)) if not self._done(g)]
        if not keep:
            return False
        rows = (torch.arange(len(self.live))[:, None] * N + src)[keep].flatten()  # (G'·N,)
        self.cache.keep(rows.to(self.cache.pos.device))
        self.live = [self.live[g] for g in keep]
        self.tokens, self.scores = self.tokens[keep], self.scores[keep]
        return True

    def _done(self, g: int) -> bool:
        """No running beam of prompt ``live[g]`` can enter its finished list any more."""
        cfg, finished = self.cfg, self.finished[self.live[g]]
        if not finished.full:
            return False
        if cfg.early_stopping is True:
            return True
        lp = cfg.length_penalty
        length = self.tokens.shape[2]
        if cfg.early_stopping == "never" and lp > 0:
            length = cfg.max_new_tokens  # the longest a running beam can get
        best = float(self.scores[g, :1].max() / length**lp)  # fp32, as transformers
        return not best > finished.beams[-1].score


def beam_search(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    cfg: BeamConfig,
    eos_id: int | None = None,
    *,
    vocab_size: int | None = None,
) -> list[list[Beam]]:
    """Beam search for a batch of prompts (token ids; lengths may differ), in one batch.

    Args:
        model: the GPT (any family, quantized too); runs on its device, in eval mode.
        prompts: one list of ids per prompt.
        cfg: the beam settings and ``max_new_tokens``.
        eos_id: a hypothesis ends on this id (when ``cfg.stop_at_eos``).
        vocab_size: consider only ids below this (the tokenizer's size, when the model's
            embedding is padded past it).

    Returns:
        Per prompt, its ``cfg.num_return_sequences`` best :class:`Beam` s, best first.

    Raises:
        GptkitError: a prompt is empty, holds ids outside the vocabulary, or leaves no room
            for ``max_new_tokens`` in the model's context (beams do not slide the window).
    """
    V, ctx = model.config.vocab_size, model.config.block_size
    ids = [check_prompt(i, p, V) for i, p in enumerate(prompts)]
    for i, p in enumerate(ids):
        if len(p) + cfg.max_new_tokens > ctx:
            raise GptkitError(
                f"prompt {i} has {len(p)} tokens and max_new_tokens is {cfg.max_new_tokens}: "
                f"{len(p) + cfg.max_new_tokens} > the model's context of {ctx} tokens; beam "
                "search does not slide the window: shorten the prompt or lower max_new_tokens"
            )
    if not ids:
        return []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            search = _Search(model, ids, cfg, eos_id if cfg.stop_at_eos else None)
            logits = search.first_logits()
            while search.advance(logits, min(V, vocab_size or V)):
                tokens = search.tokens[:, :, -1].flatten().tolist()
                logits = step(model, tokens, search.cache)  # (G·N, V)
    finally:
        if was_training:
            model.train()
    return [f.beams[: cfg.num_return_sequences] for f in search.finished]


def beam_text(tokenizer: Tokenizer, beam: Beam, stop: Sequence[str] = ()) -> Beam:
    """``beam`` with its text: decoded without the eos token and cut before the first stop
    string (its finish_reason then "stop"); the stop strings do not end a beam early."""
    text = Detokenizer(tokenizer, stop)
    ids = beam.tokens[:-1] if beam.finish_reason == "eos" else beam.tokens
    for t in ids:
        text.push(t)
    text.close()
    reason = "stop" if text.stopped else beam.finish_reason
    return Beam(beam.tokens, beam.score, reason, text.text)


def generate_beams(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    cfg: BeamConfig,
    stop: Sequence[str] = (),
) -> list[list[Beam]]:
    """:func:`beam_search` with text: per prompt (ids), its best beams with their text (see
    :func:`beam_text`); the tokenizer gives the eos id and the vocabulary size."""
    found = beam_search(model, prompts, cfg, tokenizer.eos_id, vocab_size=tokenizer.vocab_size)
    return [[beam_text(tokenizer, b, stop) for b in beams] for beams in found]


def refuse_with_beams(**settings: bool) -> None:
    """Raise :class:`GptkitError` naming the settings (given as name=in use) that beam
    search does not apply, rather than ignore them."""
    used = [name.replace("_", " ") for name, on in settings.items() if on]
    if used:
        raise GptkitError(
            f"beam search does not apply {', '.join(used)}: leave them out with num_beams > 1, "
            "or sample (num_beams=1); no_repeat_ngram_size curbs repetition in beams"
        )


def beam_generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | list[str],
    cfg: BeamConfig,
    stop: str | Sequence[str] | None = None,
) -> str | list[str] | list[list[str]]:
    """The text API of beam search (``gptkit.generate(..., num_beams=N)``).

    Returns:
        Per prompt, its best text, or its ``num_return_sequences`` best texts (a list, best
        first) when that is > 1; for one prompt (a string) that entry alone, for a list of
        prompts a list of entries.
    """
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    ids = [prompt_ids(tokenizer, p, i) for i, p in enumerate(prompts)]
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    found = generate_beams(model, tokenizer, ids, cfg, stops)
    several = cfg.num_return_sequences > 1
    out = [[b.text for b in beams] if several else beams[0].text for beams in found]
    return out[0] if single else out  # type: ignore[return-value]
