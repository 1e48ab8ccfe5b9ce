"""The grid's results as tables: the committed files read into frames (:func:`read_grid`,
:func:`read_capability`) and written as markdown (``python -m lks reproduce --table`` prints them,
``--write README.md docs/grid.md`` rewrites the generated blocks there: :func:`write_tables`).
Reading needs no model and no running grid; :mod:`lks.grid` makes the files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from lks.capability import HEADLINE, PERPLEXITY, p_label
from lks.grid import FORMAT, GridProfile, dataset_label, scoring
from lks.methods import method_label


def read_grid(results_dir: str | os.PathLike, model: str = "smollm2-135m") -> pd.DataFrame:
    """Every finished cell under ``results_dir/<model>`` as one row: data, method, n, n_edits (the
    edits fitted), n_evaluated, fit_seconds, peak_rss_mb, date, scoring (the evaluation settings it
    was scored with) and the summary's metrics (sorted by data, method, n)."""
    rows = []
    for path in sorted((Path(results_dir) / model).glob("*/*-*.json")):
        rec = json.loads(path.read_text())
        if rec.get("format") != FORMAT or "summary" not in rec:
            continue
        # the cell's own counts win: the summary's "n_edits" counts the edits it evaluated
        rows.append(rec["summary"] | {k: rec.get(k) for k in ("data", "method", "n", "n_edits", "n_evaluated",
                                                              "fit_seconds", "targets_cached", "eval_seconds", "peak_rss_mb",
                                                              "date", "scoring")})
    df = pd.DataFrame(rows)
    return df.sort_values(["data", "method", "n"], ignore_index=True) if len(df) else df


def read_capability(results_dir: str | os.PathLike, model: str = "smollm2-135m") -> pd.DataFrame:
    """Every capability comparison under ``results_dir/<model>``: one row per data set, method, task
    and metric with before, after, diff, its CI, the paired p-value and the routed prompts;
    ``earlier_fit``: the comparison ran with another fit than the one its cell's file scores (the
    saved editors' digests differ: the cell was fitted again and its capability step is to run)."""
    frames = []
    for path in sorted((Path(results_dir) / model).glob("*/capability-*.json")):
        rec = json.loads(path.read_text())
        if rec.get("format") != FORMAT:
            continue
        cell = path.with_name(f"{rec['method']}-{rec['n']}.json")
        fit = json.loads(cell.read_text()) if cell.is_file() else {}
        comp = pd.DataFrame(rec["comparison"]).assign(data=rec["data"], method=rec["method"], n=rec["n"],
                                                      earlier_fit=fit.get("editor") != rec.get("editor"))
        after = pd.DataFrame(rec["after"])[["task", "metric", "routed", "rows_seen"]]
        frames.append(comp.merge(after, on=["task", "metric"], how="left"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# the grid table's metric columns: (definition, split: whether training saw those prompts). Generality's
# split is read from the cells (``generality_split``): held-out with every method's registered settings.
GRID_METRICS: dict[str, tuple[str, str]] = {
    "reliability": ("top-1 accuracy of the new target's tokens after the edit prompt", "seen"),
    "generality": ("the same after a paraphrase (CounterFact: MEND rephrases; zsRE: its one paraphrase)", "held-out"),
    "locality": ("top-1 agreement with the unedited model on same-subject prompts", "held-out"),
    "specificity": ("the same on other subjects' neighbourhood prompts (CounterFact only)", "held-out"),
    "efficacy": ("ROME's P(new) > P(old) after the edit prompt", "seen"),
    "neighborhood_score": ("ROME's P(true) > P(new) on neighbourhood prompts (CounterFact only)", "held-out"),
    "gen_reliability": ("new object among the first words of a greedy continuation of the edit prompt", "seen"),
    "fluency": ("ROME's 1/3 H2 + 2/3 H3 word n-gram entropy (bits) of greedy continuations", "seen + held-out"),
    "repeat_rate": ("new object named twice or more in a greedy continuation", "seen + held-out"),
}


def grid_table(table: pd.DataFrame, metrics: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(cells, legend)``: ``table`` (:func:`read_grid`) as data, method, N, evaluated edits and
    ``metrics`` (names of ``GRID_METRICS``; ``<name>_base`` for the unedited model), each column
    named ``"<metric> [<split>]"``; the legend gives every such column its definition."""
    cols, legend = {"data": "data", "method": "method", "n": "N", "n_evaluated": "evaluated"}, []
    for m in metrics:
        name = m.removesuffix("_base")
        definition, split = GRID_METRICS[name]
        if name == "generality" and "generality_split" in table:
            split = " / ".join(sorted(set(table.generality_split.dropna()))) or split
        label = f"{name}{' unedited' if m != name else ''} [{split}]"
        cols[m] = label
        legend.append((label, definition + (", unedited model" if m != name else "")))
    cells = table.reindex(columns=list(cols)).rename(columns=cols)
    return cells, pd.DataFrame(legend, columns=["column", "definition"])


# the README's columns, in order (definitions and splits: GRID_METRICS)
TABLE_METRICS = ["reliability", "generality", "locality", "specificity", "efficacy", "neighborhood_score",
                 "gen_reliability", "repeat_rate", "fluency"]


def markdown_table(table: pd.DataFrame, profile: GridProfile, dataset: str) -> str:
    """One data set's cells of ``profile`` as a markdown table (rows: method x N, in the profile's
    order; columns :data:`TABLE_METRICS` labelled with their split, fluency with the unedited
    model's in brackets, and the fit seconds, starred where MEMIT/AlphaEdit targets came from the
    cache); a cell not computed yet reads "not run yet", a
    metric the data set lacks "n/a". :func:`markdown_legend` defines the columns."""
    label = dataset_label(dataset)
    have = table[table.data == label].set_index(["method", "n"]) if len(table) else pd.DataFrame()
    metrics = [m for m in TABLE_METRICS if m != "specificity" or (len(have) and have["specificity"].notna().any())]
    heads = [f"{m} [{GRID_METRICS[m][1]}]" for m in metrics] + ["evaluated / fitted", "run", "fit s"]
    lines = ["| method | edits | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for method in profile.methods:
        for n in sorted(profile.sizes):
            if (method, n) not in have.index:
                lines.append(f"| {method} | {n:,} | " + " | ".join(["not run yet"] + [""] * (len(heads) - 1)) + " |")
                continue
            row = have.loc[(method, n)]
            cells = [_fmt(row.get(m), 2 if m == "fluency" else 3) for m in metrics]
            if "fluency" in metrics and cells[metrics.index("fluency")] != "n/a":
                cells[metrics.index("fluency")] += f" ({_fmt(row.get('fluency_base'), 2)})"
            cached = row.get("targets_cached")
            fit = _fmt(row.get("fit_seconds"), 0) + ("*" if cached is not None and not pd.isna(cached) and cached > 0 else "")
            run = str(row.get("date") or "")[:10] + (" †" if scored_otherwise(row, profile) else "")
            lines.append(f"| {method} | {n:,} | " + " | ".join(cells + [f"{_fmt(row.get('n_evaluated'), 0)} / "
                                                                     f"{_fmt(row.get('n_edits'), 0)}", run, fit]) + " |")
    return "\n".join(lines)


def markdown_legend() -> str:
    """The definitions of :func:`markdown_table`'s columns, one bullet each."""
    return "\n".join([f"- **{m}** [{GRID_METRICS[m][1]}]: {GRID_METRICS[m][0]}" for m in TABLE_METRICS]
                     + ["- **fit s**: seconds to fit the editor; * = some or all of the MEMIT/AlphaEdit target vectors "
                        "came from an earlier fit's cache (AlphaEdit shares MEMIT's), whose optimisation these seconds leave out",
                        "- **evaluated / fitted**: the edits scored teacher-forced, of the edits fitted (conflicts dropped)",
                        "- **run**: the date of the cell's run; † = scored otherwise than the profile scores now (an earlier "
                        "run; `python -m lks reproduce` runs it again)"])


DATASET_LABELS = {"zsre": "zsRE", "counterfact": "CounterFact"}


def scored_otherwise(row: pd.Series, profile: GridProfile) -> bool:
    """Whether a cell of :func:`read_grid` was scored with other evaluation settings than ``profile``'s
    (an earlier run, which the grid runs again)."""
    return row.get("scoring") != scoring(profile)


def summary_table(table: pd.DataFrame, profile: GridProfile) -> str:
    """One markdown table of every data set x N (rows) and method (columns), each cell "same-subject
    locality [held-out] / reliability [seen]" (README's summary), marked † where scored otherwise
    than ``profile`` scores now (:func:`scored_otherwise`); "not run yet" where not computed."""
    have = table.set_index(["data", "method", "n"]) if len(table) else pd.DataFrame()
    lines = ["| data | edits | " + " | ".join(method_label(m) for m in profile.methods) + " |",
             "|---|---|" + "---|" * len(profile.methods)]
    for dataset in profile.datasets:
        label = dataset_label(dataset)
        for n in sorted(profile.sizes):
            cells = [f"{have.loc[(label, m, n), 'locality']:.2f} / {have.loc[(label, m, n), 'reliability']:.2f}"
                     + (" †" if scored_otherwise(have.loc[(label, m, n)], profile) else "")
                     if (label, m, n) in have.index else "not run yet" for m in profile.methods]
            lines.append(f"| {DATASET_LABELS.get(label, label)} | {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TASK_LABELS = {"sst2": "SST-2", "rte": "RTE", "mmlu": "MMLU", "gsm8k": "GSM8K", "wikitext2": "WikiText-2"}


def capability_markdown(comparison: pd.DataFrame, profile: GridProfile) -> str:
    """The capability comparisons (:func:`read_capability`) at ``profile.capability_n`` edits as one
    markdown table: a row for the unedited model (the one run every comparison pairs with), then a
    row per data set x method (the profile's order) with each task's headline metric
    (:data:`lks.capability.HEADLINE`) as "after (difference, paired p)" and the rows routed to an
    edit out of the rows the editor saw, all tasks; "not run yet" where no file exists, "(earlier fit)"
    beside the method where the comparison is of another fit than its cell's file scores."""
    tasks = [t for t in profile.capability_tasks if t in HEADLINE]
    c = comparison.reindex(columns=["data", "method", "n", "task", "metric", "before", "after", "diff", "p_value",
                                    "n_pairs", "routed", "rows_seen", "earlier_fit"])  # (no columns when no file exists)
    have = c[(c.n == profile.capability_n) & (c.metric == c.task.map(HEADLINE))]
    digits = {t: 2 if HEADLINE[t] in PERPLEXITY else 3 for t in tasks}
    items = {t: have[have.task == t].n_pairs.max() for t in tasks}
    heads = [f"{TASK_LABELS.get(t, t)} {HEADLINE[t].replace('_', ' ')}"
             + ("" if pd.isna(items[t]) else f" ({items[t]:,.0f} {'articles' if HEADLINE[t] in PERPLEXITY else 'items'})")
             for t in tasks]
    lines = ["| data | method | " + " | ".join(heads) + " | routed / seen rows |",
             "|---|---|" + "---|" * (len(tasks) + 1)]
    first = {t: have[have.task == t].iloc[0] for t in tasks if (have.task == t).any()}
    lines.append("| - | unedited | " + " | ".join(_fmt(first[t].before, digits[t]) if t in first else "not run yet"
                                                   for t in tasks) + " | - |")
    for dataset in profile.datasets:
        label = dataset_label(dataset)
        for method in profile.methods:
            mine = have[(have.data == label) & (have.method == method)].set_index("task")
            earlier = " (earlier fit)" if mine.earlier_fit.eq(True).any() else ""  # NaN: no capability file
            name = f"| {DATASET_LABELS.get(label, label)} | {method_label(method)}{earlier} | "
            if mine.empty:
                lines.append(name + " | ".join(["not run yet"] + [""] * len(tasks)) + " |")
                continue
            cells = [f"{_fmt(mine.loc[t, 'after'], digits[t])} ({mine.loc[t, 'diff']:+,.{digits[t]}f}, "
                     f"{p_label(mine.loc[t, 'p_value'])})" if t in mine.index else "not run yet" for t in tasks]
            routed = f"{mine.routed.sum():,.0f} / {mine.rows_seen.sum():,.0f}"
            lines.append(name + " | ".join(cells + [routed]) + " |")
    return "\n".join(lines)


def capability_legend(profile: GridProfile) -> str:
    """What :func:`capability_markdown`'s cells mean."""
    return (f"At {profile.capability_n:,} edits, on the same items before and after (the unedited row: "
            "the one unedited run every comparison pairs with). Each cell: the edited model's value "
            "(difference to unedited, paired p-value: exact McNemar for accuracies, paired bootstrap over "
            "articles for perplexity, lower is better; 2,000 resamples, so its smallest p is 0.001). **routed / seen rows**: sequences the scope "
            "indicator sent to an edit, out of those the editor saw, all tasks (a weight editor's change "
            "acts on every row, so it counts them all). **(earlier fit)**: a comparison run with another fit "
            "than the one its cell now scores (the cell was fitted again; its capability step is still to run).")


def tables_markdown(table: pd.DataFrame, profile: GridProfile) -> str:
    """Every data set's :func:`markdown_table` under its bold name, then :func:`markdown_legend`."""
    parts = [f"**{DATASET_LABELS.get(dataset_label(d), dataset_label(d))}**\n\n{markdown_table(table, profile, d)}"
             for d in profile.datasets]
    return "\n\n".join([*parts, markdown_legend()])


def write_tables(path: str | os.PathLike, table: pd.DataFrame, profile: GridProfile, capability: pd.DataFrame) -> None:
    """Rewrite the generated blocks of a markdown file: the lines between ``<!-- grid-table ... -->``
    and ``<!-- /grid-table -->`` get :func:`tables_markdown`, those of ``grid-summary``
    :func:`summary_table`, those of ``grid-capability`` :func:`capability_markdown` of
    ``capability`` (:func:`read_capability`) and its legend; a file with none of them is refused."""
    path = Path(path)
    text = path.read_text()
    blocks = {"grid-table": tables_markdown(table, profile), "grid-summary": summary_table(table, profile),
              "grid-capability": capability_markdown(capability, profile) + "\n\n" + capability_legend(profile)}
    found = 0
    for tag, body in blocks.items():
        pattern = re.compile(rf"(<!-- {tag}\b[^\n]*-->\n)(.*?)(<!-- /{tag} -->)", re.S)
        text, k = pattern.subn(lambda m, body=body: m.group(1) + body + "\n" + m.group(3), text)
        found += k
    if not found:
        raise ValueError(f"{path}: no <!-- grid-table -->, <!-- grid-summary --> or <!-- grid-capability --> block to rewrite")
    path.write_text(text)


def _fmt(v: Any, digits: int) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{v:,.{digits}f}"


def update_diagnostics(table: pd.DataFrame) -> pd.DataFrame:
    """The weight editors' update diagnostics of a grid table (:func:`read_grid`) in long form, one row
    per cell and edited layer: data, method, n, layer, delta_rel, edits_per_dim, target_realised (for
    :func:`lks.plotting.plot_update_mechanism`)."""
    cols = [c for c in table.columns if re.fullmatch(r"delta_rel_L\d+", c)]
    if not cols:
        return pd.DataFrame(columns=["data", "method", "n", "layer", "delta_rel", "edits_per_dim", "target_realised"])
    keep = [c for c in ("data", "method", "n", "edits_per_dim", "target_realised") if c in table]
    long = table[keep + cols].melt(id_vars=keep, var_name="layer", value_name="delta_rel").dropna(subset=["delta_rel"])
    long["layer"] = long.layer.str.removeprefix("delta_rel_L").astype(int)
    if "target_realised" not in long:
        long["target_realised"] = float("nan")
    return long.sort_values(["data", "method", "n", "layer"], ignore_index=True)


def publish(results_dir: str | os.PathLike, profile: GridProfile, write: list[str] | None = None, show: bool = False) -> None:
    """``python -m lks reproduce --write FILE.. / --table``: rewrite the grid's blocks of each markdown
    file in ``write`` from the finished files; with ``show``, print them as markdown."""
    table, capability = read_grid(results_dir, profile.model), read_capability(results_dir, profile.model)
    for path in write or []:
        write_tables(path, table, profile, capability)
    if show:
        print(tables_markdown(table, profile))
        print(f"\n**General capability**\n\n{capability_markdown(capability, profile)}\n\n{capability_legend(profile)}")
