"""The KV cache: keys and values of every layer, for generation and the serving pool."""

from __future__ import annotations

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
