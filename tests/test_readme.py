"""The README's commands work: every gptkit command line uses flags its verb has, the cheap
ones run for real on a tiny corpus, and the Chinese README shows the same commands.

Commands are read from the ```bash blocks (continuation lines joined, comments dropped);
the Python tour is the ```python block that calls ``gptkit.load``. The cheap set is named
below (``CHEAP``), each with the flags appended to keep it to seconds; a README edit that
drops one of them fails here rather than leaving it untested.
"""

from __future__ import annotations

import contextlib
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gptkit import GPT
from gptkit.cli import main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_ZH = REPO / "README.zh-CN.md"
DOCS = (README, README_ZH, REPO / "bench" / "README.md")
MAX_LINES = 400

#: a stand-in for tiny Shakespeare: every character of the README's prompts, ~4 KB
CORPUS = (
    "ROMEO:\nBut soft, what light through yonder window breaks?\n\n"
    "KING:\nWe are not ready yet; tell them to wait.\n\n"
    "QUEEN:\nMy lord, the night is young and full of voices.\n\n"
) * 25

#: README command -> flags appended for the test (later flags win), in the README's order
FAST_TRAIN = ["--max-steps", "4", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1"]
FAST_TRAIN += ["--precision", "fp32", "--no-progress"]  # fp32: no kernel build, no bar
SHORT = ["--max-new-tokens", "8"]
CHEAP = {
    "gptkit prepare input.txt --out data/shakespeare --tokenizer char": ["--no-progress"],
    "gptkit train --data data/shakespeare --out runs/shakespeare --preset nanogpt-cpu": FAST_TRAIN,
    "gptkit presets": [],
    'gptkit generate --model runs/shakespeare "ROMEO:" --temperature 0': SHORT,
    'gptkit generate --model runs/shakespeare "ROMEO:" --temperature 0.8 --top-k 40 --seed 1': (
        SHORT
    ),
    'gptkit generate --model runs/shakespeare "KING:" "QUEEN:" --max-new-tokens 100 '
    '--stop "\\n\\n"': SHORT,
    "gptkit eval --model runs/shakespeare --task text --data input.txt": ["--no-progress"],
    "gptkit export --model runs/shakespeare --format hf --out export/shakespeare-hf": [],
}
#: the Python tour, shortened the same way (text replaced before it runs)
TOUR_FAST = {"max_steps=50": "max_steps=3"}


def bash_lines(text: str) -> list[str]:
    """The lines of the ```bash blocks, continuation lines joined."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)
    return [ln.strip() for b in blocks for ln in b.replace("\\\n", " ").splitlines() if ln]


def gptkit_argv(line: str) -> list[str] | None:
    """The arguments after ``gptkit`` (or torchrun's ``-m gptkit``), or None."""
    words = shlex.split(line, comments=True)
    while words and re.fullmatch(r"\w+=\S*", words[0]):  # VAR=value prefixes
        words.pop(0)
    if words[:1] == ["gptkit"]:
        return words[1:]
    if words[:1] == ["torchrun"] and "gptkit" in words:
        return words[words.index("gptkit") + 1 :]
    return None


def gptkit_lines(path: Path) -> list[str]:
    """The gptkit command lines of a document's bash blocks."""
    return [ln for ln in bash_lines(path.read_text()) if gptkit_argv(ln) is not None]


def shell_commands(path: Path) -> set[tuple[str, ...]]:
    """Every shell command of the bash blocks, as words, comments dropped."""
    words = (tuple(shlex.split(ln, comments=True)) for ln in bash_lines(path.read_text()))
    return {w for w in words if w}


def python_tour() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    code = next(b for b in blocks if "gptkit.load(" in b)
    for long, short in TOUR_FAST.items():
        assert long in code, f"the Python tour no longer has {long}; update TOUR_FAST"
        code = code.replace(long, short)
    return code


def run(line: str, extra: list[str]) -> None:
    argv = gptkit_argv(line)
    assert argv is not None
    code = main(argv + extra)
    assert code in (0, None), f"`{line}` exited with {code}"


def verb_help(verb: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*verb, "--help"])
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def test_every_gptkit_command_uses_flags_its_verb_has(capsys: pytest.CaptureFixture[str]) -> None:
    helps: dict[tuple[str, ...], str] = {}
    lines = gptkit_lines(README)
    assert len(lines) >= 20
    for line in lines:
        argv = gptkit_argv(line) or []
        verb = tuple(argv[:2] if argv[0] == "finetune" else argv[:1])
        if verb not in helps:
            helps[verb] = verb_help(list(verb), capsys)
        flags = {a.split("=")[0] for a in argv if a.startswith("--")}
        missing = [f for f in flags if not re.search(rf"(?<![\w-]){f}(?![\w-])", helps[verb])]
        assert not missing, f"`{line}`: gptkit {' '.join(verb)} has no {missing}"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread: on shared cores a second one mostly waits at barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's cheap commands, run in order in a fresh directory."""
    readme = set(gptkit_lines(README))
    absent = [line for line in CHEAP if line not in readme]
    assert not absent, f"the README no longer shows {absent}; update CHEAP"
    work = tmp_path_factory.mktemp("tour")
    (work / "input.txt").write_text(CORPUS)
    with pytest.MonkeyPatch.context() as env, contextlib.chdir(work), one_thread():
        env.setenv("GPTKIT_KERNELS", "0")  # the C++ kernels' first build would take ~30 s
        for line, extra in CHEAP.items():
            run(line, extra)
    return work


def test_cheap_commands_run(tour: Path) -> None:
    assert (tour / "data" / "shakespeare" / "meta.json").is_file()
    assert (tour / "runs" / "shakespeare").is_dir()
    assert (tour / "export" / "shakespeare-hf" / "config.json").is_file()


def test_python_tour_runs(tour: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTKIT_KERNELS", "0")
    monkeypatch.chdir(tour)
    names: dict[str, object] = {}
    with one_thread():
        exec(compile(python_tour(), "README.md", "exec"), names)
    assert isinstance(names["model"], GPT)
    assert (tour / "runs" / "tiny").is_dir()


def test_readme_is_short_and_both_languages_show_the_same_commands() -> None:
    assert len(README.read_text().splitlines()) <= MAX_LINES
    assert len(README_ZH.read_text().splitlines()) <= MAX_LINES
    assert set(gptkit_lines(README_ZH)) == set(gptkit_lines(README))
    assert shell_commands(README_ZH) == shell_commands(README)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_no_machine_paths(path: Path) -> None:
    found = re.findall(r"/(?:work|root|home|tmp)/\S*", path.read_text())
    assert not found, f"{path.name} names machine paths: {found}"
