"""AdamW with decay on matrices only, and the warm-up + cosine learning-rate schedule.

Follows GPT-2/GPT-3 practice as nanoGPT implements it: weight decay on 2-D weights
(linear layers and embeddings), none on biases and norm gains; linear warm-up, then cosine
decay to ``min_lr``, then constant.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gptkit.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    device = next(model.parameters()).device
    # The fused kernel exists on CPU and CUDA since torch 2.4 and is the fastest on both.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=fused,
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    decay = cfg.lr_decay_steps
    if step >= decay:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
