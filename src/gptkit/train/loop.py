"""The one training loop: next-token prediction over prepared shards, or over fine-tuning
examples whose prompt tokens carry no loss (labels IGNORE), with all weights or LoRA
adapters trainable; the objective is the same cross-entropy, only the data differ.

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
import ctypes
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gptkit.checkpoint import load, read_train_state, save_checkpoint
from gptkit.checkpoint.native import rng_state, set_rng_state
from gptkit.config import ModelConfig, TrainConfig, get_preset
from gptkit.data.loader import BatchSampler, TokenShards
from gptkit.data.tasks import (
    IGNORE,
    ExampleSampler,
    LabelledSampler,
    PackedSampler,
    collate_labelled,
    load_examples,
    load_labelled,
    split_examples,
)
from gptkit.errors import GptkitError
from gptkit.files import (
    atomic_path,
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    step_dir,
)
from gptkit.model import GPT
from gptkit.model.lora import apply_lora, has_lora, merge_lora
from gptkit.tokenizer import Tokenizer, load_tokenizer
from gptkit.train import distributed
from gptkit.train.optim import lr_at, make_optimizer

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
Objective = Literal["auto", "lm", "sft", "classify"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


# -- device and precision ------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Native bf16 matmul (AVX512-BF16 or AMX) makes bf16 autocast pay off on a CPU."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, c, lambda: False)() for c in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise GptkitError("fp16 training is for GPUs; use --precision bf16 or fp32 on a CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def keep_freed_memory() -> bool:
    """Have glibc keep the memory a training step frees for the next step (Linux only).

    By default glibc maps every block over 32 MB (a batch's MLP activations, say) fresh
    from the kernel and unmaps it when freed, and trims freed memory off its heap: each
    step then faults in hundreds of MB of new zeroed pages, 5-10% of a CPU training step
    at nanoGPT's Shakespeare size. ``mallopt`` (M_MMAP_MAX 0, M_TRIM_THRESHOLD -1) serves
    every block from the heap and never trims it; a step reuses the same sizes, so peak
    memory stays near what it was (2.7-2.8 GB for a step of that config either way; 3.0-3.2
    against 2.75-2.97 GB in bench/train_speed.py runs). Returns whether it was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another C library: leave it alone
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# -- configuration -------------------------------------------------------------------------


def build_configs(
    preset: str | None, vocab_size: int, overrides: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    unknown = sorted(set(overrides) - MODEL_FIELDS - TRAIN_FIELDS)
    if unknown:
        raise GptkitError(
            f"unknown training option(s) {unknown}; see `gptkit train --help` for the fields"
        )
    p = get_preset(preset) if preset else None
    model_kw = dict(p.model if p else {}) | {"vocab_size": vocab_size}
    train_kw = dict(p.train if p else {})
    for k, v in overrides.items():
        if v is not None:
            (model_kw if k in MODEL_FIELDS else train_kw)[k] = v
    if overrides.get("lr") is not None and overrides.get("min_lr") is None:
        train_kw["min_lr"] = min(train_kw.get("min_lr", 1e-4), overrides["lr"] / 10)
    return ModelConfig(**model_kw), TrainConfig(**train_kw)


# -- the loop ------------------------------------------------------------------------------


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


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    flat = logits.float().view(-1, logits.size(-1))
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE)


def batch_loss(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], lm_weight: float = 0.5
) -> torch.Tensor:
    """The loss of one batch, by its form:

    - ``(ids, targets)``: next-token cross-entropy (pretraining, SFT);
    - ``(ids, targets, segments)``: the same over packed examples;
    - ``(ids, targets, labels, last)``: GPT-1's fine-tuning objective, the label
      cross-entropy at each row's extract token plus ``lm_weight`` (λ) times the
      next-token loss on the same text.
    """
    if len(batch) in (2, 3):
        x, y = batch[:2]
        kw = {"segments": batch[2]} if len(batch) == 3 else {}
        scored = y != IGNORE
        if bool(scored.all()):  # pretraining: every position has a target
            return _cross_entropy(model(x, **kw), y)
        # SFT masks its prompts: the head runs on the scored positions alone (the mean over
        # them is what ignore_index gives)
        return F.cross_entropy(model(x, only=scored, **kw).float(), y[scored])
    x, y, labels, last = batch
    h = model.hidden(x)  # (B, T, C)
    logits = model.cls_head(h[torch.arange(x.shape[0], device=x.device), last])
    loss = F.cross_entropy(logits.float(), labels)
    if lm_weight > 0:
        loss = loss + lm_weight * _cross_entropy(model.lm_head(h), y)
    return loss


@torch.no_grad()
def label_scores(
    model: GPT,
    examples: list,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Label loss, accuracy and the predicted probabilities over ``examples`` (Labelled)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    probs = torch.zeros(len(examples), len(model.config.labels))
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        x, _, _, last = collate_labelled([examples[i] for i in idx])
        with autocast(device, precision):
            logits = model.classify(x.to(device), last.to(device))
        probs[idx] = logits.float().softmax(-1).cpu()
    model.train(was_training)
    gold = torch.tensor([ex.label for ex in examples])
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), gold).item()
    acc = (probs.argmax(-1) == gold).float().mean().item()
    return {"loss": loss, "accuracy": acc, "probs": probs, "gold": gold}


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module, sampler: Any, batches: int, device: torch.device, precision: str
) -> float:
    """Mean loss over ``batches`` batches of ``sampler`` (positions labelled IGNORE excluded)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(batches):
        batch = tuple(t.to(device) for t in sampler.next())
        with autocast(device, precision):
            total += batch_loss(model, batch, 0.0).item()
    model.train(was_training)
    return total / batches


def evaluate(
    model: torch.nn.Module,
    arrays: list,
    block_size: int,
    batch_size: int,
    batches: int,
    device: torch.device,
    precision: str,
    seed: int = 0,
) -> float:
    """Mean next-token loss over ``batches`` fixed random batches (the same ones every call)."""
    sampler = BatchSampler(arrays, block_size, batch_size, seed=seed)
    return mean_loss(model, sampler, batches, device, precision)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
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
    keep = [
        ln
        for ln in path.read_text().splitlines()
        if ln.strip() and json.loads(ln)["step"] <= last_step
    ]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


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
    out = Path(out)
    if objective not in OBJECTIVES:
        raise GptkitError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")
    if objective == "auto":
        objective = "sft" if Path(data).suffix == ".jsonl" else "lm"
    sft = objective in ("sft", "classify")  # fine-tuning: examples, a model to start from
    if objective == "lm" and Path(data).is_file():
        raise GptkitError(
            f"{data} is not a directory written by `gptkit prepare`; for fine-tuning use "
            "`gptkit finetune sft|classify`"
        )
    if pack and objective != "sft":
        raise GptkitError("--pack applies to sft fine-tuning only; drop it")
    if lm_weight < 0:
        raise GptkitError(f"--lm-weight must not be negative, got {lm_weight}")
    shards: TokenShards | None = None
    tokenizer: Tokenizer | None = None
    if not sft:
        shards = TokenShards(data)
        tokenizer = load_tokenizer(data)
        if tokenizer.hash != shards.tokenizer_hash:
            raise GptkitError(
                f"{data}: tokenizer.json does not match meta.json; prepare the data again"
            )

    existing = latest_checkpoint(out)
    if existing is not None and not resume:
        raise GptkitError(
            f"{out} already holds a run (newest checkpoint {existing.name}); pass --resume "
            "to continue it, or choose another --out"
        )
    if resume and existing is None:
        raise GptkitError(f"--resume: {out} has no checkpoint to resume from; drop --resume")

    state: dict[str, Any] = {}
    model: GPT | None = None
    source = existing if resume else init_from
    if sft and source is None:
        raise GptkitError(
            f"fine-tuning on {data} needs a model to start from: pass --init-from MODEL"
        )
    if source is not None:
        if resume:
            state = read_train_state(existing)
        model, src_tok = load(source)
        if sft:
            if src_tok is None:
                raise GptkitError(f"{source} has no tokenizer to encode {data} with")
            tokenizer = src_tok
        elif src_tok is None or src_tok.hash != shards.tokenizer_hash:
            raise GptkitError(
                f"the model {source} uses a different tokenizer than the data in {data}; "
                f"prepare the data with `gptkit prepare ... --tokenizer {source}`, or start a "
                "new run"
            )
        model_cfg = model.config
        model_over = {
            k: v
            for k, v in overrides.items()
            if k in MODEL_FIELDS and v is not None and k != "labels"
        }
        changed = {
            k for k, v in model_over.items() if getattr(model_cfg, k) != v and k != "dropout"
        }
        if changed:
            raise GptkitError(
                f"cannot change model field(s) {sorted(changed)} of {source}; "
                "drop those flags, or start a new run"
            )
        if "dropout" in model_over:
            model_cfg = model_cfg.replace(dropout=model_over["dropout"])
        train_over = {k: v for k, v in overrides.items() if k in TRAIN_FIELDS and v is not None}
        if resume:
            train_cfg = TrainConfig.from_dict(state["train"]).replace(**train_over)
        else:
            train_cfg = build_configs(preset, model_cfg.vocab_size, train_over)[1]
    else:
        model_cfg, train_cfg = build_configs(preset, shards.vocab_size, overrides)
    assert tokenizer is not None
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise GptkitError(
            f"the model's vocabulary ({model_cfg.vocab_size}) is smaller than the data's "
            f"({tokenizer.vocab_size}); use a matching checkpoint or tokenizer"
        )

    ranks, device = distributed.setup(pick_device(train_cfg.device))
    progress = progress and ranks.is_main
    if resume:
        saved_world = state.get("world_size", 1)
        given = overrides.get("batch_size") is not None
        train_cfg = distributed.keep_global_batch(train_cfg, saved_world, ranks, given)
    if objective == "classify" and ranks.world_size > 1:
        raise GptkitError(
            "classification fine-tuning runs in one process; launch it without torchrun"
        )
    precision = resolve_precision(train_cfg.precision, device)
    torch.manual_seed(train_cfg.seed)
    if model is None:
        model = GPT(model_cfg)
    elif model.config.dropout != model_cfg.dropout:
        if has_lora(model):
            raise GptkitError("cannot change the dropout of a LoRA run; drop --dropout")
        model = _rebuild_with(model, model_cfg)
    if objective == "classify":
        names = tuple(n.strip() for n in labels.split(",")) if labels else model.config.labels
        cls_train, names = load_labelled(data, tokenizer, model_cfg.block_size, names or None)
        cls_val = (
            load_labelled(val_data, tokenizer, model_cfg.block_size, names)[0] if val_data else []
        )
        if not val_data:
            cls_train, cls_val = split_examples(cls_train)
        if model.config.labels != names:
            if resume:
                raise GptkitError(
                    f"the run in {out} classifies {list(model.config.labels)}, not "
                    f"{list(names)}; drop --labels or start a new run"
                )
            model.add_classifier(names)
        model_cfg = model.config
    if lora_rank > 0 and not has_lora(model):
        apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)
    elif lora_rank > 0 and resume is False:
        raise GptkitError(f"{source} already carries LoRA adapters; merge them first")
    if has_lora(model) and model.cls_head is not None:
        model.cls_head.requires_grad_(True)  # the new head always trains in full
    model = model.to(device)
    model.train()
    train_module = distributed.wrap(
        model, ranks, device, train_cfg.fsdp, train_cfg.activation_checkpointing
    )
    optimizer = make_optimizer(model, train_cfg)
    sampler: Any
    make_val: Any = None  # a fresh validation sampler (the same batches at every evaluation)
    eval_batches = train_cfg.eval_batches
    if objective == "classify":
        sampler = LabelledSampler(cls_train, train_cfg.batch_size, train_cfg.seed)
    elif sft:
        examples = load_examples(data, tokenizer, model_cfg.block_size + 1, chat)
        if val_data:
            train_ex, val_ex = (
                examples,
                load_examples(val_data, tokenizer, model_cfg.block_size + 1, chat),
            )
        else:
            train_ex, val_ex = split_examples(examples)
        rows = train_cfg.batch_size * ranks.world_size  # every rank draws the global batch
        if pack:
            sampler = PackedSampler(train_ex, rows, model_cfg.block_size, train_cfg.seed)
        else:
            sampler = ExampleSampler(train_ex, rows, train_cfg.seed)
        if ranks.world_size > 1:
            sampler = distributed.RankShare(sampler, ranks)
        if val_ex:
            make_val = lambda: ExampleSampler(val_ex, train_cfg.batch_size, shuffle=False)
            eval_batches = min(eval_batches, math.ceil(len(val_ex) / train_cfg.batch_size))
    else:
        assert shards is not None
        B, T = train_cfg.batch_size, model_cfg.block_size
        share = {"rank": ranks.rank, "world_size": ranks.world_size}
        sampler = BatchSampler(shards.split("train"), T, B, train_cfg.seed, **share)
        if shards.num_tokens("val") > T:
            val_arrays = shards.split("val")
            make_val = lambda: BatchSampler(val_arrays, T, B, seed=0, **share)
    step = 0
    if resume:
        distributed.load_optimizer_state(
            model, optimizer, existing, state["optimizer_param_groups"]
        )
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        step = state["step"]
    step_fn = torch.compile(train_module) if train_cfg.compile else train_module
    if device.type == "cpu":
        keep_freed_memory()

    metrics_path, png_path = out / "metrics.jsonl", out / "loss.png"
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            _trim_metrics(metrics_path, step)
        elif metrics_path.exists():
            metrics_path.unlink()

    global_batch = train_cfg.batch_size * ranks.world_size * train_cfg.grad_accum
    tokens_per_step = global_batch * model_cfg.block_size
    summary: dict[str, Any] = {
        "out": str(out),
        "params": model.num_params(),
        "device": str(device),
        "precision": precision,
        "tokens_per_step": tokens_per_step,
        "world_size": ranks.world_size,
    }

    saved_step = step if resume else None  # the step of the newest checkpoint of this run

    def save(at_step: int, last_loss: float | None) -> Path:
        nonlocal saved_step
        saved_step = at_step
        ckpt = step_dir(out, at_step)
        whole_model, whole_optimizer = distributed.whole(model, optimizer, ranks)
        if whole_model is None:  # not rank 0: wait until rank 0 has written it
            distributed.barrier()
            return ckpt
        save_checkpoint(
            ckpt,
            whole_model,
            tokenizer,
            train_state={
                "step": at_step,
                "train": train_cfg.to_dict(),
                "data": str(Path(data).resolve()),
                "tokenizer_hash": tokenizer.hash,
                "sampler": sampler.state_dict(),
                "rng": rng_state(),
                "loss": last_loss,
                "precision": precision,
                "world_size": ranks.world_size,
            },
            optimizer=whole_optimizer,
        )
        for _, old in list_checkpoints(out)[: -train_cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return ckpt

    def run_eval(at_step: int, log: Any) -> float | None:
        if objective == "classify":
            if not cls_val:
                return None
            scores = label_scores(model, cls_val, train_cfg.batch_size, device, precision)
            log({"step": at_step, "val_loss": scores["loss"], "val_acc": scores["accuracy"]})
            summary["val_acc"] = scores["accuracy"]
            return scores["loss"]
        if make_val is None:
            return None
        # Every rank evaluates its rows of the same batches (FSDP needs them all anyway).
        val = mean_loss(model, make_val(), eval_batches, device, precision)
        val = distributed.mean_over_ranks(torch.tensor(val, device=device)).item()
        elapsed = round(time.perf_counter() - start, 3)
        log(
            {
                "step": at_step,
                "val_loss": val,
                "val_ppl": math.exp(min(val, 50.0)),
                "elapsed_s": elapsed,
            }
        )
        return val

    bar = tqdm(
        total=train_cfg.max_steps,
        initial=step,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        desc="train",
    )
    last_loss: float | None = state.get("loss")
    val_loss: float | None = None
    interrupted = False
    train_time, train_tokens = 0.0, 0
    start = last_plot = time.perf_counter()  # wall time includes evaluations and saving
    # Only rank 0 keeps the metrics; the other ranks write the same rows to nowhere.
    with (
        open(metrics_path if ranks.is_main else os.devnull, "a") as metrics,
        _sigint_flag() as flag,
    ):

        def log(row: dict[str, Any]) -> None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

        while step < train_cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, train_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss_sum = torch.zeros((), device=device)
            step_tokens = 0
            for micro in range(train_cfg.grad_accum):
                batch = tuple(t.to(device, non_blocking=True) for t in sampler.next())
                step_tokens += batch[0].numel() * ranks.world_size
                last_micro = micro == train_cfg.grad_accum - 1
                with distributed.gradient_sync(train_module, last_micro):
                    with autocast(device, precision):
                        loss = batch_loss(step_fn, batch, lm_weight)
                    (loss / train_cfg.grad_accum).backward()
                loss_sum += loss.detach()
            if train_cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = distributed.mean_over_ranks(loss_sum).item() / train_cfg.grad_accum
            if not math.isfinite(last_loss):
                raise GptkitError(
                    f"loss became {last_loss} at step {step}; lower --lr or use --precision fp32 "
                    "(checkpoints before this step are intact)"
                )
            dt = time.perf_counter() - t0
            train_time += dt
            train_tokens += step_tokens
            tok_s = train_tokens / train_time
            if step % train_cfg.log_every == 0 or step == train_cfg.max_steps:
                log({"step": step, "loss": last_loss, "lr": lr, "tokens_per_s": round(tok_s, 1)})
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(1)
            done = step == train_cfg.max_steps
            if (train_cfg.eval_every and step % train_cfg.eval_every == 0) or done:
                val_loss = run_eval(step, log)
                if val_loss is not None and progress:
                    bar.write(f"step {step}: train loss {last_loss:.4f}, val loss {val_loss:.4f}")
                target = train_cfg.target_loss
                if target is not None and val_loss is not None and val_loss <= target:
                    summary["target_reached"] = {
                        "step": step,
                        "val_loss": val_loss,
                        "seconds": time.perf_counter() - start,
                    }
                    if progress:
                        bar.write(f"step {step}: val loss {val_loss:.4f} <= {target}, stopping")
                    done = True
                # Drawing costs about a second: redraw at most every 30 s, and at the end.
                if ranks.is_main and (done or time.perf_counter() - last_plot > 30):
                    plot_losses(metrics_path, png_path)
                    last_plot = time.perf_counter()
            if distributed.any_rank(flag["stop"], device):
                interrupted = True
                break
            if (train_cfg.save_every and step % train_cfg.save_every == 0) or done:
                save(step, last_loss)
            if done:
                break
    bar.close()
    ckpt = step_dir(out, step)
    if interrupted or saved_step != step:
        ckpt = save(step, last_loss)
    if ranks.is_main and (interrupted or not png_path.exists()):
        plot_losses(metrics_path, png_path)
    if merge and has_lora(model) and ranks.is_main:
        merged = save_checkpoint(out / "merged", merge_lora(copy.deepcopy(model)), tokenizer)
        summary["merged"] = str(merged)
    summary |= {
        "step": step,
        "loss": last_loss,
        "val_loss": val_loss,
        "checkpoint": str(ckpt),
        "tokens_per_s": train_tokens / train_time if train_time else None,
        "wall_s": time.perf_counter() - start,
        "interrupted": interrupted,
        "loss_png": str(png_path),
    }
    return summary


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


def _rebuild_with(model: GPT, cfg: ModelConfig) -> GPT:
    """The same weights under a config that differs only in dropout."""
    new = GPT(cfg)
    new.load_state_dict(model.state_dict())
    return new
