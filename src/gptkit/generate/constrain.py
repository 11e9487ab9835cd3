"""Structured output: a grammar (JSON Schema, regular expression, fixed choices) as a token mask.

The grammar engine is llguidance (Microsoft, MIT; https://github.com/guidance-ai/llguidance),
chosen over xgrammar and outlines-core by its per-token mask time on a 49k vocabulary
(``bench/structured.py``) and by needing no grammar precompilation over the vocabulary.
gptkit writes no masks itself: llguidance reads the tokenizer's vocabulary (a byte-level BPE
goes over as its Hugging Face ``tokenizer.json``; any other tokenizer as the bytes of each id)
and, at each step, says which ids keep the text inside the grammar::

    Grammar ─► grammar_text() ─► LLMatcher (one per row) ─┐
                                                          ▼
    logits (1, V) ─► masked_fill(~allowed()) ─► sample ─► advance(token) ─► done?

A row under a :class:`Constraint` may end (eos) only where the grammar accepts, and ends by
itself ("stop") once the grammar admits no further token.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import Any

import llguidance
import numpy as np
import torch
from torch import Tensor

from gptkit.config import Grammar, SampleConfig
from gptkit.errors import GptkitError
from gptkit.tokenizer.base import Tokenizer
from gptkit.tokenizer.bpe import BPETokenizer

# Fixed separators and no free whitespace: the text is compact, readable JSON, and a sampled
# row cannot spend its tokens on blank space.
_JSON_OPTIONS: Any = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


# -- the engine's view of the tokenizer and the grammar -------------------------------------

_LL_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = (
    weakref.WeakKeyDictionary()
)


class _TokenBytes:
    """llguidance's ``TokenizerWrapper`` protocol for a tokenizer that is not a Hugging Face
    one: the bytes of every id, the eos id, and an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.decode([i]).encode() for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_tokens.values())

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, allow_special=False)


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for ``tokenizer``, built once per tokenizer (about a second
    for a 50k vocabulary). A BPE tokenizer goes over as its ``tokenizer.json``, so the
    engine sees byte-level, metaspace and byte-fallback vocabularies exactly."""
    ll = _LL_TOKENIZERS.get(tokenizer)
    if ll is None:
        eos = tokenizer.eos_id
        if isinstance(tokenizer, BPETokenizer):
            ll = llguidance.LLTokenizer(tokenizer._tok.to_str(), eos_token=eos)
        else:
            ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenBytes(tokenizer)))
        _LL_TOKENIZERS[tokenizer] = ll
    return ll


def grammar_text(grammar: Grammar, tokenizer: Tokenizer) -> str:
    """The llguidance grammar of ``grammar``, checked against ``tokenizer``'s vocabulary.

    Raises:
        GptkitError: naming the field, for a bad regex, a schema that is not valid JSON
            Schema or that no text satisfies, or empty choices.
    """
    try:
        if grammar.kind == "regex":
            text = llguidance.LLMatcher.grammar_from_regex(grammar.source)
        elif grammar.kind == "choices":
            alternatives = " | ".join(
                json.dumps(c, ensure_ascii=False) for c in json.loads(grammar.source)
            )
            text = llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        else:
            schema = (
                json.loads(grammar.source) if grammar.kind == "json_schema" else {"type": "object"}
            )
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GptkitError(f"{grammar.field}: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(text, ll_tokenizer(tokenizer))
    if error:
        raise GptkitError(f"{grammar.field}: {_one_line(error)}")
    return text


def _one_line(message: str) -> str:
    return re.sub(r"\s+", " ", message).strip()


class Constraint:
    """One row's place in its grammar: which ids may come next, and the move on each token.

    Args:
        grammar: what the row's text must match.
        tokenizer: the model's tokenizer (its vocabulary is what the mask covers).
        vocab_size: the mask covers ids below this (the ids the row may sample).
        text: the checked grammar from :func:`grammar_text`, when the caller has it.
    """

    def __init__(
        self, grammar: Grammar, tokenizer: Tokenizer, vocab_size: int, text: str | None = None
    ):
        ll = ll_tokenizer(tokenizer)
        self.matcher = llguidance.LLMatcher(ll, text or grammar_text(grammar, tokenizer))
        self.vocab_size = vocab_size
        self._bitmask = np.zeros((ll.vocab_size + 31) // 32, dtype=np.int32)  # bit i: id i

    def allowed(self) -> Tensor:
        """(V,) bool: the ids that keep the text inside the grammar (eos only where it may
        end)."""
        bits = self._bitmask
        self.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        # as little-endian words, byte k of word w holds ids 32 w + 8 k ... 32 w + 8 k + 7
        little = bits.astype("<i4", copy=False).view(np.uint8)
        mask = np.unpackbits(little, bitorder="little").view(np.bool_)
        allowed = np.zeros(self.vocab_size, dtype=np.bool_)
        n = min(self.vocab_size, mask.size)
        allowed[:n] = mask[:n]
        return torch.from_numpy(allowed)

    def advance(self, token: int) -> bool:
        """Move past ``token``; True when the grammar is then complete and admits no further
        token. A token the grammar refuses (a forced one) is an error."""
        if not self.matcher.consume_token(token):
            raise GptkitError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
        return self.matcher.is_stopped()


def constraint_of(
    params: SampleConfig, tokenizer: Tokenizer | None, vocab_size: int
) -> Constraint | None:
    """The :class:`Constraint` of a row decoded with ``params`` (None without a grammar)."""
    grammar = params.grammar
    if grammar is None:
        return None
    if tokenizer is None:
        raise GptkitError(f"{grammar.field} needs the tokenizer: decode text, not bare token ids")
    return Constraint(grammar, tokenizer, vocab_size)
