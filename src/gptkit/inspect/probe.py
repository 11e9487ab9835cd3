"""What a model computes inside, as tensors: attention weights, the residual stream read
through the head (the logit lens), per-token losses and next-token entropy.

References: Vaswani et al. 2017 (attention weights ``softmax(QKᵀ/√d + mask)``); nostalgebraist
2020, "interpreting GPT: the logit lens" (the final norm and the head applied to every
layer's residual stream); Abnar & Zuidema 2020, "Quantifying Attention Flow in
Transformers" (attention rollout); Shannon 1948 (entropy, bits).

The fast attention kernels never materialise the weights, and the model's forward stays as
it is: inspection runs the model's own forward on a *twin*, a copy of its module tree that
shares every parameter and buffer (no memory, no copy of the weights) and carries hooks of
its own. A hook before each attention layer reads the layer's inputs (x, rotary tables,
mask) and recomputes the weights by the reference formula; a hook after each block keeps
its output, the residual stream. The model itself never gets a hook, so a compiled graph or
a server decoding on another thread with the same model is untouched.

Shape legend: L layers, nh query heads, nkv key/value heads, T tokens, hs head size,
C embedding width, V vocabulary.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.model.gpt import Attention, apply_rope

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _twin(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module``'s tree: the same parameters, buffers and attributes, its
    own child list and hook tables (the existing hooks kept), so that hooks added to the
    twin never reach ``module``."""
    twin = copy.copy(module)
    twin._modules = {
        name: (_twin(child) if child is not None else None)
        for name, child in module._modules.items()
    }
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            setattr(twin, name, OrderedDict(getattr(module, name)))
    return twin


def _as_ids(model: GPT, ids: Tensor | Sequence[int]) -> Tensor:
    """``ids`` as one row (1, T) of longs on the model's device, checked."""
    x = torch.as_tensor(ids, dtype=torch.long)
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1:
        raise GptkitError(
            f"inspection takes one sequence of token ids, (T,) or (1, T); got shape "
            f"{tuple(x.shape)}: inspect the rows one at a time"
        )
    if x.numel() == 0:
        raise GptkitError("no token ids to inspect; give a non-empty text")
    V, block = model.config.vocab_size, model.config.block_size
    if int(x.min()) < 0 or int(x.max()) >= V:
        raise GptkitError(f"token ids must be in 0..{V - 1} (the model's vocabulary)")
    if x.numel() > block:
        raise GptkitError(
            f"{x.numel()} tokens are more than the model's context ({block}); inspect a "
            "shorter text"
        )
    return x[None].to(model.wte.weight.device)


def attention_weights(
    attn: Attention, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None
) -> Tensor:
    """``softmax(q kᵀ / √hs + mask)`` of one attention layer for its input ``x`` (B, T, C),
    without a KV cache, in fp32: (B, nh, T, T). ``mask`` None is causal (True = attend)."""
    B, T, _ = x.shape
    qkv = attn.qkv(x).float()  # (B, T, (nh + 2 nkv) hs)
    q, k, _ = qkv.split([attn.nh * attn.hs, attn.nkv * attn.hs, attn.nkv * attn.hs], -1)
    q = q.view(B, T, attn.nh, attn.hs).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, attn.nkv, attn.hs).transpose(1, 2)  # (B, nkv, T, hs)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if attn.nkv != attn.nh:  # grouped-query heads: key head j serves nh / nkv query heads
        k = k.repeat_interleave(attn.nh // attn.nkv, dim=1)  # (B, nh, T, hs)
    scores = q @ k.transpose(-2, -1) / math.sqrt(attn.hs)  # (B, nh, T, T)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def _run(
    model: GPT,
    ids: Tensor | Sequence[int],
    attention: bool,
    keep: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """One forward of ``model`` over ``ids`` through a hooked twin: the logits (T, V), the
    residual stream after every block (L, T, C) and, if ``attention``, the weights
    (L, nh, T, T), or what ``keep`` makes of each layer's (nh, T, T) weights, stacked (a
    long text's weights need not all be held at once)."""
    x = _as_ids(model, ids)
    twin = _twin(model)
    assert isinstance(twin, GPT)
    weights: list[Tensor] = []
    stream: list[Tensor] = []

    def keep_weights(module: nn.Module, args: tuple) -> None:
        h, rope, cache, _, mask = args
        assert cache is None  # inspection runs without a KV cache
        layer = attention_weights(module, h, rope, mask)[0]  # type: ignore[arg-type]
        weights.append(keep(layer) if keep is not None else layer)

    def keep_stream(module: nn.Module, args: tuple, out: Tensor) -> None:
        stream.append(out[0].float())

    for block in twin.blocks:
        if attention:
            block.attn.register_forward_pre_hook(keep_weights)
        block.register_forward_hook(keep_stream)
    twin.eval()  # no dropout: the twins' flags alone, the model keeps its own
    with torch.inference_mode():
        logits = twin(x)[0].float()  # (T, V)
    out: dict[str, Any] = {"logits": logits, "stream": torch.stack(stream)}
    if attention:
        out["attention"] = torch.stack(weights)
    return out


def attention(model: GPT, ids: Tensor | Sequence[int]) -> Tensor:
    """Every layer's attention weights over ``ids``: (layers, heads, T, T) probabilities,
    row t the weights query t gives keys 0..T-1 (zero after t, and before the band of a
    GPT-3 banded layer); each row sums to 1.

    Args:
        model: any gptkit model (GPT-1/2/3, Llama with GQA and RoPE, quantized ones).
        ids: one sequence of token ids, (T,) or (1, T), at most the model's context.
    """
    return _run(model, ids, attention=True)["attention"]


def lens(model: GPT, stream: Tensor) -> Tensor:
    """The logit lens of residual states ``stream`` (..., C): the model's final norm (for
    pre-LN models; a post-LN block ends normalised) and its head, in fp32: (..., V)."""
    norm_f = model.norm_f
    with torch.inference_mode():
        h = stream.to(model.wte.weight.dtype)
        h = norm_f(h) if norm_f is not None else h
        return model.lm_head(h).float()


def logit_lens(model: GPT, ids: Tensor | Sequence[int]) -> Tensor:
    """The logit lens: what the model would predict after every layer, (layers, T, vocab)
    logits; the last layer's are the model's own logits.

    Args:
        model: any gptkit model.
        ids: one sequence of token ids, (T,) or (1, T). The result has layers x T x vocab
            floats (SmolLM2, 30 layers: 5.9 MB per token); :func:`residual_stream` and
            :func:`lens` give it one layer or position at a time.
    """
    # one layer at a time, shaped (1, T, C) as the model's own head call: a quantized head
    # may round differently for another number of rows
    return torch.stack([lens(model, layer[None])[0] for layer in residual_stream(model, ids)])


def residual_stream(model: GPT, ids: Tensor | Sequence[int]) -> Tensor:
    """The residual stream after every block, (layers, T, C) in fp32."""
    return _run(model, ids, attention=False)["stream"]


def losses_of(logits: Tensor, ids: Tensor) -> Tensor:
    """Cross-entropy (nats) of each next token ``ids[t + 1]`` under ``logits[t]``: (T-1,)."""
    return F.cross_entropy(logits[:-1].float(), ids[1:].to(logits.device), reduction="none")


def token_losses(model: GPT, ids: Tensor | Sequence[int]) -> Tensor:
    """Each token's surprise: the loss (nats) of token t + 1 given tokens 0..t, (T-1,).
    Their mean is what ``gptkit eval --task text`` reports as ``loss`` for the same ids.

    Args:
        model: any gptkit model.
        ids: one sequence of token ids, (T,) or (1, T), T >= 2.
    """
    x = _as_ids(model, ids)[0]
    if x.numel() < 2:
        raise GptkitError("token losses need at least two tokens (one to predict from)")
    return losses_of(_run(model, x, attention=False)["logits"], x)


def entropy(logits: Tensor) -> Tensor:
    """The entropy (nats) of the next-token distribution of each row of ``logits`` (..., V)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).nan_to_num().sum(-1)  # 0 * -inf (an impossible token) is 0


def ranks(logits: Tensor, ids: Tensor) -> Tensor:
    """The rank (1 = the top guess) of each next token ``ids[t + 1]`` under ``logits[t]``."""
    true = logits[:-1].gather(-1, ids[1:, None].to(logits.device))  # (T-1, 1)
    return (logits[:-1] > true).sum(-1) + 1


def rollout(weights: Tensor) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of weights (L, nh, T, T): each layer's
    head-mean weights mixed half and half with the identity (the residual connection),
    rows renormalised, multiplied from the first layer up. (T, T): how much each position
    draws on each input token through all layers."""
    T = weights.shape[-1]
    eye = torch.eye(T, device=weights.device)
    out = eye
    for layer in weights.float():
        a = 0.5 * layer.mean(0) + 0.5 * eye
        out = (a / a.sum(-1, keepdim=True)) @ out
    return out
