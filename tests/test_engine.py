"""The serving engine: continuous batching gives each request what it would get alone."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gptkit.generate import generate
from gptkit.serve.engine import Engine, EngineError, PromptTooLong, QueueFull
from gptkit.serve.serving import openai_sampling as GenParams
from tests.conftest import tiny_model

PROMPTS = ["To be", "or not to be, that is", "the question", "O", "Whether 'tis nobler in"]


@pytest.fixture(scope="module")
def setup(bpe_tokenizer):
    model = tiny_model(vocab_size=bpe_tokenizer.vocab_size, block_size=64, seed=3)
    return model, bpe_tokenizer


def alone(model, tok, prompt: str, n: int, **kw) -> str:
    return generate(model, tok, prompt, max_new_tokens=n, temperature=0, **kw)


def run_all(engine: Engine, tok, prompts: list[str], lengths: list[int], **kw) -> list:
    """Submit every prompt from its own thread at once; return (text, last chunk) each."""
    out: list = [None] * len(prompts)

    def one(i: int) -> None:
        ids = tok.encode_prompt(prompts[i])
        out[i] = engine.generate(ids, GenParams(max_tokens=lengths[i], **({"temperature": 0} | kw)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_greedy_equals_alone(setup) -> None:
    model, tok = setup
    lengths = [12, 30, 5, 20, 9]
    with Engine(model, tok, max_batch=3) as engine:  # fewer rows than requests: some wait
        results = run_all(engine, tok, PROMPTS, lengths)
        assert engine.stats.max_active == 3
    for prompt, n, (text, last) in zip(PROMPTS, lengths, results, strict=True):
        assert text == alone(model, tok, prompt, n)
        assert last.prompt_tokens == len(tok.encode_prompt(prompt))
        assert last.finish_reason in ("stop", "length")
        if last.finish_reason == "length":
            assert last.completion_tokens == n


def test_run_serves_from_the_calling_thread_until_stopped(setup) -> None:
    """Engine.run (what `gptkit serve` does in its main thread): requests from other threads
    are served by the caller's loop, which returns on stop(); a second run is refused."""
    model, tok = setup
    engine = Engine(model, tok, max_batch=2)
    out: list = []

    def clients() -> None:
        out.extend(run_all(engine, tok, PROMPTS[:3], [6, 6, 6]))
        engine.stop()

    thread = threading.Thread(target=clients)
    engine.run(ready=thread.start)  # returns once the clients' thread stops it
    thread.join()
    assert [text for text, _ in out] == [alone(model, tok, p, 6) for p in PROMPTS[:3]]
    engine._running = True  # as while another thread runs it
    with pytest.raises(EngineError, match="already running"):
        engine.run()
    engine.shutdown()


def test_a_request_joins_a_running_batch(setup) -> None:
    model, tok = setup
    with Engine(model, tok) as engine:
        first = engine.submit(tok.encode_prompt(PROMPTS[1]), GenParams(40, temperature=0))
        it = iter(first)
        head = [next(it).text for _ in range(5)]  # the first request is decoding now
        text, _ = engine.generate(tok.encode_prompt(PROMPTS[0]), GenParams(15, temperature=0))
        rest = [c.text for c in it]
    assert text == alone(model, tok, PROMPTS[0], 15)
    assert "".join(head + rest) == alone(model, tok, PROMPTS[1], 40)


def test_stop_strings_and_usage(setup) -> None:
    model, tok = setup
    full = alone(model, tok, PROMPTS[2], 30)
    stop = full[8:11]  # a piece of what greedy decoding will say
    assert stop and stop in full
    with Engine(model, tok) as engine:
        ids = tok.encode_prompt(PROMPTS[2])
        text, last = engine.generate(ids, GenParams(30, temperature=0, stop=(stop,)))
    assert text == full[: full.index(stop)]
    assert last.finish_reason == "stop"
    assert last.completion_tokens < 30


def test_seeded_sampling_does_not_depend_on_the_batch(setup) -> None:
    model, tok = setup
    kw = dict(temperature=1.0, top_p=0.9, seed=7)
    ids = tok.encode_prompt(PROMPTS[0])
    with Engine(model, tok) as engine:
        solo, _ = engine.generate(ids, GenParams(20, **kw))
        crowd = run_all(engine, tok, [PROMPTS[0]] * 4, [20] * 4, **kw)
        other, _ = engine.generate(ids, GenParams(20, temperature=1.0, seed=8))
    assert all(text == solo for text, _ in crowd)
    assert other != solo


def test_penalties_change_greedy_output(setup) -> None:
    model, tok = setup
    ids = tok.encode_prompt(PROMPTS[3])
    with Engine(model, tok) as engine:
        plain, last = engine.generate(ids, GenParams(30, temperature=0))
        penalized, _ = engine.generate(ids, GenParams(30, temperature=0, frequency_penalty=2.0))
    assert last.completion_tokens == 30
    assert penalized != plain  # a random tiny model repeats itself; the penalty stops that


def test_cancel_and_queue_full(setup) -> None:
    model, tok = setup
    ids = tok.encode_prompt(PROMPTS[0])
    with Engine(model, tok, max_batch=1, max_queue=1) as engine:
        long = engine.submit(ids, GenParams(50, temperature=0))
        it = iter(long)
        next(it)  # running: the one row is taken
        waiting = engine.submit(ids, GenParams(3, temperature=0))
        with pytest.raises(QueueFull, match="retry later"):
            engine.submit(ids, GenParams(3, temperature=0))
        long.cancel()
        got = [c for c in it]
        assert len(got) < 49 and not any(c.finish_reason for c in got)
        chunks = list(waiting)
        text, last = "".join(c.text for c in chunks), chunks[-1]
        assert text == alone(model, tok, PROMPTS[0], 3) and last.finish_reason
        assert engine.generate(ids, GenParams(2, temperature=0))[1].completion_tokens >= 1


def test_limits_are_checked_with_clear_errors(setup) -> None:
    model, tok = setup
    with Engine(model, tok) as engine:
        with pytest.raises(PromptTooLong, match="context is 64 tokens"):
            engine.submit(list(range(1, 65)), GenParams(1))
        with pytest.raises(EngineError, match="no tokens"):
            engine.submit([], GenParams(1))
        with pytest.raises(EngineError, match="outside the vocabulary"):
            engine.submit([10**6], GenParams(1))
        with pytest.raises(EngineError, match="max_tokens must be at least 1"):
            GenParams(-1)
        # The context clips max_tokens: 60 prompt tokens leave room for 4.
        _, last = engine.generate(list(range(1, 61)), GenParams(100, temperature=0))
        assert last.completion_tokens <= 4
        assert last.finish_reason in ("stop", "length")


def test_a_failing_request_leaves_the_others_running(setup, monkeypatch) -> None:
    model, tok = setup
    engine = Engine(model, tok)
    real = engine._sample

    def flaky(req, logits, greedy):
        if req.params.seed == 666 and len(req.generated) == 3:
            raise RuntimeError("injected fault")
        return real(req, logits, greedy)

    monkeypatch.setattr(engine, "_sample", flaky)
    with engine:
        ids = tok.encode_prompt(PROMPTS[1])
        bad = engine.submit(ids, GenParams(20, temperature=0, seed=666))
        good = engine.submit(ids, GenParams(20, temperature=0))
        with pytest.raises(EngineError, match="injected fault"):
            list(bad)
        text = "".join(c.text for c in good)
    assert text == alone(model, tok, PROMPTS[1], 20)
    assert engine.stats.failed == 1


def test_async_readers(setup) -> None:
    model, tok = setup

    async def main(engine: Engine) -> list[str]:
        async def one(prompt: str) -> str:
            req = engine.submit(tok.encode_prompt(prompt), GenParams(10, temperature=0))
            return "".join([c.text async for c in req])

        return await asyncio.gather(*(one(p) for p in PROMPTS))

    with Engine(model, tok) as engine:
        texts = asyncio.run(main(engine))
    assert texts == [alone(model, tok, p, 10) for p in PROMPTS]


def test_presence_and_frequency_penalties_follow_the_openai_formula() -> None:
    import torch

    from gptkit.generate.sampling import apply_presence_frequency_penalty

    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0, 1, 3, 0]])
    out = apply_presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 4.0]]
