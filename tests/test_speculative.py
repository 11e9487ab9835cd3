"""Speculative decoding: greedy output equals plain decoding token for token for every kind of
draft, sampled tokens follow the model's distribution (chi-square), and the KV cache after
rejections equals a fresh prefill of the accepted tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, SAMPLE_TEXT, run_ids, tiny_model
from scipy.stats import chisquare

from gptkit.checkpoint import save_checkpoint
from gptkit.config import SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate import generate, speculative, stream
from gptkit.generate.speculative import (
    LookupDraft,
    ModelDraft,
    SpeculativeDecoder,
    accept,
    compiled_verify,
    distribution,
    int4_draft,
    make_draft,
)
from gptkit.model import KVCache
from gptkit.model.quant import quantize

#: chi-square tests fail below this p-value (seeds are fixed, so a pass is reproducible)
P_MIN = 0.001
BLOCK = 96


def target(vocab: int = 64, **kw: object):
    return tiny_model(vocab, seed=0, block_size=BLOCK, **kw)


def spec_ids(model, prompts, cfg, draft, k=4, **kw) -> tuple[list[list[int]], SpeculativeDecoder]:
    decoder = SpeculativeDecoder(model, prompts, cfg, draft, k, **kw)
    out: list[list[int]] = [[] for _ in prompts]
    for events in decoder:
        for ev in events:
            out[ev.row].append(ev.token)
    return out, decoder


def repetitive(vocab: int = 64) -> list[int]:
    g = torch.Generator().manual_seed(3)
    motif = torch.randint(0, vocab, (7,), generator=g).tolist()
    return motif * 3 + motif[:3]


def drafts(model, kind: str):
    if kind == "model":
        return ModelDraft(tiny_model(model.config.vocab_size, seed=1, block_size=BLOCK))
    if kind == "self":  # a perfect draft: every proposal stands
        return ModelDraft(model)
    if kind == "int4":
        return ModelDraft(int4_draft(model))
    return LookupDraft()


# -- greedy: the model's own tokens ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["model", "self", "int4", "lookup"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_equals_plain_decoding(kind, k):
    model = target()
    prompts = [repetitive(), [5, 9, 1]]
    cfg = SampleConfig(temperature=0.0, max_new_tokens=40, stop_at_eos=False)
    ours, decoder = spec_ids(model, prompts, cfg, drafts(model, kind), k)
    assert ours == run_ids(model, prompts, cfg)
    assert decoder.drafted > 0
    if kind == "self":
        assert decoder.acceptance_rate == 1.0
        assert decoder.rounds < 2 * 40 / (k + 1) + 2  # k + 1 tokens a round


@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt3"])
def test_greedy_equals_plain_every_family(name):
    model = target(**FAMILIES[name])
    cfg = SampleConfig(temperature=0.0, max_new_tokens=30, stop_at_eos=False)
    draft = ModelDraft(tiny_model(64, seed=2, block_size=BLOCK, **FAMILIES[name]))
    ours, _ = spec_ids(model, [repetitive()], cfg, draft, 3)
    assert ours == run_ids(model, [repetitive()], cfg)


def test_text_api_eos_and_stop_strings(char_tokenizer):
    model = tiny_model(char_tokenizer.vocab_size, block_size=BLOCK)
    plain = generate(model, char_tokenizer, "First Ci", max_new_tokens=40, temperature=0)
    assert isinstance(plain, str) and len(plain) > 6
    stop = plain[3:6]
    plain_cut = generate(model, char_tokenizer, ["First Ci", "All"], 40, 0, stop=stop)
    assert plain_cut[0] == plain[: plain.index(stop)]
    other = tiny_model(char_tokenizer.vocab_size, seed=1, block_size=BLOCK)
    for draft in ("lookup", "int4", other):
        kw = dict(max_new_tokens=40, temperature=0, draft=draft, draft_tokens=3)
        assert generate(model, char_tokenizer, "First Ci", **kw) == plain
        cut = generate(model, char_tokenizer, ["First Ci", "All"], stop=stop, **kw)
        assert cut == plain_cut
        assert "".join(stream(model, char_tokenizer, "First Ci", stop=stop, **kw)) == cut[0]
    # eos: the row ends on it, exactly where plain decoding ends
    cfg = SampleConfig(temperature=0.0, max_new_tokens=40)
    eos = run_ids(model, [[1, 2, 3]], cfg)[0][5]
    ours, _ = spec_ids(model, [[1, 2, 3]], cfg, LookupDraft(), 4, eos_id=eos)
    assert ours == run_ids(model, [[1, 2, 3]], cfg, eos_id=eos)


def test_int4_draft_of_a_bf16_model_shares_nothing():
    model = quantize(target(), "bf16")
    draft = int4_draft(model)
    ours_t = [*model.parameters(), *model.buffers()]
    assert not {t.data_ptr() for t in ours_t} & {t.data_ptr() for t in draft.state_dict().values()}
    cfg = SampleConfig(temperature=0.0, max_new_tokens=30, stop_at_eos=False)
    ours, _ = spec_ids(model, [repetitive()], cfg, ModelDraft(draft), 4)
    assert ours == run_ids(model, [repetitive()], cfg)
    with pytest.raises(GptkitError, match="already quantized"):
        int4_draft(quantize(target(), "int4"))


def test_compiled_speculation_equals_plain(monkeypatch):
    """compile=True: the draft's steps and the model's checks run compiled (a check of fewer
    than k + 1 tokens is padded to k + 1), with the tokens of eager plain decoding."""
    verified = []

    def spy(model, x, cache):
        verified.append(x.shape[1])
        return compiled_verify(model, x, cache)

    monkeypatch.setattr(speculative, "compiled_verify", spy)
    model = target(**FAMILIES["llama"])
    cfg = SampleConfig(temperature=0.0, max_new_tokens=40, stop_at_eos=False)
    plain = run_ids(model, [repetitive()], cfg)
    with torch._dynamo.config.patch(recompile_limit=16):
        for draft in (LookupDraft(), ModelDraft(int4_draft(model), compile=True)):
            ours, _ = spec_ids(model, [repetitive()], cfg, draft, 4, compile=True)
            assert ours == plain
    assert verified and set(verified) == {5}


# -- sampling: the model's distribution ---------------------------------------------------------


def first_token_counts(model, draft, prompt, cfg, n: int) -> torch.Tensor:
    counts = torch.zeros(model.config.vocab_size)
    for seed in range(n):
        decoder = SpeculativeDecoder(model, [prompt], cfg.replace(seed=seed), draft, 4)
        counts[next(decoder)[0].token] += 1
    return counts


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit; ids expected fewer than 5 times are pooled, and ids of
    probability 0 (filtered out) must never be drawn."""
    assert counts[probs == 0].sum() == 0
    expected = probs * counts.sum()
    big, small = expected >= 5, (expected < 5) & (probs > 0)
    obs, exp = counts[big], expected[big]
    if expected[small].sum() > 0:
        obs = torch.cat([obs, counts[small].sum()[None]])
        exp = torch.cat([exp, expected[small].sum()[None]])
    p_value = chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue
    assert p_value > P_MIN, f"p = {p_value:.2g}"


@pytest.mark.parametrize("cfg", [SampleConfig(temperature=1.0), SampleConfig(top_k=20, top_p=0.9)])
def test_rejection_rule_keeps_the_target_distribution(cfg):
    """20,000 rounds of accept() on a model's p and a different model's q: the first token
    is distributed as p (plain sampling's filtered distribution)."""
    x = torch.tensor([repetitive()])
    with torch.no_grad():
        p = distribution(target()(x)[0, -2:], cfg)  # (2, V)
        q = distribution(tiny_model(64, seed=5, block_size=BLOCK)(x)[0, -1:] * 0.3, cfg)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(64)
    for _ in range(20_000):
        d = int(torch.multinomial(q[0], 1, generator=g))
        n, token = accept(p, [d], q, g)
        counts[d if n == 1 else token] += 1
    assert_matches(counts, p[0])


@pytest.mark.parametrize("kind", ["model", "lookup"])
def test_sampled_first_token_follows_the_model(kind):
    """End to end: the first sampled token of 800 seeded runs, with a draft unlike the
    model, is distributed as the model's next-token distribution."""
    model = target()
    prompt = repetitive()
    cfg = SampleConfig(temperature=1.5, max_new_tokens=5, stop_at_eos=False)
    counts = first_token_counts(model, drafts(model, kind), prompt, cfg, 800)
    with torch.no_grad():
        probs = distribution(model(torch.tensor([prompt]))[0, -1:], cfg)[0]
    assert_matches(counts, probs)


# -- the KV cache after rejections --------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cache_after_rejections_equals_a_fresh_prefill(name):
    model = target(**FAMILIES[name])
    draft = ModelDraft(tiny_model(64, seed=1, block_size=BLOCK, **FAMILIES[name]))
    cfg = SampleConfig(temperature=0.0, max_new_tokens=40, stop_at_eos=False)
    decoder = SpeculativeDecoder(model, [repetitive()], cfg, draft, 4)
    for _ in range(20):
        next(decoder)
    assert 0 < decoder.accepted < decoder.drafted  # rounds ended in rejections
    for runner, ctx in ((decoder.target, decoder.context), (draft.runner, decoder.context)):
        cache = runner.cache
        held = cache.length
        assert held <= len(ctx) - 1 and int(cache.pos[0]) == held
        fresh = KVCache(model.config, 1, cache.max_len)
        with torch.inference_mode():  # the decoder's cache holds inference tensors
            runner.model.hidden(torch.tensor([ctx[:held]]), fresh)
            for a, b in zip(cache.k + cache.v, fresh.k + fresh.v, strict=True):
                torch.testing.assert_close(a[:, :, :held], b[:, :, :held])
            x = torch.tensor([ctx[held : held + 1]])
            torch.testing.assert_close(runner.model(x, cache), runner.model(x, fresh))


def test_lookup_proposes_the_continuation_of_the_latest_match():
    lookup = LookupDraft(max_ngram=2)
    assert lookup.match([1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3) == [4, 7, 1]
    assert lookup.match([5, 6, 7], 3) == []
    g = torch.Generator()
    tokens, q = lookup.propose([1, 2, 3, 1, 2], 5, SampleConfig(), g, 10)
    assert tokens == [3, 1, 2, 3, 1] and q.shape == (5, 10) and q.sum() == 5


# -- refusals -----------------------------------------------------------------------------------


def test_a_draft_with_another_tokenizer_is_refused(tmp_path, char_tokenizer, bpe_tokenizer):
    model = tiny_model(bpe_tokenizer.vocab_size, block_size=BLOCK)
    save_checkpoint(tmp_path / "other", tiny_model(bpe_tokenizer.vocab_size), char_tokenizer)
    with pytest.raises(GptkitError, match=r"another tokenizer.*CharTokenizer.*BPETokenizer"):
        make_draft(model, bpe_tokenizer, str(tmp_path / "other"))
    save_checkpoint(tmp_path / "same", tiny_model(bpe_tokenizer.vocab_size, seed=1), bpe_tokenizer)
    text = generate(model, bpe_tokenizer, "def add", max_new_tokens=20, temperature=0)
    kw = dict(max_new_tokens=20, temperature=0, draft=tmp_path / "same")
    assert generate(model, bpe_tokenizer, "def add", **kw) == text
    with pytest.raises(GptkitError, match="vocabulary"):
        make_draft(model, bpe_tokenizer, tiny_model(32))


def test_settings_speculation_refuses(char_tokenizer):
    model = tiny_model(char_tokenizer.vocab_size, block_size=BLOCK)
    with pytest.raises(GptkitError, match="penalty"):
        generate(model, char_tokenizer, "All", repetition_penalty=1.3, draft="lookup")
    with pytest.raises(GptkitError, match="context"):
        generate(model, char_tokenizer, SAMPLE_TEXT[:90], max_new_tokens=20, draft="lookup")
    with pytest.raises(GptkitError, match="draft_tokens"):
        generate(model, char_tokenizer, "All", draft="lookup", draft_tokens=0)
