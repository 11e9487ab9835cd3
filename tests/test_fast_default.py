"""Fast by default: a quantized GGUF loads quantized (its type mapped to ours, said on
stderr, overridable), ``compile="auto"`` compiles once it pays (a ski rental on measured
eager steps), and the defaults decode the same tokens as the explicit paths they pick.
"""

from __future__ import annotations

import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import run_ids, tiny_model
from gguf.quants import quantize as gguf_quantize
from reference.test_gguf import _rewrite

import gptkit
from gptkit.checkpoint.gguf import KEPT_AS, read_gguf, save_gguf
from gptkit.cli import main
from gptkit.config import SampleConfig
from gptkit.generate import compiled, generate
from gptkit.generate.compiled import AutoCompile, compile_cost, compile_pays, note_compiled
from gptkit.model.quant import PACKS_BF16, quantization
from gptkit.serve.engine import Engine
from gptkit.tokenizer import BPETokenizer

Q = gguf.GGMLQuantizationType
#: a Llama-style model whose every matrix has rows of whole 32-value blocks
LLAMA = dict(
    norm="rmsnorm", pos_emb="rope", mlp="swiglu", n_embd=64, n_head=4, n_kv_head=2,
    mlp_hidden=128, bias=False, block_size=64,
)  # fmt: skip
HINT = "(quantize=None / --quantize none for fp32)"
GREEDY = SampleConfig(temperature=0.0, max_new_tokens=12, stop_at_eos=False)


def _write(tmp_path: Path, tok: BPETokenizer, qtype: Q) -> Path:
    """A tiny GGUF whose matrices are stored as ``qtype`` (norms stay F32)."""
    src = save_gguf(tiny_model(tok.vocab_size, **LLAMA), tok, tmp_path / "f32.gguf")
    if qtype == Q.F32:
        return src

    def stored(name: str, values: np.ndarray) -> tuple:
        if values.ndim == 1:
            return values, None
        if qtype == Q.F16:
            return values.astype(np.float16), None
        return gguf_quantize(values, qtype), qtype

    return _rewrite(src, tmp_path / f"m.{qtype.name}.gguf", stored)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer: BPETokenizer) -> dict:
    root = tmp_path_factory.mktemp("fast")
    return {q.name: _write(root, bpe_tokenizer, q) for q in (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1)}


# -- the loader's default ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "mode"),
    [("Q4_0", "int4"), ("Q4_1", "int4"), ("Q8_0", "int8"), ("F32", None),
     ("F16", "bf16" if PACKS_BF16 else None)],
)  # fmt: skip
def test_a_gguf_stays_as_quantized_as_it_is_stored(
    files: dict, stored: str, mode: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert read_gguf(files[stored]).weight_type == stored
    model, tok = gptkit.load(files[stored])
    config = quantization(model)
    assert (config.mode if config else None) == mode and tok is not None
    err = capsys.readouterr().err
    if mode in ("int4", "int8", "bf16"):
        assert f"{files[stored].name}: {stored} weights kept as {mode} {HINT}" in err
        assert err.count("\n") == 1  # one line
    elif stored == "F32":
        assert err == ""


def test_every_loadable_type_has_a_mode() -> None:
    from gptkit.checkpoint.gguf import LOADABLE

    assert {q.name for q in LOADABLE} == set(KEPT_AS)
    assert KEPT_AS["Q4_K"] == "int4" and KEPT_AS["Q6_K"] == "int8" and KEPT_AS["BF16"] == "bf16"


def test_the_overrides(files: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = files["Q4_1"]
    for kwargs in ({"quantize": None}, {"quantize": "none"}, {"dtype": "float32"}):
        model, _ = gptkit.load(path, **kwargs)
        assert quantization(model) is None, kwargs
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert quantization(gptkit.load(path, quantize="int8")[0]).mode == "int8"  # type: ignore[union-attr]
    assert HINT not in capsys.readouterr().err  # an explicit choice is not announced


def test_the_default_equals_quantize_int4_on_the_fp32_weights(files: dict) -> None:
    default, _ = gptkit.load(files["Q4_1"])
    explicit, _ = gptkit.load(files["Q4_1"], quantize="int4")
    assert quantization(default) == quantization(explicit)
    for a, b in zip(default.state_dict().values(), explicit.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_fine_tuning_from_a_quantized_gguf_trains_full_precision_weights(
    files: dict, tmp_path: Path
) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "hello", "completion": " world"}\n' * 8)
    gptkit.train(data, tmp_path / "run", objective="sft", init_from=str(files["Q4_1"]),
                 max_steps=2, batch_size=2, eval_every=0, progress=False)  # fmt: skip
    model, _ = gptkit.load(tmp_path / "run", quantize=None)
    assert quantization(model) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_cli_generate_says_and_overrides(files: dict, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", str(files["Q4_1"]), "--temperature", "0",
            "--max-new-tokens", "5", "hello"]  # fmt: skip
    assert main(argv) == 0
    assert f"Q4_1 weights kept as int4 {HINT}" in capsys.readouterr().err
    assert main([*argv, "--quantize", "none", "--no-compile"]) == 0
    assert "kept as" not in capsys.readouterr().err


# -- compile="auto" -----------------------------------------------------------------------------


def test_compile_pays_is_a_ski_rental() -> None:
    assert not compile_pays(None, 10**9, 1.0)  # no eager step timed yet: rent
    saving = 1 - 1 / compiled.SPEEDUP
    assert compile_pays(0.01, 1000, 10 * saving)  # 1000 steps of 10 ms save exactly the cost
    assert not compile_pays(0.01, 999, 10 * saving)
    assert compile_pays(0.01, 1, 0.0)


@pytest.fixture
def inductor_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty on-disk cache of inductor's, so that this test's markers stay its own."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    return tmp_path / "inductor"


def test_the_decision_on_its_inputs(inductor_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(64, **LLAMA)
    auto = AutoCompile(model)
    cold = compile_cost(model, 256)
    assert cold == compiled.COMPILE_S_PER_LAYER["cold"] * model.config.n_layer
    assert not auto.decide(1, 10**6, 256)  # never timed: eager first
    auto.use.steps, auto.use.seconds = 100, 1.0  # 10 ms a step
    saving = 0.01 * (1 - 1 / compiled.SPEEDUP)
    assert auto.decide(1, int(cold / saving), 256)  # the steps done and to come pay cold
    assert not auto.decide(1, int(cold / saving) - 150, 256)
    assert not auto.decide(2, 10**6, 256)  # batches stay eager
    note_compiled(model, 256)  # this process compiled it: free; another process: warm
    assert compile_cost(model, 256) == 0 and auto.decide(1, 1, 256)
    other = tiny_model(64, seed=1, **LLAMA)  # same shapes: inductor's cache holds its graph
    assert compile_cost(other, 256) == compiled.COMPILE_S_PER_LAYER["warm"] * 2
    assert compile_cost(other, 384) == cold


@pytest.mark.parametrize("int4_gemv", [True, False])
def test_int4_models_stay_eager_where_int4_gemv_serves_them(
    inductor_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    bpe_tokenizer: BPETokenizer,
    int4_gemv: bool,
) -> None:
    """On AVX2 CPUs without AVX-512 the eager step of an int4 model beats its compiled one:
    auto never compiles it, nor does the server; fp32 models and other CPUs as before."""
    from gptkit.model.quant import quantize

    monkeypatch.setattr(compiled, "INT4_GEMV", int4_gemv)
    model = tiny_model(bpe_tokenizer.vocab_size, **LLAMA)
    assert compiled.compiled_is_faster(model)
    quantize(model, "int4", lm_head="none")
    assert compiled.compiled_is_faster(model) is not int4_gemv
    auto = AutoCompile(model)
    note_compiled(model, 256)  # even where compiling would cost nothing
    assert auto.decide(1, 10**6, 256) is not int4_gemv
    engine = Engine(model, bpe_tokenizer, compile=True)
    assert engine.compile is not int4_gemv


def test_auto_compiles_once_it_pays_with_the_same_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bpe_tokenizer: BPETokenizer
) -> None:
    model = tiny_model(bpe_tokenizer.vocab_size, **LLAMA)
    marker = compiled._marker  # markers in tmp_path; inductor keeps its own (warm) cache
    monkeypatch.setattr(compiled, "_marker", lambda m, n: tmp_path / marker(m, n).name)
    prompt = [[5, 6, 7, 8]]
    eager = run_ids(model, prompt, GREEDY)
    monkeypatch.setattr(compiled, "COMPILE_S_PER_LAYER", {"cold": 1e-9, "warm": 1e-9})
    monkeypatch.setattr(compiled, "CHECK_EVERY", 4)
    with torch._dynamo.config.patch(recompile_limit=16):
        from gptkit.generate import generate_ids

        decoder = generate_ids(model, prompt, GREEDY, compile="auto")
        assert not decoder.compile  # the first call: no eager step of this model was timed
        tokens = [events[0].token for events in decoder]
        assert tokens == eager[0] and decoder.compile  # switched after 4 timed steps
        assert compile_cost(model, decoder.cache.max_len) == 0  # type: ignore[union-attr]
        again = generate_ids(model, prompt, GREEDY, compile="auto")
        assert [e[0].token for e in again] == eager[0] and again.compile
        text = generate(model, bpe_tokenizer, "def add", max_new_tokens=8, temperature=0)
        assert text == generate(
            model, bpe_tokenizer, "def add", max_new_tokens=8, temperature=0, compile=False
        )


def test_default_generate_equals_the_explicit_path(files: dict) -> None:
    default, tok = gptkit.load(files["Q4_1"])
    explicit, _ = gptkit.load(files["Q4_1"], quantize="int4")
    assert tok is not None
    kw = dict(max_new_tokens=10, temperature=0.0)
    assert generate(default, tok, "hello", **kw) == generate(
        explicit, tok, "hello", compile=False, **kw
    )


# -- the server ---------------------------------------------------------------------------------


def test_the_engine_compiles_a_lone_row_in_the_background(bpe_tokenizer: BPETokenizer) -> None:
    model = tiny_model(bpe_tokenizer.vocab_size, **LLAMA)
    params = SampleConfig(temperature=0.0, max_new_tokens=8, stop_at_eos=False)
    ids = bpe_tokenizer.encode("def add(a, b):")
    with Engine(model, bpe_tokenizer) as plain:
        want, _ = plain.generate(ids, params)
    with (
        torch._dynamo.config.patch(recompile_limit=16),
        Engine(model, bpe_tokenizer, compile=True) as engine,
    ):
        first, _ = engine.generate(ids, params)  # eager, while the graph compiles
        threads = [t for t in engine._graphs.values() if isinstance(t, threading.Thread)]
        for t in threads:
            t.join()
        assert None in engine._graphs.values()  # a graph is ready
        second, _ = engine.generate(ids, params)  # compiled
    assert first == second == want
