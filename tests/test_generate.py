"""Generation: sampling functions on hand-made logits, and the decoding loop's invariants
(causal mask, cached == uncached, batched == one-by-one, seeds, stop strings, streaming,
context policy), on every model family of conftest.FAMILIES."""

from __future__ import annotations

import warnings
from collections import defaultdict

import pytest
import torch
from conftest import FAMILIES, SAMPLE_TEXT, run_ids, tiny_model

from gptkit.config import SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate import (
    Detokenizer,
    apply_repetition_penalty,
    apply_temperature,
    generate,
    generate_ids,
    sample_next,
    stream,
    top_k_filter,
    top_p_filter,
)
from gptkit.model import KVCache
from gptkit.tokenizer import CharTokenizer

GREEDY = SampleConfig(temperature=0.0, max_new_tokens=24)
INF = float("inf")


def random_prompts(lengths: list[int], vocab: int = 64, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def char_model():
    return tiny_model()


class EosAs:
    """A tokenizer whose end-of-sequence id is a chosen one (a tiny random model never picks
    the real eos on cue)."""

    def __init__(self, tok, eos_id: int):
        self._tok, self.eos_id = tok, eos_id

    def __getattr__(self, name):
        return getattr(self._tok, name)


# -- sampling functions on hand-made logits ------------------------------------------------


def test_repetition_penalty_math():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.0]])
    out = apply_repetition_penalty(logits, [[0, 1, 1, 4]], 2.0)  # 1 twice counts once
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0, 0.0]]))
    assert torch.equal(apply_repetition_penalty(logits, [[0, 1]], 1.0), logits)
    mask = torch.tensor([[True, True, False, False, True]])
    torch.testing.assert_close(apply_repetition_penalty(logits, mask, 2.0), out)
    # below 1 it favours repeats instead
    torch.testing.assert_close(
        apply_repetition_penalty(logits, [[0, 1]], 0.5),
        torch.tensor([[4.0, -1.0, 1.0, -1.0, 0.0]]),
    )
    assert torch.equal(logits, torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.0]]))  # not in place


def test_repetition_penalty_changes_the_greedy_pick():
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    cfg = SampleConfig(temperature=0.0, repetition_penalty=2.0)
    assert sample_next(logits, None, cfg).tolist() == [0]
    assert sample_next(logits, [[0]], cfg).tolist() == [1]  # 3/2 < 2


def test_temperature_and_top_k():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 5.0]])
    torch.testing.assert_close(apply_temperature(logits, 0.5), logits * 2)
    out = top_k_filter(logits, 2)
    assert torch.equal(torch.isfinite(out), torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]]).bool())
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])
    assert torch.equal(top_k_filter(logits, 10), logits)
    assert torch.equal(top_k_filter(logits, None), logits)


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # order by probability: 1, 3, 2, 0
    logits = probs.log()[None]
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].nonzero().view(-1).tolist()
    assert kept(0.45) == [1]  # 0.5 alone reaches 0.45
    assert kept(0.55) == [1, 3]  # 0.5 does not, 0.5 + 0.3 does
    assert kept(0.85) == [1, 2, 3]
    assert kept(0.97) == [0, 1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(1e-9) == [1]  # always at least one token
    # each row of a batch gets its own nucleus; kept logits are unchanged
    batch = torch.stack([probs.log(), torch.tensor([0.7, 0.1, 0.1, 0.1]).log()])
    out = top_p_filter(batch, 0.6)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True] + [False] * 3]
    assert torch.equal(out[torch.isfinite(out)], batch[torch.isfinite(out)])


def test_sample_next_greedy_and_filters():
    logits = torch.tensor([[0.1, 2.0, 1.9], [5.0, 0.0, 4.0]])
    greedy = sample_next(logits, None, SampleConfig(temperature=0.0))
    assert greedy.tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        cfg_k = SampleConfig(temperature=2.0, top_k=1)
        assert sample_next(logits, None, cfg_k, g).tolist() == [1, 0]
        cfg_p = SampleConfig(temperature=1.0, top_p=1e-6)
        assert sample_next(logits, None, cfg_p, g).tolist() == [1, 0]
    # top_k=2 never draws the third token
    draws = {
        tuple(sample_next(logits, None, SampleConfig(temperature=5.0, top_k=2), g).tolist())
        for _ in range(50)
    }
    assert all(a in (1, 2) and b in (0, 2) for a, b in draws) and len(draws) > 1


def test_sample_next_per_row_generators():
    logits = torch.zeros(3, 50)
    cfg = SampleConfig(temperature=1.0)
    gens = lambda: [torch.Generator().manual_seed(7) for _ in range(3)]
    a = sample_next(logits, None, cfg, gens())
    assert a.tolist() == [a[0].item()] * 3  # same seed, same draw, whatever the row
    assert torch.equal(sample_next(logits[:1], None, cfg, gens()[:1]), a[:1])


def test_sample_config_validation(char_model, char_tokenizer):
    with pytest.raises(GptkitError, match="temperature"):
        generate(char_model, char_tokenizer, "a", temperature=-1.0)
    with pytest.raises(GptkitError, match=r"temperature must be 0 \(greedy\) or at least"):
        generate(char_model, char_tokenizer, "a", temperature=1e-300)  # inf logits otherwise
    with pytest.raises(GptkitError, match="repetition_penalty"):
        generate(char_model, char_tokenizer, "a", repetition_penalty=1e-9)
    # a top_p that is 0 in float32 keeps the most likely token instead of none
    assert generate(char_model, char_tokenizer, "ab", max_new_tokens=3, top_p=1e-300, seed=0) == (
        generate(char_model, char_tokenizer, "ab", max_new_tokens=3, temperature=0)
    )
    with pytest.raises(GptkitError, match="top_p"):
        stream(char_model, char_tokenizer, "a", top_p=1.5)  # raises before iterating
    with pytest.raises(GptkitError, match="context_policy"):
        generate(char_model, char_tokenizer, "a", context_policy="wrap")
    with pytest.raises(GptkitError, match="stop string"):
        generate(char_model, char_tokenizer, "a", stop=[""])


# -- the model under the loop --------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_causal_mask(name):
    model = tiny_model(**FAMILIES[name])
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 64
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_kv_cache_logits_match_full_forward(name):
    """Right-padded batched prefill, set_pos, then single-token steps: every logit equals the
    full forward over that row alone."""
    model = tiny_model(**FAMILIES[name])
    rows = random_prompts([5, 12, 9], seed=2)
    steps = random_prompts([6, 6, 6], seed=3)
    cache = KVCache(model.config, 3, 24)
    T = max(map(len, rows))
    x = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    with torch.no_grad():
        prefill = model(x, cache)
        cache.set_pos([len(r) for r in rows])
        decoded = [model(torch.tensor([[s[t]] for s in steps]), cache)[:, 0] for t in range(6)]
        for b, r in enumerate(rows):
            full = model(torch.tensor([r + steps[b]]))[0]
            torch.testing.assert_close(prefill[b, : len(r)], full[: len(r)], rtol=1e-4, atol=1e-5)
            got = torch.stack([d[b] for d in decoded])
            torch.testing.assert_close(got, full[len(r) :], rtol=1e-4, atol=1e-5)


# -- decoding invariants, every family -----------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cached_equals_uncached_greedy(name):
    model = tiny_model(**FAMILIES[name])
    prompts = random_prompts([4, 13, 20])
    cfg = GREEDY.replace(max_new_tokens=30)  # 20 + 30 > 32: the window slides on the way
    assert run_ids(model, prompts, cfg) == run_ids(model, prompts, cfg, use_cache=False)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_batched_equals_one_by_one_greedy(name):
    model = tiny_model(**FAMILIES[name])
    prompts = random_prompts([3, 17, 9, 25], seed=4)
    cfg = GREEDY.replace(max_new_tokens=20)
    alone = [run_ids(model, [p], cfg)[0] for p in prompts]
    assert run_ids(model, prompts, cfg) == alone
    # with an eos that ends some rows early, so the batch shrinks as it goes
    eos = alone[1][4]
    alone_eos = [run_ids(model, [p], cfg, eos)[0] for p in prompts]
    assert alone_eos[1] == alone[1][: alone[1].index(eos) + 1]
    assert run_ids(model, prompts, cfg, eos) == alone_eos


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_repetition_penalty_invariants(name):
    """The penalty's per-row memory survives batching, rows leaving, slides and no cache."""
    model = tiny_model(**FAMILIES[name])
    prompts = random_prompts([3, 12, 7], seed=8)
    cfg = GREEDY.replace(max_new_tokens=30, repetition_penalty=1.8)
    alone = [run_ids(model, [p], cfg)[0] for p in prompts]
    assert alone != [run_ids(model, [p], GREEDY.replace(max_new_tokens=30))[0] for p in prompts]
    eos = alone[2][5]
    alone_eos = [run_ids(model, [p], cfg, eos)[0] for p in prompts]
    assert run_ids(model, prompts, cfg, eos) == alone_eos
    assert run_ids(model, prompts, cfg, eos, use_cache=False) == alone_eos


def test_seeded_sampling_is_batch_independent(char_model):
    prompts = random_prompts([3, 10, 6], seed=5)
    cfg = SampleConfig(temperature=1.0, top_k=20, seed=11, max_new_tokens=20)
    assert run_ids(char_model, prompts, cfg) == [run_ids(char_model, [p], cfg)[0] for p in prompts]


# -- the text API --------------------------------------------------------------------------


def test_seeded_sampling_reproducible(char_model, char_tokenizer):
    kw = dict(max_new_tokens=40, temperature=1.0, top_p=0.95)
    state = torch.get_rng_state()
    a = generate(char_model, char_tokenizer, "First", seed=1, **kw)
    assert generate(char_model, char_tokenizer, "First", seed=1, **kw) == a
    assert generate(char_model, char_tokenizer, "First", seed=2, **kw) != a
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never used


def test_top_k_1_and_tiny_top_p_equal_greedy(char_model, char_tokenizer):
    greedy = generate(char_model, char_tokenizer, "Speak", max_new_tokens=30, temperature=0)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = generate(
            char_model, char_tokenizer, "Speak", max_new_tokens=30, temperature=1.5, seed=0, **kw
        )
        assert sampled == greedy


def test_stream_join_equals_generate(char_tokenizer, bpe_tokenizer):
    for tok in (char_tokenizer, bpe_tokenizer):
        model = tiny_model(vocab_size=tok.vocab_size)
        for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=3, stop=["e", "::"])):
            text = generate(model, tok, "class Point", max_new_tokens=40, **kw)
            pieces = list(stream(model, tok, "class Point", max_new_tokens=40, **kw))
            assert all(isinstance(p, str) for p in pieces)
            assert "".join(pieces) == text and all(pieces)
            prompts = ["class Point", "def", "All:\nSpeak"]
            texts = generate(model, tok, prompts, max_new_tokens=40, **kw)
            joined = defaultdict(str)
            for i, piece in stream(model, tok, prompts, max_new_tokens=40, **kw):
                joined[i] += piece
            assert [joined[i] for i in range(3)] == texts


def test_stop_strings_cut_and_never_leak(bpe_tokenizer):
    tok = bpe_tokenizer
    model = tiny_model(vocab_size=tok.vocab_size, seed=3)
    kw = dict(max_new_tokens=40, temperature=1.0, seed=5)
    full = generate(model, tok, "def add", **kw)
    assert len(full) > 20
    for stop in (full[10:13], [full[15:19], full[6:8]], full[-2:]):
        stops = [stop] if isinstance(stop, str) else stop
        cut = min(full.index(s) for s in stops)
        text = generate(model, tok, "def add", stop=stop, **kw)
        assert text == full[:cut]
        shown = ""
        for piece in stream(model, tok, "def add", stop=stop, **kw):
            shown += piece
            assert text.startswith(shown)  # nothing shown is ever taken back
        assert shown == text


def test_detokenizer_holds_back_stop_prefixes(char_tokenizer):
    def pieces(text, stop):
        d = Detokenizer(char_tokenizer, stop)
        out = [d.push(i) for i in char_tokenizer.encode(text)]
        return [*out, d.close()], d

    out, d = pieces("hear me speak", ["me s"])
    assert "".join(out) == "hear " and d.stopped
    assert out[5:9] == ["", "", "", ""]  # "m", "e", " ", "s" were held, then cut
    out, d = pieces("hear me speak", ["mex"])
    assert out[5:8] == ["", "", "me "] and "".join(out) == "hear me speak" and not d.stopped
    out, _ = pieces("hear me spe", ["speak"])
    assert out[-1] == "spe"  # a held prefix is released when the row ends


def test_detokenizer_never_splits_a_character(bpe_tokenizer):
    text = "naïve 日本語 ok ✓"
    ids = bpe_tokenizer.encode(text)
    assert any("\ufffd" in bpe_tokenizer.decode([i]) for i in ids)  # bytes split across ids
    d = Detokenizer(bpe_tokenizer)
    out = [d.push(i) for i in ids] + [d.close()]
    assert not any("\ufffd" in p for p in out) and "".join(out) == text


def test_eos_ends_a_row(char_model, char_tokenizer):
    prompt, cfg = char_tokenizer.encode("First"), GREEDY.replace(max_new_tokens=30)
    ids = run_ids(char_model, [prompt], cfg, vocab_size=char_tokenizer.vocab_size)[0]
    eos = ids[6]
    tok = EosAs(char_tokenizer, eos)
    text = generate(char_model, tok, "First", max_new_tokens=30, temperature=0)
    assert text == char_tokenizer.decode(ids[: ids.index(eos)])
    longer = generate(char_model, tok, "First", max_new_tokens=30, temperature=0, stop_at_eos=False)
    assert longer == char_tokenizer.decode(ids)


def test_decoder_rows_finish_independently(char_model):
    prompts = random_prompts([2, 7], vocab=39, seed=6)
    cfg = GREEDY.replace(max_new_tokens=8)
    dec = generate_ids(char_model, prompts, cfg)
    first = next(dec)
    assert [e.row for e in first] == [0, 1]
    dec.finish(0)
    rest = list(dec)
    assert all([e.row for e in step] == [1] for step in rest) and len(rest) == 7
    assert rest[-1][0].finish_reason == "length"
    assert dec.finish_reasons == ["stop", "length"]
    alone = run_ids(char_model, [prompts[1]], cfg)[0]
    assert [first[1].token] + [s[0].token for s in rest] == alone


# -- context policy ------------------------------------------------------------------------


def test_slide_runs_past_block_size(char_model, char_tokenizer):
    cfg = GREEDY.replace(max_new_tokens=100)
    out = run_ids(char_model, random_prompts([5, 30]), cfg)
    assert [len(o) for o in out] == [100, 100]
    text = generate(
        char_model,
        char_tokenizer,
        "First",
        max_new_tokens=80,
        temperature=0.9,
        seed=0,
        stop_at_eos=False,
    )
    assert len(text) == 80  # one character per token


def test_long_prompt_keeps_its_end_with_a_warning(char_model, char_tokenizer):
    prompt = SAMPLE_TEXT[:50]
    with pytest.warns(UserWarning, match="dropped the oldest 18 tokens") as record:
        text = generate(char_model, char_tokenizer, prompt, max_new_tokens=10, temperature=0)
    assert record[0].filename == __file__  # the warning points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            generate(char_model, char_tokenizer, prompt[18:], max_new_tokens=10, temperature=0)
            == text
        )


def test_error_policy(char_model, char_tokenizer):
    prompt = SAMPLE_TEXT[:20]
    with pytest.raises(GptkitError, match=r"20 tokens and max_new_tokens is 20: 40 > .* 32"):
        generate(char_model, char_tokenizer, prompt, max_new_tokens=20, context_policy="error")
    with pytest.raises(GptkitError, match="shorten the prompt"):
        generate(char_model, char_tokenizer, SAMPLE_TEXT[:40], context_policy="error")
    text = generate(
        char_model,
        char_tokenizer,
        prompt,
        max_new_tokens=12,
        context_policy="error",
        seed=0,
        stop_at_eos=False,
    )
    assert len(text) == 12


# -- edges ---------------------------------------------------------------------------------


def test_empty_prompt_starts_from_eos(char_model, char_tokenizer):
    assert len(generate(char_model, char_tokenizer, "", max_new_tokens=5, stop_at_eos=False)) > 0
    no_eos = CharTokenizer(char_tokenizer.chars, special=(), eos=None)
    with pytest.raises(GptkitError, match="empty"):
        generate(char_model, no_eos, "", max_new_tokens=5)


def test_bad_prompt_ids(char_model):
    with pytest.raises(GptkitError, match="token id 999"):
        generate_ids(char_model, [[1, 999]], GREEDY)
    with pytest.raises(GptkitError, match="no tokens"):
        generate_ids(char_model, [[]], GREEDY)


def test_only_tokenizer_ids_are_sampled(char_model, char_tokenizer):
    # the model has 64 ids, the tokenizer 39: padding ids are never drawn
    cfg = SampleConfig(temperature=3.0, seed=0, max_new_tokens=200)
    out = run_ids(char_model, [[1, 2]], cfg, vocab_size=char_tokenizer.vocab_size)[0]
    assert max(out) < char_tokenizer.vocab_size


def test_trivial_requests(char_model, char_tokenizer):
    assert generate(char_model, char_tokenizer, "First", max_new_tokens=0) == ""
    assert generate(char_model, char_tokenizer, ["a", "b"], max_new_tokens=0) == ["", ""]
    assert generate(char_model, char_tokenizer, []) == []


def test_mode_and_dtype(char_tokenizer):
    model = tiny_model(**FAMILIES["llama"]).train()
    generate(model, char_tokenizer, "First", max_new_tokens=5)
    assert model.training  # the caller's mode comes back
    assert all(p.grad is None for p in model.parameters())
    half = tiny_model(**FAMILIES["llama"]).to(torch.bfloat16)
    text = generate(half, char_tokenizer, "First", max_new_tokens=40, temperature=0)
    assert len(text) == 40
