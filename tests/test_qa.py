"""Closed-book QA (NQ-Open): SQuAD-normalised exact match, token F1, the reader, the eval task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_path, tiny_model

from gptkit.errors import GptkitError
from gptkit.eval.metrics import exact_match, normalize_answer, token_f1
from gptkit.eval.qa import SHOTS, nq_prompt, read_nq_open


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The Beatles", "beatles"),
        ("  Jane   Austen. ", "jane austen"),
        ("A Tale of Two Cities", "tale of two cities"),
        ("an apple, the pear and a plum", "apple pear and plum"),
        ("Theatre Royal", "theatre royal"),  # "the" inside a word stays
        ("well-known", "wellknown"),  # SQuAD drops punctuation without a space
        ("1,000", "1000"),
        ("ＪＵＰＩＴＥＲ", "jupiter"),  # full-width letters: NFKC first
        ("the", ""),
    ],
)
def test_squad_normalisation(text: str, normal: str) -> None:
    assert normalize_answer(text) == normal


def test_exact_match_takes_any_gold_answer() -> None:
    golds = [["Bobby Scott", "Bob Russell"], ["1813"], ["the Pacific Ocean"]]
    preds = ["bob russell", "In 1813", "Pacific ocean."]
    assert exact_match(preds, golds) == pytest.approx(2 / 3)  # "in 1813" is not "1813"
    assert exact_match([], []) == 0.0
    with pytest.raises(GptkitError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], [["a"]])


def test_token_f1_by_hand() -> None:
    # pred tokens: eiffel tower in paris (4); gold: eiffel tower (2); common 2
    # P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert token_f1(["the Eiffel Tower in Paris"], [["Eiffel Tower"]]) == pytest.approx(2 / 3)
    # the best gold counts: "paris" alone gives P = 1/4, R = 1 -> 0.4 < 2/3
    assert token_f1(["the Eiffel Tower in Paris"], [["Paris", "Eiffel Tower"]]) == pytest.approx(
        2 / 3
    )
    # repeated words count once per occurrence: common("x x y", "x y y") = {x, y}, P = R = 2/3
    assert token_f1(["x x y"], [["x y y"]]) == pytest.approx(2 / 3)
    assert token_f1(["London"], [["Paris"]]) == 0.0
    assert token_f1(["the"], [["a"]]) == 0.0  # both empty after normalising: SQuAD v1.1's 0
    # averaged over examples
    assert token_f1(["Paris", "nope"], [["Paris"], ["yes"]]) == pytest.approx(0.5)


def _nq_file(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "nq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reader_and_few_shot_prompt(tmp_path: Path) -> None:
    rows = [
        {"question": "who sang hey jude", "answer": ["The Beatles"]},
        {"question": "when was the eiffel tower built", "answer": ["1887", "1889"]},
    ]
    examples = read_nq_open(_nq_file(tmp_path, rows))
    assert [ex["reference"] for ex in examples] == [["The Beatles"], ["1887", "1889"]]
    prompt = examples[0]["prompt"]
    assert prompt.endswith("Question: who sang hey jude?\nAnswer:")
    assert prompt.count("Question:") == len(SHOTS) + 1
    messages = examples[0]["messages"]
    assert len(messages) == 2 * len(SHOTS) + 1
    assert [m["role"] for m in messages[:2]] == ["user", "assistant"]
    assert messages[1]["content"] == SHOTS[0][1] and messages[-1]["content"] == "who sang hey jude?"
    assert len(read_nq_open(_nq_file(tmp_path, rows), limit=1)) == 1
    bad = _nq_file(tmp_path, [{"question": "q", "answer": "not a list"}])
    with pytest.raises(GptkitError, match=r"nq\.jsonl:1: field 'answer'"):
        read_nq_open(bad)


def test_shots_are_not_evaluation_questions() -> None:
    questions = set()
    for name in ("NQ-open.dev.jsonl", "NQ-open.efficientqa.dev.1.1.jsonl"):
        for line in shared_path("nq_open", name).read_text().splitlines():
            questions.add(json.loads(line)["question"])
    assert len(questions) > 5000
    assert not {q for q, _ in SHOTS} & questions


def test_eval_task_and_sft_rows(tmp_path: Path, chatml_tokenizer) -> None:
    from gptkit.checkpoint import save_checkpoint
    from gptkit.eval.run import evaluate_model
    from gptkit.eval.tasks import to_sft_rows

    rows = [{"question": f"question number {i}", "answer": [f"answer {i}", "x"]} for i in range(4)]
    data = _nq_file(tmp_path, rows)
    sft = to_sft_rows("nq_open", data, skip=2)
    assert len(sft) == 2
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "answer 2"}
    assert sft[0]["messages"][:-1] == nq_prompt("question number 2")[1]

    model = tiny_model(chatml_tokenizer.vocab_size, block_size=512)
    save_checkpoint(tmp_path / "ckpt", model, chatml_tokenizer)
    result = evaluate_model(
        str(tmp_path / "ckpt"), "nq_open", data=str(data), limit=3, max_new_tokens=3,
        progress=False,
    )  # fmt: skip
    assert result["n"] == 3 and set(result["metrics"]) == {"exact_match", "f1"}
    assert result["settings"]["chat"] is True
