"""Speculative decoding: a cheap draft proposes tokens, the model checks them in one forward.

References: Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative
Decoding") and Chen et al. 2023 ("Accelerating Large Language Model Decoding with
Speculative Sampling") for the rejection rule; Saxena 2023 ("Prompt Lookup Decoding") for
the draft that needs no model. One round, for a sequence whose last token ``x`` is not yet
in the model's KV cache::

    draft:   x ─► d1 ─► d2 ─► ... ─► dk            k cheap proposals (q1 ... qk)
    target:  [x d1 ... dk] in one forward  ─► p0 ... pk  (k + 1 next-token distributions)
    accept:  d(i+1) stands with probability min(1, p_i / q_i) at its id, in order;
             at the first rejection one draw from norm(max(0, p_i - q_i)) replaces it;
             when all k stand, one bonus draw from p_k
    rewind:  both KV caches forget the rejected tokens (KVCache.rewind)

A round yields between 1 and k + 1 tokens for one forward of the model. The tokens are
distributed exactly as the model's own samples (Leviathan et al., appendix A.1). p and q
are the distributions plain sampling draws from: the logits through temperature, top-k,
top-p and min-p (:func:`distribution`), applied alike to both, so the output follows the model's
*filtered* distribution, as plain sampling does. Greedy decoding (temperature 0) is the
same rule with one-hot p and q: a proposal stands when it is the model's argmax, so the
tokens are the model's own greedy tokens.

Drafts (:func:`make_draft`): a smaller model with the same tokenizer, ``"int4"`` (the model
itself quantized to int4 on a copy: a draft for anyone with one checkpoint), and
``"lookup"`` (the continuation of the latest earlier occurrence of the context's last
n-gram; no model). A speculative decoder runs one sequence: a list of prompts is decoded one
by one. The penalties (repetition, presence, frequency) change with every drafted token and
are refused, as are structured output, a tool, and a prompt that with ``max_new_tokens``
does not fit the model's context (the window never slides here). With ``compile``, the
single-token forwards (the draft's steps) go through
:func:`~gptkit.generate.compiled.compiled_step` and the model's check of up to k + 1 tokens
through :func:`compiled_verify`.
"""

from __future__ import annotations

import contextlib
import copy
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.config import SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate.compiled import compiled_cache_len, compiled_step, warn_at_caller
from gptkit.generate.core import FinishReason, Row, TokenEvent, check_prompt, prefill
from gptkit.generate.logprobs import TokenLogprob, token_logprob
from gptkit.generate.sampling import filtered_probs
from gptkit.model import GPT, KVCache
from gptkit.model.quant import BF16Linear, quantization, quantize
from gptkit.tokenizer.base import Tokenizer

#: what ``draft=`` takes: a model, "int4", "lookup", or any source ``checkpoint.load`` reads
DraftSource = GPT | str | Path

# -- the rejection rule ---------------------------------------------------------------------


def distribution(logits: Tensor, cfg: SampleConfig) -> Tensor:
    """The probabilities (N, V) plain sampling draws the next token from, for logits (N, V):
    temperature, top-k, top-p, min-p and softmax, in the order of
    :func:`~gptkit.generate.sampling.sample_next`; one-hot at the argmax when greedy."""
    logits = logits.float()
    if cfg.temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return filtered_probs(logits, cfg)


def accept(
    p: Tensor, drafted: Sequence[int], q: Tensor | None, generator: torch.Generator
) -> tuple[int, int]:
    """One round of speculative sampling (Leviathan et al. 2023, algorithm 1).

    Args:
        p: (n + 1, V) the model's distributions before each drafted token and after the last.
        drafted: the n proposed ids.
        q: (n, V) the draft's distributions they were drawn from (None when n is 0).
        generator: the sequence's random source.

    Returns:
        How many proposals stand, and the model's own token after them.
    """
    for i, d in enumerate(drafted):
        assert q is not None
        r = float(torch.rand((), generator=generator, device=p.device))
        if r * float(q[i, d]) < float(p[i, d]):  # r < p/q without dividing by q
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: nothing is left over
            residual = p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(drafted), int(torch.multinomial(p[-1], 1, generator=generator))


# -- a model over its own cache ---------------------------------------------------------------

_compiled_verify: Any = None  # the torch.compile'd multi-token forward, made on first use


def _hidden(model: GPT, x: Tensor, cache: KVCache) -> Tensor:
    return model.hidden(x, cache)


def compiled_verify(model: GPT, x: Tensor, cache: KVCache) -> Tensor | None:
    """``model.hidden(x, cache)[0]`` (T, C) for x (1, T) through ``torch.compile``, with the
    shapes held still as :func:`~gptkit.generate.compiled.compiled_step` holds them: the
    forward attends over every slot of the cache and the position mask hides those not
    written yet (a graph per T and cache length). None, with the cache untouched, when torch
    will not compile another graph."""
    global _compiled_verify
    if _compiled_verify is None:
        _compiled_verify = torch.compile(
            _hidden, fullgraph=True, dynamic=False, options={"cpp_wrapper": True}
        )
    view = copy.copy(cache)
    view.length = cache.max_len - x.shape[1]  # every slot, T of them new
    try:
        h = _compiled_verify(model, x, view)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        warn_at_caller("torch.compile's recompile limit is reached; verifying eagerly")
        return None
    cache.set_pos(view.pos)
    return h[0]


class CachedModel:
    """A model and a batch-1 KV cache of its own, fed a few tokens at a time (the model being
    decoded and a model draft are both one).

    Args:
        model: the GPT.
        max_len: positions the cache must hold.
        compile: single tokens go through ``compiled_step``, and 2 to ``verify_len``
            tokens at once through :func:`compiled_verify` (padded to ``verify_len``).
        verify_len: the most tokens fed at once (the model's k + 1).
    """

    def __init__(self, model: GPT, max_len: int, compile: bool = False, verify_len: int = 0):
        param = next(model.parameters())
        self.model, self.compile, self.verify_len = model, compile, verify_len
        if compile:
            max_len = compiled_cache_len(max_len)
        self.cache = KVCache(model.config, 1, max_len, param.device, param.dtype)
        self._trusted = False  # compiled_step has run on this cache: skip dynamo's guards

    @property
    def length(self) -> int:
        """How many tokens the cache holds."""
        return self.cache.length

    def start(self, ids: Sequence[int]) -> None:
        """Prefill ``ids`` (may be empty) into the empty cache."""
        if ids:
            prefill(self.model, [ids], self.cache, compile=self.compile)

    def feed(self, ids: Sequence[int], every: bool = False) -> Tensor:
        """Logits after feeding ``ids`` into the cache: (len(ids), V) with ``every``, else
        (1, V) at the last of them."""
        x = torch.tensor([list(ids)], device=self.cache.pos.device)  # (1, T)
        if self.compile and len(ids) == 1:
            logits = compiled_step(self.model, x, self.cache, self._trusted)
            if logits is not None:
                self._trusted = True
                return logits
            self.compile = False
        if self.compile and not every:  # a draft catching up: one step per token
            for t in ids[:-1]:
                self.feed([t])
            return self.feed(ids[-1:])
        h = self._verify(x) if self.compile else None
        if h is None:
            h = self.model.hidden(x, self.cache)[0]  # (T, C)
        return self.model.lm_head(h if every else h[-1:])

    def _verify(self, x: Tensor) -> Tensor | None:
        """Hidden states (T, C) of x (1, T) through :func:`compiled_verify`, x padded to
        ``verify_len`` tokens so that one graph serves every T up to it (the padding's
        slots are forgotten at once, and causal attention keeps them from the real
        tokens); None where that does not fit the cache or torch compiles no more."""
        T, held = x.shape[1], self.length
        if not 1 < T <= self.verify_len or held + self.verify_len > self.cache.max_len:
            return None
        h = compiled_verify(self.model, F.pad(x, (0, self.verify_len - T)), self.cache)
        if h is None:
            return None
        self.cache.rewind(held + T)
        return h[:T]


@contextlib.contextmanager
def _evaluating(model: GPT) -> Iterator[None]:
    """Eval mode and no autograd for a round; the model is left as the caller had it."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


# -- drafts -----------------------------------------------------------------------------------


class Draft(Protocol):
    """What proposes tokens: :meth:`start` once per sequence, then per round :meth:`propose`
    and :meth:`rewind`."""

    def start(self, prompt: list[int], max_len: int) -> None: ...

    def propose(
        self, context: list[int], k: int, cfg: SampleConfig, generator: torch.Generator, vocab: int
    ) -> tuple[list[int], Tensor]:
        """Up to k ids to follow ``context``, and the distributions (n, V) drawn from."""
        ...

    def rewind(self, length: int) -> None:
        """Only ``context[:length]`` stands; forget what came after it."""
        ...


class ModelDraft:
    """A model proposing by plain sampling (by ``cfg``) over a KV cache of its own."""

    def __init__(self, model: GPT, compile: bool = False):
        self.model, self.compile = model, compile
        self.runner: CachedModel | None = None

    def start(self, prompt: list[int], max_len: int) -> None:
        if len(prompt) > self.model.config.block_size:
            raise GptkitError(
                f"the prompt has {len(prompt)} tokens, more than the draft's context of "
                f"{self.model.config.block_size}; use a shorter prompt or another draft"
            )
        self.runner = CachedModel(self.model, max_len, self.compile)
        with _evaluating(self.model):
            self.runner.start(prompt[:-1])

    def propose(
        self, context: list[int], k: int, cfg: SampleConfig, generator: torch.Generator, vocab: int
    ) -> tuple[list[int], Tensor]:
        runner = self.runner
        assert runner is not None
        k = min(k, runner.cache.max_len - len(context) + 1)  # d1..d(k-1) enter the cache
        feed = context[runner.length :]  # the tokens the last round left out
        tokens: list[int] = []
        qs: list[Tensor] = [torch.zeros(0, vocab, device=generator.device)]
        with _evaluating(self.model):
            for _ in range(k):
                q = distribution(runner.feed(feed)[:, :vocab], cfg)  # (1, V)
                feed = [int(torch.multinomial(q, 1, generator=generator))]
                tokens.append(feed[0])
                qs.append(q)
        return tokens, torch.cat(qs)

    def rewind(self, length: int) -> None:
        assert self.runner is not None
        self.runner.cache.rewind(length)


class LookupDraft:
    """Prompt lookup decoding (Saxena 2023): the tokens that followed the latest earlier
    occurrence of the context's last n tokens, n from ``max_ngram`` down to 1, looked up
    again on the extended context until k are found or nothing matches. No model: the
    proposals are certain (one-hot q). It pays off where the output copies its input
    (summaries, code edits, quotations)."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def start(self, prompt: list[int], max_len: int) -> None:
        pass

    def propose(
        self, context: list[int], k: int, cfg: SampleConfig, generator: torch.Generator, vocab: int
    ) -> tuple[list[int], Tensor]:
        tokens: list[int] = []
        while len(tokens) < k:
            more = self.match(context + tokens, k - len(tokens))
            if not more:
                break
            tokens += more
        ids = torch.tensor(tokens, dtype=torch.long, device=generator.device)
        return tokens, F.one_hot(ids, vocab).float()

    def match(self, context: list[int], k: int) -> list[int]:
        """Up to k tokens after the latest earlier occurrence of the longest matching tail."""
        L = len(context)
        for n in range(min(self.max_ngram, L - 1), 0, -1):
            tail = context[L - n :]
            for start in range(L - n - 1, -1, -1):  # latest first; something must follow
                if context[start + n - 1] == tail[-1] and context[start : start + n] == tail:
                    return context[start + n : start + n + k]
        return []

    def rewind(self, length: int) -> None:
        pass


def int4_draft(model: GPT) -> GPT:
    """``model`` quantized to int4 (group 32) on a deep copy that shares nothing with it: a
    draft of itself. A bf16-quantized model is widened back to Linear layers first (bf16
    weights are exact in fp32); an int8 or int4 model has nothing cheaper to draft with."""
    done = quantization(model)
    if done is not None and done.mode != "bf16":
        raise GptkitError(
            f"the model is already quantized ({done.mode}); an int4 self-draft needs a "
            "full-precision or bf16 model (load it without quantize=, or with quantize='bf16')"
        )
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, BF16Linear):
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None)
            linear.weight = nn.Parameter(module.weight.float(), requires_grad=False)
            if module.bias is not None:
                linear.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, linear)
    return quantize(twin, "int4")


def make_draft(
    model: GPT, tokenizer: Tokenizer, draft: DraftSource | Draft, compile: bool = False
) -> Draft:
    """The draft ``draft`` names: a GPT (its vocabulary must cover the tokenizer's),
    ``"int4"`` (:func:`int4_draft`), ``"lookup"`` (:class:`LookupDraft`), a :class:`Draft`,
    or any source :func:`gptkit.checkpoint.load` reads, whose tokenizer must equal
    ``tokenizer``."""
    if isinstance(draft, GPT):
        if draft.config.vocab_size < tokenizer.vocab_size:
            raise GptkitError(
                f"the draft model's vocabulary ({draft.config.vocab_size} ids) is smaller "
                f"than the tokenizer's ({tokenizer.vocab_size}); a draft must share the "
                "model's tokenizer"
            )
        return ModelDraft(draft, compile)
    if draft == "lookup":
        return LookupDraft()
    if draft == "int4":
        return ModelDraft(int4_draft(model), compile)
    if not isinstance(draft, (str, Path)):
        return draft
    from gptkit.checkpoint import load

    net, draft_tok = load(draft, device=next(model.parameters()).device)
    if draft_tok is not None and draft_tok.hash != tokenizer.hash:
        raise GptkitError(
            f"the draft {draft} has another tokenizer ({draft_tok!r}, hash {draft_tok.hash}) "
            f"than the model ({tokenizer!r}, hash {tokenizer.hash}); a draft must share the "
            "model's tokenizer"
        )
    return make_draft(model, tokenizer, net, compile)


# -- decoding ---------------------------------------------------------------------------------


class SpeculativeDecoder:
    """Token-id decoding of prompts with a draft, one prompt after the other; iterate for
    one :class:`TokenEvent` per ``next()`` (in a list, as the batch
    :class:`~gptkit.generate.generator.Decoder` gives them).

    A round's tokens come out one at a time; :meth:`finish` (a stop string) ends the row and
    drops the rest of its round, so eos, ``max_new_tokens`` and stop strings end the text
    where plain decoding ends it. With ``cfg.logprobs`` each token is scored under the
    model's raw logits at its position, as plain decoding scores it. ``drafted`` and
    ``accepted`` count the proposals and those that stood, ``rounds`` the model's forwards
    after its prefills.

    Args:
        model: the GPT to decode (the target).
        prompts: one list of ids per row.
        cfg: sampling settings and ``max_new_tokens`` (no penalties, no grammar).
        draft: the proposer (see :func:`make_draft`).
        draft_tokens: k, the proposals per round.
        eos_id, vocab_size, compile, tokenizer: as for the Decoder.
    """

    def __init__(
        self,
        model: GPT,
        prompts: Sequence[Sequence[int]],
        cfg: SampleConfig,
        draft: Draft,
        draft_tokens: int = 4,
        *,
        eos_id: int | None = None,
        vocab_size: int | None = None,
        compile: bool = False,
        tokenizer: Tokenizer | None = None,
    ):
        if draft_tokens < 1:
            raise GptkitError(f"draft_tokens must be at least 1, got {draft_tokens}")
        if cfg.repetition_penalty != 1.0 or cfg.presence_penalty or cfg.frequency_penalty:
            raise GptkitError(
                "speculative decoding takes no repetition, presence or frequency penalty "
                "(they change with every drafted token); drop the penalty or the draft"
            )
        V, block = model.config.vocab_size, model.config.block_size
        self.model, self.cfg, self.draft, self.k = model, cfg, draft, draft_tokens
        self.compile = compile
        self.sample_vocab = min(V, vocab_size) if vocab_size else V
        device = next(model.parameters()).device
        self.rows: list[Row] = []
        for i, p in enumerate(prompts):
            ids = check_prompt(i, p, V)
            if len(ids) + cfg.max_new_tokens > block:
                raise GptkitError(
                    f"prompt {i} has {len(ids)} tokens and max_new_tokens is "
                    f"{cfg.max_new_tokens}: more than the model's context of {block}; "
                    "speculative decoding does not slide the window, so shorten one or "
                    "decode without a draft"
                )
            row = Row(
                ids,
                cfg,
                device=device,
                vocab_size=self.sample_vocab,
                eos_id=eos_id,
                tokenizer=tokenizer,
            )
            if getattr(row, "constraint", None) is not None:
                raise GptkitError("structured output and a draft do not combine; drop one")
            self.rows.append(row)
        self.current = 0  # the row being decoded
        self.context: list[int] = []  # its prompt and every token decoded so far
        self.queue: deque[tuple[int, TokenLogprob | None]] = deque()  # decoded, not handed out
        self.target: CachedModel | None = None  # the model over the current row's cache
        self.drafted = self.accepted = self.rounds = 0

    def __iter__(self) -> SpeculativeDecoder:
        return self

    def __next__(self) -> list[TokenEvent]:
        while self.current < len(self.rows) and self._done(self.rows[self.current]):
            self.current, self.target = self.current + 1, None
            self.queue.clear()
        if self.current == len(self.rows):
            raise StopIteration
        row = self.rows[self.current]
        if not self.queue:
            with _evaluating(self.model):
                self._round(row)
        token, score = self.queue.popleft()
        reason = row.record(token)
        if score is not None:
            row.scores.append(score)
        return [TokenEvent(self.current, token, reason)]

    def _done(self, row: Row) -> bool:
        return row.finish_reason is not None or self.cfg.max_new_tokens <= 0

    def finish(self, row: int, reason: FinishReason = "stop") -> None:
        """End ``row`` from outside (a stop string); no more events come for it."""
        if row < self.current:
            return
        self.rows[row].finish_reason = reason
        if row == self.current:
            self.queue.clear()

    @property
    def acceptance_rate(self) -> float:
        """The share of proposals that stood (0 before any)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def _round(self, row: Row) -> None:
        cfg = self.cfg
        if self.target is None:  # the row's first round: prefill all but its last token
            self.context = list(row.context)
            need = len(self.context) + cfg.max_new_tokens - 1  # the last is never fed
            self.target = CachedModel(self.model, need, self.compile, self.k + 1)
            self.target.start(self.context[:-1])
            self.draft.start(self.context, need)
        ctx = self.context
        # No proposal past max_new_tokens, nor past the cache (it takes ctx[-1] and them).
        room = self.target.cache.max_len - len(ctx)
        k = min(self.k, cfg.max_new_tokens - len(row.generated) - 1, room)
        drafted: list[int] = []
        q = None
        if k > 0:
            drafted, q = self.draft.propose(ctx, k, cfg, row.generator, self.sample_vocab)
        logits = self.target.feed([ctx[-1], *drafted], every=True)[:, : self.sample_vocab]
        n, token = accept(distribution(logits, cfg), drafted, q, row.generator)
        new = [*drafted[:n], token]
        for i, t in enumerate(new):
            score = token_logprob(logits[i], t, cfg.logprobs) if cfg.logprobs is not None else None
            self.queue.append((t, score))
        ctx.extend(new)
        self.target.cache.rewind(len(ctx) - 1)  # all but the newest token are in the cache
        self.draft.rewind(len(ctx) - 1)
        self.drafted += len(drafted)
        self.accepted += n
        self.rounds += 1
