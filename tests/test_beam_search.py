"""Beam search: its invariants on every family (quantized too), the text API, the CLI and the
server's ``use_beam_search``. tests/reference/test_beam.py compares it with transformers."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILIES, run_ids, running_server, tiny_model

import gptkit
from gptkit.checkpoint import save_checkpoint
from gptkit.cli import main
from gptkit.compress import quantize
from gptkit.config import SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate import BeamConfig, beam_search, stream
from gptkit.generate.beam import banned_ngram_tokens
from gptkit.model import GPT
from gptkit.tokenizer import BPETokenizer
from gptkit.tokenizer.chat import apply_chat_template

V = 64


def sharp_model(vocab_size: int = V, block_size: int = 64, **family: Any) -> GPT:
    """A tiny model with peaked next-token distributions (weights of std 0.15, as the
    transformers twins of tests/reference), so that beams are far from ties."""
    model = tiny_model(vocab_size, block_size=block_size, **family)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def prompts_of(lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def uncached_score(model: GPT, prompt: list[int], tokens: tuple[int, ...], lp: float) -> float:
    """A beam's score from one full forward without a cache."""
    with torch.no_grad():
        logp = model(torch.tensor([prompt + list(tokens)]))[0].float().log_softmax(-1)
    picked = logp[len(prompt) - 1 : -1].gather(1, torch.tensor(tokens)[:, None])
    return float(picked.sum()) / len(tokens) ** lp


MODELS = dict(FAMILIES) | {
    "llama-int8": FAMILIES["llama"] | {"quant": "int8"},
    "gpt2-int4": {"quant": "int4"},
}


@pytest.mark.parametrize("name", list(MODELS))
def test_beams_follow_their_cache_rows_and_batch_alone(name: str) -> None:
    """Every beam's score is what an uncached forward gives its tokens (so the cache rows
    followed the beams), and a padded batch finds what each prompt finds alone."""
    family = dict(MODELS[name])
    mode = family.pop("quant", None)
    model = sharp_model(**family)
    if mode is not None:
        model = quantize(model, mode)
    cfg = BeamConfig(num_beams=3, max_new_tokens=9, num_return_sequences=3, length_penalty=0.7)
    prompts = prompts_of([7, 3, 11])
    found = beam_search(model, prompts, cfg, eos_id=5)
    tol = dict(rtol=1e-4, atol=1e-4) if mode is None else dict(rtol=3e-2, atol=3e-2)
    for prompt, beams in zip(prompts, found, strict=True):
        assert len(beams) == 3
        assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
        for b in beams:
            ref = uncached_score(model, prompt, b.tokens, 0.7)
            torch.testing.assert_close(b.score, ref, **tol)
    if mode is None:
        alone = [beam_search(model, [p], cfg, eos_id=5)[0] for p in prompts]
        assert [[b.tokens for b in x] for x in alone] == [[b.tokens for b in x] for x in found]


def test_one_beam_is_greedy() -> None:
    model = sharp_model(**FAMILIES["llama"])
    prompts = prompts_of([4, 9])
    cfg = BeamConfig(num_beams=1, max_new_tokens=12, stop_at_eos=False)
    found = beam_search(model, prompts, cfg)
    greedy = run_ids(model, prompts, SampleConfig(temperature=0.0, max_new_tokens=12))
    assert [list(beams[0].tokens) for beams in found] == greedy


def test_no_repeat_ngram() -> None:
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 1, 4, 1], 2) == [2, 4]
    assert banned_ngram_tokens([7, 7], 3) == []
    model = sharp_model()
    prompt = prompts_of([5])[0]
    cfg = BeamConfig(num_beams=4, max_new_tokens=30, no_repeat_ngram_size=2, stop_at_eos=False)
    for beam in beam_search(model, [prompt], cfg)[0]:
        ids = prompt + list(beam.tokens)
        pairs = list(itertools.pairwise(ids))
        assert len(pairs) == len(set(pairs))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(GptkitError, match="num_return_sequences"):
        BeamConfig(num_beams=2, num_return_sequences=3)
    with pytest.raises(GptkitError, match="early_stopping"):
        BeamConfig(early_stopping="sometimes")  # type: ignore[arg-type]
    model = sharp_model()
    with pytest.raises(GptkitError, match="does not slide"):
        beam_search(model, [[1] * 60], BeamConfig(max_new_tokens=10))


# -- the text API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(chatml_tokenizer: BPETokenizer) -> GPT:
    return sharp_model(chatml_tokenizer.vocab_size, block_size=128)


def test_generate_with_beams(text_model: GPT, chatml_tokenizer: BPETokenizer) -> None:
    tok = chatml_tokenizer
    kw: dict[str, Any] = dict(max_new_tokens=10, num_beams=4)
    best = gptkit.generate(text_model, tok, "Speak", **kw)
    several = gptkit.generate(text_model, tok, "Speak", num_return_sequences=3, **kw)
    batch = gptkit.generate(text_model, tok, ["Speak", "All"], num_return_sequences=2, **kw)
    assert isinstance(best, str) and isinstance(several, list) and len(several) == 3
    assert several[0] == best and batch[0] == several[:2]
    ids = tok.encode_prompt("Speak")
    beams = beam_search(text_model, [ids], BeamConfig(4, 10, num_return_sequences=3), tok.eos_id)
    assert several == [tok.decode([t for t in b.tokens if t != tok.eos_id]) for b in beams[0]]
    with pytest.raises(GptkitError, match="cannot stream"):
        stream(text_model, tok, "Speak", num_beams=4)
    with pytest.raises(GptkitError, match="penalties"):
        gptkit.generate(text_model, tok, "Speak", repetition_penalty=1.3, **kw)
    with pytest.raises(GptkitError, match="draft"):
        gptkit.generate(text_model, tok, "Speak", draft="lookup", **kw)


def test_cli_prints_each_beam(
    text_model: GPT, chatml_tokenizer: BPETokenizer, tmp_path: Path, capsys: Any
) -> None:
    save_checkpoint(tmp_path / "ckpt", text_model, chatml_tokenizer)
    argv = ["generate", "--model", str(tmp_path / "ckpt"), "Speak", "--max-new-tokens", "8"]
    code = main(
        [*argv, "--num-beams", "3", "--num-return-sequences", "2", "--early-stopping", "never"]
    )
    out = capsys.readouterr().out
    expected = gptkit.generate(
        text_model,
        chatml_tokenizer,
        "Speak",
        max_new_tokens=8,
        num_beams=3,
        num_return_sequences=2,
        early_stopping="never",
    )
    assert code == 0
    assert out == "".join(
        f"--- sample 1, beam {k + 1} ---\nSpeak{t}\n" for k, t in enumerate(expected)
    )


# -- the server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(text_model: GPT, chatml_tokenizer: BPETokenizer) -> Any:
    openai = pytest.importorskip("openai")
    with running_server(text_model, chatml_tokenizer) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_api_beams_equal_python(
    client: Any, text_model: GPT, chatml_tokenizer: BPETokenizer
) -> None:
    beams = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2)
    extra = {"use_beam_search": True, "best_of": 3}
    reply = client.completions.create(
        model="tiny", prompt=["Speak", "All"], max_tokens=8, n=2, extra_body=extra
    )
    expected = gptkit.generate(text_model, chatml_tokenizer, ["Speak", "All"], **beams)
    assert [c.text for c in reply.choices] == [t for texts in expected for t in texts]
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.usage.completion_tokens > 0

    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, n=2, temperature=0, extra_body=extra
    )
    text = apply_chat_template(chatml_tokenizer, messages)
    expected = gptkit.generate(text_model, chatml_tokenizer, text, **beams)
    assert [c.message.content for c in chat.choices] == expected
    assert {c.finish_reason for c in chat.choices} <= {"stop", "length"}


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"stream": True}, "cannot stream"),
        ({"temperature": 0.7}, "temperature"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 500}, "best_of"),
        ({"top_p": 0.5}, "top_p"),
    ],
)
def test_api_beam_conflicts_are_400(client: Any, changes: dict, fragment: str) -> None:
    openai = pytest.importorskip("openai")
    body = {"use_beam_search": True, "best_of": 2} | changes
    with pytest.raises(openai.BadRequestError, match=fragment):
        client.completions.create(model="tiny", prompt="Speak", max_tokens=4, extra_body=body)
