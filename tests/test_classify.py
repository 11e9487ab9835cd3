"""GPT-1's classification fine-tuning: the head, padding, text pairs, the data, the CLI."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch
from conftest import run_metrics, tiny_model

import gptkit
from gptkit.checkpoint import save_checkpoint
from gptkit.cli import main
from gptkit.data.tasks import (
    IGNORE,
    Example,
    ExampleSampler,
    PackedSampler,
    encode_texts,
    load_labelled,
)
from gptkit.errors import GptkitError
from gptkit.model.lora import has_lora
from gptkit.tokenizer import CharTokenizer
from gptkit.train.objectives import batch_loss

LABELS = ("neg", "pos")


def _rows(n: int, seed: int) -> list[tuple[str, str]]:
    """A separable set: positive texts use letters a-d, negative ones e-h."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        letters = "abcd" if label == "pos" else "efgh"
        rows.append((label, "".join(rng.choice(letters) for _ in range(rng.randint(3, 12)))))
    return rows


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cls")
    train_file, dev_file = root / "train.tsv", root / "dev.tsv"
    train_file.write_text("label\ttext\n" + "".join(f"{y}\t{t}\n" for y, t in _rows(400, 0)))
    dev_file.write_text("".join(f"{y}\t{t}\n" for y, t in _rows(100, 1)))
    tok = CharTokenizer.train([string.printable])  # zero-shot questions need every letter
    save_checkpoint(root / "base", tiny_model(tok.vocab_size, block_size=32, seed=1), tok)
    return train_file, dev_file, root / "base"


FAST = dict(batch_size=16, eval_every=20, save_every=0, progress=False, precision="fp32")


def test_the_head_beats_chance_and_keeps_its_label_names(task, tmp_path: Path) -> None:
    train_file, dev_file, base = task
    result = gptkit.finetune(
        "classify", train_file, tmp_path, str(base), val_data=str(dev_file),
        max_steps=60, lr=3e-3, warmup_steps=5, **FAST,
    )  # fmt: skip
    assert result["val_acc"] >= 0.9, result
    accs = [r["val_acc"] for r in run_metrics(tmp_path) if "val_acc" in r]
    assert accs[-1] >= accs[0]
    model, tok = gptkit.load(result["checkpoint"])
    assert model.config.labels == LABELS  # sorted names from the data, kept in config.json
    preds = gptkit.classify(model, tok, ["abcabc", "efgefgh"])
    assert [p["label"] for p in preds] == ["pos", "neg"]
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-5 for p in preds)


def test_lora_classification_beats_chance(task, tmp_path: Path) -> None:
    train_file, dev_file, base = task
    result = gptkit.finetune(
        "classify", train_file, tmp_path, str(base), val_data=str(dev_file),
        max_steps=60, lr=1e-2, warmup_steps=5, lora_rank=4, lm_weight=0.0, **FAST,
    )  # fmt: skip
    assert result["val_acc"] >= 0.8, result
    model, _ = gptkit.load(result["checkpoint"])
    assert has_lora(model) and model.config.labels == LABELS
    base_model, _ = gptkit.load(base)
    for name, p in base_model.state_dict().items():  # the base weights stay frozen
        torch.testing.assert_close(model.state_dict()[name], p, rtol=0, atol=0)


def test_the_lm_weight_adds_the_language_modelling_loss(task) -> None:
    train_file, _, base = task
    model, tok = gptkit.load(base)
    model.add_classifier(LABELS)
    examples, _ = load_labelled(train_file, tok, 32)
    from gptkit.data.tasks import collate_labelled

    batch = collate_labelled(examples[:8])
    x, y, labels, last = batch
    h = model.hidden(x)
    cls = torch.nn.functional.cross_entropy(model.cls_head(h[torch.arange(8), last]), labels)
    lm = torch.nn.functional.cross_entropy(
        model.lm_head(h).flatten(0, 1), y.flatten(), ignore_index=IGNORE
    )
    torch.testing.assert_close(batch_loss(model, batch, 0.0), cls)
    torch.testing.assert_close(batch_loss(model, batch, 0.5), cls + 0.5 * lm)


@pytest.mark.parametrize("fam", ["gpt2", "llama", "gpt3"])
def test_predictions_do_not_depend_on_padding(fam: str) -> None:
    from conftest import FAMILIES

    tok = CharTokenizer.train(["abcdefgh xyz\n"])
    model = tiny_model(tok.vocab_size, **FAMILIES[fam])
    model.add_classifier(("a", "b", "c"))
    texts = ["ab", "abcdefgh xyz", "h", "zyx abc"]
    pairs = ["x", "y", "zz", "abc"]
    alone = [
        gptkit.classify(model, tok, [t], [p])[0]["probs"] for t, p in zip(texts, pairs, strict=True)
    ]
    for padding in ("right", "left"):
        batched = gptkit.classify(model, tok, texts, pairs, batch_size=4, padding=padding)
        for a, b in zip(alone, batched, strict=True):
            assert b["probs"] == pytest.approx(a, abs=1e-5)


def test_text_pairs_are_joined_by_the_delimiter_and_cut_to_fit() -> None:
    tok = CharTokenizer.train(["abcdef"])
    eos = tok.eos_id
    assert eos is not None
    assert encode_texts(tok, ["ab", "cd"], 32) == [*tok.encode("ab"), eos, *tok.encode("cd"), eos]
    cut = encode_texts(tok, ["abcdef" * 3, "cd"], 8)  # the longer text loses its tail
    assert len(cut) == 8 and cut[-3:] == [*tok.encode("cd"), eos]


def test_packed_examples_give_the_loss_of_separate_ones() -> None:
    tok = CharTokenizer.train(["abcdefgh"])
    model = tiny_model(tok.vocab_size)
    rng = random.Random(0)
    examples = []
    for _ in range(6):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(3, 9))]
        n = rng.randint(1, len(ids) - 1)
        examples.append(Example(ids, [IGNORE] * n + ids[n:]))
    packed = PackedSampler(examples, batch_size=2, row_len=20, shuffle=False).next()
    assert packed[2].max() > 1  # rows really hold several examples
    seen = sum(int(packed[2][i].max()) for i in range(2))
    plain = ExampleSampler(examples[:seen], batch_size=seen, shuffle=False).next()
    torch.testing.assert_close(batch_loss(model, packed), batch_loss(model, plain))


def test_packed_sft_trains(tmp_path: Path) -> None:
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = CharTokenizer.train(["0123456789+="])
    save_checkpoint(tmp_path / "base", tiny_model(tok.vocab_size, block_size=32), tok)
    result = gptkit.finetune(
        "sft", data, tmp_path / "run", str(tmp_path / "base"), pack=True, max_steps=8,
        lr=3e-3, **FAST,
    )  # fmt: skip
    assert result["step"] == 8 and result["val_loss"] is not None


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_rows_are_reported_with_file_and_line(tmp_path: Path) -> None:
    tok = CharTokenizer.train(["abcdefgh"])
    cases = {
        "nolabel.tsv": ("pos\tabc\n\tabc\n", r"nolabel.tsv:2: the row has no label"),
        "unknown.tsv": ("pos\tabc\nmaybe\tabc\n", r"unknown.tsv:2: unknown label 'maybe'"),
        "empty.tsv": ("pos\tabc\nneg\t \n", r"empty.tsv:2: empty text"),
        "fields.tsv": ("pos abc\n", r"fields.tsv:1: expected label<TAB>text"),
        "nolabel.jsonl": ('{"text": "a", "label": "pos"}\n{"text": "b"}\n', r"jsonl:2: .*label"),
        "broken.jsonl": ('{"text": "a", "label": "pos"}\n\n{"text": \n', r"jsonl:3: malformed"),
        "notext.jsonl": ('{"text": "", "label": "pos"}\n', r"notext.jsonl:1: field 'text'"),
    }
    for name, (text, message) in cases.items():
        with pytest.raises(GptkitError, match=message):
            load_labelled(_write(tmp_path / name, text), tok, 32, LABELS)


def test_integer_labels_index_the_given_names(tmp_path: Path) -> None:
    tok = CharTokenizer.train(["abcdefgh"])
    data = _write(tmp_path / "sst.tsv", "label\tsentence\n0\tabc\n1\tdef\n")
    examples, names = load_labelled(data, tok, 32, ("negative", "positive"))
    assert names == ("negative", "positive") and [e.label for e in examples] == [0, 1]
    assert load_labelled(data, tok, 32)[1] == ("0", "1")


def test_classify_and_finetune_on_the_command_line(task, tmp_path: Path, capsys) -> None:
    train_file, dev_file, base = task
    run = tmp_path / "run"
    argv = ["finetune", "classify", "--data", str(train_file), "--val-data", str(dev_file)]
    argv += ["--init-from", str(base), "--out", str(run), "--max-steps", "40", "--lr", "3e-3"]
    assert main([*argv, "--batch-size", "16", "--no-progress", "--precision", "fp32"]) == 0
    capsys.readouterr()
    assert main(["classify", "--model", str(run), "--text", "abcd", "--text", "hgfe"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["pos", "neg"]
    assert "neg=" in lines[0] and "pos=" in lines[0]
    out = tmp_path / "preds.jsonl"
    assert main(["classify", "--model", str(run), "--file", str(dev_file), "--out", str(out)]) == 0
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == 100 and set(preds[0]["probs"]) == set(LABELS)
    assert main(["classify", "--model", str(base), "--text", "abc"]) == 2
    assert "no classification head" in capsys.readouterr().err


def test_eval_scores_the_head_and_ranks_labels_zero_shot(task, tmp_path: Path) -> None:
    from gptkit.eval.run import evaluate_model

    train_file, dev_file, base = task
    run = tmp_path / "run"
    gptkit.finetune(
        "classify", train_file, run, str(base), val_data=str(dev_file), max_steps=40, lr=3e-3,
        **FAST,
    )  # fmt: skip
    report = tmp_path / "report.json"
    tuned = evaluate_model(str(run), "classify", data=str(dev_file), report=str(report))
    assert tuned["settings"]["method"] == "head" and tuned["n"] == 100
    assert tuned["metrics"]["accuracy"] >= 0.9
    assert sum(map(sum, tuned["confusion_matrix"])) == 100
    assert json.loads(report.read_text())["labels"] == list(LABELS)
    base_result = evaluate_model(str(base), "classify", data=str(dev_file), labels="neg,pos")
    assert base_result["settings"]["method"] == "zero-shot"
    assert 0.0 <= base_result["metrics"]["macro_f1"] <= 1.0
    with pytest.raises(GptkitError, match="pass --labels"):
        evaluate_model(str(base), "classify", data=str(dev_file))


def test_zero_shot_scores_are_the_options_log_likelihoods() -> None:

    tok = CharTokenizer.train(["abcdefgh xyz\n"])
    model = tiny_model(tok.vocab_size)
    prompts = ["abc", "hgfe dd"]
    for options in ([" x", " yz"], ["x", "y", "z"]):  # several tokens; one token each
        check_option_scores(model, tok, prompts, options)


def check_option_scores(model, tok, prompts: list[str], options: list[str]) -> None:
    from gptkit.eval.classification import score_options

    scores = score_options(model, tok, prompts, options, batch_size=3)
    for i, p in enumerate(prompts):
        for k, o in enumerate(options):
            ids = tok.encode(p + o)
            logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
            n = len(tok.encode(p))
            expected = sum(logp[t - 1, ids[t]] for t in range(n, len(ids)))
            assert scores[i, k].item() == pytest.approx(expected.item(), abs=1e-4)
