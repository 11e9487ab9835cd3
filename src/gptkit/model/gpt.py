"""The decoder-only transformer: every family gptkit runs is this one file, switched by config.

References: Vaswani et al. 2017 (attention, sinusoidal positions); Radford et al. 2018
(GPT-1: post-LN blocks, learned positions); Radford et al. 2019 (GPT-2: pre-LN, scaled
residual init); Brown et al. 2020 (GPT-3: alternating dense and banded attention); Su et
al. 2021 (RoPE); Zhang & Sennrich 2019 (RMSNorm); Shazeer 2020 (SwiGLU); Ainslie et al.
2023 (grouped-query attention).

Shape legend: B batch, T new tokens, S cached + new tokens, C n_embd, nh query heads,
nkv key/value heads, hs head size, V vocabulary, H MLP hidden size.

The model is pure single-device code: no optimizer, no I/O, no distributed logic. Its
compute goes through :mod:`gptkit.model.ops`, one call per operation (``ops.attention`` is
``F.scaled_dot_product_attention``, ``ops.dropout`` is ``F.dropout``, ...), whose faster
implementations are chosen there. Read top-down: leaf modules first, :class:`GPT` last.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.config import ModelConfig
from gptkit.errors import GptkitError
from gptkit.model import ops
from gptkit.model.kv_cache import KVCache


class Norm(nn.Module):
    """LayerNorm (GPT-1/2) or RMSNorm (Llama) over the last dimension C."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind, self.eps = config.norm, config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        use_bias = config.bias and config.norm == "layernorm"
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if use_bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "rmsnorm":
            return ops.rms_norm(x, self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    def for_matmul(self, x: Tensor) -> Tensor:
        """``self(x)`` for a matmul to read (under bf16 autocast it may come back in bf16,
        the dtype the matmul casts it to; see :func:`ops.layer_norm_for_matmul`)."""
        if self.kind == "rmsnorm":
            return self(x)
        return ops.layer_norm_for_matmul(x, self.weight, self.bias, self.eps)


class Dropout(nn.Module):
    """``nn.Dropout``'s semantics on :func:`ops.dropout`; ``residual`` adds it to a stream."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return ops.dropout(x, self.p if self.training else 0.0)

    def residual(self, x: Tensor, y: Tensor) -> Tensor:
        """``x + self(y)``."""
        return ops.dropout_add(x, y, self.p if self.training else 0.0)


def rope_tables(positions: Tensor, head_size: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin for rotary embeddings, (B, 1, T, hs), computed in fp32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_size, 2, device=positions.device).float() / head_size)
    )
    freqs = positions[..., None].float() * inv_freq  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hs)
    return emb.cos(), emb.sin()


def rope_table(n_pos: int, head_size: int, theta: float, device: torch.device) -> Tensor:
    """:func:`rope_tables` of positions 0..n_pos-1 stacked, (2, n_pos, hs) fp32: row p of
    [0] and [1] is cos and sin at position p, the same numbers :func:`rope_tables` gives."""
    cos, sin = rope_tables(torch.arange(n_pos, device=device)[None], head_size, theta)
    return torch.stack((cos[0, 0], sin[0, 0]))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + hs/2) of each head (the Hugging Face "rotate_half" layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def sinusoidal_table(n_pos: int, dim: int) -> Tensor:
    """The fixed encoding of Vaswani et al.: sin on even dimensions, cos on odd ones."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table


class Attention(nn.Module):
    """Causal multi-head self-attention with grouped-query heads and an optional KV cache.

    ::

        x ─► qkv ─┬─ q (B, nh, T, hs) ──(rope)──┐
                  ├─ k (B, nkv, T, hs) ─(rope)──┼─► cache ─► SDPA ─► proj ─► y
                  └─ v (B, nkv, T, hs) ─────────┘
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hs = config.n_head, config.kv_heads, config.head_size
        self.qkv = nn.Linear(config.n_embd, (self.nh + 2 * self.nkv) * self.hs, bias=config.bias)
        self.proj = nn.Linear(self.nh * self.hs, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the qkv projection computes in, where it declares one (a quantized
        layer from :mod:`gptkit.model.quant` computing in bf16 while handing fp32 on); None
        for a plain ``nn.Linear``. Attention may then compute in it too."""
        return getattr(self.qkv, "compute_dtype", None)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        cache: tuple[Tensor, Tensor] | None,
        slots: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)  # (B, T, (nh + 2 nkv) hs)
        q, k, v = qkv.split([self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs], -1)
        q = q.view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        views = qkv if rope is None and cache is None else None  # q, k, v: views of qkv
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            assert slots is not None
            k_cache, v_cache = cache
            if B == 1:  # torch.compile writes index_copy_ in place; scatter_ copies the cache
                k_cache.index_copy_(2, slots[0], k.to(k_cache.dtype))
                v_cache.index_copy_(2, slots[0], v.to(v_cache.dtype))
            else:
                index = slots[:, None, :, None].expand(B, self.nkv, T, self.hs)
                k_cache.scatter_(2, index, k.to(k_cache.dtype))
                v_cache.scatter_(2, index, v.to(v_cache.dtype))
            S = mask.shape[-1] if mask is not None else T
            k, v = k_cache[:, :, :S].to(q.dtype), v_cache[:, :, :S].to(q.dtype)  # (B, nkv, S, hs)
        y = ops.attention(
            q,
            k,
            v,
            mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            dtype=self.compute_dtype(),
            qkv=views,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)  # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    """GELU MLP (GPT-1/2) or SwiGLU (Llama): ``proj(silu(gate(x)) * up(x))`` with gate and up
    fused into one ``fc`` matrix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        H = config.hidden_size
        out = 2 * H if self.kind == "swiglu" else H
        self.fc = nn.Linear(config.n_embd, out, bias=config.bias)
        self.proj = nn.Linear(H, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, H) or (B, T, 2H)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)  # (B, T, H) each
            h = F.silu(gate) * up
        else:
            h = ops.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.proj(h)


class Block(nn.Module):
    """pre-LN (GPT-2, Llama): x + f(norm(x));  post-LN (GPT-1): norm(x + f(x))."""

    def __init__(self, config: ModelConfig, local: bool = False):
        super().__init__()
        self.local = local  # banded attention over the last attention_window positions
        self.pre = config.norm_position == "pre"
        self.norm_1 = Norm(config)
        self.attn = Attention(config)
        self.norm_2 = Norm(config)
        self.mlp = MLP(config)
        self.drop = Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        cache: tuple[Tensor, Tensor] | None,
        slots: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        if self.pre:
            y = self.attn(self.norm_1.for_matmul(x), rope, cache, slots, mask)
            x = self.drop.residual(x, y)
            return self.drop.residual(x, self.mlp(self.norm_2.for_matmul(x)))
        x = self.norm_1(self.drop.residual(x, self.attn(x, rope, cache, slots, mask)))
        return self.norm_2(self.drop.residual(x, self.mlp(x)))


class LMOutput(NamedTuple):
    """``model(ids, labels=ids)``: the loss and the logits, by name or as ``loss, logits``
    (transformers' ``CausalLMOutput`` unpacks the same way)."""

    loss: Tensor
    logits: Tensor


class GPT(nn.Module):
    """``model(ids)`` -> logits ``(B, T, V)``; ``model(ids, cache=KVCache(...))`` decodes
    incrementally. ``hidden`` gives the final hidden states for task heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wpe = nn.Embedding(config.block_size, C) if config.pos_emb == "learned" else None
        if config.pos_emb == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(config.block_size, C), False)
        self.embed_scale = math.sqrt(C) if config.pos_emb == "sinusoidal" else 1.0
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, local=config.is_local_layer(i)) for i in range(config.n_layer)
        )
        self.norm_f = Norm(config) if config.norm_position == "pre" else None
        # Rotary cos/sin of every position, looked up per forward: a plain attribute, not a
        # buffer, so that it stays fp32 under model.to(dtype), stays out of state dicts and
        # of DDP's buffer broadcasts, and is rebuilt (not copied) by _apply on a device move.
        # (Computed per forward instead, torch.compile recomputes the trigonometry inside
        # every layer's kernels: 4% of a SmolLM2 prefill.)
        self.rope: Tensor | None = self._rope_table(self.wte.weight.device)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # GPT-1's task head: label logits from the final token's hidden state.
        self.cls_head = nn.Linear(C, len(config.labels)) if config.labels else None
        if not self.wte.weight.is_meta:  # on the meta device there is nothing to fill
            self.apply(self._init_weights)
            # GPT-2: scale the init of projections into the residual stream, 1/sqrt(2 n_layer).
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, 0.0, config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _rope_table(self, device: torch.device) -> Tensor | None:
        c = self.config
        if c.pos_emb != "rope":
            return None
        return rope_table(c.block_size, c.head_size, c.rope_theta, device)

    def _apply(self, fn: Any, recurse: bool = True) -> GPT:
        # .to(), .cuda(), to_empty(), .half() ...: the rope table follows the embedding's device
        super()._apply(fn, recurse)
        if self.rope is not None and self.rope.device != self.wte.weight.device:
            self.rope = self._rope_table(self.wte.weight.device)
        return self

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe else 0)
        return n

    def add_classifier(self, labels: tuple[str, ...] | list[str]) -> None:
        """Give the model a fresh classification head over ``labels`` (replacing any)."""
        self.config = self.config.replace(labels=tuple(labels))
        w = self.wte.weight
        self.cls_head = nn.Linear(self.config.n_embd, len(labels), device=w.device, dtype=w.dtype)
        nn.init.normal_(self.cls_head.weight, 0.0, self.config.init_std)
        nn.init.zeros_(self.cls_head.bias)

    def _positions(self, B: int, T: int, device: torch.device, cache: KVCache | None) -> Tensor:
        if cache is None:
            if self.config.block_size < T:
                raise GptkitError(
                    f"sequence of {T} tokens is longer than the context ({self.config.block_size})"
                )
            return torch.arange(T, device=device).expand(B, T)
        if cache.length + T > cache.max_len:
            raise GptkitError(
                f"the KV cache holds {cache.max_len} positions; {cache.length} used + {T} new "
                "do not fit (generation slides the window for you)"
            )
        return cache.pos[:, None] + torch.arange(T, device=device)  # (B, T)

    @staticmethod
    def _segment_masks(segments: Tensor) -> tuple[Tensor, Tensor]:
        """Positions and the dense mask of a batch of segments (see :meth:`hidden`)."""
        T = segments.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
        allowed = (segments[:, :, None] == segments[:, None, :]) & causal  # (B, T, T)
        pos = allowed.sum(-1) - 1  # index within the segment
        return pos, allowed[:, None]  # (B, T), (B, 1, T, T)

    def _masks(self, pos: Tensor, cache: KVCache | None) -> tuple[Tensor | None, Tensor | None]:
        """Boolean attention masks (True = attend), dense and locally banded.

        ``None`` means plain causal attention over the new tokens (SDPA's fast path). Key
        slot s is visible to a query at position p when s <= p (dense) and, for the banded
        layers of GPT-3's alternating pattern, also p - s < attention_window.
        """
        T = pos.shape[1]
        if cache is not None and cache.length > 0:
            keys = torch.arange(cache.length + T, device=pos.device)  # slot == position
        else:
            keys = torch.arange(T, device=pos.device)
        q = pos[:, None, :, None]  # (B, 1, T, 1)
        mask = keys <= q if cache is not None and cache.length > 0 else None  # (B, 1, T, S)
        local = None
        if self.config.attention_pattern == "alternating":
            local = (keys <= q) & (q - keys < self.config.attention_window)
        return mask, local

    def hidden(
        self, idx: Tensor, cache: KVCache | None = None, segments: Tensor | None = None
    ) -> Tensor:
        """Final hidden states (B, T, C), after the last norm.

        ``segments`` (B, T) integers lay several sequences side by side in a row: a token
        attends only to earlier tokens of its own segment, and positions restart at 0 with
        each segment. Padding is a segment of its own (left or right), packed examples are
        segments 1, 2, ...; the result at every real token is what that sequence alone gives.
        """
        B, T = idx.shape
        seg_mask = None
        if segments is None:
            pos = self._positions(B, T, idx.device, cache)  # (B, T)
        else:
            if cache is not None:
                raise GptkitError("segments and a KV cache cannot be combined")
            self._positions(B, T, idx.device, None)  # checks the length
            pos, seg_mask = self._segment_masks(segments.to(idx.device))
        x = self.wte(idx)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.wpe is not None:
            x = x + self.wpe(pos)
        elif self.config.pos_emb == "sinusoidal":
            x = x + self.sinusoid[pos]
        x = self.drop(x)
        rope = None
        if self.rope is not None:
            table = self.rope[:, pos]  # (2, B, T, hs)
            rope = table[0, :, None], table[1, :, None]  # cos, sin: (B, 1, T, hs)
        mask, local_mask = self._masks(pos, cache)
        if seg_mask is not None:
            mask = seg_mask
            if local_mask is not None:
                local_mask = seg_mask & (
                    pos[:, None, :, None] - pos[:, None, None, :] < self.config.attention_window
                )
        for i, block in enumerate(self.blocks):
            layer_cache = (cache.k[i], cache.v[i]) if cache is not None else None
            layer_mask = local_mask if block.local else mask
            x = block(x, rope, layer_cache, pos if cache is not None else None, layer_mask)
        if cache is not None:
            cache.pos = cache.pos + T
            cache.length += T
        return self.norm_f(x) if self.norm_f is not None else x

    @overload
    def forward(
        self,
        idx: Tensor,
        cache: KVCache | None = ...,
        segments: Tensor | None = ...,
        only: Tensor | None = ...,
        labels: None = ...,
    ) -> Tensor: ...
    @overload
    def forward(
        self,
        idx: Tensor,
        cache: KVCache | None = ...,
        segments: Tensor | None = ...,
        only: Tensor | None = ...,
        *,
        labels: Tensor,
    ) -> LMOutput: ...
    def forward(
        self,
        idx: Tensor,
        cache: KVCache | None = None,
        segments: Tensor | None = None,
        only: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor | LMOutput:
        """Logits (B, T, V) for token ids (B, T); with ``only``, a bool (B, T) mask, the
        logits (N, V) of its N selected positions alone (fine-tuning scores the completion
        tokens only, and the head over a large vocabulary costs as much as many layers).

        With ``labels`` (B, T), as transformers' causal LMs take them (``model(ids,
        labels=ids)``): ``LMOutput(loss, logits)``, the loss the mean cross-entropy of
        ``labels[:, 1:]`` given positions ``:-1`` (shifted here; -100 marks a label to skip).
        """
        h = self.hidden(idx, cache, segments)
        logits = self.lm_head(h if only is None else h[only])
        if labels is None:
            return logits
        if only is not None:
            raise GptkitError("labels= scores every position; it cannot be combined with only=")
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
        )
        return LMOutput(loss, logits)

    def classify(self, idx: Tensor, last: Tensor, segments: Tensor | None = None) -> Tensor:
        """Label logits (B, K): the head applied to the hidden state at index ``last[b]`` of
        each row (the extract token that ends each example)."""
        if self.cls_head is None:
            raise GptkitError("this model has no classification head; fine-tune one first")
        h = self.hidden(idx, segments=segments)
        return self.cls_head(h[torch.arange(idx.shape[0], device=idx.device), last])
