"""What every gptkit tokenizer offers, whatever its algorithm."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

EOT = "<|endoftext|>"  # GPT-2's end-of-text token; gptkit's default document separator


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses: :class:`CharTokenizer`, :class:`BPETokenizer`."""

    #: special token text -> id (end-of-text, chat markers, ...)
    special_tokens: dict[str, int]
    #: the text of the end-of-sequence token, or None
    eos_token: str | None
    #: a jinja2 chat template, when the tokenizer came with one
    chat_template: str | None = None
    #: every named template when the tokenizer file held transformers' list form
    #: (``chat_template`` is then its ``default``; ``tool_use`` is rendered when tools are given)
    chat_templates: dict[str, str] | None = None
    #: the text of the beginning-of-sequence token, or None
    bos_token: str | None = None
    #: whether a model expects ``bos_token`` before every sequence (Llama-family models);
    #: ``encode`` never adds it, generation and chat do
    add_bos: bool = False

    @abstractmethod
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text to ids. With ``allow_special`` the text of a special token maps to its id;
        without, it is encoded as ordinary text (use this for untrusted corpora)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Ids to text; special tokens come back as their text."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @abstractmethod
    def _canonical(self) -> dict[str, Any]:
        """A JSON-able description that determines the id mapping (used for the hash)."""

    @abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` (and ``tokenizer_config.json``) into ``directory``."""

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        return [self.encode(t, allow_special) for t in texts]

    @property
    def eos_id(self) -> int | None:
        return self.special_tokens.get(self.eos_token) if self.eos_token else None

    @property
    def bos_id(self) -> int | None:
        return self.special_tokens.get(self.bos_token) if self.bos_token else None

    def encode_prompt(self, text: str) -> list[int]:
        """``encode`` plus the bos token when the model expects one."""
        ids = self.encode(text)
        bos = self.bos_id
        if self.add_bos and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    @property
    def hash(self) -> str:
        """A short fingerprint of the id mapping: equal hashes mean equal encodings."""
        blob = json.dumps(self._canonical(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _save_config(self, directory: Path) -> None:
        # The same file and keys transformers reads beside tokenizer.json.
        cfg: dict[str, Any] = {"eos_token": self.eos_token}
        if self.bos_token:
            cfg["bos_token"] = self.bos_token
            cfg["add_bos_token"] = self.add_bos
        if self.chat_templates:
            named = self.chat_templates | {"default": self.chat_template}
            cfg["chat_template"] = [{"name": n, "template": t} for n, t in named.items()]
        elif self.chat_template:
            cfg["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos={self.eos_token!r})"
