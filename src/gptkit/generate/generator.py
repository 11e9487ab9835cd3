"""The decoding loop: prefill the prompts into a KV cache, then one token per step per row.

Two layers. :class:`Decoder` (made by :func:`generate_ids`) works on token ids: it batches
the prompts, applies the context policy, samples, and yields the new token of every active
row at each step; rows finish on their own (eos, length, or :meth:`Decoder.finish` from the
caller), and a finished row leaves the batch. :func:`generate` and :func:`stream` put text
around it: encoding, incremental decoding, stop strings, and streaming that never shows text
it may have to take back.

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
text depends on its prompt and the seed, not on which other prompts share its batch. The
global RNG is never used.

Compiled decoding (``compile=True``) speeds up single-prompt decoding. Each decode step
runs through ``torch.compile`` with the shapes held still, as gpt-fast does: the step attends
over every slot of the KV cache, and the position mask (slot <= position) hides the slots not
written yet, so step t and step t + 1 are the same graph. The cache length is rounded up to a
power of two or 1.5 times one (at least 256), so a few graphs serve all prompt lengths.
The first step on a cache goes through dynamo, whose guards choose the graph; the
steps after it call that graph's compiled function directly (dynamo's per-call guard checks
over some 360 weights cost 10% of a SmolLM2 int4 step). A single prompt's prefill compiles
too (its length symbolic); batched prefill, window slides and batches of more than one row
stay eager. The first step of a new
length pays the compilation (tens of seconds on a tiny model, minutes for a 135M one on 2 busy
cores; torch caches the result on disk); the tokens equal eager decoding's (tested).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from gptkit.config import SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate.sampling import sample_next, seen_mask
from gptkit.model import GPT, KVCache
from gptkit.tokenizer.base import Tokenizer

FinishReason = Literal["eos", "length", "stop"]
_REPLACEMENT = "\ufffd"  # what a decoder shows for the bytes of an unfinished UTF-8 character
_compiled_step: Any = None  # the torch.compile'd decode step, made on first use
_compiled_prefill: Any = None  # the torch.compile'd single-prompt prefill, made on first use


def _outside_caller() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this package."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
        "gptkit.generate"
    ):
        frame, level = frame.f_back, level + 1
    return level


class _StaticView(KVCache):
    """A KV cache as the compiled step sees it: every slot counts as written, so attention
    spans all ``max_len`` slots and the shapes never change; the position mask keeps each
    query to the slots it has written (see :class:`KVCache`)."""

    def __init__(self, cache: KVCache):  # no super().__init__: it shares cache's tensors
        self.k, self.v, self.pos = cache.k, cache.v, cache.pos
        self.max_len = cache.max_len
        self.length = cache.max_len - 1  # the step adds one token: all max_len slots


def _step(model: GPT, x: Tensor, cache: KVCache) -> Tensor:
    return model.hidden(x, cache)[:, -1]  # (B, C)


def compiled_cache_len(need: int) -> int:
    """The cache length compiled decoding allocates for ``need`` positions: at least 256, a
    power of two or 1.5 times one (256, 384, 512, 768, ...), so that a handful of lengths (one
    compilation each) serve every prompt. Every step attends over all the slots: against
    powers of two alone, the 1.5x steps cut a SmolLM2 int4 step by 8-12% where a prompt lands
    just above a power of two (200 prompt + 128 new tokens: 384 slots instead of 512)."""
    power = max(256, 1 << (need - 1).bit_length())
    return power * 3 // 4 if power > 256 and power * 3 // 4 >= need else power


@dataclass
class _Graph:
    """One compiled decode graph: the inductor function torch.compile made for it, and where
    each of its inputs comes from: ("x",), ("pos",), ("k", layer), ("v", layer), or
    ("model", module name, attribute) for a weight. ``sources`` is None where an input
    could not be traced to one of those; the graph is then only called through dynamo."""

    fn: Callable[..., Any]
    sources: list[tuple[Any, ...]] | None


# per thread: the call being compiled (model, x, view), and the graph that dynamo's last
# call ran (a server may decode in several threads)
_local = threading.local()
_bound: weakref.WeakKeyDictionary[KVCache, tuple[_Graph, list[Any], int, int]] = (
    weakref.WeakKeyDictionary()
)  # cache -> (graph, its input list with this cache's tensors, index of x, index of pos)


def _sources(inputs: Sequence[Any]) -> list[tuple[Any, ...]] | None:
    """Where each graph input of the step being compiled comes from (see :class:`_Graph`)."""
    model, x, view = _local.tracing
    where: dict[int, tuple[Any, ...]] = {id(x): ("x",), id(view.pos): ("pos",)}
    for layer, (k, v) in enumerate(zip(view.k, view.v, strict=True)):
        where[id(k)], where[id(v)] = ("k", layer), ("v", layer)
    for name, module in model.named_modules():
        tensors = dict(module._parameters) | dict(module._buffers) | vars(module)
        for attr, value in tensors.items():
            if isinstance(value, Tensor):
                where.setdefault(id(value), ("model", name, attr))
    found = [where.get(id(t)) for t in inputs]
    return None if any(f is None for f in found) else found  # type: ignore[misc]


def _capture(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
    """torch.compile backend: inductor (C++ wrapper), keeping the compiled function so that
    later steps can call it without dynamo's per-call guard checks."""
    from torch._inductor.compile_fx import compile_fx

    fn = compile_fx(gm, example_inputs, config_patches={"cpp_wrapper": True})
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    values = [n.meta.get("example_value") for n in outputs]
    two = len(values) == 2 and all(isinstance(v, Tensor) for v in values)
    shaped = two and values[0].dim() == 2 and values[1].dtype == torch.long  # (h, new pos)
    graph = _Graph(fn, _sources(example_inputs) if shaped else None)

    def run(*args: Any) -> Any:
        _local.last_run = graph
        return fn(*args)

    return run


def _bind(graph: _Graph, model: GPT, cache: KVCache) -> tuple[_Graph, list[Any], int, int]:
    """The graph's input list filled from ``model`` and ``cache`` (x and pos per step)."""
    assert graph.sources is not None
    args: list[Any] = []
    for source in graph.sources:
        if source[0] in ("x", "pos"):
            args.append(None)
        elif source[0] in ("k", "v"):
            args.append((cache.k if source[0] == "k" else cache.v)[source[1]])
        else:
            args.append(getattr(model.get_submodule(source[1]), source[2]))
    return graph, args, graph.sources.index(("x",)), graph.sources.index(("pos",))


def compiled_step(model: GPT, x: Tensor, cache: KVCache, trusted: bool = False) -> Tensor | None:
    """``model(x, cache)[:, -1]`` for x (B, 1), through ``torch.compile`` with fixed shapes
    (a graph per model, batch size and cache length); advances ``cache`` like the eager call.
    None, with the cache untouched, when torch will not compile another graph (its limit of
    graphs per function); decode eagerly then. The output head runs outside the graph, so
    any head works (a quantized one may call kernels torch.compile cannot trace).

    ``trusted``: the previous call had the same model and cache, with the same shapes. The
    first call on a cache goes through dynamo, whose guards pick (or compile) the graph that
    fits; trusted calls then run that graph's compiled function directly, with the inputs it
    was bound to, skipping dynamo's per-call work (checking some 360 weights against the
    graph's guards and fetching them: 0.7 ms of a 7.5 ms SmolLM2 int4 step). The graph's
    Python wrapper is C++ (``cpp_wrapper``), since launching some 300 kernels a step from
    Python costs more than a small model's arithmetic."""
    global _compiled_step
    bound = _bound.get(cache) if trusted else None
    if bound is not None:
        graph, args, ix, ipos = bound
        args[ix], args[ipos] = x, cache.pos
        h, cache.pos = graph.fn(*args)
        cache.length += x.shape[1]
        return model.lm_head(h)
    if _compiled_step is None:
        _compiled_step = torch.compile(_step, fullgraph=True, dynamic=False, backend=_capture)
    view = _StaticView(cache)
    stance = (
        torch.compiler.set_stance(skip_guard_eval_unsafe=True)
        if trusted
        else contextlib.nullcontext()
    )
    _local.tracing, _local.last_run = (model, x, view), None
    try:
        with stance:
            h = _compiled_step(model, x, view)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        _warn_recompile_limit("models or cache lengths", "decoding")
        return None
    finally:
        _local.tracing = None
    graph = _local.last_run
    if graph is not None and graph.sources is not None:
        _bound[cache] = _bind(graph, model, cache)
    cache.pos, cache.length = view.pos, cache.length + x.shape[1]
    return model.lm_head(h)


def compiled_prefill(model: GPT, x: Tensor, cache: KVCache) -> Tensor | None:
    """The last position's hidden state of ``model.hidden(x, cache)`` for one prompt x
    (1, T), through ``torch.compile`` with the prompt length symbolic (one graph serves every
    length); fills ``cache`` like the eager call. Compiling fuses the elementwise work
    (norms, rotary embeddings, activations, residual adds) that otherwise costs as much as a
    small model's matmuls. None when torch will not compile another graph; prefill eagerly
    then."""
    global _compiled_prefill
    if _compiled_prefill is None:
        _compiled_prefill = torch.compile(
            _step, fullgraph=True, dynamic=True, options={"cpp_wrapper": True}
        )
    torch._dynamo.maybe_mark_dynamic(x, 1)
    try:
        return _compiled_prefill(model, x, cache)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        _warn_recompile_limit("models", "prefilling")
        return None


def _warn_recompile_limit(what: str, doing: str) -> None:
    warnings.warn(
        f"torch.compile's recompile limit is reached (too many different {what} in one "
        f"process); {doing} eagerly",
        stacklevel=_outside_caller(),
    )


@dataclass(frozen=True)
class TokenEvent:
    """One new token of one row. ``finish_reason`` is set on the row's last event: "eos"
    (``token`` is the eos id, not part of the text) or "length" (``token`` is the last one)."""

    row: int
    token: int
    finish_reason: FinishReason | None = None


class Decoder:
    """Token-id decoding of a batch of prompts; iterate to get one step at a time.

    Each ``next()`` returns the :class:`TokenEvent` of every row that is still active, in row
    order. A row is done after an event with a ``finish_reason`` or after :meth:`finish`; it
    leaves the batch (and the KV cache) before the next step. Iteration ends when no row is
    left. Between steps the model is left as the caller had it (train/eval mode, autograd).

    Attributes:
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
        compile: bool = False,
    ):
        self.model, self.cfg = model, cfg
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.use_cache = use_cache
        self.compile = compile
        self._compiled_shape: tuple[int, int] | None = None  # (B, cache length) last compiled
        self.eos_id = eos_id if cfg.stop_at_eos else None
        V = self.config.vocab_size
        # A model's embedding may be padded past its tokenizer; never sample the padding ids.
        self.sample_vocab = min(V, vocab_size) if vocab_size else V
        self.window = self.config.block_size
        self.keep = max(1, self.window // 2)  # tokens left in the window after a slide

        self.context: list[list[int]] = []  # per row: the tokens in the model's window
        self.dropped: list[int] = []
        for i, p in enumerate(prompts):
            ids = [int(t) for t in p]
            if not ids:
                raise GptkitError(
                    f"prompt {i} has no tokens; give at least one (the text API starts an "
                    "empty prompt with the tokenizer's bos or eos token)"
                )
            bad = next((t for t in ids if not 0 <= t < V), None)
            if bad is not None:
                raise GptkitError(
                    f"prompt {i} holds token id {bad}, outside the model's vocabulary of {V}; "
                    "the tokenizer does not belong to this model"
                )
            self.context.append(self._fit(i, ids))
        n = len(self.context)
        self.prompt_tokens = [len(c) for c in self.context]
        self.finish_reasons: list[FinishReason | None] = [None] * n
        self.n_generated = [0] * n
        self.pending: list[int] = [0] * n  # per row: the sampled token not yet fed to the model
        self.active = list(range(n)) if cfg.max_new_tokens > 0 else []
        self._leaving: list[int] = []  # rows that finished and still occupy the batch
        self._forced: dict[int, deque[int]] = {}  # row -> ids to emit instead of sampling
        self._started = False
        self.cache: KVCache | None = None
        self._seen: Tensor | None = None  # (B, V) ids each active row holds, for the penalty

        if seeds is not None:
            if len(seeds) != n:
                raise GptkitError(f"got {len(seeds)} seeds for {n} prompts; give one per prompt")
            self._generators: list[torch.Generator] | torch.Generator = [
                self._new_generator(s) for s in seeds
            ]
        elif cfg.seed is not None:
            self._generators = [self._new_generator(cfg.seed) for _ in range(n)]
        else:
            self._generators = self._new_generator(None)

    # -- setup ---------------------------------------------------------------------------

    def _new_generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        if seed is None:
            g.seed()  # fresh entropy from the OS, not the global RNG
        else:
            g.manual_seed(seed)
        return g

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
            warnings.warn(
                f"prompt {i} has {len(ids)} tokens but the model's context is {bs}; dropped "
                f"the oldest {cut} tokens (context_policy='slide')",
                stacklevel=_outside_caller(),
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
        if self.finish_reasons[row] is None:
            self._leaving.append(row)
        # A stop string found in the last token outranks the "length" that token also set.
        self.finish_reasons[row] = reason

    def force(self, row: int, ids: Sequence[int]) -> None:
        """Make ``ids`` the next tokens of ``row`` instead of sampled ones (a tool's output,
        such as a calculator's result). They come as events like sampled tokens, count
        toward ``max_new_tokens``, and the model reads them as it would its own. Forcing a
        row that has finished does nothing."""
        if row not in self.active or self.finish_reasons[row] is not None:
            return
        bad = next((t for t in ids if not 0 <= int(t) < self.config.vocab_size), None)
        if bad is not None:
            raise GptkitError(
                f"cannot force token id {bad}: outside the model's vocabulary of "
                f"{self.config.vocab_size}"
            )
        if ids:
            self._forced.setdefault(row, deque()).extend(int(t) for t in ids)

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
                    if self.cfg.repetition_penalty != 1.0:
                        rows = [self.context[r] for r in self.active]
                        self._seen = seen_mask(rows, len(rows), self.sample_vocab, self.device)
                    logits = self._prefill() if self.use_cache else self._forward_window(False)
                else:
                    logits = self._decode() if self.use_cache else self._forward_window(True)
                tokens = self._sample(logits)
        finally:
            if was_training:
                model.train()
        return self._events(tokens)

    def _events(self, tokens: list[int]) -> list[TokenEvent]:
        events = []
        for row, tok in zip(self.active, tokens, strict=True):
            self.n_generated[row] += 1
            reason: FinishReason | None = None
            if self.eos_id is not None and tok == self.eos_id:
                reason = "eos"
            elif self.n_generated[row] >= self.cfg.max_new_tokens:
                reason = "length"
            if reason is not None:
                self.finish_reasons[row] = reason
                self._leaving.append(row)
            self.pending[row] = tok
            events.append(TokenEvent(row, tok, reason))
        return events

    def _sample(self, logits: Tensor) -> list[int]:
        logits = logits[:, : self.sample_vocab]  # (B, V')
        gens = self._generators
        if isinstance(gens, list):
            gens = [gens[r] for r in self.active]
        tokens = sample_next(logits, self._seen, self.cfg, gens)  # (B,)
        for b, r in enumerate(self.active):
            queue = self._forced.get(r)
            if queue:
                tokens[b] = queue.popleft()
                if not queue:
                    del self._forced[r]
        if self._seen is not None:
            self._seen[torch.arange(len(tokens), device=self.device), tokens] = True
        return tokens.tolist()

    def _drop_finished(self) -> None:
        """Take finished rows out of the batch, the cache and the penalty mask."""
        if not self._leaving:
            return
        gone = set(self._leaving)
        self._leaving.clear()
        for r in gone:
            self._forced.pop(r, None)
        keep = [b for b, r in enumerate(self.active) if r not in gone]
        self.active = [self.active[b] for b in keep]
        if not self.active or not self._started:
            return
        idx = torch.tensor(keep, device=self.device)
        if self._seen is not None:
            self._seen = self._seen[idx]
        if self.cache is not None:
            cache = self.cache
            cache.k = [k[idx] for k in cache.k]
            cache.v = [v[idx] for v in cache.v]
            cache.set_pos(cache.pos[idx])

    # -- the forward passes ----------------------------------------------------------------

    def _padded(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Right-padded ids (B, T) and lengths (B,)."""
        lengths = [len(r) for r in rows]
        x = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        return x.to(self.device), torch.tensor(lengths, device=self.device)

    def _last_logits(self, x: Tensor, lengths: Tensor, cache: KVCache | None) -> Tensor:
        """Logits (B, V) at each row's last real position; the head runs on B positions only."""
        h = self.model.hidden(x, cache)  # (B, T, C)
        last = h[torch.arange(h.shape[0], device=self.device), lengths - 1]  # (B, C)
        return self.model.lm_head(last)

    def _prefill(self) -> Tensor:
        rows = [self.context[r] for r in self.active]
        x, lengths = self._padded(rows)
        # Room for the longest prompt plus every token that will be fed back (the last
        # sampled token never is); past the context, the window slides instead.
        need = max(len(r) for r in rows) + self.cfg.max_new_tokens - 1
        if self.compile:
            need = compiled_cache_len(need)
        self.cache = KVCache(self.config, len(rows), need, self.device, self.dtype)
        h = compiled_prefill(self.model, x, self.cache) if self.compile and len(rows) == 1 else None
        if h is not None:
            logits = self.model.lm_head(h)
        else:
            logits = self._last_logits(x, lengths, self.cache)
        self.cache.set_pos(lengths)
        return logits

    def _slide(self, row: int) -> None:
        """Drop the oldest half of a full window; the pending token completes the new one."""
        ctx = self.context[row]
        self.context[row] = ctx[len(ctx) - (self.keep - 1) :] if self.keep > 1 else []

    def _decode(self) -> Tensor:
        cache = self.cache
        assert cache is not None
        full = [b for b, r in enumerate(self.active) if len(self.context[r]) >= cache.max_len]
        if full:
            self._refill(full)
        for r in self.active:
            self.context[r].append(self.pending[r])
        x = torch.tensor([self.pending[r] for r in self.active], device=self.device)
        if self.compile and len(self.active) == 1:  # batches stay eager: no graph per size
            shape = (1, cache.max_len)
            logits = compiled_step(self.model, x[:, None], cache, self._compiled_shape == shape)
            if logits is not None:
                self._compiled_shape = shape
                return logits
            self.compile = False
        return self.model(x[:, None], cache)[:, -1]  # (B, V)

    def _refill(self, batch_rows: list[int]) -> None:
        """Slide the windows of the given batch rows and re-prefill their kept tokens."""
        cache = self.cache
        assert cache is not None
        for b in batch_rows:
            self._slide(self.active[b])
        n = self.keep - 1
        idx = torch.tensor(batch_rows, device=self.device)
        if n > 0:
            sub = KVCache(self.config, len(batch_rows), n, self.device, self.dtype)
            x = torch.tensor([self.context[self.active[b]] for b in batch_rows])
            self.model.hidden(x.to(self.device), sub)  # only the keys and values are needed
            for layer in range(self.config.n_layer):
                cache.k[layer][idx, :, :n] = sub.k[layer]
                cache.v[layer][idx, :, :n] = sub.v[layer]
        pos = cache.pos.clone()
        pos[idx] = n
        cache.set_pos(pos)

    def _forward_window(self, feed: bool) -> Tensor:
        """The reference: a full forward over every active row's window, no cache."""
        if feed:  # the pending tokens join the windows, sliding them as the cache would
            for r in self.active:
                if len(self.context[r]) >= self.window:
                    self._slide(r)
                self.context[r].append(self.pending[r])
        rows = [self.context[r] for r in self.active]
        x, lengths = self._padded(rows)
        return self._last_logits(x, lengths, None)


def generate_ids(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    cfg: SampleConfig,
    eos_id: int | None = None,
    *,
    use_cache: bool = True,
    vocab_size: int | None = None,
    seeds: Sequence[int | None] | None = None,
    compile: bool = False,
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
        compile: run the decode steps through ``torch.compile`` (see the module docstring).

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


class Detokenizer:
    """Incremental text of one row: decodes new ids, cuts at stop strings, and releases only
    text that is final.

    Text is held back while it ends in an unfinished UTF-8 character (a byte-level decoder
    shows U+FFFD for it) or in a prefix of a stop string. Decoding re-reads only the ids since
    the last released boundary (plus one earlier stretch for context, for decoders that treat
    a leading space specially), never the whole continuation.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise GptkitError("a stop string must not be empty")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
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
        if new and self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = final = True
        end = len(self.text) if final else len(self.text) - self._held()
        piece = self.text[self._released : end] if end > self._released else ""
        self._released = max(self._released, end)
        return piece

    def _held(self) -> int:
        """Length of the longest end of the text that could begin a stop string."""
        text, held = self.text, 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held


def _text_pieces(
    decoder: Decoder,
    texts: list[Detokenizer],
    tool: Callable[[str], str | None] | None = None,
    tokenizer: Tokenizer | None = None,
) -> Iterator[tuple[int, str]]:
    """(row, text) pieces as the decoder produces tokens; empty pieces are skipped. With a
    ``tool``, a row's text is passed to it after every new token, and the text it returns
    (if any) is forced into that row next."""
    for events in decoder:
        for ev in events:
            text = texts[ev.row]
            piece = text.push(ev.token) if ev.finish_reason != "eos" else ""
            if text.stopped:
                decoder.finish(ev.row, "stop")
            elif ev.finish_reason is not None:
                piece += text.close()
            elif tool is not None and tokenizer is not None:
                forced = tool(text.text)
                if forced:
                    decoder.force(ev.row, tokenizer.encode(forced))
            if piece:
                yield ev.row, piece


def _start(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: list[str],
    cfg: SampleConfig,
    use_cache: bool,
    compile: bool = False,
) -> tuple[Decoder, list[Detokenizer]]:
    """Encode the prompts and set up the id loop and one text assembler per row."""
    ids = [tokenizer.encode_prompt(p) for p in prompts]
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    for i, p in enumerate(ids):
        if not p:
            if start is None:
                raise GptkitError(
                    f"prompt {i} is empty and the tokenizer has no bos or eos token to start "
                    "from; give a prompt of at least one token"
                )
            p.append(start)
    decoder = Decoder(
        model,
        ids,
        cfg,
        tokenizer.eos_id,
        use_cache=use_cache,
        vocab_size=tokenizer.vocab_size,
        compile=compile,
    )
    return decoder, [Detokenizer(tokenizer, cfg.stop) for _ in prompts]


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
    compile: bool = False,
    tool: Callable[[str], str | None] | None = None,
) -> str | list[str]:
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
            one-off compilation; see :mod:`gptkit.generate.generator`).
        tool: called with a row's text so far after every new token; a string it returns
            is encoded and written into that row next, in place of sampled tokens (for
            example :func:`gptkit.eval.calculator.calculator`). Its tokens count toward
            ``max_new_tokens``.

    Returns:
        The continuation, or a list of them for a list of prompts.
    """
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
    )
    parts: list[list[str]] = [[] for _ in prompts]
    for row, piece in pieces:
        parts[row].append(piece)
    out = ["".join(p) for p in parts]
    return out[0] if single else out


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
    compile: bool = False,
    tool: Callable[[str], str | None] | None = None,
) -> Iterator[Any]:
    """Like :func:`generate`, but yields the text as it comes: ``"".join(stream(...)) ==
    generate(...)`` for the same arguments. For a list of prompts it yields ``(index, piece)``
    tuples instead of strings. Bad arguments raise here, before the first piece."""
    cfg = SampleConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        stop_at_eos=stop_at_eos,
        context_policy=context_policy,  # type: ignore[arg-type]
    )
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    decoder, texts = _start(model, tokenizer, prompts, cfg, use_cache, compile)
    pieces = _text_pieces(decoder, texts, tool, tokenizer)
    return (piece for _, piece in pieces) if single else pieces
