"""Training: the single loop, its optimizer and schedule."""

from gptkit.train.loop import evaluate, finetune, train
from gptkit.train.optim import lr_at, make_optimizer

__all__ = ["evaluate", "finetune", "lr_at", "make_optimizer", "train"]
