"""GPT-1's task input transformations (Radford et al. 2018, Fig. 1): the added start,
delimiter and extract tokens, the token layout of each format, similarity's two orders,
choice's one score per answer, and fine-tuning through them end to end."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import gptkit
from gptkit.checkpoint import save_checkpoint
from gptkit.cli import main
from gptkit.data.tasks import (
    DELIM,
    EXTRACT,
    IGNORE,
    START,
    TASK_TOKENS,
    collate_labelled,
    encode_views,
    load_labelled,
    with_task_tokens,
)
from gptkit.errors import GptkitError
from gptkit.eval.classification import classification_eval
from gptkit.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
from gptkit.train.objectives import add_task_tokens, batch_loss, head_logits, set_task_head

TEXT = string.ascii_lowercase + " .,"


@pytest.fixture
def tok() -> CharTokenizer:
    return with_task_tokens(CharTokenizer.train([TEXT]))


def ids(tok: CharTokenizer, text: str) -> list[int]:
    return tok.encode(text, allow_special=False)


# -- the tokens ----------------------------------------------------------------------------


def test_task_tokens_are_appended_and_survive_saving(tmp_path: Path, bpe_tokenizer) -> None:
    for base in (CharTokenizer.train([TEXT]), bpe_tokenizer):
        tok = with_task_tokens(base)
        assert tok.vocab_size == base.vocab_size + 3
        new = [tok.special_tokens[t] for t in TASK_TOKENS]
        assert sorted(new) == list(range(base.vocab_size, base.vocab_size + 3))
        sample = "the cat sat."
        assert tok.encode(sample) == base.encode(sample)  # every other id unchanged
        assert with_task_tokens(tok) is tok  # idempotent: a resumed run adds nothing
        assert START not in base.special_tokens  # the caller's tokenizer is untouched
        tok.save(tmp_path / type(base).__name__)
        again = load_tokenizer(tmp_path / type(base).__name__)
        assert again.special_tokens == tok.special_tokens and again.hash == tok.hash
        if isinstance(base, BPETokenizer):  # text that spells a token stays text
            assert len(tok.encode(START, allow_special=False)) > 1


def test_the_embedding_grows_and_keeps_its_rows() -> None:
    base = CharTokenizer.train([TEXT])
    for tied in (True, False):
        model = tiny_model(base.vocab_size, tie_embeddings=tied)
        x = torch.tensor([ids(base, "abc def")])
        before = model(x)
        tok = add_task_tokens(model, base)
        V = base.vocab_size + 3
        assert model.config.vocab_size == V == tok.vocab_size
        assert model.wte.weight.shape[0] == V and model.lm_head.weight.shape[0] == V
        assert (model.lm_head.weight is model.wte.weight) == tied
        after = model(x)
        torch.testing.assert_close(after[..., : V - 3], before)  # old ids: the same logits
        assert model.wte.weight[V - 3 :].std() > 0  # new rows drawn, not zero
        assert add_task_tokens(model, tok) is tok and model.config.vocab_size == V


# -- token layout ----------------------------------------------------------------------------


def test_single_and_pair_layout(tok: CharTokenizer) -> None:
    s, d, e = (tok.special_tokens[t] for t in (START, DELIM, EXTRACT))
    assert encode_views(tok, ["ab c"], "single", 32) == [[s, *ids(tok, "ab c"), e]]
    assert encode_views(tok, ["ab", "cd"], "pair", 32) == [
        [s, *ids(tok, "ab"), d, *ids(tok, "cd"), e]
    ]
    # over the context the longer text loses its tail; the frame stays whole
    (cut,) = encode_views(tok, ["abcdefghij", "xy"], "pair", 9)
    assert cut == [s, *ids(tok, "abcd"), d, *ids(tok, "xy"), e]


def test_similarity_holds_both_orders(tok: CharTokenizer) -> None:
    s, d, e = (tok.special_tokens[t] for t in (START, DELIM, EXTRACT))
    ab, ba = encode_views(tok, ["ab", "xyz"], "similarity", 32)
    assert ab == [s, *ids(tok, "ab"), d, *ids(tok, "xyz"), e]
    assert ba == [s, *ids(tok, "xyz"), d, *ids(tok, "ab"), e]


def test_choice_is_one_sequence_per_answer(tok: CharTokenizer) -> None:
    s, d, e = (tok.special_tokens[t] for t in (START, DELIM, EXTRACT))
    views = encode_views(tok, ["q", "one", "two", "six"], "choice", 32)
    assert views == [[s, *ids(tok, "q"), d, *ids(tok, a), e] for a in ("one", "two", "six")]


def test_format_errors(tok: CharTokenizer, tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="takes two texts"):
        encode_views(tok, ["a"], "pair", 32)
    with pytest.raises(GptkitError, match="at least two choices"):
        encode_views(tok, ["a", "b"], "choice", 32)
    with pytest.raises(GptkitError, match="unknown format"):
        encode_views(tok, ["a"], "triple", 32)
    with pytest.raises(GptkitError, match="--format single"):
        encode_views(CharTokenizer.train([TEXT]), ["a"], "single", 32)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "q", "choices": ["a", "b"], "label": 2}) + "\n")
    with pytest.raises(GptkitError, match="index of the right choice"):
        load_labelled(bad, tok, 32, fmt="choice")
    bad.write_text(json.dumps({"text": "q", "choices": ["a"], "label": 0}) + "\n")
    with pytest.raises(GptkitError, match="at least two answers"):
        load_labelled(bad, tok, 32, fmt="choice")


# -- the head over several sequences --------------------------------------------------------


def _model(tok: CharTokenizer, labels: tuple[str, ...], fmt: str, seed: int = 0):
    model = tiny_model(tok.vocab_size, seed=seed)
    set_task_head(model, labels, fmt)
    return model


def test_similarity_adds_both_orders_before_the_head(tok: CharTokenizer) -> None:
    model = _model(tok, ("same", "other"), "similarity")
    views = encode_views(tok, ["ab cd", "xyz"], "similarity", 32)
    by_hand = sum(model.hidden(torch.tensor([v]))[0, -1] for v in views)
    out = gptkit.classify(model, tok, ["ab cd"], ["xyz"])[0]
    want = model.cls_head(by_hand).softmax(-1).tolist()
    assert list(out["probs"].values()) == pytest.approx(want, abs=1e-5)
    swapped = gptkit.classify(model, tok, ["xyz"], ["ab cd"])[0]  # no order: the same
    assert list(swapped["probs"].values()) == pytest.approx(want, abs=1e-5)


def test_choice_gives_one_score_per_answer(tok: CharTokenizer) -> None:
    model = _model(tok, ("score",), "choice")
    assert model.cls_head.out_features == 1
    contexts, choices = ["q one", "a b"], [["x", "yy", "zzz"], ["c d", "e"]]
    out = gptkit.classify(model, tok, contexts, choices=choices)
    for ctx, answers, got in zip(contexts, choices, out, strict=True):
        views = encode_views(tok, [ctx, *answers], "choice", 32)
        scores = torch.stack(
            [model.cls_head(model.hidden(torch.tensor([v]))[0, -1])[0] for v in views]
        )
        assert got["probs"] == pytest.approx(scores.softmax(0).tolist(), abs=1e-5)
        assert got["choice"] == answers[got["label"]]
    # the answers' order moves the probabilities with them
    flipped = gptkit.classify(model, tok, contexts[:1], choices=[choices[0][::-1]])[0]
    assert flipped["probs"] == pytest.approx(out[0]["probs"][::-1], abs=1e-5)


@pytest.mark.parametrize("fmt", ["similarity", "choice"])
def test_predictions_do_not_depend_on_padding(tok: CharTokenizer, fmt: str) -> None:
    labels = ("score",) if fmt == "choice" else ("a", "b", "c")
    model = _model(tok, labels, fmt, seed=3)
    texts, seconds = ["ab", "abcdefgh xyz", "h"], ["x", "y zz", "zz abc"]
    kw = (lambda i: {"choices": [[seconds[j], "q"] for j in i]}) if fmt == "choice" else (
        lambda i: {"pairs": [seconds[j] for j in i]}
    )  # fmt: skip
    alone = [gptkit.classify(model, tok, [texts[i]], **kw([i]))[0]["probs"] for i in range(3)]
    for padding in ("right", "left"):
        batched = gptkit.classify(model, tok, texts, batch_size=3, padding=padding, **kw(range(3)))
        for a, b in zip(alone, batched, strict=True):
            a, b = (list(p.values()) if isinstance(p, dict) else p for p in (a, b["probs"]))
            assert a == pytest.approx(b, abs=1e-5)


def test_the_loss_of_a_choice_batch(tok: CharTokenizer, tmp_path: Path) -> None:
    """Cross-entropy over each example's answers (3 and 2 here: the missing one is -inf),
    plus λ times the next-token loss over every sequence."""
    data = tmp_path / "mc.jsonl"
    rows = [{"text": "q", "choices": ["a", "bb", "c"], "label": 2},
            {"text": "rs", "choices": ["tt", "u"], "label": 0}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = _model(tok, ("score",), "choice")
    examples, names = load_labelled(data, tok, 32, fmt="choice")
    assert names == ("score",) and [len(e.views) for e in examples] == [3, 2]
    batch = collate_labelled(examples)
    x, y, _, last, owner, slot = batch
    assert owner.tolist() == [0, 0, 0, 1, 1] and slot.tolist() == [0, 1, 2, 0, 1]
    h = model.hidden(x)
    s = model.cls_head(h[torch.arange(5), last])[:, 0]
    ce = (-(s[:3].log_softmax(0)[2]) - s[3:].log_softmax(0)[0]) / 2
    lm = F.cross_entropy(model.lm_head(h).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(batch_loss(model, batch, 0.0), ce)
    torch.testing.assert_close(batch_loss(model, batch, 0.5), ce + 0.5 * lm)
    logits = head_logits(model, h, last, owner, slot)
    assert logits.shape == (2, 3) and logits[1, 2] == float("-inf")


# -- end to end ------------------------------------------------------------------------------


def _choice_rows(n: int, seed: int) -> list[dict]:
    """The right answer is written with a-d, the wrong one with e-h."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randrange(2)
        choices = ["".join(rng.choices("efgh", k=3)) for _ in range(2)]
        choices[k] = "".join(rng.choices("abcd", k=3))
        rows.append({"text": "".join(rng.choices("xyz", k=2)), "choices": choices, "label": k})
    return rows


def _pair_rows(n: int, seed: int) -> list[dict]:
    """ "same" pairs are written with a-d, "other" pairs with e-h (in either order)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        same = rng.random() < 0.5
        letters = "abcd" if same else "efgh"
        one, two = ("".join(rng.choices(letters, k=rng.randint(2, 5))) for _ in range(2))
        rows.append({"text": one, "text_b": two, "label": "same" if same else "other"})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpt1")
    tok = CharTokenizer.train([TEXT])
    save_checkpoint(root / "base", tiny_model(tok.vocab_size, block_size=32, seed=1), tok)
    return root / "base"


FAST = dict(batch_size=16, eval_every=30, save_every=0, progress=False, precision="fp32")


def test_choice_fine_tuning_learns_and_the_checkpoint_carries_the_format(
    base: Path, tmp_path: Path
) -> None:
    train = _write(tmp_path / "train.jsonl", _choice_rows(300, 0))
    dev = _write(tmp_path / "dev.jsonl", _choice_rows(60, 1))
    result = gptkit.finetune(
        "classify", train, tmp_path / "run", str(base), val_data=str(dev), format="choice",
        max_steps=60, lr=3e-3, warmup_steps=5, **FAST,
    )  # fmt: skip
    assert result["val_acc"] >= 0.9, result
    model, tok = gptkit.load(result["checkpoint"])
    assert model.config.task_format == "choice" and model.config.labels == ("score",)
    assert set(TASK_TOKENS) <= set(tok.special_tokens)
    assert model.config.vocab_size == tok.vocab_size == CharTokenizer.train([TEXT]).vocab_size + 3
    out = gptkit.classify(model, tok, ["xy"], choices=[["hge", "cab"]])[0]
    assert out["label"] == 1 and out["choice"] == "cab"
    report = classification_eval(model, tok, dev, progress=False)
    assert report["method"] == "head (choice)" and report["metrics"]["accuracy"] >= 0.9
    with pytest.raises(GptkitError, match="choices="):
        gptkit.classify(model, tok, ["xy"])


def test_similarity_through_the_cli(base: Path, tmp_path: Path, capsys) -> None:
    train = _write(tmp_path / "train.jsonl", _pair_rows(300, 0))
    dev = _write(tmp_path / "dev.jsonl", _pair_rows(60, 1))
    run = tmp_path / "run"
    argv = ["finetune", "classify", "--init-from", str(base), "--data", str(train),
            "--val-data", str(dev), "--out", str(run), "--format", "similarity",
            "--max-steps", "60", "--lr", "3e-3", "--warmup-steps", "5", "--batch-size", "16",
            "--eval-every", "30", "--save-every", "0", "--precision", "fp32",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    model, tok = gptkit.load(run)
    assert model.config.task_format == "similarity"
    acc = classification_eval(model, tok, dev, progress=False)["metrics"]["accuracy"]
    assert acc >= 0.85
    assert main(["classify", "--model", str(run), "--text", "abc", "--pair", "dd"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("same")


def test_choice_refuses_labels(base: Path, tmp_path: Path) -> None:
    train = _write(tmp_path / "train.jsonl", _choice_rows(20, 0))
    with pytest.raises(GptkitError, match="--labels does not apply"):
        gptkit.finetune(
            "classify", train, tmp_path / "run", str(base), format="choice", labels="a,b",
            max_steps=1, **FAST,
        )  # fmt: skip
