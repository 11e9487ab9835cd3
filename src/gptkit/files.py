"""Files that are never left half-written, and where a run keeps its checkpoints.

Everything gptkit writes (shards, meta.json, checkpoints, metrics) goes to a temporary name in
the same directory and is renamed into place once complete; ``os.replace`` is atomic on
POSIX and Windows, so a killed process leaves either the old file or the new one (and, at
worst, a temporary that :func:`remove_stale_temps` clears on the next start).

A checkpoint directory also carries ``manifest.json``: the sha256 of every other file in it
(as Hugging Face's ``huggingface_hub`` and OCI image manifests pin each blob), so a flipped
bit is caught on load instead of generating quietly (:func:`verify_manifest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# What atomic_dir leaves when killed: ".step-0000500.<random>.tmp" (being built) and
# ".step-0000500.old" (the previous copy, between its two renames).
_STALE = re.compile(r"^\.step-\d+\.(.+\.tmp|old)$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gptkit.manifest/1"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a training run, oldest first (temporaries are skipped)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / "config.json").exists():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_stale_temps(run_dir: str | Path) -> list[Path]:
    """Delete the temporary checkpoint directories a killed save left in ``run_dir``; call
    it when a run starts (never while one of its saves may be under way). Returns them."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    stale = [d for d in root.iterdir() if _STALE.match(d.name) and d.is_dir()]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


# -- integrity -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _sha256_files(paths: list[Path]) -> list[str]:
    # hashlib releases the GIL on large buffers: the weights and the optimizer state of a
    # checkpoint hash side by side.
    with ThreadPoolExecutor(max(1, min(4, len(paths)))) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(directory: Path) -> None:
    """Write ``manifest.json``: the sha256 of every file in ``directory`` (call it last)."""
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    sums = dict(zip(files, _sha256_files([directory / n for n in files]), strict=True))
    atomic_write_json(directory / MANIFEST, {"format": MANIFEST_FORMAT, "sha256": sums})


def read_manifest(directory: Path) -> dict[str, str] | None:
    """The file -> sha256 table of ``directory``'s manifest; None when it has none (a
    checkpoint written before manifests existed)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GptkitError(f"{path} is corrupted ({e}); the checkpoint is damaged") from None
    data = data if isinstance(data, dict) else {}
    sums = data.get("sha256")
    if (
        data.get("format") != MANIFEST_FORMAT
        or not isinstance(sums, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items())
        or not all(Path(k).name == k and k not in (".", "..") for k in sums)  # no paths out
    ):
        raise GptkitError(f"{path} is not a gptkit manifest; the checkpoint is damaged")
    return sums


def verify_manifest(
    directory: Path, names: list[str] | None = None, skip: tuple[str, ...] = ()
) -> None:
    """Check files of ``directory`` against its manifest (when it has one): ``names`` (default:
    every file the manifest lists) less ``skip``. A listed file must exist and have its
    sha256; a file the manifest does not list (written by hand, later) is not checked."""
    sums = read_manifest(directory)
    if sums is None:
        return
    todo = [n for n in (sums if names is None else names) if n in sums and n not in skip]
    for name in todo:
        if not (directory / name).is_file():
            raise GptkitError(f"{directory / name} is missing; the checkpoint is incomplete")
    found = _sha256_files([directory / n for n in todo])
    for name, digest in zip(todo, found, strict=True):
        path = directory / name
        if digest != sums[name]:
            raise GptkitError(
                f"{path} does not match the sha256 in {MANIFEST}: it is truncated or "
                "corrupted; use an earlier checkpoint (or load with verify=False to skip this)"
            )


# -- logs ------------------------------------------------------------------------------------


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON object rows of a log such as ``metrics.jsonl``; a partial last line (what a
    killed writer leaves) is skipped, a damaged line before it is an error."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            if n == len(lines):
                break  # cut off mid-write
            raise GptkitError(f"{path} line {n} is not a JSON object; delete or fix that line")
        rows.append(row)
    return rows
