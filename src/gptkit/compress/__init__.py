"""Compression: post-training quantization of a model's Linear layers, and quantized
checkpoints.

The quantized layers and the round-to-nearest transform live with the model
(:mod:`gptkit.model.quant`), and quantized checkpoints with the loader
(:mod:`gptkit.checkpoint.quantized`), since ``gptkit.load`` rebuilds them; this package is
the public face of both, and the home of the algorithms that transform models: pruning
(:mod:`gptkit.compress.prune`) and distillation (:mod:`gptkit.compress.distill`).
"""

from gptkit.checkpoint import is_quantized, load_quantized, save_quantized
from gptkit.compress.distill import distill
from gptkit.compress.prune import (
    METHODS,
    block_linears,
    calibration_ids,
    prune,
    weight_sparsity,
)
from gptkit.model.quant import MODES, QuantConfig, quantization, quantize

__all__ = [
    "METHODS",
    "MODES",
    "QuantConfig",
    "block_linears",
    "calibration_ids",
    "distill",
    "is_quantized",
    "load_quantized",
    "prune",
    "quantization",
    "quantize",
    "save_quantized",
    "weight_sparsity",
]
