"""The one training loop, for every objective: next-token prediction over prepared shards,
SFT over examples whose prompt tokens carry no loss, GPT-1's classification fine-tuning;
with all weights or LoRA adapters trainable. The objectives differ only in data and loss
(:mod:`gptkit.train.objectives`); what comes before the first step (configs, model, data,
optimizer, resumed state) is :mod:`gptkit.train.setup`.

Per optimizer step: ``grad_accum`` micro-batches under autocast, gradient clipping, AdamW
with the warm-up + cosine schedule. Every ``eval_every`` steps it measures validation loss
and perplexity; every ``save_every`` steps it writes a complete checkpoint atomically. A
checkpoint carries the optimizer moments, the data sampler's generator and the global RNG,
so ``resume=True`` continues with exactly the losses an uninterrupted run would have.
Ctrl-C finishes the current step, saves, and returns.

Under ``torchrun`` the same loop runs once per process (see ``gptkit.train.distributed``):
each rank trains its rows of every global batch, losses are averaged over ranks, and rank 0
alone logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from gptkit.checkpoint import save_checkpoint
from gptkit.checkpoint.native import rng_state
from gptkit.errors import GptkitError
from gptkit.files import (
    atomic_path,
    atomic_write_text,
    list_checkpoints,
    read_jsonl_rows,
    remove_stale_temps,
    step_dir,
)
from gptkit.model.lora import has_lora, merge_lora
from gptkit.train import distributed
from gptkit.train.board import Board, flops_per_token, peak_flops
from gptkit.train.objectives import autocast, batch_loss
from gptkit.train.optim import lr_at
from gptkit.train.setup import Objective, Request, Run, setup


def train(
    data: str | Path,
    out: str | Path,
    preset: str | None = "nanogpt-cpu",
    resume: bool = False,
    init_from: str | None = None,
    val_data: str | None = None,
    chat: bool | None = None,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_targets: str = "qkv,proj,fc",
    merge: bool = False,
    objective: Objective = "auto",
    labels: str | None = None,
    lm_weight: float = 0.5,
    pack: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a GPT: pretraining on prepared token shards, supervised fine-tuning on JSONL
    examples (loss on the answers only), or GPT-1's classification fine-tuning.

    Args:
        data: a directory written by ``gptkit prepare``, a .jsonl file of SFT examples, or
            for ``objective="classify"`` a labelled file (.tsv ``label<TAB>text[<TAB>text_b]``
            or .jsonl ``{"text", "label"[, "text_b"]}``).
        out: the run directory: checkpoints/, metrics.jsonl, loss.png.
        preset: named starting configuration (see ``gptkit.config.PRESETS``).
        resume: continue the run in ``out`` from its newest checkpoint.
        init_from: start from the weights of this model (a fresh optimizer): any source
            ``gptkit.load`` takes (a checkpoint, a Hugging Face directory, a .gguf file).
        val_data: for .jsonl data, the validation examples (default: the last 5%).
        chat: render .jsonl examples with the model's chat template (default: when it has one).
        lora_rank: > 0 trains LoRA adapters of this rank instead of all the weights.
        lora_alpha: LoRA scale numerator (the update is alpha / rank * B A).
        lora_dropout: dropout on the LoRA input path.
        lora_targets: comma-separated layer names to adapt (qkv, proj, fc, attn.proj, ...).
        merge: after LoRA training, also write the merged model to OUT/merged.
        objective: lm (shards), sft (.jsonl), classify, or auto (from the data).
        labels: classify: comma-separated label names in head order (default: the
            distinct labels of the data, sorted); integer labels in the data index them.
        lm_weight: classify: λ, the weight of the auxiliary language-modelling loss.
        pack: sft: pack several short examples into each row (no cross-example attention).
        progress: show a progress bar.
        overrides: any ModelConfig or TrainConfig field, e.g. ``max_steps=100``.

    Returns a summary: final step, losses, checkpoint path, tokens/s.
    """
    req = Request(
        data=Path(data),
        out=Path(out),
        preset=preset,
        resume=resume,
        init_from=init_from,
        val_data=val_data,
        chat=chat,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_targets=lora_targets,
        objective=objective,
        labels=labels,
        lm_weight=lm_weight,
        pack=pack,
        overrides=overrides,
    )
    run = setup(req)
    return _loop(run, progress and run.ranks.is_main, merge)


@dataclass
class _Tally:
    """What the loop counts as it goes, for the metrics, the progress bar and the summary."""

    saved_step: int | None  # the step of the newest checkpoint of this run
    start: float = field(default_factory=time.perf_counter)  # wall time: with evals, saving
    train_time: float = 0.0  # seconds in training steps alone
    train_tokens: int = 0
    val_loss: float | None = None
    interrupted: bool = False

    def add(self, tokens: int, seconds: float) -> float:
        """Count one training step; returns the tokens per second so far."""
        self.train_time += seconds
        self.train_tokens += tokens
        return self.train_tokens / self.train_time


def _loop(run: Run, progress: bool, merge: bool) -> dict[str, Any]:
    """Step ``run`` to ``max_steps`` (or its target loss, or Ctrl-C), logging, validating
    and saving on schedule; returns the summary."""
    cfg = run.train_cfg
    if run.ranks.is_main:  # what a save killed in an earlier run left behind
        remove_stale_temps(run.request.out)
    metrics = _Metrics(run)
    summary = _summary(run)
    bar = tqdm(
        total=cfg.max_steps, initial=run.step, disable=not progress, unit="step",
        dynamic_ncols=True, desc="train",
    )  # fmt: skip
    say: Callable[[str], None] = bar.write if progress else lambda _: None
    tally = _Tally(saved_step=run.step if run.request.resume else None)
    with metrics, _sigint_flag() as flag:
        while run.step < cfg.max_steps:
            lr, tokens, seconds = _step(run, metrics.board)
            tok_s = tally.add(tokens, seconds)
            if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
                row = {"step": run.step, "loss": run.last_loss, "lr": lr}
                metrics.log(row | {"tokens_per_s": round(tok_s, 1)})
            bar.set_postfix(loss=f"{run.last_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(1)
            done = run.step == cfg.max_steps
            if (cfg.eval_every and run.step % cfg.eval_every == 0) or done:
                done = _validate(run, tally, metrics, summary, say) or done
                metrics.plot(done)
            if distributed.any_rank(flag["stop"], run.device):
                tally.interrupted = True
                break
            if (cfg.save_every and run.step % cfg.save_every == 0) or done:
                tally.saved_step = _save(run)
            if done:
                break
    bar.close()
    return _finish(run, tally, metrics, summary, merge)


def _step(run: Run, board: Board | None = None) -> tuple[float, int, float]:
    """One optimizer step: ``grad_accum`` micro-batches under autocast (gradients synced
    across ranks on the last), clipping, the optimizer at the schedule's learning rate;
    ``board`` sees the gradients before they are freed.
    Advances ``run.step`` and sets ``run.last_loss`` (the mean over micro-batches and ranks);
    returns the learning rate, the tokens of all ranks, and the seconds taken."""
    t0 = time.perf_counter()
    cfg, device = run.train_cfg, run.device
    lr = lr_at(run.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    loss_sum = torch.zeros((), device=device)
    tokens = 0
    for micro in range(cfg.grad_accum):
        batch = tuple(t.to(device, non_blocking=True) for t in run.data.sampler.next())
        tokens += batch[0].numel() * run.ranks.world_size
        with distributed.gradient_sync(run.train_module, micro == cfg.grad_accum - 1):
            with autocast(device, run.precision):
                loss = batch_loss(run.step_fn, batch, run.request.lm_weight)
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach()
    norm = None
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    # FSDP's shards are not whole on rank 0 (the board's only rank): no norm, no histograms
    if board is not None and not cfg.fsdp and board.wants_gradients(run.step + 1, cfg.log_every):
        board.gradients(run.step + 1, run.model, norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.last_loss = distributed.mean_over_ranks(loss_sum).item() / cfg.grad_accum
    if not math.isfinite(run.last_loss):
        raise GptkitError(
            f"loss became {run.last_loss} at step {run.step}; lower --lr or use --precision "
            "fp32 (checkpoints before this step are intact)"
        )
    return lr, tokens, time.perf_counter() - t0


def _validate(
    run: Run, tally: _Tally, metrics: _Metrics, summary: dict[str, Any], say: Callable[[str], None]
) -> bool:
    """Score the model on held-out data and log it; returns whether the target loss is met."""
    row = run.data.validate(run.model, tally.start)
    tally.val_loss = None if row is None else row["val_loss"]
    if row is None:
        return False
    metrics.log({"step": run.step} | row)
    if "val_acc" in row:
        summary["val_acc"] = row["val_acc"]
    val, target = row["val_loss"], run.train_cfg.target_loss
    say(f"step {run.step}: train loss {run.last_loss:.4f}, val loss {val:.4f}")
    if target is None or val > target:
        return False
    elapsed = time.perf_counter() - tally.start
    summary["target_reached"] = {"step": run.step, "val_loss": val, "seconds": elapsed}
    say(f"step {run.step}: val loss {val:.4f} <= {target}, stopping")
    return True


def _save(run: Run) -> int:
    """Write the checkpoint of ``run.step`` (weights, tokenizer, optimizer, sampler, RNG)
    from rank 0, keeping the newest ``keep_checkpoints``; returns the step."""
    ckpt = step_dir(run.request.out, run.step)
    whole_model, whole_optimizer = distributed.whole(run.model, run.optimizer, run.ranks)
    if whole_model is None:  # not rank 0: wait until rank 0 has written it
        distributed.barrier()
        return run.step
    train_state = {
        "step": run.step,
        "train": run.train_cfg.to_dict(),
        "data": str(run.request.data.resolve()),
        "tokenizer_hash": run.tokenizer.hash,
        "sampler": run.data.sampler.state_dict(),
        "rng": rng_state(),
        "loss": run.last_loss,
        "precision": run.precision,
        "world_size": run.ranks.world_size,
    }
    save_checkpoint(
        ckpt, whole_model, run.tokenizer, train_state=train_state, optimizer=whole_optimizer
    )
    for _, old in list_checkpoints(run.request.out)[: -run.train_cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return run.step


def _summary(run: Run) -> dict[str, Any]:
    """The run's summary as the loop starts: what it trains, where and how fast per step."""
    cfg = run.train_cfg
    global_batch = cfg.batch_size * run.ranks.world_size * cfg.grad_accum
    return {
        "out": str(run.request.out),
        "params": run.model.num_params(),
        "device": str(run.device),
        "precision": run.precision,
        "tokens_per_step": global_batch * run.model_cfg.block_size,
        "world_size": run.ranks.world_size,
    }


def _finish(
    run: Run, tally: _Tally, metrics: _Metrics, summary: dict[str, Any], merge: bool
) -> dict[str, Any]:
    """Save the last step unless saved, draw the plot, merge LoRA adapters if asked; the
    completed summary."""
    if tally.interrupted or tally.saved_step != run.step:
        tally.saved_step = _save(run)
    if tally.interrupted or not metrics.png.exists():
        metrics.plot(done=True)
    if merge and has_lora(run.model) and run.ranks.is_main:
        merged = copy.deepcopy(run.model)
        summary["merged"] = str(
            save_checkpoint(run.request.out / "merged", merge_lora(merged), run.tokenizer)
        )
    return summary | {
        "step": run.step,
        "loss": run.last_loss,
        "val_loss": tally.val_loss,
        "checkpoint": str(step_dir(run.request.out, run.step)),
        "tokens_per_s": tally.train_tokens / tally.train_time if tally.train_time else None,
        "wall_s": time.perf_counter() - tally.start,
        "interrupted": tally.interrupted,
        "loss_png": str(metrics.png),
    }


# -- metrics, plot, Ctrl-C -----------------------------------------------------------------


class _Metrics:
    """metrics.jsonl, one JSON row per log, and loss.png drawn from it. Only rank 0 keeps
    them; the other ranks write the same rows to nowhere. On resume, rows a killed run
    logged after its last checkpoint are dropped; a new run starts the file afresh."""

    def __init__(self, run: Run) -> None:
        out = run.request.out
        self.path, self.png, self.is_main = (
            out / "metrics.jsonl",
            out / "loss.png",
            run.ranks.is_main,
        )
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if run.request.resume:
                _trim_metrics(self.path, run.step)
            elif self.path.exists():
                self.path.unlink()
        self.file = open(self.path if self.is_main else os.devnull, "a")  # noqa: SIM115
        self.last_plot = time.perf_counter()
        self.board = _board(run) if self.is_main else None

    def __enter__(self) -> _Metrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.board is not None:
            self.board.log(row)

    def plot(self, done: bool) -> None:
        """Redraw loss.png (rank 0): at the end, else at most every 30 s (it costs ~1 s)."""
        if self.is_main and (done or time.perf_counter() - self.last_plot > 30):
            plot_losses(self.path, self.png)
            self.last_plot = time.perf_counter()


def _board(run: Run) -> Board | None:
    """The run's TensorBoard writer (``--tensorboard DIR``), or None."""
    cfg = run.train_cfg
    if cfg.tensorboard is None:
        return None
    seq_len = cfg.seq_len or run.model_cfg.block_size
    flops = flops_per_token(run.model_cfg, seq_len, run.model.num_params(embeddings=False))
    first = run.step if run.request.resume else 0
    return Board(cfg.tensorboard, flops, peak_flops(run.device), cfg.histogram_every, first)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl_rows(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metrics a killed run logged after its last checkpoint."""
    if not path.exists():
        return
    keep = [row for row in read_jsonl_rows(path) if _before(row, last_step)]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


def _before(row: dict[str, Any], last_step: int) -> bool:
    step = row.get("step")
    return isinstance(step, int | float) and step <= last_step


@contextlib.contextmanager
def _sigint_flag() -> Iterator[dict[str, bool]]:
    """The first Ctrl-C asks the loop to save and stop after the current step; the second
    interrupts at once. Under torchrun every Ctrl-C reaches each worker twice (from the
    terminal, then forwarded by torchrun), so there only the first counts; torchrun kills
    workers that have not exited 30 s later."""
    flag = {"stop": False}
    repeat_interrupts = not distributed.launched_by_torchrun()

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] and repeat_interrupts:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def finetune(
    task: Literal["classify", "sft"],
    data: str | Path,
    out: str | Path,
    init_from: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Fine-tune ``init_from`` on ``data``: ``train(data, out, objective=task, ...)``, with
    the same keyword arguments (``labels``, ``lm_weight``, ``pack``, ``lora_rank``, ...)."""
    if task not in ("classify", "sft"):
        raise GptkitError(f"unknown fine-tuning task {task!r}; choose classify or sft")
    kwargs.setdefault("preset", "finetune")
    return train(data, out, init_from=init_from, objective=task, **kwargs)
