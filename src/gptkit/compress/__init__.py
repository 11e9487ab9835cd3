"""Compression: post-training quantization of a model's Linear layers
(:mod:`gptkit.compress.quantize`) and quantized checkpoints
(:mod:`gptkit.compress.checkpoint`, whose ``load`` is the public ``gptkit.load``)."""

from gptkit.compress.checkpoint import is_quantized, load, load_quantized, save_quantized
from gptkit.compress.quantize import MODES, QuantConfig, quantization, quantize

__all__ = [
    "MODES",
    "QuantConfig",
    "is_quantized",
    "load",
    "load_quantized",
    "quantization",
    "quantize",
    "save_quantized",
]
