"""Tokenizers: character-level and byte-level BPE (trained, or GPT-2's own), one interface."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from gptkit.errors import GptkitError
from gptkit.tokenizer.base import EOT, Tokenizer
from gptkit.tokenizer.bpe import BPETokenizer
from gptkit.tokenizer.char import FORMAT as CHAR_FORMAT
from gptkit.tokenizer.char import CharTokenizer

__all__ = ["EOT", "BPETokenizer", "CharTokenizer", "Tokenizer", "load_tokenizer"]

_GPT2_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def _from_json_file(path: Path) -> Tokenizer:
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GptkitError(f"cannot read tokenizer file {path}: {e}") from None
    if isinstance(head, dict) and head.get("type") == CHAR_FORMAT:
        return CharTokenizer.from_json(head)
    if isinstance(head, dict) and "model" in head:
        return BPETokenizer.from_file(path)
    raise GptkitError(
        f"{path} is neither a gptkit character tokenizer nor a Hugging Face tokenizer.json"
    )


def _marks_word_ends(merges: Path) -> bool:
    """Whether a merges file is OpenAI GPT's (word-final symbols end in ``</w>``) rather than
    GPT-2's byte-level one: judged on its first 1,000 merges."""
    try:
        with merges.open(encoding="utf-8") as f:
            lines = [line.split() for line in itertools.islice(f, 1000)]
    except (OSError, UnicodeDecodeError):
        return False
    pairs = [p for p in lines if len(p) == 2 and not p[0].startswith("#")]
    return bool(pairs) and 10 * sum(p[1].endswith("</w>") for p in pairs) >= len(pairs)


def find_tokenizer(path: str | Path) -> Path | tuple[Path, Path] | None:
    """Where the tokenizer of ``path`` (a file or a directory) lives, or None."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    for vocab, merges in _GPT2_PAIRS:
        if (path / vocab).is_file() and (path / merges).is_file():
            return path / vocab, path / merges
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json``, a directory holding one (a checkpoint or a
    prepared data directory), or a directory with GPT-2's ``encoder.json`` + ``vocab.bpe``
    (or ``vocab.json`` + ``merges.txt``)."""
    p = Path(path)
    if not p.exists():
        raise GptkitError(f"tokenizer path {p} does not exist; check the path")
    where = find_tokenizer(p)
    if where is None and p.is_dir():
        # A training run's output directory: use its newest checkpoint.
        from gptkit.files import latest_checkpoint

        ckpt = latest_checkpoint(p)
        where = find_tokenizer(ckpt) if ckpt is not None else None
    if where is None:
        raise GptkitError(
            f"no tokenizer in {p}: expected tokenizer.json, encoder.json + vocab.bpe, "
            "or vocab.json + merges.txt"
        )
    if isinstance(where, tuple):
        if _marks_word_ends(where[1]):
            return BPETokenizer.from_openai_gpt_files(*where)
        return BPETokenizer.from_gpt2_files(*where)
    return _from_json_file(where)
