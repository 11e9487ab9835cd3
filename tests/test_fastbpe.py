"""The C encoder for GPT-2-style byte-level BPE (gptkit.tokenizer._fastbpe): the same ids as
the ``tokenizers`` path it replaces and as tiktoken's gpt2 encoding, on tiny Shakespeare,
edge cases and generated Unicode; which tokenizers take it; and its pre-tokenizer and
character classes against the regex engine's, code point by code point."""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import threading
import unicodedata
from array import array
from typing import Any

import pytest
from conftest import SHARED_DATA
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from gptkit.tokenizer import EOT, BPETokenizer, bpe
from gptkit.tokenizer.vocab import PRE_TOKENIZERS

fastbpe = pytest.importorskip(
    "gptkit.tokenizer._fastbpe",
    reason="the C extension is not built (`pip install -e .` with a C compiler builds it)",
)


#: \s in both regex engines (Unicode's White_Space property)
WHITE_SPACE = frozenset(
    [
        *range(0x9, 0xE),
        *(0x20, 0x85, 0xA0, 0x1680),
        *range(0x2000, 0x200B),
        *(0x2028, 0x2029, 0x202F, 0x205F, 0x3000),
    ]
)


def encoder_tables(tok: BPETokenizer) -> tuple[array, array]:
    """The C encoder's arguments for ``tok``: each byte's id, and (left, right, merged) ids."""
    data = json.loads(tok._tok.to_str())["model"]
    vocab = data["vocab"]
    byte_ids = array("i", [vocab[c] for c in bpe._bytes_to_unicode()])
    merges = array("i")
    for a, b in data["merges"]:
        merges.extend((vocab[a], vocab[b], vocab[a + b]))
    return byte_ids, merges


@pytest.fixture(scope="module")
def gpt2_tables(gpt2: BPETokenizer) -> tuple[array, array]:
    return encoder_tables(gpt2)


@pytest.fixture(scope="module")
def heap_only(gpt2_tables: tuple[array, array]) -> Any:
    """GPT-2's C encoder with every piece merged through the heap, never the linear scan."""
    return fastbpe.Encoder(*gpt2_tables, linear_max=0)


def hf_ids(tok: BPETokenizer, text: str, allow_special: bool = True) -> list[int]:
    """The ``tokenizers`` path, as encode took it before the fast path."""
    hf = tok._tok if allow_special or not tok.special_tokens else tok._plain_tok()
    return hf.encode(text, add_special_tokens=False).ids


def check_gpt2(gpt2: BPETokenizer, tiktoken_gpt2: Any, heap_only: Any, text: str) -> None:
    ours = gpt2.encode(text, allow_special=False)
    assert ours == hf_ids(gpt2, text, allow_special=False)
    assert ours == tiktoken_gpt2.encode_ordinary(text)
    assert ours == heap_only.encode(text)
    assert gpt2.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.encode(text) == hf_ids(gpt2, text)


EDGE_CASES = [
    "",
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n\n",
    "\t",
    " \n ",
    "\r\n",
    "a\r\nb\r\n\r\n",
    "  a",
    "a  ",
    "a \n b",
    "\u00a0a",
    " \u00a0a",
    "\u3000\u3000x",
    "x\u2028\u2029y",
    "'s'S'll",
    "'S 'T 'Re 'LL 'D",
    "it's we're they've I'm you'll he'd don't",
    "''s '''t '",
    "'",
    "'r'e",
    "rock'n'roll",
    " 's",
    "!'s",
    "0123456789",
    "3.14159 1,000,000 ½ ² ٣ 𝟘",
    "中文字符测试，标点。",
    "日本語のテキスト",
    "한국어 텍스트",
    "emoji 🎉🧪👍🏽 👨‍👩‍👧 🏳️‍🌈",
    "e\u0301 a\u0308 \u0915\u093f",  # combining marks
    "𐐷𝔸𝕊 astral letters 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\x00\x01\x1c\x1f\x7f",
    "\ufeffBOM",
    "تست عربی",
    "\U000105c0\U000105c1 a\U00010d40",  # Unicode 16 letters and digits
    "a" * 3000,
    " " * 3000 + "a",
    "\n" * 1000,
    "1" * 2000,
    "🎉" * 500,
    "!" * 2000 + "x",
    EOT,
    f"a{EOT}b",
    f" {EOT} ",
    f"{EOT}{EOT}",
    "<|endoftext",
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_equal_tokenizers_and_tiktoken(
    gpt2: BPETokenizer, tiktoken_gpt2: Any, heap_only: Any, text: str
) -> None:
    check_gpt2(gpt2, tiktoken_gpt2, heap_only, text)


def test_gpt2_takes_the_fast_path(gpt2: BPETokenizer) -> None:
    assert gpt2.fast


def test_tiny_shakespeare(gpt2: BPETokenizer, tiktoken_gpt2: Any, heap_only: Any) -> None:
    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent (set GPTKIT_DATA to the shared data directory)")
    text = path.read_text(encoding="utf-8")
    whole = gpt2.encode(text)
    assert whole == tiktoken_gpt2.encode_ordinary(text) == hf_ids(gpt2, text)
    assert heap_only.encode(text) == whole
    lines = text.splitlines(keepends=True)
    hf = [e.ids for e in gpt2._tok.encode_batch(lines, add_special_tokens=False)]
    assert gpt2.encode_batch(lines) == hf
    assert gpt2.encode_batch(lines, allow_special=False) == hf


def contractions() -> st.SearchStrategy[str]:
    parts = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'LL"]
    parts += ["'", "''", "s", "t", "re", "ll", " ", "  ", "\n", "don", "I", "x", "1", "!", "é"]
    return st.lists(st.sampled_from(parts), max_size=30).map("".join)


def whitespace_heavy() -> st.SearchStrategy[str]:
    chars = [" ", " ", "\t", "\n", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u2028", "\u3000"]
    chars += ["a", "Z", "é", "中", "1", "٣", "!", "'", "s", "🎉", "\u0301", "\x1c"]
    return st.text(alphabet=st.sampled_from(chars), max_size=60)


def with_specials() -> st.SearchStrategy[str]:
    pieces = st.one_of(
        st.text(max_size=10), st.sampled_from([EOT, "<|endoftext", "|>", "<|", " ", "\n"])
    )
    return st.lists(pieces, max_size=8).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), contractions(), whitespace_heavy(), with_specials()))
def test_generated_text_equals_tokenizers_and_tiktoken(
    gpt2: BPETokenizer, tiktoken_gpt2: Any, heap_only: Any, text: str
) -> None:
    check_gpt2(gpt2, tiktoken_gpt2, heap_only, text)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(min_codepoint=0x80, exclude_categories=["Cs"]), max_size=40))
def test_non_ascii_text_equals_tiktoken(
    gpt2: BPETokenizer, tiktoken_gpt2: Any, heap_only: Any, text: str
) -> None:
    check_gpt2(gpt2, tiktoken_gpt2, heap_only, text)


def test_batch_and_repeated_calls_agree(gpt2: BPETokenizer) -> None:
    texts = [*EDGE_CASES, *EDGE_CASES]  # the second round comes from the cache
    singles = [hf_ids(gpt2, t) for t in texts]
    assert gpt2.encode_batch(texts) == singles
    assert [gpt2.encode(t) for t in texts] == singles


def test_lone_surrogates_fail_as_tokenizers_does(gpt2: BPETokenizer) -> None:
    with pytest.raises(TypeError):
        gpt2._tok.encode("a\ud800b")
    with pytest.raises(TypeError):
        gpt2.encode("a\ud800b")
    with pytest.raises(TypeError):
        gpt2.encode_batch(["ok", "a\udfffb"])


def test_cache_fills_and_clears(gpt2_tables: tuple[array, array]) -> None:
    enc = fastbpe.Encoder(*gpt2_tables)
    first = enc.encode("hello hello world, hello")
    assert enc.cache_len > 0
    assert enc.encode("hello hello world, hello") == first
    enc.clear_cache()
    assert enc.cache_len == 0
    assert enc.encode("hello hello world, hello") == first


def test_a_full_cache_starts_over(gpt2: BPETokenizer, gpt2_tables: tuple[array, array]) -> None:
    enc = fastbpe.Encoder(*gpt2_tables, cache_max=50)
    text = " ".join(f"word{i} other{i * 7}" for i in range(2000))
    assert enc.encode(text) == gpt2.encode(text)
    assert 0 < enc.cache_len <= 50


def test_ids_past_16_bits(gpt2: BPETokenizer, gpt2_tables: tuple[array, array]) -> None:
    """Ids and ranks that fit in 16 bits pack into a narrow merge table (GPT-2's do); wider
    ones take the other table and must give the same merges."""
    shift = 100_000
    byte_ids, merges = (array("i", [i + shift for i in t]) for t in gpt2_tables)
    wide = fastbpe.Encoder(byte_ids, merges)
    for text in [*EDGE_CASES, "It's a test: 1234 don't \n\n  emoji 🎉"]:
        assert wide.encode(text) == [i + shift for i in gpt2.encode(text, allow_special=False)]


def test_encoder_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="256"):
        fastbpe.Encoder(array("i", range(255)), array("i"))
    with pytest.raises(ValueError, match="multiple of 3"):
        fastbpe.Encoder(array("i", range(256)), array("i", [1, 2]))
    with pytest.raises(ValueError, match="non-negative"):
        fastbpe.Encoder(array("i", range(256)), array("i", [1, 2, -3]))
    with pytest.raises(TypeError):
        fastbpe.Encoder(array("i", range(256)), array("i")).encode(b"bytes")


def test_threads_share_one_encoder(gpt2: BPETokenizer) -> None:
    """Long texts release the GIL; the encoder's cache is never used by two at once."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzéü"

    def word() -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(1, 12)))

    # words never seen before, so that the threads merge and grow the cache all along
    texts = [" ".join(word() for _ in range(20_000)) for _ in range(4)]
    expected = [hf_ids(gpt2, t) for t in texts]
    tok = BPETokenizer(gpt2._tok, gpt2.eos_token)  # an empty cache
    got: list[Any] = [None] * len(texts)

    def run(i: int) -> None:
        got[i] = [tok.encode(texts[i]) for _ in range(3)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [[ids] * 3 for ids in expected]


def test_pickles_and_rebuilds(gpt2: BPETokenizer) -> None:
    assert gpt2.fast
    again = pickle.loads(pickle.dumps(gpt2))
    assert again.fast and again.encode("pickled twice") == gpt2.encode("pickled twice")


def test_without_the_extension_tokenizers_encodes(
    monkeypatch: pytest.MonkeyPatch, gpt2: BPETokenizer
) -> None:
    monkeypatch.setattr(bpe, "_fastbpe", None)
    slow = BPETokenizer(gpt2._tok, gpt2.eos_token)
    assert not slow.fast
    for text in EDGE_CASES[:20]:
        assert slow.encode(text) == gpt2.encode(text)


# -- merge order, on a toy vocabulary where it shows ------------------------------------------

#: overlapping merges, so that ties (one pair twice in a piece) and order decide the ids
TOY_MERGES = [("a", "a"), ("Ġ", "Ġ"), ("b", "a"), ("aa", "a"), ("a", "b"), ("a", "aa")]
TOY_MERGES += [("ab", "a"), ("Ġ", "a"), ("ĠĠ", "Ġ"), ("ba", "b"), ("aa", "aa"), ("Ġa", "b")]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> BPETokenizer:
    d = tmp_path_factory.mktemp("toy")
    vocab = {c: i for i, c in enumerate(bpe._bytes_to_unicode())}
    for a, b in TOY_MERGES:
        vocab.setdefault(a + b, len(vocab))
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("".join(f"{a} {b}\n" for a, b in TOY_MERGES))
    return BPETokenizer.from_gpt2_files(d / "vocab.json", d / "merges.txt")


def test_toy_ties_merge_leftmost_first(toy: BPETokenizer) -> None:
    aa, aaa = toy._tok.token_to_id("aa"), toy._tok.token_to_id("aaa")
    assert toy.fast
    # a a a a a -> aa aa a (leftmost of three equal pairs) -> aa aaa (rank 3 before 10);
    # rightmost first would give a aa aa -> aaa aa
    assert toy.encode("aaaaa") == hf_ids(toy, "aaaaa") == [aa, aaa]


def test_a_repeated_merge_keeps_its_later_rank() -> None:
    """As tokenizers' merge map does (it also drops the earlier line when it saves)."""
    byte_ids = array("i", range(256))
    a, b, c, ab, bc = ord("a"), ord("b"), ord("c"), 256, 257
    enc = fastbpe.Encoder(byte_ids, array("i", [a, b, ab, b, c, bc, a, b, ab]))
    assert enc.encode("abc") == [a, bc]
    assert fastbpe.Encoder(byte_ids, array("i", [a, b, ab, b, c, bc])).encode("abc") == [ab, c]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="aab b", max_size=300))
def test_toy_merges_equal_tokenizers_linear_and_heap(toy: BPETokenizer, text: str) -> None:
    fast = toy._fast_path()
    assert fast is not None
    want = hf_ids(toy, text)
    assert toy.encode(text) == want
    for linear_max in (0, 2, 1 << 20):
        assert fastbpe.Encoder(*encoder_tables(toy), linear_max=linear_max).encode(text) == want


# -- which tokenizers take the fast path -------------------------------------------------------


def _variant(tok: BPETokenizer, **changes: Any) -> BPETokenizer:
    """A copy of ``tok`` with pipeline parts replaced (tokenizers objects), or with its JSON
    edited (``model`` holds a dict of model fields to set)."""
    data = json.loads(tok._tok.to_str())
    data["model"].update(changes.pop("model", {}))
    hf = HFTokenizer.from_str(json.dumps(data))
    for name, value in changes.items():
        setattr(hf, name, value)
    return BPETokenizer(hf, tok.eos_token)


VARIANT_TEXTS = ["Hello world!  It's 2024.\n\n", f"a{EOT}b", "  Ünïcödé 中文 🎉", "x<y>z<y>"]


def test_trained_byte_level_bpe_takes_the_fast_path(bpe_tokenizer: BPETokenizer) -> None:
    assert bpe_tokenizer.fast
    for text in VARIANT_TEXTS:
        for allow in (True, False):
            assert bpe_tokenizer.encode(text, allow) == hf_ids(bpe_tokenizer, text, allow)


@pytest.mark.parametrize(
    "changes",
    [
        {"pre_tokenizer": pre_tokenizers.ByteLevel(add_prefix_space=True)},
        {"pre_tokenizer": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)},
        {"pre_tokenizer": PRE_TOKENIZERS["llama3"].build()},  # Llama 3's regex
        {"pre_tokenizer": PRE_TOKENIZERS["smollm"].build()},  # digits first (SmolLM2)
        {"normalizer": normalizers.NFC()},
        {"model": {"ignore_merges": True}},
        {"model": {"end_of_word_suffix": "</w>"}},
    ],
    ids=["prefix-space", "no-regex", "llama3", "smollm", "nfc", "ignore-merges", "suffix"],
)
def test_other_pipelines_stay_on_tokenizers(
    bpe_tokenizer: BPETokenizer, changes: dict[str, Any]
) -> None:
    tok = _variant(bpe_tokenizer, **changes)
    assert not tok.fast
    for text in VARIANT_TEXTS:
        assert tok.encode(text) == hf_ids(tok, text)


def test_gguf_vocabularies_by_pre_tokenizer(gpt2: BPETokenizer) -> None:
    """A GGUF file's tokenizer takes the fast path when its pre-tokenizer is GPT-2's."""
    from gptkit.tokenizer.vocab import from_vocab, to_vocab

    vocab = to_vocab(gpt2)
    text = "GGUF's vocab: 123 words\n\n  and <|endoftext|> too"
    for pre, fast in (("gpt-2", True), ("olmo", True), ("smollm", False), ("llama3", False)):
        tok = from_vocab(dataclasses.replace(vocab, pre=pre))
        assert tok.fast is fast, pre
        assert tok.encode(text) == hf_ids(tok, text)
        assert tok.encode(text, allow_special=False) == hf_ids(tok, text, False)
    assert from_vocab(vocab).encode(text) == gpt2.encode(text)


def test_post_processor_does_not_matter(bpe_tokenizer: BPETokenizer) -> None:
    """encode never adds special tokens, so a template processor changes nothing."""
    eos = bpe_tokenizer.eos_id
    tok = _variant(
        bpe_tokenizer,
        post_processor=processors.TemplateProcessing(
            single=f"{EOT} $A", special_tokens=[(EOT, eos)]
        ),
    )
    assert tok.fast
    for text in VARIANT_TEXTS:
        assert tok.encode(text) == hf_ids(tok, text)


def _with_added(tok: BPETokenizer, special: list[AddedToken], plain: list[AddedToken]) -> Any:
    hf = HFTokenizer.from_str(tok._tok.to_str())
    hf.add_special_tokens(special)
    hf.add_tokens(plain)
    return BPETokenizer(hf, tok.eos_token)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet="ab <>y\n", max_size=6),
            st.sampled_from(["<y>", "<y><y>", "<y", "y>", EOT, "<yy>", "<"]),
        ),
        max_size=10,
    ).map("".join)
)
def test_added_tokens_split_leftmost_longest(bpe_tokenizer: BPETokenizer, text: str) -> None:
    # overlapping added tokens, special and not: tokenizers takes the leftmost, then longest
    tok = _with_added(
        bpe_tokenizer,
        [AddedToken("<y>", special=True, normalized=False)],
        [AddedToken("<y><y>", normalized=False), AddedToken("<yy>", normalized=False)],
    )
    assert tok.fast
    for allow in (True, False):
        assert tok.encode(text, allow) == hf_ids(tok, text, allow)
        assert tok.encode_batch([text, text], allow) == [hf_ids(tok, text, allow)] * 2


def test_only_plain_added_tokens_are_matched_even_without_allow_special(
    bpe_tokenizer: BPETokenizer,
) -> None:
    """No special tokens: allow_special=False still uses the full tokenizer, as before."""
    data = json.loads(bpe_tokenizer._tok.to_str())
    data["added_tokens"] = []
    hf = HFTokenizer.from_str(json.dumps(data))
    hf.add_tokens([AddedToken("<y>", normalized=False)])
    tok = BPETokenizer(hf, None)
    assert tok.fast and not tok.special_tokens
    assert tok.encode("a<y>b", allow_special=False) == hf_ids(tok, "a<y>b", False)
    assert tok.encode("a<y>b", allow_special=False) == hf.encode("a<y>b").ids


@pytest.mark.parametrize(
    "token",
    [
        AddedToken("<y>", lstrip=True, special=True, normalized=False),
        AddedToken("<y>", rstrip=True, special=True, normalized=False),
        AddedToken("y", single_word=True, special=True, normalized=False),
    ],
    ids=["lstrip", "rstrip", "single-word"],
)
def test_added_tokens_with_options_go_through_tokenizers(
    bpe_tokenizer: BPETokenizer, token: AddedToken
) -> None:
    tok = _with_added(bpe_tokenizer, [token], [])
    assert tok.fast  # ordinary text, allow_special=False, still takes the fast path
    for text in ["a <y> b", "a<y>b", "y y ay", " <y>  <y>"]:
        for allow in (True, False):
            assert tok.encode(text, allow) == hf_ids(tok, text, allow)


# -- the pre-tokenizer and its character classes ------------------------------------------------


def hf_split(text: str) -> list[str]:
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return [text[a:b] for _, (a, b) in pre.pre_tokenize_str(text)]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), contractions(), whitespace_heavy()))
def test_split_equals_tokenizers(text: str) -> None:
    assert fastbpe.split(text) == hf_split(text)


def test_classes_equal_unicodedata_where_python_knows_the_character() -> None:
    """Every code point assigned in Python's Unicode database: L* letters, N* numbers,
    White_Space spaces, the rest other. (Unassigned ones there may be assigned in the
    regex engines' newer Unicode; the test below checks those.)"""
    classes = fastbpe.classes()
    assert len(classes) == 0x110000
    wrong = []
    for cp in range(0x110000):
        cat = unicodedata.category(chr(cp))
        if cat == "Cn":
            continue
        want = 3 if cp in WHITE_SPACE else {"L": 1, "N": 2}.get(cat[0], 0)
        if classes[cp] != want:
            wrong.append(f"U+{cp:04X} {cat}: {classes[cp]} != {want}")
    assert not wrong, wrong[:20]


def _probe(code_points: list[int]) -> str:
    # around each code point c: "a" c "1" joins a letter to "a" and a number to "1"; "!" c
    # joins c to "!" when c is neither letter, number nor space
    return "".join(f"a{chr(c)}1!{chr(c)}" for c in code_points)


@pytest.mark.parametrize(
    "lo,hi",
    [
        (0, 0x40000),
        pytest.param(0x40000, 0xE0000, marks=pytest.mark.slow),  # unassigned in Unicode 16
        (0xE0000, 0x110000),
    ],
)
def test_split_equals_tokenizers_at_unassigned_code_points(lo: int, hi: int) -> None:
    """Code points that Python's Unicode database leaves unassigned (``Cn``), where the
    regex engines' newer tables may know a letter or a number."""
    cps = [
        c
        for c in range(lo, hi)
        if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) == "Cn"
    ]
    for start in range(0, len(cps), 50_000):
        text = _probe(cps[start : start + 50_000])
        ours, theirs = fastbpe.split(text), hf_split(text)
        if ours != theirs:
            pairs = zip(ours, theirs, strict=False)
            k = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ours), len(theirs)))
            where = [f"U+{ord(c):04X}" for c in "".join(ours[max(k - 2, 0) : k + 2])]
            pytest.fail(f"split differs: {ours[k : k + 1]} vs {theirs[k : k + 1]} among {where}")
