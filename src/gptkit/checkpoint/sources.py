"""What a model source names: a path, a known short name, or a Hugging Face hub id.

A known name (``gpt2``, ``smollm2-135m``, ...) resolves to a copy on this machine first, so a
machine without network runs what it has:

1. the Hugging Face hub cache, when huggingface_hub is installed and holds a snapshot;
2. a GGUF file in ``models/`` under the working directory whose name, up to its first dot,
   is the short name or the hub repository's (``make models`` puts
   ``SmolLM2-135M-Instruct.Q4_1.gguf`` there);
3. else the hub id, downloaded into the cache; offline, or without huggingface_hub, one line
   says so and how to get a model.

The SmolLM2 names are the Instruct models: they carry the chat template that ``gptkit chat``
and the server use, and ``make models`` fetches the same model.
"""

from __future__ import annotations

import re
from pathlib import Path

from gptkit.checkpoint.hf import GET_A_MODEL, hub_snapshot
from gptkit.errors import GptkitError

#: short name -> hub id
KNOWN_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
}
#: where ``make models`` puts GGUF files (relative to the working directory)
MODELS_DIR = Path("models")


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def looks_like_hub_id(source: str) -> bool:
    """Whether ``source`` has the shape of a hub id (``org/name``)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def local_gguf(name: str, models_dir: Path = MODELS_DIR) -> Path | None:
    """The first GGUF file in ``models_dir`` named for the known model ``name``, or None."""
    names = {name, KNOWN_MODELS[name].split("/")[1].lower()}
    if not models_dir.is_dir():
        return None
    found = [p for p in models_dir.glob("*.gguf") if p.name.split(".")[0].lower() in names]
    return min(found, default=None)


def resolve_known(name: str) -> Path:
    """The local directory or file of the known model ``name`` (see the module docstring)."""
    repo_id = KNOWN_MODELS[name]
    try:
        return hub_snapshot(repo_id, local_only=True)
    except GptkitError:  # not cached, or no huggingface_hub: look further
        pass
    gguf = local_gguf(name)
    if gguf is not None:
        return gguf
    try:
        return hub_snapshot(repo_id)
    except GptkitError as e:
        raise GptkitError(f"{name}: {e}") from None


def resolve(source: str | Path) -> Path:
    """The local path of a model source: the path itself when it exists, a known name's copy
    (or download), or a hub id's snapshot.

    Raises:
        GptkitError: the source is none of these, or cannot be fetched (see :data:`GET_A_MODEL`).
    """
    path = Path(source)
    if path.exists():
        return path
    if str(source) in KNOWN_MODELS:
        return resolve_known(str(source))
    if looks_like_hub_id(str(source)):
        return hub_snapshot(str(source))
    known = ", ".join(KNOWN_MODELS)
    raise GptkitError(
        f"model source {source} does not exist; pass a checkpoint directory, a Hugging Face "
        f"model directory, a .gguf file, a hub id (org/name) or a known name ({known}); "
        f"{GET_A_MODEL}"
    )
