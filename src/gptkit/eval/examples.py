"""Eval examples: their form, the prompt wording, and the helpers every data reader shares.

An example is a dict with

- ``id``: ``file:line`` of the row, to trace a prediction back to its source;
- ``prompt``: the plain completion prompt, for base models;
- ``messages``: the same request as a chat (``[{"role": "user", "content": ...}]``),
  rendered with the model's own chat template for instruction-tuned models;
- ``reference``: a string, or a list of strings where the row has several (HumanEval's, in
  :mod:`gptkit.eval.code`, is a dict of the problem and its tests).

All the wording lives in :data:`PROMPTS`, one entry per task. Plain prompts end where the
answer begins ("German:"), so a base model continues with it; the task's ``stop`` strings
end the continuation. Chat prompts ask for the answer alone. A row that does not parse is a
:class:`GptkitError` naming ``file:line``.

The shipped data sets are found by :func:`find_data`: a ``--data`` path wins, then the
``GPTKIT_DATA`` environment variable, then ``shared/data`` in or beside the working
directory; never a path relative to the installed package.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError

Example = dict[str, Any]

#: task -> {"plain": completion prompt, "chat": user message}; fields in braces are filled
#: from the row
PROMPTS: dict[str, dict[str, str]] = {
    "gsm8k": {
        "plain": "Question: {question}\nAnswer:",
        "chat": (
            "{question}\n\nSolve the problem step by step. End with a last line of the "
            "form '#### <number>' giving the final answer."
        ),
    },
    "multi30k": {
        "plain": "English: {source}\nGerman:",
        "chat": (
            "Translate this English sentence into German. Reply with the translation "
            "only.\n\n{source}"
        ),
    },
    "tatoeba": {
        "plain": "English: {source}\nChinese:",
        "chat": (
            "Translate this English sentence into Chinese. Reply with the translation "
            "only.\n\n{source}"
        ),
    },
    "scitldr": {
        "plain": "{source}\n\nTL;DR:",
        "chat": "Summarize this scientific abstract in one sentence (a TL;DR).\n\n{source}",
    },
    "self_instruct": {
        "plain": "Instruction: {instruction}\n{input_block}Output:",
        "chat": "{instruction}{chat_input}",
    },
    "humaneval": {
        "plain": "{prompt}",
        "chat": (
            "Complete this Python function. Reply with the whole function, with the imports "
            "it needs, in one ```python code block.\n\n```python\n{prompt}```"
        ),
    },
}


def render(task: str, **fields: str) -> tuple[str, list[dict[str, str]]]:
    """The plain prompt and the chat messages of ``task`` for one row's fields."""
    wording = PROMPTS[task]
    prompt = wording["plain"].format(**fields)
    messages = [{"role": "user", "content": wording["chat"].format(**fields)}]
    return prompt, messages


# -- where the data sets are -----------------------------------------------------------------


def data_dirs() -> list[Path]:
    """Where the shipped data sets are looked for, in order: ``$GPTKIT_DATA``, then
    ``shared/data`` in the working directory, then ``../shared/data`` beside it."""
    dirs = [Path("shared") / "data", Path("..") / "shared" / "data"]
    if os.environ.get("GPTKIT_DATA"):
        dirs.insert(0, Path(os.environ["GPTKIT_DATA"]))
    return dirs


def find_data(rel: str, task: str) -> Path:
    """``rel`` under the first of :func:`data_dirs` that has it, or an error that says how
    to point at the data (``--data`` or ``GPTKIT_DATA``)."""
    tried = list(dict.fromkeys((d / rel).resolve() for d in data_dirs()))
    for p in tried:
        if p.exists():
            return p
    raise GptkitError(
        f"no data for task {task}: {' and '.join(str(p) for p in tried)} do not exist; "
        "pass --data PATH, or set GPTKIT_DATA to the directory that holds the data sets"
    )


# -- reading files -------------------------------------------------------------------------


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file, gzip-compressed when it ends in .gz."""
    if not path.is_file():
        raise GptkitError(f"{path} does not exist; check the --data path")
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    yield n, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise GptkitError(
                        f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start}); fix "
                        "or remove the line"
                    ) from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise GptkitError(f"{path} cannot be read ({e}); is it complete?") from None


def read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("file:line", object)`` per non-blank line of a JSON Lines file."""
    for n, line in read_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise GptkitError(f"{where}: not valid JSON ({e}); fix or remove the line") from None
        if not isinstance(row, dict):
            raise GptkitError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def row_field(where: str, row: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """``row[name]``, or an error naming ``where`` if it is missing or not of ``kind``."""
    value = row.get(name)
    if not isinstance(value, kind):
        got = "missing" if name not in row else f"a {type(value).__name__}"
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise GptkitError(f"{where}: field {name!r} should be a {want} but is {got}")
    return value


def row_strings(where: str, row: dict[str, Any], name: str) -> list[str]:
    """``row[name]`` as a non-empty list of strings, or an error naming ``where``."""
    value = row_field(where, row, name, list)
    if not value or not all(isinstance(v, str) for v in value):
        raise GptkitError(f"{where}: field {name!r} should be a non-empty list of strings")
    return value


def limit_reached(examples: list[Example], limit: int | None) -> bool:
    """Whether a reader has its ``limit`` of examples (None: no limit)."""
    return limit is not None and len(examples) >= limit


def check_limit(limit: int | None) -> None:
    """Refuse a ``limit`` below 1 (None means all)."""
    if limit is not None and limit < 1:
        raise GptkitError(f"limit must be at least 1, got {limit}")
