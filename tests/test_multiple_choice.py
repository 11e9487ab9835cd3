"""Zero-shot multiple choice: acc/acc_norm by hand, the shared-prefill scorer against a plain
forward per request, and the HellaSwag and PIQA readers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, tiny_model

from gptkit.errors import GptkitError
from gptkit.eval.multiple_choice import (
    choice_scores,
    loglikelihoods,
    multiple_choice_eval,
    read_hellaswag,
    read_piqa,
    split_pair,
)
from gptkit.tokenizer import CharTokenizer

TEXT = "abcdefghijklmnopqrstuvwxyz .,:?\nQA"


@pytest.fixture(scope="module")
def chars() -> CharTokenizer:
    return CharTokenizer.train([TEXT])


def test_acc_and_acc_norm_on_a_toy_set_by_hand() -> None:
    examples = [
        # acc picks "a" (-2 > -4): wrong; per character -2 vs -1 picks "bbbb": right
        {"choices": ["a", "bbbb"], "label": 1},
        # both pick "xx" (-1 best; per character -0.5 best): right, right
        {"choices": ["xx", "yyyy", "z"], "label": 0},
        # acc picks "dd" (-2.4 > -3): right; per character -1.0 vs -1.2 picks "ccc": wrong
        {"choices": ["ccc", "dd"], "label": 1},
        # acc picks "e" (-1 > -6): wrong; per character -1 vs -0.75 picks the long one: right
        {"choices": ["e", "ffffffff"], "label": 1},
    ]
    lls = [[-2.0, -4.0], [-1.0, -3.0, -2.5], [-3.0, -2.4], [-1.0, -6.0]]
    assert choice_scores(examples, lls) == {"acc": 2 / 4, "acc_norm": 3 / 4}


def test_a_uniform_model_end_to_end_by_hand(chars: CharTokenizer) -> None:
    """With every logit 0 each token costs log V: a choice of k characters scores
    -(k + 1) log V (its leading space is a token), so acc picks the shortest choice and
    acc_norm, -(k + 1) log V / k, the longest."""
    model = tiny_model(vocab_size=chars.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    examples = [
        {"prompt": "Q: which?\nA:", "choices": ["ab", "abcdef", "abcd"], "label": 0},
        {"prompt": "Q: and this", "choices": ["abc", "a"], "label": 0},
    ]
    out = multiple_choice_eval(model, chars, examples, batch_size=2, progress=False)
    log_v = math.log(chars.vocab_size)
    for ex, row in zip(examples, out["predictions"], strict=True):
        expected = [-(len(c) + 1) * log_v for c in ex["choices"]]
        assert row["loglikelihoods"] == pytest.approx(expected, abs=1e-5)
    assert [r["pred"] for r in out["predictions"]] == [0, 1]
    assert [r["pred_norm"] for r in out["predictions"]] == [1, 0]
    assert out["metrics"] == {"acc": 0.5, "acc_norm": 0.5}


def _plain_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """One uncached forward over context + continuation, no sharing, no padding."""
    ctx, cont = split_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(model(ids)[0, :-1].float(), -1)  # (T - 1, V): predicts ids[1:]
    rows = logp[len(ctx) - 1 :]
    target = torch.tensor(cont)
    ll = rows.gather(-1, target[:, None]).sum().item()
    return ll, bool((rows.argmax(-1) == target).all())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_shared_prefill_equals_a_plain_forward_per_request(chars: CharTokenizer, name: str) -> None:
    model = tiny_model(vocab_size=chars.vocab_size, seed=1, block_size=64, **FAMILIES[name])
    requests = [
        ("Q: what is it?\nA:", " a cat"),
        ("Q: what is it?\nA:", " a dog, surely"),
        ("short", " x"),
        ("Q: what is it?\nA: ", "b"),  # the trailing space moves to the continuation
        ("", "abc"),  # an empty context: the start token stands for it
        ("short", " a much longer answer"),
        ("another context here, longer than the others", " ok"),
    ]
    want = [_plain_loglikelihood(model, chars, c, x) for c, x in requests]
    for batch_size in (1, 3):
        got = loglikelihoods(model, chars, requests, batch_size=batch_size, progress=False)
        for (ll, greedy), (ll_ref, greedy_ref) in zip(got, want, strict=True):
            assert ll == pytest.approx(ll_ref, abs=1e-4)
            assert greedy == greedy_ref


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_is_scored_as_its_own_plain_forward(
    chars: CharTokenizer, mode: str
) -> None:
    from gptkit.model.quant import quantize

    model = quantize(tiny_model(vocab_size=chars.vocab_size, seed=5, n_embd=64), mode)
    requests = [("Q: what is it?\nA:", " a cat"), ("Q: what is it?\nA:", " a dog"), ("x", " y")]
    want = [_plain_loglikelihood(model, chars, c, x) for c, x in requests]
    got = loglikelihoods(model, chars, requests, batch_size=2, progress=False)
    # the int4 kernel's sums run in another order for another batch shape: equal to 1e-4
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], rel=1e-3)


def test_a_greedy_continuation_is_reported_as_greedy(chars: CharTokenizer) -> None:
    model = tiny_model(vocab_size=chars.vocab_size, seed=2)
    ids = chars.encode("Q: a")
    with torch.no_grad():
        for _ in range(4):  # the model's own greedy tokens
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    greedy = chars.decode(ids[4:])
    other = "".join("a" if ch != "a" else "b" for ch in greedy)
    (_, g1), (_, g2) = loglikelihoods(
        model, chars, [("Q: a", greedy), ("Q: a", other)], progress=False
    )
    assert g1 and not g2


def test_a_long_context_keeps_its_newest_tokens(chars: CharTokenizer) -> None:
    model = tiny_model(vocab_size=chars.vocab_size, seed=3)  # block_size 32
    context, cont = "abcdefghij" * 5, " xyz"
    ((ll, _),) = loglikelihoods(model, chars, [(context, cont)], progress=False)
    ctx, ids = split_pair(chars, context, cont)
    x = torch.tensor([(ctx + ids)[-32:]])
    logp = F.log_softmax(model(x)[0].float(), -1)[-len(ids) - 1 : -1]
    assert ll == pytest.approx(logp.gather(-1, torch.tensor(ids)[:, None]).sum().item(), abs=1e-4)
    with pytest.raises(GptkitError, match="does not fit the model's context"):
        loglikelihoods(model, chars, [("a", " " + "b" * 40)], progress=False)


# -- readers -------------------------------------------------------------------------------


def test_read_hellaswag_cleans_as_the_harness_does(tmp_path: Path) -> None:
    f = tmp_path / "hellaswag_val_full.txt"
    f.write_text(
        "Roof shingle removal: A man is sitting on a roof. he\n3\n"
        "is using wrap.\nis ripping tiles off.\nis holding a cube.\nstarts pulling up roofing.\n"
        "Making tea: [header] How to make tea [title] Boil  water.\n0\n"
        "Pour it.\nDrink [step] it.\nSleep.\nRun.\n"
    )
    first, second = read_hellaswag(tmp_path)
    assert first["prompt"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert first["label"] == 3 and first["reference"] == "starts pulling up roofing."
    assert second["prompt"] == "Making tea: How to make tea. Boil water."
    assert second["choices"] == ["Pour it.", "Drink it.", "Sleep.", "Run."]
    assert len(read_hellaswag(f, limit=1)) == 1
    f.write_text("context\n1\na\nb\n")
    with pytest.raises(GptkitError, match="not a multiple of 6"):
        read_hellaswag(f)
    f.write_text("context\n7\na\nb\nc\nd\n")
    with pytest.raises(GptkitError, match=r":2: expected the gold index"):
        read_hellaswag(f)


def test_read_piqa_pairs_each_row_with_its_label(tmp_path: Path) -> None:
    rows = [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Paint the lid."}] * 2
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    a, b = read_piqa(tmp_path)
    assert a["prompt"] == "Question: Open a jar\nAnswer:"
    assert a["choices"] == ["Twist the lid.", "Paint the lid."]
    assert (a["label"], b["label"]) == (0, 1) and b["reference"] == "Paint the lid."
    (tmp_path / "valid-labels.lst").write_text("0\n")
    with pytest.raises(GptkitError, match="has 1 labels"):
        read_piqa(tmp_path)
    (tmp_path / "valid-labels.lst").unlink()
    with pytest.raises(GptkitError, match="labels file must be beside"):
        read_piqa(tmp_path / "valid.jsonl")


def test_the_shared_data_sets_read_whole() -> None:
    from conftest import shared_path

    hellaswag = read_hellaswag(shared_path("hellaswag"))
    piqa = read_piqa(shared_path("piqa"))
    assert len(hellaswag) == 9038 and len(piqa) == 1654
    assert all(len(ex["choices"]) == 4 for ex in hellaswag)
    assert hellaswag[0]["prompt"].endswith("on a roof. He")


def test_gptkit_eval_task_piqa_from_the_command_line(
    bpe_tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gptkit.checkpoint.hf import save_hf
    from gptkit.cli import main

    rows = [
        {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Paint the lid."},
        {"goal": "Dry shoes", "sol1": "Fill them with ice.", "sol2": "Stuff them with paper."},
        {"goal": "Boil water", "sol1": "Heat it.", "sol2": "Freeze it."},
    ]
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "valid-labels.lst").write_text("0\n1\n0\n")
    model = tiny_model(bpe_tokenizer.vocab_size, block_size=64)
    source = save_hf(model, bpe_tokenizer, tmp_path / "model")
    report = tmp_path / "report.json"
    argv = ["eval", "--model", str(source), "--task", "piqa", "--data", str(tmp_path)]
    assert main([*argv, "--limit", "2", "--report", str(report), "--no-progress"]) == 0
    result = json.loads(report.read_text())
    ours = multiple_choice_eval(model, bpe_tokenizer, read_piqa(tmp_path, limit=2), progress=False)
    assert result["n"] == 2 and result["metrics"] == ours["metrics"]
    assert "acc_norm" in capsys.readouterr().out
