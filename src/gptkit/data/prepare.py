"""Corpus -> token shards: the writer of the directories ``gptkit.data.loader`` reads.

``prepare`` streams text files, directory trees and ``.jsonl`` records through a tokenizer into
flat little-endian ``uint16``/``uint32`` shard files plus ``meta.json``. It follows nanoGPT's
``data/*/prepare.py`` (tokenize, the last 10% as validation, a flat ``.bin`` of ids), split into
shards so a corpus of any size can be memory-mapped.

Streaming: the corpus is read at most twice (once to learn a vocabulary, once to encode) in
blocks that end at a line end, and never held in memory whole. A long document is encoded in
chunks of about 1 MiB. GPT-2's pre-tokenizer regex (Radford et al. 2019) only ever looks at
whitespace runs across a line end, so a chunk is cut after ``"\\n"`` only where the character
before and the character after it are both non-space: there, ``"\\n"`` is a pre-token of its own
in the whole text as in the chunks, and the chunks' ids concatenate to the whole text's ids.
(A cut after a blank line or before an indented line would not: ``"\\n\\n"`` followed by ``def``
splits as ``"\\n" "\\n"`` in the whole text but stays ``"\\n\\n"`` at the end of a chunk.)

Parallel encoding: with ``workers > 1`` the reading and cutting stay in this process and the
batches of chunks are encoded by a pool of worker processes, a bounded number at a time (so
memory stays flat however large the corpus), and written back in their original order: the
shards are byte-for-byte those of one worker.

Atomicity: every file is written under a hidden temporary name; only when the whole corpus is
encoded are the shards and the tokenizer renamed into place, then ``meta.json`` is written last.
A failure or Ctrl-C leaves the directory as it was before the run.
"""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptkit.data.loader import DTYPES, FORMAT, META
from gptkit.errors import GptkitError
from gptkit.files import atomic_path, atomic_write_json
from gptkit.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, find_tokenizer, load_tokenizer

BLOCK = 1 << 20  # bytes read at a time; a block is extended to the end of its last line
CHUNK = 1 << 20  # characters of one document handed to the tokenizer in one piece
BATCH = 4 << 20  # characters per encode_batch call
SNIFF = 8192  # a NUL byte among this many leading bytes marks a file as binary
UINT16_IDS = 1 << 16
ON_BAD_BYTES = ("replace", "skip", "error")
TRAINED = ("char", "bpe")
SPLITS = ("train", "val")
_LE = {"uint16": "<u2", "uint32": "<u4"}  # shards are little-endian whatever the machine
_SHARD = re.compile(r"^(train|val)-\d{5}\.bin$")
_OUR_TMP = re.compile(r"^\.((train|val)-\d{5}\.bin|meta\.json|tokenizer)\..*\.tmp$")
_ESCAPED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of each undecodable byte
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape that may leave one

#: one chunk of a document piece: its text, its split (0 train, 1 val), whether it ends a piece
Chunk = tuple[str, int, bool]
#: where a piece of text may be cut: the largest safe index > lo, or 0 for nowhere
CutRule = Callable[[str, int], int]
#: a batch of chunks encoded: the ids of each split (train, val), the documents each ended
Encoded = tuple[list[np.ndarray], list[int]]


# -- options --------------------------------------------------------------------------------


def shard_dtype(vocab_size: int, dtype: str = "auto") -> str:
    """The shard dtype name for a vocabulary: ``auto`` picks uint16 while every id fits."""
    if dtype == "auto":
        return "uint16" if vocab_size <= UINT16_IDS else "uint32"
    if dtype not in DTYPES:
        raise GptkitError(f"--dtype {dtype!r} is not one of auto, uint16, uint32")
    if dtype == "uint16" and vocab_size > UINT16_IDS:
        raise GptkitError(
            f"vocabulary of {vocab_size:,} tokens does not fit in uint16 (max 65,536 ids); "
            "use --dtype uint32 or auto"
        )
    return dtype


def _check_options(
    tokenizer: str,
    vocab_size: int,
    tokenizer_path: str | None,
    val_fraction: float,
    dtype: str,
    on_bad_bytes: str,
    shard_tokens: int,
    workers: int = 1,
) -> None:
    if workers < 1:
        raise GptkitError(f"--workers {workers} must be at least 1")
    if not 0 <= val_fraction < 1:  # also false for NaN
        raise GptkitError(
            f"--val-fraction {val_fraction} is outside [0, 1); use e.g. 0.1, or 0 for no "
            "validation split"
        )
    if on_bad_bytes not in ON_BAD_BYTES:
        raise GptkitError(f"--on-bad-bytes {on_bad_bytes!r} is not one of replace, skip, error")
    if shard_tokens < 1:
        raise GptkitError(f"--shard-tokens {shard_tokens} must be at least 1")
    if tokenizer == "bpe":
        shard_dtype(vocab_size, dtype)  # fail before training, not after
    else:
        shard_dtype(0, dtype)
    if tokenizer == "gpt2" and tokenizer_path is None:
        raise GptkitError(
            "--tokenizer gpt2 needs --tokenizer-path DIR holding encoder.json + vocab.bpe "
            "(or vocab.json + merges.txt)"
        )
    if tokenizer != "gpt2" and tokenizer_path is not None:
        raise GptkitError(
            "--tokenizer-path is only read with --tokenizer gpt2; to reuse another tokenizer "
            "pass its path as --tokenizer PATH"
        )


# -- finding the files ----------------------------------------------------------------------


def _matches(patterns: list[str] | None, name: str, rel: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(rel, p) for p in patterns or ())


def _is_binary(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(SNIFF)
    except OSError as e:
        raise GptkitError(f"cannot read {path}: {e.strerror}; check its permissions") from None


def _walk(
    root: Path, glob: list[str] | None, exclude: list[str] | None, skip_dir: Path | None
) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel_here = here.relative_to(root)
        kept = []
        for name in dirnames:
            rel = (rel_here / name).as_posix()
            if name.startswith(".") or _matches(exclude, name, rel):
                continue
            if skip_dir is not None and (here / name).resolve() == skip_dir:
                continue  # our own output inside an input directory
            kept.append(name)
        dirnames[:] = sorted(kept)
        for name in filenames:
            rel = (rel_here / name).as_posix()
            if name.startswith(".") or (glob and not _matches(glob, name, rel)):
                continue
            path = here / name
            if _matches(exclude, name, rel) or not path.is_file() or _is_binary(path):
                continue
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def list_files(
    inputs: list[str],
    glob: list[str] | None = None,
    exclude: list[str] | None = None,
    skip_dir: str | Path | None = None,
) -> list[Path]:
    """The text files of a corpus, in a stable order.

    Args:
        inputs: files and directories; a directory is walked recursively in sorted order,
            skipping hidden files and directories and binary files (a NUL byte in the first
            8 KiB). A file named directly is always kept.
        glob: patterns a walked file's name (or path relative to its input directory) must
            match, e.g. ``["*.py"]``; default: every file.
        exclude: patterns of walked files or directories to skip, matched against the name
            and against the path relative to the input directory (fnmatch).
        skip_dir: a directory never to enter (the output directory of ``prepare``).
    """
    if not inputs:
        raise GptkitError("no inputs given; pass text files, directories or .jsonl files")
    skip = Path(skip_dir).resolve() if skip_dir is not None else None
    seen: set[Path] = set()
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = _walk(p, glob, exclude, skip)
            if not found:
                what = f"files matching --glob {' '.join(glob)}" if glob else "text files"
                raise GptkitError(
                    f"directory {p} has no {what} (hidden, binary and --exclude'd files are "
                    "skipped); check the path and the patterns"
                )
        elif p.is_file():
            if _is_binary(p):
                raise GptkitError(
                    f"{p} looks binary (a NUL byte in its first 8 KiB); pass text or .jsonl files"
                )
            found = [p]
        elif p.exists():
            raise GptkitError(f"input {p} is neither a file nor a directory")
        else:
            raise GptkitError(f"input {p} does not exist; check the path")
        for f in found:
            key = f.resolve()
            if key not in seen:  # the same file named twice is read once
                seen.add(key)
                files.append(f)
    return files


# -- reading the text -----------------------------------------------------------------------


@dataclass
class _BadBytes:
    """Undecodable bytes met while reading: for the one-line report and meta.json."""

    action: str
    count: int = 0
    files: int = 0
    skipped_documents: int = 0
    first_file: str | None = None
    first_offset: int | None = None
    _last_file: str | None = None

    def add(self, path: Path, count: int, offset: int) -> None:
        if self.first_file is None:
            self.first_file, self.first_offset = str(path), offset
        if str(path) != self._last_file:
            self.files += 1
            self._last_file = str(path)
        self.count += count

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "files": self.files,
            "first_file": self.first_file,
            "first_offset": self.first_offset,
            "action": self.action,
            "skipped_documents": self.skipped_documents,
        }

    def report(self) -> str | None:
        if not self.count:
            return None
        done = (
            f"skipped {self.skipped_documents} document(s) holding them"
            if self.action == "skip"
            else "replaced with U+FFFD"
        )
        return (
            f"warning: {self.count:,} undecodable byte(s) (not UTF-8) in {self.files} file(s), "
            f"first in {self.first_file} at byte {self.first_offset}; {done} "
            "(--on-bad-bytes replace|skip|error)"
        )


def _count_bad(data: bytes) -> int:
    return len(_ESCAPED.findall(data.decode("utf-8", "surrogateescape")))


def _decode(data: bytes, path: Path, offset: int, line: int, bad: _BadBytes) -> str | None:
    """``data`` (whole lines of ``path`` from byte ``offset``, line ``line``) as text, or None
    when the document holding it is to be skipped."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = offset + e.start
        if bad.action == "error":
            n = line + data.count(b"\n", 0, e.start)
            raise GptkitError(
                f"{path}:{n}: byte {where} is not valid UTF-8; fix the file, or pass "
                "--on-bad-bytes replace (or skip)"
            ) from None
        bad.add(path, _count_bad(data), where)
        return None if bad.action == "skip" else data.decode("utf-8", "replace")


def _blocks(f: Any) -> Iterator[bytes]:
    """A binary file in blocks of about BLOCK bytes, each ending at a line end (or EOF)."""
    while block := f.read(BLOCK):
        if not block.endswith(b"\n"):
            block += f.readline()
        yield block


def _scan_utf8(path: Path) -> tuple[int, int] | None:
    """(undecodable bytes, offset of the first) in ``path``, or None when it is clean UTF-8."""
    count, first, pos = 0, None, 0
    with open(path, "rb") as f:
        for block in _blocks(f):
            try:
                block.decode("utf-8")
            except UnicodeDecodeError as e:
                first = pos + e.start if first is None else first
                count += _count_bad(block)
            pos += len(block)
    return None if first is None else (count, first)


def _line_start(block: bytes, at: int) -> int:
    """The first index >= ``at`` where a line of ``block`` starts (``len(block)``: none)."""
    if at <= 0:
        return 0
    j = block.find(b"\n", at - 1)
    return len(block) if j < 0 else j + 1


def cut_anywhere(text: str, lo: int) -> int:
    """A rule for tokenizers that encode character by character: any line end will do."""
    return len(text)


def cut_between_lines(text: str, lo: int) -> int:
    """The last index > ``lo`` just after a ``"\\n"`` with non-space on both sides, or 0.

    Exact for GPT-2's pre-tokenizer regex (see the module docstring). ``str.isspace`` holds for
    every character the regex's ``\\s`` matches, so it never finds a cut the regex disagrees
    with."""
    i = text.rfind("\n", max(lo, 1), len(text) - 1)
    while i >= 1:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", max(lo, 1), i)
    return 0


def cut_rule(tokenizer: Tokenizer) -> CutRule | None:
    """How a document may be cut so that its chunks encode exactly as the whole (None: never)."""
    if isinstance(tokenizer, CharTokenizer):
        return cut_anywhere
    if isinstance(tokenizer, BPETokenizer):
        spec = tokenizer._canonical()  # the tokenizer.json fields that fix the encoding
        pre = spec.get("pre_tokenizer") or {}
        if (
            spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)
        ):
            return cut_between_lines
    return None  # an unknown pre-tokenizer (e.g. SentencePiece-style): whole documents


class _Piece:
    """The text of one document piece, handed out in chunks that encode as the whole would."""

    def __init__(self, split: int, rule: CutRule | None):
        self.split, self.rule = split, rule
        self.parts: list[str] = []
        self.size = 0
        self.check_at = CHUNK
        self.searched = 0
        self.emitted = False

    def add(self, text: str) -> str | None:
        """Take more text; return a chunk ready to encode, if there is one."""
        self.parts.append(text)
        self.size += len(text)
        if self.rule is None or self.size < self.check_at:
            return None
        buf = "".join(self.parts)
        i = self.rule(buf, self.searched)
        if i <= 0:
            # No safe cut yet: wait until the text doubles, so rejoining stays linear overall.
            self.parts, self.searched, self.check_at = [buf], len(buf) - 1, 2 * len(buf)
            return None
        self.parts, self.size = [buf[i:]], len(buf) - i
        self.searched, self.check_at, self.emitted = 0, CHUNK, True
        return buf[:i]

    def finish(self) -> Chunk | None:
        """The last chunk, or None when the whole piece held no text (whitespace only)."""
        text = "".join(self.parts)
        if not self.emitted and (not text or text.isspace()):
            return None
        return text, self.split, True


def _record_text(line: str, field: str, path: Path, n: int) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:
        msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise GptkitError(f"{path}:{n}: not valid JSON ({msg}); fix or delete the line") from None
    if not isinstance(record, dict):
        raise GptkitError(
            f"{path}:{n}: a record must be a JSON object with a {field!r} field, "
            f"not a JSON {type(record).__name__}; fix the line"
        )
    if field not in record:
        has = ", ".join(repr(k) for k in list(record)[:8]) or "no fields"
        raise GptkitError(
            f"{path}:{n}: the record has no {field!r} field (it has {has}); pass --text-field NAME"
        )
    value = record[field]
    if not isinstance(value, str):
        raise GptkitError(
            f"{path}:{n}: field {field!r} holds a {type(value).__name__}, not text; "
            "pass --text-field NAME of a text field"
        )
    return value


class _Progress:
    """A tqdm bar over input bytes, updated at most once a MiB to keep its cost out of the loop.

    With ``eager=False`` the bytes read are shown only at ``flush()``: the encoding pass flushes
    after each batch is encoded, so the bar's rate is the encoding rate, not the reading rate."""

    def __init__(self, total: int, desc: str, enabled: bool, eager: bool = True):
        self.eager = eager
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit="B",
            unit_scale=True,
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self.pending = 0

    def __call__(self, n: int) -> None:
        self.pending += n
        if self.eager and self.pending >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        self.bar.update(self.pending)
        self.pending = 0

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
        self.bar.close()


@dataclass
class _Reader:
    """Turns files into chunks; ``cut`` is the byte offset (over all files, in order) where the
    validation split starts, moved forward to the next line start."""

    cut: int
    rule: CutRule | None
    text_field: str
    bad: _BadBytes
    advance: Callable[[int], None] = lambda n: None

    def chunks(self, files: list[Path]) -> Iterator[Chunk]:
        pos = 0
        for path in files:
            read = self._jsonl if path.suffix.lower() == ".jsonl" else self._text
            pos = yield from read(path, pos)

    def _add(
        self, piece: _Piece, data: bytes, path: Path, offset: int, line: int
    ) -> Iterator[Chunk]:
        if not data:
            return
        text = _decode(data, path, offset, line, self.bad)
        if text is None:  # the file changed since _scan_utf8 found it clean
            text = data.decode("utf-8", "replace")
        chunk = piece.add(text)
        if chunk is not None:
            yield chunk, piece.split, False

    def _text(self, path: Path, start: int) -> Generator[Chunk, None, int]:
        """One file, one document; split in two where the validation split starts."""
        if self.bad.action == "skip":
            found = _scan_utf8(path)
            if found is not None:
                self.bad.add(path, *found)
                self.bad.skipped_documents += 1
                size = path.stat().st_size
                self.advance(size)
                return start + size
        pos, line = start, 1
        piece = _Piece(int(pos >= self.cut), self.rule)
        with open(path, "rb") as f:
            for block in _blocks(f):
                if pos == start and block.startswith(codecs.BOM_UTF8):
                    block, pos = block[3:], pos + 3
                    self.advance(3)
                rel = pos - start
                if not piece.split and pos + len(block) > self.cut:
                    k = _line_start(block, self.cut - pos)
                    yield from self._add(piece, block[:k], path, rel, line)
                    if (end := piece.finish()) is not None:
                        yield end
                    piece = _Piece(1, self.rule)
                    line_k = line + block.count(b"\n", 0, k)
                    yield from self._add(piece, block[k:], path, rel + k, line_k)
                else:
                    yield from self._add(piece, block, path, rel, line)
                pos += len(block)
                line += block.count(b"\n")
                self.advance(len(block))
        if (end := piece.finish()) is not None:
            yield end
        return pos

    def _jsonl(self, path: Path, start: int) -> Generator[Chunk, None, int]:
        """One document per record; a record belongs to the split its line starts in."""
        pos = start
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                rel, data = pos - start, raw
                if n == 1 and data.startswith(codecs.BOM_UTF8):
                    rel, data = 3, data[3:]
                split = int(pos >= self.cut)
                pos += len(raw)
                self.advance(len(raw))
                if not data.strip():
                    continue
                line = _decode(data, path, rel, n, self.bad)
                if line is None:
                    self.bad.skipped_documents += 1
                    continue
                text = _record_text(line, self.text_field, path, n)
                if _SURROGATE_ESCAPE.search(data) and _LONE_SURROGATE.search(text):
                    if self.bad.action == "error":
                        raise GptkitError(
                            f"{path}:{n}: field {self.text_field!r} holds an unpaired "
                            "surrogate escape (\\ud800-\\udfff), which is not text; fix the "
                            "record, or pass --on-bad-bytes replace (or skip)"
                        )
                    self.bad.add(path, len(_LONE_SURROGATE.findall(text)), rel)
                    if self.bad.action == "skip":
                        self.bad.skipped_documents += 1
                        continue
                    text = _LONE_SURROGATE.sub("\ufffd", text)
                piece = _Piece(split, self.rule)
                for i in range(0, len(text), CHUNK):
                    chunk = piece.add(text[i : i + CHUNK])
                    if chunk is not None:
                        yield chunk, split, False
                if (end := piece.finish()) is not None:
                    yield end
        return pos


def iter_documents(
    inputs: list[str],
    glob: list[str] | None = None,
    exclude: list[str] | None = None,
    text_field: str = "text",
    on_bad_bytes: str = "replace",
) -> Iterator[str]:
    """The documents of a corpus as ``prepare`` sees them, one string each (whole: use it for
    corpora of ordinary documents, not for one multi-gigabyte file).

    Args:
        inputs: text files, directories and ``.jsonl`` files (see ``list_files``).
        glob: filename patterns kept when walking directories.
        exclude: patterns of walked paths to skip.
        text_field: the field of each ``.jsonl`` record holding the text.
        on_bad_bytes: what to do with bytes that are not UTF-8: replace, skip, error.
    """
    if on_bad_bytes not in ON_BAD_BYTES:
        raise GptkitError(f"--on-bad-bytes {on_bad_bytes!r} is not one of replace, skip, error")
    reader = _Reader(sys.maxsize, None, text_field, _BadBytes(on_bad_bytes))
    for text, _, _ in reader.chunks(list_files(inputs, glob, exclude)):
        yield text


# -- the tokenizer --------------------------------------------------------------------------


def _no_text(files: list[Path]) -> GptkitError:
    return GptkitError(
        f"the inputs hold no text ({len(files)} file(s), all empty or whitespace); check the "
        "paths, --glob and --text-field"
    )


def _learn_tokenizer(
    kind: str, vocab_size: int, files: list[Path], total: int, reader: _Reader, progress: bool
) -> Tokenizer:
    """Build a char vocabulary or train BPE on one streaming pass over the corpus."""
    pieces, read_all = 0, False

    def texts() -> Iterator[str]:
        nonlocal pieces, read_all
        for text, _, end in reader.chunks(files):
            pieces += end
            yield text
        read_all = True

    with _Progress(total, f"learn {kind}", progress) as advance:
        reader.advance = advance
        try:
            if kind == "char":
                tok: Tokenizer = CharTokenizer.train(texts())
            else:
                tok = BPETokenizer.train(texts(), vocab_size, show_progress=progress)
        except GptkitError:
            if read_all and pieces == 0:  # the tokenizer's own complaint about no text
                raise _no_text(files) from None
            raise
    if pieces == 0:
        raise _no_text(files)
    return tok


def _existing_tokenizer(tokenizer: str, tokenizer_path: str | None) -> tuple[Tokenizer, str, str]:
    if tokenizer == "gpt2":
        p = Path(str(tokenizer_path))
        if not p.is_dir() or find_tokenizer(p) is None:
            raise GptkitError(
                f"--tokenizer-path {p} holds no GPT-2 tokenizer: it needs encoder.json + "
                "vocab.bpe (or vocab.json + merges.txt)"
            )
        return load_tokenizer(p), "gpt2", str(p)
    p = Path(tokenizer)
    if not p.exists():
        raise GptkitError(
            f"--tokenizer {tokenizer!r} is not char, bpe or gpt2, nor an existing tokenizer "
            "file or directory; check the spelling or the path"
        )
    return load_tokenizer(p), "file", str(p)


# -- writing --------------------------------------------------------------------------------


class _ShardWriter:
    """Appends ids to ``<split>-00000.bin``, ``-00001``, ... under temporary names; the
    ExitStack renames them into place (or deletes them) when it closes."""

    def __init__(
        self, directory: Path, split: str, dtype: str, limit: int, stack: contextlib.ExitStack
    ):
        self.directory, self.split, self.limit, self.stack = directory, split, limit, stack
        self.dtype = np.dtype(_LE[dtype])
        self.shards: list[dict[str, Any]] = []
        self.file: Any = None
        self.room = 0
        self.documents = 0

    def write(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while len(arr):
            if self.room == 0:
                self._next_shard()
            n = min(self.room, len(arr))
            arr[:n].tofile(self.file)
            self.shards[-1]["tokens"] += n
            self.room -= n
            arr = arr[n:]

    def _next_shard(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        tmp = self.stack.enter_context(atomic_path(self.directory / name))
        self.file = self.stack.enter_context(open(tmp, "wb"))  # noqa: SIM115 (the stack owns it)
        self.shards.append({"file": name, "tokens": 0})
        self.room = self.limit

    def close(self) -> dict[str, Any]:
        if self.file is not None:
            self.file.close()
        tokens = sum(s["tokens"] for s in self.shards)
        return {"shards": self.shards, "tokens": tokens, "documents": self.documents}


def _batches(chunks: Iterator[Chunk]) -> Iterator[list[Chunk]]:
    """Chunks grouped into batches of about ``BATCH`` characters."""
    batch: list[Chunk] = []
    size = 0
    for chunk in chunks:
        batch.append(chunk)
        size += len(chunk[0])
        if size >= BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tok: Tokenizer, batch: list[Chunk], dtype: str) -> Encoded:
    eos = tok.eos_id
    flat: tuple[list[int], list[int]] = ([], [])
    documents = [0, 0]
    ids = tok.encode_batch([text for text, _, _ in batch], allow_special=False)
    for (_, split, end), piece_ids in zip(batch, ids, strict=True):
        flat[split].extend(piece_ids)
        if end:
            documents[split] += 1
            if eos is not None:
                flat[split].append(eos)
    return [np.asarray(f, dtype=_LE[dtype]) for f in flat], documents


def _write(encoded: Encoded, writers: list[_ShardWriter]) -> None:
    for writer, ids, documents in zip(writers, *encoded, strict=True):
        writer.documents += documents
        if len(ids):
            writer.write(ids)


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_dir: str, expected_hash: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_tokenizer = load_tokenizer(tokenizer_dir)
    if _worker_tokenizer.hash != expected_hash:
        raise GptkitError("a worker's tokenizer differs from the saved one; use --workers 1")


def _encode_in_worker(batch: list[Chunk], dtype: str) -> Encoded:
    assert _worker_tokenizer is not None
    return _encode(_worker_tokenizer, batch, dtype)


def _encode_all(
    tok: Tokenizer, batches: Iterator[list[Chunk]], dtype: str, workers: int, tok_dir: Path
) -> Iterator[Encoded]:
    """Each batch encoded, in order; by ``workers`` processes when there is more than one.

    At most ``2 × workers`` batches are in flight, so reading never runs far ahead of
    writing. Workers are spawned (not forked: the tokenizer's thread pool and torch do not
    survive a fork) and load the tokenizer from ``tok_dir``."""
    if workers == 1:
        for batch in batches:
            yield _encode(tok, batch, dtype)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, _start_worker, (str(tok_dir), tok.hash)) as pool:
        pending: deque[Any] = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch, dtype)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _previous_run(directory: Path) -> tuple[bool, set[str]]:
    """(whether ``directory`` holds a prepared run, the shard files its meta.json names)."""
    try:
        meta = json.loads((directory / META).read_text(encoding="utf-8"))
        names = {s["file"] for split in meta["splits"].values() for s in split["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return (directory / META).exists(), set()
    return True, {n for n in names if isinstance(n, str) and Path(n).name == n}


def _remove_stale(directory: Path, keep: set[str], old_shards: set[str], was_prepared: bool):
    """Delete what an earlier run left that this one does not use (run after meta.json)."""
    for p in directory.iterdir():
        name = p.name
        if name in keep:
            continue
        ours = name in old_shards or _SHARD.match(name) or _OUR_TMP.match(name)
        if not ours and not (was_prepared and name == "tokenizer_config.json"):
            continue
        with contextlib.suppress(FileNotFoundError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


# -- the public entry point -----------------------------------------------------------------


def prepare(
    inputs: list[str],
    out: str,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    tokenizer_path: str | None = None,
    glob: list[str] | None = None,
    exclude: list[str] | None = None,
    text_field: str = "text",
    val_fraction: float = 0.1,
    dtype: str = "auto",
    on_bad_bytes: str = "replace",
    shuffle: bool = True,
    seed: int = 1337,
    shard_tokens: int = 100_000_000,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Tokenize a corpus into the shard directory that training reads.

    Args:
        inputs: text files, directories (walked recursively) and .jsonl files; each text file
            is one document, each .jsonl record one document.
        out: the output directory; a directory prepared before is replaced cleanly.
        tokenizer: char, bpe (trained here), gpt2 (GPT-2's own files), or the path of a
            tokenizer.json or of a directory holding one, to reuse.
        vocab_size: the vocabulary size of a trained bpe tokenizer.
        tokenizer_path: for gpt2, the directory holding encoder.json + vocab.bpe (or
            vocab.json + merges.txt).
        glob: filename patterns kept when walking directories, e.g. "*.py"; default: all.
        exclude: patterns of paths (relative to the input directory) or names to skip.
        text_field: the field of each .jsonl record that holds the text.
        val_fraction: the share of input bytes, taken from the end, kept for validation.
        dtype: the shard dtype: auto (uint16 while the vocabulary fits), uint16 or uint32.
        on_bad_bytes: bytes that are not UTF-8: replace (with U+FFFD), skip (the document)
            or error.
        shuffle: shuffle the order of the files (seeded) before splitting.
        seed: the seed of that shuffle.
        shard_tokens: the most tokens in one shard file.
        workers: processes that encode in parallel (1: this process alone; the BPE encoder
            already uses several threads in one); the shards are identical for any number.
        progress: show progress bars on stderr.

    Returns:
        The metadata written to ``out/meta.json``.
    """
    t0 = time.perf_counter()
    _check_options(
        tokenizer,
        vocab_size,
        tokenizer_path,
        val_fraction,
        dtype,
        on_bad_bytes,
        shard_tokens,
        workers,
    )
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise GptkitError(f"--out {out_dir} is a file; pass a directory")
    files = list_files(inputs, glob, exclude, skip_dir=out_dir)
    if shuffle:
        random.Random(seed).shuffle(files)
    total = sum(f.stat().st_size for f in files)
    cut = int(total * (1 - val_fraction))  # nanoGPT: train = data[: int(n * 0.9)]

    if tokenizer in TRAINED:
        first = _Reader(sys.maxsize, cut_between_lines, text_field, _BadBytes(on_bad_bytes))
        tok = _learn_tokenizer(tokenizer, vocab_size, files, total, first, progress)
        kind, source = tokenizer, None
    else:
        tok, kind, source = _existing_tokenizer(tokenizer, tokenizer_path)
    dtype_name = shard_dtype(tok.vocab_size, dtype)
    if tok.eos_id is None:
        print(
            "warning: the tokenizer has no end-of-text token; documents are joined without a "
            "separator",
            file=sys.stderr,
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    was_prepared, old_shards = _previous_run(out_dir)
    bad = _BadBytes(on_bad_bytes)
    with contextlib.ExitStack() as stack:
        staging = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix=".tokenizer.", suffix=".tmp", dir=out_dir)
            )
        )
        tok.save(staging)
        writers = [_ShardWriter(out_dir, s, dtype_name, shard_tokens, stack) for s in SPLITS]
        with _Progress(total, "encode", progress, eager=False) as bar:
            reader = _Reader(cut, cut_rule(tok), text_field, bad, bar)
            batches = _batches(reader.chunks(files))
            for encoded in _encode_all(tok, batches, dtype_name, workers, staging):
                _write(encoded, writers)
                bar.flush()
        splits = {w.split: w.close() for w in writers}
        if not any(s["documents"] for s in splits.values()):
            raise _no_text(files)
        # From here the directory reads as unprepared until the new meta.json lands, so a
        # crash part-way through the renames never pairs old metadata with new shards.
        (out_dir / META).unlink(missing_ok=True)
        tokenizer_files = set()
        for f in staging.iterdir():
            with open(f, "rb+") as fh:  # durable before meta.json can point at it
                os.fsync(fh.fileno())
            os.replace(f, out_dir / f.name)
            tokenizer_files.add(f.name)
    # Leaving the stack renamed every shard into place.

    meta = {
        "format": FORMAT,
        "dtype": dtype_name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer_hash": tok.hash,
        "tokenizer": kind,
        "tokenizer_source": source,
        "splits": splits,
        "inputs": [str(i) for i in inputs],
        "files": len(files),
        "bytes": total,
        "bad_bytes": bad.as_dict(),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "shuffle": shuffle,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(out_dir / META, meta)
    keep = {META, *tokenizer_files} | {s["file"] for v in splits.values() for s in v["shards"]}
    _remove_stale(out_dir, keep, old_shards, was_prepared)

    if (line := bad.report()) is not None:
        print(line, file=sys.stderr)
    if progress:
        n_train, n_val = splits["train"]["tokens"], splits["val"]["tokens"]
        print(
            f"prepared {n_train:,} train + {n_val:,} val tokens ({kind} tokenizer, "
            f"{tok.vocab_size:,} ids, {dtype_name}) from {len(files):,} file(s), "
            f"{total / 1e6:.1f} MB in {meta['seconds']:.1f} s "
            f"({total / 1e6 / max(meta['seconds'], 1e-9):.1f} MB/s) -> {out_dir}",
            file=sys.stderr,
        )
    return meta
