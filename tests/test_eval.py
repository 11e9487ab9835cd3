"""Evaluation: metrics agree with sacrebleu, rouge-score and scikit-learn; perplexity equals a
direct computation; generation tasks run end to end on tiny models; readers parse the real
files and name file:line for a bad row."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXT, shared_path, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.checkpoint import save_checkpoint
from gptkit.errors import GptkitError
from gptkit.eval import (
    accuracy,
    bleu,
    chrf,
    classification_scores,
    confusion_matrix,
    evaluate_model,
    exact_match,
    generation_eval,
    gsm8k_accuracy,
    gsm8k_extract,
    macro_f1,
    perplexity,
    read_gsm8k,
    read_multi30k,
    read_scitldr,
    read_self_instruct,
    read_tatoeba,
    rouge,
    sliding_windows,
)
from gptkit.eval.metrics import gsm8k_reference_answer

# -- metrics against the reference implementations ----------------------------------------


@pytest.mark.parametrize(
    "refs, preds",
    [
        # label 3 is never predicted; label 1 is predicted once, wrongly
        ([0, 1, 2, 2, 1, 0, 2, 3, 3, 0], [0, 2, 2, 2, 1, 0, 1, 0, 2, 0]),
        # string labels, one ("maybe") only ever predicted
        (["pos", "neg", "neg", "pos", "neg"], ["pos", "maybe", "neg", "neg", "neg"]),
    ],
)
def test_classification_metrics_match_sklearn(refs: list, preds: list) -> None:
    sk = pytest.importorskip("sklearn.metrics")
    labels = sorted(set(refs) | set(preds))
    assert accuracy(preds, refs) == pytest.approx(sk.accuracy_score(refs, preds))
    want_f1 = sk.f1_score(refs, preds, average="macro", labels=labels, zero_division=0)
    assert macro_f1(preds, refs) == pytest.approx(want_f1)
    names, matrix = confusion_matrix(preds, refs)
    assert names == labels
    assert matrix == sk.confusion_matrix(refs, preds, labels=labels).tolist()
    scores = classification_scores(preds, refs)
    assert scores["macro_f1"] == pytest.approx(want_f1)
    assert scores["confusion_matrix"] == matrix
    json.dumps(scores)  # goes into reports as is


def test_classification_metrics_refuse_mismatched_lengths() -> None:
    with pytest.raises(GptkitError, match="2 predictions for 3 references"):
        accuracy([1, 2], [1, 2, 3])


HYPS = [
    "The cat sat on the mat.",
    "A man is playing a guitar on stage",
    "two dogs run through the snowy field",
    "",
]
REFS = [
    ["The cat is sitting on the mat.", "A cat sat on the mat."],
    ["A man plays guitar on a stage."],
    ["Two dogs are running through a snowy field.", "Dogs running in snow.", "Two dogs."],
    ["An empty prediction scores nothing."],
]


def test_bleu_and_chrf_match_sacrebleu() -> None:
    import sacrebleu

    single = [r[0] for r in REFS]
    assert bleu(HYPS, single) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [single]).score)
    assert chrf(HYPS, single) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [single]).score)
    # several references per example, different numbers of them
    streams = [[r[k] if k < len(r) else None for r in REFS] for k in range(3)]
    assert bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score)
    assert chrf(HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, streams).score)
    assert bleu(HYPS, REFS) > bleu(HYPS, single)  # more references can only help here
    assert bleu(single, single) == pytest.approx(100.0)


def test_chinese_bleu_uses_the_zh_tokenizer() -> None:
    import sacrebleu

    hyps = ["我喜欢吃苹果。", "他明天去北京。", "今天天气很好"]
    refs = ["我很喜欢吃苹果。", "他明天要去北京。", "今天的天气非常好。"]
    want = sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score
    assert bleu(hyps, refs, tokenize="zh") == pytest.approx(want)
    # 13a sees each unspaced sentence as one word: no 4-gram matches at all
    assert bleu(hyps, refs) == pytest.approx(0.0)
    assert 0 < want < 100


def test_rouge_matches_rouge_score_with_stemming() -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = rouge(HYPS, REFS)
    for t in ("rouge1", "rouge2", "rougeL"):
        # per example the best of its references, then the mean over examples
        best = [
            max(scorer.score(r, h)[t].fmeasure for r in refs)
            for h, refs in zip(HYPS, REFS, strict=True)
        ]
        assert got[t] == pytest.approx(sum(best) / len(best))
    # stemming: "running"/"runs" share a stem
    assert rouge(["dogs running"], ["dog runs"])["rouge1"] == pytest.approx(1.0)
    assert set(rouge(HYPS, REFS, types=("rougeL",))) == {"rougeL"}


def test_exact_match_normalises() -> None:
    preds = ["The Eiffel Tower!", "  paris ", "a cat", "Berlin"]
    refs = ["eiffel tower", ["Lyon", "Paris."], "the  CAT", "Bonn"]
    assert exact_match(preds, refs) == pytest.approx(0.75)
    assert exact_match([], []) == 0.0


@pytest.mark.parametrize(
    "text, number",
    [
        ("He pays 16 - 3 - 4 = <<16-3-4=9>>9 dollars.\n#### 18", "18"),
        ("Total: #### 1,234", "1234"),
        ("The answer is $1,234.50.", "1234.5"),
        ("3 apples and 4.5 pears make 7.5 fruits.", "7.5"),
        ("The answer is 18.\n", "18"),
        ("#### 42\n\nQuestion: how many? 7", "42"),  # the answer line wins over later text
        ("#### \nso it is 9", "9"),  # a #### with no number: fall back to the last number
        ("It dropped to #### -5 degrees", "-5"),
        ("from 1999-2004 it grew 5", "5"),
        ("from 5-3", "3"),  # a hyphen after a word character is not a minus sign
        ("steps 1,2,3 then 10", "10"),  # a list, not the number 123
        ("between 1,000,000 and 2,500,000", "2500000"),
        ("It costs 20.00 dollars", "20"),
        ("She is 10% faster", "10"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_gsm8k_extraction(text: str, number: str | None) -> None:
    assert gsm8k_extract(text) == number


def test_gsm8k_accuracy_compares_final_numbers() -> None:
    refs = ["so 5 + 3 = 8\n#### 8", "half of 1,000 is\n#### 500", "x\n#### 1,250"]
    preds = ["The answer is 8.", "#### 500.00", "I get 1250.5"]
    assert gsm8k_reference_answer(refs[2]) == "1250"
    assert gsm8k_accuracy(preds, refs) == pytest.approx(2 / 3)
    with pytest.raises(GptkitError, match="no '#### <number>'"):
        gsm8k_accuracy(["1"], ["no final line"])


# -- perplexity ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 80), block=st.integers(1, 20), data=st.data())
def test_sliding_windows_score_every_target_once(n: int, block: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, block))
    scored = []
    for begin, end, first in sliding_windows(n, block, stride):
        assert 0 <= begin < first <= end + 1 and end - begin <= block
        assert first - 1 >= begin  # the first scored target has a prediction in the window
        scored += range(first, end + 1)
    assert scored == list(range(1, n))


def _nll_full(model: torch.nn.Module, ids: list[int]) -> float:
    """Summed NLL of ids[1:] given everything before, in one forward."""
    x = torch.tensor([ids])
    logits = model(x[:, :-1])[0]
    return F.cross_entropy(logits, x[0, 1:], reduction="sum").item()


def test_perplexity_in_one_window_equals_a_full_forward(char_tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    text = "def add(a, b):\n    return a + b"  # 30 characters: fits the 32-token context
    ids = [char_tokenizer.eos_id, *char_tokenizer.encode(text)]
    got = perplexity(model, char_tokenizer, [text], progress=False)
    nll = _nll_full(model, ids)
    assert got["tokens"] == len(text) and got["bytes"] == len(text.encode())
    assert got["windows"] == 1
    assert got["loss"] == pytest.approx(nll / len(text), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    bpb = got["loss"] * got["tokens"] / (got["bytes"] * math.log(2))
    assert got["bits_per_byte"] == pytest.approx(bpb)


def test_perplexity_sliding_window_matches_a_hand_loop(char_tokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model(char_tokenizer.vocab_size, pos_emb="rope")
    text = SAMPLE_TEXT[:90]
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    block, stride = 16, 5
    got = perplexity(model, char_tokenizer, path, block_size=block, stride=stride, batch_size=3)

    # By hand, one token at a time: target t (1-based after the start token) is predicted from
    # the window that first reaches it; windows end at block, block + stride, ..., the end.
    ids = [char_tokenizer.eos_id, *char_tokenizer.encode(text)]
    last = len(ids) - 1
    ends = [*range(block, last, stride), last]
    total = 0.0
    for t in range(1, len(ids)):
        end = next(e for e in ends if e >= t)
        begin = max(0, end - block)
        logits = model(torch.tensor([ids[begin:t]]))[0, -1]
        total -= torch.log_softmax(logits, -1)[ids[t]].item()
    assert got["tokens"] == len(text) == last
    assert got["windows"] == len(ends)
    assert got["loss"] == pytest.approx(total / last, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / len(text), rel=1e-5)


def test_perplexity_scores_each_text_alone(char_tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    texts = ["All:\nSpeak, speak.", "class Point:\n    x = y", "a"]
    got = perplexity(model, char_tokenizer, texts, batch_size=2, progress=False)
    eos = char_tokenizer.eos_id
    total = sum(_nll_full(model, [eos, *char_tokenizer.encode(t)]) for t in texts)
    assert got["tokens"] == sum(len(t) for t in texts)
    assert got["loss"] * got["tokens"] == pytest.approx(total, rel=1e-5)


def test_perplexity_refuses_bad_settings(char_tokenizer, tmp_path: Path) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    with pytest.raises(GptkitError, match="block_size must be between 1 and the model's"):
        perplexity(model, char_tokenizer, ["abc"], block_size=64)
    with pytest.raises(GptkitError, match="stride must be between"):
        perplexity(model, char_tokenizer, ["abc"], block_size=8, stride=9)
    with pytest.raises(GptkitError, match="does not exist"):
        perplexity(model, char_tokenizer, tmp_path / "missing.txt")
    with pytest.raises(GptkitError, match="no token to score"):
        perplexity(model, char_tokenizer, [""])


# -- generation tasks ----------------------------------------------------------------------


def test_generation_eval_on_a_tiny_model(char_tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    examples = [
        {"prompt": "def add(a, b):", "reference": "return a + b"},
        {"prompt": "All:\n", "reference": ["Speak, speak.", "Speak."]},
        {"prompt": "class Point:", "reference": "def __init__(self, x, y):"},
    ]
    metrics = ["bleu", "chrf", "rouge", "exact_match"]
    out = generation_eval(model, char_tokenizer, examples, metrics, max_new_tokens=12, batch_size=2)
    assert out["n"] == 3 and len(out["predictions"]) == 3
    for p, ex in zip(out["predictions"], examples, strict=True):
        assert p["prompt"] == ex["prompt"] and p["reference"] == ex["reference"]
        assert isinstance(p["prediction"], str) and len(p["prediction"]) <= 12
    scores = out["metrics"]
    assert set(scores) == {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"}
    assert 0 <= scores["bleu"] <= 100 and 0 <= scores["chrf"] <= 100
    assert all(0 <= scores[k] <= 1 for k in ("rouge1", "rouge2", "rougeL", "exact_match"))
    # greedy and batched == one by one; a custom metric function is accepted
    one = generation_eval(
        model,
        char_tokenizer,
        examples,
        {"length": lambda p, r: sum(map(len, p))},
        max_new_tokens=12,
        batch_size=1,
        progress=False,
    )
    assert [p["prediction"] for p in one["predictions"]] == [
        p["prediction"] for p in out["predictions"]
    ]
    assert one["metrics"]["length"] == sum(len(p["prediction"]) for p in out["predictions"])
    with pytest.raises(GptkitError, match="unknown metric"):
        generation_eval(model, char_tokenizer, examples, ["bleurt"])


def test_generation_eval_chat_renders_the_template(bpe_tokenizer) -> None:
    model = tiny_model(bpe_tokenizer.vocab_size, block_size=128)  # ChatML markers are bytes here
    examples = [
        {"prompt": "ignored", "messages": [{"role": "user", "content": "hi"}], "reference": "x"},
        {"prompt": "hello there", "reference": "y"},
    ]
    out = generation_eval(
        model, bpe_tokenizer, examples, ["exact_match"], max_new_tokens=4, chat=True
    )
    prompts = [p["prompt"] for p in out["predictions"]]
    assert prompts == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
    ]


# -- readers -------------------------------------------------------------------------------


def test_readers_parse_the_shipped_files() -> None:
    gsm = read_gsm8k(shared_path("gsm8k", "test.jsonl"))
    assert len(gsm) == 1187
    assert gsm[0]["prompt"].startswith("Question: Janet") and gsm[0]["prompt"].endswith("Answer:")
    assert gsm8k_reference_answer(gsm[0]["reference"]) == "18"
    assert gsm[0]["id"].endswith("test.jsonl:1")

    m30k = read_multi30k(shared_path("multi30k"))
    assert len(m30k) == 900
    assert m30k[0]["prompt"] == "English: A man in an orange hat starring at something.\nGerman:"
    assert m30k[0]["reference"] == "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."
    assert len(read_multi30k(shared_path("multi30k", "val.en.gz"), limit=5)) == 5

    tat = read_tatoeba(shared_path("tatoeba_cmn_eng", "cmn.txt"), limit=20)
    assert len(tat) == 20 and tat[0]["reference"] == ["嗨。", "你好。"]
    assert "Chinese" in tat[0]["messages"][0]["content"]

    sci = read_scitldr(shared_path("scitldr", "test.jsonl"))
    assert len(sci) == 556 and all(isinstance(e["reference"], list) for e in sci)
    assert sci[0]["prompt"].endswith("\n\nTL;DR:")

    inst = read_self_instruct(shared_path("self_instruct", "user_oriented_instructions.jsonl"))
    assert len(inst) == 252
    assert inst[0]["prompt"].startswith("Instruction: ") and "\nInput: " in inst[0]["prompt"]
    assert len(read_gsm8k(shared_path("gsm8k", "test.jsonl"), limit=7)) == 7


def _write(path: Path, lines: list[str]) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def test_readers_name_the_file_and_line_of_a_bad_row(tmp_path: Path) -> None:
    good = json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"})
    bad_json = _write(tmp_path / "g.jsonl", [good, "", '{"question": "2+2?", "answer": '])
    with pytest.raises(GptkitError, match=rf"{bad_json}:3: not valid JSON"):
        read_gsm8k(bad_json)
    assert len(read_gsm8k(bad_json, limit=1)) == 1  # stops before the bad row
    no_answer = _write(tmp_path / "h.jsonl", [good, json.dumps({"question": "q", "answer": "4"})])
    with pytest.raises(GptkitError, match=rf"{no_answer}:2: the answer has no final"):
        read_gsm8k(no_answer)
    missing = _write(tmp_path / "i.jsonl", [json.dumps({"question": "q"})])
    with pytest.raises(GptkitError, match=rf"{missing}:1: field 'answer' should be a str"):
        read_gsm8k(missing)

    tat = _write(tmp_path / "cmn.txt", ["Hi.\t你好。\tCC", "no tab here"])
    with pytest.raises(GptkitError, match=rf"{tat}:2: expected 'English<TAB>Chinese"):
        read_tatoeba(tat)

    sci = _write(tmp_path / "s.jsonl", [json.dumps({"source": ["a."], "target": "not a list"})])
    with pytest.raises(GptkitError, match=rf"{sci}:1: field 'target' should be a list"):
        read_scitldr(sci)

    inst = _write(tmp_path / "si.jsonl", [json.dumps({"instruction": "x", "instances": []})])
    with pytest.raises(GptkitError, match=rf"{inst}:1: field 'instances' is empty"):
        read_self_instruct(inst)

    en = _write(tmp_path / "t.en.gz", ["a dog", "a cat", "a bird"])
    _write(tmp_path / "t.de.gz", ["ein Hund", "", "ein Vogel"])
    with pytest.raises(GptkitError, match=r"t\.de\.gz:2: empty line"):
        read_multi30k(en)
    _write(tmp_path / "t.de.gz", ["ein Hund"])
    with pytest.raises(GptkitError, match=r"has 3 lines but .* has 1"):
        read_multi30k(en)
    (tmp_path / "c.en.gz").write_bytes(b"not gzip at all")
    with pytest.raises(GptkitError, match="cannot be read"):
        read_multi30k(tmp_path / "c.en.gz")


# -- evaluate_model end to end -------------------------------------------------------------


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, bpe_tokenizer) -> Path:
    return save_checkpoint(tmp_path / "ckpt", tiny_model(bpe_tokenizer.vocab_size), bpe_tokenizer)


def test_evaluate_model_on_text(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "held_out.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    report = tmp_path / "out" / "text.json"
    result = evaluate_model(str(tiny_checkpoint), "text", data=str(text), report=str(report))
    m = result["metrics"]
    assert m["bytes"] == len(SAMPLE_TEXT.encode()) and m["tokens"] > 0
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert json.loads(report.read_text()) == result
    assert "bits_per_byte" in capsys.readouterr().out
    with pytest.raises(GptkitError, match="pass --data"):
        evaluate_model(str(tiny_checkpoint), "text")


def test_evaluate_model_quantized(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """--quantize evaluates the quantized model (bf16 perplexity near fp32's) and says so."""
    text = tmp_path / "held_out.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    fp32 = evaluate_model(str(tiny_checkpoint), "text", data=str(text), progress=False)
    bf16 = evaluate_model(
        str(tiny_checkpoint), "text", data=str(text), progress=False, quantize="bf16"
    )
    assert bf16["settings"]["quantize"] == "bf16" and "quantize" not in fp32["settings"]
    assert bf16["metrics"]["loss"] != fp32["metrics"]["loss"]  # the bf16 model ran
    assert bf16["metrics"]["loss"] == pytest.approx(fp32["metrics"]["loss"], rel=0.02)
    with pytest.raises(GptkitError, match="int3"):
        evaluate_model(str(tiny_checkpoint), "text", data=str(text), quantize="int3")


def test_evaluate_model_on_a_generation_task(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = shared_path("gsm8k", "test.jsonl")
    report = tmp_path / "gsm8k.json"
    with pytest.warns(UserWarning, match="3 of 3 prompts were longer than the model's context"):
        result = evaluate_model(
            str(tiny_checkpoint),
            "gsm8k",
            data=str(data),
            limit=3,
            max_new_tokens=6,
            report=str(report),
            progress=False,
        )
    assert result["n"] == 3 and len(result["predictions"]) == 3
    assert 0 <= result["metrics"]["exact_match"] <= 1
    assert result["settings"]["chat"] is False and result["settings"]["stop"]
    assert json.loads(report.read_text()) == result
    with pytest.raises(GptkitError, match="unknown task 'squad'"):
        evaluate_model(str(tiny_checkpoint), "squad")


def test_evaluate_model_derives_a_cli_subcommand() -> None:
    """The lead wires ``gptkit eval`` from the signature; its flags must come out right."""
    from gptkit.cli import build_parser
    from gptkit.eval.classification import CLASSIFICATION_TASKS
    from gptkit.eval.run import TASK_NAMES
    from gptkit.eval.tasks import TASKS

    assert set(TASK_NAMES) == {"text", "classify", *TASKS, *CLASSIFICATION_TASKS}
    parser = build_parser()
    args = vars(
        parser.parse_args(
            ["eval", "--model", "m", "--task", "tatoeba", "--limit", "3", "--no-chat"]
        )
    )
    assert args["task"] == "tatoeba" and args["limit"] == 3 and args["chat"] is False
    assert args["max_new_tokens"] is None and args["progress"] is True
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "m", "--task", "squad"])


def test_sft_rows_are_worded_as_evaluation_asks(tmp_path: Path) -> None:
    from gptkit.eval.tasks import read_gsm8k, to_sft_rows

    data = tmp_path / "gsm.jsonl"
    rows = [
        {
            "question": f"What is {i} + {i}?",
            "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}",
        }
        for i in range(5)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = to_sft_rows("gsm8k", data, skip=1, limit=2)
    assert len(chat) == 2
    asked = read_gsm8k(data)[1]["messages"]
    assert chat[0]["messages"][:-1] == asked  # the very request evaluation makes
    assert chat[0]["messages"][-1] == {"role": "assistant", "content": "1 + 1 = 2\n#### 2"}
    plain = to_sft_rows("gsm8k", data, limit=1, chat=False)
    assert plain == [
        {"prompt": "Question: What is 0 + 0?\nAnswer:", "completion": " 0 + 0 = 0\n#### 0"}
    ]
    with pytest.raises(GptkitError, match="no examples after skipping 5"):
        to_sft_rows("gsm8k", data, skip=5)


def test_data_sets_are_found_by_flag_env_then_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPTKIT_DATA first, then shared/data in or beside the working directory; never the
    package's own location; the error names both ways to point at the data."""
    from gptkit.eval.examples import find_data

    env, local = tmp_path / "env", tmp_path / "work" / "shared" / "data"
    for d in (env, local):
        (d / "gsm8k").mkdir(parents=True)
        (d / "gsm8k" / "test.jsonl").write_text("")
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("GPTKIT_DATA", str(env))
    assert find_data("gsm8k/test.jsonl", "gsm8k") == (env / "gsm8k" / "test.jsonl").resolve()
    monkeypatch.delenv("GPTKIT_DATA")
    assert find_data("gsm8k/test.jsonl", "gsm8k") == (local / "gsm8k" / "test.jsonl").resolve()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GptkitError, match="pass --data PATH, or set GPTKIT_DATA"):
        find_data("gsm8k/test.jsonl", "gsm8k")
