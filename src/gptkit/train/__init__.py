"""Training: the single loop, its optimizer and schedule."""

from gptkit.train.loop import evaluate, train
from gptkit.train.optim import lr_at, make_optimizer

__all__ = ["evaluate", "lr_at", "make_optimizer", "train"]
