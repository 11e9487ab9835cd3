"""The service-desk data and task: SGD dialogues as tool-calling chats (gptkit.data.dialogue),
the ``sgd`` scores on hand-computed cases (gptkit.eval.tools), and the rows and prompts on
the shipped folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_path

from gptkit.data.dialogue import read_dialogues, service_tools, sft_rows, sgd_data
from gptkit.data.tasks import encode_example
from gptkit.errors import GptkitError
from gptkit.eval.metrics import GENERATION_METRICS
from gptkit.eval.tools import read_sgd, tool_call_scores
from gptkit.tokenizer.chat import parse_tool_calls, tool_call_text

CALL = {"name": "ReserveRestaurant", "arguments": {"city": "San Jose", "seats": "2"}}


def call(name: str, **args: str) -> str:
    return tool_call_text(name, args)


def ref(call: dict | None = None, text: str = "") -> dict:
    return {"call": call, "text": text}


# -- the scores, by hand -------------------------------------------------------------------


def test_exact_match_and_argument_f1_by_hand() -> None:
    preds = [
        call("ReserveRestaurant", city="san jose ", seats="2"),  # exact (case, spaces)
        call("ReserveRestaurant", city="San Jose", seats="3", time="11:30"),  # 1 of 3 right
        call("FindRestaurants", city="San Jose", seats="2"),  # wrong method: no pair counts
        "Which city?",  # no call: recall loses the reference's pairs
    ]
    s = tool_call_scores(preds, [ref(CALL)] * 4)
    assert s["call_exact_match"] == 0.25
    assert s["call_name_accuracy"] == 0.5
    # pairs: predicted 2 + 3 + 2 + 0 = 7, reference 4 x 2 = 8, true 2 + 1 = 3
    assert s["argument_precision"] == pytest.approx(3 / 7)
    assert s["argument_recall"] == pytest.approx(3 / 8)
    assert s["argument_f1"] == pytest.approx(2 * (3 / 7) * (3 / 8) / (3 / 7 + 3 / 8))
    assert s["calls_due"] == 4 and s["replies_due"] == 0 and "bleu" not in s


def test_false_calls_and_reply_scores_by_hand() -> None:
    preds = ["Your table is booked.", call("ReserveRestaurant", city="X"), "Booked it."]
    refs = [ref(text="Your table is booked."), ref(text="Anything else?"), ref(text="Done.")]
    s = GENERATION_METRICS["sgd"](preds, refs)
    assert s["false_call_rate"] == pytest.approx(1 / 3)
    assert s["call_exact_match"] == 0.0 and s["calls_due"] == 0
    # ROUGE-L F per reply: 1 (identical), 0 (a call has no text), 0 (no common word)
    assert s["rougeL"] == pytest.approx(1 / 3)
    assert 0 < s["bleu"] < 100


def test_scores_by_name_and_lengths() -> None:
    s = GENERATION_METRICS["sgd"]([call("A", x="1")], [ref({"name": "A", "arguments": {"x": 1}})])
    assert s["call_exact_match"] == 1.0 and s["argument_f1"] == 1.0  # 1 and "1" agree
    with pytest.raises(GptkitError, match="one each"):
        tool_call_scores(["a"], [])


def test_parse_tool_calls_text_and_broken_blocks() -> None:
    text = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
    assert parse_tool_calls(text) == ("Sure.", [{"name": "f", "arguments": {"a": 1}}])
    assert parse_tool_calls("<tool_call>\n{not json}\n</tool_call>") == ("", [])
    # an unclosed last block counts: generation may stop before the closing tag
    assert parse_tool_calls('<tool_call>{"name": "g", "arguments": {}}')[1][0]["name"] == "g"
    assert parse_tool_calls("plain reply") == ("plain reply", [])


# -- the data ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sgd() -> Path:
    path = shared_path("customer_support")
    if not (path / "schema.json").is_file():
        pytest.skip("SGD (shared/data/customer_support) is not on this machine")
    return path


def test_dialogue_to_tool_calls(sgd: Path) -> None:
    d = next(read_dialogues(sgd / "dialogues_001.json"))
    assert d.id == "1_00000" and {t["function"]["name"] for t in d.tools} >= {"ReserveRestaurant"}
    calls = [m for m in d.messages if m.get("tool_calls")]
    fn = calls[0]["tool_calls"][0]["function"]
    assert fn["name"] == "ReserveRestaurant"
    assert json.loads(fn["arguments"]) == {
        "date": "2019-03-01",
        "location": "San Jose",
        "number_of_seats": "2",
        "restaurant_name": "Sino",
        "time": "11:30",
    }
    k = d.messages.index(calls[0])
    result = d.messages[k + 1]
    assert result["role"] == "tool" and result["tool_call_id"] == calls[0]["tool_calls"][0]["id"]
    assert json.loads(result["content"])[0]["restaurant_name"] == "Sino"
    reply = "Your reservation has been made. Their phone number is 408-247-8880."
    assert d.messages[k + 2] == {"role": "assistant", "content": reply}


def test_tools_follow_the_schema(sgd: Path) -> None:
    schema = json.loads((sgd / "schema.json").read_text())
    restaurants = next(s for s in schema if s["service_name"] == "Restaurants_2")
    tools = {t["function"]["name"]: t["function"] for t in service_tools(restaurants)}
    params = tools["ReserveRestaurant"]["parameters"]
    assert params["required"] == ["restaurant_name", "location", "time"]
    assert params["properties"]["number_of_seats"]["enum"] == ["1", "2", "3", "4", "5", "6"]
    assert params["properties"]["location"] == {"type": "string"}


def test_rows_train_on_calls_and_replies(sgd: Path, chatml_tokenizer) -> None:
    d = next(read_dialogues(sgd / "dialogues_001.json"))
    rows = sft_rows(d)
    assert all(r["messages"][0]["role"] == "system" for r in rows)
    assert all(r["messages"][1]["role"] == "user" for r in rows)
    text = "".join(m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant")
    assert '<tool_call>\n{"name": "ReserveRestaurant"' in text
    row = next(r for r in rows if any("<tool_call>" in m["content"] for m in r["messages"][1:]))
    ex = encode_example(chatml_tokenizer, row)
    learned = chatml_tokenizer.decode([t for t in ex.labels if t >= 0])
    assert "<tool_call>" in learned and "<tool_response>" not in learned  # results: no loss
    assert "<tools>" not in learned


def test_sgd_data_excludes_and_limits(sgd: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    n = sgd_data(sgd, out, exclude=["dialogues_010.json"], limit=3)
    assert n == len(out.read_text().splitlines()) > 3
    with pytest.raises(GptkitError, match="not in"):
        sgd_data(sgd, out, exclude=["dialogues_999.json"])


def test_eval_examples_at_every_assistant_turn(sgd: Path) -> None:
    ex = read_sgd(sgd / "dialogues_001.json", limit=12)
    assert len(ex) == 12
    due = [e for e in ex if e["reference"]["call"] is not None]
    assert due and due[0]["reference"]["call"]["name"] == "ReserveRestaurant"
    after = ex[ex.index(due[0]) + 1]  # the reply after the call sees its result
    assert "<tool_response>" in after["messages"][-1]["content"]
    assert all(e["messages"][-1]["role"] == "user" for e in ex)
    assert "<tools>" in ex[0]["messages"][0]["content"]


def test_service_desk_fake_backend(sgd: Path) -> None:
    import importlib.util

    from conftest import REPO

    from gptkit.data.dialogue import read_schema

    spec = importlib.util.spec_from_file_location("desk", REPO / "recipes" / "service_desk.py")
    desk_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(desk_module)
    desk = desk_module.FakeServices(read_schema(sgd / "schema.json"), ["Restaurants_2"])
    assert {t["function"]["name"] for t in desk.tools} == {"ReserveRestaurant", "FindRestaurants"}
    (record,) = desk.call("ReserveRestaurant", {"restaurant_name": "Sino", "location": "San Jose"})
    assert record["restaurant_name"] == "Sino" and record["location"] == "San Jose"
    assert record["has_seating_outdoors"] == "True"  # a categorical slot: its first value
    assert desk.call("Nope", {}) == [{"error": "no such method Nope"}]
