"""Pictures of what :mod:`gptkit.inspect.probe` measures: attention heatmaps, the surprise
strip and page, the logit-lens table and the entropy bars (matplotlib, Agg; PNG at
:data:`DPI`, each figure's size fixed by its content so that the file's pixel size is known).

The attention grid follows the layers x heads overviews of Vig 2019 ("A Multiscale
Visualization of Attention in the Transformer Model", bertviz); the logit-lens table follows
nostalgebraist's 2020 post (rows are layers, cells the top guess, coloured by probability).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

DPI = 100
_LENS_COLUMNS = 16  # the logit-lens table shows the last positions, one column each
_STRIP_COLUMNS = 16  # tokens per row of the surprise strip
_TICK_LIMIT = 64  # above this many tokens, attention maps label every k-th token only
_RC = {"text.parse_math": False, "font.size": 9}  # a token "$x$" is text, not TeX
# Attention maps on a square-root scale: most heads park most weight on the first token (an
# "attention sink", Xiao et al. 2023), which on a linear scale hides the rest of each row.
_SQRT = PowerNorm(0.5, vmin=0.0, vmax=1.0)


def token_label(text: str) -> str:
    """A token as a label: spaces and line ends made visible, empty shown as ∅."""
    shown = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return shown or "∅"


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays the figure's
    plt.close(fig)
    return path


def _tokens_on_axes(ax: plt.Axes, labels: Sequence[str], both: bool = True) -> None:
    step = max(1, math.ceil(len(labels) / _TICK_LIMIT))
    ticks = list(range(0, len(labels), step))
    shown = [labels[i] for i in ticks]
    ax.set_xticks(ticks, shown, rotation=90, fontsize=7)
    if both:
        ax.set_yticks(ticks, shown, fontsize=7)


def attention_figure_size(layers: int, heads: int) -> tuple[float, float]:
    """(width, height) in inches of :func:`draw_attention`'s figure."""
    return 20.0, max(7.0, min(30.0, 0.35 * layers * max(1.0, 9 / heads)))


def draw_attention(
    path: Path,
    weights: np.ndarray,
    roll: np.ndarray,
    labels: Sequence[str],
    layer: int,
    head: int | None,
) -> Path:
    """attention.png: every layer x head map tiled in a grid, the chosen layer's head (or
    the mean of its heads, ``head`` None) at full size, and the rollout over all layers.

    Args:
        weights: (L, nh, T, T) probabilities; roll: (T, T) rollout.
        labels: the T tokens as labels; layer, head: the map shown at full size.
    """
    L, nh, T, _ = weights.shape
    grid = np.full((L * (T + 1) - 1, nh * (T + 1) - 1), np.nan)  # NaN lines between maps
    for i in range(L):
        for j in range(nh):
            grid[i * (T + 1) : i * (T + 1) + T, j * (T + 1) : j * (T + 1) + T] = weights[i, j]
    chosen = weights[layer, head] if head is not None else weights[layer].mean(0)
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(
            1, 3, figsize=attention_figure_size(L, nh), width_ratios=[1.1, 1, 1]
        )
        ax = axes[0]
        ax.imshow(grid, cmap="viridis", norm=_SQRT, interpolation="nearest")
        centres = [i * (T + 1) + (T - 1) / 2 for i in range(max(L, nh))]
        ax.set_yticks(centres[:L], [str(i) for i in range(L)], fontsize=7)
        ax.set_xticks(centres[:nh], [str(j) for j in range(nh)], fontsize=7)
        ax.set_ylabel("layer")
        ax.set_xlabel("head")
        ax.set_title(f"all heads: {L} layers x {nh} heads (rows: queries, columns: keys)")
        which = f"head {head}" if head is not None else f"mean of {nh} heads"
        for ax, image, title in (
            (axes[1], chosen, f"layer {layer}, {which}"),
            (axes[2], roll, "attention rollout over all layers"),
        ):
            shown = ax.imshow(image, cmap="viridis", norm=_SQRT, interpolation="nearest")
            _tokens_on_axes(ax, labels)
            ax.set_title(title)
            ax.set_xlabel("key (attended to)")
            ax.set_ylabel("query")
        fig.colorbar(shown, ax=axes[2], fraction=0.04, pad=0.02, label="weight (sqrt scale)")
        fig.tight_layout()
        return _save(fig, path)


def surprise_figure_size(n: int) -> tuple[float, float]:
    """(width, height) in inches of :func:`draw_surprise`'s strip of ``n`` tokens."""
    cols, rows = min(n, _STRIP_COLUMNS), max(1, math.ceil(n / _STRIP_COLUMNS))
    return 1.5 + 1.1 * cols, 1.4 + 0.65 * rows


def draw_surprise(path: Path, labels: Sequence[str], losses: np.ndarray, perplexity: float) -> Path:
    """surprise.png: the tokens in rows of cells coloured by their loss (nats), each cell
    its token and loss; the first token, which nothing predicts, is grey.

    Args:
        labels: the T tokens; losses: (T-1,) nats of tokens 1..T-1.
    """
    n = len(labels)
    cols, rows = min(n, _STRIP_COLUMNS), max(1, math.ceil(n / _STRIP_COLUMNS))
    cells = np.full(rows * cols, np.nan)
    cells[1:n] = losses
    top = max(float(np.max(losses)), 1e-6) if len(losses) else 1.0
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=surprise_figure_size(n))
        cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#dddddd")
        image = ax.imshow(cells.reshape(rows, cols), cmap=cmap, vmin=0, vmax=top, aspect="auto")
        for i, label in enumerate(labels):
            r, c = divmod(i, cols)
            value = "" if i == 0 else f"\n{losses[i - 1]:.2f}"
            dark = i > 0 and losses[i - 1] > 0.6 * top
            ax.text(c, r, label[:12] + value, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")  # fmt: skip
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"surprise per token (nats); perplexity {perplexity:.2f}")
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
        fig.tight_layout()
        return _save(fig, path)


def lens_figure_size(layers: int, n: int) -> tuple[float, float]:
    """(width, height) in inches of :func:`draw_logit_lens`'s table of ``n`` positions."""
    return 4.5 + 1.05 * min(n, _LENS_COLUMNS), 1.6 + 0.28 * layers


def draw_logit_lens(
    path: Path,
    labels: Sequence[str],
    guesses: Sequence[Sequence[str]],
    probs: np.ndarray,
    answer: str,
    answer_probs: np.ndarray,
) -> Path:
    """logit_lens.png: a table of the top next-token guess at every layer (rows, last layer
    on top) for the last positions (columns, the input token below), coloured by its
    probability; beside it the probability of the final answer at the last position, layer
    by layer.

    Args:
        labels: the T input tokens; guesses: (L, T) labels of each layer's top guess;
        probs: (L, T) their probabilities; answer: the model's final top guess after the
        last token; answer_probs: (L,) its probability through each layer's lens there.
    """
    L, T = probs.shape
    first = max(0, T - _LENS_COLUMNS)
    with plt.rc_context(_RC):
        fig, (ax, side) = plt.subplots(
            1, 2, figsize=lens_figure_size(L, T), width_ratios=[min(T, _LENS_COLUMNS), 3]
        )
        ax.imshow(probs[:, first:], cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
        for i in range(L):
            for j in range(first, T):
                dark = probs[i, j] > 0.6
                ax.text(j - first, i, guesses[i][j][:10], ha="center", va="center",
                        fontsize=7, color="white" if dark else "black")  # fmt: skip
        ax.set_yticks(range(L), [str(i) for i in range(L)], fontsize=7)
        ax.set_xticks(range(T - first), [labels[j][:10] for j in range(first, T)], rotation=90)
        ax.set_ylabel("layer")
        ax.set_xlabel("input token (the cell: the guess for the next one)")
        ax.set_title("logit lens: top next-token guess per layer")
        side.plot(answer_probs, range(L), marker="o", markersize=3)
        side.set_xlim(0, 1)
        side.set_ylim(-0.5, L - 0.5)
        side.set_yticks([])
        side.set_xlabel(f"p({answer[:16]}) after the last token")
        side.grid(alpha=0.3)
        fig.tight_layout()
        return _save(fig, path)


def entropy_figure_size(n: int) -> tuple[float, float]:
    """(width, height) in inches of :func:`draw_entropy`'s bars for ``n`` positions."""
    return min(30.0, max(6.0, 1.0 + 0.4 * n)), 3.6


def draw_entropy(path: Path, labels: Sequence[str], bits: np.ndarray) -> Path:
    """entropy.png: the entropy (bits) of the next-token distribution after each token."""
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=entropy_figure_size(len(labels)))
        ax.bar(range(len(bits)), bits, color="#4c72b0")
        _tokens_on_axes(ax, labels, both=False)
        ax.set_ylabel("bits")
        ax.set_title("entropy of the next-token distribution after each token")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        return _save(fig, path)


def surprise_html(
    path: Path,
    tokens: Sequence[str],
    losses: Sequence[float],
    ranks: Sequence[int],
    perplexity: float,
    model: str,
) -> Path:
    """surprise.html: the text with each token's background as red as its loss, and its
    loss (nats, bits), probability and rank on hover. Every token is escaped."""
    top = max(max(losses, default=0.0), 1e-6)
    spans = [f'<span class="t first" title="first token: nothing predicts it">'
             f"{html.escape(tokens[0])}</span>"]  # fmt: skip
    for tok, loss, rank in zip(tokens[1:], losses, ranks, strict=True):
        tip = (
            f"loss {loss:.3f} nats ({loss / math.log(2):.2f} bits) · p {math.exp(-loss):.3f}"
            f" · rank {rank}"
        )
        alpha = min(1.0, loss / top)
        spans.append(
            f'<span class="t" style="background: rgba(220, 38, 38, {alpha:.3f})" '
            f'title="{html.escape(tip)}">{html.escape(tok)}</span>'
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>surprise · {html.escape(model)}</title>
<style>
body {{ font: 16px/1.6 system-ui, sans-serif; max-width: 50rem; margin: 2rem auto; }}
.text {{ white-space: pre-wrap; font-family: ui-monospace, monospace; }}
.t {{ border-radius: 3px; }} .t:hover {{ outline: 1px solid #333; }}
.first {{ background: #ddd; }}
</style></head><body>
<h1>Surprise per token</h1>
<p>{html.escape(model)} · {len(tokens)} tokens · perplexity {perplexity:.3f}
({sum(losses) / max(1, len(losses)):.3f} nats per token). Hover a token for its loss,
probability and rank; redder is more surprising.</p>
<p class="text">{"".join(spans)}</p>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path


def answer_figure_size(rows: int) -> tuple[float, float]:
    """(width, height) in inches of :func:`draw_answer_attention` for ``rows`` answer tokens."""
    return 12.0, max(3.5, min(24.0, 1.8 + 0.2 * rows))


def draw_answer_attention(
    target: Path | BinaryIO, weights: np.ndarray, rows: Sequence[str], columns: Sequence[str]
) -> None:
    """The web chat's attention map: each answer token (rows) over every token of the
    conversation (columns), the weights averaged over all layers and heads.

    Args:
        target: a path or a binary file the PNG goes to.
        weights: (answer tokens, all tokens) probabilities.
        rows, columns: the answer's tokens and all tokens, as labels.
    """
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=answer_figure_size(len(rows)))
        shown = ax.imshow(weights, cmap="viridis", norm=_SQRT, aspect="auto",
                          interpolation="nearest")  # fmt: skip
        _tokens_on_axes(ax, columns, both=False)
        step = max(1, math.ceil(len(rows) / _TICK_LIMIT))
        ax.set_yticks(range(0, len(rows), step), list(rows)[::step], fontsize=7)
        ax.set_xlabel("conversation token (attended to)")
        ax.set_ylabel("answer token")
        ax.set_title("attention of the answer, mean of all layers and heads")
        fig.colorbar(shown, ax=ax, fraction=0.03, pad=0.01, label="weight (sqrt scale)")
        fig.tight_layout()
        fig.savefig(target, dpi=DPI, format="png")
        plt.close(fig)
