"""Text generation: sampling functions, the KV-cache decoding loop, streaming.

``generate`` and ``stream`` work on text; ``generate_ids`` is the token-id loop they (and the
server) build on. The context policy is described in :mod:`gptkit.generate.generator`.
"""

from gptkit.generate.classify import classify
from gptkit.generate.generator import (
    Decoder,
    Detokenizer,
    TokenEvent,
    generate,
    generate_ids,
    stream,
)
from gptkit.generate.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    sample_next,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "Decoder",
    "Detokenizer",
    "TokenEvent",
    "apply_repetition_penalty",
    "apply_temperature",
    "classify",
    "generate",
    "generate_ids",
    "sample_next",
    "stream",
    "top_k_filter",
    "top_p_filter",
]
