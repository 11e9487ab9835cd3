"""prepare: corpus -> token shards that the loader reads back, exactly and atomically."""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, shared_path

from gptkit.data import BatchSampler, TokenShards, iter_documents, list_files, prepare, read_meta
from gptkit.errors import GptkitError
from gptkit.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

# gptkit.data re-exports the function `prepare`, which shadows the submodule as an attribute.
P = importlib.import_module("gptkit.data.prepare")


# -- helpers --------------------------------------------------------------------------------


def python_like(n_bytes: int, seed: int = 0) -> str:
    """Code-shaped text with the cases that make cutting hard: blank lines, indented lines,
    trailing spaces, tabs, CRLF, non-ASCII, special-token text."""
    rng = random.Random(seed)
    words = [
        "def", "return", "self", "if", "else:", "for", "in", "x", "value", "π", "données",
        "'s", "#", "print(", ")", "==", "0x1f", "123", "<|endoftext|>", "🙂",
    ]  # fmt: skip
    out, size = [], 0
    while size < n_bytes:
        indent = " " * (4 * rng.randrange(0, 4))
        r = rng.random()
        if r < 0.15:
            line = ""
        elif r < 0.2:
            line = indent + "   "
        elif r < 0.25:
            line = "\t" + " ".join(rng.choices(words, k=3)) + "  "
        else:
            line = indent + " ".join(rng.choices(words, k=rng.randrange(1, 8)))
        line += "\r\n" if rng.random() < 0.05 else "\n"
        out.append(line)
        size += len(line)
    return "".join(out)


def split_ids(out: Path, split: str) -> np.ndarray:
    arrays = TokenShards(out).split(split)
    return np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)


def split_text(out: Path, split: str) -> str:
    """The split decoded with its end-of-text tokens removed."""
    meta = read_meta(out)
    ids = [i for i in split_ids(out, split).tolist() if i != meta["eos_id"]]
    return load_tokenizer(out).decode(ids)


def documents(out: Path, split: str) -> list[str]:
    meta = read_meta(out)
    tok = load_tokenizer(out)
    ids = split_ids(out, split).tolist()
    assert not ids or ids[-1] == meta["eos_id"], "every document ends with eos"
    docs, cur = [], []
    for i in ids:
        if i == meta["eos_id"]:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


def write_corpus(root: Path, texts: dict[str, str | bytes]) -> Path:
    for rel, text in texts.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_bytes(text.encode())
    return root


def run(inputs: list, out: Path, **kw: object) -> dict:
    kw = {"tokenizer": "char", "shuffle": False, "progress": False} | kw
    return prepare([str(i) for i in inputs], str(out), **kw)  # type: ignore[arg-type]


PARTS = {
    "a.txt": SAMPLE_TEXT,
    "b.txt": "Speak, speak.\nAll: résumé — naïve ünïcödé 🙂\n" * 30,
    "c.txt": "<|endoftext|> is plain text here\nx = 1\n" * 20,
}


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip(tmp_path: Path, kind: str) -> None:
    corpus = write_corpus(tmp_path / "corpus", PARTS)
    meta = run([corpus], tmp_path / "out", tokenizer=kind, vocab_size=300, val_fraction=0.2)
    out = tmp_path / "out"
    whole = "".join(PARTS[k] for k in sorted(PARTS))
    assert split_text(out, "train") + split_text(out, "val") == whole
    assert meta["files"] == 3 and meta["bytes"] == len(whole.encode())
    assert meta["tokenizer"] == kind and meta["dtype"] == "uint16"
    tok = load_tokenizer(out)
    assert tok.hash == meta["tokenizer_hash"] and tok.vocab_size == meta["vocab_size"]
    assert meta["eos_id"] == tok.eos_id is not None
    # 3 documents; the one the validation cut falls in is split in two, both ending in eos
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 4
    assert documents(out, "train")[0] == PARTS["a.txt"]
    # special-token text in the corpus is plain text: eos appears only as the separator
    ids = np.concatenate([split_ids(out, "train"), split_ids(out, "val")])
    assert int((ids == meta["eos_id"]).sum()) == 4
    assert read_meta(out) == meta


def test_loader_reads_what_prepare_writes(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c", {"t.txt": SAMPLE_TEXT * 3})
    run([corpus], tmp_path / "out", shard_tokens=200)
    shards = TokenShards(tmp_path / "out")
    arrays = shards.split("train")
    assert len(arrays) > 1 and all(len(a) <= 200 for a in arrays)
    assert sum(len(a) for a in arrays) == shards.num_tokens("train")
    flat = np.concatenate(arrays)
    sampler = BatchSampler(arrays, block_size=16, batch_size=4, seed=0)
    x, y = sampler.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        window = np.concatenate([row_x, row_y[-1:]])
        hits = [i for i in range(len(flat) - 16) if np.array_equal(flat[i : i + 17], window)]
        assert hits, "each row is a window of the written tokens"
    # more shards, same tokens as one shard
    run([corpus], tmp_path / "one")
    assert np.array_equal(flat, np.concatenate(TokenShards(tmp_path / "one").split("train")))


# -- chunked encoding -----------------------------------------------------------------------


def test_chunked_encoding_equals_whole_text(tmp_path: Path) -> None:
    text = python_like(5 << 19)  # 2.5 MiB: a few chunks of about 1 MiB
    (tmp_path / "big.py").write_text(text, encoding="utf-8", newline="")
    bpe = BPETokenizer.train(iter([text[:100_000]]), vocab_size=1000, show_progress=False)
    bpe.save(tmp_path / "tok")
    calls: list[int] = []
    encode_batch = BPETokenizer.encode_batch

    def spy(self: BPETokenizer, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        calls.append(len(texts))
        return encode_batch(self, texts, allow_special)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BPETokenizer, "encode_batch", spy)
        tok = str(tmp_path / "tok")
        meta = run([tmp_path / "big.py"], tmp_path / "out", tokenizer=tok, val_fraction=0)
    assert sum(calls) >= 2, "the document was encoded in several chunks"
    assert meta["tokenizer"] == "file" and meta["splits"]["val"]["tokens"] == 0
    expected = [*bpe.encode(text, allow_special=False), bpe.eos_id]
    assert split_ids(tmp_path / "out", "train").tolist() == expected


def test_parallel_workers_write_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bpe_tokenizer: BPETokenizer
) -> None:
    records = "".join(json.dumps({"text": python_like(3000, seed=i)}) + "\n" for i in range(8))
    corpus = write_corpus(tmp_path / "c", PARTS | {"d.py": python_like(60_000), "e.jsonl": records})
    bpe_tokenizer.save(tmp_path / "tok")
    monkeypatch.setattr(P, "BATCH", 5000)  # many small batches: their order must be kept
    kw = dict(tokenizer=str(tmp_path / "tok"), shard_tokens=20_000, val_fraction=0.2)
    one = run([corpus], tmp_path / "one", **kw)
    two = run([corpus], tmp_path / "two", workers=2, **kw)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len(one["splits"]["train"]["shards"]) > 1
    for name in names:
        if name != "meta.json":
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    del one["seconds"], two["seconds"]
    assert one == two
    with pytest.raises(GptkitError, match="--workers 0"):
        run([corpus], tmp_path / "none", workers=0)


def test_cuts_are_exact_even_when_small(monkeypatch: pytest.MonkeyPatch) -> None:
    # Cut every few hundred characters: each cut must keep the GPT-2 pre-tokenization intact.
    text = python_like(200_000, seed=1)
    tok = BPETokenizer.train(iter([text]), vocab_size=400, show_progress=False)
    monkeypatch.setattr(P, "CHUNK", 200)
    piece = P._Piece(0, P.cut_rule(tok))
    chunks = [c for i in range(0, len(text), 1000) if (c := piece.add(text[i : i + 1000]))]
    last = piece.finish()
    assert last is not None
    chunks.append(last[0])
    assert len(chunks) > 100 and "".join(chunks) == text
    ids = [i for c in tok.encode_batch(chunks, allow_special=False) for i in c]
    assert ids == tok.encode(text, allow_special=False)


def test_cut_rule_never_cuts_at_whitespace() -> None:
    assert P.cut_between_lines("a\n\ndef", 0) == 0  # after a blank line
    assert P.cut_between_lines("a  \ndef", 0) == 0  # after trailing spaces
    assert P.cut_between_lines("a\r\ndef", 0) == 0
    assert P.cut_between_lines("a\n    def", 0) == 0  # before an indented line
    assert P.cut_between_lines("a\nb\n\nc\nd", 0) == 7
    assert P.cut_between_lines("a\nb\n\nc", 3) == 0


# -- inputs ---------------------------------------------------------------------------------


def test_directory_walk_glob_and_exclude(tmp_path: Path) -> None:
    root = write_corpus(
        tmp_path / "repo",
        {
            "a.py": "a = 1\n",
            "notes.txt": "not python\n",
            "pkg/b.py": "b = 2\n",
            "pkg/__pycache__/b.py": "cached\n",
            "tests/test_a.py": "test\n",
            ".hidden/h.py": "hidden\n",
            ".h.py": "hidden\n",
            "bin.py": b"x = 1\n\x00\x01binary",
            "empty.py": "",
        },
    )
    found = list_files([str(root)], glob=["*.py"], exclude=["tests/*", "__pycache__"])
    assert [p.relative_to(root).as_posix() for p in found] == ["a.py", "empty.py", "pkg/b.py"]
    assert len(list_files([str(root)])) == 6  # hidden and binary files are always skipped
    meta = run([root], tmp_path / "out", glob=["*.py"], exclude=["tests/*", "__pycache__"])
    assert meta["files"] == 3
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 2
    assert list(iter_documents([str(root)], glob=["*.py"], exclude=["tests"])) == [
        "a = 1\n",
        "cached\n",
        "b = 2\n",
    ]


def test_output_inside_the_input_is_not_read(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "corpus", {"a.txt": SAMPLE_TEXT})
    first = run([root], root / "prepared")
    second = run([root], root / "prepared")
    assert first["files"] == second["files"] == 1
    assert first["splits"] == second["splits"]


def test_jsonl_text_field(tmp_path: Path) -> None:
    records = [{"content": f"def f{i}():\n    return {i}\n", "path": f"{i}.py"} for i in range(20)]
    lines = [json.dumps(r) for r in records]
    lines[3] = json.dumps({"content": "", "path": "empty.py"})  # no text: not a document
    lines.insert(5, "")  # blank lines are ignored
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(lines) + "\n")
    meta = run([path], tmp_path / "out", text_field="content", val_fraction=0.25)
    train, val = documents(tmp_path / "out", "train"), documents(tmp_path / "out", "val")
    expected = [r["content"] for i, r in enumerate(records) if i != 3]
    assert train + val == expected
    assert 4 <= len(val) <= 6 and meta["splits"]["val"]["documents"] == len(val)
    with pytest.raises(GptkitError, match=r"code\.jsonl:1: .*no 'text' field.*--text-field"):
        run([path], tmp_path / "out2")


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": "ok"', r"bad\.jsonl:2: not valid JSON"),
        ('["text"]', r"bad\.jsonl:2: a record must be a JSON object"),
        ('{"text": 3}', r"bad\.jsonl:2: field 'text' holds a int"),
    ],
)
def test_jsonl_bad_record(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(GptkitError, match=match):
        run([path], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- the split ------------------------------------------------------------------------------


def test_validation_is_the_tail_of_one_file(tmp_path: Path) -> None:
    text = "".join(f"line {i}: {'word ' * (i % 7)}\n" for i in range(2000))
    (tmp_path / "in.txt").write_text(text)
    run([tmp_path / "in.txt"], tmp_path / "out", val_fraction=0.1)
    start = text.index("\n", int(len(text) * 0.9) - 1) + 1  # the next line start
    assert split_text(tmp_path / "out", "val") == text[start:]
    assert split_text(tmp_path / "out", "train") == text[:start]
    assert abs(len(text) - start - 0.1 * len(text)) < 50  # within a line of 10%


def test_validation_tail_matches_nanogpt_on_tiny_shakespeare(tmp_path: Path) -> None:
    path = shared_path("tinyshakespeare", "input.txt")
    data = path.read_text(encoding="utf-8")
    meta = run([path], tmp_path / "out")
    n = int(len(data) * 0.9)  # nanoGPT's shakespeare_char split
    val = split_text(tmp_path / "out", "val")
    assert data.endswith(val) and 0 <= len(data) - len(val) - n < 80
    assert meta["vocab_size"] == len(set(data)) + 1


def test_no_validation_split(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(SAMPLE_TEXT)
    meta = run([tmp_path / "a.txt"], tmp_path / "out", val_fraction=0)
    assert meta["splits"]["val"] == {"shards": [], "tokens": 0, "documents": 0}
    assert TokenShards(tmp_path / "out").split("val") == []


def test_shuffle_is_seeded(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c", {f"{i:02d}.txt": f"document {i}\n" for i in range(12)})
    docs = {}
    for name, shuffle in [("a", True), ("b", True), ("c", False)]:
        run([corpus], tmp_path / name, shuffle=shuffle, seed=1, val_fraction=0.25)
        docs[name] = documents(tmp_path / name, "train") + documents(tmp_path / name, "val")
    assert docs["a"] == docs["b"] != docs["c"]
    assert sorted(docs["a"]) == sorted(docs["c"])


# -- dtype ----------------------------------------------------------------------------------


def test_shard_dtype() -> None:
    assert P.shard_dtype(50257) == "uint16"
    assert P.shard_dtype(65536) == "uint16"
    assert P.shard_dtype(65537) == "uint32"
    assert P.shard_dtype(100, "uint32") == "uint32"
    with pytest.raises(GptkitError, match=r"vocabulary of 70,000 tokens does not fit in uint16"):
        P.shard_dtype(70_000, "uint16")
    with pytest.raises(GptkitError, match="--dtype 'int8'"):
        P.shard_dtype(100, "int8")


def test_large_vocabulary_gets_uint32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CharTokenizer, "vocab_size", property(lambda self: 70_000))
    (tmp_path / "a.txt").write_text(SAMPLE_TEXT)
    meta = run([tmp_path / "a.txt"], tmp_path / "out")
    assert meta["dtype"] == "uint32" and TokenShards(tmp_path / "out").dtype == np.uint32
    assert (tmp_path / "out" / "train-00000.bin").stat().st_size == 4 * meta["splits"]["train"][
        "tokens"
    ]
    assert split_text(tmp_path / "out", "train") + split_text(tmp_path / "out", "val") == (
        SAMPLE_TEXT
    )
    with pytest.raises(GptkitError, match=r"does not fit in uint16.*--dtype uint32 or auto"):
        run([tmp_path / "a.txt"], tmp_path / "out16", dtype="uint16")
    with pytest.raises(GptkitError, match="does not fit in uint16"):  # before any training
        kw = {"tokenizer": "bpe", "vocab_size": 70_000, "dtype": "uint16"}
        run([tmp_path / "a.txt"], tmp_path / "bpe16", **kw)


# -- GPT-2 ----------------------------------------------------------------------------------


def test_gpt2_tokenizer(tmp_path: Path, gpt2_dir: Path) -> None:
    text = "Hello world <|endoftext|> is just text.\n\n    def f(x):\n        return x\n"
    (tmp_path / "a.txt").write_text(text)
    kw = {"tokenizer": "gpt2", "tokenizer_path": str(gpt2_dir), "val_fraction": 0}
    meta = run([tmp_path / "a.txt"], tmp_path / "out", **kw)
    gpt2 = load_tokenizer(gpt2_dir)
    assert meta["vocab_size"] == 50257 and meta["eos_id"] == 50256 and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == "gpt2" and meta["tokenizer_hash"] == gpt2.hash
    ids = split_ids(tmp_path / "out", "train").tolist()
    assert ids == [*gpt2.encode(text, allow_special=False), 50256]
    assert ids.count(50256) == 1
    assert load_tokenizer(tmp_path / "out").hash == gpt2.hash


def test_gpt2_needs_a_path(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(GptkitError) as e:
        run([tmp_path / "a.txt"], tmp_path / "out", tokenizer="gpt2")
    assert str(e.value) == (
        "--tokenizer gpt2 needs --tokenizer-path DIR holding encoder.json + vocab.bpe "
        "(or vocab.json + merges.txt)"
    )
    with pytest.raises(GptkitError, match="holds no GPT-2 tokenizer"):
        run([tmp_path / "a.txt"], tmp_path / "out", tokenizer="gpt2", tokenizer_path=tmp_path)


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"inputs": ["missing.txt"]}, r"input missing\.txt does not exist"),
        ({"inputs": ["src"], "glob": ["*.rs"]}, r"directory src has no files matching --glob"),
        ({"inputs": ["blank"]}, r"the inputs hold no text \(2 file\(s\)"),
        ({"val_fraction": 1.0}, r"--val-fraction 1.0 is outside \[0, 1\)"),
        ({"val_fraction": -0.1}, r"--val-fraction -0.1 is outside"),
        ({"val_fraction": float("nan")}, r"--val-fraction nan is outside"),
        ({"on_bad_bytes": "ignore"}, r"--on-bad-bytes 'ignore' is not one of"),
        ({"tokenizer": "bep"}, r"--tokenizer 'bep' is not char, bpe or gpt2"),
        ({"dtype": "int8"}, r"--dtype 'int8' is not one of"),
        ({"inputs": []}, r"no inputs given"),
        ({"tokenizer": "bpe", "tokenizer_path": "x"}, r"--tokenizer-path is only read with"),
    ],
)
def test_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kw: dict, match: str) -> None:
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path, {"src/a.py": "x = 1\n", "blank/a.txt": "", "blank/b.txt": " \n\n "})
    args = {"inputs": ["src"], "out": "out", "progress": False} | kw
    with pytest.raises(GptkitError, match=match):
        prepare(**args)
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_no_text_error_from_every_tokenizer(tmp_path: Path, kind: str) -> None:
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(GptkitError, match="the inputs hold no text"):
        run([tmp_path / "e.txt"], tmp_path / "out", tokenizer=kind, vocab_size=300)


BAD = b"good line\nbad \xff\xfe bytes\n"


def test_bad_bytes_replace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = write_corpus(tmp_path / "c", {"a.txt": BAD, "b.txt": "clean\n"})
    meta = run([corpus], tmp_path / "out", val_fraction=0)
    bad = meta["bad_bytes"]
    assert bad["count"] == 2 and bad["files"] == 1 and bad["skipped_documents"] == 0
    assert bad["first_file"].endswith("a.txt") and bad["first_offset"] == 14
    assert documents(tmp_path / "out", "train") == [
        "good line\nbad \ufffd\ufffd bytes\n",
        "clean\n",
    ]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 undecodable byte(s)" in err[0] and "at byte 14" in err[0]
    assert "a.txt" in err[0]


def test_bad_bytes_skip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = write_corpus(tmp_path / "c", {"a.txt": BAD, "b.txt": "clean\n"})
    rec = b'{"text": "bad \xff"}\n{"text": "fine"}\n'
    (corpus / "r.jsonl").write_bytes(rec)
    meta = run([corpus], tmp_path / "out", val_fraction=0, on_bad_bytes="skip")
    assert documents(tmp_path / "out", "train") == ["clean\n", "fine"]
    assert meta["bad_bytes"]["count"] == 3 and meta["bad_bytes"]["files"] == 2
    assert meta["bad_bytes"]["skipped_documents"] == 2
    assert "skipped 2 document(s)" in capsys.readouterr().err


def test_bad_bytes_error(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c", {"a.txt": BAD})
    for kind in ("char", str(tmp_path / "tok")):
        CharTokenizer.train(["abc"]).save(tmp_path / "tok")
        with pytest.raises(GptkitError, match=r"a\.txt:2: byte 14 is not valid UTF-8"):
            run([corpus], tmp_path / "out", tokenizer=kind, on_bad_bytes="error")
        assert not list(tmp_path.glob("out/*"))


# -- atomicity ------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    corpus = write_corpus(tmp_path / "c", {f"{i}.txt": SAMPLE_TEXT for i in range(40)})
    calls = []

    def failing(self: CharTokenizer, texts: list[str], allow_special: bool = True) -> list:
        calls.append(1)
        if len(calls) > 1:
            raise exc
        return [self.encode(t, allow_special) for t in texts]

    monkeypatch.setattr(P, "BATCH", 2000)
    monkeypatch.setattr(CharTokenizer, "encode_batch", failing)
    with pytest.raises(type(exc)):
        run([corpus], tmp_path / "out", shard_tokens=500)
    assert len(calls) == 2
    assert list((tmp_path / "out").iterdir()) == []  # no shard, no meta.json, no temporaries


def test_rerun_replaces_and_failed_rerun_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = write_corpus(tmp_path / "c", {"a.txt": SAMPLE_TEXT * 4})
    out = tmp_path / "out"
    first = run([corpus], out, tokenizer="bpe", vocab_size=300, shard_tokens=100)
    assert len(first["splits"]["train"]["shards"]) > 2
    assert (out / "tokenizer_config.json").exists()
    (out / ".train-00007.bin.abc.tmp").write_bytes(b"left by a killed run")

    # A failing rerun leaves the first run readable.
    def boom(*a: object, **k: object) -> list:
        raise RuntimeError("boom")

    with monkeypatch.context() as mp:
        mp.setattr(CharTokenizer, "encode_batch", boom)
        with pytest.raises(RuntimeError):
            run([corpus], out, shard_tokens=100)
    assert read_meta(out) == first
    assert load_tokenizer(out).hash == first["tokenizer_hash"]
    assert len(split_ids(out, "train")) == first["splits"]["train"]["tokens"]

    # A successful rerun replaces it: old shards, stale files and temporaries are gone.
    second = run([corpus], out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["meta.json", "tokenizer.json", "train-00000.bin", "val-00000.bin"]
    assert second["tokenizer"] == "char" and load_tokenizer(out).hash == second["tokenizer_hash"]
    assert split_text(out, "train") + split_text(out, "val") == SAMPLE_TEXT * 4


def test_progress_bars_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text(SAMPLE_TEXT)
    run([tmp_path / "a.txt"], tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "learn char" in err and "encode" in err and "B/s" in err
    assert "prepared" in err and "MB/s" in err
