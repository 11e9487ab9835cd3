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

``compile="auto"`` (:class:`AutoCompile`) compiles where it pays, as a ski rental (Karlin et
al. 1988): a model decodes eagerly, its eager steps timed, until the time compiling would
have saved on this model's eager single-row steps in this process, counting the tokens its
current call has still to decode, reaches the compilation's cost (:func:`compile_pays`):
cold with inductor's on-disk cache empty, much less when this process or an earlier one
compiled the same graph. Deterministic ski rental never pays more than twice the best
choice made knowing the future. For SmolLM2-135M int4 on 2 cores (the constants below), a
compiled step saves ~1 ms over the fused eager step (:mod:`gptkit.model.decode_step`): one
call stays eager; a session compiles after ~8,000 tokens when an earlier process compiled
the graphs, ~80,000 cold.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gptkit.model import GPT, KVCache
from gptkit.model.quant import INT4_GEMV, Int4Linear

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


# -- when compiling pays (compile="auto") ------------------------------------------------------

#: how much faster a compiled decode step is than an eager one, and what compiling a model's
#: decode step and prefill costs per layer, in seconds, with inductor's on-disk cache empty
#: ("cold") and holding the graphs ("warm": a second process), for a model whose step did not
#: compile in this process yet. SmolLM2-135M int4 (30 layers) on 2 cores, measured side by
#: side (bench/decode.py, 2026-12-07): 101 tokens/s compiled against 90 for the fused eager
#: step; the first call compiles in about 90 s cold and, measured side by side on a loaded
#: machine, a warm one costs a tenth of a cold one (68 s against 660 s).
SPEEDUP = 1.12
COMPILE_S_PER_LAYER = {"cold": 3.0, "warm": 0.3}
#: eager steps between two decisions, and before the first one on a model never timed
CHECK_EVERY = 16


def compiled_is_faster(model: GPT) -> bool:
    """Whether a compiled decode step beats the eager one on this CPU at all: not for int4
    layers where :data:`gptkit.model.quant.INT4_GEMV` holds (AVX2 without AVX-512), whose
    eager step runs every block in one call of ``int4_blocks`` (see ``decode_step``), where
    a compiled graph calls the kernels layer by layer."""
    return not (INT4_GEMV and any(isinstance(m, Int4Linear) for m in model.modules()))


def compile_pays(step_s: float | None, tokens: int, compile_s: float) -> bool:
    """Whether compiling has paid for itself: ``tokens`` eager steps of ``step_s`` seconds
    each (those this model already decoded eagerly in this process, and those its current
    call still has to) would save at least ``compile_s`` seconds at :data:`SPEEDUP`. False
    while no eager step was timed (``step_s`` None)."""
    return step_s is not None and tokens * step_s * (1 - 1 / SPEEDUP) >= compile_s


@dataclass
class _Use:
    """A model's eager single-row decoding in this process, and the cache lengths whose
    compiled step it has run."""

    steps: int = 0
    seconds: float = 0.0
    compiled: set[int] | None = None

    @property
    def step_s(self) -> float | None:
        return self.seconds / self.steps if self.steps else None


_uses: weakref.WeakKeyDictionary[GPT, _Use] = weakref.WeakKeyDictionary()


def _marker(model: GPT, cache_len: int) -> Path:
    """A file in inductor's on-disk cache whose presence says that some process compiled
    this model's graphs for ``cache_len`` (inductor's own keys are not public)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    layers = sorted({type(m).__name__ for m in model.modules()})
    what = f"{torch.__version__} {model.config.to_dict()} {layers} {cache_len}"
    key = hashlib.sha256(what.encode()).hexdigest()[:24]
    return Path(cache_dir()) / "gptkit" / f"decode-{key}"


def compile_cost(model: GPT, cache_len: int) -> float:
    """Seconds the first compiled call of ``model`` on a cache of ``cache_len`` would add:
    none where this process compiled it, warm where inductor's cache holds it, else cold."""
    use = _uses.get(model)
    if use is not None and use.compiled and cache_len in use.compiled:
        return 0.0
    warm = _marker(model, cache_len).exists()
    return COMPILE_S_PER_LAYER["warm" if warm else "cold"] * model.config.n_layer


class AutoCompile:
    """``compile="auto"`` for one decoding call of ``model`` (see the module docstring):
    :meth:`decide` before the prefill, then :meth:`eager_step` for each eager single-row
    step, which says when to switch to compiled steps. Only single rows on the CPU compile."""

    def __init__(self, model: GPT):
        self.model = model
        self.use = _uses.setdefault(model, _Use())
        self.cpu = next(model.parameters()).device.type == "cpu"
        self.faster = compiled_is_faster(model)

    def decide(self, batch: int, tokens_left: int, cache_len: int) -> bool:
        """Whether to compile from now on, for a call with ``tokens_left`` steps to go."""
        if batch != 1 or not self.cpu or not self.faster:
            return False
        cost = compile_cost(self.model, cache_len)
        return cost == 0 or compile_pays(self.use.step_s, self.use.steps + tokens_left, cost)

    def eager_step(
        self, step: Callable[[], Tensor], tokens_left: int, cache_len: int
    ) -> tuple[Tensor, bool]:
        """Run and time one eager single-row step; its logits, and whether to compile the
        next ones."""
        t0 = time.perf_counter()
        logits = step()
        self.use.seconds += time.perf_counter() - t0
        self.use.steps += 1
        check = self.use.steps % CHECK_EVERY == 0
        return logits, check and self.decide(1, tokens_left, cache_len)


def note_compiled(model: GPT, cache_len: int) -> None:
    """Note that a compiled step of ``model`` ran on a cache of ``cache_len``: in this
    process (compiling it again is free) and in inductor's on-disk cache (for the next)."""
    use = _uses.setdefault(model, _Use())
    if use.compiled is None:
        use.compiled = set()
    if cache_len not in use.compiled:
        use.compiled.add(cache_len)
        with contextlib.suppress(OSError):
            marker = _marker(model, cache_len)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
