"""General capability before and after editing, through EleutherAI's lm-evaluation-harness.

The paper's second claim is that editing 10,000 facts leaves a model's general abilities intact.
The harness does the evaluating: prompts, few-shot sampling, answer extraction and rolling
log-likelihood are its own. This module only adds the glue:

* task configs shipped in ``lks/tasks/*.yaml`` (each mirrors a harness task, named in its header)
  pointed at the local files of the data directory, so nothing is fetched from the hub;
* the loaded model wrapped in the harness's ``HFLM``, run inside ``editor.applied(model)`` so that
  every request sees the edits, with the editor's routing counters per task;
* paired statistics on the per-item output (``log_samples=True``): the same items are scored
  unedited and edited, so accuracy changes get an exact McNemar test and perplexity changes a
  paired bootstrap over documents.

============  ============================  ===========================================
task          harness task mirrored         metric(s)
============  ============================  ===========================================
gsm8k         gsm8k (5-shot, train shots)   exact_match (flexible-extract), strict_match
sst2          sst2 (GLUE)                   acc
rte           rte (GLUE)                    acc
wikitext2     wikitext (rolling)            word_perplexity, byte_perplexity, bits_per_byte
mmlu          mmlu_<subject> (dev shots)    acc (micro), acc_macro, acc per subject
============  ============================  ===========================================

Importing the module has no side effects (the harness is imported when a task runs).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

TASKS: tuple[str, ...] = ("gsm8k", "sst2", "rte", "wikitext2", "mmlu")
TASK_DIR = Path(__file__).with_name("tasks")
HIGHER_IS_BETTER = ("acc", "acc_macro", "exact_match", "strict_match")
PERPLEXITY = ("word_perplexity", "byte_perplexity", "bits_per_byte")
COLUMNS = ["task", "metric", "value", "stderr", "ci_low", "ci_high", "n", "seconds", "routed", "rows_seen"]
Z95 = 1.959963984540054  # two-sided 95% normal quantile
GSM8K_FILTERS = {"flexible-extract": "exact_match", "strict-match": "strict_match"}  # harness filter -> our metric
_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


# ------------------------------------------------------------------------------ configs and subsets

def _root(data_dir: str | os.PathLike | None) -> Path:
    from lks.data import data_dir as resolve  # explicit > $LKS_DATA_DIR > ~/.cache/lks/data

    return Path(resolve(data_dir))


def split_wikitext_documents(text: str) -> list[str]:
    """Raw WikiText split into articles at top-level `` = Title = `` lines (joined: ``text`` again);
    the harness's ``wikitext_document_level`` rows. Blank lines before the first title join it."""
    docs: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _WIKI_TITLE.match(line.rstrip("\n")) or not docs:
            docs.append([])
        docs[-1].append(line)
    if len(docs) > 1 and not "".join(docs[0]).strip():
        docs[1] = docs[0] + docs[1]
        docs = docs[1:]
    return ["".join(d) for d in docs]


def _load_yaml(name: str, **fill: str) -> dict[str, Any]:
    text = (TASK_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    for key, value in fill.items():
        text = text.replace("{" + key + "}", value)
    return yaml.safe_load(text)


def _with_files(cfg: dict[str, Any], root: Path) -> dict[str, Any]:
    """The config with its ``data_files`` made absolute; a missing file is a one-line error."""
    files = {}
    for split, rel in cfg["dataset_kwargs"]["data_files"].items():
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        if not path.is_file():
            raise FileNotFoundError(f"task {cfg['task']}: data file {path} not found (pass --data-dir or set "
                                    "LKS_DATA_DIR to the benchmark data directory)")
        files[split] = str(path)
    return {**cfg, "dataset_kwargs": {**cfg["dataset_kwargs"], "data_files": files}}


def mmlu_subjects(root: Path) -> dict[str, int]:
    """``{subject: number of test questions}`` for the subjects present under ``mmlu/test``, sorted."""
    counts = {}
    for f in sorted((root / "mmlu" / "test").glob("*_test.csv")):
        with open(f, encoding="utf-8", newline="") as fh:
            counts[f.name[: -len("_test.csv")]] = sum(1 for _ in csv.reader(fh)) - 1  # minus the header
    if not counts:
        raise FileNotFoundError(f"task mmlu: no mmlu/test/*_test.csv under {root}")
    return counts


def task_configs(task: str, data_dir: str | os.PathLike | None = None, *, num_fewshot: int | None = None,
                 options: dict[str, Any] | None = None, workdir: str | os.PathLike | None = None) -> list[dict]:
    """The harness configs (dicts) of one of :data:`TASKS`, with data files from ``data_dir``.

    ``options``: gsm8k ``max_new_tokens`` / ``until`` (generation settings). ``wikitext2`` writes
    its articles as JSON Lines into ``workdir`` (a temporary folder of the caller's).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    root, opts = _root(data_dir), dict(options or {})
    if task == "mmlu":
        from datasets import Features, Value

        cfgs = [_load_yaml("mmlu", subject=s, subject_words=s.replace("_", " ")) for s in mmlu_subjects(root)]
        text = Features({c: Value("string") for c in ("question", "choice0", "choice1", "choice2", "choice3", "answer")})
        for c in cfgs:
            c["dataset_kwargs"]["features"] = text
    else:
        cfgs = [_load_yaml(task)]
    if task == "gsm8k":
        gen = cfgs[0]["generation_kwargs"]
        if "max_new_tokens" in opts:
            gen["max_gen_toks"] = int(opts.pop("max_new_tokens"))
        if "until" in opts:
            gen["until"] = list(opts.pop("until"))
    if task == "wikitext2":
        from lm_eval.tasks.wikitext import preprocess_wikitext as pw  # the harness's own functions

        raw = root / cfgs[0]["dataset_kwargs"]["data_files"]["test"]
        if not raw.is_file():
            raise FileNotFoundError(f"task wikitext2: data file {raw} not found")
        pages = Path(workdir or tempfile.mkdtemp()) / "wikitext2_test_pages.jsonl"
        pages.write_text("".join(json.dumps({"page": p}) + "\n" for p in
                                 split_wikitext_documents(raw.read_text(encoding="utf-8"))), encoding="utf-8")
        cfgs[0]["dataset_kwargs"]["data_files"]["test"] = str(pages)
        cfgs[0].update(doc_to_target=pw.wikitext_detokenizer, process_results=pw.process_results)
        for key in ("max_length", "stride"):  # handled by the model wrapper (windows of max_length)
            opts.pop(key, None)
    if opts:
        raise ValueError(f"task {task}: unknown task option(s) {sorted(opts)}")
    cfgs = [_with_files(c, root) for c in cfgs]
    if num_fewshot is not None:
        for c in cfgs:
            c["num_fewshot"] = int(num_fewshot)
    return cfgs


def subset_indices(n: int, limit: int | None, seed: int, task: str) -> np.ndarray:
    """Sorted seeded random sample of ``range(n)`` of size ``limit`` (all when ``None``), keyed by
    ``(seed, task)``: benchmark files are often ordered, so their head would be biased."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    return np.sort(rng.choice(n, size=limit, replace=False))


def _samples(task: str, cfgs: list[dict], limit: int | None, seed: int, root: Path) -> dict[str, list[int]] | None:
    """The harness's ``samples`` argument: which doc ids each config scores. wikitext2 keeps the
    first ``limit`` articles (perplexity of contiguous text); mmlu samples over all subjects."""
    if limit is None:
        return None
    if task == "wikitext2":
        return {cfgs[0]["task"]: list(range(limit))}
    if task == "mmlu":
        counts = mmlu_subjects(root)
        chosen, starts = subset_indices(sum(counts.values()), limit, seed, "mmlu"), np.cumsum([0, *counts.values()])
        return {f"mmlu_{s}": [int(i - starts[k]) for i in chosen if starts[k] <= i < starts[k + 1]]
                for k, s in enumerate(counts)}
    path = next(iter(cfgs[0]["dataset_kwargs"]["data_files"].values())) if task != "gsm8k" else \
        cfgs[0]["dataset_kwargs"]["data_files"]["test"]
    with open(path, encoding="utf-8") as f:
        n = sum(1 for line in f if line.strip()) - (task == "sst2")  # the TSV has a header line
    return {cfgs[0]["task"]: [int(i) for i in subset_indices(n, limit, seed, task)]}


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
    if n == 0:
        return {"value": math.nan, "stderr": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
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
            boot = [_ppl(ll[i], units[i], metric) for i in idx] if len(g) > 1 else [math.nan]
            lo, hi = np.percentile(boot, [2.5, 97.5])
            rows.append({"task": task, "metric": metric, "value": _ppl(ll, units, metric), "stderr": np.std(boot, ddof=1),
                         "ci_low": lo, "ci_high": hi, "n": len(g)})
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
    if not progress:
        import logging

        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    pick = lambda v, t: v.get(t) if isinstance(v, dict) else v  # noqa: E731
    rows, items = [], []
    scope = editor.applied(model) if editor is not None else contextlib.nullcontext(None)
    with tempfile.TemporaryDirectory() as work, scope as stats:
        for task in tasks:
            opts = dict((task_options or {}).get(task, {}))
            cfgs = task_configs(task, data_dir, num_fewshot=pick(num_fewshot, task), options=opts, workdir=work)
            seen0, routed0 = getattr(stats, "rows_seen", None), getattr(stats, "rows_routed", None)
            t0 = time.perf_counter()
            out = run_harness(model, tokenizer, cfgs, samples=_samples(task, cfgs, pick(limit, task), seed, _root(data_dir)),
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
