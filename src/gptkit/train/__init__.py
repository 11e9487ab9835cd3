"""Training: setup, the single loop, its objectives, optimizer and schedule."""

from gptkit.train.host import keep_freed_memory
from gptkit.train.loop import finetune, train
from gptkit.train.objectives import evaluate
from gptkit.train.optim import lr_at, make_optimizer

__all__ = ["evaluate", "finetune", "keep_freed_memory", "lr_at", "make_optimizer", "train"]
