"""Compiled decoding (``compile=True``): the torch.compile'd static-shape step gives the
tokens of eager decoding, token for token — fp32, bf16 and int4, across a window slide, when a
batch shrinks to one row, and through the text API. Each graph compiles once per process
(a few seconds for these tiny models), so the tests share models and cache lengths."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import FAMILIES, run_ids, tiny_model

from gptkit.compress import quantize
from gptkit.config import SampleConfig
from gptkit.generate import generate, generate_ids
from gptkit.generate.compiled import compiled_cache_len, compiled_prefill
from gptkit.model import KVCache
from gptkit.tokenizer import CharTokenizer

generator = importlib.import_module("gptkit.generate.compiled")
GREEDY = SampleConfig(temperature=0.0, max_new_tokens=20, stop_at_eos=False)


@pytest.fixture(scope="module", autouse=True)
def room_to_compile():
    """Graphs for four models and several cache lengths: more than torch's default limit of
    8 per function (past it, decoding runs eagerly, which these tests would not see)."""
    with torch._dynamo.config.patch(recompile_limit=16):
        yield


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {
        "gpt2": tiny_model(),
        "llama": tiny_model(**FAMILIES["llama"]),
        "llama-int4": quantize(tiny_model(**FAMILIES["llama"]), "int4", lm_head="int4"),
        "llama-bf16": quantize(tiny_model(**FAMILIES["llama"]), "bf16"),
    }


def test_cache_lengths_are_few() -> None:
    lengths = [compiled_cache_len(n) for n in (1, 200, 256, 257, 384, 385, 600, 1000, 1025)]
    assert lengths == [256, 256, 256, 384, 384, 512, 768, 1024, 1536]
    assert len({compiled_cache_len(n) for n in range(1, 8193)}) == 11  # 256 ... 8192


@pytest.mark.parametrize("name", ["llama", "llama-int4", "llama-bf16"])
def test_compiled_prefill_equals_eager_at_every_length(models, name: str) -> None:
    model = models[name]
    for n in (5, 9, 17):  # one graph with the length symbolic serves them all
        x = torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n))
        caches = [KVCache(model.config, 1, 32) for _ in range(2)]
        with torch.inference_mode():
            h = compiled_prefill(model, x, caches[0])
            ref = model.hidden(x, caches[1])[:, -1]
        assert h is not None
        torch.testing.assert_close(h, ref, rtol=1e-4, atol=1e-4)
        for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-int4", "llama-bf16"])
def test_compiled_equals_eager(models, name: str) -> None:
    model = models[name]
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    for p in prompts:
        assert run_ids(model, [p], GREEDY, compile=True) == run_ids(model, [p], GREEDY)
    decoder = generate_ids(model, [prompts[0]], GREEDY, compile=True)
    list(decoder)
    assert decoder.compile and decoder._compiled_shape == (1, 32)  # it ran compiled
    # after the first step, the steps called the compiled graph directly (no dynamo)
    assert decoder.cache in generator._bound


def test_direct_steps_see_new_weights(models) -> None:
    """Steps that skip dynamo read the weights the graph was bound to; a new decode binds
    again, so weights swapped between decodes (not in place) are seen."""
    model = copy.deepcopy(models["llama"])
    prompt = [[1, 2, 3, 4, 5]]
    before = run_ids(model, prompt, GREEDY, compile=True)
    with torch.no_grad():
        torch.manual_seed(0)
        for block in model.blocks:  # new tensors
            block.mlp.proj.weight = torch.nn.Parameter(torch.randn_like(block.mlp.proj.weight))
        model.blocks[0].mlp.fc.weight.mul_(3.0)  # in place: the bound tensor itself changes
    after = run_ids(model, prompt, GREEDY, compile=True)
    assert after == run_ids(model, prompt, GREEDY) and after != before


def test_compiled_equals_eager_across_a_slide(models) -> None:
    # block_size 32: 10 prompt tokens + 40 new ones slide the window twice.
    cfg = SampleConfig(temperature=0.0, max_new_tokens=40, stop_at_eos=False)
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
    assert run_ids(models["llama"], prompt, cfg, compile=True) == run_ids(
        models["llama"], prompt, cfg
    )


def test_a_batch_decodes_eagerly_then_compiled_once_one_row_is_left(models) -> None:
    model = models["gpt2"]
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    eager = run_ids(model, prompts, GREEDY)
    eos = eager[0][5]  # row 0 ends early on this token; row 1 goes on alone
    cfg = SampleConfig(temperature=0.0, max_new_tokens=20)
    assert run_ids(model, prompts, cfg, eos, compile=True) == run_ids(model, prompts, cfg, eos)


def test_generate_text_with_compile(models) -> None:
    tok = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz .,\n" * 3])
    model = tiny_model(tok.vocab_size)
    kw = dict(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    assert generate(model, tok, "hello", compile=True, **kw) == generate(model, tok, "hello", **kw)
