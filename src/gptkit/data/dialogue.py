"""Task-oriented dialogues as tool-calling chats: the Schema-Guided Dialogue set (SGD;
Rastogi et al., 2020, "Towards Scalable Multi-domain Conversational Agents: The
Schema-Guided Dialogue Dataset", https://github.com/google-research-datasets/
dstc8-schema-guided-dialogue) turned into OpenAI-style conversations.

Each service of ``schema.json`` becomes tools, one function per intent, whose parameters
are the intent's required and optional slots (strings; a categorical slot's possible values
as an ``enum``). A dialogue becomes messages::

    USER turn                          -> user message
    SYSTEM turn with a service_call    -> assistant tool_calls [{method, parameters}]
                                          tool message (the first service_results, JSON)
                                          assistant message (the utterance)
    SYSTEM turn without one            -> assistant message (the utterance)

Training rows (:func:`sft_rows`) are pieces of the conversation in the chat template's tool
format (:func:`gptkit.tokenizer.chat.tool_messages`): a system message with the dialogue's
tools, then at most ``window`` messages starting at a user turn; the loss falls on every
assistant turn (calls included). Evaluation (:mod:`gptkit.eval.tools`) prompts with the same
system message and the last ``window`` messages before each assistant turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.tokenizer.chat import Message, tool_messages

WINDOW = 6  # messages of history in a prompt or a training piece (bounds its length)
RESULTS = 1  # service results shown to the model per call (SGD lists up to 10)
SYSTEM = "You are a service desk assistant. Help the user with the services below."


@dataclass(frozen=True)
class Dialogue:
    """One SGD dialogue as a tool-calling conversation."""

    id: str
    tools: list[dict[str, Any]]
    messages: list[dict[str, Any]]  # OpenAI form: tool_calls on assistant turns, tool results


def read_schema(path: str | Path) -> dict[str, dict[str, Any]]:
    """``schema.json`` as service name -> service."""
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"{path} does not exist; SGD's schema.json lies beside the dialogues")
    try:
        services = json.loads(path.read_text(encoding="utf-8"))
        return {s["service_name"]: s for s in services}
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise GptkitError(f"{path} is not an SGD schema ({e}); check the file") from None


def service_tools(service: dict[str, Any], slot_descriptions: bool = False) -> list[dict[str, Any]]:
    """A service's intents as OpenAI function tools: parameters are the intent's slots
    (strings; a categorical slot's values as an ``enum``). The slots' descriptions are left
    out unless asked for: their names say as much, and the prompt is half as long."""
    slots = {s["name"]: s for s in service["slots"]}
    tools = []
    for intent in service["intents"]:
        props = {}
        for n in [*intent["required_slots"], *intent["optional_slots"]]:
            prop: dict[str, Any] = {"type": "string"}
            if slot_descriptions:
                prop["description"] = slots[n]["description"]
            if slots[n]["is_categorical"] and slots[n]["possible_values"]:
                prop["enum"] = list(slots[n]["possible_values"])
            props[n] = prop
        params = {"type": "object", "properties": props, "required": intent["required_slots"]}
        fn = {"name": intent["name"], "description": intent["description"], "parameters": params}
        tools.append({"type": "function", "function": fn})
    return tools


def dialogue_files(path: str | Path) -> tuple[list[Path], Path]:
    """The dialogue files of ``path`` (a directory of ``dialogues_*.json`` or one such
    file) and the ``schema.json`` beside them."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("dialogues_*.json"))
        if not files:
            raise GptkitError(f"{path} holds no dialogues_*.json files; point at SGD's folder")
        return files, path / "schema.json"
    if not path.is_file():
        raise GptkitError(f"{path} does not exist; check the path")
    return [path], path.parent / "schema.json"


def read_dialogues(path: str | Path, results: int = RESULTS) -> Iterator[Dialogue]:
    """Every dialogue of ``path`` (see :func:`dialogue_files`), in file order."""
    files, schema_path = dialogue_files(path)
    schema = read_schema(schema_path)
    for file in files:
        try:
            dialogues = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise GptkitError(f"{file}: malformed JSON ({e.msg})") from None
        for k, d in enumerate(dialogues):
            where = f"{file}[{k}]"
            try:
                yield _dialogue(d, schema, results)
            except (KeyError, TypeError) as e:
                raise GptkitError(f"{where}: not an SGD dialogue (missing {e})") from None


def _dialogue(d: dict[str, Any], schema: dict[str, Any], results: int) -> Dialogue:
    missing = [s for s in d["services"] if s not in schema]
    if missing:
        raise GptkitError(f"dialogue {d['dialogue_id']}: services {missing} not in schema.json")
    tools = [t for s in d["services"] for t in service_tools(schema[s])]
    messages: list[dict[str, Any]] = []
    for turn in d["turns"]:
        text = turn["utterance"]
        if turn["speaker"] == "USER":
            messages.append({"role": "user", "content": text})
            continue
        for frame in turn["frames"]:
            call = frame.get("service_call")
            if call is None:
                continue
            call_id = f"call_{len(messages)}"
            args = json.dumps(call["parameters"], ensure_ascii=False)
            fn = {"name": call["method"], "arguments": args}
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": call_id, "type": "function", "function": fn}],
                }
            )
            shown = json.dumps(frame.get("service_results", [])[:results], ensure_ascii=False)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": shown})
        messages.append({"role": "assistant", "content": text})
    return Dialogue(d["dialogue_id"], tools, messages)


def window_start(messages: list[dict[str, Any]], end: int, window: int) -> int:
    """Where the history of message ``end`` starts: at most ``window`` messages back, moved
    forward to a user turn (a piece never opens with a tool result or a reply)."""
    start = max(0, end - window)
    while start < end and messages[start]["role"] != "user":
        start += 1
    return start


def sft_rows(dialogue: Dialogue, window: int = WINDOW) -> list[dict[str, list[Message]]]:
    """The dialogue as training rows: consecutive pieces of at most ``window`` messages,
    each opening at a user turn, after the system message with the tools; each in the
    chat template's tool format, so that a template without tools renders it too."""
    rows, msgs, start = [], dialogue.messages, 0
    while start < len(msgs):
        end = min(start + window, len(msgs))
        while end < len(msgs) and msgs[end]["role"] != "user" and end > start + 1:
            end -= 1  # end before a user turn, so that the next piece opens with one
        piece = [{"role": "system", "content": SYSTEM}, *msgs[start:end]]
        if any(m["role"] == "assistant" for m in piece):
            rows.append({"messages": tool_messages(piece, dialogue.tools)})
        start = end
    return rows


def sgd_data(
    data: str | Path,
    out: str | Path,
    exclude: list[str] | None = None,
    limit: int | None = None,
    window: int = WINDOW,
) -> int:
    """Write SGD dialogues as chat SFT rows (JSON Lines) and return how many were written.

    Args:
        data: SGD's folder (``dialogues_*.json`` and ``schema.json``) or one dialogue file.
        out: the JSONL file to write.
        exclude: dialogue file names to leave out (the ones held out for evaluation).
        limit: use at most this many dialogues.
        window: messages per piece (see :func:`sft_rows`).
    """
    files, _ = dialogue_files(data)
    skip = set(exclude or [])
    unknown = skip - {f.name for f in files}
    if unknown:
        raise GptkitError(f"--exclude names {sorted(unknown)}, which are not in {data}")
    n, used = 0, 0
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for file in files:
            if file.name in skip:
                continue
            for d in read_dialogues(file):
                if limit is not None and used >= limit:
                    return n
                used += 1
                for row in sft_rows(d, window):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    n += 1
    return n


def sgd_data_cmd(
    data: str,
    out: str,
    exclude: list[str] | None = None,
    limit: int | None = None,
    window: int = WINDOW,
) -> None:
    """Write Schema-Guided Dialogue conversations as chat SFT rows with tool calls.

    Args:
        data: SGD's folder (dialogues_*.json and schema.json) or one dialogue file.
        out: the JSONL file to write (rows of {"messages": [...]}, for gptkit finetune sft).
        exclude: dialogue file names to leave out, such as dialogues_010.json (the file
            that gptkit eval --task sgd scores by default).
        limit: use at most this many dialogues.
        window: messages per training piece (after the system message with the tools).
    """
    n = sgd_data(data, out, exclude, limit, window)
    print(f"wrote {n} rows to {out}")
