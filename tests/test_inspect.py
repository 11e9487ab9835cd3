"""Looking inside the model (gptkit.inspect): attention weights against softmax(QKᵀ/√d +
mask) computed by hand from each layer's weights (GQA, RoPE and GPT-3's banded layers
included), the logit lens against the logits, token losses against ``gptkit eval``, and the
files ``gptkit inspect`` writes."""

from __future__ import annotations

import base64
import html
import json
import math
import re
import struct
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, REPO, running_server, tiny_model

from gptkit.checkpoint import save_checkpoint
from gptkit.cli import main
from gptkit.errors import GptkitError
from gptkit.eval import perplexity
from gptkit.inspect import attention, draw, entropy, logit_lens, rollout, token_losses
from gptkit.inspect.run import FILES, inspect_cmd
from gptkit.model import GPT
from gptkit.model.quant import quantize
from gptkit.tokenizer import BPETokenizer

SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), -1)


def by_hand(model: GPT, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's softmax(QKᵀ/√hs + mask), (nh, T, T), from the layer's weights and the
    input its block receives (caught by a hook), with RoPE and GQA written out here."""
    inputs: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0][0])) for b in model.blocks]
    with torch.no_grad():
        model(ids[None])
    for h in hooks:
        h.remove()
    c = model.config
    nh, nkv, hs, T = c.n_head, c.kv_heads, c.head_size, ids.numel()
    out = []
    for i, (block, x) in enumerate(zip(model.blocks, inputs, strict=True)):
        h = block.norm_1(x) if c.norm_position == "pre" else x
        w, b = block.attn.qkv.weight, block.attn.qkv.bias
        qkv = h @ w.T + (b if b is not None else 0)
        q = qkv[:, : nh * hs].reshape(T, nh, hs).transpose(0, 1)
        k = qkv[:, nh * hs : (nh + nkv) * hs].reshape(T, nkv, hs).transpose(0, 1)
        if c.pos_emb == "rope":  # rotate (i, i + hs/2) pairs by angle pos * theta^(-2i/hs)
            angle = torch.arange(T)[:, None] * c.rope_theta ** (-torch.arange(0, hs, 2) / hs)
            cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k[[j * nkv // nh for j in range(nh)]]  # query head j reads key head j // (nh/nkv)
        scores = q @ k.transpose(1, 2) / math.sqrt(hs)
        t, s = torch.arange(T)[:, None], torch.arange(T)[None]
        allowed = s <= t
        if c.is_local_layer(i):
            allowed &= t - s < c.attention_window
        out.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1))
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_attention_equals_softmax_by_hand(name: str) -> None:
    overrides = FAMILIES[name] | (dict(n_head=4, n_kv_head=2) if name == "llama" else {})
    model = tiny_model(**overrides)
    ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(1))
    weights = attention(model, ids)
    c = model.config
    assert weights.shape == (c.n_layer, c.n_head, 12, 12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(c.n_layer, c.n_head, 12))
    for layer, expected in zip(weights, by_hand(model, ids), strict=True):
        torch.testing.assert_close(layer, expected, rtol=1e-5, atol=1e-6)
    if name == "gpt3":  # the banded layer sees only the last 5 positions
        local = [i for i in range(c.n_layer) if c.is_local_layer(i)]
        assert local and (weights[local[0], :, 11, :7] == 0).all()
        assert (weights[local[0], :, 11, 7:] > 0).all()


def test_model_is_untouched_and_the_hooks_do_not_leak() -> None:
    model = tiny_model(**FAMILIES["llama"])
    calls: list[int] = []
    model.blocks[0].attn.register_forward_pre_hook(lambda m, a: calls.append(1))
    attention(model, [1, 2, 3])
    assert calls == [1]  # the model's own hooks still run in the inspected forward
    hooks = [(m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    assert sum(len(f) + len(p) for f, p in hooks) == 1  # and no hook of inspection stayed


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_quantized_model_and_rollout(mode: str) -> None:
    model = quantize(tiny_model(**FAMILIES["llama"]), mode)
    ids = torch.arange(10)
    weights = attention(model, ids)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    lens = logit_lens(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(lens[-1], model(ids[None])[0].float())
    roll = rollout(weights)
    torch.testing.assert_close(roll.sum(-1), torch.ones(10))
    assert (roll.triu(1) == 0).all()  # causal all the way through


@pytest.mark.parametrize("name", ["gpt2", "gpt1", "llama"])
def test_logit_lens_last_layer_is_the_logits(name: str) -> None:
    model = tiny_model(**FAMILIES[name])
    ids = torch.tensor([5, 9, 2, 40, 7])
    lens = logit_lens(model, ids)
    assert lens.shape == (model.config.n_layer, 5, 64)
    with torch.no_grad():
        logits = model(ids[None])[0]
    torch.testing.assert_close(lens[-1], logits)
    assert not torch.equal(lens[0], lens[-1])  # an earlier layer guesses otherwise


def test_token_losses_average_to_eval_perplexity(
    bpe_tokenizer: BPETokenizer, tmp_path: Path
) -> None:
    model = tiny_model(bpe_tokenizer.vocab_size, block_size=64)
    text = "def add(a, b):\n    return a + b\n"
    path = tmp_path / "t.txt"
    path.write_text(text)
    scores = perplexity(model, bpe_tokenizer, str(path), progress=False)
    start = bpe_tokenizer.eos_id
    ids = [start, *bpe_tokenizer.encode(text, allow_special=False)]
    losses = token_losses(model, ids)
    assert losses.shape == (len(ids) - 1,) and scores["tokens"] == len(ids) - 1
    assert losses.mean().item() == pytest.approx(scores["loss"], rel=1e-5)


def test_entropy_of_uniform_and_certain_rows() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf, -math.inf]])
    torch.testing.assert_close(entropy(logits), torch.tensor([math.log(4), 0.0]))


def test_bad_ids_are_refused() -> None:
    model = tiny_model()
    with pytest.raises(GptkitError, match="one sequence"):
        attention(model, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(GptkitError, match="vocabulary"):
        attention(model, [1, 99])
    with pytest.raises(GptkitError, match="context"):
        attention(model, list(range(40)))
    with pytest.raises(GptkitError, match="two tokens"):
        token_losses(model, [3])


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_inspect_command_writes_every_file(
    bpe_tokenizer: BPETokenizer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = tiny_model(bpe_tokenizer.vocab_size, block_size=64, **FAMILIES["gpt3"])
    save_checkpoint(tmp_path / "ckpt", model, bpe_tokenizer)
    text = 'All: <b>Speak</b> & "speak" $x$.'  # HTML and TeX characters stay text
    out = tmp_path / "out"
    argv = ["inspect", "--model", str(tmp_path / "ckpt"), text, "--out", str(out)]
    assert main([*argv, "--layer", "0", "--head", "1"]) == 0
    assert "perplexity" in capsys.readouterr().out
    report = json.loads((out / "inspect.json").read_text())
    ids = [bpe_tokenizer.eos_id, *bpe_tokenizer.encode(text, allow_special=False)]
    T, L, nh = len(ids), model.config.n_layer, model.config.n_head
    assert report["ids"] == ids and len(report["tokens"]) == T
    assert report["attention"] == {"layers": L, "heads": nh, "layer": 0, "head": 1}
    assert len(report["logit_lens"]["top_guess"]) == L
    assert all(len(row) == T for row in report["logit_lens"]["top_guess"])
    (tmp_path / "t.txt").write_text(text)
    scores = perplexity(model, bpe_tokenizer, str(tmp_path / "t.txt"), progress=False)
    assert report["loss"] == pytest.approx(scores["loss"], rel=1e-5)
    assert report["loss_nats"][0] is None and len(report["loss_nats"]) == T
    sizes = {
        "attention.png": draw.attention_figure_size(L, nh),
        "surprise.png": draw.surprise_figure_size(T),
        "logit_lens.png": draw.lens_figure_size(L, T),
        "entropy.png": draw.entropy_figure_size(T),
    }
    for name, (w, h) in sizes.items():
        assert png_size(out / name) == (round(w * draw.DPI), round(h * draw.DPI)), name
    page = (out / "surprise.html").read_text()
    assert "<b>" not in page  # the text's markup is escaped, never rendered
    spans = re.findall(r'<span class="t[^"]*"[^>]*>(.*?)</span>', page, re.S)
    assert [html.unescape(s) for s in spans] == report["tokens"]  # every token, in order


def test_inspect_command_refuses_a_bad_head(bpe_tokenizer: BPETokenizer, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt", tiny_model(bpe_tokenizer.vocab_size), bpe_tokenizer)
    with pytest.raises(GptkitError, match="--head must be between 0 and 1"):
        inspect_cmd(["hello"], str(tmp_path / "ckpt"), str(tmp_path / "o"), head=2)


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"{SMOLLM2} is missing (make models)")
def test_smollm2_knows_the_capital_of_france(tmp_path: Path) -> None:
    """The quantized GGUF through the same path: int4 layers, GQA, RoPE."""
    summary = inspect_cmd(["The capital of France is"], str(SMOLLM2), str(tmp_path))
    assert summary["next_token"] == " Paris"
    assert summary["logit_lens"]["top_guess"][-1][-1] == " Paris"
    assert all((tmp_path / name).is_file() for name in FILES)


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_attention_route_draws_the_answer(chatml_tokenizer: BPETokenizer) -> None:
    model = tiny_model(chatml_tokenizer.vocab_size, block_size=128, **FAMILIES["llama"])
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
    ]
    with running_server(model, chatml_tokenizer) as s:
        status, found = post_json(s.url + "/v1/attention", {"messages": messages})
        assert status == 200, found
        answer = len(chatml_tokenizer.encode("hi there", allow_special=False))
        assert found["answer_tokens"] == answer
        assert found["context_tokens"] == len(found["tokens"]) > answer
        png = base64.b64decode(found["image"].removeprefix("data:image/png;base64,"))
        w, h = draw.answer_figure_size(answer)
        assert struct.unpack(">II", png[16:24]) == (w * draw.DPI, h * draw.DPI)
        status, error = post_json(s.url + "/v1/attention", {"messages": messages[:1]})
        assert status == 400 and "assistant's answer" in error["error"]["message"]
