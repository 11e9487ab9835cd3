"""Supervised fine-tuning data: JSONL examples to token ids with the loss on the answer only.

A row is either ``{"prompt": ..., "completion": ...}`` or ``{"messages": [{"role": ...,
"content": ...}, ...]}`` (chat form). Both are rendered with the model's chat template when
``chat=True`` (the default when the tokenizer has one), else the prompt is used as written.
Labels are the ids themselves on the completion (or on every assistant turn) and
:data:`IGNORE` elsewhere, so the prompt carries no loss; the end-of-sequence token closes
each answer so the model learns to stop.

Segments are encoded one at a time and concatenated (as litgpt and most SFT code do), so the
ids at a prompt/answer seam may differ from encoding the whole text at once.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptkit.errors import GptkitError
from gptkit.tokenizer.base import Tokenizer
from gptkit.tokenizer.chat import Message, render_chat

IGNORE = -100  # the label of a position without loss (torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class Example:
    """One training sequence: ``ids`` and, position by position, the ``labels`` to predict
    (``IGNORE`` where there is no loss)."""

    ids: list[int]
    labels: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each non-blank line; ``where`` is ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"data file {path} does not exist; check the path")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptkitError(
                    f"{where}: malformed JSON ({e.msg}); fix or remove the line"
                ) from None
            if not isinstance(row, dict):
                raise GptkitError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise GptkitError(f"{where}: field {key!r} is missing or not text")
    if not value.strip():
        raise GptkitError(f"{where}: field {key!r} is empty; every example needs one")
    return value


def _messages(row: dict[str, Any], where: str) -> list[Message]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise GptkitError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise GptkitError(f"{where}: message {i} needs a 'role'")
        if not isinstance(m.get("content"), str):
            raise GptkitError(f"{where}: message {i} needs a text 'content'")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise GptkitError(f"{where}: no non-empty assistant message to learn from")
    return msgs


def encode_example(
    tokenizer: Tokenizer, row: dict[str, Any], chat: bool | None = None, where: str = "example"
) -> Example:
    """Ids and labels of one row (see the module docstring for the forms)."""
    chat = tokenizer.chat_template is not None if chat is None else chat
    eos = tokenizer.eos_id
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    tail = [eos] if eos is not None else []

    def render(msgs: list[Message], generation_prompt: bool) -> str:
        return render_chat(
            msgs,
            tokenizer.chat_template,
            generation_prompt,
            tokenizer.bos_token,
            tokenizer.eos_token,
        )

    if "messages" in row:
        msgs = _messages(row, where)
        if not chat:
            raise GptkitError(f"{where}: chat rows need a chat template (drop --no-chat)")
        ids, labels = list(bos), [IGNORE] * len(bos)
        done = ""
        for i, m in enumerate(msgs):
            before = render(msgs[:i], True) if m["role"] == "assistant" else None
            full = render(msgs[: i + 1], False)
            if not full.startswith(done):
                raise GptkitError(
                    f"{where}: the chat template does not render this conversation turn by "
                    "turn, so the answers cannot be told apart; use prompt/completion rows"
                )
            if before is not None and full.startswith(before):
                # The prompt part (template header of the turn) carries no loss.
                head = tokenizer.encode(before[len(done) :])
                body = tokenizer.encode(full[len(before) :])
                ids += head + body
                labels += [IGNORE] * len(head) + body
            else:
                seg = tokenizer.encode(full[len(done) :])
                ids += seg
                labels += [IGNORE] * len(seg)
            done = full
        example = Example(ids, labels)
        if example.answer_tokens == 0:
            raise GptkitError(f"{where}: the chat template left no assistant text to learn from")
        return example
    if "prompt" not in row or "completion" not in row:
        raise GptkitError(
            f"{where}: a row needs 'prompt' and 'completion', or 'messages'; it has {sorted(row)}"
        )
    prompt, completion = _text(row, "prompt", where), _text(row, "completion", where)
    if chat:
        prompt = render([{"role": "user", "content": prompt}], True)
    p_ids = bos + tokenizer.encode(prompt)
    c_ids = tokenizer.encode(completion) + tail
    return Example(p_ids + c_ids, [IGNORE] * len(p_ids) + c_ids)


def load_examples(
    path: str | Path,
    tokenizer: Tokenizer,
    max_len: int,
    chat: bool | None = None,
) -> list[Example]:
    """Every row of a JSONL file, encoded; examples longer than ``max_len`` are cut at
    ``max_len`` (an example whose answer would be cut away entirely is an error)."""
    out = []
    for where, row in read_jsonl(path):
        ex = encode_example(tokenizer, row, chat, where)
        if len(ex.ids) > max_len:
            ex = Example(ex.ids[:max_len], ex.labels[:max_len])
            if ex.answer_tokens == 0:
                raise GptkitError(
                    f"{where}: the prompt alone is longer than the context ({max_len} tokens); "
                    "shorten it or raise --block-size"
                )
        out.append(ex)
    if not out:
        raise GptkitError(f"{path} holds no examples")
    return out


class ExampleSampler:
    """Batches of examples in a seeded random order, epoch after epoch, right-padded.

    ``next()`` gives inputs ``ids[:-1]`` and targets ``labels[1:]`` (B, T), T the longest
    example of the batch minus one; padding has target :data:`IGNORE`, and since attention
    is causal it never changes the real positions. The generator state and the position in
    the current epoch's order are the data position saved in checkpoints.
    """

    def __init__(
        self, examples: list[Example], batch_size: int, seed: int = 0, shuffle: bool = True
    ):
        if not examples:
            raise GptkitError("no examples to draw batches from")
        self.examples, self.batch_size, self.shuffle = examples, batch_size, shuffle
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.pos = 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        n = len(self.examples)
        self.order = (
            torch.randperm(n, generator=self.gen).tolist() if self.shuffle else list(range(n))
        )
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = []
        while len(batch) < self.batch_size:
            if self.pos == len(self.order):
                self._new_epoch()
            batch.append(self.examples[self.order[self.pos]])
            self.pos += 1
        T = max(len(ex.ids) for ex in batch) - 1
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), IGNORE, dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex.ids) - 1
            x[i, :n] = torch.tensor(ex.ids[:-1])
            y[i, :n] = torch.tensor(ex.labels[1:])
        return x, y

    def state_dict(self) -> dict[str, Any]:
        raw = self.gen.get_state().numpy().tobytes()
        return {"generator": base64.b64encode(raw).decode(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raw = bytearray(base64.b64decode(state["generator"]))
        self.gen.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
        self.order, self.pos = list(state["order"]), int(state["pos"])


def split_examples(examples: list[Example], val_fraction: float = 0.05) -> tuple[list, list]:
    """Hold out the last ``val_fraction`` of the examples (at least one when there are 20 or
    more, none below) for validation."""
    n_val = max(1, round(len(examples) * val_fraction)) if len(examples) >= 20 else 0
    return (examples[:-n_val], examples[-n_val:]) if n_val else (examples, [])
