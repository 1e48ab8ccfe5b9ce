"""Figures for the notebooks. Every function is keyword-only, returns ``(fig, ax)`` and saves only
when given ``path`` (written as PNG and, beside it, SVG; the directory is created)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lks.capability import HEADLINE, PERPLEXITY, p_label
from lks.methods import method_label

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
    fig.colorbar(im, ax=ax, fraction=0.03, label="change of P(B's object)")
    save_figure(fig, path)
    return fig, ax


LOSS_LABELS = {"loss": ("k-", "total (weighted sum)"), "edit": ("C0-", "edit NLL"), "equiv": ("C1-", "paraphrase NLL"),
               "loc": ("C2-", "locality KL"), "after": ("C3-", "after-target KL"), "gate": ("C4-", "gate BCE")}


def plot_loss_curves(*, history: list[dict] | pd.DataFrame, path: str | Path | None = None, title: str = "") -> tuple[Figure, Axes]:
    """Per-epoch training losses: the weighted total and every term the fit trained
    (:data:`lks.training.trainer.LOSS_NAMES`; terms unweighted, a term that stayed 0 is left out)."""
    h = pd.DataFrame(history)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for col, (style, label) in LOSS_LABELS.items():
        if col in h and (h[col] > 0).any():
            ax.plot(h.epoch, h[col], style, marker="o", ms=3, label=label)
    ax.set(xlabel="epoch", ylabel="mean training loss (seen edits)", yscale="log", title=title or "Training losses")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
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
    ax.legend(fontsize=8, ncol=min(4, n_set), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    return fig, ax


def plot_scaling(*, results: pd.DataFrame, metrics: list[str], path: str | Path | None = None,
                 title: str = "") -> tuple[Figure, Axes]:
    """Metrics versus the number of simultaneous edits (log x, ticks at the sizes run): one colour
    per metric, one line style per data set."""
    fig, ax = plt.subplots(figsize=(7, 4))
    datasets = sorted(results.dataset.unique())
    for (d, ds), (m, metric) in ((a, b) for a in enumerate(datasets) for b in enumerate(metrics)):
        grp = results[results.dataset == ds].sort_values("n_edits")
        ax.plot(grp.n_edits, grp[metric], color=f"C{m}", ls=("-", "--", ":", "-.")[d % 4], marker="os^D"[d % 4],
                label=f"{ds}: {metric}")
    sizes = sorted(results.n_edits.unique())
    ax.set(xscale="log", xlabel="simultaneous edits", ylabel="score", ylim=(0, 1.05), title=title)
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.legend(fontsize=7, ncol=len(datasets), loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return fig, ax


def plot_capability(*, comparison: pd.DataFrame, path: str | Path | None = None,
                    title: str = "") -> tuple[Figure, Axes]:
    """The paired effect of editing on each task's metric (``comparison``: rows of
    :func:`lks.capability.compare_capability`): edited minus unedited on the same items, with the
    paired 95% interval of the difference and the paired p-value; the dashed line is no change."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(comparison) + 1.5), 3.4))
    x = np.arange(len(comparison))
    diff = comparison["diff"].to_numpy(dtype=float)
    err = np.vstack([diff - comparison.diff_ci_low.to_numpy(dtype=float), comparison.diff_ci_high.to_numpy(dtype=float) - diff])
    ax.errorbar(x, diff, yerr=np.nan_to_num(err), fmt="o", color="C0", capsize=4)
    for xi, (d, hi, p) in enumerate(zip(diff, comparison.diff_ci_high, comparison.p_value)):
        ax.annotate(p_label(p), (xi, np.nanmax([d, hi])), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7)
    ax.axhline(0, color="0.4", ls="--", lw=1)
    ax.set_xticks(x, [f"{t}\n{m}" for t, m in zip(comparison.task, comparison.metric)], fontsize=8)
    ax.set(xlim=(-0.6, len(comparison) - 0.4), ylabel="edited − unedited (same items)",
           title=title or "Effect of editing on general capability (paired 95% CI)")
    ax.margins(y=0.25)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    return fig, ax


# one colour and marker per editing method, the same in every grid figure (names: lks.methods.method_label)
METHOD_STYLE = {"lks": ("tab:blue", "o"), "ft": ("tab:orange", "s"), "memit": ("tab:green", "^"),
                "alphaedit": ("tab:red", "D"), "alphaedit-seq": ("tab:purple", "v")}


def _method_style(method: str, i: int) -> tuple[str, str, str]:
    """``(colour, marker, label)`` of a method; a method without a style gets a free colour."""
    colour, marker = METHOD_STYLE.get(method, (f"C{4 + i % 6}", "v"))
    return colour, marker, method_label(method)


def _method_order(method: pd.Series) -> pd.Series:
    """A sort key: the methods of ``METHOD_STYLE`` in its order (LKS first), then any other."""
    return method.map({m: i for i, m in enumerate(METHOD_STYLE)}).fillna(len(METHOD_STYLE))


def plot_grid(*, results: pd.DataFrame, metrics: list[str], path: str | Path | None = None,
              title: str = "") -> tuple[Figure, np.ndarray]:
    """The grid (:func:`lks.report.read_grid`): one panel per data set (row) and metric (column),
    the metric against the number of edits (log x), one line per method. A cell that is not
    computed is a gap in its method's line; ``<metric>_base`` (the unedited model), where present,
    is a grey dashed line. Metrics with values in [0, 1] share the y range [0, 1.05]."""
    if results.empty:
        raise ValueError("plot_grid: no finished cells to draw")
    datasets, sizes = sorted(results.data.unique()), sorted(results.n.unique())
    fig, axes = plt.subplots(len(datasets), len(metrics), figsize=(2.9 * len(metrics), 2.5 * len(datasets)),
                             squeeze=False, sharex=True)
    for (r, ds), (c, metric) in ((a, b) for a in enumerate(datasets) for b in enumerate(metrics)):
        ax, sub = axes[r, c], results[results.data == ds]
        for i, (method, grp) in enumerate(sub.sort_values("method", key=_method_order).groupby("method", sort=False)):
            y = grp.set_index("n").reindex(sizes).get(metric)  # NaN where the cell is missing: a gap, not a jump
            if y is None or y.isna().all():
                continue
            color, marker, label = _method_style(method, i)
            ax.plot(sizes, y.to_numpy(dtype=float), color=color, marker=marker, ms=4, label=label)
        if f"{metric}_base" in sub:
            base = sub.groupby("n")[f"{metric}_base"].mean().reindex(sizes)
            ax.plot(sizes, base.to_numpy(dtype=float), color="0.5", ls="--", lw=1, label="unedited")
        values = sub[metric].dropna() if metric in sub else pd.Series(dtype=float)
        if values.empty:
            ax.text(0.5, 0.5, "no value", transform=ax.transAxes, ha="center", color="0.5")
        if values.empty or values.between(0, 1).all():
            ax.set_ylim(0, 1.05)
        ax.set(xscale="log", title=f"{ds}: {metric}")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes], fontsize=7)  # the sizes run, not 4x10^0
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.grid(alpha=0.3)
        if r == len(datasets) - 1:
            ax.set_xlabel("simultaneous edits")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title or "Edit metrics against the number of simultaneous edits")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path)
    return fig, axes


def plot_capability_grid(*, comparison: pd.DataFrame, path: str | Path | None = None,
                         title: str = "") -> tuple[Figure, np.ndarray]:
    """Capability before and after editing (:func:`lks.report.read_capability`), one panel (row) per
    task's headline metric (:data:`lks.capability.HEADLINE`), one x position per method and data set: the unedited
    value (hollow grey), the edited value (filled, the method's colour) with the paired 95% interval
    of the difference drawn around it (``after + [diff_ci_low, diff_ci_high] - diff``), and the
    paired p-value (:func:`lks.capability.p_label`) and the routed rows (of those seen) written above."""
    head = comparison[[HEADLINE.get(t) == m for t, m in zip(comparison.task, comparison.metric)]]
    if head.empty:
        raise ValueError("plot_capability_grid: no headline metric in the comparison")
    tasks = [t for t in HEADLINE if t in set(head.task)]
    # one row per task, one x position per method and data set: wide enough for 8 labelled points
    n_x = max(int((head.task == t).sum()) for t in tasks)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(max(6.0, 1.3 * n_x + 1.5), 2.4 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        rows = head[head.task == task].sort_values(["method", "data"], key=lambda c: _method_order(c) if c.name == "method"
                                                   else c).reset_index(drop=True)
        for x, row in rows.iterrows():
            color, marker, label = _method_style(row.method, x)
            err = [[row["diff"] - row.diff_ci_low], [row.diff_ci_high - row["diff"]]]
            ax.plot(x, row.before, marker=marker, mfc="none", color="0.5", ls="none", label="unedited")
            ax.errorbar(x, row.after, yerr=np.nan_to_num(err), marker=marker, color=color, capsize=3, ls="none",
                        label=label)
            top = np.nanmax([row.before, row.after, row.after + row.diff_ci_high - row["diff"]])
            seen = "" if pd.isna(row.rows_seen) else f"/{row.rows_seen:.0f}"
            ax.annotate(f"{p_label(row.p_value)}\nrouted {row.routed:.0f}{seen}", (x, top),
                        xytext=(0, 8), textcoords="offset points", ha="center", fontsize=6)
        ax.set_xticks(range(len(rows)), [f"{_method_style(m, 0)[2]}, {d}" for m, d in zip(rows.method, rows.data)],
                      fontsize=7)
        ppl = HEADLINE[task] in PERPLEXITY
        ax.set(title=f"{task}: {HEADLINE[task]}" + (" (lower is better)" if ppl else ""),
               xlim=(-0.6, len(rows) - 0.4))
        ax.margins(y=0.2)
        if not ppl:
            ax.set_ylim(0, 1.15)
        else:  # headroom for the labels above the highest point
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi + 0.2 * (hi - lo))
        ax.grid(axis="y", alpha=0.3)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    n = ", ".join(f"{v:,}" for v in sorted(head.n.unique()))
    fig.suptitle(title or f"General capability before and after {n} edits (bars: paired 95% CI of the difference)")
    fig.tight_layout(rect=(0, 0.2 / len(tasks), 1, 1))
    save_figure(fig, path)
    return fig, axes


def plot_update_mechanism(*, layers: pd.DataFrame, path: str | Path | None = None,
                          title: str = "") -> tuple[Figure, np.ndarray]:
    """Where a weight edit leaves its linear range (issue 37): one line per method and number of edits
    (``layers``: columns ``method``, ``n``, ``layer``, ``delta_rel`` = ``||Delta|| / ||W||`` per band
    layer, and ``target_realised``, the share of the planned change of the band's last output the
    updates deliver, with ``edits_per_dim``, edits per key dimension; from a fit's history entries,
    :func:`lks.report.update_diagnostics`), one row of axes per data set (column ``data``, if
    present). Left: ``||Delta|| / ||W||`` by layer (log y). Right: target realised against edits per
    key dimension (log x). ``axes`` has shape (data sets, 2)."""
    if layers.empty:
        raise ValueError("plot_update_mechanism: no update diagnostics to draw")
    layers = layers if "data" in layers else layers.assign(data="")
    datasets = sorted(layers.data.unique())
    # one x range per column, so the data sets' rows read against each other
    fig, axes = plt.subplots(len(datasets), 2, figsize=(9, 0.4 + 3.0 * len(datasets)), squeeze=False, sharex="col")
    darkest = max(1.0, np.log10(layers.n.max()))
    for row, data in zip(axes, datasets):
        part = layers[layers.data == data].sort_values(["method", "n", "layer"])
        for i, ((method, n), grp) in enumerate(part.groupby(["method", "n"])):
            colour, marker, label = _method_style(method, i)
            alpha = 0.35 + 0.65 * np.log10(n) / darkest  # darker: more edits
            row[0].plot(grp.layer, grp.delta_rel, color=colour, marker=marker, ms=4, alpha=alpha, label=f"{label}, N={n:,}")
            end = grp.dropna(subset=["target_realised"])
            if not end.empty:
                row[1].scatter(end.edits_per_dim.iloc[0], end.target_realised.iloc[0], color=colour, marker=marker,
                               alpha=alpha, label=f"{label}, N={n:,}")
        row[0].set(yscale="log", xlabel="band layer", ylabel="‖Δ‖ / ‖W‖", title=data)
        row[1].set(xscale="log", xlabel="edits per key dimension", ylabel="target change realised", ylim=(0, 1.05),
                   title=data)
        for ax in row:
            ax.grid(alpha=0.3)
    labelled = dict(kv for ax in axes[:, 0] for kv in zip(*reversed(ax.get_legend_handles_labels())))  # every row's
    axes[-1, 0].legend(labelled.values(), labelled.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.22),
                       ncol=3, frameon=False)
    fig.suptitle(title or "Weight editors: update size by layer and the target change they realise")
    fig.tight_layout()
    save_figure(fig, path)
    return fig, axes


def plot_token_layer_swap(*, swaps: pd.DataFrame, path: str | Path | None = None,
                          title: str = "") -> tuple[Figure, Axes]:
    """P(B's object) after the swap at each (token, layer) of A's prompt
    (:func:`lks.study.token_layer_swap`), tokens as rows in prompt order, the subject's last token
    marked with an arrow."""
    grid = swaps.pivot(index="position", columns="layer", values="p_b")
    tokens = swaps.drop_duplicates("position").set_index("position").loc[grid.index]
    labels = [f"{'→ ' if last else ''}{tok!r}" for tok, last in zip(tokens.token, tokens.is_subject_last)]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(grid) + 1.6))
    im = ax.imshow(grid.values, aspect="auto", cmap="Reds", vmin=0, vmax=max(0.05, float(np.nanmax(grid.values))))
    ax.set_xticks(range(grid.shape[1]), grid.columns, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set(xlabel="layer whose output is replaced", ylabel="token of A's prompt",
           title=title or "Where does the fact sit? The swap at every token and layer")
    fig.colorbar(im, ax=ax, fraction=0.03, label="P(B's object)")
    save_figure(fig, path)
    return fig, ax
