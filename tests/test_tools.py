"""Tool calling through the OpenAI API, driven by the official ``openai`` client against a
real server: tools rendered by the chat template, calls whose arguments the grammar holds to
the tool's JSON Schema (non-streaming and streamed), tool results sent back, every refusal a
400 naming the field; and on SmolLM2 a call, its result and the follow-up answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import REPO, running_server, tiny_model

from gptkit.model import GPT
from gptkit.tokenizer import BPETokenizer
from gptkit.tokenizer.chat import apply_chat_template, render_chat

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


@pytest.fixture(scope="module")
def server(chatml_tokenizer: BPETokenizer) -> Iterator[SimpleNamespace]:
    model: GPT = tiny_model(chatml_tokenizer.vocab_size, block_size=1024)
    with running_server(model, chatml_tokenizer) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: SimpleNamespace) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)


def check_call(call: Any, tool: dict) -> dict:
    assert call.type == "function" and call.id.startswith("call")
    assert call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_required_call_follows_the_schema(client: Any, chatml_tokenizer: BPETokenizer) -> None:
    out = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0], WEATHER)
    # the tools went through the chat template: the prompt is the template's rendering
    prompt = apply_chat_template(chatml_tokenizer, ASK, tools=[WEATHER])
    assert "<tools>" in prompt and '"get_weather"' in prompt
    assert out.usage.prompt_tokens == len(chatml_tokenizer.encode_prompt(prompt))
    assert out.usage.completion_tokens > 0


def test_named_function_and_sampled_calls(client: Any) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        out = client.chat.completions.create(
            model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice=named, seed=seed
        )
        assert out.choices[0].finish_reason == "tool_calls"
        check_call(out.choices[0].message.tool_calls[0], TIME)


def test_streamed_call_equals_the_whole_one(client: Any) -> None:
    kw: dict[str, Any] = dict(
        model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0
    )
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    name, args, ids, reasons = "", "", set(), []
    for c in chunks[:-1]:
        for d in c.choices[0].delta.tool_calls or []:
            assert d.index == 0
            ids |= {d.id} if d.id else set()
            name += d.function.name or ""
            args += d.function.arguments or ""
        reasons.append(c.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls" and not any(reasons[:-1])
    assert len(ids) == 1 and name == whole.function.name
    assert json.loads(args) == json.loads(whole.function.arguments)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_auto_answers_in_text_or_a_valid_call(client: Any) -> None:
    for seed in range(4):
        out = client.chat.completions.create(
            model="tiny", messages=ASK, tools=[WEATHER], seed=seed, max_tokens=40
        )
        choice = out.choices[0]
        if choice.finish_reason == "tool_calls":
            check_call(choice.message.tool_calls[0], WEATHER)
        else:
            assert choice.message.tool_calls is None and "<tool_call>" not in (
                choice.message.content or ""
            )


def test_tool_result_goes_back_through_the_template(
    client: Any, chatml_tokenizer: BPETokenizer
) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'},
    }
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sunny"}'},
    ]
    out = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=5
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    assert isinstance(out.choices[0].message.content, str)
    # tool_choice "none": no tools in the prompt; the call and its result are in it
    prompt = apply_chat_template(chatml_tokenizer, messages)
    assert "<tools>" not in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}' in (
        prompt
    )
    assert "<tool_response>\n" + '{"forecast": "sunny"}' in prompt
    assert out.usage.prompt_tokens == len(chatml_tokenizer.encode_prompt(prompt))


def test_native_template_gets_tools_and_dict_arguments() -> None:
    template = (
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.arguments.city }}{% endfor %}|"
        "{% endfor %}"
    )
    call = {
        "id": "1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
    }
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}]
    text = render_chat(messages, template, tools=[WEATHER])
    assert text.startswith("[get_weather]user:") and "assistant:CALL Rome|" in text


BAD = [
    (dict(tool_choice="required"), "tool_choice needs 'tools'"),
    (
        dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
        "not among the tools",
    ),
    (dict(tools=[WEATHER, WEATHER]), "repeat"),
    (dict(tools=[WEATHER], n=2), "n > 1"),
    (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
    (
        dict(
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]
        ),
        "type 'object'",
    ),
    (
        dict(
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"x": {"type": "strnig"}}},
                    },
                }
            ]
        ),
        "tools[0].function.parameters",
    ),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "name"),
]


@pytest.mark.parametrize(("fields", "says"), BAD)
def test_bad_tool_requests_are_400(client: Any, fields: dict, says: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, **fields)
    assert says in str(e.value)


def test_bad_tool_messages_are_400(client: Any) -> None:
    answer = {"role": "tool", "tool_call_id": "call_9", "content": "{}"}
    with pytest.raises(openai.BadRequestError, match="no earlier"):
        client.chat.completions.create(model="tiny", messages=[*ASK, answer])
    broken = {
        "role": "assistant",
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}
        ],
    }
    with pytest.raises(openai.BadRequestError, match="JSON object"):
        client.chat.completions.create(model="tiny", messages=[*ASK, broken])


# -- SmolLM2: a call, its result, the answer ------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Iterator[Any]:
    if not Path(SMOLLM2).is_file():
        pytest.skip(f"{SMOLLM2} is not here (make models)")
    import gptkit

    model, tok = gptkit.load(SMOLLM2)
    with running_server(model, tok, name="smollm2", engine_kwargs={}) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=300)


def test_smollm2_calls_a_tool_and_answers_from_its_result(smollm2: Any) -> None:
    # SmolLM2-135M knows no tool format: left to "auto" it answers in prose, so the call
    # is asked for ("required") and the grammar holds its arguments to the schema
    first = smollm2.chat.completions.create(
        model="smollm2",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=60,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    call = choice.message.tool_calls[0]
    args = check_call(call, WEATHER)
    assert args["city"] == "Paris"
    messages = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny, 24 C"}'},
    ]
    second = smollm2.chat.completions.create(
        model="smollm2", messages=messages, tools=[WEATHER], temperature=0, max_tokens=60
    )
    answer = second.choices[0]
    assert answer.finish_reason == "stop" and answer.message.tool_calls is None
    assert "sunny" in answer.message.content.lower()
