"""Text generation: sampling functions, the one decoding core, the batch decoder, streaming.

``generate`` and ``stream`` work on text; ``generate_ids`` is the token-id loop they build on.
:mod:`gptkit.generate.core` holds the pieces every decoding loop is made of (the serving
engine's too); the context policy is described in :mod:`gptkit.generate.generator`.
"""

from gptkit.generate.beam import Beam, BeamConfig, beam_search
from gptkit.generate.classify import classify
from gptkit.generate.core import Detokenizer, Row
from gptkit.generate.generator import (
    Decoder,
    TokenEvent,
    decode_text,
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
    "Beam",
    "BeamConfig",
    "Decoder",
    "Detokenizer",
    "Row",
    "TokenEvent",
    "apply_repetition_penalty",
    "apply_temperature",
    "beam_search",
    "classify",
    "decode_text",
    "generate",
    "generate_ids",
    "sample_next",
    "stream",
    "top_k_filter",
    "top_p_filter",
]
