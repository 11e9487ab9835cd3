"""Chat with a model: a conversation that keeps its history and renders it with the model's
own chat template (see :mod:`gptkit.tokenizer.chat`) for each reply."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gptkit.config import SampleConfig
from gptkit.generate.generator import decode_text
from gptkit.model.gpt import GPT
from gptkit.tokenizer.base import Tokenizer
from gptkit.tokenizer.chat import CHATML, Message, apply_chat_template, render_chat

__all__ = ["CHATML", "ChatSession", "Message", "apply_chat_template", "render_chat"]


class ChatSession:
    """A conversation with a model: it keeps the history and renders it for each reply.

    When the history no longer fits the context with room for a reply, the oldest messages
    are dropped (never the system message nor the newest one).

    Args:
        model, tokenizer: what to chat with.
        system: an optional system message.
        sample: the replies' :class:`~gptkit.config.SampleConfig` fields (temperature,
            top_p, max_new_tokens, ...); bad values raise here.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, system: str | None = None, **sample: Any):
        self.model, self.tokenizer = model, tokenizer
        self.config = SampleConfig.from_dict(sample)
        self.system = system
        self.messages: list[Message] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self) -> str:
        """The rendered history, ending with the assistant's turn. While it does not fit the
        context with room for a reply, the oldest messages go (never the system message nor
        the newest one)."""
        room = self.model.config.block_size - self.config.max_new_tokens
        while True:
            text = apply_chat_template(self.tokenizer, self.messages)
            older = [i for i, m in enumerate(self.messages[:-1]) if m["role"] != "system"]
            if not older or len(self.tokenizer.encode(text)) <= room:
                return text
            del self.messages[older[0]]

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply; the reply joins the history."""
        self.messages.append({"role": "user", "content": text})
        reply: list[str] = []
        for _, piece in decode_text(self.model, self.tokenizer, [self.prompt()], self.config):
            reply.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(reply).strip()})
