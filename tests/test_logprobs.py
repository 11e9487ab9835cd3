"""Log-probabilities and min-p: every score equals log_softmax of an uncached forward of the
same sequence, in Python, the CLI and the OpenAI API (parsed by the official client)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import running_server, tiny_model
from torch import Tensor

import gptkit
from gptkit.checkpoint import save_checkpoint
from gptkit.cli import main
from gptkit.config import SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate import core
from gptkit.generate.generator import generate_ids
from gptkit.generate.logprobs import prompt_logprobs
from gptkit.generate.sampling import min_p_filter, sample_next
from gptkit.model import GPT
from gptkit.tokenizer import BPETokenizer
from gptkit.tokenizer.chat import apply_chat_template

PROMPTS = [[5, 9, 2], [1, 7, 3, 3, 8, 4, 6]]  # two lengths: the batch is right-padded
K = 5


def reference(model: GPT, ids: list[int]) -> Tensor:
    """log_softmax of an uncached full forward: row t scores the token after ids[:t+1]."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, V)


def assert_spells(text: str, tokens: list[str]) -> None:
    """The tokens, each shown alone, spell the text (unless one holds part of a character)."""
    if "\ufffd" not in "".join(tokens):
        assert "".join(tokens) == text


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model(64)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generated_logprobs_equal_an_uncached_forward(model: GPT, temperature: float) -> None:
    cfg = SampleConfig(
        temperature=temperature, top_k=20, max_new_tokens=10, seed=3, logprobs=K, stop_at_eos=False
    )
    decoder = generate_ids(model, PROMPTS, cfg)
    for _ in decoder:
        pass
    for prompt, row in zip(PROMPTS, decoder.rows, strict=True):
        assert len(row.scores) == len(row.generated) == 10
        logp = reference(model, prompt + row.generated)
        for j, scored in enumerate(row.scores):
            expected = logp[len(prompt) + j - 1]
            assert scored.token == row.generated[j]
            assert scored.logprob == pytest.approx(float(expected[scored.token]), abs=1e-5)
            values, ids = expected.topk(K)
            assert [t for t, _ in scored.top] == ids.tolist()
            assert [v for _, v in scored.top] == pytest.approx(values.tolist(), abs=1e-5)
            if temperature == 0:
                assert scored.top[0][0] == scored.token
        # Scoring the whole sequence gives the same numbers as decoding it.
        scores = prompt_logprobs(model, prompt + row.generated, K)
        assert scores[0] is None
        for cached, full in zip(row.scores, scores[len(prompt) :], strict=True):
            assert full is not None and full.token == cached.token
            assert full.logprob == pytest.approx(cached.logprob, abs=1e-5)


def test_prompt_logprobs_equal_an_uncached_forward(model: GPT) -> None:
    ids = PROMPTS[1]
    logp = reference(model, ids)
    scores = prompt_logprobs(model, ids, 3)
    assert scores[0] is None and len(scores) == len(ids)
    for t, scored in enumerate(scores[1:], start=1):
        assert scored is not None
        assert scored.logprob == pytest.approx(float(logp[t - 1, ids[t]]), abs=1e-5)
        assert [i for i, _ in scored.top] == logp[t - 1].topk(3).indices.tolist()
    with pytest.raises(GptkitError, match="context"):
        prompt_logprobs(model, [1] * (model.config.block_size + 1))


def test_no_logprobs_costs_nothing(model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError("a token was scored although no logprobs were asked for")

    monkeypatch.setattr(core, "token_logprob", refuse)
    decoder = generate_ids(model, PROMPTS, SampleConfig(temperature=0.9, max_new_tokens=5))
    for _ in decoder:
        pass
    assert all(not row.scores for row in decoder.rows)


def test_generate_details(chatml_tokenizer: BPETokenizer) -> None:
    net = tiny_model(chatml_tokenizer.vocab_size)
    prompts = ["hello there", "a"]
    gens = gptkit.generate(
        net, chatml_tokenizer, prompts, max_new_tokens=8, temperature=0, logprobs=3, details=True
    )
    texts = gptkit.generate(net, chatml_tokenizer, prompts, max_new_tokens=8, temperature=0)
    assert [g.text for g in gens] == texts
    for g in gens:
        n = len(g.token_ids)
        assert len(g.tokens) == len(g.logprobs) == len(g.top_logprobs) == n > 0
        assert_spells(g.text, g.tokens)
        for lp, top in zip(g.logprobs, g.top_logprobs, strict=True):
            assert len(top) <= 3 and max(top.values()) == pytest.approx(lp)
        assert g.finish_reason in ("eos", "length")
    greedy = dict(max_new_tokens=4, temperature=0, stop_at_eos=False, details=True)
    plain = gptkit.generate(net, chatml_tokenizer, "hi", **greedy)
    assert plain.logprobs is None and plain.top_logprobs is None and len(plain.token_ids) > 0


# -- min-p ------------------------------------------------------------------------------------


def test_min_p_filter_on_a_hand_made_distribution() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log() + 1.7  # any shift: min-p reads ratios

    def kept(min_p: float | None) -> list[bool]:
        return torch.isfinite(min_p_filter(logits, min_p))[0].tolist()

    assert kept(0.2) == [True, True, True, False]  # threshold 0.1
    assert kept(0.5) == [True, True, False, False]  # threshold 0.25
    assert kept(0.9) == [True, False, False, False]  # the most likely token always stays
    assert kept(0.0) == kept(None) == [True] * 4
    cfg = SampleConfig(temperature=1.0, min_p=0.5)
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, None, cfg, g)[0]) for _ in range(200)}
    assert draws == {0, 1}
    with pytest.raises(GptkitError, match="min_p"):
        SampleConfig(min_p=1.5)
    with pytest.raises(GptkitError, match="logprobs"):
        SampleConfig(logprobs=21)


# -- the command line ---------------------------------------------------------------------------


def test_show_logprobs(
    tmp_path: Path, chatml_tokenizer: BPETokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    net = tiny_model(chatml_tokenizer.vocab_size)
    save_checkpoint(tmp_path, net, chatml_tokenizer)
    argv = ["generate", "--model", str(tmp_path), "hello", "--temperature", "0"]
    argv += ["--max-new-tokens", "5", "--show-logprobs", "2", "--no-stop-at-eos"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    kw: dict[str, Any] = dict(max_new_tokens=5, temperature=0, stop_at_eos=False)
    gen = gptkit.generate(net, chatml_tokenizer, "hello", logprobs=2, details=True, **kw)
    assert out[0] == "hello" + gen.text
    assert out[1].split()[:4] == ["#", "token", "logprob", "prob"]
    rows = out[2:]
    assert len(rows) == 5
    for j, (line, lp) in enumerate(zip(rows, gen.logprobs, strict=True)):
        assert line.split()[0] == str(j) and f"{lp:.3f}" in line and f"{math.exp(lp):.3f}" in line
    for flag in ("--min-p", "--presence-penalty", "--frequency-penalty"):
        assert main([*argv, flag, "0.1"]) == 0
    capsys.readouterr()


# -- the OpenAI API -----------------------------------------------------------------------------

openai = pytest.importorskip("openai")
CONTEXT = 96


@pytest.fixture(scope="module")
def served(chatml_tokenizer: BPETokenizer) -> Iterator[SimpleNamespace]:
    net = tiny_model(chatml_tokenizer.vocab_size, block_size=CONTEXT)
    with running_server(net, chatml_tokenizer) as s:
        s.model = net
        s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        yield s


def chat(served: SimpleNamespace, **kw: Any) -> Any:
    messages = [{"role": "user", "content": "hello"}]
    return served.client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=8, **kw
    )


def test_chat_logprobs(served: SimpleNamespace, chatml_tokenizer: BPETokenizer) -> None:
    reply = chat(served, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    content = choice.logprobs.content
    generated = reply.usage.completion_tokens - (choice.finish_reason == "stop")
    assert len(content) == generated > 0
    assert_spells(choice.message.content, [t.token for t in content])
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the best
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode() == t.token  # the bytes of the token as shown
    # The same numbers as the core, which equals an uncached forward (tested above).
    prompt = chatml_tokenizer.encode_prompt(
        apply_chat_template(chatml_tokenizer, [{"role": "user", "content": "hello"}])
    )
    cfg = SampleConfig(temperature=0, max_new_tokens=len(content), logprobs=3)
    decoder = generate_ids(served.model, [prompt], cfg, chatml_tokenizer.eos_id)
    for _ in decoder:
        pass
    expected = [s.logprob for s in decoder.rows[0].scores][: len(content)]
    assert [t.logprob for t in content] == pytest.approx(expected, abs=1e-4)
    # Streamed chunks carry the same tokens and scores.
    stream = chat(served, logprobs=True, top_logprobs=3, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in content_of(c)]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [
        (t.token, round(t.logprob, 4)) for t in content
    ]
    assert chat(served).choices[0].logprobs is None
    bare = chat(served, logprobs=True)
    assert all(t.top_logprobs == [] for t in bare.choices[0].logprobs.content)


def content_of(chunk: Any) -> list[Any]:
    return chunk.choices[0].logprobs.content


def test_completion_logprobs(served: SimpleNamespace) -> None:
    kw = dict(model="tiny", prompt="hello world", temperature=0, max_tokens=6)
    reply = served.client.completions.create(logprobs=2, **kw)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert_spells(choice.text, lp.tokens)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == 0
    for tok, off, nxt in zip(lp.tokens, lp.text_offset, lp.text_offset[1:], strict=False):
        assert nxt == off + len(tok)
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(value)
    pieces = list(served.client.completions.create(logprobs=2, stream=True, **kw))
    scored = [p.choices[0].logprobs for p in pieces if p.choices and p.choices[0].logprobs]
    tokens = [t for s in scored for t in s.tokens]
    offsets = [o for s in scored for o in s.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset
    assert served.client.completions.create(**kw).choices[0].logprobs is None


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_the_prompt(
    served: SimpleNamespace, chatml_tokenizer: BPETokenizer, max_tokens: int
) -> None:
    text = "hello world, hello"
    ids = chatml_tokenizer.encode_prompt(text)
    reply = served.client.completions.create(
        model="tiny", prompt=text, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0
    )
    choice = reply.choices[0]
    lp = choice.logprobs
    generated = max_tokens - (choice.finish_reason == "stop")  # an eos is not shown
    assert choice.text.startswith(text) and len(lp.tokens) == len(ids) + generated
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    logp = reference(served.model, ids)
    expected = [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == max_tokens
    if max_tokens == 0:
        assert choice.text == text and choice.finish_reason == "length"
        streamed = list(
            served.client.completions.create(
                model="tiny", prompt=text, echo=True, logprobs=1, max_tokens=0, stream=True
            )
        )
        assert streamed[0].choices[0].logprobs.token_logprobs == lp.token_logprobs


def test_bad_logprob_requests(served: SimpleNamespace) -> None:
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        chat(served, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        chat(served, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="min_p"):
        chat(served, extra_body={"min_p": 2})
    assert chat(served, extra_body={"min_p": 0.1, "repetition_penalty": 1.2}).choices
