"""Byte-level BPE vocabularies as GGUF stores them: a flat token list, ranked merges, a type
per token, special-token ids, and the *name* of the pre-tokenizer.

A GGUF file carries no ``tokenizer.json``; llama.cpp names the text-splitting rule in
``tokenizer.ggml.pre`` and implements each name in ``llama-vocab.cpp``. :data:`PRE_TOKENIZERS`
maps the names gptkit supports to the `tokenizers` pre-tokenizer that splits text the same way
(the one in the model's original ``tokenizer.json``), so the ids equal the original's.

::

    GGUF metadata                         tokenizers.Tokenizer
    tokenizer.ggml.tokens  ─┐
    tokenizer.ggml.merges  ─┼──► BPE model (vocab + merges; byte-level spelling)
    tokenizer.ggml.token_type ─► CONTROL / USER_DEFINED tokens become added tokens
    tokenizer.ggml.pre     ───► PRE_TOKENIZERS[name] (Digits / Split regex + ByteLevel)

:func:`from_vocab` builds a :class:`BPETokenizer` from those fields; :func:`to_vocab` takes
one apart again for export. This module knows nothing of the gguf file format itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from gptkit.errors import GptkitError
from gptkit.tokenizer.base import Tokenizer
from gptkit.tokenizer.bpe import BPETokenizer

# llama.cpp's token types (enum llama_token_type; gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
#: token types that are matched whole in text and never split (llama.cpp's special tokens)
_SPECIAL_TYPES = (UNKNOWN, CONTROL)


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text before BPE, for one family of ``tokenizer.ggml.pre`` names.

    ``regex`` None is GPT-2's own pattern (``ByteLevel(use_regex=True)``); ``digits`` first
    isolates every digit (StarCoder); ``ignore_merges`` emits a pre-token that is itself in the
    vocabulary without merging it (Llama 3).
    """

    regex: str | None = None
    digits: bool = False
    ignore_merges: bool = False
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token flag

    def build(self) -> pre_tokenizers.PreTokenizer:
        steps: list[pre_tokenizers.PreTokenizer] = []
        if self.digits:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        if self.regex is None:
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            steps.append(pre_tokenizers.Split(Regex(self.regex), behavior="isolated"))
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_GPT2 = PreTokenizer()
_STARCODER = PreTokenizer(digits=True)
_LLAMA3 = PreTokenizer(regex=_LLAMA3_REGEX, ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer(regex=_QWEN2_REGEX)

#: ``tokenizer.ggml.pre`` name -> how to split, grouped as in llama.cpp's ``llama-vocab.cpp``.
#: The first name of each group is the one :func:`to_vocab` writes. ("default" is absent on
#: purpose: llama.cpp gives it a regex set of its own, not GPT-2's.)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "gpt-2": _GPT2,
    "phi-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "jais": _GPT2,
    "starcoder": _STARCODER,
    "smollm": _STARCODER,
    "refact": _STARCODER,
    "command-r": _STARCODER,
    "codeshell": _STARCODER,
    "exaone": _STARCODER,
    "minerva": _STARCODER,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "falcon3": _LLAMA3,
    "falcon-h1": _LLAMA3,
    "pixtral": _LLAMA3,
    "midm-2.0": _LLAMA3,
    "lfm2": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "stablelm2": _QWEN2,
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (Radford et al. 2019, ``bytes_to_unicode``):
    printable Latin-1 bytes stand for themselves, the rest are shifted past U+0100."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = _byte_alphabet()
_ALPHABET = frozenset(_BYTE_CHARS.values())


def _spell(token: str) -> str:
    """A vocabulary entry in the byte-level alphabet (some files store plain text)."""
    if set(token) <= _ALPHABET:
        return token
    return "".join(_BYTE_CHARS[b] for b in token.encode("utf-8"))


@dataclass
class GGUFVocab:
    """The tokenizer fields of a GGUF file, in llama.cpp's terms."""

    tokens: list[str]
    merges: list[str]  # "left right", best first
    token_types: list[int]
    pre: str = "gpt-2"
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None  # None: the pre-tokenizer family's default
    chat_template: str | None = None


def from_vocab(vocab: GGUFVocab, origin: str = "the GGUF file") -> BPETokenizer:
    """A byte-level BPE tokenizer whose ids equal the file's token indices.

    CONTROL and UNKNOWN tokens become special added tokens (matched whole in text) and
    USER_DEFINED tokens plain added ones, as llama.cpp treats them; bos and eos are made
    special whatever their type, since generation needs them by name. (unk and pad keep their
    type: some files point pad at an ordinary token.)
    """
    n = len(vocab.tokens)
    if vocab.pre not in PRE_TOKENIZERS:
        raise GptkitError(
            f"{origin}: pre-tokenizer {vocab.pre!r} (tokenizer.ggml.pre) is not supported; "
            f"gptkit knows {', '.join(PRE_TOKENIZERS)}"
        )
    if len(vocab.token_types) not in (0, n):
        raise GptkitError(
            f"{origin}: {n} tokens but {len(vocab.token_types)} token types; the file is damaged"
        )
    types = vocab.token_types or [NORMAL] * n
    for i in (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id):
        if i is not None and not 0 <= i < n:
            raise GptkitError(f"{origin}: special token id {i} is outside the {n} tokens")
    named = {i for i in (vocab.bos_id, vocab.eos_id) if i is not None}
    special = [i for i in range(n) if types[i] in _SPECIAL_TYPES or i in named]
    user = [i for i in range(n) if types[i] == USER_DEFINED and i not in named]
    added = set(special) | set(user)

    ids: dict[str, int] = {}
    for i, token in enumerate(vocab.tokens):
        # Added tokens keep their text (they are matched in raw text); the rest are spelled
        # in the byte alphabet. A repeated spelling keeps its first id, as llama.cpp does.
        ids.setdefault(token if i in added else _spell(token), i)
    merges = []
    for rank, line in enumerate(vocab.merges):
        left, sep, right = line.partition(" ")
        if not sep or not left or not right or " " in right:
            raise GptkitError(f"{origin}: merge {rank} ({line!r}) is not 'left right'")
        merges.append((left, right))

    spec = PRE_TOKENIZERS[vocab.pre]
    tok = HFTokenizer(models.BPE(vocab=ids, merges=merges, ignore_merges=spec.ignore_merges))
    tok.pre_tokenizer = spec.build()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(vocab.tokens[i], special=True, normalized=False) for i in special]
    )
    tok.add_tokens([AddedToken(vocab.tokens[i], special=False, normalized=False) for i in user])
    for i in sorted(added):
        if tok.token_to_id(vocab.tokens[i]) != i:
            raise GptkitError(
                f"{origin}: token {i} ({vocab.tokens[i]!r}) repeats an earlier token's text; "
                "gptkit cannot keep both ids"
            )

    def text(i: int | None) -> str | None:
        return vocab.tokens[i] if i is not None else None

    out = BPETokenizer(tok, eos_token=text(vocab.eos_id), chat_template=vocab.chat_template)
    out.bos_token = text(vocab.bos_id) if text(vocab.bos_id) in out.special_tokens else None
    add_bos = spec.add_bos if vocab.add_bos is None else vocab.add_bos
    out.add_bos = bool(add_bos) and out.bos_token is not None
    return out


def _without_trim_offsets(node: Any) -> Any:
    # trim_offsets changes reported offsets, never ids.
    if isinstance(node, dict):
        return {k: _without_trim_offsets(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_without_trim_offsets(v) for v in node]
    return node


def _pre_name(data: dict[str, Any]) -> str | None:
    """The ``tokenizer.ggml.pre`` name whose pre-tokenizer matches a tokenizer.json's."""
    have = _without_trim_offsets(data.get("pre_tokenizer"))
    ignore_merges = bool(data["model"].get("ignore_merges", False))
    for name, spec in PRE_TOKENIZERS.items():
        probe = HFTokenizer(models.BPE())
        probe.pre_tokenizer = spec.build()
        built = json.loads(probe.to_str())["pre_tokenizer"]
        if _without_trim_offsets(built) == have and spec.ignore_merges == ignore_merges:
            return name
    return None


def to_vocab(tokenizer: Tokenizer, n_vocab: int | None = None) -> GGUFVocab:
    """The GGUF fields of a byte-level BPE tokenizer.

    Args:
        tokenizer: a byte-level BPE tokenizer (GPT-2 style); others raise GptkitError.
        n_vocab: the model's vocabulary size; ids the tokenizer lacks up to it are written
            as ``[PAD{i}]`` tokens of type UNUSED (llama.cpp requires one token per row).
    """
    if not isinstance(tokenizer, BPETokenizer):
        raise GptkitError(
            f"a {type(tokenizer).__name__} cannot be written to GGUF; GGUF export supports "
            "byte-level BPE tokenizers"
        )
    data = json.loads(tokenizer._tok.to_str())
    model = data.get("model") or {}
    unsupported = [
        what
        for what, bad in (
            ("a non-BPE model", model.get("type") != "BPE"),
            ("a normalizer", data.get("normalizer") is not None),
            ("a subword prefix or word suffix", bool(model.get("continuing_subword_prefix"))),
            ("a subword prefix or word suffix", bool(model.get("end_of_word_suffix"))),
            ("byte fallback", bool(model.get("byte_fallback"))),
        )
        if bad
    ]
    pre = _pre_name(data) if not unsupported else None
    if pre is None and not unsupported:
        unsupported.append(f"the pre-tokenizer {json.dumps(data.get('pre_tokenizer'))}")
    if unsupported:
        raise GptkitError(
            f"this tokenizer has {unsupported[0]}, which GGUF's byte-level BPE ('gpt2') cannot "
            f"express; gptkit writes the pre-tokenizers {', '.join(PRE_TOKENIZERS)}"
        )

    added_tokens = tokenizer._tok.get_added_tokens_decoder()
    top = max([*model["vocab"].values(), *added_tokens], default=-1)
    n = max(tokenizer.vocab_size, n_vocab or 0, top + 1)
    tokens: list[str | None] = [None] * n
    types = [NORMAL] * n
    for token, i in model["vocab"].items():
        tokens[i] = token
    for i, added in added_tokens.items():
        tokens[i] = added.content
        types[i] = CONTROL if added.special else USER_DEFINED
    for i in range(n):
        if tokens[i] is None:
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def id_of(text: str | None) -> int | None:
        return tokenizer.special_tokens.get(text) if text else None

    return GGUFVocab(
        tokens=[t for t in tokens if t is not None],
        merges=merges,
        token_types=types,
        pre=pre,
        bos_id=id_of(tokenizer.bos_token),
        eos_id=id_of(tokenizer.eos_token),
        add_bos=tokenizer.add_bos,
        chat_template=tokenizer.chat_template,
    )
