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
    "serve": 8,
    "cli": 9,
    "demo": 9,
    "__main__": 9,
    "__init__": 9,
}


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "gptkit":
        return None
    return LAYERS[parts[1]] if len(parts) > 1 else 9


def test_modules_import_only_from_lower_layers() -> None:
    problems = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        own = LAYERS.get(rel.parts[0].removesuffix(".py"))
        assert own is not None, f"{rel} is in no layer; add it to LAYERS and DESIGN.md"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                layer = _layer_of(name)
                if layer is not None and layer > own and rel.parts[0] != name.split(".")[1]:
                    problems.append(f"{rel} (layer {own}) imports {name} (layer {layer})")
    assert not problems, "\n".join(problems)


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
