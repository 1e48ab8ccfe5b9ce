"""The grid figures (lks.plotting.plot_grid, plot_capability_grid) on small hand-built frames:
what each panel holds, not how it looks."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402

from lks.plotting import (  # noqa: E402
    METHOD_STYLE,
    plot_capability,
    plot_capability_grid,
    plot_grid,
    plot_loss_curves,
    plot_scaling,
)


def grid_rows() -> pd.DataFrame:
    """Two data sets; on zsre LKS lacks N = 100 and MEMIT has only N = 10; no specificity on zsre."""
    rows = [("counterfact", m, n, 0.9 - 0.1 * i, 0.5) for i, m in enumerate(("lks", "memit")) for n in (10, 100, 1000)]
    rows += [("zsre", "lks", 10, 0.95, float("nan")), ("zsre", "lks", 1000, 0.85, float("nan")),
             ("zsre", "memit", 10, 0.7, float("nan"))]
    df = pd.DataFrame(rows, columns=["data", "method", "n", "reliability", "specificity"])
    return df.assign(reliability_base=0.02)


def method_lines(ax) -> list:
    return [ln for ln in ax.get_lines() if ln.get_label() != "unedited"]


def test_plot_grid_one_panel_per_data_set_and_metric_one_line_per_method_with_data():
    fig, axes = plot_grid(results=grid_rows(), metrics=["reliability", "specificity"])
    try:
        assert axes.shape == (2, 2)
        assert [ax.get_title() for ax in axes[:, 0]] == ["counterfact: reliability", "zsre: reliability"]
        assert all(ax.get_xscale() == "log" for ax in axes.flat)
        assert len(method_lines(axes[0, 0])) == 2 and len(method_lines(axes[1, 0])) == 2
        assert len(method_lines(axes[1, 1])) == 0  # no specificity on zsre: no line, no crash
        assert axes[0, 0].get_ylim() == pytest.approx((0, 1.05))
        # the same colour for a method in every panel
        lks_colour = {ln.get_color() for ax in axes.flat for ln in method_lines(ax) if ln.get_label() == "LKS"}
        assert lks_colour == {METHOD_STYLE["lks"][0]}
        # the unedited reference drawn from reliability_base
        assert any(ln.get_label() == "unedited" for ln in axes[0, 0].get_lines())
    finally:
        plt.close(fig)


def test_plot_grid_leaves_a_gap_for_a_missing_cell():
    fig, axes = plot_grid(results=grid_rows(), metrics=["reliability"])
    try:
        lks_line = next(ln for ln in method_lines(axes[1, 0]) if ln.get_label() == "LKS")
        x, y = lks_line.get_xdata(), np.asarray(lks_line.get_ydata(), dtype=float)
        assert list(x) == [10, 100, 1000]
        assert y[0] == pytest.approx(0.95) and math.isnan(y[1]) and y[2] == pytest.approx(0.85)
    finally:
        plt.close(fig)


def test_plot_grid_keeps_its_own_scale_for_a_metric_outside_0_1_and_refuses_an_empty_frame():
    df = grid_rows().assign(fluency=4.4)
    fig, axes = plot_grid(results=df, metrics=["fluency"])
    try:
        assert axes[0, 0].get_ylim()[1] > 4.4
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="no finished cells"):
        plot_grid(results=pd.DataFrame(), metrics=["reliability"])


def comparison_rows() -> pd.DataFrame:
    """LKS leaves SST-2 unchanged (nothing routed); MEMIT loses 0.10 accuracy and raises perplexity."""
    rows = []
    for method, shift in (("lks", 0.0), ("memit", -0.1)):
        rows += [
            (method, "sst2", "acc", 0.62, 0.62 + shift, shift - 0.05, shift + 0.05, 0.5 if shift else 1.0, 3 if shift else 0),
            (method, "sst2", "acc_norm", 0.6, 0.6, 0.0, 0.0, 1.0, 0),   # not a headline metric: not drawn
            (method, "wikitext2", "word_perplexity", 75.0, 75.0 - 20 * shift, -1.0, 3.0, 0.01, 4),
        ]
    df = pd.DataFrame(rows, columns=["method", "task", "metric", "before", "after", "diff_ci_low", "diff_ci_high",
                                     "p_value", "routed"])
    return df.assign(diff=df.after - df.before, data="counterfact", n=10000, n_pairs=32, rows_seen=32)


def test_plot_capability_grid_one_panel_per_headline_metric_with_ci_and_p_value():
    fig, axes = plot_capability_grid(comparison=comparison_rows())
    try:
        assert axes.shape == (2, 1)  # one row per task
        assert [ax.get_title() for ax in axes[:, 0]] == ["sst2: acc", "wikitext2: word_perplexity (lower is better)"]
        sst2, ppl = axes[:, 0]
        assert sst2.get_ylim() == pytest.approx((0, 1.15)) and ppl.get_ylim()[1] > 75
        texts = [t.get_text() for t in sst2.texts]
        assert texts == ["p 1.00\nrouted 0/32", "p 0.50\nrouted 3/32"]
        # the error bar around MEMIT's edited value is the paired CI of the difference, moved onto it
        bars = [c for c in sst2.containers if c.get_label() == "MEMIT"]
        (segment,) = bars[0].lines[2][0].get_segments()
        assert [y for _, y in segment] == pytest.approx([0.52 - 0.05, 0.52 + 0.05])
    finally:
        plt.close(fig)


def test_plot_capability_grid_refuses_a_comparison_without_headline_metrics():
    df = comparison_rows()
    with pytest.raises(ValueError, match="no headline metric"):
        plot_capability_grid(comparison=df[df.metric == "acc_norm"])


def test_plot_capability_draws_the_paired_difference_around_zero():
    """One point per task at ``diff`` with the paired interval as its error bar, a no-change line."""
    comp = pd.DataFrame({"task": ["sst2", "rte"], "metric": ["acc", "acc"], "diff": [-0.08, 0.01],
                         "diff_ci_low": [-0.12, -0.03], "diff_ci_high": [-0.04, 0.05], "p_value": [0.001, 0.7]})
    fig, ax = plot_capability(comparison=comp)
    try:
        point = next(ln for ln in ax.get_lines() if ln.get_marker() == "o")
        assert list(point.get_ydata()) == pytest.approx([-0.08, 0.01])
        assert any(list(ln.get_ydata()) == [0, 0] for ln in ax.get_lines())  # axhline(0)
        lo, hi = ax.get_ylim()
        assert lo < -0.12 and hi > 0.05 and hi - lo < 0.5  # scaled to the effects, not to 0-1
    finally:
        plt.close(fig)


def test_plot_loss_curves_draws_every_trained_term():
    """Each loss term that is not 0 in the history gets a line (the after-target KL and the gate
    included); a term that stayed 0 does not."""
    hist = [{"epoch": e, "loss": 3 / e, "edit": 1 / e, "equiv": 0.5 / e, "loc": 0.1, "after": 0.2 / e, "gate": 0.05,
             "seconds": 1.0} for e in (1, 2, 3)]
    fig, ax = plot_loss_curves(history=hist)
    try:
        assert len(ax.get_lines()) == 6
    finally:
        plt.close(fig)
    fig, ax = plot_loss_curves(history=[{**h, "gate": 0.0} for h in hist])
    try:
        assert len(ax.get_lines()) == 5 and "gate BCE" not in [ln.get_label() for ln in ax.get_lines()]
    finally:
        plt.close(fig)


def test_plot_scaling_gives_each_metric_its_own_colour_and_plain_size_ticks():
    res = pd.DataFrame({"dataset": ["zsre"] * 3 + ["counterfact"] * 3, "n_edits": [10, 100, 1000] * 2,
                        "reliability": [1.0, 0.9, 0.8] * 2, "locality": [0.9, 0.9, 0.8] * 2})
    fig, ax = plot_scaling(results=res, metrics=["reliability", "locality"])
    try:
        colours = {ln.get_label(): ln.get_color() for ln in ax.get_lines()}
        assert colours["zsre: reliability"] == colours["counterfact: reliability"] != colours["zsre: locality"]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["10", "100", "1,000"]
    finally:
        plt.close(fig)
