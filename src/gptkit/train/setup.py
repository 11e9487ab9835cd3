"""Everything a training run needs before its first step, apart from the loop.

:func:`setup` checks the request, builds the configs (a preset, the flags, or the model a run
starts from), the model (fresh, ``--init-from`` any source ``gptkit.load`` takes, or the
newest checkpoint of ``--resume``), the objective's data (with a teacher's soft targets when
distilling), the optimizer and, on resume, the saved optimizer moments, sampler position and
RNG state, so that a resumed run continues with exactly the losses an uninterrupted one
would have. With ``quantize`` and LoRA the frozen base is quantized under the adapters
(QLoRA, Dettmers et al. 2023). The result is a :class:`Run` the
loop (:mod:`gptkit.train.loop`) steps.

Under ``torchrun`` this runs once per process (see :mod:`gptkit.train.distributed`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from gptkit.checkpoint import load, read_train_state
from gptkit.checkpoint.native import set_rng_state
from gptkit.config import ModelConfig, TrainConfig, get_preset
from gptkit.data.loader import TokenShards
from gptkit.data.tasks import check_format, load_labelled, split_examples
from gptkit.errors import GptkitError
from gptkit.files import latest_checkpoint
from gptkit.model import GPT
from gptkit.model.lora import apply_lora, has_lora
from gptkit.model.quant import quantize_base
from gptkit.tokenizer import Tokenizer, load_tokenizer
from gptkit.train import distributed
from gptkit.train.distributed import Ranks
from gptkit.train.objectives import (
    ObjectiveData,
    add_task_tokens,
    classify_data,
    distill_data,
    lm_data,
    set_task_head,
    sft_data,
)
from gptkit.train.optim import make_optimizer

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
Objective = Literal["auto", "lm", "sft", "classify"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


# -- device and precision ------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, else MPS, else the CPU; any other name as torch spells it."""
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
    """``auto``: bf16 where the device computes it natively (fp16 on older GPUs), else fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise GptkitError("fp16 training is for GPUs; use --precision bf16 or fp32 on a CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


# -- configuration -------------------------------------------------------------------------


def build_configs(
    preset: str | None, vocab_size: int, overrides: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """The preset's configs with ``overrides`` (any ModelConfig or TrainConfig field) on top;
    an ``lr`` below the preset's ``min_lr`` takes ``min_lr`` down to a tenth of it."""
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


@dataclass(frozen=True)
class Request:
    """What :func:`gptkit.train.train` was asked for (its arguments, documented there)."""

    data: Path
    out: Path
    preset: str | None = "nanogpt-cpu"
    resume: bool = False
    init_from: str | None = None
    val_data: str | None = None
    chat: bool | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "qkv,proj,fc"
    objective: str = "auto"
    labels: str | None = None
    lm_weight: float = 0.5
    pack: bool = False
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def fine_tuning(self) -> bool:
        """SFT and classification read examples and start from a model."""
        return self.objective in ("sft", "classify")


@dataclass
class Run:
    """A training run ready for its next step: what the loop reads and updates."""

    request: Request
    model: GPT  # the plain model: checkpoints, evaluation, gradient clipping
    train_module: torch.nn.Module  # the same model wrapped for DDP/FSDP (or itself)
    step_fn: torch.nn.Module  # train_module, compiled with --compile
    optimizer: torch.optim.Optimizer
    data: ObjectiveData
    tokenizer: Tokenizer
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    ranks: Ranks
    device: torch.device
    precision: str
    step: int = 0
    last_loss: float | None = None  # the loss of the newest step (from the checkpoint on resume)


# -- setup, step by step --------------------------------------------------------------------


def setup(req: Request) -> Run:
    """Check ``req`` and build its run: configs, model, data, optimizer, resumed state."""
    req = _checked(req)
    shards, tokenizer = (None, None) if req.fine_tuning else _shards(req.data)
    existing = _existing_checkpoint(req)
    source = existing if req.resume else req.init_from
    state = read_train_state(existing) if req.resume else {}
    model, tokenizer, model_cfg, train_cfg = _start(req, source, state, shards, tokenizer)
    ranks, device = distributed.setup(pick_device(train_cfg.device))
    if req.resume:
        saved_world = state.get("world_size", 1)
        given = req.overrides.get("batch_size") is not None
        train_cfg = distributed.keep_global_batch(train_cfg, saved_world, ranks, given)
    if req.objective == "classify" and ranks.world_size > 1:
        raise GptkitError(
            "classification fine-tuning runs in one process; launch it without torchrun"
        )
    precision = resolve_precision(train_cfg.precision, device)
    torch.manual_seed(train_cfg.seed)  # before any weights are drawn: a fresh model, a head
    model = _model(req, model, model_cfg)
    labelled = None
    if req.objective == "classify":
        tokenizer, labelled = _labelled(req, model, tokenizer, train_cfg.format)
    _adapt(req, model, source, train_cfg)
    model = model.to(device)
    model.train()
    train_module = distributed.wrap(
        model, ranks, device, train_cfg.fsdp, train_cfg.activation_checkpointing
    )
    optimizer = make_optimizer(model, train_cfg)
    window = _window(train_cfg, model.config.block_size)
    data = _objective_data(
        req, shards, tokenizer, labelled, window, train_cfg, ranks, device, precision
    )
    if train_cfg.teacher is not None:
        data = _with_teacher(req, data, tokenizer, train_cfg, device, precision)
    run = Run(
        req, model, train_module, train_module, optimizer, data, tokenizer, model.config,
        train_cfg, ranks, device, precision,
    )  # fmt: skip
    if req.resume:
        assert existing is not None
        _restore(run, existing, state)
    if train_cfg.compile:
        run.step_fn = torch.compile(train_module)
    return run


def _restore(run: Run, checkpoint: Path, state: dict[str, Any]) -> None:
    """Resume where ``checkpoint`` left off: optimizer moments, the sampler's position, the
    global RNG (dropout), the step and its loss."""
    distributed.load_optimizer_state(
        run.model, run.optimizer, checkpoint, state["optimizer_param_groups"]
    )
    run.data.sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    run.step, run.last_loss = state["step"], state.get("loss")


def _checked(req: Request) -> Request:
    """``req`` with its objective resolved (``auto``: sft for .jsonl, else lm), or an error
    for options that do not fit together."""
    if req.objective not in OBJECTIVES:
        raise GptkitError(f"unknown objective {req.objective!r}; choose from {OBJECTIVES}")
    if req.objective == "auto":
        req = dataclasses.replace(req, objective="sft" if req.data.suffix == ".jsonl" else "lm")
    if req.objective == "lm" and req.data.is_file():
        raise GptkitError(
            f"{req.data} is not a directory written by `gptkit prepare`; for fine-tuning use "
            "`gptkit finetune sft|classify`"
        )
    if req.pack and req.objective != "sft":
        raise GptkitError("--pack applies to sft fine-tuning only; drop it")
    if req.lm_weight < 0:
        raise GptkitError(f"--lm-weight must not be negative, got {req.lm_weight}")
    return req


def _shards(data: Path) -> tuple[TokenShards, Tokenizer]:
    """The prepared token shards of ``data`` and their tokenizer, checked against each other."""
    shards, tokenizer = TokenShards(data), load_tokenizer(data)
    if tokenizer.hash != shards.tokenizer_hash:
        raise GptkitError(
            f"{data}: tokenizer.json does not match meta.json; prepare the data again"
        )
    return shards, tokenizer


def _existing_checkpoint(req: Request) -> Path | None:
    """The newest checkpoint in ``req.out``: required by --resume, refused without it."""
    existing = latest_checkpoint(req.out)
    if existing is not None and not req.resume:
        raise GptkitError(
            f"{req.out} already holds a run (newest checkpoint {existing.name}); pass --resume "
            "to continue it, or choose another --out"
        )
    if req.resume and existing is None:
        raise GptkitError(f"--resume: {req.out} has no checkpoint to resume from; drop --resume")
    return existing


def _start(
    req: Request,
    source: str | Path | None,
    state: dict[str, Any],
    shards: TokenShards | None,
    tokenizer: Tokenizer | None,
) -> tuple[GPT | None, Tokenizer, ModelConfig, TrainConfig]:
    """What the run starts from: the model of ``source`` (None: a fresh one), the tokenizer
    that encodes the data, and the configs."""
    if req.fine_tuning and source is None:
        raise GptkitError(
            f"fine-tuning on {req.data} needs a model to start from: pass --init-from MODEL"
        )
    model = None
    if source is None:
        assert shards is not None and tokenizer is not None
        model_cfg, train_cfg = build_configs(req.preset, shards.vocab_size, req.overrides)
    else:
        model, tokenizer = _load_start(req, source, shards, tokenizer)
        model_cfg, train_cfg = _configs_from(req, model.config, source, state)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise GptkitError(
            f"the model's vocabulary ({model_cfg.vocab_size}) is smaller than the data's "
            f"({tokenizer.vocab_size}); use a matching checkpoint or tokenizer"
        )
    return model, tokenizer, model_cfg, train_cfg


def _load_start(
    req: Request, source: str | Path, shards: TokenShards | None, tokenizer: Tokenizer | None
) -> tuple[GPT, Tokenizer]:
    """The model of ``source`` and the tokenizer to encode the data with: the model's own
    for fine-tuning examples, the data's (which must be the model's) for token shards."""
    model, src_tok = load(source, quantize=None)  # full-precision weights to train
    if req.fine_tuning:
        if src_tok is None:
            raise GptkitError(f"{source} has no tokenizer to encode {req.data} with")
        return model, src_tok
    assert shards is not None and tokenizer is not None
    if src_tok is None or src_tok.hash != shards.tokenizer_hash:
        raise GptkitError(
            f"the model {source} uses a different tokenizer than the data in {req.data}; "
            f"prepare the data with `gptkit prepare ... --tokenizer {source}`, or start a "
            "new run"
        )
    return model, tokenizer


def _configs_from(
    req: Request, model_cfg: ModelConfig, source: str | Path, state: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """The configs of a run that starts from a model: its architecture (only dropout may
    change), and the checkpoint's training config on resume, else the preset's; the flags
    override either."""
    model_over = {
        k: v
        for k, v in req.overrides.items()
        if k in MODEL_FIELDS and v is not None and k != "labels"
    }
    changed = {k for k, v in model_over.items() if getattr(model_cfg, k) != v and k != "dropout"}
    if changed:
        raise GptkitError(
            f"cannot change model field(s) {sorted(changed)} of {source}; "
            "drop those flags, or start a new run"
        )
    if "dropout" in model_over:
        model_cfg = model_cfg.replace(dropout=model_over["dropout"])
    train_over = {k: v for k, v in req.overrides.items() if k in TRAIN_FIELDS and v is not None}
    if req.resume:
        return model_cfg, TrainConfig.from_dict(state["train"]).replace(**train_over)
    return model_cfg, build_configs(req.preset, model_cfg.vocab_size, train_over)[1]


def _model(req: Request, model: GPT | None, model_cfg: ModelConfig) -> GPT:
    """A fresh model of ``model_cfg``, or ``model`` (rebuilt if the dropout changed)."""
    if model is None:
        return GPT(model_cfg)
    if model.config.dropout == model_cfg.dropout:
        return model
    if has_lora(model):
        raise GptkitError("cannot change the dropout of a LoRA run; drop --dropout")
    new = GPT(model_cfg)  # the same weights under a config that differs only in dropout
    new.load_state_dict(model.state_dict())
    return new


def _labelled(
    req: Request, model: GPT, tokenizer: Tokenizer, fmt: str | None
) -> tuple[Tokenizer, tuple[list, list]]:
    """Classification: the tokenizer (with GPT-1's task tokens for a --format, rows for
    which the model's embedding gains), the training and validation examples (the last 5%
    of the data unless --val-data), and ``model`` given a head for their labels and format
    if it has none."""
    check_format(fmt)
    if fmt == "choice" and req.labels:
        raise GptkitError(
            "--labels does not apply to --format choice (a label is the index of the right "
            "choice); drop it"
        )
    if fmt is not None:
        tokenizer = add_task_tokens(model, tokenizer)
    block = model.config.block_size
    names = tuple(n.strip() for n in req.labels.split(",")) if req.labels else model.config.labels
    train_ex, names = load_labelled(req.data, tokenizer, block, names or None, fmt)
    if req.val_data:
        val_ex = load_labelled(req.val_data, tokenizer, block, names, fmt)[0]
    else:
        train_ex, val_ex = split_examples(train_ex)
    if (model.config.labels, model.config.task_format) != (names, fmt):
        if req.resume:
            raise GptkitError(
                f"the run in {req.out} classifies {list(model.config.labels)}, not "
                f"{list(names)}; drop --labels or start a new run"
            )
        set_task_head(model, names, fmt)
    return tokenizer, (train_ex, val_ex)


def _adapt(req: Request, model: GPT, source: str | Path | None, cfg: TrainConfig) -> None:
    """With --lora-rank, LoRA adapters on the targeted layers (kept on resume), over a base
    quantized to ``cfg.quantize`` if set (a checkpoint stores the base dequantized, so a
    resumed run quantizes it again); a new classification head always trains in full."""
    if req.lora_rank > 0 and not has_lora(model):
        apply_lora(model, req.lora_rank, req.lora_alpha, req.lora_dropout, req.lora_targets)
    elif req.lora_rank > 0 and not req.resume:
        raise GptkitError(f"{source} already carries LoRA adapters; merge them first")
    if cfg.quantize is not None:
        if not has_lora(model):
            raise GptkitError(
                f"--quantize {cfg.quantize} keeps a frozen base quantized under LoRA adapters; "
                "pass --lora-rank R as well (full fine-tuning needs full-precision weights)"
            )
        quantize_base(model, cfg.quantize)
    if has_lora(model) and model.cls_head is not None:
        model.cls_head.requires_grad_(True)


def _window(cfg: TrainConfig, block_size: int) -> int:
    """Tokens per training window: ``seq_len``, at most the model's context."""
    if cfg.seq_len is not None and cfg.seq_len > block_size:
        raise GptkitError(
            f"--seq-len {cfg.seq_len} exceeds the model's context ({block_size}); lower it"
        )
    return cfg.seq_len or block_size


def _with_teacher(
    req: Request,
    data: ObjectiveData,
    tokenizer: Tokenizer,
    cfg: TrainConfig,
    device: torch.device,
    precision: str,
) -> ObjectiveData:
    """Distillation: the frozen teacher (any source ``gptkit.load`` takes, full precision,
    on the run's device), checked to share the student's tokenizer, scoring every batch."""
    if req.objective != "lm":
        raise GptkitError(
            f"distillation trains on token shards (objective lm), not {req.objective}; pass a "
            "`gptkit prepare` directory as --data"
        )
    teacher, teacher_tok = load(cfg.teacher, quantize=None)  # type: ignore[arg-type]
    if teacher_tok is None or teacher_tok.hash != tokenizer.hash:
        theirs = "none" if teacher_tok is None else f"{type(teacher_tok).__name__} "
        theirs += "" if teacher_tok is None else f"{teacher_tok.vocab_size} tokens"
        raise GptkitError(
            f"the teacher {cfg.teacher} and the student must share one tokenizer: the "
            f"student's data uses {type(tokenizer).__name__} of {tokenizer.vocab_size} tokens "
            f"(hash {tokenizer.hash[:12]}), the teacher has {theirs}; prepare the data with "
            f"`gptkit prepare ... --tokenizer {cfg.teacher}`"
        )
    teacher.requires_grad_(False)
    teacher = teacher.to(device).eval()
    return distill_data(
        data, teacher, cfg.distill_temperature, cfg.distill_alpha, cfg.distill_top_k, device,
        precision,
    )  # fmt: skip


def _objective_data(
    req: Request,
    shards: TokenShards | None,
    tokenizer: Tokenizer,
    labelled: tuple[list, list] | None,
    block_size: int,
    cfg: TrainConfig,
    ranks: Ranks,
    device: torch.device,
    precision: str,
) -> ObjectiveData:
    """The training batches and validation of ``req.objective``."""
    B, seed = cfg.batch_size, cfg.seed
    if labelled is not None:
        return classify_data(*labelled, B, seed, device, precision)
    where = {"ranks": ranks, "device": device, "precision": precision}
    if req.objective == "sft":
        return sft_data(
            req.data, req.val_data, tokenizer, req.chat, req.pack, block_size, B,
            cfg.eval_batches, seed, **where,
        )  # fmt: skip
    assert shards is not None
    return lm_data(shards, block_size, B, cfg.eval_batches, seed, **where)
