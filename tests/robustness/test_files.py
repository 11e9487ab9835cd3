"""Damaged and hostile files: each gives one ``error: ...`` line and exit status 2 through
``gptkit.cli.main``, quickly, and none loads silently.

The cases are generated from small, valid files built once per module (a GGUF file, a
native checkpoint, a Hugging Face directory, a prepared data directory and a training run
with its resume state), each then damaged in one way: truncated, bytes flipped, sizes and
counts that lie (10⁷ layers, 2³¹ context, 2⁴⁰ array items), tensors that overlap or change
type, paths that leave the directory, NaN weights, wrong JSON types, missing fields. Files
whose checksum would catch the change first get their manifest rewritten, so that the check
under test is the one that answers. A watchdog (SIGALRM) turns a hang into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FAMILIES, SAMPLE_TEXT, tiny_model
from gguf import GGUFReader
from safetensors.torch import load_file, save_file

from gptkit.checkpoint import save_checkpoint
from gptkit.checkpoint.gguf import save_gguf
from gptkit.checkpoint.hf import save_hf
from gptkit.cli import main
from gptkit.data import prepare
from gptkit.files import CHECKPOINTS, latest_checkpoint, write_manifest
from gptkit.tokenizer import BPETokenizer, CharTokenizer

HANG_S = 60  # the watchdog: far above the second or so each case takes

Damage = Callable[[Path], None]


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    def hung(*_: Any) -> None:
        raise TimeoutError(f"no answer within {HANG_S} s: a damaged file hangs gptkit")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one ``error:`` line and no traceback."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, f"exit {code}, not 2 (silent or crashed): {err[-500:]}"
    assert len(errors) == 1 and "Traceback" not in err, err[-500:]
    return errors[0]


# -- bytes --------------------------------------------------------------------------------


def _poke(path: Path, offset: int, fmt: str, value: Any) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt, data, offset, value)
    path.write_bytes(bytes(data))


def _cut(keep: Callable[[int], int]) -> Damage:
    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: keep(len(data))])

    return damage


# -- GGUF ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = BPETokenizer.train(iter([SAMPLE_TEXT]), vocab_size=300, show_progress=False)
    model = tiny_model(tok.vocab_size, **FAMILIES["llama"])
    return save_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _kv(path: Path, key: str) -> int:
    """The offset of a metadata key's value (after its key and type)."""
    field = GGUFReader(path).fields[key]
    return field.offset + 8 + len(key.encode()) + 4


def _tensor(path: Path, n: int) -> dict[str, int]:
    """Where the n-th tensor's description keeps each field (byte offsets in the file)."""
    t = GGUFReader(path).tensors[n]
    dims = t.field.offset + 8 + len(t.name.encode()) + 4
    type_at = dims + 8 * len(t.shape)
    return {"ndims": dims - 4, "dim0": dims, "type": type_at, "offset": type_at + 4}


def _tensor_data(path: Path, name: str) -> int:
    return next(t.data_offset for t in GGUFReader(path).tensors if t.name == name)


def _set_kv(key: str, fmt: str, value: Any) -> Damage:
    return lambda p: _poke(p, _kv(p, key), fmt, value)


def _set_tensor(n: int, what: str, fmt: str, value: Callable[[Path], Any]) -> Damage:
    return lambda p: _poke(p, _tensor(p, n)[what], fmt, value(p))


def _tensor_offset(p: Path, n: int) -> int:
    return int(GGUFReader(p).tensors[n].field.parts[5][0])


def _fill(name: str, value: float) -> Damage:
    def damage(p: Path) -> None:
        at = _tensor_data(p, name)
        data = bytearray(p.read_bytes())
        data[at : at + 16] = np.full(4, value, np.float32).tobytes()
        p.write_bytes(bytes(data))

    return damage


def _rename_tensor(p: Path) -> None:
    t = GGUFReader(p).tensors[1]
    at = t.field.offset + 8
    data = bytearray(p.read_bytes())
    data[at] = ord("x")
    p.write_bytes(bytes(data))


GGUF_CASES: dict[str, Damage] = {
    "empty": _cut(lambda n: 0),
    "magic-only": _cut(lambda n: 4),
    "cut-in-header": _cut(lambda n: 20),
    "cut-in-metadata": _cut(lambda n: 200),
    "cut-in-vocab": _cut(lambda n: n // 4),
    "cut-in-data": _cut(lambda n: n - 1000),
    "cut-last-byte": _cut(lambda n: n - 1),
    "bad-magic": lambda p: _poke(p, 0, "4s", b"GGUG"),
    "version-99": lambda p: _poke(p, 4, "I", 99),
    "tensor-count-2^40": lambda p: _poke(p, 8, "Q", 1 << 40),
    "kv-count-2^40": lambda p: _poke(p, 16, "Q", 1 << 40),
    "kv-count-too-few": lambda p: _poke(p, 16, "Q", 3),
    "key-length-2^40": lambda p: _poke(p, 24, "Q", 1 << 40),
    "vocab-array-2^40": lambda p: _poke(p, _kv(p, "tokenizer.ggml.tokens") + 4, "Q", 1 << 40),
    "merges-array-2^40": lambda p: _poke(p, _kv(p, "tokenizer.ggml.merges") + 4, "Q", 1 << 40),
    "array-of-unknown-type": lambda p: _poke(p, _kv(p, "tokenizer.ggml.tokens"), "I", 77),
    "block-count-10^7": _set_kv("llama.block_count", "I", 10**7),
    "block-count-0": _set_kv("llama.block_count", "I", 0),
    "block-count-3": _set_kv("llama.block_count", "I", 3),
    "context-2^31": _set_kv("llama.context_length", "I", 1 << 31),
    "embedding-10^6": _set_kv("llama.embedding_length", "I", 10**6),
    "embedding-48": _set_kv("llama.embedding_length", "I", 48),
    "heads-0": _set_kv("llama.attention.head_count", "I", 0),
    "heads-3": _set_kv("llama.attention.head_count", "I", 3),
    "kv-heads-0": _set_kv("llama.attention.head_count_kv", "I", 0),
    "ffn-10^9": _set_kv("llama.feed_forward_length", "I", 10**9),
    "rms-eps-negative": _set_kv("llama.attention.layer_norm_rms_epsilon", "f", -1.0),
    "rope-base-nan": _set_kv("llama.rope.freq_base", "f", float("nan")),
    "rope-base-0": _set_kv("llama.rope.freq_base", "f", 0.0),
    "eos-id-2^31": _set_kv("tokenizer.ggml.eos_token_id", "I", 1 << 31),
    "token-text-not-utf8": lambda p: _poke(p, _kv(p, "tokenizer.ggml.tokens") + 20, "B", 0xFF),
    "architecture-mamba": lambda p: _poke(p, _kv(p, "general.architecture") + 8, "5s", b"mamba"),
    "type-f32-to-f16": _set_tensor(3, "type", "I", lambda p: 1),
    "type-f32-to-q8_0": _set_tensor(3, "type", "I", lambda p: 8),
    "type-unknown": _set_tensor(3, "type", "I", lambda p: 999),
    "offset-into-previous": _set_tensor(4, "offset", "Q", lambda p: _tensor_offset(p, 3)),
    "offset-misaligned": _set_tensor(4, "offset", "Q", lambda p: _tensor_offset(p, 4) + 1),
    "offset-past-end": _set_tensor(4, "offset", "Q", lambda p: 1 << 40),
    "dim-doubled": _set_tensor(3, "dim0", "Q", lambda p: 64),
    "dim-zero": _set_tensor(3, "dim0", "Q", lambda p: 0),
    "dim-2^40": _set_tensor(3, "dim0", "Q", lambda p: 1 << 40),
    "ndims-9": _set_tensor(3, "ndims", "I", lambda p: 9),
    "tensor-renamed": _rename_tensor,
    "nan-norm": _fill("output_norm.weight", float("nan")),
    "inf-embedding": _fill("token_embd.weight", float("inf")),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_damaged_gguf(
    case: str, gguf_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.gguf"
    shutil.copy(gguf_file, path)
    GGUF_CASES[case](path)
    _refused(capsys, ["generate", "hi", "--model", str(path), "--max-new-tokens", "1"])


# -- native checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = CharTokenizer.train([SAMPLE_TEXT])
    return save_checkpoint(
        tmp_path_factory.mktemp("native") / "ckpt", tiny_model(tok.vocab_size), tok
    )


def _json_edit(name: str, edit: Callable[[Any], Any], resign: bool = True) -> Damage:
    """Change a JSON file of the directory; ``resign`` rewrites the manifest, as a hostile
    file would carry a matching one, so that the check under test answers."""

    def damage(d: Path) -> None:
        path = d / name
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
        if resign:
            write_manifest(d)

    return damage


def _model_field(**fields: Any) -> Damage:
    return _json_edit("config.json", lambda c: c | {"model": c["model"] | fields})


def _text(name: str, text: str, resign: bool = True) -> Damage:
    def damage(d: Path) -> None:
        (d / name).write_text(text)
        if resign:
            write_manifest(d)

    return damage


def _weights(edit: Callable[[dict[str, torch.Tensor]], None], resign: bool = True) -> Damage:
    def damage(d: Path) -> None:
        state = load_file(str(d / "model.safetensors"))
        edit(state)
        save_file(state, str(d / "model.safetensors"))
        if resign:
            write_manifest(d)

    return damage


def _flip_bit(d: Path) -> None:
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x04  # a low mantissa bit of the last weight: still a valid float
    path.write_bytes(bytes(data))


def _set(key: str, value: Any) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda s: s.__setitem__(key, value(s[key]) if callable(value) else value)


NATIVE_CASES: dict[str, Damage] = {
    "no-model-key": _json_edit("config.json", lambda c: {"format": c["format"]}),
    "model-is-list": _json_edit("config.json", lambda c: c | {"model": [1, 2]}),
    "model-is-string": _json_edit("config.json", lambda c: c | {"model": "gpt2"}),
    "vocab-is-string": _model_field(vocab_size="64"),
    "vocab-10^11": _model_field(vocab_size=10**11),
    "n-layer-10^7": _model_field(n_layer=10**7),
    "n-layer-0": _model_field(n_layer=0),
    "n-layer-minus-1": _model_field(n_layer=-1),
    "n-layer-3": _model_field(n_layer=3),
    "n-layer-float": _model_field(n_layer=2.5),
    "n-layer-bool": _model_field(n_layer=True),
    "block-2^31": _model_field(block_size=1 << 31),
    "n-embd-48": _model_field(n_embd=48),
    "n-head-0": _model_field(n_head=0),
    "norm-unknown": _model_field(norm="batchnorm"),
    "bias-string": _model_field(bias="yes"),
    "dropout-string": _model_field(dropout="x"),
    "norm-eps-negative": _model_field(norm_eps=-1e-5),
    "norm-eps-nan": _model_field(norm_eps=float("nan")),  # json writes it as NaN
    "labels-ints": _model_field(labels=[1, 2]),
    "unknown-field": _model_field(n_experts=8),
    "config-truncated": _text("config.json", '{"format": "gptkit.model/1", "mod'),
    "config-edited-unsigned": _json_edit(
        "config.json", lambda c: c | {"model": c["model"] | {"n_embd": 48}}, resign=False
    ),
    "weights-truncated": lambda d: _cut(lambda n: n - 100)(d / "model.safetensors"),
    "weights-truncated-resigned": lambda d: (
        _cut(lambda n: n - 100)(d / "model.safetensors"),
        write_manifest(d),
    ),
    "weights-header-garbage": lambda d: _poke(d / "model.safetensors", 8, "12s", b"\xff" * 12),
    "weights-header-2^60": lambda d: (
        _poke(d / "model.safetensors", 0, "Q", 1 << 60),
        write_manifest(d),
    ),
    "weights-missing": lambda d: (d / "model.safetensors").unlink(),
    "weights-bit-flipped": _flip_bit,
    "weights-all-nan": _weights(_set("wte.weight", lambda t: torch.full_like(t, float("nan")))),
    "weights-one-inf": _weights(
        _set("norm_f.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))
    ),
    "weights-tensor-missing": _weights(lambda s: s.pop("norm_f.weight")),
    "weights-tensor-extra": _weights(_set("extra.weight", torch.zeros(3))),
    "weights-wrong-shape": _weights(_set("norm_f.weight", torch.ones(5))),
    "manifest-not-json": _text("manifest.json", "{", resign=False),
    "manifest-a-list": _text("manifest.json", "[]", resign=False),
    "manifest-lists-missing": lambda d: (
        write_manifest(d),
        (d / "tokenizer.json").unlink(),
    ),
    "char-tokenizer-no-chars": _json_edit("tokenizer.json", lambda t: {"type": t["type"]}),
    "char-tokenizer-chars-string": _json_edit("tokenizer.json", lambda t: t | {"chars": "abc"}),
    "char-tokenizer-duplicates": _json_edit("tokenizer.json", lambda t: t | {"chars": ["a", "a"]}),
    "char-tokenizer-long-chars": _json_edit("tokenizer.json", lambda t: t | {"chars": ["ab"]}),
    "char-tokenizer-special-ints": _json_edit(
        "tokenizer.json", lambda t: t | {"special_tokens": [1]}
    ),
    "tokenizer-not-json": _text("tokenizer.json", "not json"),
    "tokenizer-unknown-type": _json_edit("tokenizer.json", lambda t: {"type": "sentencepiece"}),
}


@pytest.mark.parametrize("case", list(NATIVE_CASES))
def test_damaged_native_checkpoint(
    case: str, native_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(native_dir, d)
    NATIVE_CASES[case](d)
    _refused(capsys, ["generate", "hi", "--model", str(d), "--max-new-tokens", "1"])


# -- Hugging Face directories -------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = BPETokenizer.train(iter([SAMPLE_TEXT]), vocab_size=300, show_progress=False)
    model = tiny_model(tok.vocab_size, **FAMILIES["llama"])
    return save_hf(model, tok, tmp_path_factory.mktemp("hf") / "model")


def _sharded(name: Callable[[Path], str]) -> Damage:
    """Replace model.safetensors by an index whose one shard is ``name(directory)``."""

    def damage(d: Path) -> None:
        keys = list(load_file(str(d / "model.safetensors")))
        shard = name(d)
        index = {"metadata": {}, "weight_map": dict.fromkeys(keys, shard)}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        (d / "model.safetensors").rename(d.parent / "moved.safetensors")

    return damage


def _symlink_out(d: Path) -> str:
    (d / "link.safetensors").symlink_to(d.parent / "moved.safetensors")
    return "link.safetensors"


def _hf_weights(edit: Callable[[dict[str, torch.Tensor]], None]) -> Damage:
    def damage(d: Path) -> None:
        state = load_file(str(d / "model.safetensors"))
        edit(state)
        save_file(state, str(d / "model.safetensors"))

    return damage


HF_CASES: dict[str, Damage] = {
    "config-not-json": _text("config.json", "{", resign=False),
    "config-a-list": _text("config.json", '[{"model_type": "llama"}]', resign=False),
    "no-layers-key": _json_edit(
        "config.json", lambda c: {k: v for k, v in c.items() if k != "num_hidden_layers"}, False
    ),
    "hidden-size-string": _json_edit("config.json", lambda c: c | {"hidden_size": "32"}, False),
    "layers-10^7": _json_edit("config.json", lambda c: c | {"num_hidden_layers": 10**7}, False),
    "heads-0": _json_edit("config.json", lambda c: c | {"num_attention_heads": 0}, False),
    "vocab-10^11": _json_edit("config.json", lambda c: c | {"vocab_size": 10**11}, False),
    "context-2^31": _json_edit(
        "config.json", lambda c: c | {"max_position_embeddings": 1 << 31}, False
    ),
    "unknown-model-type": _json_edit("config.json", lambda c: c | {"model_type": "mamba"}, False),
    "index-parent-path": _sharded(lambda d: "../moved.safetensors"),
    "index-etc-passwd": _sharded(lambda d: "../../../../../../../../etc/passwd"),
    "index-absolute": _sharded(lambda d: str(d.parent / "moved.safetensors")),
    "index-symlink-out": _sharded(_symlink_out),
    "index-not-json": lambda d: (
        (d / "model.safetensors").unlink(),
        (d / "model.safetensors.index.json").write_text("{"),
    ),
    "index-no-weight-map": lambda d: (
        (d / "model.safetensors").unlink(),
        (d / "model.safetensors.index.json").write_text("{}"),
    ),
    "index-shard-not-string": lambda d: (
        (d / "model.safetensors").unlink(),
        (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": 5}}'),
    ),
    "weights-truncated": lambda d: _cut(lambda n: n // 2)(d / "model.safetensors"),
    "weights-nan": _hf_weights(
        _set("model.norm.weight", lambda t: torch.full_like(t, float("nan")))
    ),
    "weights-missing-tensor": _hf_weights(lambda s: s.pop("model.norm.weight")),
    "tokenizer-config-not-json": _text("tokenizer_config.json", "{", resign=False),
    "tokenizer-config-a-list": _text("tokenizer_config.json", "[]", resign=False),
    "chat-template-int": _json_edit(
        "tokenizer_config.json", lambda c: c | {"chat_template": 5}, False
    ),
    "chat-template-bad-list": _json_edit(
        "tokenizer_config.json", lambda c: c | {"chat_template": [{"x": 1}]}, False
    ),
    "chat-template-list-without-default": _json_edit(
        "tokenizer_config.json",
        lambda c: c | {"chat_template": [{"name": "rag", "template": "x"}]},
        False,
    ),
    "tokenizer-json-garbage": _text("tokenizer.json", '{"model": 5}', resign=False),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_damaged_hf_dir(
    case: str, hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "model"
    shutil.copytree(hf_dir, d)
    HF_CASES[case](d)
    line = _refused(capsys, ["generate", "hi", "--model", str(d), "--max-new-tokens", "1"])
    assert "passwd" not in line or "outside" in line


# -- prepared data directories -------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text(SAMPLE_TEXT * 20)
    prepare([str(root / "corpus.txt")], str(root / "data"), tokenizer="char", progress=False)
    return root / "data"


def _meta(edit: Callable[[dict[str, Any]], Any]) -> Damage:
    def damage(d: Path) -> None:
        meta = json.loads((d / "meta.json").read_text())
        out = edit(meta)
        (d / "meta.json").write_text(json.dumps(meta if out is None else out))

    return damage


def _shard(field: str, value: Any) -> Damage:
    return _meta(lambda m: m["splits"]["train"]["shards"][0].__setitem__(field, value))


def _big_id(d: Path) -> None:
    meta = json.loads((d / "meta.json").read_text())
    path = d / meta["splits"]["train"]["shards"][0]["file"]
    ids = np.fromfile(path, dtype=meta["dtype"])
    ids[len(ids) // 2] = meta["vocab_size"] + 5
    ids.tofile(path)


def _outside_symlink(d: Path) -> None:
    meta = json.loads((d / "meta.json").read_text())
    name = meta["splits"]["train"]["shards"][0]["file"]
    (d / name).rename(d.parent / "elsewhere.bin")
    (d / name).symlink_to(d.parent / "elsewhere.bin")


DATA_CASES: dict[str, Damage] = {
    "meta-not-json": lambda d: (d / "meta.json").write_text("{"),
    "meta-a-list": lambda d: (d / "meta.json").write_text("[]"),
    "meta-missing": lambda d: (d / "meta.json").unlink(),
    "format-wrong": _meta(lambda m: m.__setitem__("format", "other")),
    "dtype-float64": _meta(lambda m: m.__setitem__("dtype", "float64")),
    "dtype-missing": _meta(lambda m: m.pop("dtype")),
    "splits-missing": _meta(lambda m: m.pop("splits")),
    "splits-a-list": _meta(lambda m: m.__setitem__("splits", [])),
    "vocab-missing": _meta(lambda m: m.pop("vocab_size")),
    "vocab-string": _meta(lambda m: m.__setitem__("vocab_size", "65")),
    "tokenizer-hash-missing": _meta(lambda m: m.pop("tokenizer_hash")),
    "eos-beyond-vocab": _meta(lambda m: m.__setitem__("eos_id", 10**6)),
    "shards-not-list": _meta(lambda m: m["splits"]["train"].__setitem__("shards", {})),
    "shard-file-etc-passwd": _shard("file", "../../../../../../../../etc/passwd"),
    "shard-file-absolute": _shard("file", "/etc/passwd"),
    "shard-file-int": _shard("file", 7),
    "shard-tokens-negative": _shard("tokens", -1),
    "shard-tokens-wrong": _shard("tokens", 3),
    "shard-symlink-out": _outside_symlink,
    "shard-id-beyond-vocab": _big_id,
    "shard-missing": lambda d: next(d.glob("train-*.bin")).unlink(),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_damaged_data_dir(
    case: str, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "data"
    shutil.copytree(data_dir, d, symlinks=True)
    DATA_CASES[case](d)
    _refused(capsys, [*_train(d, tmp_path / "run"), "--max-steps", "1"])


def _train(data: Path, run: Path) -> list[str]:
    return [
        "train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--eval-every",
        "0", "--no-progress",
    ]  # fmt: skip


# -- resume state ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("resume") / "run"
    assert main([*_train(data_dir, run), "--max-steps", "2"]) == 0
    return run


def _state(edit: Callable[[dict[str, Any]], Any]) -> Damage:
    def damage(run: Path) -> None:
        ckpt = latest_checkpoint(run)
        assert ckpt is not None
        state = json.loads((ckpt / "train_state.json").read_text())
        out = edit(state)
        (ckpt / "train_state.json").write_text(json.dumps(state if out is None else out))
        write_manifest(ckpt)

    return damage


def _in_ckpt(damage: Callable[[Path], Any]) -> Damage:
    def outer(run: Path) -> None:
        ckpt = latest_checkpoint(run)
        assert ckpt is not None
        damage(ckpt)

    return outer


RESUME_CASES: dict[str, Damage] = {
    "no-step": _state(lambda s: s.pop("step")),
    "step-string": _state(lambda s: s.__setitem__("step", "2")),
    "step-negative": _state(lambda s: s.__setitem__("step", -1)),
    "rng-not-base64": _state(lambda s: s.__setitem__("rng", "!!!")),
    "rng-short": _state(lambda s: s.__setitem__("rng", "AAAA")),
    "rng-missing": _state(lambda s: s.pop("rng")),
    "sampler-missing": _state(lambda s: s.pop("sampler")),
    "sampler-generator-bad": _state(lambda s: s.__setitem__("sampler", {"generator": "AAAA"})),
    "sampler-generator-missing": _state(lambda s: s.__setitem__("sampler", {})),
    "param-groups-missing": _state(lambda s: s.pop("optimizer_param_groups")),
    "param-groups-dict": _state(lambda s: s.__setitem__("optimizer_param_groups", {})),
    "param-groups-empty": _state(lambda s: s.__setitem__("optimizer_param_groups", [])),
    "train-config-missing": _state(lambda s: s.pop("train")),
    "world-size-zero": _state(lambda s: s.__setitem__("world_size", 0)),
    "state-a-list": _state(lambda s: [s]),
    "state-not-json": _in_ckpt(lambda c: (c / "train_state.json").write_text("{")),
    "state-unsigned-edit": _in_ckpt(
        lambda c: (c / "train_state.json").write_text(
            (c / "train_state.json").read_text().replace('"step": 2', '"step": 1')
        )
    ),
    "optimizer-truncated": _in_ckpt(lambda c: _cut(lambda n: n - 50)(c / "optimizer.safetensors")),
    "optimizer-bad-names": _in_ckpt(
        lambda c: (
            save_file({"x": torch.zeros(2)}, str(c / "optimizer.safetensors")),
            write_manifest(c),
        )
    ),
    "metrics-bad-middle-line": lambda run: (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 1.0}\n'
    ),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_damaged_resume_state(
    case: str,
    trained_run: Path,
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    RESUME_CASES[case](run)
    _refused(capsys, [*_train(data_dir, run), "--resume", "--max-steps", "3"])


def test_case_count() -> None:
    cases = (GGUF_CASES, NATIVE_CASES, HF_CASES, DATA_CASES, RESUME_CASES, QUANTIZED_CASES)
    assert sum(map(len, cases)) >= 100


# -- what must keep working -----------------------------------------------------------------


def test_intact_files_load(
    gguf_file: Path, native_dir: Path, hf_dir: Path, quantized_dir: Path
) -> None:
    """The undamaged originals generate: every refusal above is caused by its damage."""
    for model in (gguf_file, native_dir, hf_dir, quantized_dir):
        assert main(["generate", "hi", "--model", str(model), "--max-new-tokens", "1"]) == 0


def test_partial_metrics_line_is_skipped_on_resume(
    trained_run: Path, data_dir: Path, tmp_path: Path
) -> None:
    """A run killed mid-write leaves half a line at the end of metrics.jsonl: resume drops it."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "lo')
    assert main([*_train(data_dir, run), "--resume", "--max-steps", "3"]) == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 3


def test_verify_can_be_skipped(native_dir: Path, tmp_path: Path) -> None:
    """A bit flipped in a weight is caught by the manifest, and verify=False skips the check."""
    import gptkit

    d = tmp_path / "ckpt"
    shutil.copytree(native_dir, d)
    _flip_bit(d)
    with pytest.raises(gptkit.GptkitError, match="sha256"):
        gptkit.load(d)
    model, _ = gptkit.load(d, verify=False)
    assert model is not None
    (d / "manifest.json").unlink()  # a checkpoint written before manifests: loads unchecked
    assert gptkit.load(d)[0] is not None


# -- quantized checkpoints ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gptkit.checkpoint import save_quantized
    from gptkit.model.quant import quantize

    tok = CharTokenizer.train([SAMPLE_TEXT])
    model = quantize(tiny_model(tok.vocab_size), "int8")
    return save_quantized(tmp_path_factory.mktemp("quantized") / "q", model, tok)


QUANTIZED_CASES: dict[str, Damage] = {
    "bit-flipped": _flip_bit,
    "n-layer-10^7": _model_field(n_layer=10**7),
    "model-is-list": _json_edit("config.json", lambda c: c | {"model": [1]}),
    "nan-norm": _weights(_set("norm_f.weight", lambda t: torch.full_like(t, float("nan")))),
    "tensor-missing": _weights(lambda s: s.pop("norm_f.weight")),
}


@pytest.mark.parametrize("case", list(QUANTIZED_CASES))
def test_damaged_quantized_checkpoint(
    case: str, quantized_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "q"
    shutil.copytree(quantized_dir, d)
    QUANTIZED_CASES[case](d)
    _refused(capsys, ["generate", "hi", "--model", str(d), "--max-new-tokens", "1"])


# -- a save killed half-way -----------------------------------------------------------------

_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import safetensors.torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model
    from gptkit.checkpoint import save_checkpoint
    from gptkit.files import step_dir

    real = safetensors.torch.save_file
    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # mid-save: the weights written, nothing renamed
    import gptkit.checkpoint.native as native
    native.save_file = save_then_die
    save_checkpoint(step_dir({run!r}, 3), tiny_model(), None)
    """
)


def test_killed_save_leaves_nothing_after_the_next_start(
    trained_run: Path, data_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    script = _KILLED_SAVE.format(tests=str(Path(__file__).parents[1]), run=str(run))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stale = [p.name for p in (run / CHECKPOINTS).iterdir() if p.name.startswith(".")]
    assert stale, "the killed save should have left its temporary directory"
    assert latest_checkpoint(run).name == "step-0000002"  # type: ignore[union-attr]
    assert main([*_train(data_dir, run), "--resume", "--max-steps", "3"]) == 0
    left = sorted(p.name for p in (run / CHECKPOINTS).iterdir())
    assert not [n for n in left if n.startswith(".")], left
    assert os.path.isdir(run / CHECKPOINTS / "step-0000003")


# -- chat templates from files ----------------------------------------------------------------

HOSTILE_TEMPLATES = {
    "include": ("{% include 'other.jinja' %}", "self-contained"),
    "import": ("{% import 'macros' as m %}{{ m.x() }}", "self-contained"),
    "extends": ("{% extends 'base' %}", "self-contained"),
    "not-text": (5, "not text"),
    "a-dict-without-default": ({"rag": "x"}, "none is 'default'"),
    "bad-list": ([{"x": 1}], "not of"),
    "empty-loops": (
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "longer than",
    ),
    "huge-output": ("{% for i in range(99999) %}{{ 'x' * 1000 }}{% endfor %}", "output passed"),
    "huge-string": ("{{ 'a' * 10**10 }}", "huge sequence"),
    "huge-power": ("{{ 10 ** 100000 }}", "power"),
    "recursion": ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "failed to render"),
    "type-error": ("{{ messages[0] + 1 }}", "failed to render"),
    "division": ("{{ 1 / 0 }}", "failed to render"),
    "no-parse": ("{% for %}", "does not parse"),
    "sandbox-escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "failed to render"),
}


@pytest.mark.parametrize("case", list(HOSTILE_TEMPLATES))
def test_hostile_chat_template(case: str) -> None:
    from gptkit.errors import GptkitError
    from gptkit.tokenizer.chat import render_chat

    template, says = HOSTILE_TEMPLATES[case]
    with pytest.raises(GptkitError, match=says):
        render_chat([{"role": "user", "content": "hi"}], template)  # type: ignore[arg-type]


def test_named_template_list_is_supported(hf_dir: Path, tmp_path: Path) -> None:
    """transformers' list-of-named-templates form in tokenizer_config.json: ``default`` is
    the chat template, ``tool_use`` is taken when tools are given."""
    from gptkit.tokenizer import load_tokenizer
    from gptkit.tokenizer.chat import apply_chat_template, render_chat

    d = tmp_path / "model"
    shutil.copytree(hf_dir, d)
    named = [
        {"name": "tool_use", "template": "T{{ tools | length }}"},
        {"name": "default", "template": "D{{ messages[0].content }}"},
    ]
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": named}))
    tok = load_tokenizer(d)
    assert tok.chat_template == named[1]["template"]
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert render_chat(messages, named) == "Dhi"  # type: ignore[arg-type]
    assert render_chat(messages, named, tools=tools) == "T1"  # type: ignore[arg-type]
    assert apply_chat_template(tok, messages) == "Dhi"
    assert apply_chat_template(tok, messages, tools=tools) == "T1"
    tok.save(tmp_path / "again")  # the list form survives a save
    again = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert {t["name"]: t["template"] for t in again["chat_template"]} == {
        t["name"]: t["template"] for t in named
    }
