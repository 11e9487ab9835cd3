"""The KV cache: keys and values of every layer, for generation and the serving pool.

One constructor allocates a cache; the methods below derive the other forms decoding needs
from it, sharing its tensors (litgpt's ``KVCache`` and gpt-fast's static cache are the
references)::

    pool = KVCache(config, 16, 256)    # the serving engine's pool: 16 rows
    view = pool.rows(3, 5)             # rows 3:5 of it; the model writes into the pool
    step = cache.static()              # every slot counts as written (compiled decoding)
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from gptkit.config import ModelConfig


class KVCache:
    """Keys and values of every layer, pre-allocated for ``max_len`` positions.

    Row ``b`` holds ``pos[b]`` tokens; the next forward writes its tokens at slots
    ``pos[b], pos[b] + 1, ...`` (slot index == position). A batch of prompts of different
    lengths is prefilled right-padded, then ``set_pos(lengths)`` rewinds each row so its
    padding is overwritten and, since a query only sees slots <= its own position, never read.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.max_len = min(max_len or config.block_size, config.block_size)
        shape = (batch_size, config.kv_heads, self.max_len, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # max(pos), kept as a Python int to avoid a device sync per step

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def set_pos(self, pos: Tensor | list[int]) -> None:
        self.pos = torch.as_tensor(pos, dtype=torch.long, device=self.pos.device).clone()
        self.length = int(self.pos.max()) if len(self.pos) else 0

    def reset(self) -> None:
        self.set_pos(torch.zeros_like(self.pos))

    # -- views that share this cache's tensors --------------------------------------------

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows ``start:stop`` whose keys and values are views of this one's, so
        the model writes into this cache; its positions are a copy (the model advances them
        by replacing the tensor, so the owner of the pool keeps its own positions)."""
        view = copy.copy(self)
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.set_pos(self.pos[start:stop])
        return view

    def static(self) -> KVCache:
        """This cache as compiled decoding sees it: every slot counts as written, so
        attention spans all ``max_len`` slots and the shapes never change from one step to
        the next; the position mask keeps each query to the slots it has written."""
        view = copy.copy(self)
        view.length = self.max_len - 1  # a step adds one token: all max_len slots
        return view

    # -- changes in place ------------------------------------------------------------------

    def keep(self, index: Tensor) -> None:
        """Keep only the rows ``index`` (a 1-D long tensor), in that order. A row may be
        named more than once: beam search copies each prompt's row to its beams and, every
        step, reorders the rows to follow the beams it keeps (no prefix is recomputed)."""
        self.k = [k[index] for k in self.k]
        self.v = [v[index] for v in self.v]
        self.set_pos(self.pos[index])

    def rewind(self, length: int) -> None:
        """Forget every slot from ``length`` on: a row holding more tokens goes back to
        ``length`` (speculative decoding drops the draft tokens the model rejected). The
        slots keep their values until the next forward overwrites them; no query sees them
        before that, as with padding."""
        self.set_pos(self.pos.clamp(max=length))

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` (its written slots and position) into row ``dst``."""
        used = int(self.pos[src])
        for t in (*self.k, *self.v):
            t[dst, :, :used] = t[src, :, :used]
        self.pos[dst] = self.pos[src]

    def resize(self, max_len: int) -> None:
        """Re-allocate every layer for ``max_len`` positions, keeping the slots that fit."""
        kept = min(max_len, self.max_len)
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = old.new_zeros((*old.shape[:2], max_len, old.shape[3]))
                new[:, :, :kept] = old[:, :, :kept]
                store[i] = new
        self.max_len = max_len
