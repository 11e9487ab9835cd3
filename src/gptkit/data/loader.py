"""Batches from prepared token shards: random windows, resumable, aware of data-parallel ranks.

A prepared directory holds ``meta.json`` and flat token files (``train-00000.bin``, ...,
``val-00000.bin``) of uint16 or uint32, memory-mapped so a corpus larger than memory trains.
Each batch draws ``batch_size`` windows of ``block_size + 1`` tokens at random positions (as
nanoGPT does); the generator's state is the data position, so a resumed run draws the same
batches an uninterrupted one would.

Data parallelism: every rank holds the same generator and draws the same *global* batch of
``batch_size × world_size`` windows, then reads only its own ``batch_size`` of them (rows
``rank·B .. rank·B + B - 1``). The ranks' batches are disjoint parts of one global batch, so
N ranks with ``batch_size=B`` see exactly the rows one process sees with ``batch_size=N·B``,
and the generator's state (equal on every rank) resumes under any number of ranks.

``meta.json`` is checked field by field before it is used, each shard's ``file`` must name a
file inside the directory (a ``"../../etc/passwd"`` is refused, never read), and a shard's
ids must lie inside the vocabulary (checked once on load, rather than an IndexError deep in
training).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.errors import GptkitError

META = "meta.json"
FORMAT = "gptkit.shards/1"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def read_meta(directory: str | Path) -> dict[str, Any]:
    """``meta.json`` of a prepared directory, checked for the fields training needs."""
    directory = Path(directory)
    path = directory / META
    if not directory.is_dir():
        raise GptkitError(f"data directory {directory} does not exist; run `gptkit prepare` first")
    if not path.is_file():
        raise GptkitError(
            f"{directory} has no {META}; it is not a prepared data directory "
            "(run `gptkit prepare INPUT... --out DIR` first)"
        )
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise GptkitError(f"{path} is corrupted ({e}); prepare the data again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        what = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise GptkitError(f"{path} is not gptkit shard metadata (format {what!r})")
    _check_meta(meta, path)
    return meta


def _count(value: Any, positive: bool = False) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= int(positive)


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    """The fields training reads, each of the right type (a hand-edited or damaged file
    fails here in one line, not with a KeyError later)."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise GptkitError(f"{path}: {what}; prepare the data again")

    need(meta.get("dtype") in DTYPES, f"dtype {meta.get('dtype')!r} is not one of {list(DTYPES)}")
    need(_count(meta.get("vocab_size"), positive=True), "vocab_size is not a positive integer")
    need(isinstance(meta.get("tokenizer_hash"), str), "tokenizer_hash is missing")
    eos = meta.get("eos_id")
    need(eos is None or (_count(eos) and eos < meta["vocab_size"]), "eos_id is not a token id")
    splits = meta.get("splits")
    need(isinstance(splits, dict) and bool(splits), "splits is missing")
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        need(isinstance(shards, list), f"split {name!r} has no shard list")
        need(_count(split.get("tokens")), f"split {name!r} has no token count")
        for shard in shards:
            need(
                isinstance(shard, dict)
                and isinstance(shard.get("file"), str)
                and _count(shard.get("tokens")),
                f'a shard of split {name!r} is not {{"file": name, "tokens": count}}',
            )


class TokenShards:
    """The memory-mapped shards of one prepared directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        self.dtype = DTYPES[self.meta["dtype"]]
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int | None = self.meta.get("eos_id")
        self.tokenizer_hash: str = self.meta["tokenizer_hash"]

    def _shard_path(self, file: str) -> Path:
        """A shard's file, which must resolve inside the directory (symlinks followed)."""
        path = (self.directory / file).resolve()
        if not path.is_relative_to(self.directory.resolve()):
            raise GptkitError(
                f"{self.directory / META} names shard file {file!r}, which is outside "
                f"{self.directory}; refusing to read it (prepare the data again)"
            )
        return path

    def split(self, name: str) -> list[np.ndarray]:
        if name not in self.meta["splits"]:
            raise GptkitError(f"{self.directory} has no {name!r} split")
        arrays = []
        for shard in self.meta["splits"][name]["shards"]:
            path = self._shard_path(shard["file"])
            itemsize = np.dtype(self.dtype).itemsize
            if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
                raise GptkitError(
                    f"shard {path} is missing or has the wrong size; prepare the data again"
                )
            if shard["tokens"]:
                arrays.append(self._checked_ids(np.memmap(path, dtype=self.dtype, mode="r"), path))
        return arrays

    def _checked_ids(self, tokens: np.ndarray, path: Path) -> np.ndarray:
        """``tokens``, once every id is known to be inside the vocabulary (one pass over
        the map, in blocks so a large shard is never copied whole)."""
        top, step = 0, 1 << 24
        for i in range(0, len(tokens), step):
            top = max(top, int(tokens[i : i + step].max()))
        if top >= self.vocab_size:
            raise GptkitError(
                f"shard {path} holds token id {top}, outside the vocabulary of "
                f"{self.vocab_size}; the shard is damaged (prepare the data again)"
            )
        return tokens

    def num_tokens(self, name: str) -> int:
        return int(self.meta["splits"][name]["tokens"])


class BatchSampler:
    """Random windows from a list of token arrays.

    Args:
        arrays: token arrays (one per shard); a window never crosses two shards.
        block_size: tokens per input sequence; targets are shifted by one.
        batch_size: sequences per batch for this rank.
        seed: the generator seed, the same on every rank.
        rank, world_size: this process's share of a data-parallel run: it reads rows
            ``rank·batch_size ..`` of each global batch of ``batch_size × world_size``.
    """

    def __init__(
        self,
        arrays: list[np.ndarray],
        block_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.arrays = [a for a in arrays if len(a) > block_size]
        if not self.arrays:
            longest = max((len(a) for a in arrays), default=0)
            raise GptkitError(
                f"the data has no run of {block_size + 1} tokens (longest shard: {longest}); "
                "add text or lower --block-size"
            )
        self.block_size, self.batch_size = block_size, batch_size
        # Shards are weighted by how many windows start in them.
        counts = torch.tensor([len(a) - block_size for a in self.arrays], dtype=torch.float64)
        self.weights = counts / counts.sum()
        if not 0 <= rank < world_size:
            raise GptkitError(f"rank {rank} is outside a world of {world_size} processes")
        self.rank, self.world_size = rank, world_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch: inputs and targets, both int64 (B, T)."""
        B, T = self.batch_size, self.block_size
        G = B * self.world_size  # the global batch, drawn alike on every rank
        which = torch.multinomial(self.weights, G, replacement=True, generator=self.gen)
        starts = torch.rand(G, generator=self.gen, dtype=torch.float64)
        mine = slice(self.rank * B, (self.rank + 1) * B)
        rows = []
        for w, u in zip(which[mine].tolist(), starts[mine].tolist(), strict=True):
            a = self.arrays[w]
            i = int(u * (len(a) - T))
            rows.append(np.asarray(a[i : i + T + 1], dtype=np.int64))
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict[str, str]:
        return {"generator": base64.b64encode(self.gen.get_state().numpy().tobytes()).decode()}

    def load_state_dict(self, state: dict[str, str]) -> None:
        try:
            raw = np.frombuffer(base64.b64decode(state["generator"], validate=True), np.uint8)
        except (KeyError, TypeError, ValueError, binascii.Error):
            raw = np.zeros(0, np.uint8)
        if raw.size != self.gen.get_state().numel():
            raise GptkitError(
                "the saved data sampler state is damaged; resume from another checkpoint"
            )
        try:
            self.gen.set_state(torch.from_numpy(raw.copy()))
        except RuntimeError as e:
            raise GptkitError(f"the saved data sampler state is refused ({e})") from None
