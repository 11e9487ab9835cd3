"""Chat templates: the jinja2 programs that Hugging Face tokenizers and GGUF files carry
(``tokenizer.chat_template``), rendered as transformers renders them.

A sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the loop-controls
extension, a ``tojson`` filter and ``raise_exception`` / ``strftime_now`` helpers, and the
variables ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``. A model
without a template (gptkit's own pretrained ones) gets ChatML.

Tool calling follows transformers' convention: the OpenAI-style ``tools`` list goes to the
template as ``tools``, assistant messages carry ``tool_calls`` (``{"id", "type": "function",
"function": {"name", "arguments": dict}}``) and tool results are ``{"role": "tool",
"tool_call_id", "content"}`` messages. A template that never reads ``tools`` (SmolLM2's is
plain ChatML) gets the conversation in gptkit's fallback format instead, the Hermes / Qwen2.5
convention (https://github.com/NousResearch/Hermes-Function-Calling), written as plain
messages so any template renders it::

    system     <its text>\n\n# Tools ... <tools>\n{one tool's JSON per line}\n</tools> ...
    assistant  <text, if any>\n<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
    user       <tool_response>\n<result>\n</tool_response>      (consecutive results joined)

:func:`parse_tool_calls` reads the assistant's calls back from such text.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, meta
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
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``).

    ``tools`` (OpenAI-style function specs), assistant ``tool_calls`` and ``tool`` messages
    go to a template that reads ``tools``; any other template gets them in the fallback
    format of :func:`tool_messages`.
    """
    has_tools = bool(tools) or any(_is_tool_turn(m) for m in messages)
    if has_tools and not template_reads_tools(template or CHATML):
        messages = tool_messages(messages, tools)  # type: ignore[arg-type]
    elif has_tools:  # transformers' convention: content text, call arguments as dicts
        messages = [_native(m) for m in messages]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise GptkitError(f"message {i} needs a 'role' and a 'content'")
    try:
        return _compile(template or CHATML).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            **({"tools": tools} if tools else {}),
        )
    except TemplateError as e:
        raise GptkitError(f"the chat template failed to render ({e})") from None


def apply_chat_template(
    tokenizer: Tokenizer,
    messages: list[Message],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """``render_chat`` with the tokenizer's own template and special tokens."""
    return render_chat(
        messages,
        tokenizer.chat_template,
        add_generation_prompt,
        tokenizer.bos_token,
        tokenizer.eos_token,
        tools,
    )


# -- tool calls: the fallback format -------------------------------------------------------

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to serve the user's request. "
    "The functions, as JSON signatures:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, answer with a JSON object of its name and arguments between "
    "<tool_call></tool_call> tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <arguments-object>}}\n</tool_call>\n'
    "The result comes back between <tool_response></tool_response> tags."
)


@lru_cache(maxsize=16)
def template_reads_tools(template: str) -> bool:
    """Whether a chat template reads the ``tools`` variable (renders tool specs itself)."""
    return "tools" in meta.find_undeclared_variables(_compile(template).environment.parse(template))


def _is_tool_turn(m: Any) -> bool:
    return isinstance(m, dict) and (m.get("role") == "tool" or bool(m.get("tool_calls")))


def call_arguments(arguments: dict[str, Any] | str) -> dict[str, Any]:
    """A call's arguments as a dict; the OpenAI API sends them as JSON text."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise GptkitError(f"tool call arguments are not valid JSON ({e.msg})") from None
    if not isinstance(arguments, dict):
        raise GptkitError("tool call arguments must be a JSON object")
    return arguments


def _native(m: Any) -> Any:
    if not isinstance(m, dict):
        return m
    calls = [
        {
            **c,
            "function": {
                **c["function"],
                "arguments": call_arguments(c["function"].get("arguments") or {}),
            },
        }
        for c in m.get("tool_calls") or []
    ]
    return {**m, "content": m.get("content") or ""} | ({"tool_calls": calls} if calls else {})


def tool_call_text(name: str, arguments: dict[str, Any] | str) -> str:
    """One call in the fallback format (``arguments`` as a dict or as JSON text)."""
    body = json.dumps({"name": name, "arguments": call_arguments(arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def tools_system_text(tools: list[dict[str, Any]], system: str = "") -> str:
    """A system message's text with the tools' signatures and the calling convention."""
    specs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    block = TOOLS_PREAMBLE.format(tools=specs)
    return f"{system}\n\n{block}" if system else block


def tool_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[Message]:
    """The conversation in the fallback format, as plain ``{"role", "content"}`` messages:
    the tools join the system message (one is added first if there is none), each assistant
    call becomes a ``<tool_call>`` block after its text, and each run of ``tool`` messages
    becomes one user turn of ``<tool_response>`` blocks."""
    out: list[Message] = []
    if tools:
        first = messages[0] if messages else {}
        has_system = first.get("role") == "system"
        system = (first.get("content") or "") if has_system else ""
        out.append({"role": "system", "content": tools_system_text(tools, system)})
        messages = messages[1:] if has_system else messages
    joining = False  # the last message is a user turn of tool results
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise GptkitError(f"message {i} needs a 'role'")
        content = m.get("content") or ""
        if m["role"] == "tool":
            block = f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"
            if joining:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            joining = True
            continue
        joining = False
        calls = [
            tool_call_text(c["function"]["name"], c["function"].get("arguments") or {})
            for c in m.get("tool_calls") or []
        ]
        out.append(
            {"role": m["role"], "content": "\n".join([content, *calls] if content else calls)}
        )
    return out


_CALL = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.S
)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """The assistant's text before its first call, and its calls (``{"name", "arguments"}``,
    arguments a dict) in the fallback format. A block that is not a JSON object with a
    string ``name`` and an object of ``arguments`` is not a call (it stays out of both);
    an unclosed last block counts, as generation may stop before the closing tag."""
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return text, []
    calls = []
    for body in _CALL.findall(text, start):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            continue
        if (
            isinstance(call, dict)
            and isinstance(call.get("name"), str)
            and isinstance(call.get("arguments", {}), dict)
        ):
            calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
    return text[:start].rstrip(), calls
