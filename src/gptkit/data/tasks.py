"""Fine-tuning data: SFT examples with the loss on the answer only, and classification
examples (text or text pairs with a label) in GPT-1's input form.

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
from tokenizers import Tokenizer as HFTokenizer

from gptkit.errors import GptkitError
from gptkit.tokenizer.base import Tokenizer
from gptkit.tokenizer.bpe import BPETokenizer
from gptkit.tokenizer.char import CharTokenizer
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

    def __init__(self, examples: list[Any], batch_size: int, seed: int = 0, shuffle: bool = True):
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

    def _draw(self) -> list[Any]:
        batch = []
        while len(batch) < self.batch_size:
            if self.pos == len(self.order):
                self._new_epoch()
            batch.append(self.examples[self.order[self.pos]])
            self.pos += 1
        return batch

    def next(self) -> tuple[torch.Tensor, ...]:
        batch = self._draw()
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


class PackedSampler(ExampleSampler):
    """Like :class:`ExampleSampler`, but each row packs consecutive examples (in the epoch's
    order) until the next one would overflow ``row_len`` tokens, so short examples waste no
    padding. ``next()`` adds segment ids (B, T): 1, 2, ... per example, 0 for padding; the
    model restarts positions at each segment and lets no token see another example.
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        row_len: int,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.row_len = row_len
        super().__init__(examples, batch_size, seed, shuffle)

    def _row(self) -> list[Example]:
        row: list[Example] = []
        used = 0
        while True:
            if self.pos == len(self.order):
                if row:  # an epoch boundary ends the row
                    return row
                self._new_epoch()
            ex = self.examples[self.order[self.pos]]
            n = len(ex.ids) - 1
            if row and used + n > self.row_len:
                return row
            row.append(ex)
            used += n
            self.pos += 1

    def next(self) -> tuple[torch.Tensor, ...]:
        rows = [self._row() for _ in range(self.batch_size)]
        T = max(sum(len(ex.ids) - 1 for ex in row) for row in rows)
        x = torch.zeros(len(rows), T, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        seg = torch.zeros(len(rows), T, dtype=torch.long)
        for i, row in enumerate(rows):
            at = 0
            for s, ex in enumerate(row, 1):
                n = len(ex.ids) - 1
                x[i, at : at + n] = torch.tensor(ex.ids[:-1])
                y[i, at : at + n] = torch.tensor(ex.labels[1:])
                seg[i, at : at + n] = s
                at += n
        return x, y, seg


# -- classification ------------------------------------------------------------------------
#
# GPT-1 (Radford et al. 2018, section 3.3 and Figure 1) turns every task into token sequences
# the pretrained model reads, framed by three tokens added to the vocabulary and trained:
#
#   single      <s> text <e>                      -> head(h_e)
#   pair        <s> premise $ hypothesis <e>      -> head(h_e)
#   similarity  <s> a $ b <e>   and   <s> b $ a <e>  -> head(h_e1 + h_e2)   (no order)
#   choice      <s> context $ answer_k <e>, k = 1..K -> one score each, softmax over the K
#
# (<s> start, $ delimiter, <e> extract). Without a format (``None``), the text(s) are closed
# by the end-of-sequence token a pretrained model already knows, and no token is added.

FORMATS: tuple[str, ...] = ("single", "pair", "similarity", "choice")
START, DELIM, EXTRACT = "<|gpt1_start|>", "<|gpt1_delim|>", "<|gpt1_extract|>"
TASK_TOKENS: tuple[str, ...] = (START, DELIM, EXTRACT)
CHOICE_HEAD: tuple[str, ...] = ("score",)  # a choice head's one output: each answer's score


@dataclass(frozen=True)
class Labelled:
    """One classification example: its ids (ending with the extract token) and label index;
    ``others`` holds the further sequences of a multi-sequence format (similarity: the other
    order; choice: the other answers, ``ids`` being the first), and ``label`` is then the
    index of the right answer among :attr:`views`."""

    ids: list[int]
    label: int
    others: tuple[list[int], ...] = ()

    @property
    def views(self) -> tuple[list[int], ...]:
        return (self.ids, *self.others)


def check_format(fmt: str | None) -> None:
    """A clear error for an unknown input format."""
    if fmt is not None and fmt not in FORMATS:
        raise GptkitError(f"unknown format {fmt!r}; choose from {list(FORMATS)}")


def with_task_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` with GPT-1's start, delimiter and extract tokens after its own ids
    (every other id unchanged); the same tokenizer when it has them already."""
    missing = [t for t in TASK_TOKENS if t not in tokenizer.special_tokens]
    if not missing:
        return tokenizer
    if isinstance(tokenizer, CharTokenizer):
        specials = [*tokenizer.special_tokens, *missing]
        return CharTokenizer(tokenizer.chars, specials, tokenizer.eos_token)
    if isinstance(tokenizer, BPETokenizer):
        # a copy: the caller's tokenizer (and its cached encoders) stays as it was
        inner = HFTokenizer.from_str(tokenizer._tok.to_str())
        inner.add_special_tokens(missing)
        out = BPETokenizer(inner, tokenizer.eos_token, tokenizer.chat_template)
        out.bos_token, out.add_bos = tokenizer.bos_token, tokenizer.add_bos
        return out
    raise GptkitError(f"cannot add GPT-1's task tokens to a {type(tokenizer).__name__}")


def read_labelled(path: str | Path) -> Iterator[tuple[str, list[str], str | None]]:
    """``(where, texts, label)`` per example of a classification file.

    A ``.jsonl`` row is ``{"text": ..., "label": ...}``, with ``"text_b"`` for text pairs or
    ``"choices": [...]`` for multiple choice (then ``texts`` is the context followed by the
    choices, and ``label`` the index of the right one). ``label`` may be a name or an
    integer, and may be absent in files to predict. Any other file is tab-separated,
    ``label<TAB>text`` or ``label<TAB>text<TAB>text_b``, one example per line; a first line
    whose first field is ``label`` is a header and skipped (SST-2's ``.tsv`` files and the
    SMS spam collection read as they ship).
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        for where, row in read_jsonl(path):
            label = row.get("label")
            if isinstance(label, bool) or not isinstance(label, str | int | None):
                raise GptkitError(f"{where}: 'label' must be a name or an integer")
            if isinstance(label, str) and not label.strip():
                raise GptkitError(f"{where}: empty 'label'; every example needs one")
            texts = [_text(row, "text", where)]
            if "text_b" in row and "choices" in row:
                raise GptkitError(f"{where}: a row has 'text_b' or 'choices', not both")
            if "text_b" in row:
                texts.append(_text(row, "text_b", where))
            if "choices" in row:
                texts += _choices(row, where)
            yield where, texts, None if label is None else str(label)
        return
    yield from _read_tsv(path)


def _choices(row: dict[str, Any], where: str) -> list[str]:
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise GptkitError(f"{where}: 'choices' must be a list of at least two answers")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise GptkitError(f"{where}: every choice must be non-empty text")
    return choices


def _read_tsv(path: Path) -> Iterator[tuple[str, list[str], str | None]]:
    if not path.is_file():
        raise GptkitError(f"data file {path} does not exist; check the path")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{path}:{n}"
            fields = line.split("\t")
            if n == 1 and fields[0].strip().lower() == "label":
                continue
            if len(fields) not in (2, 3):
                raise GptkitError(
                    f"{where}: expected label<TAB>text (or label<TAB>text<TAB>text_b), got "
                    f"{len(fields)} field(s); use tabs between fields, or a .jsonl file"
                )
            label, texts = fields[0].strip(), fields[1:]
            if not label:
                raise GptkitError(f"{where}: the row has no label; every example needs one")
            for t in texts:
                if not t.strip():
                    raise GptkitError(f"{where}: empty text; every example needs one")
            yield where, texts, label


def _fit(parts: list[list[int]], budget: int, max_len: int) -> list[list[int]]:
    """``parts`` cut to ``budget`` tokens in all: the longest loses its tail first."""
    if budget < len(parts):
        raise GptkitError(f"a context of {max_len} tokens is too short to classify text")
    parts = [list(p) for p in parts]
    while sum(map(len, parts)) > budget:
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        parts[longest] = parts[longest][: len(parts[longest]) - 1]
    return parts


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_len: int) -> list[int]:
    """The input form without added tokens: ``[bos] text [delim text_b] extract``.

    The delimiter and the extract token are the tokenizer's end-of-sequence token (a token
    every pretrained model knows as a boundary); the head reads the hidden state at the
    extract token. Over ``max_len`` tokens, the longer text loses its tail first.
    """
    eos = tokenizer.eos_id
    mark = [eos] if eos is not None else tokenizer.encode("\n")
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    parts = [tokenizer.encode(t, allow_special=False) for t in texts]
    parts = _fit(parts, max_len - len(bos) - len(mark) * len(parts), max_len)
    ids = list(bos)
    for p in parts:
        ids += p + mark
    return ids


def _framed(tok: Tokenizer, texts: list[str], max_len: int) -> list[int]:
    """``<s> texts[0] $ texts[1] ... <e>`` (see the table above), cut to ``max_len``."""
    start, delim, extract = (tok.special_tokens[t] for t in TASK_TOKENS)
    parts = [tok.encode(t, allow_special=False) for t in texts]
    parts = _fit(parts, max_len - len(parts) - 1, max_len)
    ids = [start]
    for i, p in enumerate(parts):
        ids += [*p, delim if i < len(parts) - 1 else extract]
    return ids


def encode_views(
    tokenizer: Tokenizer, texts: list[str], fmt: str | None, max_len: int, where: str = "input"
) -> list[list[int]]:
    """The sequences one example becomes in format ``fmt`` (see the table above): one for
    single and pair, both orders for similarity, one per answer for choice (``texts`` is
    then the context followed by the answers)."""
    check_format(fmt)
    if fmt is None:
        return [encode_texts(tokenizer, texts, max_len)]
    if any(t not in tokenizer.special_tokens for t in TASK_TOKENS):
        raise GptkitError(
            f"format {fmt!r} needs GPT-1's task tokens in the tokenizer; fine-tune with "
            f"`gptkit finetune classify --format {fmt}`, which adds them"
        )
    wanted = {"single": "one text", "pair": "two texts", "similarity": "two texts"}
    n = {"single": 1, "pair": 2, "similarity": 2}.get(fmt)
    if n is not None and len(texts) != n:
        raise GptkitError(
            f"{where}: format {fmt!r} takes {wanted[fmt]} per example, got {len(texts)}"
        )
    if fmt == "choice" and len(texts) < 3:
        raise GptkitError(
            f"{where}: format 'choice' takes a context and at least two choices (a .jsonl "
            'row with "text" and "choices")'
        )
    if fmt == "similarity":
        return [_framed(tokenizer, texts, max_len), _framed(tokenizer, texts[::-1], max_len)]
    if fmt == "choice":
        return [_framed(tokenizer, [texts[0], answer], max_len) for answer in texts[1:]]
    return [_framed(tokenizer, texts, max_len)]


def resolve_label(label: str, labels: tuple[str, ...], where: str) -> int:
    """The index of ``label`` among ``labels``; an integer indexes them directly (SST-2's
    0/1 with ``--labels negative,positive``)."""
    if label in labels:
        return labels.index(label)
    if label.isdigit() and int(label) < len(labels):
        return int(label)
    raise GptkitError(
        f"{where}: unknown label {label!r}; the labels are {list(labels)} (fix the row, or "
        "pass --labels with every label)"
    )


def load_labelled(
    path: str | Path,
    tokenizer: Tokenizer,
    max_len: int,
    labels: tuple[str, ...] | None = None,
    fmt: str | None = None,
) -> tuple[list[Labelled], tuple[str, ...]]:
    """Every example of a classification file (see :func:`read_labelled`), encoded in
    format ``fmt`` (:func:`encode_views`), and the head's names: ``labels`` when given,
    else the distinct labels of the file, sorted (for ``choice``, :data:`CHOICE_HEAD`:
    the label indexes the example's choices)."""
    rows = []
    for where, texts, label in read_labelled(path):
        if label is None:
            raise GptkitError(f"{where}: the row has no 'label'; every example needs one")
        rows.append((where, texts, label))
    if not rows:
        raise GptkitError(f"{path} holds no examples")
    if fmt == "choice":
        return [_choice_example(tokenizer, *row, max_len) for row in rows], CHOICE_HEAD
    if not labels:
        found = {label for _, _, label in rows}
        key = (lambda s: int(s)) if all(s.isdigit() for s in found) else (lambda s: s)
        labels = tuple(sorted(found, key=key))
    if len(labels) < 2:
        raise GptkitError(f"{path}: classification needs at least two labels, got {list(labels)}")
    out = []
    for where, texts, label in rows:
        first, *others = encode_views(tokenizer, texts, fmt, max_len, where)
        out.append(Labelled(first, resolve_label(label, labels, where), tuple(others)))
    return out, labels


def _choice_example(
    tokenizer: Tokenizer, where: str, texts: list[str], label: str, max_len: int
) -> Labelled:
    first, *others = encode_views(tokenizer, texts, "choice", max_len, where)
    names = tuple(str(i) for i in range(len(texts) - 1))
    if label not in names:
        raise GptkitError(
            f"{where}: the label of a choice row is the index of the right choice "
            f"(0 to {len(names) - 1}), got {label!r}"
        )
    return Labelled(first, int(label), tuple(others))


class LabelledSampler(ExampleSampler):
    """Batches of classification examples, right-padded. Each epoch's random order is
    grouped by length within windows of 32 batches (then the batches are shuffled), which
    cuts most padding while keeping batches random.

    ``next()`` gives what :func:`collate_labelled` gives.
    """

    def _new_epoch(self) -> None:
        super()._new_epoch()
        window = 32 * self.batch_size
        order = []
        for start in range(0, len(self.order), window):
            chunk = self.order[start : start + window]
            order += sorted(chunk, key=lambda i: len(self.examples[i].ids))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            perm = torch.randperm(len(batches), generator=self.gen).tolist()
            batches = [batches[i] for i in perm]
        self.order = [i for b in batches for i in b]

    def next(self) -> tuple[torch.Tensor, ...]:
        return collate_labelled(self._draw())


def collate_labelled(batch: list[Labelled]) -> tuple[torch.Tensor, ...]:
    """Right-padded ids (N, T), LM targets (N, T), labels (B,) and extract-token indices
    (N,) of ``batch``: one row per sequence, so N = B when every example is one sequence
    (single, pair), and then these four are the whole batch. Examples of several sequences
    (similarity, choice) add ``owner`` (N,), the example each row belongs to, and ``slot``
    (N,), the row's index among that example's :attr:`Labelled.views`."""
    rows = [ids for ex in batch for ids in ex.views]
    T = max(len(r) for r in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
        y[i, : len(r) - 1] = torch.tensor(r[1:])
    labels = torch.tensor([ex.label for ex in batch])
    last = torch.tensor([len(r) - 1 for r in rows])
    if len(rows) == len(batch):
        return x, y, labels, last
    owner = torch.tensor([b for b, ex in enumerate(batch) for _ in ex.views])
    slot = torch.tensor([k for ex in batch for k in range(len(ex.views))])
    return x, y, labels, last, owner, slot
