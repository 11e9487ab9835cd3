"""Chat templates: the jinja2 programs that Hugging Face tokenizers and GGUF files carry
(``tokenizer.chat_template``), rendered as transformers renders them.

A sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the loop-controls
extension, a ``tojson`` filter and ``raise_exception`` / ``strftime_now`` helpers, and the
variables ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``. A model
without a template (gptkit's own pretrained ones) gets ChatML.

Templates come from model files, so they are treated as hostile: ``{% include %}``,
``{% import %}`` and ``{% extends %}`` are refused (there is nothing to load them from),
a template that is not text is refused, and rendering stops with a GptkitError after
:data:`RENDER_SECONDS` or past an output size (checked at every call, item lookup and output
chunk), with ``*`` and ``**`` bounded so one expression cannot allocate gigabytes. The list
of named templates that ``tokenizer_config.json`` may hold (transformers' form, e.g.
``default`` and ``tool_use``) is accepted by :func:`pick_template`.

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
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, meta, nodes
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

#: the longest a template may render, and its output's size beyond 4x its input
RENDER_SECONDS, RENDER_EXTRA_CHARS = 2.0, 1 << 20
_LOADS = (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)


def named_templates(template: Any) -> dict[str, str] | None:
    """transformers' list of ``{"name", "template"}`` (or a name -> text mapping) as a
    name -> text dict; None for plain text or None; a GptkitError for anything else."""
    if template is None or isinstance(template, str):
        return None
    named = template
    if isinstance(template, list):
        if not all(isinstance(t, dict) and "name" in t and "template" in t for t in template):
            raise GptkitError(
                'the chat template is a list, but not of {"name", "template"} objects; '
                "fix tokenizer_config.json"
            )
        named = {t["name"]: t["template"] for t in template}
    if not isinstance(named, dict):
        raise GptkitError(
            f"the chat template is a {type(template).__name__}, not text; fix the tokenizer file"
        )
    return named


def pick_template(template: Any, tools: bool = False) -> str | None:
    """The template text from what a tokenizer file holds: text, or transformers' named
    templates (:func:`named_templates`), of which ``tool_use`` is taken when tools are
    given and ``default`` otherwise."""
    named = named_templates(template)
    if named is None:
        return template
    for name in ("tool_use", "default") if tools else ("default",):
        if isinstance(named.get(name), str):
            return named[name]
    raise GptkitError(
        f"the chat templates are named {sorted(map(str, named))}; none is 'default' text"
    )


class _Budget(threading.local):
    deadline = float("inf")


_BUDGET = _Budget()


def _in_time() -> None:
    if time.monotonic() > _BUDGET.deadline:
        raise GptkitError(
            f"the chat template ran longer than {RENDER_SECONDS:g} s; it is broken or hostile"
        )


class _Env(ImmutableSandboxedEnvironment):
    """The sandbox, with a clock checked at every call and lookup and ``*`` / ``**`` bounded
    (jinja2 leaves both unbounded: ``'a' * 10**10`` would allocate 10 GB)."""

    intercepted_binops = frozenset({"*", "**"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _in_time()
        return super().call(__context, __obj, *args, **kwargs)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _in_time()
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _in_time()
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _in_time()
        if operator == "**" and isinstance(right, int) and abs(right) > 256:
            raise GptkitError(f"the chat template raises to the power {right}; refused")
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            sized = isinstance(seq, str | list | tuple) and isinstance(n, int)
            if sized and len(seq) * n > RENDER_EXTRA_CHARS:
                raise GptkitError("the chat template builds a huge sequence; refused")
        return super().call_binop(context, operator, left, right)


def _raise(message: str) -> None:
    raise GptkitError(f"the chat template refused the conversation: {message}")


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    if not isinstance(template, str):
        raise GptkitError(f"the chat template is a {type(template).__name__}, not text")
    env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
        x, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        if any(True for _ in env.parse(template).find_all(_LOADS)):
            raise GptkitError(
                "the chat template includes, imports or extends another template; a chat "
                "template must be self-contained"
            )
        return env.from_string(template)
    except (TemplateError, RecursionError) as e:
        raise GptkitError(f"the chat template does not parse ({e})") from None


def _render(compiled: Any, limit: int, **variables: Any) -> str:
    """Render under the clock and the output limit (the chunks are counted as they come)."""
    _BUDGET.deadline = time.monotonic() + RENDER_SECONDS
    parts, size = [], 0
    try:
        for chunk in compiled.generate(**variables):
            _in_time()
            size += len(chunk)
            if size > limit:
                raise GptkitError(
                    f"the chat template's output passed {limit:,} characters; it is broken "
                    "or hostile"
                )
            parts.append(chunk)
    except GptkitError:
        raise
    except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as e:
        raise GptkitError(f"the chat template failed to render ({e})") from None
    except (AttributeError, RecursionError, MemoryError) as e:
        raise GptkitError(f"the chat template failed to render ({type(e).__name__})") from None
    finally:
        _BUDGET.deadline = float("inf")
    return "".join(parts)


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
    template = pick_template(template, bool(tools))  # text, or a list of named templates
    has_tools = bool(tools) or any(_is_tool_turn(m) for m in messages)
    if has_tools and not template_reads_tools(template or CHATML):
        messages = tool_messages(messages, tools)  # type: ignore[arg-type]
    elif has_tools:  # transformers' convention: content text, call arguments as dicts
        messages = [_native(m) for m in messages]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise GptkitError(f"message {i} needs a 'role' and a 'content'")
    try:
        return _render(
            _compile(template or CHATML),
            4 * len(json.dumps(messages, default=str)) + RENDER_EXTRA_CHARS,
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
    """``render_chat`` with the tokenizer's own template (its named ones, when its file held
    transformers' list form) and special tokens."""
    return render_chat(
        messages,
        tokenizer.chat_templates or tokenizer.chat_template,  # type: ignore[arg-type]
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
