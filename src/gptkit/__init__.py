"""gptkit: a complete GPT system. See README.md.

The Python API mirrors the command line::

    import gptkit
    model, tokenizer = gptkit.load("gptkit-demo/run")
    print(gptkit.generate(model, tokenizer, "def", max_new_tokens=50, temperature=0))
"""

from __future__ import annotations

__version__ = "0.1.0"

# The functions share their names with the subpackages that hold them (gptkit.generate,
# gptkit.train): importing them here binds the names to the functions.
from gptkit import compress, inspect  # gptkit.compress.prune, gptkit.inspect.attention, ...
from gptkit.checkpoint import load
from gptkit.config import ModelConfig, SampleConfig, TrainConfig
from gptkit.data.prepare import prepare
from gptkit.errors import GptkitError
from gptkit.generate import classify, generate, stream
from gptkit.model import GPT
from gptkit.pipeline import pipeline
from gptkit.tokenizer import load_tokenizer
from gptkit.train import finetune, train

__all__ = [
    "GPT",
    "GptkitError",
    "ModelConfig",
    "SampleConfig",
    "TrainConfig",
    "classify",
    "compress",
    "finetune",
    "generate",
    "inspect",
    "load",
    "load_tokenizer",
    "pipeline",
    "prepare",
    "stream",
    "train",
]
