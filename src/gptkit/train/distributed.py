"""Data parallelism, applied to the model from outside: DDP, FSDP2, activation checkpointing.

``torchrun --nproc_per_node=N -m gptkit train ...`` starts N copies of the same training loop.
Each finds its place from the variables torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), joins a process group (nccl on CUDA, gloo on CPU) and trains its own rows of
every global batch::

      one global micro-batch: batch_size × world_size rows, drawn from one seeded stream
      ┌──────── rank 0 ────────┬──────── rank 1 ────────┐
      │ rows 0 .. B-1          │ rows B .. 2B-1         │   each rank reads only its rows
      └───────────┬────────────┴───────────┬────────────┘
             forward/backward          forward/backward
                  └──── gradients averaged (DDP all-reduce, or FSDP reduce-scatter) ────┘
                                  one identical optimizer step

So the global batch per optimizer step is ``batch_size × world_size × grad_accum`` sequences,
and N processes with ``--batch-size B`` take the same steps as one process with
``--batch-size N·B``: the same rows, the same mean loss, the same gradient (up to float
rounding). Rank 0 alone logs, prints and writes checkpoints; the others wait at a barrier.

Three ways to wrap the model, none of them inside ``gptkit/model/gpt.py``:

- DDP (the default with several processes): every rank holds the whole model, gradients are
  all-reduced during backward (PyTorch "DistributedDataParallel" notes and API docs).
- FSDP (``--fsdp``): ``fully_shard`` (FSDP2) on every transformer block and on the root, so
  parameters, gradients and optimizer moments are split across ranks and gathered per block
  when needed (PyTorch "torch.distributed.fsdp.fully_shard" docs). Checkpoints stay whole:
  the shards are gathered to rank 0 and written in the ordinary single-file format, so an
  FSDP checkpoint resumes in one process and a one-process checkpoint resumes under FSDP.
- activation checkpointing (``--activation-checkpointing``): each block's forward runs under
  ``torch.utils.checkpoint`` and is recomputed during backward, trading compute for memory.

The order (checkpoint each block, then shard each block, then the root) and the per-block
granularity follow torchtitan's ``parallelize`` functions (``apply_ac``, ``apply_fsdp``); the
code here is our own.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from gptkit.checkpoint.native import OPTIMIZER, load_optimizer, model_from_state
from gptkit.config import TrainConfig
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.model.lora import has_lora

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_we_started_the_group = False


# -- the process group -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (rank 0 of 1 when there is none)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, prints and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether a process group is up (torchrun, even with one process)."""
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    """True when torchrun (or an equivalent launcher) set RANK, WORLD_SIZE and LOCAL_RANK."""
    return all(k in os.environ for k in _ENV)


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes, if any; returns this rank and its device.

    Without torchrun's variables this is a no-op (rank 0 of 1, ``device`` unchanged). Under
    torchrun: nccl when training on CUDA (each process takes GPU ``LOCAL_RANK``), gloo on
    CPU. A process group the caller already started is used as it is and left running;
    one started here is destroyed when the process exits.

    Args:
        device: the device ``--device`` resolved to (cuda, cpu, ...).
    """
    global _we_started_the_group
    if not dist.is_available() or not (launched_by_torchrun() or dist.is_initialized()):
        return Ranks(), device
    if device.type not in ("cpu", "cuda"):
        raise GptkitError(
            f"distributed training runs on CPU (gloo) or CUDA (nccl), not {device.type}; "
            "pass --device cpu"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        _we_started_the_group = True
        atexit.register(teardown)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank), device


def teardown() -> None:
    """Destroy the process group if :func:`setup` started it (safe to call twice)."""
    global _we_started_the_group
    if _we_started_the_group and dist.is_initialized():
        dist.destroy_process_group()
    _we_started_the_group = False


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over all ranks (``value`` itself in a single process).

    A sum then a division, because gloo has no AVG reduction."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (so all ranks stop together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def say(ranks: Ranks, message: str) -> None:
    """Print a note to stderr from rank 0 only."""
    if ranks.is_main:
        print(message, file=sys.stderr)


# -- batch size across ranks -----------------------------------------------------------------


def keep_global_batch(
    cfg: TrainConfig, saved_world_size: int, ranks: Ranks, batch_size_given: bool
) -> TrainConfig:
    """On resume under another number of processes, keep the run's global batch.

    ``batch_size`` counts sequences per process, so a run saved by 2 processes with
    ``batch_size=4`` resumes in 1 process with ``batch_size=8`` (and the reverse), continuing
    the same loss curve. An explicit ``--batch-size`` wins.

    Args:
        cfg: the training config read back from the checkpoint (with any overrides applied).
        saved_world_size: how many processes wrote the checkpoint.
        ranks: this run's ranks.
        batch_size_given: whether ``--batch-size`` was passed for this run.
    """
    if batch_size_given or saved_world_size == ranks.world_size:
        return cfg
    total = cfg.batch_size * saved_world_size
    if total % ranks.world_size:
        raise GptkitError(
            f"the run's global batch of {total} sequences ({cfg.batch_size} × "
            f"{saved_world_size} processes) does not split over {ranks.world_size} processes; "
            "pass --batch-size (sequences per process)"
        )
    per_rank = total // ranks.world_size
    say(
        ranks,
        f"note: keeping the global batch of {total} sequences: --batch-size {per_rank} per "
        f"process × {ranks.world_size} process(es) (the checkpoint used {saved_world_size})",
    )
    return cfg.replace(batch_size=per_rank)


class RankShare:
    """This rank's rows of a sampler that draws whole global batches.

    Every rank keeps an identical copy of ``sampler`` (built with ``batch_size × world_size``
    rows and the same seed), draws the same global batch, and keeps rows
    ``[rank·B, (rank+1)·B)`` of every tensor. Used for fine-tuning examples, which live in
    memory; token shards are split natively by ``BatchSampler`` so that each rank reads only
    its own windows.
    """

    def __init__(self, sampler: Any, ranks: Ranks):
        self.sampler, self.ranks = sampler, ranks

    def next(self) -> tuple[torch.Tensor, ...]:
        batch = self.sampler.next()
        B = batch[0].shape[0] // self.ranks.world_size
        mine = slice(self.ranks.rank * B, (self.ranks.rank + 1) * B)
        return tuple(t[mine] for t in batch)

    def state_dict(self) -> Any:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.sampler.load_state_dict(state)


# -- wrapping the model ----------------------------------------------------------------------


class _Checkpointed(nn.Module):
    """Mixed into a block's class: its forward runs under ``torch.utils.checkpoint``.

    Swapping the instance's class (as FSDP2 does for its own hooks) keeps the module tree and
    the state-dict keys unchanged, so checkpoints with and without it are interchangeable.
    Non-reentrant checkpointing composes with DDP, FSDP2 and torch.compile; the RNG state is
    restored for the recomputation, so dropout masks match the first pass.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


_checkpointed_classes: dict[type, type] = {}


def checkpoint_blocks(model: GPT) -> None:
    """Recompute each transformer block's activations in backward instead of storing them."""
    for block in model.blocks:
        cls = type(block)
        if issubclass(cls, _Checkpointed):
            continue
        if cls not in _checkpointed_classes:
            _checkpointed_classes[cls] = type(
                f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {}
            )
        block.__class__ = _checkpointed_classes[cls]


def _fsdp2() -> tuple[Any, type]:
    """FSDP2's ``fully_shard`` and ``FSDPModule`` (public since torch 2.6)."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return fully_shard, FSDPModule


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`wrap` with ``fsdp=True``."""
    return dist.is_available() and isinstance(model, _fsdp2()[1])


def wrap(
    model: GPT,
    ranks: Ranks,
    device: torch.device,
    fsdp: bool = False,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Prepare ``model`` for training on this rank; returns the module to call for a step.

    Build the optimizer after this call: FSDP replaces the parameters by sharded DTensors.
    ``model`` itself stays usable for evaluation (under FSDP it *is* the sharded module, so
    every rank must then run the same evaluation).

    Args:
        model: the GPT, already on ``device``.
        ranks: from :func:`setup`.
        device: this rank's device.
        fsdp: shard parameters, gradients and optimizer state with FSDP2 (needs torchrun).
        activation_checkpointing: recompute each block's activations during backward.
    """
    if activation_checkpointing:
        checkpoint_blocks(model)
    if fsdp and not ranks.active:
        say(ranks, "note: --fsdp shards across processes started by torchrun; training unsharded")
        fsdp = False
    if fsdp:
        if has_lora(model):
            raise GptkitError("--fsdp with LoRA adapters is not supported; drop one of the two")
        if model.cls_head is not None:
            raise GptkitError("--fsdp with a classification head is not supported; drop --fsdp")
        from torch.distributed.device_mesh import init_device_mesh

        fully_shard = _fsdp2()[0]
        mesh = init_device_mesh(device.type, (ranks.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, head
        return model
    if ranks.world_size > 1:
        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # A classification head goes unused by the LM loss; DDP must be told to expect it.
            find_unused_parameters=model.cls_head is not None,
        )
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step (the gradients
    accumulate locally and are reduced once, as DDP's ``no_sync`` documents)."""
    if isinstance(module, DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
        return
    if is_fsdp(module):
        module.set_requires_gradient_sync(enabled)  # type: ignore[operator]
    yield


# -- checkpoints under FSDP ------------------------------------------------------------------


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimizer's own numbering (the keys of its
    ``state_dict``), which is also the numbering of a checkpoint's optimizer file."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


class _WholeOptimizer:
    """What ``save_checkpoint`` reads from an optimizer (its state_dict), gathered whole."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def whole(model: GPT, optimizer: torch.optim.Optimizer, ranks: Ranks) -> tuple[GPT | None, Any]:
    """The model and optimizer to write to a checkpoint, on rank 0 (None elsewhere).

    Under FSDP every rank must call this: the shards are gathered to rank 0 (on the CPU),
    which gets an ordinary GPT and the optimizer state numbered as one process numbers it.
    Otherwise the model and optimizer are returned as they are.
    """
    if not is_fsdp(model):
        return (model, optimizer) if ranks.is_main else (None, None)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if not ranks.is_main:
        return None, None
    if model.config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    plain = model_from_state(model.config, weights, origin="the gathered FSDP shards")
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    state = {
        "state": {index[name]: s for name, s in optim["state"].items()},
        "param_groups": [
            dict(g, params=[index[name] for name in g["params"]]) for g in optim["param_groups"]
        ],
    }
    return plain, _WholeOptimizer(state)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, groups: Any
) -> None:
    """Load a checkpoint's optimizer moments; under FSDP each rank keeps its own shard."""
    if not is_fsdp(model):
        load_optimizer(optimizer, directory, groups)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(directory / OPTIMIZER)).items():
        idx, field = key.split(".", 1)
        state.setdefault(names[int(idx)], {})[field] = value
    by_name = [dict(g, params=[names[i] for i in g["params"]]) for g in groups]
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": state, "param_groups": by_name},
        options=StateDictOptions(full_state_dict=True),
    )
