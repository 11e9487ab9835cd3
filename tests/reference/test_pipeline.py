"""``gptkit.pipeline`` beside ``transformers.pipeline``, and ``model(ids, labels=ids)`` beside
transformers' causal-LM loss, on one tiny random model exported to a Hugging Face directory.

transformers 5 ships text-generation and text-classification pipelines only (its
summarization, translation and extractive question-answering pipelines were v4's, for
encoder-decoder and span-head models); those three are checked here against the keys and
nesting v4 documented, and for what a decoder-only model can promise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, tiny_model
from safetensors.torch import load_file, save_file

import gptkit
from gptkit.checkpoint.hf import save_hf
from gptkit.errors import GptkitError
from gptkit.eval.multiple_choice import loglikelihoods
from gptkit.tokenizer import EOT, BPETokenizer, CharTokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def exported(bpe_tokenizer: BPETokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_model(bpe_tokenizer.vocab_size, init_std=0.3, block_size=64, **FAMILIES["llama"])
    return save_hf(model, bpe_tokenizer, tmp_path_factory.mktemp("hf") / "tiny")


def test_text_generation_equals_transformers(exported: Path) -> None:
    theirs = transformers.pipeline("text-generation", model=str(exported), device="cpu")
    ours = gptkit.pipeline("text-generation", model=exported)
    prompts = ["def add(a, b):", "First Citizen:"]
    for kwargs in ({}, {"return_full_text": False}):
        want = theirs(prompts, do_sample=False, max_new_tokens=12, **kwargs)
        got = ours(prompts, do_sample=False, max_new_tokens=12, **kwargs)
        assert got == want  # a list (per prompt) of lists of {"generated_text": ...}
        assert ours(prompts[0], do_sample=False, max_new_tokens=12, **kwargs) == want[0]


def test_labels_give_transformers_loss_with_the_logits(exported: Path, bpe_tokenizer) -> None:
    model, _ = gptkit.load(exported)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.tensor([bpe_tokenizer.encode("def add(a, b):\n    return a + b")] * 2)
    labels = ids.clone()
    labels[1, :5] = -100  # skipped, as transformers skips them
    with torch.no_grad():
        out = model(ids, labels=labels)
        ref = hf(ids, labels=labels)
        plain = model(ids)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    loss, logits = out  # unpacks as transformers' output does
    assert loss is out.loss and torch.equal(logits, plain)  # other callers: the bare logits
    with pytest.raises(GptkitError, match="cannot be combined with only"):
        model(ids, labels=ids, only=torch.ones_like(ids, dtype=torch.bool))


def test_labels_loss_trains_as_the_seeds_loop_does(bpe_tokenizer: BPETokenizer) -> None:
    model = tiny_model(bpe_tokenizer.vocab_size).train()
    ids = torch.tensor([bpe_tokenizer.encode("Speak, speak. Speak, speak.")])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_text_classification_equals_transformers(
    bpe_tokenizer: BPETokenizer, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = tiny_model(bpe_tokenizer.vocab_size, init_std=0.3, block_size=64, **FAMILIES["llama"])
    model.add_classifier(["negative", "positive"])
    with torch.no_grad():
        model.cls_head.weight.normal_(0, 1.0)
        model.cls_head.bias.zero_()  # transformers' score layer has none
    out = save_hf(model, bpe_tokenizer, tmp_path / "cls")
    # the same weights as LlamaForSequenceClassification: the head is "score"
    weights = load_file(out / "model.safetensors")
    weights["score.weight"] = model.cls_head.weight.detach().clone()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg |= {
        "architectures": ["LlamaForSequenceClassification"],
        "id2label": {"0": "negative", "1": "positive"},
        "label2id": {"negative": 0, "positive": 1},
    }
    (out / "config.json").write_text(json.dumps(cfg))
    theirs = transformers.pipeline("text-classification", model=str(out), device="cpu")
    ours = gptkit.pipeline("sentiment-analysis", model=model, tokenizer=bpe_tokenizer)
    texts = ["Speak, speak.", "def add(a, b):", "All: hear me"]
    # our head reads the end-of-text token gptkit's classifiers append (the extract token)
    want = [theirs(t + EOT, top_k=None) for t in texts]
    got = ours(texts, top_k=None)
    for g, w in zip(got, want, strict=True):
        assert [r["label"] for r in g] == [r["label"] for r in w]
        assert [r["score"] for r in g] == pytest.approx([r["score"] for r in w], abs=1e-5)
    one = ours(texts[0])
    assert one == [{"label": want[0][0]["label"], "score": pytest.approx(want[0][0]["score"])}]
    assert [r["label"] for r in ours(texts)] == [w[0]["label"] for w in want]
    with pytest.raises(GptkitError, match="classification head"):
        gptkit.pipeline("text-classification", model=tiny_model(), tokenizer=bpe_tokenizer)


@pytest.fixture(scope="module")
def chars() -> CharTokenizer:
    return CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:?;\n"])


def test_summarization_and_translation_return_transformers_keys(chars: CharTokenizer) -> None:
    model = tiny_model(chars.vocab_size, block_size=128)
    summarize = gptkit.pipeline("summarization", model=model, tokenizer=chars)
    (one,) = summarize("The cat sat on the mat. It was warm.", max_new_tokens=5)
    assert list(one) == ["summary_text"] and isinstance(one["summary_text"], str)
    assert len(summarize(["a b c", "d e f"], max_new_tokens=3)) == 2
    translate = gptkit.pipeline("translation_en_to_de", model=model, tokenizer=chars)
    (t,) = translate("The cat.", max_new_tokens=5)
    assert list(t) == ["translation_text"]
    plain = gptkit.pipeline("translation", model=model, tokenizer=chars)
    assert plain("The cat.", src_lang="en", tgt_lang="de", max_new_tokens=5) == [t]
    with pytest.raises(GptkitError, match="needs its languages"):
        plain("The cat.")
    with pytest.raises(GptkitError, match="translation_xx_to_yy"):
        gptkit.pipeline("translation_en", model=model, tokenizer=chars)
    with pytest.raises(GptkitError, match="unknown pipeline task"):
        gptkit.pipeline("fill-mask", model=model, tokenizer=chars)


def test_question_answering_returns_a_located_answer_and_its_probability(
    chars: CharTokenizer,
) -> None:
    model = tiny_model(chars.vocab_size, block_size=128, seed=4)
    qa = gptkit.pipeline("question-answering", model=model, tokenizer=chars)
    context = "the cat sat on the mat"
    out = qa(question="where?", context=context, max_new_tokens=4)
    assert set(out) == {"score", "start", "end", "answer"}
    answer = out["answer"]
    prompt = f"{context}\n\nQuestion: where?\nAnswer:"
    assert (
        answer
        == gptkit.generate(model, chars, prompt, max_new_tokens=4, temperature=0, stop="\n").strip()
    )
    if answer:
        ((ll, _),) = loglikelihoods(model, chars, [(prompt, " " + answer)], progress=False)
        assert out["score"] == pytest.approx(math.exp(ll))
    found = context.find(answer) if answer else -1
    span = (found, found + len(answer)) if found >= 0 else (-1, -1)
    assert (out["start"], out["end"]) == span
    both = qa([{"question": "where?", "context": context}] * 2, max_new_tokens=4)
    assert both == [out, out]
    with pytest.raises(GptkitError, match="needs 'question' and 'context'"):
        qa("where?")
