"""The paper's headline grid: editing methods x numbers of simultaneous edits x data sets.

    python -m lks reproduce --profile cpu-full-smollm2      # resumable: a finished cell is skipped

A profile (``params/<name>/reproduce.json``, or any JSON file) names the model, methods, sizes and
data sets (:class:`GridProfile`). Each **cell** fits one method on the first N records of a data
set (a later record with the same subject and prompt as an earlier one but another target is
dropped: :meth:`lks.data.EditSet.drop_conflicts`), evaluates the first ``min(N, eval_n)`` of
those edits with :func:`lks.metrics.evaluate_edits` (every edit in the registered profile), and
writes ``results/<model>/<dataset>/<method>-<N>.json``: the summary (teacher-forced metrics on the
evaluated edits, generation-based ones on a uniform sample of ``fluency_n`` of them drawn with the
profile's seed, or on all of them when there are no more), which edits each family scored
(``scored``), fit and evaluation seconds, the cell's peak resident memory, the configs, the git
commit, the machine. A file scored otherwise than the profile asks (an older run) is pending again;
its saved editor is reused.

Fitted editors are saved under ``editors_dir`` (not committed), so an interrupted evaluation and
the capability runs reuse them. An interrupted fit resumes: LKS from its last finished epoch with
its stored training set (:mod:`lks.training.stored`), FT-L from its last step, MEMIT and AlphaEdit
from their last cached chunk of target vectors; a capability run from its first unfinished task
(a finished task counts only with the same saved editor: a refitted one runs every task again).
A capability file counts only with the fit its cell's file records (``"editor"``) and the
profile's capability settings; a cell fitted again runs its capability step again.

**Capability** at ``capability_n`` edits: after that cell, the editor runs the general-capability
tasks (:func:`lks.capability.evaluate_capability`) on the same items as the unedited model, which
runs once per profile (``results/<model>/capability-unedited.json``, per-item scores kept for the
pairing); the paired comparison goes to ``results/<model>/<dataset>/capability-<method>-<N>.json``.

**Steps** (:class:`Step`, :meth:`Grid.plan`): a cell's fit and evaluation, work some methods'
fits share (MEMIT's key statistics), the unedited capability run and a cell's capability
comparison, each with the steps it waits for (MEMIT's and AlphaEdit's cells after the key
statistics; AlphaEdit's cell after MEMIT's, whose target vectors it reads; a capability step after
its cell's fit and the unedited run). :meth:`Grid.run` runs them in order in this process; :mod:`lks.cluster` runs them as Ray
tasks. Each step logs its progress (epochs, prepared parts, target chunks, with ETAs) to its own
file beside the editor, ``<editors>/<model>/<dataset>/<method>-<N>.log``, and the run prints a
line per step started and finished, with an ETA for the rest.

:mod:`lks.report` reads these files back and writes them as tables.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lks.capability import compare_capability, evaluate_capability
from lks.config import from_dict
from lks.formats import load_edits
from lks.methods import editor_class, load_editor, method_names
from lks.metrics import UneditedMemo, evaluate_edits
from lks.progress import Pace, step_log
from lks.utils import code_version, peak_rss, provenance, sha256_file, sha256_text, write_json

FORMAT = "lks-grid-1"  # a results file without it (an older run) is recomputed
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class GridProfile:
    """What ``python -m lks reproduce`` runs. ``overrides`` changes a method's registered settings
    (``{"lks": {"epochs": 2}, "memit": {"layers": [0, 1]}}``): empty in every shipped profile (the
    registered recipe), it exists for tests on tiny models."""

    model: str = "smollm2-135m"
    datasets: tuple[str, ...] = ("zsre", "counterfact")
    methods: tuple[str, ...] = ("lks", "ft", "memit", "alphaedit")
    sizes: tuple[int, ...] = (10, 100, 1000, 10000)
    eval_n: int = 10000         # edits evaluated per cell: the first min(N, eval_n)
    fluency_n: int = 300        # of those, edits continued freely for the generation-based metrics
                                # (a uniform sample drawn with ``seed``; all of them if there are no more)
    fluency_tokens: int = 30
    capability_n: int = 10000   # the size whose editors run the capability tasks (0: none)
    capability_tasks: tuple[str, ...] = ("sst2", "rte", "mmlu", "wikitext2", "gsm8k")
    capability_limit: dict[str, int] = field(default_factory=dict)     # task -> items (wikitext2: articles)
    capability_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 8         # capability: sequences per forward pass
    seed: int = 0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpus_per_step: int = 1      # --executor ray: CPUs (and torch threads) each step's task asks for
    gpus_per_step: float = 1.0  # --executor ray on CUDA: GPUs per step
    memory_gib_per_step: float = 0.0  # --executor ray: memory a step reserves (0: none; Ray does not limit it)

    def __post_init__(self) -> None:
        for name in ("datasets", "methods", "sizes", "capability_tasks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [m for m in self.methods if m not in method_names()]
        if bad:
            raise ValueError(f"methods: unknown {bad}; choose from {method_names()}")
        if not self.sizes or any(not isinstance(n, int) or n < 1 for n in self.sizes):
            raise ValueError(f"sizes: need positive integers, got {list(self.sizes)}")
        if self.eval_n < 1 or self.fluency_n < 0 or self.fluency_tokens < 1:
            raise ValueError("need eval_n >= 1, fluency_n >= 0, fluency_tokens >= 1")
        if self.cpus_per_step < 1 or self.gpus_per_step < 0 or self.memory_gib_per_step < 0:
            raise ValueError("need cpus_per_step >= 1, gpus_per_step >= 0, memory_gib_per_step >= 0")
        if self.capability_n and self.capability_n not in self.sizes:
            raise ValueError(f"capability_n {self.capability_n} is not one of sizes {list(self.sizes)} (0: no capability)")


def load_profile(name_or_path: str) -> GridProfile:
    """``params/<name>/reproduce.json`` of the checkout, or a JSON file's path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = REPO / "params" / name_or_path / "reproduce.json"
    if not path.is_file():
        raise FileNotFoundError(f"grid profile {name_or_path!r}: neither a JSON file nor params/{name_or_path}/reproduce.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"grid profile {path}: not valid JSON ({e})") from None
    data.pop("//", None)  # a comment
    return from_dict(GridProfile, data, str(path))


@dataclass(frozen=True)
class Cell:
    dataset: str
    method: str
    n: int

    @property
    def name(self) -> str:
        return f"{dataset_label(self.dataset)}/{self.method}-{self.n}"


def model_label(model: str) -> str:
    """The folder name of a profile's model: a local directory's own name, else the name as given."""
    return Path(model).name if Path(model).expanduser().is_dir() else model


@dataclass(frozen=True)
class Step:
    """One unit of a grid's work: ``kind`` "edit" (fit, evaluate, write the cell's file),
    "shared" (work the fits of some methods share, e.g. MEMIT's key statistics, named by
    ``shared``), "unedited" (the unedited model's capability run) or "capability" (the cell's
    editor on the capability tasks, paired with the unedited run); ``after``: the names of the
    steps it waits for."""

    kind: str
    cell: Cell | None = None
    after: tuple[str, ...] = ()
    shared: str = ""                  # "shared": the work's name ...
    methods: tuple[str, ...] = ()     # ... and the methods of the planned cells that need it

    @property
    def name(self) -> str:
        if self.cell is None:
            return self.shared if self.kind == "shared" else "capability unedited"
        return f"{self.kind} {self.cell.name}"


def cells(profile: GridProfile) -> list[Cell]:
    """The grid in run order: small sizes first, so every size is complete before a larger one starts."""
    return [Cell(d, m, n) for n in sorted(profile.sizes) for d in profile.datasets for m in profile.methods]


def dataset_label(dataset: str) -> str:
    """The folder name of a data set: its registered name, or a JSON file's stem."""
    return Path(dataset).stem if dataset.endswith(".json") else dataset


def scoring(profile: GridProfile) -> dict[str, Any]:
    """A profile's evaluation settings, as each cell's file records them (``"scoring"``): a file scored
    otherwise is redone."""
    return {"eval_n": profile.eval_n, "fluency_n": profile.fluency_n, "fluency_tokens": profile.fluency_tokens,
            "seed": profile.seed}


@dataclass
class Grid:
    """One profile's grid on a loaded model: where its files go and how a cell runs."""

    profile: GridProfile
    model: Any
    tokenizer: Any
    data_dir: str | None = None
    results_dir: Path = REPO / "results"
    editors_dir: Path = REPO / "runs" / "editors"
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.code = code_version()  # of the code this process runs: taken before any later edit of the checkout
        self.memo = UneditedMemo()  # the unedited model's scores, shared by the cells of this process

    def result_path(self, cell: Cell) -> Path:
        return Path(self.results_dir) / model_label(self.profile.model) / dataset_label(cell.dataset) / f"{cell.method}-{cell.n}.json"

    def capability_path(self, cell: Cell | None) -> Path:
        root = Path(self.results_dir) / model_label(self.profile.model)
        if cell is None:
            return root / "capability-unedited.json"
        return root / dataset_label(cell.dataset) / f"capability-{cell.method}-{cell.n}.json"

    def editor_path(self, cell: Cell) -> Path:
        return Path(self.editors_dir) / model_label(self.profile.model) / dataset_label(cell.dataset) / f"{cell.method}-{cell.n}"

    def done(self, path: Path) -> bool:
        return finished(path) is not None

    def status(self, cell: Cell) -> str:
        """``"done"``; ``"rescore"``: its file was scored otherwise (an older run; running the cell
        again re-scores its saved editor); or ``"missing"``."""
        rec = finished(self.result_path(cell))
        return "missing" if rec is None else "done" if rec.get("scoring") == scoring(self.profile) else "rescore"

    def capability_status(self, cell: Cell) -> str:
        """``"done"``: the cell is done and its capability comparison ran with the editor its file
        records (``"editor"``, :func:`editor_digest`) and these capability settings; ``"stale"``: a
        comparison of another fit or settings (an older run, or the cell is pending again); ``"missing"``."""
        rec = finished(self.capability_path(cell))
        if rec is None:
            return "missing"
        fit = finished(self.result_path(cell)) if self.status(cell) == "done" else None
        same = fit is not None and rec.get("editor") is not None and rec.get("editor") == fit.get("editor")
        return "done" if same and rec.get("settings") == self.capability_settings() else "stale"

    def pending(self, only: Sequence[str] = ()) -> list[tuple[str, Cell]]:
        """What is left: ``("edit", cell)`` and ``("capability", cell)`` steps, in run order; with
        ``only``, the cells whose name (``zsre/memit-1000``) matches one of these shell patterns."""
        todo = []
        for cell in cells(self.profile):
            if only and not any(fnmatch.fnmatchcase(cell.name, pat) for pat in only):
                continue
            if self.status(cell) != "done":
                todo.append(("edit", cell))
            if cell.n == self.profile.capability_n and self.capability_status(cell) != "done":
                todo.append(("capability", cell))
        return todo

    def plan(self, only: Sequence[str] = ()) -> list[Step]:
        """The pending steps in run order, each with the steps it waits for (:class:`Step`): a
        method's shared work (:attr:`lks.methods.Editor.shared_work`) before its first cell, a
        cell after the cell whose cache it reads (``runs_after``), the unedited capability run
        just before the first capability step that needs it."""
        pending = self.pending(only)
        edits = {f"edit {c.name}" for kind, c in pending if kind == "edit"}
        needs: dict[str, list[str]] = {}  # shared work -> the methods of the planned cells that need it
        for kind, cell in pending:
            work = editor_class(cell.method).shared_work
            if kind == "edit" and work and cell.method not in needs.setdefault(work, []):
                needs[work].append(cell.method)
        unedited = Step("unedited") if self.saved_unedited() is None else None
        steps: list[Step] = []
        for kind, cell in pending:
            after, cls = [], editor_class(cell.method)
            if kind == "edit" and cls.shared_work:
                shared = Step("shared", shared=cls.shared_work, methods=tuple(needs[cls.shared_work]))
                if shared not in steps:
                    steps.append(shared)
                after.append(shared.name)
            reads = f"edit {Cell(cell.dataset, cls.runs_after, cell.n).name}" if kind == "edit" and cls.runs_after else \
                f"edit {cell.name}" if kind == "capability" else ""
            if reads in edits:  # the step whose output this one reads is planned too: wait for it
                after.append(reads)
            if kind == "capability":
                if unedited is not None:
                    if unedited not in steps:
                        steps.append(unedited)
                    after.append(unedited.name)
            steps.append(Step(kind, cell, tuple(after)))
        return steps

    def run(self, only: Sequence[str] = ()) -> None:
        """Every pending step (of the ``only`` cells) in order, in this process, with a line per
        step and an ETA; finished ones are skipped (re-running resumes)."""
        steps, pace = self.plan(only), Pace()
        self.log(f"grid {self.profile.model}: {len(steps)} step(s) to run" + (f" (cells {', '.join(only)})" if only else ""))
        for i, step in enumerate(steps, 1):
            self.log(f"[{i}/{len(steps)}] {step.name} ...")
            out = self.run_step(step)
            pace.add(step, out["seconds"])
            self.log(f"[{i}/{len(steps)}] {step.name}: {out['brief']} ({out['seconds']:.0f} s){pace.eta(steps[i:])}")

    def log_path(self, step: Step) -> Path:
        """The step's log file: beside the cell's editor (the others: beside the model's folder)."""
        if step.cell is None:
            return Path(self.editors_dir) / model_label(self.profile.model) / f"{step.name.replace(' ', '-')}.log"
        return self.editor_path(step.cell).with_name(f"{step.cell.method}-{step.cell.n}.log")

    def run_step(self, step: Step) -> dict[str, Any]:
        """Run one step, its progress (the lks loggers at INFO) appended to :meth:`log_path`;
        returns ``{"step", "seconds", "brief"}`` (a one-line result)."""
        t0 = time.perf_counter()
        with step_log(self.log_path(step), __name__) as log:
            log.info("%s: started (pid %d on %s)", step.name, os.getpid(), os.uname().nodename)
            if step.kind == "edit":
                summary = self.run_cell(step.cell)["summary"]
                brief = ", ".join(f"{k} {summary[k]:.3f}" for k in ("reliability", "generality", "locality", "efficacy")
                                  if k in summary)
            elif step.kind == "capability":
                brief = f"{len(self.run_capability(step.cell)['comparison'])} comparison rows"
            elif step.kind == "shared":
                brief = self.run_shared(step.methods)
            else:
                brief = f"{len(self.unedited_capability())} score rows"
            log.info("%s: finished in %.0f s: %s", step.name, time.perf_counter() - t0, brief)
        return {"step": step.name, "seconds": time.perf_counter() - t0, "brief": brief}

    def run_shared(self, methods: Sequence[str]) -> str:
        """The shared work (:meth:`lks.methods.Editor.prepare_shared`) of each of ``methods``, with its settings."""
        for m in methods:
            cfg = self.configs(Cell(self.profile.datasets[0], m, self.profile.sizes[0]))[0]
            editor_class(m)(self.model, self.tokenizer, cfg).prepare_shared(self.data_dir)
        return f"for {', '.join(methods)}"

    # -- one cell -------------------------------------------------------------------------------
    def edits(self, cell: Cell) -> tuple[Any, list[int]]:
        return load_edits(cell.dataset, data_dir=self.data_dir, n=cell.n).drop_conflicts()

    def configs(self, cell: Cell) -> tuple[Any, Any]:
        """``(editor config, fit config)``: the method's registered settings with the profile's
        overrides and seed (:meth:`lks.methods.Editor.configs`)."""
        over = self.profile.overrides.get(cell.method, {})
        return editor_class(cell.method).configs(self.model, over, seed=self.profile.seed)

    def editor(self, cell: Cell, edits: Any) -> tuple[Any, bool]:
        """``(editor, reused)``: the cell's fitted editor, loaded (``reused``) when a finished one with
        these edits and settings is saved, else fitted (resuming an interrupted fit) and saved."""
        path = self.editor_path(cell)
        cfg, tcfg = self.configs(cell)
        # a finished save has a config.json and no train_state.json (a running LKS fit's checkpoint)
        if (path / "config.json").is_file() and not (path / "train_state.json").is_file():
            saved = load_editor(str(path), self.model, self.tokenizer)
            if saved.data_checksum == edits.checksum() and saved.config == cfg and saved.fit_config == tcfg:
                return saved, True
            self.log(f"{path}: another run's editor (other edits or settings); fitting afresh")
        editor = editor_class(cell.method)(self.model, self.tokenizer, cfg)
        editor.fit(edits, tcfg, checkpoint_dir=path, progress=False)
        editor.save(path)
        return editor, False

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """Fit (or load), evaluate and write one cell; returns what was written."""
        edits, dropped = self.edits(cell)
        with peak_rss() as peak:
            editor, reused = self.editor(cell, edits)
            shown = edits.head(min(len(edits), self.profile.eval_n))
            sample = fluency_sample(len(shown), self.profile.fluency_n, self.profile.seed)
            t0 = time.perf_counter()
            _, summary = evaluate_edits(editor, shown, fluency_edits=sample, fluency_tokens=self.profile.fluency_tokens,
                                        memo=self.memo, neighborhood=True)
            eval_seconds = time.perf_counter() - t0
        configs = editor.settings()
        record = {"format": FORMAT, "model": self.profile.model, "data": dataset_label(cell.dataset), "method": cell.method,
                  "n": cell.n, "n_edits": len(edits), "dropped_conflicts": dropped, "n_evaluated": len(shown),
                  "evaluated": f"the first {len(shown)} of the {len(edits)} edits",
                  "scoring": scoring(self.profile),
                  "scored": {"teacher_forced": f"edits 0-{len(shown) - 1}", "generation": sample},
                  "fit_seconds": editor.fit_seconds, "editor_reused": reused,
                  "editor": editor_digest(self.editor_path(cell)),  # the fit its capability comparison must run with
                  # MEMIT / AlphaEdit: targets found in the cache (computed by an earlier fit) are not in fit_seconds
                  "targets_cached": sum(h.get("targets") == "cached" for h in editor.history),
                  "eval_seconds": eval_seconds, **peak, **configs,
                  **provenance(self.code), "summary": summary}
        write_json(self.result_path(cell), record)
        return record

    # -- capability -----------------------------------------------------------------------------
    def capability_kwargs(self) -> dict[str, Any]:
        p = self.profile
        return dict(tasks=list(p.capability_tasks), data_dir=self.data_dir, limit=dict(p.capability_limit) or None,
                    seed=p.seed, batch_size=p.batch_size, task_options=dict(p.capability_options) or None, progress=False)

    def capability_settings(self) -> dict[str, Any]:
        kw = self.capability_kwargs()
        return json.loads(json.dumps({k: v for k, v in kw.items() if k not in ("data_dir", "progress")}))

    def saved_unedited(self) -> pd.DataFrame | None:
        """The stored unedited capability table (per-item ``attrs["items"]``) of these settings, if any."""
        saved = finished(self.capability_path(None))
        if saved is None or saved.get("settings") != self.capability_settings():
            return None
        df = pd.DataFrame(saved["table"])
        df.attrs["items"] = pd.DataFrame(saved["items"])
        return df

    def unedited_capability(self) -> pd.DataFrame:
        """The unedited model's capability table (with per-item ``attrs["items"]``), run once and kept
        (resuming at its first unfinished task)."""
        df = self.saved_unedited()
        if df is not None:
            return df
        partial = Path(self.editors_dir) / model_label(self.profile.model) / "capability-unedited.partial"
        df, seconds = capability_by_task(self.model, self.tokenizer, None, self.capability_kwargs(),
                                         self.capability_settings(), partial)
        write_json(self.capability_path(None), {
            "format": FORMAT, "model": self.profile.model, "settings": self.capability_settings(),
            "seconds": seconds, **provenance(self.code), "table": _records(df), "items": _records(df.attrs["items"])})
        shutil.rmtree(partial, ignore_errors=True)
        return df

    def run_capability(self, cell: Cell) -> dict[str, Any]:
        """The capability tasks with the cell's editor, paired with the unedited run on the same items
        (kept if it ran with this fit and settings). An editor fitted again here (its saved one was
        on another machine) is scored again first, so that the cell's file and this one describe one fit."""
        edits, _ = self.edits(cell)
        editor, _ = self.editor(cell, edits)
        digest = editor_digest(self.editor_path(cell))
        if (finished(self.result_path(cell)) or {}).get("editor") != digest:
            self.log(f"{cell.name}: its file records another fit than the saved editor; scoring this one first")
            self.run_cell(cell)
        if self.capability_status(cell) == "done":
            return finished(self.capability_path(cell))
        partial = self.editor_path(cell).with_name(f"{cell.method}-{cell.n}.capability.partial")
        after, seconds = capability_by_task(self.model, self.tokenizer, editor, self.capability_kwargs(),
                                            self.capability_settings(), partial, digest)
        before = self.unedited_capability()
        comp = compare_capability(before, after, seed=self.profile.seed)
        record = {"format": FORMAT, "model": self.profile.model, "data": dataset_label(cell.dataset),
                  "method": cell.method, "n": cell.n, "n_edits": len(edits), "seconds": seconds, "editor": digest,
                  "settings": self.capability_settings(), **provenance(self.code),
                  "before": _records(before), "after": _records(after), "comparison": _records(comp)}
        write_json(self.capability_path(cell), record)
        shutil.rmtree(partial, ignore_errors=True)
        return record


def capability_by_task(model: Any, tokenizer: Any, editor: Any, kw: dict[str, Any], settings: dict[str, Any],
                       partial: Path, editor_id: str | None = None) -> tuple[pd.DataFrame, float]:
    """``(table with attrs["items"], seconds)``: the capability tasks of ``kw`` (:meth:`Grid.capability_kwargs`)
    run one at a time, each task's result kept in the folder ``partial`` until all are done, so that an
    interrupted run resumes at its first unfinished task (a task's run does not depend on the others').
    A kept result counts only with the same ``settings`` and ``editor_id`` (:func:`editor_digest`)."""
    parts, seconds = [], 0.0
    for task in kw["tasks"]:
        path = partial / f"{task}.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if saved.get("settings") != settings or saved.get("editor") != editor_id:
            t0 = time.perf_counter()
            df = evaluate_capability(model, tokenizer, editor=editor, **{**kw, "tasks": [task]})
            saved = {"settings": settings, "editor": editor_id, "seconds": time.perf_counter() - t0,
                     "table": _records(df), "items": _records(df.attrs["items"])}
            write_json(path, saved)
        parts.append(saved)
        seconds += saved["seconds"]
    df = pd.DataFrame([row for part in parts for row in part["table"]])
    df.attrs["items"] = pd.DataFrame([row for part in parts for row in part["items"]])
    return df, seconds


def finished(path: Path) -> dict[str, Any] | None:
    """The contents of a finished results file (valid JSON of this format), else None."""
    try:
        saved = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) and saved.get("format") == FORMAT else None


def fluency_sample(n: int, k: int, seed: int) -> list[int]:
    """Which of ``n`` evaluated edits the generation-based metrics continue: all when ``n <= k``,
    else ``k`` drawn uniformly without replacement with ``seed`` (sorted)."""
    if n <= k:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def editor_digest(path: Path) -> str:
    """sha256 over a saved editor's files, names and contents: which fit a kept capability result
    belongs to (an editor fitted again on another machine, e.g. FT-L's, is another fit)."""
    return sha256_text(json.dumps({p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}))


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(df.to_json(orient="records"))
