"""General capability before and after editing, through EleutherAI's lm-evaluation-harness.

The harness evaluates (prompts, few-shot sampling, answer extraction, rolling log-likelihood);
this module is the glue: task configs in ``lks/tasks/*.yaml`` (each names the harness task it
mirrors) pointed at the data directory's files; the loaded model wrapped in ``HFLM`` and run
inside ``editor.applied(model)`` so every request sees the edits, with the editor's routing
counters per task; and paired statistics on the per-item output (the same items scored unedited
and edited): an exact McNemar test for accuracies, a paired bootstrap over documents for
perplexities. Tasks: gsm8k (exact_match = flexible-extract, strict_match), sst2 and rte (acc),
wikitext2 (word_perplexity, byte_perplexity, bits_per_byte), mmlu (acc, acc_macro, per subject).
Importing the module has no side effects (the harness is imported when a task runs).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from lks.tasks import TASKS, data_root, item_samples, task_configs

HIGHER_IS_BETTER = ("acc", "acc_macro", "exact_match", "strict_match")
PERPLEXITY = ("word_perplexity", "byte_perplexity", "bits_per_byte")
COLUMNS = ["task", "metric", "value", "stderr", "ci_low", "ci_high", "n", "seconds", "routed", "rows_seen"]
Z95 = 1.959963984540054  # two-sided 95% normal quantile
GSM8K_FILTERS = {"flexible-extract": "exact_match", "strict-match": "strict_match"}  # harness filter -> our metric
# each task's headline metric: the one the grid's table and figure show (perplexity: lower is better)
HEADLINE = {"sst2": "acc", "rte": "acc", "mmlu": "acc", "gsm8k": "exact_match", "wikitext2": "word_perplexity"}


# ------------------------------------------------------------------------------ running the harness

def run_harness(model: Any, tokenizer: Any, cfgs: list[dict], *, samples: dict[str, list[int]] | None = None,
                batch_size: int = 8, seed: int = 0, max_length: int | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on the loaded ``model`` with config dicts, per-sample output kept."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if samples is not None:
        cfgs = [c for c in cfgs if samples.get(c["task"], None) != []]
        samples = {k: v for k, v in samples.items() if v}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    return simple_evaluate(lm, tasks=cfgs, samples=samples, log_samples=True, bootstrap_iters=0,
                           task_manager=TaskManager(include_defaults=False), random_seed=seed,
                           numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def per_item(out: dict[str, Any], task: str) -> pd.DataFrame:
    """Per-item scores of one of our tasks from the harness output: ``task, doc_id, metric, value``
    and, for perplexities, ``units`` (words or bytes; ``value`` is then the log-likelihood)."""
    rows = []
    for name, samples in out["samples"].items():
        for s in samples:
            if task == "gsm8k":
                rows.append((name, s["doc_id"], GSM8K_FILTERS[s["filter"]], float(s["exact_match"]), math.nan))
            elif task == "wikitext2":
                rows += [(name, s["doc_id"], m, *map(float, s[m])) for m in PERPLEXITY]
            else:
                rows.append((name, s["doc_id"], "acc", float(s["acc"]), math.nan))
    return pd.DataFrame(rows, columns=["task", "doc_id", "metric", "value", "units"]).sort_values(
        ["task", "metric", "doc_id"], ignore_index=True)


def _ppl(ll: np.ndarray, units: np.ndarray, metric: str) -> float:
    nll = -ll.sum() / units.sum()
    return float(nll / math.log(2) if metric == "bits_per_byte" else math.exp(nll))


def accuracy_stats(correct: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Mean, the harness's standard error ``sqrt(p(1-p)/(n-1))`` and a Wilson 95% interval."""
    x, n = np.asarray(correct, dtype=float), len(correct)
    p, d = float(x.mean()), 1 + Z95**2 / n
    centre, half = (p + Z95**2 / (2 * n)) / d, Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / d
    return {"value": p, "stderr": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan,
            "ci_low": min(p, max(0.0, centre - half)), "ci_high": max(p, min(1.0, centre + half)), "n": n}


def _summary(task: str, items: pd.DataFrame, seed: int) -> list[dict[str, Any]]:
    """Tidy metric rows: accuracies with Wilson intervals, perplexities with a document bootstrap."""
    rows = []
    for metric, g in items.groupby("metric", sort=False):
        if metric in PERPLEXITY:
            ll, units = g["value"].to_numpy(), g["units"].to_numpy()
            idx = np.random.default_rng([seed, 2]).integers(0, len(g), size=(1000, len(g)))
            boot = [_ppl(ll[i], units[i], metric) for i in idx] if len(g) > 1 else [math.nan] * 2
            rows.append({"task": task, "metric": metric, "value": _ppl(ll, units, metric), "stderr": np.std(boot, ddof=1),
                         "ci_low": np.percentile(boot, 2.5), "ci_high": np.percentile(boot, 97.5), "n": len(g)})
        else:
            rows.append({"task": task, "metric": metric, **accuracy_stats(g["value"])})
    if task == "mmlu":
        by_subject = {s: g["value"] for s, g in items.groupby("task")}
        rows.append({"task": "mmlu", "metric": "acc_macro", "value": float(np.mean([v.mean() for v in by_subject.values()])),
                     "stderr": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": len(by_subject)})
        rows += [{"task": s, "metric": "acc", **accuracy_stats(v)} for s, v in by_subject.items()]
    return rows


def evaluate_capability(model: Any, tokenizer: Any, tasks: Sequence[str] = TASKS, *,
                        data_dir: str | os.PathLike | None = None, limit: int | dict[str, int] | None = None,
                        seed: int = 0, batch_size: int = 8, num_fewshot: dict[str, int] | None = None,
                        editor: Any = None, progress: bool = True,
                        task_options: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """Run :data:`TASKS` through the harness on a loaded (and, with ``editor``, edited) model.

    ``limit``: items per task (int or ``{task: n}``), a seeded random sample (wikitext2: the first n
    articles; mmlu: n questions over all subjects). ``num_fewshot``: ``{task: k}`` overriding the
    configs. ``editor``: anything with an ``applied(model)`` context yielding ``rows_seen`` /
    ``rows_routed`` counters; every task runs inside it. ``task_options``: gsm8k
    ``max_new_tokens``, ``until``; wikitext2 ``max_length`` (window length in tokens).

    Returns the tidy table (:data:`COLUMNS`, one row per task and metric; ``routed``/``rows_seen``
    are the editor's counter increases, ``<NA>`` without one); its ``attrs["items"]`` holds the
    per-item scores (:func:`per_item`) that :func:`compare_capability` pairs.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    quiet = contextlib.nullcontext()
    if not progress:  # the harness's progress bars (on sys.stderr) and its expected warnings
        import io  # ("Passed an already-initialized model through `pretrained`", ...) stay out
        import logging

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        quiet = contextlib.redirect_stderr(io.StringIO())
    pick = lambda v, t: v.get(t) if isinstance(v, dict) else v  # noqa: E731
    rows, items = [], []
    scope = editor.applied(model) if editor is not None else contextlib.nullcontext(None)
    with tempfile.TemporaryDirectory() as work, scope as stats, quiet:
        for task in tasks:
            opts = dict((task_options or {}).get(task, {}))
            cfgs = task_configs(task, data_dir, num_fewshot=pick(num_fewshot, task), options=opts, workdir=work)
            seen0, routed0 = (0, 0) if stats is None else (stats.rows_seen, stats.rows_routed)
            t0 = time.perf_counter()
            out = run_harness(model, tokenizer, cfgs, samples=item_samples(task, cfgs, pick(limit, task), seed, data_root(data_dir)),
                              batch_size=batch_size, seed=seed, max_length=opts.get("max_length"))
            stamp = {"seconds": time.perf_counter() - t0,
                     "rows_seen": None if stats is None else stats.rows_seen - seen0,
                     "routed": None if stats is None else stats.rows_routed - routed0}
            it = per_item(out, task)
            items.append(it)
            rows += [{**r, **(stamp if r["task"] == task else {})} for r in _summary(task, it, seed)]
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    for col in ("n", "routed", "rows_seen"):
        df[col] = df[col].astype("Int64")
    df.attrs["items"] = pd.concat(items, ignore_index=True)
    return df


# ------------------------------------------------------------------------------ paired comparison

def mcnemar_exact(before: Sequence[float], after: Sequence[float]) -> tuple[int, int, float]:
    """Exact McNemar test of paired 0/1 outcomes: ``(b, c, p)`` with b = right only before,
    c = right only after, p = two-sided binomial p-value of b out of b + c at 1/2 (1 when b + c = 0)."""
    from scipy.stats import binom

    x, y = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    p = 1.0 if b + c == 0 else min(1.0, 2 * float(binom.cdf(min(b, c), b + c, 0.5)))
    return b, c, p


def paired_bootstrap(stat: Callable[[np.ndarray], float], n: int, seed: int = 0,
                     n_boot: int = 2000) -> tuple[float, float, float]:
    """Percentile 95% CI and two-sided p-value of ``stat(indices)`` (a difference after - before on
    the items ``indices``) when the n items are resampled together: ``(ci_low, ci_high, p)``, with
    p = 2 min(P(d <= 0), P(d >= 0)) over the resamples, capped at 1."""
    rng = np.random.default_rng([seed, 3])
    d = np.array([stat(rng.integers(0, n, size=n)) for _ in range(n_boot)])
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(lo), float(hi), float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))


def _paired_row(task: str, metric: str, vb: np.ndarray, va: np.ndarray, units: np.ndarray, seed: int) -> dict:
    row: dict[str, Any] = {"task": task, "metric": metric, "n_pairs": len(vb)}
    if metric in PERPLEXITY:
        row["before"], row["after"] = _ppl(vb, units, metric), _ppl(va, units, metric)
        lo, hi, p = paired_bootstrap(lambda i: _ppl(va[i], units[i], metric) - _ppl(vb[i], units[i], metric),
                                     len(vb), seed)
        return {**row, "diff_ci_low": lo, "diff_ci_high": hi, "p_value": p, "test": "paired bootstrap"}
    lo, hi, _ = paired_bootstrap(lambda i: va[i].mean() - vb[i].mean(), len(vb), seed)
    b, c, p = mcnemar_exact(vb, va)
    return {**row, "before": vb.mean(), "after": va.mean(), "diff_ci_low": lo, "diff_ci_high": hi, "p_value": p,
            "test": "exact McNemar", "only_before": b, "only_after": c}


def p_label(p: float) -> str:
    """A paired p-value for tables and figures: below 0.001, the paired bootstrap's resolution
    (2,000 resamples; 0 when none crossed zero), it reads "p < 0.001"."""
    if p is None or p != p:
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p {p:.3f}" if p < 0.01 else f"p {p:.2f}"


def compare_capability(before: pd.DataFrame, after: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """``after - before`` per (task, metric) on the SAME items, paired by document id.

    Accuracies: paired-bootstrap 95% CI of the difference and an exact McNemar test
    (:func:`mcnemar_exact`; ``only_before``/``only_after`` = items right in one run only).
    Perplexities: paired bootstrap over documents (:func:`paired_bootstrap`). MMLU: ``acc`` pools
    the subjects' items, ``acc_macro`` (mean of subject accuracies) gets the difference only.
    ``note``: "no significant change" at p >= 0.05, else better/worse in the metric's direction.
    """
    pairs = before.attrs["items"].merge(after.attrs["items"], on=["task", "metric", "doc_id"], suffixes=("_b", "_a"))
    mmlu = pairs.task.str.startswith("mmlu_")
    groups = [("mmlu", "acc", pairs[mmlu])] if mmlu.any() else []
    groups += [(t, m, g) for (t, m), g in pairs.groupby(["task", "metric"], sort=False)]
    rows = [_paired_row(t, m, g.value_b.to_numpy(), g.value_a.to_numpy(), g.units_b.to_numpy(), seed)
            for t, m, g in groups]
    if mmlu.any():
        subj = pairs[mmlu].groupby("task")[["value_b", "value_a"]].mean()
        rows.insert(1, {"task": "mmlu", "metric": "acc_macro", "n_pairs": len(subj),
                        "before": subj.value_b.mean(), "after": subj.value_a.mean()})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["diff"] = df["after"] - df["before"]
    df["rel_diff"] = df["diff"] / df["before"].abs().replace(0, np.nan)
    higher = df["metric"].isin(HIGHER_IS_BETTER)
    df["note"] = np.where(df["p_value"].isna(), np.where(df["diff"] == 0, "identical", "no test"),
                          np.where(df["p_value"] >= 0.05, "no significant change (p >= 0.05)",
                                   np.where((df["diff"] > 0) == higher, "better (p < 0.05)", "worse (p < 0.05)")))
    cols = ["task", "metric", "before", "after", "diff", "rel_diff", "diff_ci_low", "diff_ci_high", "p_value", "test",
            "n_pairs", "only_before", "only_after", "note"]
    return df.reindex(columns=cols)
