"""Character-level tokenizer: one id per Unicode character seen in the corpus.

The vocabulary is the sorted set of characters (as in nanoGPT's shakespeare_char), then the
special tokens. A character outside the vocabulary is an error that names it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.tokenizer.base import EOT, Tokenizer

FORMAT = "gptkit.char"


class CharTokenizer(Tokenizer):
    def __init__(
        self, chars: Iterable[str], special: Iterable[str] = (EOT,), eos: str | None = EOT
    ):
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise GptkitError("a character vocabulary must hold single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(special)}
        self.itos = self.chars + list(self.special_tokens)
        self.eos_token = eos if eos in self.special_tokens else None
        self._special_re = (
            re.compile("|".join(re.escape(s) for s in self.special_tokens))
            if self.special_tokens
            else None
        )

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        if not seen:
            raise GptkitError("the corpus has no text to build a character vocabulary from")
        return cls(seen)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def _encode_plain(self, text: str, offset: int = 0) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            pos = offset + text.index(c)
            raise GptkitError(
                f"character {c!r} (U+{ord(c):04X}) at position {pos} is not in this "
                f"character-level vocabulary of {len(self.chars)} characters; remove it, or "
                "use a byte-level tokenizer (--tokenizer bpe or gpt2) that encodes any text"
            ) from None

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if not allow_special or self._special_re is None:
            return self._encode_plain(text)
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            ids += self._encode_plain(text[start : m.start()], start)
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids += self._encode_plain(text[start:], start)
        return ids

    def decode(self, ids: list[int]) -> str:
        try:
            return "".join(self.itos[i] for i in ids)
        except (IndexError, TypeError):
            bad = next(i for i in ids if not (isinstance(i, int) and 0 <= i < len(self.itos)))
            raise GptkitError(
                f"token id {bad} is outside this tokenizer's {len(self.itos)} ids; "
                "the model and tokenizer do not belong together"
            ) from None

    def _canonical(self) -> dict[str, Any]:
        return {"type": FORMAT, "chars": self.chars, "special_tokens": list(self.special_tokens)}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self._canonical() | {"eos_token": self.eos_token}
        path = directory / "tokenizer.json"
        path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CharTokenizer:
        """The tokenizer a ``tokenizer.json`` of type ``gptkit.char`` describes (checked:
        ``chars`` a list of distinct single characters, special tokens non-empty text)."""
        chars, special = data.get("chars"), data.get("special_tokens", [EOT])
        eos = data.get("eos_token", EOT)

        def texts(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(c, str) and c for c in v)

        if not texts(chars) or len(set(chars)) != len(chars):
            raise GptkitError(
                "the character tokenizer has no valid 'chars' (a list of distinct single "
                "characters); the tokenizer.json is damaged"
            )
        if not texts(special) or (eos is not None and not isinstance(eos, str)):
            raise GptkitError(
                "the character tokenizer's special_tokens or eos_token are not text; the "
                "tokenizer.json is damaged"
            )
        return cls(chars, special, eos)
