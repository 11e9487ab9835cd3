"""Compression: post-training quantization of a model's Linear layers, and quantized
checkpoints.

The quantized layers and the round-to-nearest transform live with the model
(:mod:`gptkit.model.quant`), and quantized checkpoints with the loader
(:mod:`gptkit.checkpoint.quantized`), since ``gptkit.load`` rebuilds them; this package is
the public face of both, and the home of the algorithms that transform models.
"""

from gptkit.checkpoint import is_quantized, load_quantized, save_quantized
from gptkit.model.quant import MODES, QuantConfig, quantization, quantize

__all__ = [
    "MODES",
    "QuantConfig",
    "is_quantized",
    "load_quantized",
    "quantization",
    "quantize",
    "save_quantized",
]
