"""The package's shape: modules import only from lower layers (DESIGN.md), configs round-trip."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from gptkit.config import PRESETS, ModelConfig, SampleConfig, TrainConfig
from gptkit.errors import GptkitError
from gptkit.model import GPT

SRC = Path(__file__).resolve().parents[1] / "src" / "gptkit"

#: layer of each top-level module or package (DESIGN.md "Layout")
LAYERS = {
    "errors": 0,
    "config": 0,
    "files": 0,
    "tokenizer": 1,
    "data": 2,
    "model": 3,
    "checkpoint": 4,
    "train": 5,
    "generate": 6,
    "eval": 7,
    "compress": 7,
    "inspect": 7,
    "serve": 8,
    "cli": 9,
    "pipeline": 9,
    "demo": 9,
    "__main__": 9,
    "__init__": 9,
}


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "gptkit":
        return None
    return LAYERS[parts[1]] if len(parts) > 1 else 9


def _module_of(path: Path) -> str:
    """``gptkit.eval.tasks`` for src/gptkit/eval/tasks.py; a package's name for its __init__."""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    """Whether ``name`` is a module of ours: a .py file, a package, or a C extension (a
    ``.so``/``.pyd`` file, or its ``.c`` source before it is built)."""
    rel = SRC.parent.joinpath(*name.split("."))
    return (
        (rel / "__init__.py").is_file()
        or any(rel.with_suffix(ext).is_file() for ext in (".py", ".c"))
        or any(rel.parent.glob(f"{rel.name}.*.so"))
        or any(rel.parent.glob(f"{rel.name}.*.pyd"))
    )


def _type_checking_only(tree: ast.AST) -> set[ast.AST]:
    """The import nodes under ``if TYPE_CHECKING:``, which never run."""
    return {
        node
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
        if isinstance(node, ast.Import | ast.ImportFrom)
    }


def imports_of(path: Path, runtime_only: bool = False) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions and classes (ast.walk
    sees them all), relative imports resolved. ``from pkg import name`` imports ``pkg.name``
    where that is a module, else ``pkg``; the parent packages Python imports on the way are
    not counted. ``runtime_only`` leaves out TYPE_CHECKING imports."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree) if runtime_only else set()
    own = _module_of(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                anchor = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join([*anchor, *([base] if base else [])])
            modules = {f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")}
            found |= modules if len(modules) == len(node.names) else modules | {base}
    return found


def test_modules_import_only_from_lower_layers() -> None:
    problems = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        own = LAYERS.get(rel.parts[0].removesuffix(".py"))
        assert own is not None, f"{rel} is in no layer; add it to LAYERS and DESIGN.md"
        for name in sorted(imports_of(path)):
            layer = _layer_of(name)
            same_package = name.count(".") > 0 and rel.parts[0] == name.split(".")[1]
            if layer is not None and layer > own and not same_package:
                problems.append(f"{rel} (layer {own}) imports {name} (layer {layer})")
    assert not problems, "\n".join(problems)


#: import circles known today, each to be broken by the owner of its files, then deleted here
#: (a set of the modules of one circle)
ALLOWED_CIRCLES: list[frozenset[str]] = []


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected groups of two or more modules: each holds an import circle."""
    reach: dict[str, set[str]] = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        reach[start] = seen
    groups = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph}
    return sorted((g for g in groups if len(g) > 1), key=sorted)


def test_no_import_circles() -> None:
    """No two modules import each other, directly or around a longer circle, counting the
    imports inside functions (which only postpone a circle; gptkit.eval.code and tasks had
    one). A package importing its own modules in __init__ is the package's interface, so a
    module importing its own package's __init__ is the circle, and is flagged too."""
    modules = {_module_of(p): p for p in SRC.rglob("*.py")}
    graph = {
        m: {n for n in imports_of(p, runtime_only=True) if n in modules and n != m}
        for m, p in modules.items()
    }
    found = [c for c in _circles(graph) if c not in ALLOWED_CIRCLES]
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(sorted(c)) for c in found)
    stale = [c for c in ALLOWED_CIRCLES if c not in _circles(graph)]
    assert not stale, f"these circles are gone; remove them from ALLOWED_CIRCLES: {stale}"


@pytest.mark.parametrize("cls", [ModelConfig, TrainConfig, SampleConfig])
def test_configs_round_trip_json(cls: type, tmp_path: Path) -> None:
    cfg = cls()
    cfg.save(tmp_path / "c.json")
    assert cls.load(tmp_path / "c.json") == cfg
    with pytest.raises(GptkitError, match="unknown field"):
        cls.from_dict({"not_a_field": 1})


def test_configs_reject_bad_values() -> None:
    with pytest.raises(GptkitError, match="divisible"):
        ModelConfig(n_embd=100, n_head=3)
    with pytest.raises(GptkitError, match="temperature"):
        SampleConfig(temperature=-1)
    with pytest.raises(GptkitError, match="top_p"):
        SampleConfig(top_p=0)
    with pytest.raises(GptkitError, match="precision"):
        TrainConfig(precision="fp8")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_count_params_without_memory(name: str) -> None:
    preset = PRESETS[name]
    model_cfg = ModelConfig(**({"vocab_size": 50257} | preset.model))
    TrainConfig(**preset.train)
    with torch.device("meta"):  # no memory, even for the largest presets
        model = GPT(model_cfg)
    assert model.num_params() == model_cfg.num_params()
    assert preset.source, "every preset names where its numbers come from"


def test_config_fields_are_plain_json_types() -> None:
    for cls in (ModelConfig, TrainConfig, SampleConfig):
        for f in dataclasses.fields(cls):
            assert "torch" not in str(f.type)
