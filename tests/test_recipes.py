"""Every recipe states its expected result and runs commands the CLI accepts (STYLE rule 11).

The recipes themselves take minutes each on real data, so they run outside the suite; here
each is parsed: its header, its shell syntax, and every gptkit command line against the
real argument parser.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from gptkit.cli import build_parser

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.sh"))
HEADER_KEYS = (
    "recipe",
    "application",
    "method",
    "model",
    "data",
    "subset",
    "expected",
    "hardware",
    "wall time",
)
VARIABLES = {"DATA": "/data", "MODEL": "model.gguf", "OUT": "/out", "GPTKIT": "gptkit"}


def header(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        m = re.match(r"# ([a-z ]+): (.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def commands(path: Path) -> list[list[str]]:
    """The gptkit command lines of a recipe, continuation lines joined, variables filled."""
    text = path.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.startswith("$GPTKIT "):
            filled = re.sub(r"\$(\w+)", lambda m: VARIABLES[m.group(1)], line)
            out.append(shlex.split(filled)[1:])
    return out


def test_there_is_a_recipe_per_application() -> None:
    names = {p.stem for p in RECIPES}
    assert {"sst2", "sms_spam", "multi30k", "tatoeba", "scitldr", "self_instruct"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_states_the_expected_result(path: Path) -> None:
    head = header(path)
    missing = [k for k in HEADER_KEYS if k not in head]
    assert not missing, f"{path.name} lacks header lines {missing}"
    assert head["recipe"] == path.stem
    assert re.search(r"\d", head["expected"]) or "above the base" in head["expected"]
    assert re.search(r"\d+ min", head["wall time"])
    subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_commands_parse(path: Path) -> None:
    cmds = commands(path)
    assert cmds, f"{path.name} runs no gptkit command"
    parser = build_parser()
    for argv in cmds:
        parser.parse_args(argv)  # argparse exits on an unknown flag or a bad value
    evals = [a for a in cmds if a[0] == "eval"]
    assert any("base.json" in " ".join(a) for a in evals), "no base-model score"
    assert any("tuned.json" in " ".join(a) for a in evals), "no fine-tuned score"
