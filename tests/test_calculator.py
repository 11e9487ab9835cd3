"""The GSM8K calculator and the decoder's forced tokens it rides on: the arithmetic, when it
fires, and that forced tokens continue a row exactly as if they had been in its prompt."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_ids, shared_path, tiny_model

from gptkit.config import SampleConfig
from gptkit.errors import GptkitError
from gptkit.eval.calculator import calculator, evaluate_arithmetic, format_number
from gptkit.eval.tasks import to_sft_rows
from gptkit.generate import generate, generate_ids
from gptkit.tokenizer import CharTokenizer


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("48/2", 24),
        ("16-3-4", 9),
        ("9*2", 18),
        ("200*40*.01", 80),
        ("(3+4)*2", 14),
        ("-5+2", -3),
        ("$5*3", 15),
        ("1,200+300", 1500),
        ("20%*50", 10),
        ("2**10", 1024),
        ("7//2", 3),
        ("7%3", 1),
        ("12/60", 0.2),
    ],
)
def test_arithmetic(expression, value):
    assert evaluate_arithmetic(expression) == pytest.approx(value)


@pytest.mark.parametrize(
    "expression",
    ["", "a+1", "__import__('os')", "open('f')", "1/0", "2**1000", "9**9**9", "[1]*3", "1e400"],
)
def test_not_arithmetic_is_left_to_the_model(expression):
    assert evaluate_arithmetic(expression) is None


def test_number_format():
    assert [format_number(v) for v in (24.0, 0.2, -3.5, 1 / 3, 1e6)] == [
        "24",
        "0.2",
        "-3.5",
        "0.333333",
        "1000000",
    ]


def test_calculator_fires_only_at_an_open_annotations_equals_sign():
    assert calculator("Natalia sold 48/2 = <<48/2=") == "24>>"
    assert calculator("so <<48/2=24>>24 and then <<24+48=") == "72>>"
    assert calculator("x = 5 so 2 = ") is None  # no annotation
    assert calculator("<<48/2=24>>24 =") is None  # the annotation is closed
    assert calculator("<<48/2") is None  # not at the "=" yet
    assert calculator("<<apples=") is None  # not arithmetic: the model writes on


def test_forced_tokens_continue_as_if_they_were_in_the_prompt():
    model = tiny_model()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    cfg = SampleConfig(temperature=0.0, max_new_tokens=12)
    first = run_ids(model, [prompt], SampleConfig(temperature=0.0, max_new_tokens=1))[0]
    forced = [7, 7, 8]
    out: list[int] = []
    decoder = generate_ids(model, [prompt], cfg)
    for events in decoder:
        for ev in events:
            if len(out) == 0:
                decoder.force(ev.row, forced)
            out.append(ev.token)
    assert out[:4] == first + forced
    assert len(out) == 12  # forced tokens count toward max_new_tokens
    rest = run_ids(model, [prompt + out[:4]], SampleConfig(temperature=0.0, max_new_tokens=8))
    assert out[4:] == rest[0]


def test_forced_tokens_leave_the_other_rows_alone():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    alone = run_ids(model, prompts[1:])
    decoder = generate_ids(model, prompts, SampleConfig(temperature=0.0, max_new_tokens=24))
    out: list[list[int]] = [[], []]
    for events in decoder:
        for ev in events:
            if ev.row == 0 and len(out[0]) == 2:
                decoder.force(0, [9, 9, 9, 9])
            out[ev.row].append(ev.token)
    assert out[0][3:7] == [9, 9, 9, 9]
    assert out[1] == alone[0]


def test_forcing_an_id_outside_the_vocabulary_is_an_error():
    decoder = generate_ids(tiny_model(), [[1, 2]], SampleConfig(max_new_tokens=4))
    with pytest.raises(GptkitError, match="outside the model's vocabulary"):
        decoder.force(0, [10_000])


def test_generate_with_a_tool_writes_its_text():
    tok = CharTokenizer.train("abcdefghij<>=0123456789+*/ ")
    torch.manual_seed(0)
    model = tiny_model(vocab_size=tok.vocab_size)

    def tool(text: str) -> str | None:  # after the 3rd character, write "<<6*7=" itself
        return "<<6*7=" if len(text) == 3 else calculator(text)

    text = generate(model, tok, "abc", max_new_tokens=20, temperature=0.0, tool=tool)
    assert text[3:13] == "<<6*7=42>>"
    assert len(text) == 20


def test_sft_rows_keep_the_annotations_only_for_the_calculator():
    path = shared_path("gsm8k", "train.jsonl")
    plain = to_sft_rows("gsm8k", path, limit=3)
    calc = to_sft_rows("gsm8k", path, limit=3, calculator=True)
    first = json.loads(path.read_text().splitlines()[0])["answer"]
    assert calc[0]["messages"][-1]["content"] == first
    assert "<<" not in plain[0]["messages"][-1]["content"]
    with pytest.raises(GptkitError, match="GSM8K"):
        to_sft_rows("multi30k", None, limit=1, calculator=True)
