"""Chat templates: the jinja2 programs that Hugging Face tokenizers and GGUF files carry
(``tokenizer.chat_template``), rendered as transformers renders them.

A sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the loop-controls
extension, a ``tojson`` filter and ``raise_exception`` / ``strftime_now`` helpers, and the
variables ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``. A model
without a template (gptkit's own pretrained ones) gets ChatML.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptkit.errors import GptkitError
from gptkit.tokenizer.base import Tokenizer

#: ChatML, for models that come without a template of their own
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Message = dict[str, str]


def _raise(message: str) -> None:
    raise GptkitError(f"the chat template refused the conversation: {message}")


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
        x, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise GptkitError(f"the chat template does not parse ({e})") from None


def render_chat(
    messages: list[Message],
    template: str | None = None,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise GptkitError(f"message {i} needs a 'role' and a 'content'")
    try:
        return _compile(template or CHATML).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
    except TemplateError as e:
        raise GptkitError(f"the chat template failed to render ({e})") from None


def apply_chat_template(
    tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool = True
) -> str:
    """``render_chat`` with the tokenizer's own template and special tokens."""
    return render_chat(
        messages,
        tokenizer.chat_template,
        add_generation_prompt,
        tokenizer.bos_token,
        tokenizer.eos_token,
    )
