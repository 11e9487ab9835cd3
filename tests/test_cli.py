"""The command line: prepare -> train -> generate, the demo, help, and error reporting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE_TEXT

import gptkit
from gptkit.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _prepare_and_train(
    root: Path, tokenizer: str, steps: str, prepare_flags: tuple = (), train_flags: tuple = ()
) -> None:
    """Prepare ``root/corpus.txt`` into ``root/data``, then train ``root/run`` (tiny preset)."""
    (root / "corpus.txt").write_text(SAMPLE_TEXT * 30)
    assert (
        main(
            [
                "prepare",
                str(root / "corpus.txt"),
                "--out",
                str(root / "data"),
                "--tokenizer",
                tokenizer,
                "--no-progress",
                *prepare_flags,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(root / "data"),
                "--out",
                str(root / "run"),
                "--preset",
                "tiny",
                "--max-steps",
                steps,
                "--no-progress",
                *train_flags,
            ]
        )
        == 0
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    _prepare_and_train(root, "char", "30", train_flags=("--n-embd", "48"))
    return root / "run"


def test_train_flags_reach_the_config(trained: Path) -> None:
    model, _ = gptkit.load(trained)
    assert model.config.n_embd == 48 and model.config.n_layer == 2


def test_generate_greedy_matches_python_api(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys,
        "generate",
        "--model",
        str(trained),
        "First",
        "--temperature",
        "0",
        "--max-new-tokens",
        "40",
        "--no-stream",
    )
    assert code == 0
    model, tok = gptkit.load(trained)
    expected = gptkit.generate(model, tok, "First", max_new_tokens=40, temperature=0)
    assert out == "First" + expected + "\n"
    # Streaming prints the same text.
    code, streamed, _ = run(
        capsys,
        "generate",
        "--model",
        str(trained),
        "First",
        "--temperature",
        "0",
        "--max-new-tokens",
        "40",
    )
    assert code == 0 and streamed == out


def test_generate_several_prompts_with_stop(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys,
        "generate",
        "--model",
        str(trained),
        "def",
        "class",
        "--temperature",
        "0.8",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
        "--seed",
        "1",
        "--max-new-tokens",
        "30",
        "--stop",
        "\\n",  # typed in a shell: backslash n
    )
    assert code == 0
    assert out.count("--- sample") == 2
    samples = out.split("--- sample")[1:]
    assert all(s.count("\n") == 2 for s in samples)  # header line + one line: stopped at "\n"


def test_errors_are_one_line_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d")
    )
    assert code == 2
    assert err.startswith("error: ") and "does not exist" in err
    assert "Traceback" not in err and err.count("\n") == 1
    code, _, err = run(capsys, "generate", "--model", str(tmp_path), "hi")
    assert code == 2 and "not a gptkit checkpoint" in err
    code, _, err = run(capsys, "train", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "gptkit prepare" in err


def test_bad_flag_value_is_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "d", "--out", "o", "--max-steps", "many"])
    assert e.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_help_lists_commands_and_config_flags() -> None:
    env_py = [sys.executable, "-m", "gptkit"]
    out = subprocess.run(
        [*env_py, "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO / "src")},
    ).stdout
    for command in ("demo", "prepare", "train", "generate", "presets"):
        assert command in out
    out = subprocess.run(
        [*env_py, "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO / "src")},
    ).stdout
    for flag in ("--n-layer", "--max-steps", "--resume", "--precision", "--grad-accum"):
        assert flag in out


def test_presets_lists_gpt2_size(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "presets")
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("gpt2 "))
    assert "124.4M" in line


def test_demo_runs_end_to_end_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out_dir),
        "--corpus-mb",
        "0.15",
        "--vocab-size",
        "300",
        "--max-steps",
        "3",
        "--samples",
        "1",
        "--max-new-tokens",
        "8",
        "--no-progress",
    ]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "sample 1" in out
    assert (out_dir / "run" / "loss.png").exists()
    assert (out_dir / "data" / "meta.json").exists()
    # Running it again replaces the previous demo; a directory it did not make is refused.
    assert run(capsys, *args)[0] == 0
    (tmp_path / "mine").mkdir()
    code, _, err = run(capsys, "demo", "--out", str(tmp_path / "mine"))
    assert code == 2 and "not a gptkit demo directory" in err


def test_export_hf_and_gguf_load_back_with_equal_logits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    _prepare_and_train(tmp_path, "bpe", "5", prepare_flags=("--vocab-size", "300"))
    model, tok = gptkit.load(tmp_path / "run")
    ids = torch.tensor([tok.encode("def add(a, b):")])
    for fmt, out in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")):
        code, _, err = run(
            capsys, "export", "--model", str(tmp_path / "run"), "--format", fmt, "--out", str(out)
        )
        assert code == 0, err
        again, tok2 = gptkit.load(out)
        assert tok2 is not None and tok2.encode("def add(a, b):") == ids[0].tolist()
        torch.testing.assert_close(again(ids), model(ids), rtol=1e-5, atol=1e-5)
    code, _, err = run(
        capsys,
        "export",
        "--model",
        str(tmp_path / "run"),
        "--format",
        "hf",
        "--dtype",
        "q8_0",
        "--out",
        str(tmp_path / "x"),
    )
    assert code == 2 and "--dtype applies to --format gguf" in err
