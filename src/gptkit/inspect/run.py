"""``gptkit inspect``: one text through a model, and every picture of it in one directory.

The text gets the start token that ``gptkit eval --task text`` gives it (the tokenizer's bos
where the model expects one, else its end-of-text token), so that every token of the text
has a loss and their mean is the loss ``gptkit eval`` reports for the same text. Files
written (the public contract): ``attention.png``, ``surprise.html``, ``surprise.png``,
``logit_lens.png``, ``entropy.png`` and ``inspect.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch

from gptkit.errors import GptkitError
from gptkit.eval.run import start_id
from gptkit.files import atomic_write_json
from gptkit.inspect import draw
from gptkit.inspect.probe import _run, entropy, lens, losses_of, ranks, rollout
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer

FILES = ("attention.png", "surprise.html", "surprise.png", "logit_lens.png", "entropy.png")


def text_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text``'s ids after the start token ``gptkit eval`` scores text from."""
    start = start_id(tokenizer)
    return ([start] if start is not None else []) + tokenizer.encode(text, allow_special=False)


def _lens_top(model: GPT, stream: torch.Tensor, answer: int) -> dict[str, torch.Tensor]:
    """Each layer's top guess and its probability at every position (L, T), and the
    probability of ``answer`` after the last token (L,), one layer at a time (the whole
    lens of a long text would not fit in memory)."""
    top, top_p, answer_p = [], [], []
    for layer in stream:  # (T, C)
        probs = lens(model, layer[None])[0].softmax(-1)  # (T, V)
        p, i = probs.max(-1)
        top.append(i)
        top_p.append(p)
        answer_p.append(probs[-1, answer])
    return {"top": torch.stack(top), "p": torch.stack(top_p), "answer_p": torch.stack(answer_p)}


def inspect_ids(model: GPT, tokenizer: Tokenizer, ids: list[int]) -> dict[str, Any]:
    """Everything ``gptkit inspect`` draws, for ``ids``: the attention weights and rollout,
    per-token losses, ranks and entropy, and the logit lens's top guesses."""
    if len(ids) < 2:
        raise GptkitError("the text has no token to score; give a longer text")
    run = _run(model, ids, attention=True)
    x = torch.tensor(ids, device=run["logits"].device)
    logits = run["logits"]
    answer = int(logits[-1].argmax())
    return {
        "ids": ids,
        "tokens": [tokenizer.decode([i]) for i in ids],
        "attention": run["attention"],
        "rollout": rollout(run["attention"]),
        "losses": losses_of(logits, x),
        "ranks": ranks(logits, x),
        "entropy": entropy(logits),
        "answer": answer,
        "lens": _lens_top(model, run["stream"], answer),
    }


def _summary(found: dict[str, Any], tokenizer: Tokenizer, model: str, layer: int) -> dict:
    """inspect.json: tokens, per-token loss, rank and entropy, per-layer top guesses."""
    losses = found["losses"].tolist()
    loss = sum(losses) / len(losses)
    guesses = [[tokenizer.decode([int(i)]) for i in row] for row in found["lens"]["top"]]
    return {
        "model": model,
        "ids": found["ids"],
        "tokens": found["tokens"],
        "loss_nats": [None, *losses],  # token 0 is not predicted
        "loss_bits": [None, *(v / math.log(2) for v in losses)],
        "rank": [None, *found["ranks"].tolist()],
        "entropy_bits": (found["entropy"] / math.log(2)).tolist(),  # after each token
        "loss": loss,
        "perplexity": math.exp(loss),
        "next_token": tokenizer.decode([found["answer"]]),
        "logit_lens": {
            "top_guess": guesses,  # [layer][position]
            "top_prob": found["lens"]["p"].tolist(),
            "next_token_prob": found["lens"]["answer_p"].tolist(),  # [layer], last position
        },
        "attention": {
            "layers": found["attention"].shape[0],
            "heads": found["attention"].shape[1],
            "layer": layer,
        },
    }


def write_inspection(
    found: dict[str, Any],
    tokenizer: Tokenizer,
    out: Path,
    model: str,
    layer: int | None = None,
    head: int | None = None,
) -> dict[str, Any]:
    """Draw ``found`` (from :func:`inspect_ids`) into ``out``; returns inspect.json's data."""
    L, nh = found["attention"].shape[:2]
    layer = L - 1 if layer is None else layer
    if not -L <= layer < L:
        raise GptkitError(f"--layer must be between 0 and {L - 1} (the model has {L} layers)")
    if head is not None and not 0 <= head < nh:
        raise GptkitError(f"--head must be between 0 and {nh - 1} (each layer has {nh} heads)")
    layer %= L
    out.mkdir(parents=True, exist_ok=True)
    labels = [draw.token_label(t) for t in found["tokens"]]
    summary = _summary(found, tokenizer, model, layer)
    summary["attention"]["head"] = head
    weights = found["attention"].float().cpu().numpy()
    draw.draw_attention(out / "attention.png", weights, found["rollout"].cpu().numpy(),
                        labels, layer, head)  # fmt: skip
    losses = found["losses"].cpu().numpy()
    draw.draw_surprise(out / "surprise.png", labels, losses, summary["perplexity"])
    draw.surprise_html(out / "surprise.html", found["tokens"], losses.tolist(),
                       found["ranks"].tolist(), summary["perplexity"], model)  # fmt: skip
    lens = summary["logit_lens"]
    draw.draw_logit_lens(
        out / "logit_lens.png",
        labels,
        [[draw.token_label(g) for g in row] for row in lens["top_guess"]],
        found["lens"]["p"].cpu().numpy(),
        draw.token_label(summary["next_token"]),
        found["lens"]["answer_p"].cpu().numpy(),
    )
    draw.draw_entropy(out / "entropy.png", labels, summary["entropy_bits"])
    atomic_write_json(out / "inspect.json", summary)
    return summary


def inspect_cmd(
    text: list[str],
    model: str,
    out: str = "inspect",
    layer: int | None = None,
    head: int | None = None,
    device: str = "cpu",
    quantize: Literal["auto", "none", "bf16", "int8", "int4"] = "auto",
) -> dict[str, Any]:
    """Look inside a model on a text: attention maps, per-token surprise, the logit lens and
    next-token entropy, as images, an HTML page and inspect.json in --out.

    Args:
        text: the text (several arguments are joined by spaces; "-" reads standard input).
        model: any source gptkit loads (checkpoint, run directory, HF directory, .gguf).
        out: the directory to write attention.png, surprise.html, surprise.png,
            logit_lens.png, entropy.png and inspect.json into.
        layer: the layer whose attention is drawn at full size (default the last;
            negative counts from the end).
        head: that layer's head drawn at full size (default the mean of its heads).
        device: cpu, cuda, mps.
        quantize: quantize the weights on load (see `gptkit quantize`); auto keeps a
            quantized GGUF quantized, none loads it as fp32.
    """
    import sys

    from gptkit.checkpoint import load

    joined = sys.stdin.read() if text == ["-"] else " ".join(text)
    if not joined.strip():
        raise GptkitError("no text to inspect; pass it as an argument, or '-' for stdin")
    net, tok = load(model, device=device, quantize=quantize)
    if tok is None:
        raise GptkitError(f"{model} has no tokenizer; inspect needs one to read the text")
    ids = text_ids(tok, joined)
    summary = write_inspection(inspect_ids(net, tok, ids), tok, Path(out), model, layer, head)
    print(
        f"{len(ids)} tokens · perplexity {summary['perplexity']:.3f} · next token "
        f"{summary['next_token']!r} · wrote {', '.join((*FILES, 'inspect.json'))} to {out}"
    )
    return summary
