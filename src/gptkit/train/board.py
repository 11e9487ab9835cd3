"""Training, watched in TensorBoard: ``gptkit train --tensorboard DIR``.

Beside ``metrics.jsonl`` and ``loss.png`` the loop writes, through
``torch.utils.tensorboard.SummaryWriter`` (TensorBoard's event files; ``tensorboard
--logdir DIR`` shows them), every logged row's numbers as scalars (loss, learning rate,
tokens/s, validation loss and perplexity) plus the gradient norm, the model FLOPs per
second and the model FLOPs utilisation (MFU), and every ``histogram_every`` steps a
histogram of each weight and its gradient.

FLOPs per token follow PaLM's accounting (Chowdhery et al. 2022, appendix B): 6 per
non-embedding weight plus 12 · layers · width · sequence length for attention, forward and
backward. MFU divides the achieved rate by the device's dense bf16 peak where it is known
(a few NVIDIA data-centre GPUs, from their data sheets); elsewhere only the achieved rate is
written. TensorBoard is optional: ``pip install 'gptkit[tensorboard]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptkit.config import ModelConfig
from gptkit.errors import GptkitError

# dense bf16 tensor-core peak, FLOP/s, from NVIDIA's data sheets (SXM parts)
PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L4": 121e12, "A10G": 125e12}


def flops_per_token(config: ModelConfig, seq_len: int, non_embedding_params: int) -> float:
    """Training FLOPs per token, forward and backward (PaLM, appendix B)."""
    attention = 12 * config.n_layer * config.n_head * config.head_size * seq_len
    return 6 * non_embedding_params + attention


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s where :data:`PEAK_BF16` knows it, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


class Board:
    """The TensorBoard writer of one run (rank 0 only)."""

    def __init__(
        self,
        logdir: str | Path,
        flops: float,
        peak: float | None,
        histogram_every: int,
        first_step: int,
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer imports the tensorboard package
            raise GptkitError(
                "--tensorboard needs the tensorboard package: pip install 'gptkit[tensorboard]'"
                " (or pip install tensorboard)"
            ) from None
        # purge_step: a resumed run drops the events a killed run wrote after its checkpoint
        self.writer = SummaryWriter(str(logdir), purge_step=first_step + 1 if first_step else None)
        self.flops, self.peak, self.histogram_every = flops, peak, histogram_every
        self.grad_norm: float | None = None

    def wants_gradients(self, step: int, log_every: int) -> bool:
        """Whether step ``step`` needs the gradients seen (its norm or its histograms)."""
        return step % log_every == 0 or self.histograms_due(step)

    def histograms_due(self, step: int) -> bool:
        return self.histogram_every > 0 and step % self.histogram_every == 0

    def gradients(self, step: int, model: nn.Module, norm: torch.Tensor | None) -> None:
        """Before the optimizer step: the gradient norm (``norm`` from clipping, else
        computed here) and, when due, each weight's and gradient's histogram."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if norm is None and grads:
            norm = torch.nn.utils.get_total_norm(grads)
        self.grad_norm = float(norm) if norm is not None else None
        if not self.histograms_due(step):
            return
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
            if p.grad is not None:
                self.writer.add_histogram(f"gradients/{name}", p.grad.float().cpu(), step)

    def log(self, row: dict[str, Any]) -> None:
        """A metrics.jsonl row's numbers as scalars; with tokens/s, FLOP/s and MFU too."""
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self.writer.add_scalar(tag, value, step)
        if "tokens_per_s" in row:
            achieved = row["tokens_per_s"] * self.flops
            self.writer.add_scalar("perf/model_flops_per_s", achieved, step)
            if self.peak:
                self.writer.add_scalar("perf/mfu", achieved / self.peak, step)
            if self.grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", self.grad_norm, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
