"""The capability tasks' harness configs: ``lks/tasks/<task>.yaml`` (each mirrors the
lm-evaluation-harness task named in its header) filled in with the data directory's files, and the
seeded item subsets handed to the harness as its ``samples`` argument. No side effects on import."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import yaml

TASKS: tuple[str, ...] = ("gsm8k", "sst2", "rte", "wikitext2", "mmlu")
TASK_DIR = Path(__file__).parent
_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def data_root(data_dir: str | os.PathLike | None) -> Path:
    """The benchmark data directory (``lks.datadir.data_dir``)."""
    from lks.datadir import data_dir as resolve  # explicit > $LKS_DATA_DIR > ~/.cache/lks/data

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


def mmlu_subjects(root: Path) -> dict[str, int]:
    """``{subject: number of test questions}`` for the subjects present under ``mmlu/test``, sorted."""
    counts = {f.name[: -len("_test.csv")]: len(list(csv.reader(io.StringIO(f.read_text(encoding="utf-8"))))) - 1
              for f in sorted((root / "mmlu" / "test").glob("*_test.csv"))}  # rows minus the header
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
    root, opts = data_root(data_dir), dict(options or {})
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

        raw, pages = root / "wikitext2/wiki.test.raw", Path(workdir or tempfile.mkdtemp()) / "wikitext2_pages.jsonl"
        if raw.is_file():  # else the check below names the missing file
            pages.write_text("".join(json.dumps({"page": p}) + "\n" for p in
                                     split_wikitext_documents(raw.read_text(encoding="utf-8"))), encoding="utf-8")
            cfgs[0]["dataset_kwargs"]["data_files"]["test"] = str(pages)
        cfgs[0].update(doc_to_target=pw.wikitext_detokenizer, process_results=pw.process_results)
        # the harness scores disjoint windows of the model's max_length (evaluate_capability passes it on)
        if opts.pop("stride", opts.get("max_length")) != opts.pop("max_length", None):
            raise ValueError("task wikitext2: the harness scores disjoint windows; stride must equal max_length")
    if opts:
        raise ValueError(f"task {task}: unknown task option(s) {sorted(opts)}")
    for c in cfgs:  # data files relative to the data directory; a missing one is a one-line error
        files = c["dataset_kwargs"]["data_files"] = {k: str(root / v) for k, v in c["dataset_kwargs"]["data_files"].items()}
        for path in files.values():
            if not Path(path).is_file():
                raise FileNotFoundError(f"task {c['task']}: data file {path} not found (pass --data-dir or set "
                                        "LKS_DATA_DIR to the benchmark data directory)")
        if num_fewshot is not None:
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


def item_samples(task: str, cfgs: list[dict], limit: int | None, seed: int, root: Path) -> dict[str, list[int]] | None:
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


