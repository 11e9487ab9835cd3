"""The web chat's attention map: what each token of an answer attended to.

``POST /v1/attention`` (see :mod:`gptkit.serve.app`) hands the conversation up to an
answer here. The prompt is rendered with the model's chat template, as the server rendered
it for the answer, and the answer's text encoded after it; the weights come from the
reference path of :mod:`gptkit.inspect.probe`, averaged over heads as each layer is
computed, so a long conversation never holds every layer's (heads, T, T) weights.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

from gptkit.errors import GptkitError
from gptkit.inspect import draw
from gptkit.inspect.probe import _run
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer
from gptkit.tokenizer.chat import apply_chat_template

MAX_TOKENS = 1024  # the most tokens of a conversation a map covers (its end)


def answer_attention(
    model: GPT,
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, Any]],
    max_tokens: int = MAX_TOKENS,
) -> dict[str, Any]:
    """The attention map of the last message, an assistant's answer, over the conversation.

    Args:
        model, tokenizer: the served model.
        messages: chat-template messages (``role``, ``content``), the last the answer.
        max_tokens: at most this many tokens (the conversation's end) are drawn.

    Returns:
        ``image`` (a ``data:image/png;base64`` URL), ``answer_tokens``, ``context_tokens``,
        ``tokens`` (the labels of the columns) and a one-line ``note``.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise GptkitError("the last message must be the assistant's answer to draw")
    answer = tokenizer.encode(str(messages[-1].get("content") or ""), allow_special=False)
    if not answer:
        raise GptkitError("the answer has no text; its attention cannot be drawn")
    prompt = tokenizer.encode_prompt(apply_chat_template(tokenizer, list(messages[:-1])))
    ids = prompt + answer
    keep = min(max_tokens, model.config.block_size)
    dropped = max(0, len(ids) - keep)
    ids = ids[dropped:]
    first = max(0, len(ids) - len(answer))  # the answer's first row (it may be cut too)
    run = _run(model, ids, attention=True, keep=lambda w: w[:, first:].mean(0))
    weights = run["attention"].mean(0).cpu().numpy()  # (answer, T): mean over layers
    labels = [draw.token_label(tokenizer.decode([i])) for i in ids]
    png = io.BytesIO()
    draw.draw_answer_attention(png, weights, labels[first:], labels)
    note = f"{len(ids) - first} answer tokens over {len(ids)} tokens"
    if dropped:
        note += f" (the first {dropped} tokens of the conversation are left out)"
    return {
        "image": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode(),
        "answer_tokens": len(ids) - first,
        "context_tokens": len(ids),
        "tokens": labels,
        "note": note + "; mean of all layers and heads, square-root colour scale",
    }
