"""The ``sgd`` task: a service-desk assistant scored on held-out Schema-Guided Dialogue turns.

At every assistant turn of a dialogue the model sees the system message with the dialogue's
tools and the last turns of the gold history (:mod:`gptkit.data.dialogue`, the same pieces
it is fine-tuned on) and answers; its answer is read back with
:func:`gptkit.tokenizer.chat.parse_tool_calls`. A turn either is due a call (SGD's
``service_call``: method and parameters) or is due a reply (the SYSTEM utterance). The
scores follow the usual tool-use evaluations (BFCL's AST match; DSTC8's slot-level
precision/recall over SGD):

- ``call_exact_match``: at turns due a call, the first call has the method and exactly the
  arguments of the reference (values compared after trimming and lower-casing);
- ``call_name_accuracy``: ... the method alone;
- ``argument_precision`` / ``argument_recall`` / ``argument_f1``: (slot, value) pairs of the
  first call against the reference's, pooled over the turns due a call (a call to the wrong
  method matches no pair; a missing call has none);
- ``false_call_rate``: at turns due a reply, the share of answers that call a tool;
- ``bleu`` (sacrebleu, 0-100) and ``rougeL`` (F, 0-1): the answer's text (before any call)
  against the reference reply, at the turns due a reply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gptkit.data.dialogue import SYSTEM, WINDOW, read_dialogues, window_start
from gptkit.errors import GptkitError
from gptkit.eval.examples import Example, check_limit
from gptkit.tokenizer.chat import call_arguments, parse_tool_calls, render_chat, tool_messages


def read_sgd(path: str | Path, limit: int | None = None, window: int = WINDOW) -> list[Example]:
    """One example per assistant turn of SGD dialogues: a call or a reply is due.

    Args:
        path: a ``dialogues_*.json`` file or SGD's folder (every such file), with
            ``schema.json`` beside it.
        limit: read at most this many examples (turns, in file order).
        window: messages of gold history before each turn.

    The reference is ``{"call": {"name", "arguments"} or None, "text": reply or ""}``.
    """
    check_limit(limit)
    examples: list[Example] = []
    for d in read_dialogues(path):
        msgs = d.messages
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            history = [{"role": "system", "content": SYSTEM}]
            history += msgs[window_start(msgs, k, window) : k]
            messages = tool_messages(history, d.tools)
            call = None
            if m.get("tool_calls"):
                fn = m["tool_calls"][0]["function"]
                call = {"name": fn["name"], "arguments": call_arguments(fn["arguments"])}
            reference = {"call": call, "text": "" if call else m["content"]}
            prompt = render_chat(messages)  # ChatML, for a model without a template
            examples.append(
                dict(id=f"{d.id}:{k}", prompt=prompt, messages=messages, reference=reference)
            )
            if limit is not None and len(examples) >= limit:
                return examples
    return examples


def _value(v: Any) -> str:
    return str(v).strip().lower()


def _pairs(call: dict[str, Any] | None) -> set[tuple[str, str]]:
    return {(k, _value(v)) for k, v in (call or {}).get("arguments", {}).items()}


def first_call(prediction: str) -> tuple[str, dict[str, Any] | None]:
    """An answer's text before any call, and its first call (None without one)."""
    text, calls = parse_tool_calls(prediction)
    return text, calls[0] if calls else None


def tool_call_scores(
    predictions: Sequence[str],
    references: Sequence[dict[str, Any]],
    reply_scores: Callable[[list[str], list[str]], dict[str, float]] | None = None,
) -> dict[str, float]:
    """The ``sgd`` scores (see the module docstring) of answers against references of
    ``{"call": ..., "text": ...}``; ``reply_scores`` scores the replies (the ``sgd`` entry
    of :data:`gptkit.eval.metrics.GENERATION_METRICS` passes BLEU and ROUGE-L)."""
    if len(predictions) != len(references):
        raise GptkitError(
            f"{len(predictions)} predictions for {len(references)} references; give one each"
        )
    due = exact = named = tp = n_pred = n_ref = false_calls = 0
    texts: list[str] = []
    replies: list[str] = []
    for pred, ref in zip(predictions, references, strict=True):
        text, call = first_call(pred)
        gold = ref.get("call")
        if gold is None:
            false_calls += call is not None
            texts.append(text)
            replies.append(ref["text"])
            continue
        due += 1
        same_name = call is not None and call["name"] == gold["name"]
        named += same_name
        p, g = _pairs(call), _pairs(gold)
        exact += same_name and p == g
        tp += len(p & g) if same_name else 0
        n_pred, n_ref = n_pred + len(p), n_ref + len(g)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_ref if n_ref else 0.0
    scores = {
        "call_exact_match": exact / due if due else 0.0,
        "call_name_accuracy": named / due if due else 0.0,
        "argument_precision": precision,
        "argument_recall": recall,
        "argument_f1": 2 * precision * recall / (precision + recall) if tp else 0.0,
        "false_call_rate": false_calls / len(texts) if texts else 0.0,
        "calls_due": float(due),
        "replies_due": float(len(texts)),
    }
    if texts and reply_scores is not None:
        scores |= reply_scores(texts, replies)
    return scores
