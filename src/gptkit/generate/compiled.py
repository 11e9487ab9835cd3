"""Compiled decoding: the decode step and the single-prompt prefill through ``torch.compile``.

These are fast implementations of the core's two forwards (:mod:`gptkit.generate.core`),
tested token for token against the eager ones. Each decode step runs with the shapes held
still, as gpt-fast does: the step attends over every slot of the KV cache, and the position
mask (slot <= position) hides the slots not written yet, so step t and step t + 1 are the
same graph. The cache length is rounded up to a power of two or 1.5 times one (at least
256), so a few graphs serve all prompt lengths. The first step on a cache goes through
dynamo, whose guards choose the graph; the steps after it call that graph's compiled
function directly (dynamo's per-call guard checks over some 360 weights cost 10% of a
SmolLM2 int4 step). A single prompt's prefill compiles too (its length symbolic). The first
step of a new length pays the compilation (tens of seconds on a tiny model, minutes for a
135M one on 2 busy cores; torch caches the result on disk).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gptkit.model import GPT, KVCache

_compiled_step: Any = None  # the torch.compile'd decode step, made on first use
_compiled_prefill: Any = None  # the torch.compile'd single-prompt prefill, made on first use


def warn_at_caller(message: str) -> None:
    """Warn, pointing the warning at the first caller outside :mod:`gptkit.generate`."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
        "gptkit.generate"
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


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
    view = cache.static()
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
    warn_at_caller(
        f"torch.compile's recompile limit is reached (too many different {what} in one "
        f"process); {doing} eagerly"
    )
