"""SFT examples: the loss falls on the answer only; bad rows are named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXT, tiny_model

from gptkit.data.tasks import IGNORE, encode_example, load_examples
from gptkit.errors import GptkitError
from gptkit.tokenizer import BPETokenizer
from gptkit.tokenizer.chat import CHATML
from gptkit.train.objectives import batch_loss


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    t = BPETokenizer.train(iter([SAMPLE_TEXT]), 320, special=special, show_progress=False)
    t.eos_token = "<|im_end|>"
    return t


def _answer_text(tok: BPETokenizer, labels: list[int]) -> str:
    return tok.decode([x for x in labels if x != IGNORE])


def test_prompt_completion_masks_the_prompt(tok: BPETokenizer) -> None:
    ex = encode_example(
        tok, {"prompt": "def add(a, b):", "completion": " return a + b"}, chat=False
    )
    n_prompt = len(tok.encode("def add(a, b):"))
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.ids[n_prompt:]
    assert _answer_text(tok, ex.labels) == " return a + b<|im_end|>"


def test_prompt_tokens_get_no_loss_and_no_gradient(tok: BPETokenizer) -> None:
    ex = encode_example(tok, {"prompt": "class Point:", "completion": " pass"}, chat=True)
    model = tiny_model(tok.vocab_size, block_size=64)
    ids = torch.tensor([ex.ids[:-1]])
    targets = torch.tensor([ex.labels[1:]])
    logits = model(ids).detach().requires_grad_(True)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=IGNORE)
    loss.backward()
    grad_norm = logits.grad[0].norm(dim=-1)
    masked = targets[0] == IGNORE
    assert masked.sum() > 0 and (~masked).sum() > 0
    assert torch.all(grad_norm[masked] == 0)
    assert torch.all(grad_norm[~masked] > 0)
    # The loss is the mean over answer positions only.
    per_token = F.cross_entropy(logits[0], targets[0].clamp(min=0), reduction="none")
    torch.testing.assert_close(loss, per_token[~masked].mean())


def test_sft_loss_runs_the_head_on_scored_positions_only(tok: BPETokenizer) -> None:
    """batch_loss scores only the answer positions (the head skips the prompt) and equals
    cross-entropy with ignore_index over the full logits, in value and in gradients."""
    rows = [
        encode_example(tok, {"prompt": "class Point:", "completion": " pass"}, chat=True),
        encode_example(tok, {"prompt": "def f(x):", "completion": " return x + 1"}, chat=True),
    ]
    T = max(len(r.ids) for r in rows) - 1
    ids = torch.zeros(2, T, dtype=torch.long)
    targets = torch.full((2, T), IGNORE)
    for b, r in enumerate(rows):
        ids[b, : len(r.ids) - 1] = torch.tensor(r.ids[:-1])
        targets[b, : len(r.ids) - 1] = torch.tensor(r.labels[1:])
    model = tiny_model(tok.vocab_size, block_size=64)
    loss = batch_loss(model, (ids, targets))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(ids)
    full = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=IGNORE)
    full.backward()
    torch.testing.assert_close(loss, full)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    assert model(ids, only=targets != IGNORE).shape == ((targets != IGNORE).sum(), tok.vocab_size)


def test_chat_rows_learn_only_assistant_turns(tok: BPETokenizer) -> None:
    tok.chat_template = CHATML
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"},
        ]
    }
    ex = encode_example(tok, row)
    assert _answer_text(tok, ex.labels) == "4<|im_end|>\n6<|im_end|>\n"
    text = tok.decode(ex.ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n6<|im_end|>\n")


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_bad_rows_name_file_and_line(tok: BPETokenizer, tmp_path: Path) -> None:
    good = json.dumps({"prompt": "a", "completion": "b"})
    cases = {
        "malformed JSON": "{not json",
        "field 'completion' is empty": json.dumps({"prompt": "a", "completion": "  "}),
        "needs 'prompt' and 'completion'": json.dumps({"prompt": "a"}),
        "no non-empty assistant": json.dumps({"messages": [{"role": "user", "content": "x"}]}),
        "expected a JSON object": "[1, 2]",
    }
    for message, bad in cases.items():
        path = _write(tmp_path / "d.jsonl", [good, "", bad])
        with pytest.raises(GptkitError, match=rf"d\.jsonl:3: .*{message}"):
            load_examples(path, tok, max_len=64, chat=False)
    with pytest.raises(GptkitError, match="does not exist"):
        load_examples(tmp_path / "none.jsonl", tok, max_len=64)
    with pytest.raises(GptkitError, match="holds no examples"):
        load_examples(_write(tmp_path / "e.jsonl", [""]), tok, max_len=64)


def test_long_examples_are_cut_unless_the_answer_is_lost(tok: BPETokenizer, tmp_path: Path) -> None:
    row = {"prompt": "def f():", "completion": " return 1" * 30}
    path = _write(tmp_path / "d.jsonl", [json.dumps(row)])
    (ex,) = load_examples(path, tok, max_len=20, chat=False)
    assert len(ex.ids) == 20 and ex.answer_tokens > 0
    with pytest.raises(GptkitError, match="prompt alone is longer"):
        load_examples(path, tok, max_len=3, chat=False)
