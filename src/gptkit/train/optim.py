"""Optimizers and learning-rate schedules.

- ``adamw`` (the default) follows GPT-2/GPT-3 practice as nanoGPT implements it: weight decay
  on 2-D weights (linear layers and embeddings), none on biases and norm gains.
- ``muon`` (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks")
  replaces each hidden matrix's update by the nearest semi-orthogonal matrix to its Nesterov
  momentum, found by a few Newton-Schulz iterations; embeddings, the output head, norms and
  biases keep AdamW. On nanoGPT's small Shakespeare model it reached a given validation loss
  in about half the steps of AdamW (a side experiment, in the README's Benchmarks section).

Schedules: linear warm-up, then cosine decay to ``min_lr`` and constant after, or ``wsd``
(warm-up, stable, decay): constant ``lr`` until the last ``cooldown`` fraction of the steps,
then linear decay to ``min_lr``. Every parameter group follows the schedule in proportion to
its own ``lr_scale`` (Muon's groups: ``muon_lr / lr``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import Tensor, nn

from gptkit.config import TrainConfig
from gptkit.model.quant import PACKS_BF16

# The quintic Newton-Schulz coefficients of the Muon paper: they push every singular value
# of a matrix with spectral norm <= 1 into roughly [0.7, 1.2] in 5 steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def param_groups(
    model: nn.Module, weight_decay: float, skip: Collection[int] = frozenset()
) -> list[dict]:
    """Trainable parameters (but those whose id is in ``skip``) in two AdamW groups: matrices
    with ``weight_decay``, vectors (biases, norm gains) without."""
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    decay = [p for p in params if p.dim() >= 2]  # tied weights appear once
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def is_hidden_matrix(name: str, p: Tensor) -> bool:
    """The matrices Muon trains: 2-D weights inside the transformer blocks (not embeddings,
    the output or classification head, norms, biases or LoRA adapters)."""
    return p.dim() == 2 and name.startswith("blocks.") and "lora" not in name


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    device = next(model.parameters()).device
    if cfg.optimizer == "muon":
        hidden = [
            p for n, p in model.named_parameters() if p.requires_grad and is_hidden_matrix(n, p)
        ]
        muon = dict(
            params=hidden, muon=True, lr_scale=cfg.muon_lr / cfg.lr, weight_decay=cfg.weight_decay
        )
        groups = [muon, *param_groups(model, cfg.weight_decay, skip={id(p) for p in hidden})]
        return Muon(
            [g for g in groups if g["params"]],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            momentum=cfg.muon_momentum,
        )
    # The fused kernel exists on CPU and CUDA since torch 2.4 and is the fastest on both.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=fused,
    )


def orthogonalize(g: Tensor, steps: int = 5) -> Tensor:
    """An approximately semi-orthogonal matrix with the singular vectors of ``g`` (each
    matrix of a batch ``(..., m, n)``): Newton-Schulz iterations in bf16 (fp32 on a CPU
    without native bf16, where bf16 products are ~70x slower), singular values landing near
    1 rather than on it, which Muon tolerates."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16() if g.device.type != "cpu" or PACKS_BF16 else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon on the groups marked ``muon=True``, AdamW on the others, as one optimizer (one
    ``state_dict`` for checkpoints). Matrices of the same shape are orthogonalized together.

    A Muon update of an ``m × n`` matrix is ``lr * sqrt(max(1, m / n)) * orthogonalize(
    nesterov_momentum(grad))``, with decoupled weight decay ``lr * weight_decay``.
    """

    def __init__(
        self,
        params: list[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        momentum: float = 0.95,
        eps: float = 1e-8,
        ns_steps: int = 5,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            momentum=momentum,
            eps=eps,
            ns_steps=ns_steps,
            weight_decay=0.0,
            muon=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_step(group, params)
            else:
                self._adamw_step(group, params)
        return loss

    def _muon_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        by_shape: dict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = defaultdict(list)
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            by_shape[tuple(p.shape)].append((p, p.grad.lerp(buf, mu)))  # Nesterov
        for shape, items in by_shape.items():
            updates = orthogonalize(torch.stack([u for _, u in items]), group["ns_steps"])
            scale = lr * math.sqrt(max(1.0, shape[0] / shape[1]))
            for (p, _), u in zip(items, updates, strict=True):
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(u.to(p.dtype), alpha=-scale)

    def _adamw_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        (b1, b2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros(())
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            if wd:
                p.mul_(1 - lr * wd)
            denom = (v / (1 - b2**t)).sqrt_().add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1**t))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "wsd":
        decay_from = cfg.max_steps - cfg.cooldown * cfg.max_steps
        if step < decay_from:
            return cfg.lr
        progress = min(1.0, (step - decay_from) / max(1.0, cfg.max_steps - decay_from))
        return cfg.lr + progress * (cfg.min_lr - cfg.lr)
    decay = cfg.lr_decay_steps
    if step >= decay:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
