"""The model's compute ops, each one call with the semantics of the plain torch expression
its docstring names; the fast implementation behind it is chosen per call by device and
dtype (the compiled AVX512-BF16 kernels of ``gptkit.model.kernels``, Python tiles, numpy's
random numbers, or torch itself), so the model file holds the architecture alone.

- :func:`attention`: ``F.scaled_dot_product_attention`` (``sdpa.py``)
- :func:`dropout`, :func:`dropout_add`: ``F.dropout(x, p)``, ``x + F.dropout(y, p)``
- :func:`gelu`: ``F.gelu``
- :func:`layer_norm_for_matmul`: ``F.layer_norm``, written in bf16 for a bf16 matmul
  (``elementwise.py``)
- :func:`rms_norm`: ``F.rms_norm`` (``elementwise.py``)

Dropout's random masks and their packing into bits are in ``masks.py``. Every fast path is
tested against the plain expression (``tests/test_attention_memory.py``,
``tests/test_elementwise_kernels.py``).
"""

from gptkit.model.ops.elementwise import (
    dropout,
    dropout_add,
    gelu,
    layer_norm_for_matmul,
    rms_norm,
)
from gptkit.model.ops.sdpa import attention

__all__ = ["attention", "dropout", "dropout_add", "gelu", "layer_norm_for_matmul", "rms_norm"]
