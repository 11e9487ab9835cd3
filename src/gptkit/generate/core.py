"""The decoding core: prefill, step, sampling, stop strings and streaming text, written once.

Every decoding loop in gptkit is built from these pieces: :class:`~gptkit.generate.generator.
Decoder` (``generate``, ``stream``, ``chat``, the CLI) decodes a fixed batch of prompts, and
the serving engine (:mod:`gptkit.serve.engine`) adds and retires requests between steps.
Both hold one :class:`Row` per sequence and run the same two forwards over a
:class:`~gptkit.model.KVCache`::

    prompts ─► prefill (one right-padded forward) ─► logits at each prompt's end
                                                                  │
      ┌─► step (one token per row) ─► logits ─► Row.sample ◄──────┘
      │                                             │
      └─── until eos, length or a stop string ◄── Row.record ─► Row.emit (text)

A row's :class:`~gptkit.config.SampleConfig` is its whole set of parameters (temperature,
top-k/p/min-p, the CTRL repetition penalty, the OpenAI presence and frequency penalties,
length, stop strings, seed, logprobs), so rows with different settings share a batch. A seeded
row has its own ``torch.Generator``: its tokens depend on its prompt and seed, not on the rest
of the batch.
The global RNG is never used. :mod:`gptkit.generate.compiled` holds the compiled versions of
the two forwards.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gptkit.config import SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate.compiled import compiled_prefill
from gptkit.generate.constrain import constraint_of
from gptkit.generate.logprobs import TokenLogprob, token_logprob
from gptkit.generate.sampling import apply_presence_frequency_penalty, sample_next, seen_mask
from gptkit.model import GPT, KVCache
from gptkit.model.decode_step import decode_hidden
from gptkit.tokenizer.base import Tokenizer

FinishReason = Literal["eos", "length", "stop"]


@dataclass(frozen=True)
class TokenEvent:
    """One new token of one row. ``finish_reason`` is set on the row's last event: "eos"
    (``token`` is the eos id, not part of the text) or "length" (``token`` is the last one)."""

    row: int
    token: int
    finish_reason: FinishReason | None = None


_REPLACEMENT = "\ufffd"  # what a decoder shows for the bytes of an unfinished UTF-8 character


# -- the two forwards ------------------------------------------------------------------------


def padded(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded ids (B, T) and lengths (B,)."""
    lengths = [len(r) for r in rows]
    x = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for b, r in enumerate(rows):
        x[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return x.to(device), torch.tensor(lengths, device=device)


def last_logits(model: GPT, x: Tensor, lengths: Tensor, cache: KVCache | None) -> Tensor:
    """Logits (B, V) at each row's last real position; the head runs on B positions only."""
    h = model.hidden(x, cache)  # (B, T, C)
    last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, C)
    return model.lm_head(last)


def prefill(
    model: GPT, prompts: Sequence[Sequence[int]], cache: KVCache, compile: bool = False
) -> Tensor:
    """Logits (B, V) of the token after each prompt. The prompts go into ``cache``'s rows
    (empty before) right-padded in one forward; each row's position then rewinds to its
    prompt's length, so its padding is overwritten before any query can see it (see
    :class:`KVCache`). ``compile``: a single prompt goes through :func:`compiled_prefill`."""
    x, lengths = padded(prompts, cache.pos.device)
    h = compiled_prefill(model, x, cache) if compile and len(prompts) == 1 else None
    logits = model.lm_head(h) if h is not None else last_logits(model, x, lengths, cache)
    cache.set_pos(lengths)
    return logits


def step(model: GPT, tokens: Sequence[int], cache: KVCache) -> Tensor:
    """Logits (B, V) after feeding one token per row (their pending tokens) into ``cache``."""
    x = torch.tensor(tokens, device=cache.pos.device)[:, None]  # (B, 1)
    h = decode_hidden(model, x, cache)  # the fused CPU step, where it applies
    return model.lm_head(h[:, -1]) if h is not None else model(x, cache)[:, -1]


# -- one sequence --------------------------------------------------------------------------


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A random source of its own: seeded, or with fresh entropy from the OS (never the
    global RNG)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


class Row:
    """One sequence being decoded: its parameters, random source, tokens and end.

    Args:
        prompt: the ids the model reads first (after any context policy).
        params: the sampling settings, length, stop strings and seed of this row.
        device: where its random source and penalty mask live (the model's device).
        vocab_size: the ids it may sample are below this.
        eos_id: the row ends on this id (when ``params.stop_at_eos``).
        tokenizer: give one to get the row's text (:meth:`emit`), cut at ``params.stop``.
            A row whose params carry a grammar (:mod:`gptkit.generate.constrain`) needs it:
            the grammar masks every draw, and the row ends ("stop") once it is complete.
    """

    def __init__(
        self,
        prompt: Sequence[int],
        params: SampleConfig,
        *,
        device: torch.device,
        vocab_size: int,
        eos_id: int | None = None,
        tokenizer: Tokenizer | None = None,
    ):
        self.params = params
        self.context = list(prompt)  # the tokens in the model's window
        self.prompt_tokens = len(self.context)
        self.eos_id = eos_id if params.stop_at_eos else None
        self.generator = new_generator(params.seed, device)
        self.generated: list[int] = []
        self.counts: collections.Counter[int] = collections.Counter()  # of generated ids
        self.pending = 0  # the sampled token not yet fed to the model
        self.finish_reason: FinishReason | None = None
        self.forced: collections.deque[int] = collections.deque()  # ids to emit, not sample
        self.seen: Tensor | None = None  # (1, V) ids the row holds, for the CTRL penalty
        # per generated token, its score (only when params.logprobs is set)
        self.scores: list[TokenLogprob] = []
        self._scored: TokenLogprob | None = None  # the score of the token sample() chose
        if params.repetition_penalty != 1.0:
            self.seen = seen_mask([self.context], 1, vocab_size, device)
        self.text = Detokenizer(tokenizer, params.stop) if tokenizer is not None else None
        self.constraint = constraint_of(params, tokenizer, vocab_size)

    def sample(self, logits: Tensor, greedy: int) -> int:
        """The next token from this row's fp32 logits (1, V); ``greedy`` is their argmax, so
        a batch pays one argmax for all its greedy rows. A forced id replaces the draw (the
        draw still happens, so a seeded row's later draws do not depend on forcing). With
        ``params.logprobs`` set, the chosen token is scored under these raw logits."""
        p = self.params
        raw = logits
        penalized = bool(self.counts) and bool(p.presence_penalty or p.frequency_penalty)
        token = greedy
        if self.constraint is not None:  # ids outside the grammar are never drawn
            allowed = self.constraint.allowed().to(logits.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
            token = int(logits.argmax())
        if p.temperature != 0 or penalized or self.seen is not None:
            if penalized:
                logits = apply_presence_frequency_penalty(
                    logits, self._counts(logits), p.presence_penalty, p.frequency_penalty
                )
            token = int(sample_next(logits, self.seen, p, self.generator)[0])
        token = self.forced.popleft() if self.forced else token
        if p.logprobs is not None:
            self._scored = token_logprob(raw[0], token, p.logprobs)
        return token

    def _counts(self, logits: Tensor) -> Tensor:
        """(1, V) how often each id was generated so far, in ``logits``' dtype."""
        counts = torch.zeros_like(logits)
        ids = torch.tensor(list(self.counts), device=logits.device)
        values = torch.tensor(list(self.counts.values()), dtype=logits.dtype)
        counts[0, ids] = values.to(logits.device)
        return counts

    def record(self, token: int) -> FinishReason | None:
        """Take ``token`` as the row's next one; returns why the row ends with it, if it
        does ("eos": the token is the eos id, not part of the text; "length")."""
        self.generated.append(token)
        self.counts[token] += 1
        if self._scored is not None and self._scored.token == token:
            self.scores.append(self._scored)
            self._scored = None
        if self.seen is not None:
            self.seen[0, token] = True
        self.pending = token
        if self.eos_id is not None and token == self.eos_id:
            self.finish_reason = "eos"
        elif self.constraint is not None and self.constraint.advance(token):
            self.finish_reason = "stop"  # the grammar is complete
        elif len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason

    def emit(self, token: int, reason: FinishReason | None) -> tuple[str, bool]:
        """The text that became final with ``token`` (recorded with ``reason``), and whether
        a stop string ended the row (the text is cut before it)."""
        assert self.text is not None, "the row was made without a tokenizer"
        piece = self.text.push(token) if reason != "eos" else ""
        if self.text.stopped:
            return piece, True
        if reason is not None:
            piece += self.text.close()
        return piece, False


def sample(logits: Tensor, rows: Sequence[Row], vocab_size: int) -> list[int]:
    """The next token of every row from the logits (B, V) of a step, each by its own
    parameters; ids from ``vocab_size`` on (a padded embedding) are never drawn."""
    logits = logits[:, :vocab_size].float()
    greedy = logits.argmax(dim=-1).tolist()
    return [row.sample(logits[b : b + 1], greedy[b]) for b, row in enumerate(rows)]


def check_prompt(i: int, ids: Sequence[int], vocab_size: int) -> list[int]:
    """Prompt ``i`` as a list of ints, refused when empty or holding ids outside the model's
    vocabulary."""
    ids = [int(t) for t in ids]
    if not ids:
        raise GptkitError(
            f"prompt {i} has no tokens; give at least one (the text API starts an "
            "empty prompt with the tokenizer's bos or eos token)"
        )
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise GptkitError(
            f"prompt {i} holds token id {bad}, outside the model's vocabulary of {vocab_size}; "
            "the tokenizer does not belong to this model"
        )
    return ids


def prompt_ids(tokenizer: Tokenizer, text: str, i: int = 0) -> list[int]:
    """The ids of prompt ``i``; an empty one starts from the bos token (else eos), so that
    the model has a position to predict from."""
    ids = tokenizer.encode_prompt(text)
    if not ids:
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise GptkitError(
                f"prompt {i} is empty and the tokenizer has no bos or eos token to start "
                "from; give a prompt of at least one token"
            )
        ids.append(start)
    return ids


# -- streaming text ---------------------------------------------------------------------------


class Detokenizer:
    """Incremental text of one row: decodes new ids, cuts at stop strings, and releases only
    text that is final.

    Text is held back while it ends in an unfinished UTF-8 character (a byte-level decoder
    shows U+FFFD for it) or in a prefix of a stop string. Decoding re-reads only the ids since
    the last released boundary (plus one earlier stretch for context, for decoders that treat
    a leading space specially), never the whole continuation. A stop string is searched for
    in the text's tail only, and the prefix of each that the text ends in is followed as the
    text grows, with Knuth-Morris-Pratt's failure table: work per new character, not per
    prefix of every stop string on every token.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise GptkitError("a stop string must not be empty")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._tables = [_failure_table(s) for s in self.stop]
        self._matched = [0] * len(self.stop)  # per stop string: its prefix the text ends in
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] were decoded last time, for context
        self._read = 0  # ids[:_read] are in self.text
        self.text = ""  # the continuation so far, cut before a stop string once one shows
        self._released = 0  # len of the text handed out
        self.stopped = False  # a stop string was found; the text is final

    def push(self, token: int) -> str:
        """Add one id; returns the text that became final (often "")."""
        if self.stopped:
            return ""
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read])
        now = decode(self.ids[self._prefix :])
        if now.endswith(_REPLACEMENT) or len(now) <= len(before):
            return self._add("", final=False)  # mid-character: wait for the rest
        self._prefix, self._read = self._read, len(self.ids)
        return self._add(now[len(before) :], final=False)

    def close(self) -> str:
        """The row ended: release everything that is left (an unfinished character too)."""
        if self.stopped:
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read])
        rest = decode(self.ids[self._prefix :])[len(before) :]
        self._prefix = self._read = len(self.ids)
        return self._add(rest, final=True)

    def _add(self, new: str, final: bool) -> str:
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += new
        self._follow(new)
        if new and self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = final = True
        end = len(self.text) if final else len(self.text) - self._held()
        piece = self.text[self._released : end] if end > self._released else ""
        self._released = max(self._released, end)
        return piece

    def _follow(self, new: str) -> None:
        """Advance, over ``new``, the length of each stop string's prefix that the text ends
        in (a full match is found by the search in :meth:`_add`)."""
        for j, (stop, table) in enumerate(zip(self.stop, self._tables, strict=True)):
            k = self._matched[j]
            for ch in new:
                if k == len(stop):
                    k = table[k - 1]
                while k and stop[k] != ch:
                    k = table[k - 1]
                k += stop[k] == ch
            self._matched[j] = k

    def _held(self) -> int:
        """Length of the longest end of the text that could begin a stop string."""
        pairs = zip(self._matched, self.stop, strict=True)
        return max((min(k, len(s) - 1) for k, s in pairs), default=0)


def _failure_table(s: str) -> list[int]:
    """Knuth-Morris-Pratt's table: entry i is the length of the longest proper prefix of
    ``s[: i + 1]`` that is also a suffix of it."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        k += s[i] == s[k]
        table[i] = k
    return table
