"""Byte-level BPE (Radford et al. 2019, GPT-2), on the Hugging Face ``tokenizers`` library.

Three ways in: train on a corpus at a chosen vocabulary size; load GPT-2's own files
(``encoder.json`` + ``vocab.bpe``, or ``vocab.json`` + ``merges.txt``); or read a
``tokenizer.json``. Text is split with GPT-2's regex, mapped to bytes, and merged by rank, so
``decode(encode(s)) == s`` for every Unicode string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from gptkit.errors import GptkitError
from gptkit.tokenizer.base import EOT, Tokenizer


def _byte_level(model: models.Model, special: Iterable[str]) -> HFTokenizer:
    tok = HFTokenizer(model)
    # add_prefix_space=False and the GPT-2 regex: exactly GPT-2's pre-tokenisation.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special))
    return tok


def _read_vocab_merges(
    vocab_path: str | Path, merges_path: str | Path, what: str
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A token -> id JSON file and a ranked merges file (one "a b" pair a line)."""
    try:
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise GptkitError(f"cannot read {what} BPE files: {e}") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise GptkitError(f"{merges_path}:{n}: a merge line holds two tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    return vocab, merges


def _token_text(raw: Any) -> str | None:
    """tokenizer_config.json writes a token as its text or as {"content": text, ...}."""
    return raw.get("content") if isinstance(raw, dict) else raw


class BPETokenizer(Tokenizer):
    def __init__(
        self,
        tok: HFTokenizer,
        eos_token: str | None = EOT,
        chat_template: str | None = None,
    ):
        self._tok = tok
        self._plain: HFTokenizer | None = None
        self.special_tokens = {
            t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special
        }
        self.eos_token = eos_token if eos_token in self.special_tokens else None
        self.chat_template = chat_template

    # -- construction ------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterator[str],
        vocab_size: int,
        special: Iterable[str] = (EOT,),
        show_progress: bool = True,
    ) -> BPETokenizer:
        """Learn merges from ``texts`` (an iterator; the corpus is never held whole)."""
        special = list(special)
        floor = 256 + len(special)
        if vocab_size < floor:
            raise GptkitError(
                f"--vocab-size {vocab_size} is too small for byte-level BPE: it needs at "
                f"least {floor} (256 bytes + {len(special)} special tokens)"
            )
        tok = _byte_level(models.BPE(), [])
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        if tok.get_vocab_size() <= floor - 1:
            raise GptkitError("the corpus has no text to train a BPE tokenizer on")
        return cls(tok, EOT if EOT in special else None)

    @classmethod
    def from_gpt2_files(cls, vocab_path: str | Path, merges_path: str | Path) -> BPETokenizer:
        """GPT-2's ``encoder.json`` or ``vocab.json`` (token -> id) and ``vocab.bpe`` or
        ``merges.txt`` (ranked merges)."""
        vocab, merges = _read_vocab_merges(vocab_path, merges_path, "GPT-2")
        special = [t for t in (EOT,) if t in vocab]
        tok = _byte_level(models.BPE(vocab=vocab, merges=merges), special)
        return cls(tok, EOT if special else None)

    @classmethod
    def from_openai_gpt_files(
        cls, vocab_path: str | Path, merges_path: str | Path, unk_token: str = "<unk>"
    ) -> BPETokenizer:
        """OpenAI GPT's (GPT-1, Radford et al. 2018) ``vocab.json`` + ``merges.txt``: not
        byte-level but lower-cased, accent-stripped text split BERT-style into words, and a
        ``</w>`` suffix on each word's last symbol. The pipeline transformers builds for
        ``OpenAIGPTTokenizer``; characters outside the vocabulary become ``unk_token``."""
        vocab, merges = _read_vocab_merges(vocab_path, merges_path, "OpenAI GPT")
        bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, end_of_word_suffix="</w>")
        tok = HFTokenizer(bpe)
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
        if unk_token in vocab:
            tok.add_special_tokens([unk_token])
        return cls(tok, eos_token=None)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """A Hugging Face ``tokenizer.json``; ``tokenizer_config.json`` beside it names eos."""
        path = Path(path)
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise GptkitError(f"{path} is not a valid tokenizer.json ({e})") from None
        eos, template, bos, add_bos = EOT, None, None, False
        cfg_path = path.with_name("tokenizer_config.json")
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            eos = _token_text(cfg.get("eos_token", eos))
            template = cfg.get("chat_template")
            bos = _token_text(cfg.get("bos_token"))
            add_bos = bool(cfg.get("add_bos_token", False))
        out = cls(tok, eos, template)
        out.bos_token = bos if bos in out.special_tokens else None
        out.add_bos = add_bos and out.bos_token is not None
        return out

    # -- use ---------------------------------------------------------------------------

    def _plain_tok(self) -> HFTokenizer:
        # tokenizers always matches added tokens in the text; a copy without them encodes
        # special-token text as ordinary bytes.
        if self._plain is None:
            data = json.loads(self._tok.to_str())
            data["added_tokens"] = []
            self._plain = HFTokenizer.from_str(json.dumps(data))
        return self._plain

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        tok = self._tok if allow_special or not self.special_tokens else self._plain_tok()
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        tok = self._tok if allow_special or not self.special_tokens else self._plain_tok()
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise GptkitError(
                    f"token id {i} is outside this tokenizer's {n} ids; "
                    "the model and tokenizer do not belong together"
                )
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _canonical(self) -> dict[str, Any]:
        data = json.loads(self._tok.to_str())
        return {k: data.get(k) for k in ("model", "added_tokens", "pre_tokenizer", "normalizer")}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.json"
        self._tok.save(str(path))
        self._save_config(directory)
        return path
