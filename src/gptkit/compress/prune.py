"""Pruning: zero the least important weights of a GPT, or cut whole heads, channels or layers.

Unstructured and semi-structured methods set weights of the blocks' Linear layers to zero
and keep the shapes (sparse weights are stored dense, zeros and all):

- ``magnitude``: the smallest |W| of each layer (``scope="layer"``) or of all the blocks'
  layers together (``scope="global"``); Han et al. 2015.
- ``wanda``: the smallest ``|W_ij| · ‖X_j‖₂`` in each output row, with ‖X_j‖ the norm of input
  feature j over calibration tokens; blocks are pruned in order, each measured on the
  outputs of the already pruned blocks before it (Sun et al. 2023, "A Simple and Effective
  Pruning Approach for Large Language Models", Algorithm 1).
- ``N:M`` (``2:4``): in every group of M consecutive inputs of a row, the M - N weights of
  the lowest score go (the Wanda score with calibration data, else |W|); NVIDIA's 2:4
  sparse tensor cores' pattern (Mishra et al. 2021).

Structured methods cut units out of the weight matrices, rewrite the config and give a
smaller model that loads, exports and decodes as any other:

- ``heads``: whole key/value groups (a KV head and the query heads that read it, so
  grouped-query attention stays grouped), the same number in every layer, those whose
  output ``y_g W_o,gᵀ`` has the least energy on the calibration tokens (Michel et al. 2019
  ask the same question with gradients);
- ``channels``: MLP hidden units, the same number per layer, kept a multiple of 32 (the
  int4 group size) where the width allows, scored ``‖h_j‖₂ · ‖W_down[:, j]‖₂`` (Wanda's
  score for a whole column; LLM-Pruner, Ma et al. 2023, prunes the same coupled structure);
- ``layers``: whole blocks with the lowest Block Influence ``1 - cos(x_in, x_out)`` averaged
  over calibration tokens (Men et al. 2024, "ShortGPT").

A structurally pruned model computes exactly what the original computes with the cut units
masked out (zero output columns, or a block replaced by the identity); the tests check it.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.model.lora import has_lora
from gptkit.model.quant import QuantLinear
from gptkit.tokenizer import Tokenizer

UNSTRUCTURED = ("magnitude", "wanda")
STRUCTURED = ("heads", "channels", "layers")
METHODS = (*UNSTRUCTURED, "2:4", *STRUCTURED)
#: hidden widths stay multiples of this (the int4 group size, GGUF's 32-value blocks)
CHANNEL_MULTIPLE = 32


# -- what is pruned --------------------------------------------------------------------------


def block_linears(model: GPT) -> dict[str, nn.Linear]:
    """The blocks' Linear layers, the ones pruning acts on (the embedding and the output
    head stay dense, as in Wanda and SparseGPT)."""
    return {
        name: m
        for name, m in model.named_modules()
        if name.startswith("blocks.") and isinstance(m, nn.Linear)
    }


def weight_sparsity(model: GPT) -> float:
    """The fraction of zeros among the weights of the blocks' Linear layers."""
    layers = block_linears(model).values()
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    return zeros / max(1, sum(m.weight.numel() for m in layers))


def _check_model(model: GPT) -> None:
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise GptkitError(
            "the model is quantized; prune a full-precision model (load it with "
            "quantize=None / --quantize none) and quantize after pruning"
        )
    if has_lora(model):
        raise GptkitError("the model has unmerged LoRA adapters; merge them first (merge_lora)")


def _n_m(method: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"(\d+):(\d+)", method)
    if match is None:
        return None
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise GptkitError(f"N:M sparsity needs 0 < N < M, got {method!r}; for example 2:4")
    return n, m


# -- calibration -------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook to end a calibration forward once the layers of interest ran."""


def _forward_all(model: GPT, calib: Tensor, batch_size: int) -> None:
    """Run ``calib`` (N, T) through the model's blocks in batches, for the hooks on them to
    read (a hook may end a batch's forward early by raising :class:`_Stop`)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, calib.shape[0], batch_size):
            with contextlib.suppress(_Stop):
                model.hidden(calib[i : i + batch_size].to(device))


def _first_block_inputs(model: GPT, calib: Tensor, batch_size: int) -> list[list[Any]]:
    """The positional arguments the first block receives for each calibration batch (its
    input x with the rope tables and masks), caught by a hook that ends the forward there."""
    caught: list[list[Any]] = []

    def catch(module: nn.Module, args: tuple[Any, ...]) -> None:
        caught.append(list(args))
        raise _Stop

    handle = model.blocks[0].register_forward_pre_hook(catch)
    try:
        _forward_all(model, calib, batch_size)
    finally:
        handle.remove()
    return caught


def _block_sq_norms(block: nn.Module, inputs: list[list[Any]]) -> dict[str, Tensor]:
    """Σ over the calibration tokens of x_j² for the input features of each Linear layer of
    ``block``, run on ``inputs`` (as caught by :func:`_first_block_inputs`)."""
    sums: dict[str, Tensor] = {}
    handles = []
    for name, layer in block.named_modules():
        if not isinstance(layer, nn.Linear):
            continue

        def hook(module: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (N, K)
            sums[name] = sums.get(name, 0) + x.square().sum(0)

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for args in inputs:
                block(*args)
    finally:
        for h in handles:
            h.remove()
    return sums


def _check_calib(calib: Tensor | None, method: str, model: GPT) -> Tensor:
    if calib is None:
        raise GptkitError(
            f"--method {method} measures importance on calibration text: pass calib= (token "
            "ids, shape (N, T)) or --calib-data DIR"
        )
    if calib.dim() != 2 or calib.dtype not in (torch.int32, torch.int64):
        raise GptkitError(f"calib must be integer token ids of shape (N, T), got {calib.shape}")
    if calib.shape[1] > model.config.block_size:
        raise GptkitError(
            f"calibration rows of {calib.shape[1]} tokens exceed the context "
            f"({model.config.block_size}); use shorter rows"
        )
    return calib


def calibration_ids(
    source: str | Path, tokenizer: Tokenizer, rows: int = 8, length: int = 256
) -> Tensor:
    """Token ids (rows, length) for calibration: the first tokens of a directory written by
    ``gptkit prepare`` (its train split), of a text file, or of the .txt/.md files of a
    directory (in name order), encoded with ``tokenizer``."""
    path = Path(source)
    need = rows * length
    if (path / "meta.json").is_file():
        from gptkit.data.loader import TokenShards

        arrays = TokenShards(path).split("train")
        ids = torch.cat([torch.from_numpy(a[:need].astype("int64")) for a in arrays])[:need]
    else:
        files = [path] if path.is_file() else sorted(
            p for p in path.glob("*") if p.suffix in (".txt", ".md") and p.is_file()
        )  # fmt: skip
        if not files:
            raise GptkitError(
                f"calibration data {path} is neither a prepared directory, a text file, nor "
                "a directory of .txt files"
            )
        text = "".join(f.read_text(errors="replace")[: need * 12] for f in files)
        ids = torch.tensor(tokenizer.encode(text[: need * 12])[:need])
    if ids.numel() < need:
        raise GptkitError(f"{path} holds {ids.numel()} tokens; calibration needs {need}")
    return ids.reshape(rows, length)


# -- unstructured and N:M ----------------------------------------------------------------------


def _lowest_mask(score: Tensor, k: int, dim: int | None) -> Tensor:
    """A bool mask of the ``k`` lowest scores (of all, or along ``dim``): True = pruned."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k <= 0:
        return mask
    if dim is None:
        idx = torch.topk(score.flatten(), k, largest=False).indices
        return mask.view(-1).index_fill_(0, idx, True).view_as(score)
    idx = torch.topk(score, k, dim=dim, largest=False).indices
    return mask.scatter_(dim, idx, True)


def _n_m_mask(score: Tensor, n: int, m: int) -> Tensor:
    """In every group of ``m`` consecutive inputs of each row, the ``m - n`` lowest."""
    N, K = score.shape
    if K % m:
        raise GptkitError(f"N:M pruning needs layer widths divisible by {m}; one has {K}")
    groups = score.reshape(N, K // m, m)
    return _lowest_mask(groups, m - n, dim=-1).reshape(N, K)


@torch.no_grad()
def _prune_magnitude(model: GPT, amount: float, scope: str) -> None:
    layers = block_linears(model)
    if scope == "layer":
        for layer in layers.values():
            w = layer.weight
            w.masked_fill_(_lowest_mask(w.abs(), round(amount * w.numel()), None), 0.0)
        return
    scores = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
    mask = _lowest_mask(scores, round(amount * scores.numel()), None)
    start = 0
    for layer in layers.values():
        n = layer.weight.numel()
        layer.weight.masked_fill_(mask[start : start + n].view_as(layer.weight), 0.0)
        start += n


@torch.no_grad()
def _prune_by_score(
    model: GPT, amount: float, n_m: tuple[int, int] | None, calib: Tensor | None, batch_size: int
) -> None:
    """Wanda (per output row) or N:M, block by block: each block's input norms measured on
    the outputs of the blocks before it, already pruned (the inputs are carried from block
    to block, as Wanda's reference code does, rather than recomputed from the embedding)."""
    inputs = _first_block_inputs(model, calib, batch_size) if calib is not None else []
    for block in model.blocks:
        norms = _block_sq_norms(block, inputs) if calib is not None else None
        for name, layer in block.named_modules():
            if not isinstance(layer, nn.Linear):
                continue
            w = layer.weight
            score = w.abs().float()
            if norms is not None:
                score = score * norms[name].sqrt()[None, :]
            if n_m is None:
                mask = _lowest_mask(score, round(amount * w.shape[1]), dim=1)
            else:
                mask = _n_m_mask(score, *n_m)
            w.masked_fill_(mask, 0.0)
        with torch.inference_mode():  # the pruned block's outputs feed the next one
            for args in inputs:
                args[0] = block(*args)


# -- structured ------------------------------------------------------------------------------


def _kept(total: int, amount: float, multiple: int = 1) -> int:
    """Units kept when ``amount`` of ``total`` go: rounded to ``multiple``, at least one
    unit (or multiple) removed and one kept."""
    keep = round(total * (1 - amount) / multiple) * multiple
    keep = min(max(keep, multiple), total - multiple)
    if keep <= 0 or keep >= total:
        raise GptkitError(
            f"cannot prune {amount:.0%} of {total} units (in steps of {multiple}); "
            "choose another sparsity"
        )
    return keep


def _top(score: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` highest scores, in ascending index order (keeps the layout)."""
    return torch.topk(score, keep).indices.sort().values


def _slice_linear(layer: nn.Linear, rows: Tensor | None, cols: Tensor | None) -> nn.Linear:
    """A new Linear holding the chosen output rows and input columns of ``layer``."""
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _proj_inputs(model: GPT, calib: Tensor, path: str, batch_size: int) -> dict[int, list[Tensor]]:
    """The inputs of every block's ``path`` Linear (attn.proj or mlp.proj), per block."""
    seen: dict[int, list[Tensor]] = {}
    handles = []
    for i, block in enumerate(model.blocks):

        def hook(module: nn.Module, args: tuple[Tensor, ...], i: int = i) -> None:
            seen.setdefault(i, []).append(args[0].detach().float().flatten(0, -2))  # (N, K)

        handles.append(block.get_submodule(path).register_forward_pre_hook(hook))
    try:
        _forward_all(model, calib, batch_size)
    finally:
        for h in handles:
            h.remove()
    return seen


def head_scores(model: GPT, calib: Tensor, batch_size: int = 4) -> Tensor:
    """(n_layer, n_kv_groups): Σ over calibration tokens of ‖y_g W_o,gᵀ‖², the energy each
    key/value group's heads put into the residual stream."""
    c = model.config
    nh, nkv, hs = c.n_head, c.kv_heads, c.head_size
    inputs = _proj_inputs(model, calib, "attn.proj", batch_size)
    scores = torch.zeros(c.n_layer, nkv)
    for i, block in enumerate(model.blocks):
        w = block.attn.proj.weight.detach().float().view(-1, nh, hs)  # (C, nh, hs)
        for y in inputs[i]:
            per_head = torch.einsum("nhd,chd->nhc", y.view(-1, nh, hs), w)  # (N, nh, C)
            energy = per_head.square().sum((0, 2))  # (nh,)
            scores[i] += energy.view(nkv, nh // nkv).sum(1).cpu()
    return scores


@torch.no_grad()
def _prune_heads(model: GPT, amount: float, calib: Tensor, batch_size: int) -> GPT:
    c = model.config
    nh, nkv, hs = c.n_head, c.kv_heads, c.head_size
    r = nh // nkv  # query heads per key/value group
    keep = _kept(nkv, amount)
    scores = head_scores(model, calib, batch_size)
    for i, block in enumerate(model.blocks):
        groups = _top(scores[i], keep)  # (keep,)
        q_heads = (groups[:, None] * r + torch.arange(r)).flatten()  # query heads they hold
        q_rows = (q_heads[:, None] * hs + torch.arange(hs)).flatten()
        kv_rows = (groups[:, None] * hs + torch.arange(hs)).flatten()
        rows = torch.cat([q_rows, nh * hs + kv_rows, (nh + nkv) * hs + kv_rows])
        attn = block.attn
        attn.qkv = _slice_linear(attn.qkv, rows.to(attn.qkv.weight.device), None)
        attn.proj = _slice_linear(attn.proj, None, q_rows.to(attn.proj.weight.device))
        attn.nh, attn.nkv = keep * r, keep
    new_nh = keep * r
    full_width = c.n_embd % new_nh == 0 and c.n_embd // new_nh == hs
    model.config = c.replace(
        n_head=new_nh,
        n_kv_head=None if keep == new_nh else keep,
        head_dim=None if full_width else hs,
    )
    return model


def channel_scores(model: GPT, calib: Tensor, batch_size: int = 4) -> Tensor:
    """(n_layer, hidden): ‖h_j‖₂ over calibration tokens times ‖W_down[:, j]‖₂."""
    inputs = _proj_inputs(model, calib, "mlp.proj", batch_size)
    rows = []
    for i, block in enumerate(model.blocks):
        norm = torch.stack([h.square().sum(0) for h in inputs[i]]).sum(0).sqrt()
        rows.append((norm * block.mlp.proj.weight.detach().float().norm(dim=0)).cpu())
    return torch.stack(rows)


@torch.no_grad()
def _prune_channels(model: GPT, amount: float, calib: Tensor, batch_size: int) -> GPT:
    c = model.config
    H = c.hidden_size
    multiple = CHANNEL_MULTIPLE if H % CHANNEL_MULTIPLE == 0 and H > CHANNEL_MULTIPLE else 1
    keep = _kept(H, amount, multiple)
    scores = channel_scores(model, calib, batch_size)
    for i, block in enumerate(model.blocks):
        mlp = block.mlp
        chosen = _top(scores[i], keep).to(mlp.fc.weight.device)
        rows = torch.cat([chosen, H + chosen]) if c.mlp == "swiglu" else chosen  # gate, up
        mlp.fc = _slice_linear(mlp.fc, rows, None)
        mlp.proj = _slice_linear(mlp.proj, None, chosen)
    model.config = c.replace(mlp_hidden=None if keep == 4 * c.n_embd else keep)
    return model


def layer_scores(model: GPT, calib: Tensor, batch_size: int = 4) -> Tensor:
    """(n_layer,) ShortGPT's Block Influence: 1 - mean cos(x_in, x_out) per token."""
    sums = torch.zeros(model.config.n_layer)
    handles = []
    for i, block in enumerate(model.blocks):

        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor, i: int = i) -> None:
            cos = F.cosine_similarity(args[0].float(), out.float(), dim=-1)  # (B, T)
            sums[i] += (1 - cos).sum().cpu()

        handles.append(block.register_forward_hook(hook))
    try:
        _forward_all(model, calib, batch_size)
    finally:
        for h in handles:
            h.remove()
    count = calib.numel()
    return sums / count


@torch.no_grad()
def _prune_layers(model: GPT, amount: float, calib: Tensor, batch_size: int) -> GPT:
    c = model.config
    if c.attention_pattern != "dense":
        raise GptkitError(
            "layer pruning would shift the alternating dense/banded pattern of this model; "
            "prune heads or channels instead"
        )
    keep = _kept(c.n_layer, amount)
    chosen = _top(layer_scores(model, calib, batch_size), keep)
    model.blocks = nn.ModuleList(model.blocks[int(i)] for i in chosen)
    model.config = c.replace(n_layer=keep)
    return model


# -- the public call -------------------------------------------------------------------------


def prune(
    model: GPT,
    method: str = "magnitude",
    sparsity: float | None = 0.5,
    calib: Tensor | None = None,
    *,
    scope: str = "layer",
    batch_size: int = 4,
) -> GPT:
    """Prune ``model`` in place and return it (see the module docstring for the methods).

    Args:
        model: a full-precision GPT (not quantized, no unmerged LoRA adapters).
        method: magnitude, wanda, N:M (e.g. 2:4), heads, channels or layers.
        sparsity: the fraction to remove: of each layer's weights (magnitude with
            scope="layer"), of all the blocks' weights (scope="global"), of each output
            row's (wanda); of the key/value groups, MLP channels or blocks (structured,
            rounded to whole units). N:M implies 1 - N/M (None takes it).
        calib: token ids (N, T) of calibration text; needed by wanda and the structured
            methods, used by N:M when given (Wanda's score instead of |W|).
        scope: magnitude only: "layer" or "global".
        batch_size: calibration rows per forward.
    """
    _check_model(model)
    n_m = _n_m(method)
    if method not in METHODS and n_m is None:
        raise GptkitError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if n_m is not None:
        implied = 1 - n_m[0] / n_m[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-6:
            raise GptkitError(
                f"{method} sparsity is {implied:g} by definition; pass sparsity {implied:g} "
                "or leave it out"
            )
        sparsity = implied
    if sparsity is None or not 0.0 < sparsity < 1.0:
        raise GptkitError(f"sparsity must be a fraction in (0, 1), got {sparsity!r}")
    if scope not in ("layer", "global"):
        raise GptkitError(f"scope must be 'layer' or 'global', got {scope!r}")
    was_training = model.training
    model.eval()
    if method == "magnitude":
        _prune_magnitude(model, sparsity, scope)
    elif method == "wanda" or n_m is not None:
        if method == "wanda" or calib is not None:
            calib = _check_calib(calib, method, model)
        _prune_by_score(model, sparsity, n_m, calib, batch_size)
    else:
        calib = _check_calib(calib, method, model)
        structured = {"heads": _prune_heads, "channels": _prune_channels, "layers": _prune_layers}
        model = structured[method](model, sparsity, calib, batch_size)
    return model.train(was_training)


def removed_fraction(before: int, model: GPT, embeddings: bool = False) -> float:
    """The fraction of ``before`` parameters a pruned model no longer has."""
    return 1 - model.num_params(embeddings) / before


def recover(
    pruned: str | Path, data: str | Path, steps: int, seq_len: int = 256, **train_kw: Any
) -> GPT:
    """A short LM fine-tune of the pruned checkpoint ``pruned`` on prepared ``data`` (the
    one training loop, all weights, windows of ``seq_len`` tokens or the model's context if
    shorter); returns the tuned model.
    Unstructured sparsity would fill back in, so this is for structured pruning."""
    from gptkit.checkpoint import load, read_model_config
    from gptkit.train import train

    seq_len = min(seq_len, read_model_config(Path(pruned)).block_size)
    with tempfile.TemporaryDirectory(prefix="gptkit-recover-") as tmp:
        kw = {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": min(10, steps), "batch_size": 4}
        summary = train(
            data,
            Path(tmp) / "run",
            init_from=str(pruned),
            preset="finetune",
            max_steps=steps,
            seq_len=seq_len,
            eval_every=0,
            save_every=0,
            **(kw | train_kw),
        )
        model, _ = load(summary["checkpoint"])
    return model


def prune_cmd(
    model: str,
    method: str,
    out: str,
    sparsity: float | None = None,
    calib_data: str | None = None,
    recover_steps: int = 0,
    data: str | None = None,
    scope: Literal["layer", "global"] = "layer",
    calib_rows: int = 8,
    calib_length: int = 256,
) -> None:
    """Prune a model and save it; `gptkit.load(out)` gives it back.

    Args:
        model: any source gptkit loads (checkpoint, run directory, HF directory, .gguf).
        method: magnitude, wanda, 2:4 (any N:M), heads, channels or layers.
        out: the checkpoint directory to write.
        sparsity: the fraction to remove (of weights; of KV groups, channels or layers for
            the structured methods); N:M implies it.
        calib_data: calibration text: a `gptkit prepare` directory, a text file or a
            directory of .txt files (wanda, heads, channels, layers; optional for N:M).
        recover_steps: after structured pruning, fine-tune this many steps on --data.
        data: the recovery fine-tune's data (a `gptkit prepare` directory).
        scope: magnitude: prune each layer to the sparsity (layer) or all together (global).
        calib_rows: calibration sequences.
        calib_length: tokens per calibration sequence.
    """
    from gptkit.checkpoint import load, save_checkpoint

    if recover_steps and method not in STRUCTURED:
        raise GptkitError(
            f"--recover-steps fine-tunes every weight, which would fill {method}'s zeros back "
            "in; recover structured pruning (heads, channels, layers) only"
        )
    if recover_steps and data is None:
        raise GptkitError("--recover-steps needs --data DIR (a `gptkit prepare` directory)")
    net, tok = load(model, quantize=None)  # full precision: pruning reads the weights
    calib = None
    if calib_data is not None:
        if tok is None:
            raise GptkitError(f"{model} has no tokenizer to encode {calib_data} with")
        calib = calibration_ids(calib_data, tok, calib_rows, calib_length)
    before = net.num_params(embeddings=False)
    prune(net, method, sparsity, calib, scope=scope)
    save_checkpoint(out, net, tok)
    if recover_steps:
        save_checkpoint(out, recover(out, data, recover_steps), tok)  # type: ignore[arg-type]
    size = sum(f.stat().st_size for f in Path(out).iterdir()) / 2**20
    print(
        f"wrote {out} ({method}: {weight_sparsity(net):.1%} zeros in the blocks, "
        f"{removed_fraction(before, net):.1%} of block parameters removed, {size:.0f} MiB)"
    )


__all__ = [
    "METHODS",
    "STRUCTURED",
    "UNSTRUCTURED",
    "block_linears",
    "calibration_ids",
    "channel_scores",
    "head_scores",
    "layer_scores",
    "prune",
    "prune_cmd",
    "recover",
    "removed_fraction",
    "weight_sparsity",
]
