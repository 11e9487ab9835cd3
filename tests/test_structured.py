"""Structured output: JSON Schema, regular expressions and choices, as a grammar mask in the one
sampler, through Python, the CLI and the server (the official ``openai`` client)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import REPO, running_server, tiny_model

from gptkit.checkpoint import save_checkpoint
from gptkit.cli import main
from gptkit.errors import GptkitError
from gptkit.generate import generate, stream
from gptkit.model import GPT
from gptkit.tokenizer import BPETokenizer, CharTokenizer

jsonschema = pytest.importorskip("jsonschema")

SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

#: short and bounded: every sample completes well inside max_new_tokens
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
PHONE = r"[0-9]{3}-[0-9]{4}"
IMPOSSIBLE = {"type": "integer", "minimum": 5, "maximum": 1}


@pytest.fixture(scope="module")
def model(chatml_tokenizer: BPETokenizer) -> GPT:
    return tiny_model(chatml_tokenizer.vocab_size, block_size=256)


def valid_json(text: str, schema: dict[str, Any]) -> Any:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# -- Python --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_schema_regex_and_choices_hold_on_a_random_model(
    model: GPT, chatml_tokenizer: BPETokenizer, temperature: float
) -> None:
    tok, prompts = chatml_tokenizer, ["def add", "class", "x"]
    kw = dict(max_new_tokens=120, temperature=temperature, seed=3)
    for text in generate(model, tok, prompts, json_schema=PERSON, **kw):
        valid_json(text, PERSON)
    for text in generate(model, tok, prompts, regex=PHONE, **kw):
        assert re.fullmatch(PHONE, text), text
    choices = ["red", "green", "blue sky"]
    for text in generate(model, tok, prompts, choices=choices, **kw):
        assert text in choices


def test_stream_equals_generate_and_json_object(model: GPT, chatml_tokenizer: BPETokenizer) -> None:
    kw: dict[str, Any] = dict(max_new_tokens=40, temperature=1.0, seed=5, regex=PHONE)
    assert "".join(stream(model, chatml_tokenizer, "hi", **kw)) == generate(
        model, chatml_tokenizer, "hi", **kw
    )
    obj = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    text = generate(
        model, chatml_tokenizer, "hi", max_new_tokens=40, temperature=0, json_schema=obj
    )
    assert isinstance(valid_json(text, obj)["ok"], bool)


def test_a_character_tokenizer_is_bridged_too(char_tokenizer: CharTokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size, block_size=64)
    pattern = "(ab|ba){1,3}c"
    out = generate(model, char_tokenizer, ["a", "b"], regex=pattern, max_new_tokens=30, seed=1)
    assert all(re.fullmatch(pattern, t) for t in out), out


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(regex="[0-9"), "regex"),
        (dict(json_schema=IMPOSSIBLE), "json_schema"),
        (dict(json_schema={"type": "no-such-type"}), "json_schema"),
        (dict(choices=[]), "choices"),
        (dict(regex="a", choices=["a"]), "regex and choices"),
    ],
)
def test_bad_grammars_are_clear_errors(
    model: GPT, chatml_tokenizer: BPETokenizer, kw: dict[str, Any], field: str
) -> None:
    with pytest.raises(GptkitError, match=field):
        generate(model, chatml_tokenizer, "hi", max_new_tokens=4, **kw)


@pytest.mark.slow
def test_fifty_sampled_smollm2_generations_validate() -> None:
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} is absent (`make models` downloads it)")
    from gptkit.checkpoint import load

    net, tok = load(str(SMOLLM2))
    assert tok is not None
    prompt = "Describe one user of our website as JSON with name, age, role and active.\n"
    outs = generate(net, tok, [prompt] * 50, max_new_tokens=48, temperature=1.0, json_schema=PERSON)
    values = [valid_json(text, PERSON) for text in outs]
    assert len({json.dumps(v) for v in values}) > 1  # sampled, not one answer 50 times


# -- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(
    tmp_path_factory: pytest.TempPathFactory, model: GPT, chatml_tokenizer: BPETokenizer
) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(path, model, chatml_tokenizer)
    return path


def test_cli_regex_choice_and_schema(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["generate", "--model", str(checkpoint), "--max-new-tokens", "120", "--seed", "2"]
    assert main([*base, "--regex", PHONE, "P: "]) == 0
    assert re.fullmatch(PHONE, capsys.readouterr().out.strip().removeprefix("P: "))
    assert main([*base, "--choice", "yes", "--choice", "no", "Q: "]) == 0
    assert capsys.readouterr().out.strip().removeprefix("Q: ") in ("yes", "no")
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    assert main([*base, "--json-schema", str(schema), "--no-stream", "J: "]) == 0
    valid_json(capsys.readouterr().out.strip().removeprefix("J: "), PERSON)


def test_cli_bad_grammar_is_an_error(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["generate", "--model", str(checkpoint), "hi"]
    assert main([*base, "--regex", "(unclosed"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: regex"), err
    impossible = tmp_path / "impossible.json"
    impossible.write_text(json.dumps(IMPOSSIBLE))
    assert main([*base, "--json-schema", str(impossible)]) == 2
    assert capsys.readouterr().err.startswith("error: json_schema")
    assert main([*base, "--json-schema", str(tmp_path / "missing.json")]) == 2
    assert "--json-schema" in capsys.readouterr().err


# -- the server ------------------------------------------------------------------------------

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(model: GPT, chatml_tokenizer: BPETokenizer) -> Iterator[SimpleNamespace]:
    with running_server(model, chatml_tokenizer) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: SimpleNamespace) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


HELLO = [{"role": "user", "content": "hello"}]


def test_response_format_json_schema(client: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    reply = client.chat.completions.create(
        model="tiny", messages=HELLO, response_format=fmt, n=3, seed=1, max_tokens=120
    )
    for choice in reply.choices:
        valid_json(choice.message.content, PERSON)
        assert choice.finish_reason == "stop"
    pieces = client.chat.completions.create(
        model="tiny", messages=HELLO, response_format=fmt, seed=1, max_tokens=120, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == reply.choices[0].message.content


def test_response_format_json_object_and_completions(client: Any) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        response_format={"type": "json_object"},
        max_tokens=100,
        temperature=0,
    )
    content = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length" or isinstance(json.loads(content), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    done = client.completions.create(
        model="tiny", prompt="x", max_tokens=120, extra_body={"response_format": fmt}
    )
    valid_json(done.choices[0].text, PERSON)


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema", "json_schema": {"name": "n", "schema": IMPOSSIBLE}},
        {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "nope"}}},
        {"type": "json_schema"},
        {"type": "xml"},
    ],
)
def test_bad_response_format_is_a_400(client: Any, fmt: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=HELLO, response_format=fmt)
    assert "response_format" in str(info.value)
