"""Figures for the notebooks. Every function is keyword-only, returns ``(fig, ax)`` and saves only
when given ``path`` (written as PNG and, beside it, SVG; the directory is created)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

CONDITION_STYLE = {"swap": ("tab:red", "swap A <- B"), "same_subject": ("tab:green", "control: same subject"),
                   "random": ("tab:gray", "control: random, same norm")}


def save_figure(fig: Figure, path: str | Path | None) -> None:
    """Save ``fig`` as ``path`` (PNG) and the same name with ``.svg``; no-op without a path."""
    if path is None:
        return
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"Software": None})
    with plt.rc_context({"svg.hashsalt": "lks"}):  # stable element ids: re-runs give identical SVGs
        fig.savefig(path.with_suffix(".svg"), bbox_inches="tight", metadata={"Date": None})


def plot_swap_success(*, summary: pd.DataFrame, path: str | Path | None = None, title: str = "") -> tuple[Figure, Axes]:
    """Swap success (top-1 moves to B's object) by layer, with the two controls."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for cond, grp in summary.groupby("condition"):
        color, label = CONDITION_STYLE.get(cond, ("k", cond))
        ax.plot(grp.layer, grp.success, marker="o", ms=3, color=color, label=f"{label}: top-1 = B's object")
        if cond == "swap":
            ax.plot(grp.layer, grp.kept_a, ls="--", color=color, alpha=0.6, label=f"{label}: top-1 still A's object")
    ax.set(xlabel="layer whose output is replaced", ylabel="fraction of pairs", ylim=(-0.02, 1.02),
           title=title or "Replacing a subject's knowledge block")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return fig, ax


def plot_shift_heatmap(*, swaps: pd.DataFrame, path: str | Path | None = None, max_pairs: int = 40) -> tuple[Figure, Axes]:
    """Probability moved to B's object (``p_b - p_b_base``), pairs x layers, swap condition."""
    df = swaps[swaps.condition == "swap"]
    pairs = sorted(df.pair.unique())[:max_pairs]
    grid = (df[df.pair.isin(pairs)].assign(shift=lambda d: d.p_b - d.p_b_base)
            .pivot(index="pair", columns="layer", values="shift"))
    labels = [f"{a} <- {b}" for a, b in df[df.layer == df.layer.min()].set_index("pair").loc[grid.index, ["subject_a", "subject_b"]].values]
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(grid) + 1.5))
    im = ax.imshow(grid.values, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(grid.shape[1]), grid.columns, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set(xlabel="layer", title="P(B's object) after swap minus before")
    fig.colorbar(im, ax=ax, fraction=0.03)
    save_figure(fig, path)
    return fig, ax


def plot_loss_curves(*, history: list[dict] | pd.DataFrame, path: str | Path | None = None, title: str = "") -> tuple[Figure, Axes]:
    """Per-epoch training losses (edit, equivalence, locality, total)."""
    h = pd.DataFrame(history)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for col, style in (("loss", "k-"), ("edit", "C0-"), ("equiv", "C1-"), ("loc", "C2-")):
        if col in h:
            ax.plot(h.epoch, h[col], style, marker="o", ms=3, label={"loss": "total"}.get(col, col))
    ax.set(xlabel="epoch", ylabel="mean training loss (seen edits)", yscale="log", title=title or "Training losses")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return fig, ax


def plot_metric_bars(*, table: pd.DataFrame, path: str | Path | None = None, title: str = "") -> tuple[Figure, Axes]:
    """Grouped bars: rows of ``table`` are settings (e.g. unedited, linear, residual), columns metrics."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    n_set, n_met = table.shape
    width = 0.8 / n_set
    x = np.arange(n_met)
    for i, (name, row) in enumerate(table.iterrows()):
        ax.bar(x + i * width - 0.4 + width / 2, row.values.astype(float), width, label=str(name))
    ax.set_xticks(x, table.columns, fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="score", title=title)
    ax.legend(fontsize=8, ncol=min(4, n_set))
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    return fig, ax


def plot_scaling(*, results: pd.DataFrame, metrics: list[str], path: str | Path | None = None,
                 title: str = "") -> tuple[Figure, Axes]:
    """Metrics versus the number of simultaneous edits (log x), one line per metric and data set."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for (ds, metric), style in zip([(d, m) for d in sorted(results.dataset.unique()) for m in metrics],
                                   [c + s for s in ("-", "--", ":") for c in ("C0", "C1", "C2", "C3", "C4")]):
        grp = results[results.dataset == ds].sort_values("n_edits")
        ax.plot(grp.n_edits, grp[metric], style[:2], ls=style[2:], marker="o", label=f"{ds}: {metric}")
    ax.set(xscale="log", xlabel="simultaneous edits", ylabel="score", ylim=(0, 1.05), title=title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return fig, ax


def plot_capability(*, before: pd.DataFrame, after: pd.DataFrame, path: str | Path | None = None,
                    title: str = "") -> tuple[Figure, Axes]:
    """Paired bars with 95% intervals for each task's headline metric, unedited vs edited."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = np.arange(len(before))
    for i, (df, label) in enumerate(((before, "unedited"), (after, "edited"))):
        err = np.vstack([df.value - df.ci_low, df.ci_high - df.value])
        ax.bar(x + (i - 0.5) * 0.38, df.value, 0.38, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, [f"{t}\n{m}" for t, m in zip(before.task, before.metric)], fontsize=8)
    ax.set(title=title or "General capability before and after editing", ylabel="value")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    return fig, ax
