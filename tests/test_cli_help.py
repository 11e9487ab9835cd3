"""The command line's surface: every flag documented, every documented command line accepted,
and a verb that needs a model says how to get one. Nothing here trains or loads a model."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from conftest import REPO

from gptkit.cli import NO_MODEL, build_app, build_parser, main

MODEL_VERBS = {
    "generate": ["hi"],
    "chat": [],
    "export": ["--out", "x"],
    "quantize": ["--out", "x"],
    "classify": ["--text", "a"],
    "eval": ["--task", "text"],
    "serve": [],
}
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")


def verbs() -> dict[str, Any]:
    """Every leaf command by its command line ("finetune sft", "generate", ...)."""
    out, todo = {}, [("", typer.main.get_command(build_app()))]
    while todo:
        prefix, group = todo.pop()
        for name, cmd in group.commands.items():
            path = f"{prefix} {name}".strip()
            if hasattr(cmd, "commands"):
                todo.append((path, cmd))
            else:
                out[path] = cmd
    return out


def test_every_flag_of_every_verb_has_help() -> None:
    found = verbs()
    assert {"demo", "prepare", "train", "finetune sft", "finetune classify", "presets"} <= set(
        found
    )
    assert set(MODEL_VERBS) <= set(found)
    undocumented = [
        f"{verb} {param.opts[0]}"
        for verb, cmd in found.items()
        for param in cmd.params
        if param.name != "help" and not (getattr(param, "help", None) or "").strip()
    ]
    assert not undocumented, undocumented


def test_generate_help_describes_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    out = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "--max-new-tokens" in out and "tokens to generate per prompt" in out
    assert "sample only among the k most likely tokens" in out
    assert r"(repeatable; \n and \t are understood)" in out


def documented_commands(path: Path) -> list[list[str]]:
    """The gptkit command lines in a file's shell code blocks (or a whole shell script):
    continuation lines joined, ``$VARIABLES`` filled with a placeholder; lines with ``...``
    (an elided command) skipped."""
    text = path.read_text()
    if path.suffix == ".md":
        blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)
        text = "\n".join(body for lang, body in blocks if lang in SHELL_BLOCKS)
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"^\$ ", "", line.replace("$GPTKIT", "gptkit"))
        if not re.search(r"(^|[\s/])gptkit [a-z]", line):
            continue  # output or prose, which shlex may not split
        words = shlex.split(re.sub(r"\$\{?\w+\}?", "x", line), comments=True)
        starts = [
            i
            for i, w in enumerate(words[:-1])
            if (w == "gptkit" or w.endswith("/gptkit")) and words[i + 1][:1].isalpha()
        ]
        if starts and "..." not in words:
            out.append(words[starts[0] + 1 :])
    return out


DOCUMENTED = [
    REPO / "README.md",
    REPO / "README.zh-CN.md",
    *sorted((REPO / "recipes").glob("*.sh")),
]


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: p.name)
def test_every_documented_command_line_parses(path: Path) -> None:
    cmds = documented_commands(path)
    assert cmds, f"{path.name} shows no gptkit command"
    parser = build_parser()
    for argv in cmds:
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{path.name}: gptkit {shlex.join(argv)}") from e


@pytest.mark.parametrize("verb", sorted(MODEL_VERBS))
def test_a_verb_without_model_says_how_to_get_one(
    verb: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a verb without --model must not try to load (or download) one")

    monkeypatch.setattr("gptkit.checkpoint.load", no_loading)
    assert main([verb, *MODEL_VERBS[verb]]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {NO_MODEL}\n"
    assert "make models" in err and "Traceback" not in err


@pytest.mark.parametrize("verb", [["train"], ["finetune", "sft"]])
def test_training_verbs_tune_the_process_on_cpu(
    verb: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    training = sys.modules["gptkit.train"]  # the package (gptkit.train is also the function)
    monkeypatch.setattr(training, "keep_freed_memory", lambda: calls.append(1) or True)
    argv = [*verb, "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--device", "cpu"]) == 2  # no such data: refused after the tuning
    assert calls == [1]
