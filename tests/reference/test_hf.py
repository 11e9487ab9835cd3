"""Hugging Face checkpoints against transformers: GPT-2, OpenAI GPT and Llama.

Each case builds a tiny random transformers model, saves it the way transformers does, loads
it through gptkit's converter, and compares logits (fp32) and greedy ids; then exports it
back and has transformers reproduce the logits. No downloads: every file is made here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, tiny_model

from gptkit.checkpoint import hf
from gptkit.checkpoint.hf import config_from_hf, config_to_hf, is_hf_dir, load_hf_dir, save_hf
from gptkit.config import ModelConfig, SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate import generate_ids
from gptkit.tokenizer import EOT, BPETokenizer, CharTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 128  # vocabulary of the tiny models
LLAMA_BASE = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
)
#: name -> (transformers config class, its tiny config)
CASES = {
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=V,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=None,
            eos_token_id=None,
        ),
    ),
    "openai-gpt": (
        "OpenAIGPTConfig",
        dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    ),
    "llama-gqa-untied": (
        "LlamaConfig",
        LLAMA_BASE | dict(num_key_value_heads=2, rope_theta=5000.0, tie_word_embeddings=False),
    ),
    "llama-tied-bias": (
        "LlamaConfig",
        LLAMA_BASE | dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ),
}


def hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A transformers model of case ``name`` with every parameter random (biases and norm
    gains included, so a weight mapped to the wrong place shows in the logits)."""
    cls_name, kwargs = CASES[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_gain = p.dim() == 1 and ("norm" in pname or ".ln_" in pname)
            p.copy_(1.0 + 0.1 * noise if is_gain else 0.15 * noise)
    return model.eval()


def save_as(model: torch.nn.Module, directory: Path, how: str) -> None:
    """Save the way transformers does: one safetensors file, shards, or a pickled .bin."""
    if how == "bin":  # transformers 5 no longer writes these; old checkpoints are like this
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    elif how == "sharded":
        model.save_pretrained(directory, max_shard_size="20KB")
        assert (directory / "model.safetensors.index.json").is_file()
    else:
        model.save_pretrained(directory)


def ours_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    cfg = SampleConfig(temperature=0.0, max_new_tokens=n, stop_at_eos=False)
    for events in generate_ids(model, prompts, cfg):
        for ev in events:
            out[ev.row].append(ev.token)
    return out


def hf_greedy(model, prompts: torch.Tensor, n: int) -> list[list[int]]:
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, prompts.shape[1] :].tolist()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def random_ids(shape: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "name, how",
    [
        ("gpt2", "safetensors"),
        ("gpt2", "bin"),
        ("openai-gpt", "safetensors"),
        ("llama-gqa-untied", "sharded"),
        ("llama-tied-bias", "safetensors"),
    ],
)
def test_hf_parity_and_round_trip(name: str, how: str, tmp_path: Path) -> None:
    theirs = hf_model(name)
    save_as(theirs, tmp_path / "hf", how)
    assert is_hf_dir(tmp_path / "hf")
    with pytest.warns(UserWarning, match="no tokenizer"):
        ours, tok = load_hf_dir(tmp_path / "hf")
    assert tok is None

    ids = random_ids((3, 24))
    expected = hf_logits(theirs, ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), expected)

    prompts = random_ids((2, 5), seed=2)
    assert ours_greedy(ours, prompts.tolist(), 12) == hf_greedy(theirs, prompts, 12)

    save_hf(ours, None, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again) is type(theirs)
    torch.testing.assert_close(hf_logits(again, ids), expected)
    with pytest.warns(UserWarning, match="no tokenizer"):
        ours_again, _ = load_hf_dir(tmp_path / "out")
    assert ours_again.config == ours.config
    with torch.no_grad():
        torch.testing.assert_close(ours_again(ids), ours(ids), rtol=0, atol=0)


def test_base_model_without_prefix_and_tied_head_stored_twice(tmp_path: Path) -> None:
    """Hub GPT-2 files store GPT2Model's names (no ``transformer.``), and some checkpoints
    store a tied head as well; both load."""
    theirs = hf_model("gpt2")
    (tmp_path / "hf").mkdir()
    theirs.config.save_pretrained(tmp_path / "hf")
    state = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items()}
    assert "lm_head.weight" in state
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.warns(UserWarning):
        ours, _ = load_hf_dir(tmp_path / "hf")
    ids = random_ids((2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_logits(theirs, ids))


# -- native models out -------------------------------------------------------------------------

EXPORTABLE = {
    "gpt2": FAMILIES["gpt2"],
    "gpt2-no-bias-untied": dict(bias=False, tie_embeddings=False),  # zero biases exported
    "gpt1": FAMILIES["gpt1"] | dict(mlp="gelu_tanh"),
    "gpt1-untied": FAMILIES["gpt1"] | dict(mlp="gelu_tanh", tie_embeddings=False),
    "llama": FAMILIES["llama"],
    "llama-tied-bias": FAMILIES["llama"] | dict(tie_embeddings=True, bias=True, n_kv_head=None),
}


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_native_model_exports(name: str, tmp_path: Path) -> None:
    model = tiny_model(V, **EXPORTABLE[name])
    with torch.no_grad():  # non-trivial norm gains and biases
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    save_hf(model, None, tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_ids((2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(theirs, ids), model(ids))


@pytest.mark.parametrize(
    "overrides, why",
    [
        (FAMILIES["sinusoidal"], "pos_emb='sinusoidal'"),
        (FAMILIES["gpt1"], r"mlp='gelu' \(needs one of \['gelu_tanh'\]\)"),
        (dict(norm="rmsnorm"), "norm='rmsnorm'"),
        (FAMILIES["gpt3"], "attention_pattern='alternating'"),
    ],
)
def test_models_without_a_twin_are_refused(overrides: dict, why: str, tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match=why):
        save_hf(tiny_model(V, **overrides), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_model_switch_is_mapped() -> None:
    """A ModelConfig field the tables do not know would export silently wrong."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for fam in hf.FAMILIES:
        known = set(fam.fixed) | {ours for ours, _ in fam.fields} | hf.HANDLED_APART
        assert fields <= known, f"{fam.architecture}: add {sorted(fields - known)} to hf.py"


def test_export_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(GptkitError, match="new or empty directory"):
        save_hf(tiny_model(V), None, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- tokenizers ----------------------------------------------------------------------------

STRINGS = [
    "def add(a, b):\n    return a + b",
    f"First Citizen:{EOT}Speak, speak.",
    f"{EOT}{EOT} café 中文 🎉  ",
]


def test_byte_level_tokenizer_round_trip(bpe_tokenizer: BPETokenizer, tmp_path: Path) -> None:
    model = tiny_model(bpe_tokenizer.vocab_size, init_std=0.3, **FAMILIES["llama"])
    save_hf(model, bpe_tokenizer, tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs.eos_token == EOT
    for s in STRINGS:
        ids = bpe_tokenizer.encode(s)
        assert theirs.encode(s, add_special_tokens=False) == ids
        assert theirs.decode(ids) == s
    again_model, again = load_hf_dir(tmp_path / "out")
    assert again is not None and again.hash == bpe_tokenizer.hash and again.eos_id is not None
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["eos_token_id"] == bpe_tokenizer.eos_id
    ids = torch.tensor([bpe_tokenizer.encode(STRINGS[0])])
    with torch.no_grad():
        torch.testing.assert_close(again_model(ids), model(ids), rtol=0, atol=0)

    # Equal greedy text: ours and transformers', each through its own tokenizer.
    hf_lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    prompt = "def add(a, b):"
    ours_ids = ours_greedy(model, [bpe_tokenizer.encode(prompt)], 16)[0]
    theirs_ids = hf_greedy(hf_lm, theirs(prompt, return_tensors="pt").input_ids, 16)[0]
    assert ours_ids == theirs_ids
    assert bpe_tokenizer.decode(ours_ids) == theirs.decode(theirs_ids)


def test_char_tokenizer_exports(char_tokenizer: CharTokenizer, tmp_path: Path) -> None:
    save_hf(tiny_model(char_tokenizer.vocab_size), char_tokenizer, tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for s in ["Speak, speak.\n\n", f"All:{EOT}def add(a, b):\n    return a"]:
        ids = char_tokenizer.encode(s)
        assert theirs.encode(s, add_special_tokens=False) == ids
        assert theirs.decode(ids) == s
    _, again = load_hf_dir(tmp_path / "out")
    assert again is not None and again.encode(STRINGS[0]) == char_tokenizer.encode(STRINGS[0])


def write_openai_gpt_files(directory: Path) -> None:
    """A tiny OpenAI GPT vocabulary: characters, their word-final ``</w>`` forms, a few merges."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    merges = [
        ("t", "h"), ("th", "e</w>"), ("l", "o"), ("lo", "w"), ("e", "r</w>"), ("low", "er</w>"),
        ("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o</w>"), ("a", "n"), ("an", "d</w>"),
        ("c", "a"), ("ca", "f"), ("caf", "e</w>"), ("i", "n"), ("in", "g</w>"),
    ]  # fmt: skip
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<unk>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (directory / "merges.txt").write_text("#version: 0.2\n" + lines)


GPT1_STRINGS = [
    "The lower, the better!",
    "HELLO there and Café",
    "Ünïcödé   naïve\n\tdone-looping",
    "price: 5€ <unk> 中文 don't",
]


def test_openai_gpt_tokenizer_matches_transformers(tmp_path: Path) -> None:
    write_openai_gpt_files(tmp_path)
    ours = load_tokenizer(tmp_path)
    theirs = transformers.OpenAIGPTTokenizer.from_pretrained(tmp_path)
    assert ours.eos_token is None and "<unk>" in ours.special_tokens
    for s in GPT1_STRINGS:
        ids = ours.encode(s)
        assert ids == theirs.encode(s, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ours.encode("The lower")) == "the lower"


def test_openai_gpt_directory_with_its_tokenizer(tmp_path: Path) -> None:
    theirs = hf_model("openai-gpt")
    theirs.save_pretrained(tmp_path / "hf")
    write_openai_gpt_files(tmp_path / "hf")
    model, tok = load_hf_dir(tmp_path / "hf")
    assert isinstance(tok, BPETokenizer)
    assert [tok.id_to_token(i) for i in tok.encode("The lower")] == ["the</w>", "lower</w>"]
    save_hf(model, tok, tmp_path / "out")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for s in GPT1_STRINGS:
        assert exported.encode(s, add_special_tokens=False) == tok.encode(s)


def test_gpt2_files_stay_byte_level(tmp_path: Path, bpe_tokenizer: BPETokenizer) -> None:
    data = json.loads(bpe_tokenizer._tok.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(data["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = load_tokenizer(tmp_path)
    assert tok.decode(tok.encode(STRINGS[2])) == STRINGS[2]


def test_bos_and_chat_template_survive_export(tmp_path: Path, bpe_tokenizer: BPETokenizer) -> None:
    """transformers 5 and Llama 3 declare "add bos" in tokenizer.json, not tokenizer_config;
    transformers 5 writes the chat template to chat_template.jinja."""
    from tokenizers import processors

    tok = BPETokenizer.from_file(bpe_tokenizer.save(tmp_path / "t"))
    tok._tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", special_tokens=[(EOT, tok.eos_id)]
    )
    tok.bos_token = EOT
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    save_hf(tiny_model(tok.vocab_size), tok, tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    messages = [{"role": "user", "content": "hi"}]
    assert theirs.apply_chat_template(messages, tokenize=False) == "hi"
    _, again = load_hf_dir(tmp_path / "out")
    assert again is not None and again.add_bos and again.encode_prompt("a")[0] == tok.eos_id
    assert again.chat_template == tok.chat_template

    resaved_dir = tmp_path / "saved_by_transformers"
    theirs.save_pretrained(resaved_dir)  # the tokenizer files as transformers writes them
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "out" / name, resaved_dir)
    _, resaved = load_hf_dir(resaved_dir)
    assert resaved is not None and resaved.chat_template == tok.chat_template
    assert resaved.encode(STRINGS[1]) == tok.encode(STRINGS[1])


# -- bad input -------------------------------------------------------------------------------


def test_unsupported_architecture(tmp_path: Path) -> None:
    cfg = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert is_hf_dir(tmp_path)
    with pytest.raises(GptkitError, match=r"model_type 'bert'.*supported: GPT2LMHeadModel"):
        load_hf_dir(tmp_path)


@pytest.mark.parametrize(
    "name, key", [("gpt2", "n_embd"), ("llama-gqa-untied", "intermediate_size")]
)
def test_config_that_does_not_fit_the_weights(name: str, key: str, tmp_path: Path) -> None:
    hf_model(name).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = cfg[key] * 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GptkitError, match="shape mismatch"):
        load_hf_dir(tmp_path)


def test_missing_weights_and_layers(tmp_path: Path) -> None:
    theirs = hf_model("llama-gqa-untied")
    theirs.config.save_pretrained(tmp_path)
    with pytest.raises(GptkitError, match="has no weights"):
        load_hf_dir(tmp_path)
    state = {k: v for k, v in theirs.state_dict().items() if ".1.mlp.up_proj" not in k}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(GptkitError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        load_hf_dir(tmp_path)


class _Trap:
    """Pickles as a call that would create ``path``: loading must refuse it, not run it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_damaged_and_unsafe_weight_files(tmp_path: Path) -> None:
    theirs = hf_model("gpt2")
    theirs.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(GptkitError, match="truncated or corrupted"):
        load_hf_dir(tmp_path)
    weights.unlink()
    trap = tmp_path / "code-ran"
    torch.save(theirs.state_dict() | {"x": _Trap(trap)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(GptkitError, match=r"weights_only=True\) refused .*Unsupported global"):
        load_hf_dir(tmp_path)
    assert not trap.exists()


def _llama_cfg(**changes: object) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"]} | LLAMA_BASE | changes


@pytest.mark.parametrize(
    "cfg, why",
    [
        (_llama_cfg(rope_scaling={"type": "linear", "factor": 2.0}), "RoPE scaling 'linear'"),
        (_llama_cfg(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}), "'llama3'"),
        (_llama_cfg(hidden_act="gelu"), "hidden_act 'gelu'"),
        (_llama_cfg(attention_bias=True), "attention_bias=True with mlp_bias=False"),
        (
            {"model_type": "gpt2", "n_layer": 2, "scale_attn_by_inverse_layer_idx": True},
            "scale_attn_by_inverse_layer_idx",
        ),
        ({"model_type": "gpt2", "activation_function": "relu"}, r"supported: \['gelu'"),
        ({"model_type": "openai-gpt", "afn": "relu"}, "afn='relu'"),
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "'mistral'"),
        ({"model_type": "gpt2", "architectures": ["GPT2ForTokenClassification"]}, "supported"),
    ],
)
def test_config_options_we_do_not_implement(cfg: dict, why: str) -> None:
    with pytest.raises(GptkitError, match=why):
        config_from_hf(cfg)


def test_config_mapping() -> None:
    gpt2 = config_from_hf({"model_type": "gpt2"})  # transformers' defaults: GPT-2 small
    assert gpt2 == ModelConfig(dropout=0.1)
    llama = config_from_hf(_llama_cfg(num_key_value_heads=2, rope_theta=5e5))
    assert (llama.n_kv_head, llama.rope_theta, llama.mlp_hidden, llama.bias) == (2, 5e5, 96, False)
    assert not llama.tie_embeddings and llama.norm == "rmsnorm" and llama.pos_emb == "rope"
    # heads wider than hidden_size / heads (a pruned Llama) keep their head_dim both ways
    wide = config_from_hf(_llama_cfg(head_dim=32))
    assert (wide.head_size, wide.n_head) == (32, 4) and config_to_hf(wide)["head_dim"] == 32
    gpt = ModelConfig(n_layer=1, n_head=4, n_embd=64, head_dim=32, vocab_size=V)
    with pytest.raises(GptkitError, match=r"head_dim=32 \(needs n_embd / n_head\)"):
        config_to_hf(gpt)
    v5 = config_from_hf(_llama_cfg(rope_parameters={"rope_type": "default", "rope_theta": 7.0}))
    assert v5.rope_theta == 7.0 and v5.n_kv_head is None
    gpt1 = config_from_hf({"model_type": "openai-gpt"})
    assert (gpt1.norm_position, gpt1.mlp, gpt1.block_size) == ("post", "gelu_tanh", 512)


def test_is_hf_dir(tmp_path: Path) -> None:
    assert not is_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "gptkit.model/1", "model": {}}))
    assert not is_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{")
    assert not is_hf_dir(tmp_path)


# -- the hub ----------------------------------------------------------------------------------


def test_hub_snapshot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake(repo_id: str, **kwargs: object) -> str:
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hf.hub_snapshot("someone/tiny") == tmp_path
    patterns = calls[0][1]["allow_patterns"]
    fetched = ["model.safetensors", "model-00001-of-00002.safetensors", "tokenizer.json"]
    for name in [
        *fetched,
        "pytorch_model.bin",
        "onnx/model.safetensors",
        "original/consolidated.pth",
    ]:
        assert any(fnmatch.fnmatch(name, p) for p in patterns) == (name in fetched), name

    def offline(repo_id: str, **kwargs: object) -> str:
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(GptkitError, match=r"'someone/tiny' is not a local path.*unreachable"):
        hf.hub_snapshot("someone/tiny")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(GptkitError, match=r"pip install 'gptkit\[hub\]'"):
        hf.hub_snapshot("someone/tiny")
