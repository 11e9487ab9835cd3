"""The decoding loop over a fixed batch of prompts, and the text API on top of it.

Two layers, both built from :mod:`gptkit.generate.core`. :class:`Decoder` (made by
:func:`generate_ids`) works on token ids: it batches the prompts, applies the context policy,
samples, and yields the new token of every active row at each step; rows finish on their own
(eos, length, or :meth:`Decoder.finish` from the caller), and a finished row leaves the batch.
:func:`generate` and :func:`stream` put text around it: encoding, incremental decoding, stop
strings, and streaming that never shows text it may have to take back.

Batched prefill (one forward for all prompts, right-padded; see :class:`KVCache`)::

    row 0:  a b c d e        ─► logits at e ─► set_pos([5, 2, 3]) ─► decode one step:
    row 1:  f g · · ·        ─► logits at g                          row 0 writes slot 5,
    row 2:  h i j · ·        ─► logits at j                          row 1 slot 2, row 2 slot 3

A padding slot is overwritten before any query can see it, so batched greedy decoding gives
the same tokens as decoding each prompt alone, and the cached loop the same tokens as the
uncached reference (``use_cache=False``, a full forward over the window at every step).

Context policy. The model sees at most ``block_size`` tokens (its context).
``context_policy="slide"`` (the default): a prompt longer than the context keeps its last
``block_size`` tokens, with a warning naming how many were dropped; when a row's context is
full during generation the window slides: the oldest half of the context is dropped, the
newest ``block_size // 2`` tokens (at least one) are re-prefilled at positions from 0, and
generation goes on, so it can run past ``block_size`` tokens. ``context_policy="error"``:
a prompt whose length plus ``max_new_tokens`` exceeds ``block_size`` raises
:class:`GptkitError` with the numbers and the fix, and the window never slides. The uncached
reference slides at the same points, so both paths see the same tokens at every step.

Sampling with a seed gives every row its own ``torch.Generator`` seeded alike, so a row's
text depends on its prompt and the seed, not on which other prompts share its batch.

Compiled decoding (``compile=True``, :mod:`gptkit.generate.compiled`) speeds up
single-prompt decoding: the prefill and every step of a lone row run through
``torch.compile`` on a cache whose length is rounded up by :func:`compiled_cache_len`;
batched prefill, window slides and batches of more than one row stay eager. The tokens equal
eager decoding's (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from gptkit.config import Grammar, SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate.beam import BeamConfig, beam_generate, refuse_with_beams
from gptkit.generate.compiled import (
    AutoCompile,
    compiled_cache_len,
    compiled_step,
    note_compiled,
    warn_at_caller,
)
from gptkit.generate.core import (
    FinishReason,
    Row,
    TokenEvent,
    check_prompt,
    last_logits,
    padded,
    prefill,
    prompt_ids,
    sample,
    step,
)
from gptkit.generate.logprobs import Generation, token_text, top_dict
from gptkit.model import GPT, KVCache
from gptkit.tokenizer.base import Tokenizer

if TYPE_CHECKING:
    from gptkit.generate.speculative import DraftSource


class Decoder:
    """Token-id decoding of a batch of prompts; iterate to get one step at a time.

    Each ``next()`` returns the :class:`TokenEvent` of every row that is still active, in row
    order. A row is done after an event with a ``finish_reason`` or after :meth:`finish`; it
    leaves the batch (and the KV cache) before the next step. Iteration ends when no row is
    left. Between steps the model is left as the caller had it (train/eval mode, autograd).

    Attributes:
        rows: one :class:`~gptkit.generate.core.Row` per prompt.
        prompt_tokens: per row, how many prompt tokens the model saw (after any truncation).
        dropped: per row, how many prompt tokens the slide policy cut from the front.
        finish_reasons: per row, why it ended (None while active).
    """

    def __init__(
        self,
        model: GPT,
        prompts: Sequence[Sequence[int]],
        cfg: SampleConfig,
        eos_id: int | None = None,
        *,
        use_cache: bool = True,
        vocab_size: int | None = None,
        seeds: Sequence[int | None] | None = None,
        compile: bool | Literal["auto"] = False,
        tokenizer: Tokenizer | None = None,
    ):
        self.model, self.cfg = model, cfg
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.use_cache = use_cache
        self.auto = AutoCompile(model) if compile == "auto" else None
        self.compile = compile is True
        self._compiled_shape: tuple[int, int] | None = None  # (B, cache length) last compiled
        V = self.config.vocab_size
        # A model's embedding may be padded past its tokenizer; never sample the padding ids.
        self.sample_vocab = min(V, vocab_size) if vocab_size else V
        self.window = self.config.block_size
        self.keep = max(1, self.window // 2)  # tokens left in the window after a slide
        if seeds is not None and len(seeds) != len(prompts):
            raise GptkitError(
                f"got {len(seeds)} seeds for {len(prompts)} prompts; give one per prompt"
            )
        self.dropped: list[int] = []
        self.rows: list[Row] = []
        for i, p in enumerate(prompts):
            params = cfg if seeds is None else cfg.replace(seed=seeds[i])
            ids = self._fit(i, check_prompt(i, p, V))
            self.rows.append(
                Row(
                    ids,
                    params,
                    device=self.device,
                    vocab_size=self.sample_vocab,
                    eos_id=eos_id,
                    tokenizer=tokenizer,
                )
            )
        self.active = list(range(len(self.rows))) if cfg.max_new_tokens > 0 else []
        self._leaving: list[int] = []  # rows that finished and still occupy the batch
        self._started = False
        self.cache: KVCache | None = None

    @property
    def prompt_tokens(self) -> list[int]:
        return [row.prompt_tokens for row in self.rows]

    @property
    def finish_reasons(self) -> list[FinishReason | None]:
        return [row.finish_reason for row in self.rows]

    def _fit(self, i: int, ids: list[int]) -> list[int]:
        """Apply the context policy to prompt ``i``."""
        bs, new = self.window, self.cfg.max_new_tokens
        if self.cfg.context_policy == "error":
            if len(ids) + new > bs:
                fix = (
                    f"lower max_new_tokens to {bs - len(ids)}, shorten the prompt"
                    if len(ids) < bs
                    else f"shorten the prompt to under {bs} tokens"
                )
                raise GptkitError(
                    f"prompt {i} has {len(ids)} tokens and max_new_tokens is {new}: "
                    f"{len(ids) + new} > the model's context of {bs} tokens; {fix}, or use "
                    "context_policy='slide'"
                )
            self.dropped.append(0)
            return ids
        cut = max(0, len(ids) - bs)
        self.dropped.append(cut)
        if cut:
            warn_at_caller(
                f"prompt {i} has {len(ids)} tokens but the model's context is {bs}; dropped "
                f"the oldest {cut} tokens (context_policy='slide')"
            )
        return ids[cut:]

    # -- iteration -----------------------------------------------------------------------

    def __iter__(self) -> Decoder:
        return self

    def finish(self, row: int, reason: FinishReason = "stop") -> None:
        """End ``row`` from outside (a stop string, a closed connection); no more events
        come for it. Finishing a row that has left the batch does nothing."""
        if row not in self.active:
            return
        if self.rows[row].finish_reason is None:
            self._leaving.append(row)
        # A stop string found in the last token outranks the "length" that token also set.
        self.rows[row].finish_reason = reason

    def force(self, row: int, ids: Sequence[int]) -> None:
        """Make ``ids`` the next tokens of ``row`` instead of sampled ones (a tool's output,
        such as a calculator's result). They come as events like sampled tokens, count
        toward ``max_new_tokens``, and the model reads them as it would its own. Forcing a
        row that has finished does nothing."""
        if row not in self.active or self.rows[row].finish_reason is not None:
            return
        bad = next((t for t in ids if not 0 <= int(t) < self.config.vocab_size), None)
        if bad is not None:
            raise GptkitError(
                f"cannot force token id {bad}: outside the model's vocabulary of "
                f"{self.config.vocab_size}"
            )
        self.rows[row].forced.extend(int(t) for t in ids)

    def __next__(self) -> list[TokenEvent]:
        model = self.model
        was_training = model.training
        if was_training:
            model.eval()
        try:
            with torch.inference_mode():
                self._drop_finished()
                if not self.active:
                    raise StopIteration
                if not self._started:
                    self._started = True
                    logits = self._prefill() if self.use_cache else self._forward_window(False)
                else:
                    logits = self._decode() if self.use_cache else self._forward_window(True)
                rows = [self.rows[r] for r in self.active]
                tokens = sample(logits, rows, self.sample_vocab)
                return self._events(tokens)
        finally:
            if was_training:
                model.train()

    def _events(self, tokens: list[int]) -> list[TokenEvent]:
        events = []
        for r, token in zip(self.active, tokens, strict=True):
            reason = self.rows[r].record(token)
            if reason is not None:
                self._leaving.append(r)
            events.append(TokenEvent(r, token, reason))
        return events

    def _drop_finished(self) -> None:
        """Take finished rows out of the batch and the cache."""
        if not self._leaving:
            return
        gone = set(self._leaving)
        self._leaving.clear()
        keep = [b for b, r in enumerate(self.active) if r not in gone]
        self.active = [self.active[b] for b in keep]
        if self.active and self._started and self.cache is not None:
            self.cache.keep(torch.tensor(keep, device=self.device))

    # -- the forward passes ----------------------------------------------------------------

    def _prefill(self) -> Tensor:
        prompts = [self.rows[r].context for r in self.active]
        # Room for the longest prompt plus every token that will be fed back (the last
        # sampled token never is); past the context, the window slides instead.
        need = max(len(p) for p in prompts) + self.cfg.max_new_tokens - 1
        if self.auto is not None:  # a compiled length, should a later step switch
            need = compiled_cache_len(need)
            self.compile = self.auto.decide(len(prompts), self.cfg.max_new_tokens - 1, need)
        elif self.compile:
            need = compiled_cache_len(need)
        self.cache = KVCache(self.config, len(prompts), need, self.device, self.dtype)
        return prefill(self.model, prompts, self.cache, compile=self.compile)

    def _slide(self, row: Row) -> None:
        """Drop the oldest half of a full window; the pending token completes the new one."""
        ctx = row.context
        row.context = ctx[len(ctx) - (self.keep - 1) :] if self.keep > 1 else []

    def _decode(self) -> Tensor:
        cache = self.cache
        assert cache is not None
        rows = [self.rows[r] for r in self.active]
        full = [b for b, row in enumerate(rows) if len(row.context) >= cache.max_len]
        if full:
            self._refill(full)
        for row in rows:
            row.context.append(row.pending)
        tokens = [row.pending for row in rows]
        if self.compile and len(rows) == 1:  # batches stay eager: no graph per size
            shape = (1, cache.max_len)
            x = torch.tensor(tokens, device=self.device)[:, None]
            logits = compiled_step(self.model, x, cache, self._compiled_shape == shape)
            if logits is not None:
                self._compiled_shape = shape
                note_compiled(self.model, cache.max_len)
                return logits
            self.compile, self.auto = False, None
        if self.auto is not None and len(rows) == 1:
            left = self.cfg.max_new_tokens - len(rows[0].generated)
            logits, self.compile = self.auto.eager_step(
                lambda: step(self.model, tokens, cache), left, cache.max_len
            )
            return logits
        return step(self.model, tokens, cache)  # (B, V)

    def _refill(self, batch_rows: list[int]) -> None:
        """Slide the windows of the given batch rows and re-prefill their kept tokens."""
        cache = self.cache
        assert cache is not None
        rows = [self.rows[self.active[b]] for b in batch_rows]
        for row in rows:
            self._slide(row)
        n = self.keep - 1
        idx = torch.tensor(batch_rows, device=self.device)
        if n > 0:
            sub = KVCache(self.config, len(rows), n, self.device, self.dtype)
            x = torch.tensor([row.context for row in rows])
            self.model.hidden(x.to(self.device), sub)  # only the keys and values are needed
            for layer in range(self.config.n_layer):
                cache.k[layer][idx, :, :n] = sub.k[layer]
                cache.v[layer][idx, :, :n] = sub.v[layer]
        pos = cache.pos.clone()
        pos[idx] = n
        cache.set_pos(pos)

    def _forward_window(self, feed: bool) -> Tensor:
        """The reference: a full forward over every active row's window, no cache."""
        rows = [self.rows[r] for r in self.active]
        if feed:  # the pending tokens join the windows, sliding them as the cache would
            for row in rows:
                if len(row.context) >= self.window:
                    self._slide(row)
                row.context.append(row.pending)
        x, lengths = padded([row.context for row in rows], self.device)
        return last_logits(self.model, x, lengths, None)


def generate_ids(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    cfg: SampleConfig,
    eos_id: int | None = None,
    *,
    use_cache: bool = True,
    vocab_size: int | None = None,
    seeds: Sequence[int | None] | None = None,
    compile: bool | Literal["auto"] = False,
) -> Decoder:
    """Decode token ids for a batch of prompts, one step per ``next()``.

    Args:
        model: the GPT (its device and parameter dtype are used).
        prompts: one list of ids per row; rows may differ in length.
        cfg: sampling settings, ``max_new_tokens`` and the context policy.
        eos_id: a row ends when it samples this id (if ``cfg.stop_at_eos``).
        use_cache: False recomputes the whole window every step (the reference).
        vocab_size: sample only ids below this (the tokenizer's size, when the model's
            embedding is padded past it).
        seeds: one seed per row, overriding ``cfg.seed`` (None in it: a fresh random seed).
        compile: run the decode steps through ``torch.compile``; "auto" where it pays (see
            the module docstring).

    Returns:
        A :class:`Decoder`: iterate it for lists of :class:`TokenEvent`, call
        ``finish(row)`` to end a row early.
    """
    return Decoder(
        model,
        prompts,
        cfg,
        eos_id,
        use_cache=use_cache,
        vocab_size=vocab_size,
        seeds=seeds,
        compile=compile,
    )


class TextStream:
    """``(row, text)`` pieces as :func:`_text_pieces` makes them; ``decoder`` keeps the
    rows (their tokens, scores and finish reasons) for when the text is done."""

    def __init__(self, decoder: Decoder, pieces: Iterator[tuple[int, str]]):
        self.decoder, self._pieces = decoder, pieces

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> tuple[int, str]:
        return next(self._pieces)


def _text_pieces(
    decoder: Decoder,
    tool: Callable[[str], str | None] | None = None,
    tokenizer: Tokenizer | None = None,
) -> Iterator[tuple[int, str]]:
    """(row, text) pieces as the decoder produces tokens; empty pieces are skipped. With a
    ``tool``, a row's text is passed to it after every new token, and the text it returns
    (if any) is forced into that row next."""
    for events in decoder:
        for ev in events:
            row = decoder.rows[ev.row]
            piece, stopped = row.emit(ev.token, ev.finish_reason)
            if stopped:
                decoder.finish(ev.row, "stop")
            elif ev.finish_reason is None and tool is not None and tokenizer is not None:
                assert row.text is not None
                forced = tool(row.text.text)
                if forced:
                    decoder.force(ev.row, tokenizer.encode(forced))
            if piece:
                yield ev.row, piece


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | list[str],
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    stop_at_eos: bool = True,
    context_policy: str = "slide",
    use_cache: bool = True,
    compile: bool | Literal["auto"] = "auto",
    tool: Callable[[str], str | None] | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    min_p: float | None = None,
    logprobs: int | None = None,
    details: bool = False,
    json_schema: dict[str, Any] | None = None,
    regex: str | None = None,
    choices: list[str] | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | Literal["never"] = False,
    num_return_sequences: int = 1,
    no_repeat_ngram_size: int = 0,
    draft: DraftSource | None = None,
    draft_tokens: int = 4,
) -> str | list[str] | list[list[str]] | Generation | list[Generation]:
    """Continue ``prompt`` (or each prompt of a list, batched) and return only the new text.

    Args:
        model: the GPT; it runs on its own device and parameter dtype, in eval mode.
        tokenizer: the model's tokenizer.
        prompt: a string, or a list of strings to decode together.
        max_new_tokens: at most this many tokens per prompt.
        temperature: 0 is greedy; higher is more random.
        top_k: sample only from the k most likely tokens.
        top_p: sample only from the smallest set of tokens holding probability top_p.
        repetition_penalty: > 1 discourages tokens already in the sequence (CTRL).
        seed: makes sampling reproducible.
        stop: a string or strings that end generation; the text is cut before them.
        stop_at_eos: end at the tokenizer's end-of-sequence token.
        context_policy: "slide" or "error", for text longer than the model's context.
        use_cache: False recomputes every step without the KV cache (slow; the reference).
        compile: decode a single prompt through torch.compile (faster per token after a
            one-off compilation; see :mod:`gptkit.generate.generator`). "auto" (the
            default) compiles once it pays for its compilation on the CPU: once the time
            this model's eager single-prompt steps in this process would have saved,
            counting the steps this call has to go, reaches what compiling costs there
            (nothing when this process compiled it, little when inductor's on-disk cache
            holds it from an earlier process, most when cold); a few one-off calls then
            stay eager and a session of many calls compiles (the numbers and the rule:
            :mod:`gptkit.generate.compiled`). False never compiles, True always does.
        tool: called with a row's text so far after every new token; a string it returns
            is encoded and written into that row next, in place of sampled tokens (for
            example :func:`gptkit.eval.calculator.calculator`). Its tokens count toward
            ``max_new_tokens``.
        presence_penalty, frequency_penalty: the OpenAI API's additive penalties on
            tokens already generated (once, and per occurrence); see :class:`SampleConfig`.
        min_p: sample only tokens at least min_p times as likely as the most likely one.
        logprobs: score every generated token and its ``logprobs`` most likely
            alternatives (0 to 20), under the model's raw distribution (see
            :mod:`gptkit.generate.logprobs`); read them with ``details=True``.
        details: return a :class:`~gptkit.generate.logprobs.Generation` per prompt (text,
            token ids and texts, logprobs, finish reason) instead of the text.
        json_schema, regex, choices: structured output (give at most one): the text is a
            JSON value valid under the schema, a full match of the regular expression, or
            one of the choices; every draw is masked to the grammar and the row ends when
            it is complete (see :mod:`gptkit.generate.constrain`).
        num_beams: > 1 decodes by beam search (:mod:`gptkit.generate.beam`; deterministic:
            temperature, top_k, top_p, min_p and seed do not apply; stop strings cut the
            returned texts; always on the KV cache, never sliding the window: a prompt
            must leave room for max_new_tokens in the context).
        length_penalty, early_stopping, no_repeat_ngram_size: beam search's settings,
            as transformers names them (see :class:`~gptkit.generate.beam.BeamConfig`).
        num_return_sequences: the best this many beams are returned (<= num_beams).
        draft: decode by speculation (:mod:`gptkit.generate.speculative`): a smaller model
            with the same tokenizer (a GPT, or any source ``gptkit.load`` reads), "int4"
            (the model quantized to int4 drafts for itself) or "lookup" (n-gram matches in
            the context). The text is the one decoding without it gives (greedy: token for
            token; sampling: by the same distribution); prompts run one by one.
        draft_tokens: the draft's proposals per round (k).

    Returns:
        The continuation, or a list of them for a list of prompts (with ``details``, a
        :class:`~gptkit.generate.logprobs.Generation` or a list of them). With
        ``num_return_sequences`` K > 1, a prompt's entry is a list of K texts, best first:
        one prompt gives a list of K strings, a list of prompts a list of such lists.
    """
    if num_beams > 1 or num_return_sequences > 1:
        refuse_with_beams(
            tool=tool is not None,
            logprobs=logprobs is not None,
            details=details,
            penalties=(repetition_penalty, presence_penalty, frequency_penalty) != (1, 0, 0),
            structured_output=(json_schema, regex, choices) != (None, None, None),
            draft=draft is not None,
        )
        beams = BeamConfig(
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            num_return_sequences=num_return_sequences,
            no_repeat_ngram_size=no_repeat_ngram_size,
            stop_at_eos=stop_at_eos,
        )
        return beam_generate(model, tokenizer, prompt, beams, stop)
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    pieces = stream(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
        stop_at_eos=stop_at_eos,
        context_policy=context_policy,
        use_cache=use_cache,
        compile=compile,
        tool=tool,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        min_p=min_p,
        logprobs=logprobs,
        json_schema=json_schema,
        regex=regex,
        choices=choices,
        draft=draft,
        draft_tokens=draft_tokens,
    )
    parts: list[list[str]] = [[] for _ in prompts]
    for row, piece in pieces:
        parts[row].append(piece)
    out = ["".join(p) for p in parts]
    if details:
        assert isinstance(pieces, TextStream)  # stream() gives a list of prompts its rows
        gens = [generation(tokenizer, r, t) for r, t in zip(pieces.decoder.rows, out, strict=True)]
        return gens[0] if single else gens
    return out[0] if single else out


def generation(tokenizer: Tokenizer, row: Row, text: str) -> Generation:
    """A decoded row as a :class:`Generation`: its text, tokens (a final eos left out, as
    it is not part of the text) and, when they were asked for, their scores."""
    ids = row.generated[:-1] if row.finish_reason == "eos" else list(row.generated)
    scored = row.params.logprobs is not None
    scores = row.scores[: len(ids)]
    return Generation(
        text=text,
        token_ids=ids,
        tokens=[token_text(tokenizer, t) for t in ids],
        logprobs=[s.logprob for s in scores] if scored else None,
        top_logprobs=[top_dict(tokenizer, s) for s in scores] if scored else None,
        finish_reason=row.finish_reason,
        prompt_tokens=row.prompt_tokens,
    )


def stream(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | list[str],
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    stop_at_eos: bool = True,
    context_policy: str = "slide",
    use_cache: bool = True,
    compile: bool | Literal["auto"] = "auto",
    tool: Callable[[str], str | None] | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    min_p: float | None = None,
    logprobs: int | None = None,
    json_schema: dict[str, Any] | None = None,
    regex: str | None = None,
    choices: list[str] | None = None,
    num_beams: int = 1,
    draft: DraftSource | None = None,
    draft_tokens: int = 4,
) -> Iterator[Any]:
    """Like :func:`generate` (without ``details``), but yields the text as it comes:
    ``"".join(stream(...)) == generate(...)`` for the same arguments. For a list of prompts
    it yields ``(index, piece)`` tuples instead of strings. Bad arguments raise here, before
    the first piece; ``num_beams > 1`` is refused (beam search knows its best text only at
    the end: call :func:`generate`)."""
    if num_beams > 1:
        raise GptkitError(
            "beam search cannot stream: which beam is best is known only at the end; call "
            "generate() with num_beams, or stream with num_beams=1"
        )
    cfg = SampleConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        min_p=min_p,
        logprobs=logprobs,
        seed=seed,
        stop=stop,  # type: ignore[arg-type]  # a str or list: SampleConfig makes a tuple
        stop_at_eos=stop_at_eos,
        context_policy=context_policy,  # type: ignore[arg-type]
        grammar=Grammar.of(json_schema=json_schema, regex=regex, choices=choices),
    )
    single = isinstance(prompt, str)
    pieces = decode_text(
        model,
        tokenizer,
        [prompt] if single else list(prompt),
        cfg,
        use_cache=use_cache,
        compile=compile,
        tool=tool,
        draft=draft,
        draft_tokens=draft_tokens,
    )
    return (piece for _, piece in pieces) if single else pieces


def decode_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: list[str],
    cfg: SampleConfig,
    *,
    use_cache: bool = True,
    compile: bool | Literal["auto"] = "auto",
    tool: Callable[[str], str | None] | None = None,
    draft: DraftSource | None = None,
    draft_tokens: int = 4,
) -> Iterator[tuple[int, str]]:
    """``(index, piece)`` text of every prompt as it comes, sampled by ``cfg`` (the text API
    of :class:`Decoder`, or with a ``draft`` of the speculative decoder; :func:`stream`
    builds ``cfg`` from its keywords). Bad arguments raise here, before the first piece."""
    ids = [prompt_ids(tokenizer, p, i) for i, p in enumerate(prompts)]
    if draft is not None:
        from gptkit.generate.speculative import SpeculativeDecoder, make_draft  # built on this

        if tool is not None or not use_cache:
            raise GptkitError("a draft decodes with the KV cache and without a tool; drop one")
        speculative = SpeculativeDecoder(
            model,
            ids,
            cfg,
            make_draft(model, tokenizer, draft, compile is True),
            draft_tokens,
            eos_id=tokenizer.eos_id,
            vocab_size=tokenizer.vocab_size,
            compile=compile is True,
            tokenizer=tokenizer,
        )
        return TextStream(speculative, _text_pieces(speculative))  # type: ignore[arg-type]
    decoder = Decoder(
        model,
        ids,
        cfg,
        tokenizer.eos_id,
        use_cache=use_cache,
        vocab_size=tokenizer.vocab_size,
        compile=compile,
        tokenizer=tokenizer,
    )
    return TextStream(decoder, _text_pieces(decoder, tool, tokenizer))
