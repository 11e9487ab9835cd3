"""Looking inside a model: attention maps, per-token surprise, the logit lens, entropy.

``attention(model, ids)`` (layers, heads, T, T), ``token_losses(model, ids)`` (T-1,) and
``logit_lens(model, ids)`` (layers, T, vocab) return tensors for notebooks
(:mod:`gptkit.inspect.probe`); ``gptkit inspect`` draws them (:mod:`gptkit.inspect.draw`,
:mod:`gptkit.inspect.run`).
"""

from gptkit.inspect.probe import (
    attention,
    entropy,
    lens,
    logit_lens,
    ranks,
    residual_stream,
    rollout,
    token_losses,
)

__all__ = [
    "attention",
    "entropy",
    "lens",
    "logit_lens",
    "ranks",
    "residual_stream",
    "rollout",
    "token_losses",
]
