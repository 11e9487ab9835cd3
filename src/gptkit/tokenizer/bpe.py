"""Byte-level BPE (Radford et al. 2019, GPT-2), on the Hugging Face ``tokenizers`` library.

Three ways in: train on a corpus at a chosen vocabulary size; load GPT-2's own files
(``encoder.json`` + ``vocab.bpe``, or ``vocab.json`` + ``merges.txt``); or read a
``tokenizer.json``. Text is split with GPT-2's regex, mapped to bytes, and merged by rank, so
``decode(encode(s)) == s`` for every Unicode string.

Encoding has a fast path: when a tokenizer splits text exactly as GPT-2 does (the ByteLevel
pre-tokenizer with its regex, no normalizer, a plain BPE model over all 256 bytes), the C
extension :mod:`gptkit.tokenizer._fastbpe` encodes it, with the same ids as ``tokenizers``
and several times tiktoken's speed (``bench/tokenizer.py``). Anything else, or an install
built without a C compiler, goes through ``tokenizers``.
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from gptkit.errors import GptkitError
from gptkit.tokenizer.base import EOT, Tokenizer
from gptkit.tokenizer.chat import named_templates, pick_template

try:
    from gptkit.tokenizer import _fastbpe
except ImportError:  # built without a C compiler: tokenizers does all the encoding
    _fastbpe = None  # type: ignore[assignment]


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


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character map (``bytes_to_unicode``), indexed by byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


class _FastBPE:
    """The C encoder of a tokenizer that splits text exactly as GPT-2 does.

    Added tokens are cut out of the text first, as ``tokenizers`` does: at the leftmost
    match, the longest token. ``added`` is None when they carry options this path does not
    implement (lstrip, rstrip, single_word, or both normalized and raw ones); texts that need
    them go through ``tokenizers``.
    """

    def __init__(self, encoder: Any, added: dict[str, int] | None):
        self.encoder = encoder
        self.added = added
        self.pattern = None
        if added:
            longest_first = sorted(added, key=len, reverse=True)
            self.pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    @classmethod
    def build(cls, tok: HFTokenizer) -> _FastBPE | None:
        """The fast path for ``tok``, or None when ``tok`` is not GPT-2-style byte-level BPE
        (or the extension is not built)."""
        if _fastbpe is None or not isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel):
            return None  # (the cheap test first: the JSON of a large vocabulary takes 0.2 s)
        data = json.loads(tok.to_str())
        pre = data.get("pre_tokenizer") or {}
        model = data.get("model") or {}
        if (
            data.get("normalizer") is not None
            or data.get("truncation") is not None
            or data.get("padding") is not None
            or pre.get("type") != "ByteLevel"
            or pre.get("add_prefix_space") is not False
            or pre.get("use_regex", True) is not True
            or model.get("type") != "BPE"
            # each of these changes how a piece is merged
            or model.get("dropout")
            or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")
            or model.get("byte_fallback")
            or model.get("ignore_merges")
        ):
            return None
        vocab = model.get("vocab") or {}
        try:
            byte_ids = array("i", [vocab[c] for c in _bytes_to_unicode()])
            merges = array("i")
            for merge in model.get("merges") or []:
                left, right = merge.split(" ") if isinstance(merge, str) else merge
                merges.extend((vocab[left], vocab[right], vocab[left + right]))
        except (KeyError, ValueError, TypeError):
            return None  # a byte without a token, or a merge outside the vocabulary
        added: dict[str, int] | None = {}
        tokens = tok.get_added_tokens_decoder()
        if any(t.lstrip or t.rstrip or t.single_word or not t.content for t in tokens.values()):
            added = None
        elif len({t.normalized for t in tokens.values()}) > 1:
            added = None  # matched in two rounds, raw then normalized
        else:
            added = {t.content: i for i, t in tokens.items()}
        return cls(_fastbpe.Encoder(byte_ids, merges), added)

    def encode(self, text: str, split_added: bool) -> list[int] | None:
        """The ids of ``text`` (with added tokens matched when ``split_added``), or None
        when this path cannot give the ``tokenizers`` result."""
        if split_added and self.added is None:
            return None
        try:
            if not split_added or self.pattern is None:
                return self.encoder.encode(text)
            parts = self.pattern.split(text)
            if len(parts) == 1:
                return self.encoder.encode(text)
            ids: list[int] = []
            for k, part in enumerate(parts):
                if k % 2:
                    ids.append(self.added[part])
                elif part:
                    ids += self.encoder.encode(part)
            return ids
        except UnicodeEncodeError:
            return None  # lone surrogates: tokenizers decides what they give (an error)


def _token_text(raw: Any) -> str | None:
    """tokenizer_config.json writes a token as its text or as {"content": text, ...}."""
    text = raw.get("content") if isinstance(raw, dict) else raw
    return text if isinstance(text, str) else None


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GptkitError(f"{path} is corrupted ({e}); restore or delete it") from None
    if not isinstance(cfg, dict):
        raise GptkitError(f"{path} is not a JSON object; restore or delete it")
    return cfg


class BPETokenizer(Tokenizer):
    def __init__(
        self,
        tok: HFTokenizer,
        eos_token: str | None = EOT,
        chat_template: str | None = None,
    ):
        self._tok = tok
        self._plain: HFTokenizer | None = None
        # Built from self._tok on first use (False: not yet), so it must not change after.
        self._fast: _FastBPE | bool | None = False
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
        eos, template, bos, add_bos, named = EOT, None, None, False, None
        cfg_path = path.with_name("tokenizer_config.json")
        if cfg_path.exists():
            cfg = _read_tokenizer_config(cfg_path)
            eos = _token_text(cfg.get("eos_token", eos))
            try:
                template = pick_template(cfg.get("chat_template"))
                named = named_templates(cfg.get("chat_template"))
            except GptkitError as e:
                raise GptkitError(f"{cfg_path}: {e}") from None
            bos = _token_text(cfg.get("bos_token"))
            add_bos = bool(cfg.get("add_bos_token", False))
        out = cls(tok, eos, template)
        out.chat_templates = named
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

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fast"] = False  # the C encoder does not pickle; it is rebuilt on first use
        return state

    def _fast_path(self) -> _FastBPE | None:
        if self._fast is False:
            self._fast = _FastBPE.build(self._tok)
        return self._fast  # type: ignore[return-value]

    @property
    def fast(self) -> bool:
        """Whether :meth:`encode` runs the C encoder (GPT-2-style byte-level BPE, extension
        built) rather than ``tokenizers``; the ids are the same either way."""
        return self._fast_path() is not None

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        # Added tokens are matched with the full tokenizer; the plain copy has none.
        use_added = allow_special or not self.special_tokens
        fast = self._fast_path()
        if fast is not None:
            ids = fast.encode(text, use_added)
            if ids is not None:
                return ids
        tok = self._tok if use_added else self._plain_tok()
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        use_added = allow_special or not self.special_tokens
        fast = self._fast_path()
        if fast is not None:
            out = [fast.encode(t, use_added) for t in texts]
            if all(ids is not None for ids in out):
                return out  # type: ignore[return-value]
        tok = self._tok if use_added else self._plain_tok()
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
