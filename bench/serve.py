"""Serving throughput and latency: `gptkit serve` under 1, 4 and 16 concurrent clients,
side by side with llama.cpp's `llama-server` where one is given.

Starts the real server (`python -m gptkit serve`) on a free local port, then, for each
concurrency level, runs that many clients at once with the official `openai` client, each
streaming chat completions one after another. With ``--llama-server BINARY`` it then does
the same against llama.cpp's server on the same file (``-np`` slots = the largest level,
continuous batching, ``-c`` = slots x 512, ``--threads`` threads) and prints the ratio of
each figure. Reports, per level and server:

- total tokens/s: completion tokens of all clients / wall time of the level;
- per-client tokens/s;
- time to first token (TTFT), p50 and p95: from sending a request to its first text chunk;
- the ratio of the total tokens/s to the single-client figure (continuous batching should
  lift it well above 1; the goal is >= 4x at 16 clients).

    python bench/serve.py                                  # SmolLM2 from `make models`
    python bench/serve.py --model PATH --requests 3 --max-tokens 64
    python bench/serve.py --levels 1,16,64 --temperature 0 --llama-server BINARY

``BINARY`` is a ``llama-server`` built from the llama.cpp sources inside llama-cpp-python's
source package (see bench/README.md); it is never part of this project.

Every request asks for exactly ``--max-tokens`` tokens (``ignore_eos`` is not an OpenAI
parameter, so the prompt asks for a long story and the count is taken from ``usage``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "Write a long story about a robot who learns to paint.",
    "Tell me a long tale of a sailor lost at sea.",
    "Describe, at length, a day in the life of a medieval baker.",
    "Write a long essay on why the sky looks blue.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, port: int, what: str) -> subprocess.Popen:
    """``proc`` once it answers ``/health`` on ``port`` (300 s at most)."""
    import urllib.request

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited:\n{proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{what} did not come up within 300 s")


def start_server(
    model: str, port: int, max_batch: int, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    """``gptkit serve`` in a child process (``extra``: more of its flags), once it answers
    ``/health``; its stderr stays readable for the caller."""
    cmd = [sys.executable, "-m", "gptkit", "serve", "--model", model, "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return wait_healthy(proc, port, "the server")


def start_llama_server(
    binary: str, model: str, port: int, slots: int, threads: int
) -> subprocess.Popen:
    """llama.cpp's server on ``model`` with ``slots`` parallel sequences, 512 positions each,
    continuous batching, once it answers ``/health``. Its log (a few lines per request) goes
    to a temporary file: into an unread pipe it would fill the pipe and stall the server."""
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots)]
    cmd += ["-c", str(512 * slots), "-cb", "-t", str(threads), "-tb", str(threads)]
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (open while the server runs)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        return wait_healthy(proc, port, "llama-server")
    except SystemExit:
        log.seek(0)
        tail = log.read()[-2000:]
        raise SystemExit(f"llama-server did not serve; its log ends:\n{tail}") from None


async def client(
    api: object, model: str, i: int, requests: int, max_tokens: int, temperature: float
) -> tuple[list[float], int]:
    """One client sending ``requests`` streamed chats in turn: TTFTs and tokens received."""
    ttfts, tokens = [], 0
    for r in range(requests):
        t0 = time.perf_counter()
        first = None
        stream = await api.chat.completions.create(  # type: ignore[attr-defined]
            model=model,
            messages=[{"role": "user", "content": PROMPTS[(i + r) % len(PROMPTS)]}],
            max_tokens=max_tokens,
            temperature=temperature,
            seed=i * 1000 + r,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage, chunks = None, 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        tokens += usage if usage is not None else chunks
        ttfts.append(first if first is not None else time.perf_counter() - t0)
    return ttfts, tokens


async def level(
    base_url: str, model: str, n: int, requests: int, max_tokens: int, temperature: float
) -> dict:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    model = model or (await api.models.list()).data[0].id
    await client(api, model, 0, 1, 4, temperature)  # warm up
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(client(api, model, i, requests, max_tokens, temperature) for i in range(n))
    )
    wall = time.perf_counter() - t0
    await api.close()
    ttfts = sorted(t for r in results for t in r[0])
    tokens = sum(r[1] for r in results)
    return {
        "clients": n,
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "per_client": tokens / wall / n,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
    }


def run_levels(port: int, levels: list[int], args: argparse.Namespace) -> list[dict]:
    base = f"http://127.0.0.1:{port}/v1"
    return [
        asyncio.run(level(base, "", n, args.requests, args.max_tokens, args.temperature))
        for n in levels
    ]


def measure(
    start: Callable[[int], subprocess.Popen], levels: list[int], args: argparse.Namespace
) -> list[dict]:
    """Start a server on a free port, run every level against it, stop it."""
    port = free_port()
    proc = start(port)
    try:
        return run_levels(port, levels, args)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def print_table(name: str, rows: list[dict]) -> None:
    base = rows[0]["tok_s"]
    print(f"{name}:")
    print("| clients | total tok/s | per-client tok/s | TTFT p50 | TTFT p95 | vs 1 client |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['tok_s']:.1f} | {r['per_client']:.1f} | "
            f"{r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p95'] * 1000:.0f} ms | "
            f"{r['tok_s'] / base:.2f}x |"
        )
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--levels", default="1,4,16", help="concurrency levels, comma separated")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--llama-server", default=None, help="a llama-server binary: the anchor")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-server's")
    ap.add_argument("--gptkit-args", default="", help="more `gptkit serve` flags, one string")
    args = ap.parse_args()
    if not Path(args.model).exists():
        raise SystemExit(f"{args.model} not found; run `make models` or pass --model")
    levels = [int(x) for x in args.levels.split(",")]
    extra = tuple(args.gptkit_args.split())
    ours = measure(lambda port: start_server(args.model, port, max(levels), extra), levels, args)
    theirs = None
    if args.llama_server:
        slots = max(levels)

        def llama(port: int) -> subprocess.Popen:
            return start_llama_server(args.llama_server, args.model, port, slots, args.threads)

        theirs = measure(llama, levels, args)
    print(f"model: {args.model}; {args.max_tokens} tokens per request, {args.requests} per client")
    print(
        f"temperature {args.temperature}; threads: {os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    print()
    print_table("gptkit serve" + (f" {args.gptkit_args}" if extra else ""), ours)
    if theirs is not None:
        print_table(f"llama-server -np {max(levels)} -cb", theirs)
        print("| clients | total tok/s, gptkit / llama-server | TTFT p95, gptkit / llama-server |")
        print("|---:|---:|---:|")
        for a, b in zip(ours, theirs, strict=True):
            ratio = a["tok_s"] / b["tok_s"]
            print(f"| {a['clients']} | {ratio:.2f}x | {a['ttft_p95'] / b['ttft_p95']:.2f}x |")


if __name__ == "__main__":
    main()
