"""The serving engine: one worker loop owns the model and decodes every request together
(:meth:`Engine.run` in the calling thread, as ``gptkit serve`` runs it in its main thread, or
:meth:`Engine.start` in a thread of its own).

Continuous batching (Yu et al. 2022, "Orca"; vLLM's scheduler is the reference design): the
batch is re-formed at every token boundary. A request that arrives while others are decoding
is prefilled on its own and joins the batch at the next step; a request that finishes (eos,
stop string, length, or a client that went away) leaves it at once. Throughput therefore
grows with concurrency, because a decode step costs about the same for 1 row as for 16 on a
CPU: it is bound by reading the weights, not by the arithmetic.

The KV cache is one pool of ``max_batch`` rows. The active rows are kept packed at the
front, so the model always sees plain tensor views of the pool and nothing is copied per
step::

    pool rows:  [ r0 | r1 | r2 | r3 | free | free ]      active = 4, views = pool[:4]
    r1 leaves:  [ r0 | r3 | r2 | free | ... ]            r3's row is copied into r1's slot
    r4 joins:   [ r0 | r3 | r2 | r4 | free | ... ]       prefilled into pool[3:4]

Each row keeps its own position (``KVCache.pos``), so rows of different lengths decode in
one forward: a query attends to the slots up to its own position only. The pool's length
grows by doubling as rows need it, up to the context, so idle capacity costs no memory.

With ``compile=True`` (the server's default), a step with one active row runs through the
compiled decode step of :mod:`gptkit.generate.compiled` (the bulk of requests when clients
come one at a time). Its graph is made per pool length in a background thread, on a scratch
cache of the same shape, while the engine keeps decoding eagerly: no request waits for a
compilation, and the step switches once the graph is ready.

The engine adds only scheduling to the decoding core (:mod:`gptkit.generate.core`): each
request is a core :class:`~gptkit.generate.core.Row` (its own SampleConfig, seed, penalties,
stop strings and streaming text), and the prefill, step and sampling are the core's. It
knows no HTTP: :meth:`Engine.submit` takes token ids and a SampleConfig and returns a
:class:`Request` whose chunks are read by a thread (``for chunk in request``) or by asyncio
code (``async for chunk in request``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gptkit.config import SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate.compiled import compiled_is_faster, compiled_step
from gptkit.generate.core import Row, prefill, step
from gptkit.model import GPT, KVCache
from gptkit.tokenizer.base import Tokenizer


class EngineError(GptkitError):
    """A request the engine cannot take or could not finish."""


class QueueFull(EngineError):
    """Every batch row is busy and the waiting line is full; retry later."""


class EngineStopped(EngineError):
    """The engine is not running (not started yet, or shutting down)."""


class PromptTooLong(EngineError):
    """The prompt leaves no room in the model's context for a reply."""


@dataclass
class Chunk:
    """One streamed piece of one request."""

    text: str  # text that became final with this step (may be "")
    finish_reason: str | None  # set on the last chunk: "stop" (eos or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int  # tokens generated so far


_END = object()  # the sentinel after a request's last chunk


class Request(Row):
    """A submitted generation: a :class:`~gptkit.generate.core.Row` of the decoding core
    that streams its text to a reader. Iterate it (from a thread, or with ``async for`` from
    the event loop that submitted it) to get its :class:`Chunk` s; :meth:`cancel` stops it."""

    def __init__(self, prompt_ids: list[int], params: SampleConfig, engine: Engine):
        super().__init__(
            prompt_ids,
            params,
            device=engine.device,
            vocab_size=engine.vocab,
            eos_id=engine.eos_id,
            tokenizer=engine.tokenizer,
        )
        self.error: Exception | None = None
        self.cancelled = False
        self._read_all = False  # the reader has seen the end; a second pass yields nothing
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue[object] | None = None
        with contextlib.suppress(RuntimeError):  # not inside an event loop: thread readers
            self._loop = asyncio.get_running_loop()
            self._aqueue = asyncio.Queue()

    def cancel(self) -> None:
        """Stop generating (the client went away); iteration ends after what was sent."""
        self.cancelled = True

    # -- the worker's side -------------------------------------------------------------

    def _put(self, item: object) -> None:
        if self._loop is not None and self._aqueue is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
        else:
            self._queue.put(item)

    def _emit(self, text: str) -> None:
        reason = "stop" if self.finish_reason == "eos" else self.finish_reason
        self._put(Chunk(text, reason, self.prompt_tokens, len(self.generated)))

    def _end(self, error: Exception | None = None) -> None:
        self.error = error
        self._put(_END)

    # -- the reader's side -------------------------------------------------------------

    def __iter__(self) -> Iterator[Chunk]:
        if self._aqueue is not None:
            raise EngineError("this request was submitted from an event loop; use async for")
        while not self._read_all:
            item = self._queue.get()
            if item is _END:
                self._read_all = True
                break
            assert isinstance(item, Chunk)
            yield item
        if self.error is not None:
            raise self.error

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        if self._aqueue is None:
            raise EngineError("this request was submitted outside an event loop; use for")
        while not self._read_all:
            item = await self._aqueue.get()
            if item is _END:
                self._read_all = True
                break
            assert isinstance(item, Chunk)
            yield item
        if self.error is not None:
            raise self.error


@dataclass
class EngineStats:
    """Counters since the engine started (read them from any thread)."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0  # decode forwards
    max_active: int = 0  # the largest batch seen
    failed: int = 0
    waiting: int = 0
    active: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Engine:
    """Continuous-batching generation over one model; see the module docstring.

    Args:
        model: the GPT (any family gptkit loads); it is put in eval mode.
        tokenizer: its tokenizer (decodes the text, gives the eos id).
        max_batch: at most this many requests decode together.
        max_queue: at most this many requests wait for a row; more raise :class:`QueueFull`.
        max_context: use at most this many positions of the model's context.
        compile: run single-row steps compiled, once each pool length's graph is compiled
            (in a background thread; see the module docstring), where a compiled step is
            faster (:func:`~gptkit.generate.compiled.compiled_is_faster`).
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        max_context: int | None = None,
        compile: bool = False,
    ):
        if max_batch < 1 or max_queue < 0:
            raise EngineError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = model.config
        self.context = min(self.config.block_size, max_context or self.config.block_size)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos_id = tokenizer.eos_id
        # A model's embedding may be padded past its tokenizer; never sample the padding ids.
        self.vocab = min(self.config.vocab_size, tokenizer.vocab_size)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.stats = EngineStats()

        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[Request] = []  # the active requests; row b of the pool is _rows[b]
        self._pool: KVCache | None = None  # max_batch rows, made on the first request
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running = False
        self._thread: threading.Thread | None = None
        self.compile = compile and compiled_is_faster(model)
        self._graphs: dict[int, threading.Thread | None] = {}  # pool length -> compiling, or ready

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (once)."""
        with self._lock:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._work, name="gptkit-engine", daemon=True)
        self._thread.start()

    def run(self, ready: Callable[[], object] | None = None) -> None:
        """The worker loop in the calling thread, until :meth:`stop` or :meth:`shutdown` from
        another thread (or an exception such as Ctrl-C here); ``ready`` is called once the
        engine takes requests (start the threads that submit them there).

        ``gptkit serve`` runs it in its main thread, where the model was loaded: torch's
        OpenMP threads belong to the thread that starts a parallel region, and while one
        thread's team exists another thread's regions run about 2x slower on 2 cores
        (libgomp throttles when it manages more threads than there are cores)."""
        with self._lock:
            if self._running:
                raise EngineError("the engine is already running")
            self._running = True
        if ready is not None:
            ready()
        self._work()

    def stop(self) -> None:
        """Ask the worker loop to return after its current step."""
        with self._wake:
            self._running = False
            self._wake.notify_all()

    def shutdown(self) -> None:
        """Stop the worker; requests still running or waiting end with an error."""
        self.stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for req in [*self._rows, *self._waiting]:
            req._end(EngineStopped("the server is shutting down"))
        self._rows = []
        self._waiting.clear()

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- requests ----------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SampleConfig) -> Request:
        """Queue a generation and return its :class:`Request` at once.

        Raises:
            PromptTooLong: the prompt fills the context (the message gives the numbers).
            QueueFull: too many requests are waiting.
            EngineError: an empty prompt or ids outside the vocabulary.
        """
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise EngineError("the prompt has no tokens; send at least one")
        bad = next((t for t in ids if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise EngineError(f"token id {bad} is outside the vocabulary of {self.vocab}")
        if len(ids) >= self.context:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens but the model's context is {self.context} "
                "tokens, which must hold the prompt and at least one new token; shorten the "
                "prompt"
            )
        room = self.context - len(ids)
        if params.max_new_tokens > room:  # the context ends the reply: finish_reason "length"
            params = params.replace(max_new_tokens=room)
        req = Request(ids, params, self)
        with self._wake:
            if not self._running:
                raise EngineStopped("the engine is not running; call start() first")
            free = self.max_batch - len(self._rows)
            if len(self._waiting) >= self.max_queue + max(0, free):
                raise QueueFull(
                    f"{len(self._rows)} requests are running and {len(self._waiting)} are "
                    "waiting, the most this server takes; retry later"
                )
            self._waiting.append(req)
            self.stats.requests += 1
            self.stats.waiting = len(self._waiting)
            self._wake.notify()
        return req

    def generate(self, prompt_ids: list[int], params: SampleConfig) -> tuple[str, Chunk]:
        """Submit from a thread and wait: the whole text and the last chunk (usage, reason)."""
        parts, last = [], None
        for chunk in self.submit(prompt_ids, params):
            parts.append(chunk.text)
            last = chunk
        assert last is not None
        return "".join(parts), last

    # -- the worker --------------------------------------------------------------------

    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while self._running and not self._rows and not self._waiting:
                        # a timeout, so that Ctrl-C reaches the loop in the main thread: a
                        # signal that the kernel hands to another thread wakes no lock wait
                        self._wake.wait(timeout=0.25)
                    if not self._running:
                        return
                    free = self.max_batch - len(self._rows)
                    joining = [
                        self._waiting.popleft() for _ in range(min(free, len(self._waiting)))
                    ]
                    self.stats.waiting = len(self._waiting)
                joining = [r for r in joining if not self._skip_cancelled(r)]
                if joining:
                    self._admit(joining)
                if self._rows:
                    self._step()
                self.stats.active = len(self._rows)

    def _skip_cancelled(self, req: Request) -> bool:
        if req.cancelled:
            req._end()
        return req.cancelled

    def _ensure_capacity(self, need: int) -> KVCache:
        """The pool, grown to hold ``need`` positions per row (doubling, up to the context)."""
        have = self._pool.max_len if self._pool is not None else 0
        if need > have:
            cap = max(need, min(self.context, max(64, 2 * have)))
            if self._pool is None:
                self._pool = KVCache(self.config, self.max_batch, cap, self.device, self.dtype)
            else:
                self._pool.resize(cap)
        assert self._pool is not None
        return self._pool

    def _admit(self, joining: list[Request]) -> None:
        """Prefill the new requests into the free rows after the active ones."""
        try:
            logits = self._prefill(joining)
        except Exception:
            if len(joining) == 1:
                self._fail(joining[0], "prefill")
                return
            for req in joining:  # find the one that fails; the others still join
                self._admit([req])
            return
        first = len(self._rows)
        self._rows.extend(joining)
        self.stats.prompt_tokens += sum(r.prompt_tokens for r in joining)
        self._sample_rows(logits, range(first, len(self._rows)))

    def _prefill(self, joining: list[Request]) -> Tensor:
        n, m = len(self._rows), len(joining)
        pool = self._ensure_capacity(max(r.prompt_tokens for r in joining))
        rows = pool.rows(n, n + m)
        rows.reset()
        logits = prefill(self.model, [r.context for r in joining], rows)  # (m, V)
        pool.pos[n : n + m] = rows.pos
        return logits

    def _step(self) -> None:
        """One decode forward over every active row, then sample and stream."""
        n = len(self._rows)
        assert self._pool is not None  # made by the first prefill
        pool = self._ensure_capacity(int(self._pool.pos[:n].max()) + 1)
        try:
            logits = self._forward([r.pending for r in self._rows], pool.rows(0, n))
        except Exception:
            for b in reversed(range(n)):  # nothing to tell the rows apart: all fail
                self._fail(self._rows[b], "decode", row=b)
            return
        pool.pos[:n] += 1
        self.stats.steps += 1
        self._sample_rows(logits, range(n))

    def _forward(self, tokens: list[int], rows: KVCache) -> Tensor:
        """Logits (B, V) of one decode step over ``rows``: compiled for a single row whose pool
        length has its graph, else eager (starting that graph's compilation)."""
        if self.compile and len(tokens) == 1:
            length = rows.max_len
            if length not in self._graphs:
                self._graphs[length] = threading.Thread(
                    target=self._compile, args=(length,), name="gptkit-compile", daemon=True
                )
                self._graphs[length].start()  # type: ignore[union-attr]
            elif self._graphs[length] is None:
                x = torch.tensor(tokens, device=self.device)[:, None]
                logits = compiled_step(self.model, x, rows)
                if logits is not None:
                    return logits
                self.compile = False  # torch compiles no more graphs: stay eager
        return step(self.model, tokens, rows)

    def _compile(self, length: int) -> None:
        """Compile the single-row step for a pool of ``length`` positions, on a scratch cache
        of that shape (the graph depends on shapes only), then mark it ready."""
        with torch.inference_mode():
            scratch = KVCache(self.config, 1, length, self.device, self.dtype)
            x = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            try:
                done = compiled_step(self.model, x, scratch) is not None
            except Exception:  # the eager step serves on; compiling is only faster
                done = False
        if done:
            self._graphs[length] = None

    def _sample_rows(self, logits: Tensor, rows: range) -> None:
        """Sample the next token of each row, stream its text and retire finished rows.
        Each row samples on its own, so that a failure ends that request only."""
        logits = logits[:, : self.vocab].float()
        greedy = logits.argmax(dim=-1).tolist()  # one call for every greedy row
        done: list[int] = []
        for i, b in enumerate(rows):
            req = self._rows[b]
            try:
                if self._advance(req, self._sample(req, logits[i : i + 1], greedy[i])):
                    done.append(b)
            except Exception:
                self._fail(req, "sampling", row=None)
                done.append(b)
        for b in sorted(done, reverse=True):
            self._retire(b)
        self.stats.max_active = max(self.stats.max_active, len(self._rows))

    def _sample(self, req: Request, logits: Tensor, greedy: int) -> int:
        """The next token of one row from its logits (1, V); ``greedy`` is their argmax."""
        return req.sample(logits, greedy)

    def _advance(self, req: Request, token: int) -> bool:
        """Record ``token`` for ``req`` and stream its text; True when the request is done."""
        if req.cancelled:
            req._end()
            return True
        reason = req.record(token)
        self.stats.generated_tokens += 1
        piece, stopped = req.emit(token, reason)
        if stopped:
            req.finish_reason = "stop"
        req._emit(piece)
        if req.finish_reason is not None:
            req._end()
            return True
        return False

    def _fail(self, req: Request, stage: str, row: int | None = None) -> None:
        detail = traceback.format_exc(limit=1).strip().splitlines()[-1]
        req._end(EngineError(f"generation failed during {stage}: {detail}"))
        self.stats.failed += 1
        if row is not None:
            self._retire(row)

    def _retire(self, b: int) -> None:
        """Take row ``b`` out of the batch: the last active row moves into its slot."""
        last = len(self._rows) - 1
        if b != last:
            assert self._pool is not None
            self._pool.move_row(last, b)
            self._rows[b] = self._rows[last]
        self._rows.pop()
