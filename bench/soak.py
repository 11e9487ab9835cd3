"""Soak test: `gptkit serve` under 32 concurrent streams with random disconnects, for minutes.

Starts the real server (`python -m gptkit serve`) on a free local port and keeps
``--streams`` clients busy for ``--minutes``. Each client sends chat completions one after
another, almost all streamed; a share of them (``--disconnect``) hang up at a random point
(mid-stream, or before a non-streamed reply), the way browsers and impatient scripts do.
The clients speak raw HTTP over asyncio streams, so that a hang-up is a real closed socket.

Reports, and exits 1 unless both goals hold:

- errors (goal 0): a status other than 200, an error event inside a stream, a stream that
  ends without ``data: [DONE]`` although the client stayed, a connection failure, a reply
  stalled for ``--stall`` seconds (no line of a stream, or no non-streamed reply), and
  every line of the server's log that is an error or a traceback;
- RSS growth of the server process (goal < 5%): from its resident memory after the warm-up
  to the end, sampled every 5 s from /proc (Linux). The warm-up lasts until every client
  has finished a request, and at least a tenth of the run: by then the KV-cache pool
  has grown to the longest rows (it doubles as rows need it) and the allocator holds its
  working set, so what grows afterwards is what a leak would grow. The RSS is printed
  once a minute too, so a plateau and a slope can be told apart.

    python bench/soak.py --minutes 5                   # SmolLM2 from `make models`
    python bench/soak.py --model PATH --streams 8 --minutes 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, start_server  # bench/serve.py

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "Write a story about a robot who learns to paint.",
    "Tell me about the sea.",
    "List five fruits and say one thing about each.",
    "Why is the sky blue? Answer in detail.",
    "Write a short poem about autumn.",
]


@dataclass
class Tally:
    """What the clients saw, and the server's memory over time."""

    requests: int = 0
    completed: int = 0
    left: int = 0  # requests whose client hung up on purpose
    tokens: int = 0  # text chunks received
    errors: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds, kB)
    rounds: dict[int, int] = field(default_factory=dict)  # client -> requests finished
    warm_at: float | None = None  # seconds into the run when the warm-up ended

    def error(self, what: str) -> None:
        if len(self.errors) < 1000:
            self.errors.append(what)


def watch_log(proc: subprocess.Popen, tally: Tally) -> threading.Thread:
    """Count the server's error lines (tracebacks, ERROR records) as errors."""

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Traceback" in line or "ERROR" in line or "Error:" in line:
                tally.error("server log: " + line.strip()[:200])

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def request_bytes(port: int, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + data


async def one_request(
    port: int, rng: random.Random, tally: Tally, args: argparse.Namespace
) -> None:
    """One chat completion; it may hang up on purpose (``left``)."""
    stream = rng.random() > 0.1
    leave_after = rng.randint(0, 40) if rng.random() < args.disconnect else None
    body = {
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": rng.randint(8, args.max_tokens),
        "temperature": rng.choice([0.0, 0.7, 1.0]),
        "stream": stream,
    }
    if rng.random() < 0.2:
        body["stop"] = [rng.choice([".", "\n\n", " the"])]
    tally.requests += 1
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(port, body))
        await writer.drain()
        if leave_after is not None and not stream:
            await asyncio.sleep(rng.random() * 2)  # leave before the reply is ready
            tally.left += 1
            return
        status = await asyncio.wait_for(reader.readline(), args.stall)
        if b" 200 " not in status:
            tally.error(
                f"status {status.decode(errors='replace').strip()}: {await reader.read(300)!r}"
            )
            return
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # the headers
        if not stream:
            reply = json.loads(await asyncio.wait_for(reader.read(), args.stall))
            tally.tokens += reply["usage"]["completion_tokens"]
            tally.completed += 1
            return
        await read_events(reader, leave_after, tally, args.stall)
    finally:
        writer.close()  # on purpose or at the end: the server sees the socket go


async def read_events(
    reader: asyncio.StreamReader, leave_after: int | None, tally: Tally, stall: float
) -> None:
    """The SSE events of one stream (chunked transfer encoding), until [DONE] or leaving;
    each line must come within ``stall`` seconds."""
    seen = 0
    while raw := await asyncio.wait_for(reader.readline(), stall):
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: ") :]
        if data == b"[DONE]":
            tally.completed += 1
            return
        event = json.loads(data)
        if "error" in event:
            tally.error(f"error event: {event['error'].get('message', '')[:200]}")
            return
        seen += 1
        tally.tokens += 1
        if leave_after is not None and seen >= leave_after:
            tally.left += 1
            return
    tally.error("the stream ended without [DONE]")


async def client(
    port: int, i: int, times: tuple[float, float], tally: Tally, args: argparse.Namespace
) -> None:
    """Client ``i``: requests one after another until the run ends; the warm-up ends once
    every client has finished one, and a tenth of the run has passed."""
    start, until = times
    rng = random.Random(args.seed * 1000 + i)
    tally.rounds[i] = 0
    while time.monotonic() < until:
        try:
            await one_request(port, rng, tally, args)
        except TimeoutError:
            tally.error(f"the server sent nothing for {args.stall:g} s")
        except (OSError, ValueError, KeyError) as e:
            tally.error(f"{type(e).__name__}: {e}")
        tally.rounds[i] += 1
        now = time.monotonic() - start
        if tally.warm_at is None and min(tally.rounds.values()) >= 1:
            tally.warm_at = max(now, (until - start) * 0.1)


async def sample_rss(pid: int, start: float, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        tally.rss.append((time.monotonic() - start, rss_kb(pid)))
        await asyncio.sleep(5)
    tally.rss.append((time.monotonic() - start, rss_kb(pid)))


async def soak(port: int, pid: int, args: argparse.Namespace, tally: Tally) -> None:
    start = time.monotonic()
    until = start + args.minutes * 60
    clients = [client(port, i, (start, until), tally, args) for i in range(args.streams)]
    await asyncio.gather(sample_rss(pid, start, until, tally), *clients)


def report(tally: Tally, args: argparse.Namespace, wall: float) -> bool:
    """Print the summary; True when both goals hold."""
    warm = tally.warm_at if tally.warm_at is not None else float("inf")
    after = [kb for t, kb in tally.rss if t >= warm] or [tally.rss[-1][1]]
    base, end, peak = after[0], tally.rss[-1][1], max(kb for _, kb in tally.rss)
    growth = (end - base) / base * 100
    minutes = {int(t // 60): kb for t, kb in tally.rss}  # the last sample of each minute
    print(f"model: {args.model}; {args.streams} streams for {wall / 60:.1f} min")
    print(
        f"requests: {tally.requests} sent, {tally.completed} completed, {tally.left} left by "
        f"their client on purpose; {tally.tokens} chunks received"
    )
    print(f"errors: {len(tally.errors)} (goal 0)")
    for e in tally.errors[:20]:
        print(f"  {e}")
    print("server RSS by minute (MiB): " + " ".join(f"{kb / 1024:.0f}" for kb in minutes.values()))
    if tally.warm_at is None:
        print("the warm-up did not end (a client finished no request): run longer")
        return False
    print(
        f"server RSS: {tally.rss[0][1] / 1024:.0f} MiB at start, {base / 1024:.0f} MiB after "
        f"the {warm:.0f} s warm-up, {end / 1024:.0f} MiB at the end (peak "
        f"{peak / 1024:.0f} MiB): growth {growth:+.2f}% (goal < 5%)"
    )
    return not tally.errors and growth < 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96, help="the most a request asks for")
    ap.add_argument("--disconnect", type=float, default=0.3, help="share of clients leaving")
    ap.add_argument("--stall", type=float, default=600.0, help="seconds of silence that err")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-arg", action="append", default=[], help="passed to serve")
    args = ap.parse_args()
    if not Path(args.model).exists():
        raise SystemExit(f"{args.model} not found; run `make models` or pass --model")
    port = free_port()
    quiet = ("--log-level", "warning", *args.server_arg)
    proc = start_server(args.model, port, args.streams, quiet)
    tally = Tally()
    log = watch_log(proc, tally)
    t0 = time.monotonic()
    try:
        asyncio.run(soak(port, proc.pid, args, tally))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.join(timeout=10)
    ok = report(tally, args, time.monotonic() - t0)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
