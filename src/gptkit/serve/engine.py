"""The serving engine: one worker thread owns the model and decodes every request together.

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

The engine knows no HTTP: :meth:`Engine.submit` takes token ids and returns a
:class:`Request` whose chunks are read by a thread (``for chunk in request``) or by asyncio
code (``async for chunk in request``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import queue
import threading
import traceback
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gptkit.config import SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate.generator import Detokenizer
from gptkit.generate.sampling import apply_presence_frequency_penalty, sample_next
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


@dataclass(frozen=True)
class GenParams:
    """How one request is sampled (the OpenAI API's parameters)."""

    max_tokens: int
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise EngineError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not s for s in self.stop):
            raise EngineError("a stop string must not be empty")
        # Checks temperature, top_p and top_k with the library's own messages.
        self.sample_config()

    def sample_config(self) -> SampleConfig:
        return SampleConfig(
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop,
        )


@dataclass
class Chunk:
    """One streamed piece of one request."""

    text: str  # text that became final with this step (may be "")
    finish_reason: str | None  # set on the last chunk: "stop" (eos or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int  # tokens generated so far


_END = object()  # the sentinel after a request's last chunk


class Request:
    """A submitted generation. Iterate it (from a thread, or with ``async for`` from the
    event loop that submitted it) to get its :class:`Chunk` s; :meth:`cancel` stops it."""

    def __init__(self, prompt_ids: list[int], params: GenParams, tokenizer: Tokenizer):
        self.prompt_ids = prompt_ids
        self.params = params
        self.cfg = params.sample_config()
        self.text = Detokenizer(tokenizer, params.stop)
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self.generated: list[int] = []
        self.counts: collections.Counter[int] = collections.Counter()
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.cancelled = False
        self._read_all = False  # the reader has seen the end; a second pass yields nothing
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue[object] | None = None
        with contextlib.suppress(RuntimeError):  # not inside an event loop: thread readers
            self._loop = asyncio.get_running_loop()
            self._aqueue = asyncio.Queue()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

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
        self._put(Chunk(text, self.finish_reason, self.prompt_tokens, len(self.generated)))

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
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        max_context: int | None = None,
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
        self._pending: list[int] = []  # per row: the sampled token not yet fed to the model
        self._pool_k: list[Tensor] = []
        self._pool_v: list[Tensor] = []
        self._pos = torch.zeros(max_batch, dtype=torch.long)  # per row: tokens in the cache
        self._capacity = 0  # the pool's length in positions
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running = False
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (once)."""
        with self._lock:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._work, name="gptkit-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the worker; requests still running or waiting end with an error."""
        with self._wake:
            self._running = False
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for req in [*self._rows, *self._waiting]:
            req._end(EngineStopped("the server is shutting down"))
        self._rows, self._pending = [], []
        self._waiting.clear()

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- requests ----------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: GenParams) -> Request:
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
        if params.max_tokens > room:  # the context ends the reply: finish_reason "length"
            params = dataclasses.replace(params, max_tokens=room)
        req = Request(ids, params, self.tokenizer)
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

    def generate(self, prompt_ids: list[int], params: GenParams) -> tuple[str, Chunk]:
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
                        self._wake.wait()
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

    def _ensure_capacity(self, need: int) -> None:
        """Grow the pool to hold ``need`` positions per row (doubling, up to the context)."""
        if need <= self._capacity:
            return
        cap = max(need, min(self.context, max(64, 2 * self._capacity)))
        nkv, hs = self.config.kv_heads, self.config.head_size
        shape = (self.max_batch, nkv, cap, hs)
        old, n = (self._pool_k, self._pool_v), self._capacity
        layers = range(self.config.n_layer)
        new = tuple(
            [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in layers] for _ in old
        )
        for new_pool, old_pool in zip(new, old, strict=True):
            for t_new, t_old in zip(new_pool, old_pool, strict=False):  # empty at first
                t_new[:, :, :n] = t_old
        self._pool_k, self._pool_v = new
        self._capacity = cap

    def _view(self, start: int, stop: int) -> KVCache:
        """A KVCache over pool rows ``start:stop`` (views: the model writes into the pool)."""
        cache = KVCache.__new__(KVCache)
        cache.max_len = self._capacity
        cache.k = [k[start:stop] for k in self._pool_k]
        cache.v = [v[start:stop] for v in self._pool_v]
        cache.pos = self._pos[start:stop].to(self.device)
        cache.length = int(cache.pos.max()) if stop > start else 0
        return cache

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
        self._pending.extend([0] * len(joining))
        self.stats.prompt_tokens += sum(r.prompt_tokens for r in joining)
        self._sample_rows(logits, range(first, len(self._rows)))

    def _prefill(self, joining: list[Request]) -> Tensor:
        n, m = len(self._rows), len(joining)
        lengths = [r.prompt_tokens for r in joining]
        self._ensure_capacity(max(lengths))
        x = torch.zeros(m, max(lengths), dtype=torch.long)
        for b, r in enumerate(joining):
            x[b, : lengths[b]] = torch.tensor(r.prompt_ids)
        self._pos[n : n + m] = 0
        cache = self._view(n, n + m)
        h = self.model.hidden(x.to(self.device), cache)  # (m, T, C); padding is overwritten
        last = h[torch.arange(m), torch.tensor(lengths) - 1]  # (m, C)
        self._pos[n : n + m] = torch.tensor(lengths)
        return self.model.lm_head(last).float()  # (m, V)

    def _step(self) -> None:
        """One decode forward over every active row, then sample and stream."""
        n = len(self._rows)
        self._ensure_capacity(int(self._pos[:n].max()) + 1)
        x = torch.tensor(self._pending, device=self.device)[:, None]  # (n, 1)
        try:
            logits = self.model(x, self._view(0, n))[:, -1].float()  # (n, V)
        except Exception:
            for b in reversed(range(n)):  # nothing to tell the rows apart: all fail
                self._fail(self._rows[b], "decode", row=b)
            return
        self._pos[:n] += 1
        self.stats.steps += 1
        self._sample_rows(logits, range(n))

    def _sample_rows(self, logits: Tensor, rows: range) -> None:
        """Sample the next token of each row, stream its text and retire finished rows."""
        logits = logits[:, : self.vocab]
        greedy = logits.argmax(dim=-1).tolist()  # one call for every greedy row
        done: list[int] = []
        for i, b in enumerate(rows):
            req = self._rows[b]
            try:
                token = self._sample(req, logits[i : i + 1], greedy[i])
                if self._advance(req, token):
                    done.append(b)
                else:
                    self._pending[b] = token
            except Exception:
                self._fail(req, "sampling", row=None)
                done.append(b)
        for b in sorted(done, reverse=True):
            self._retire(b)
        self.stats.max_active = max(self.stats.max_active, len(self._rows))

    def _sample(self, req: Request, logits: Tensor, greedy: int) -> int:
        """The next token of one row from its logits (1, V); ``greedy`` is their argmax."""
        p = req.params
        penalized = bool(req.counts) and bool(p.presence_penalty or p.frequency_penalty)
        if p.temperature == 0 and not penalized:
            return greedy
        if penalized:
            counts = torch.zeros_like(logits)
            ids = torch.tensor(list(req.counts))
            counts[0, ids] = torch.tensor(list(req.counts.values()), dtype=logits.dtype)
            logits = apply_presence_frequency_penalty(
                logits, counts, p.presence_penalty, p.frequency_penalty
            )
        return int(sample_next(logits, None, req.cfg, req.generator)[0])

    def _advance(self, req: Request, token: int) -> bool:
        """Record ``token`` for ``req`` and stream its text; True when the request is done."""
        if req.cancelled:
            req._end()
            return True
        req.generated.append(token)
        req.counts[token] += 1
        self.stats.generated_tokens += 1
        if self.eos_id is not None and token == self.eos_id:
            req.finish_reason = "stop"
            req._emit(req.text.close())
        else:
            piece = req.text.push(token)
            if req.text.stopped:
                req.finish_reason = "stop"
            elif len(req.generated) >= req.params.max_tokens:
                req.finish_reason = "length"
                piece += req.text.close()
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
            used = int(self._pos[last])
            for pool in (self._pool_k, self._pool_v):
                for t in pool:
                    t[b, :, :used] = t[last, :, :used]
            self._pos[b] = self._pos[last]
            self._rows[b], self._pending[b] = self._rows[last], self._pending[last]
        self._rows.pop()
        self._pending.pop()
