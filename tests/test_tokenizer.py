"""Tokenizers: round trips, GPT-2 parity with tiktoken, save/load, the loader's dispatch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLE_TEXT, SHARED_DATA, shared_path
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.errors import GptkitError
from gptkit.tokenizer import EOT, BPETokenizer, CharTokenizer, load_tokenizer


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_trained_bpe_round_trips_any_unicode(bpe_tokenizer: BPETokenizer, s: str) -> None:
    assert bpe_tokenizer.decode(bpe_tokenizer.encode(s)) == s
    assert bpe_tokenizer.decode(bpe_tokenizer.encode(s, allow_special=False)) == s


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_gpt2_bpe_round_trips_any_unicode(gpt2: BPETokenizer, s: str) -> None:
    assert gpt2.decode(gpt2.encode(s)) == s


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=sorted(set(SAMPLE_TEXT))))
def test_char_round_trips_its_alphabet(char_tokenizer: CharTokenizer, s: str) -> None:
    assert char_tokenizer.decode(char_tokenizer.encode(s)) == s


def test_char_names_unknown_character(char_tokenizer: CharTokenizer) -> None:
    with pytest.raises(GptkitError, match=r"'é' \(U\+00E9\) at position 3"):
        char_tokenizer.encode("abcé")


def test_special_tokens_are_ids_only_when_allowed(bpe_tokenizer: BPETokenizer) -> None:
    eos = bpe_tokenizer.eos_id
    assert eos is not None
    assert eos in bpe_tokenizer.encode(f"a{EOT}b")
    assert eos not in bpe_tokenizer.encode(f"a{EOT}b", allow_special=False)


GPT2_SAMPLES = [
    "Hello world! It's a test: don't, won't, they're, I've, we'll, he'd.",
    "   leading spaces, trailing spaces   \n\n\tTabs\r\nand CRLF",
    "Numbers 1234567 and 3.14159, emoji 🎉🧪, accents café naïve, 中文字符, العربية",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|endoftext|> as plain text",
]


def test_gpt2_ids_equal_tiktoken(gpt2: BPETokenizer, tiktoken_gpt2: Any) -> None:
    enc = tiktoken_gpt2
    texts = [*GPT2_SAMPLES]
    shakespeare = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if shakespeare.exists():
        texts.append(shakespeare.read_text()[:200_000])
    for text in texts:
        assert gpt2.encode(text, allow_special=False) == enc.encode_ordinary(text)
    assert gpt2.encode(f"a{EOT}b") == enc.encode(f"a{EOT}b", allowed_special="all")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_keeps_ids_and_hash(
    tmp_path: Path, kind: str, char_tokenizer: CharTokenizer, bpe_tokenizer: BPETokenizer
) -> None:
    tok = char_tokenizer if kind == "char" else bpe_tokenizer
    tok.save(tmp_path)
    for source in (tmp_path, tmp_path / "tokenizer.json"):
        again = load_tokenizer(source)
        assert type(again) is type(tok)
        assert again.hash == tok.hash
        assert again.eos_id == tok.eos_id
        assert again.encode(SAMPLE_TEXT) == tok.encode(SAMPLE_TEXT)


def test_load_gpt2_directory_both_file_pairs(tmp_path: Path, gpt2: BPETokenizer) -> None:
    d = shared_path("gpt2")
    (tmp_path / "vocab.json").write_bytes((d / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((d / "vocab.bpe").read_bytes())
    for source in (d, tmp_path):
        tok = load_tokenizer(source)
        assert tok.vocab_size == 50257 and tok.eos_id == 50256
        assert tok.hash == gpt2.hash


def test_hash_differs_between_tokenizers(
    char_tokenizer: CharTokenizer, bpe_tokenizer: BPETokenizer
) -> None:
    other = BPETokenizer.train(iter(["something else entirely " * 50]), 280, show_progress=False)
    assert len({char_tokenizer.hash, bpe_tokenizer.hash, other.hash}) == 3


def test_bad_tokenizer_sources(tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(GptkitError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(GptkitError, match="cannot read tokenizer file"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(GptkitError, match="neither"):
        load_tokenizer(bad)


def test_bpe_vocab_size_floor() -> None:
    with pytest.raises(GptkitError, match="at least 257"):
        BPETokenizer.train(iter(["abc"]), vocab_size=100, show_progress=False)
