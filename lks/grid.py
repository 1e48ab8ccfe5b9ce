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

**Capability** at ``capability_n`` edits: after that cell, the editor runs the general-capability
tasks (:func:`lks.capability.evaluate_capability`) on the same items as the unedited model, which
runs once per profile (``results/<model>/capability-unedited.json``, per-item scores kept for the
pairing; one process runs it, another one runs its edited tasks meanwhile and then waits); the
paired comparison goes to ``results/<model>/<dataset>/capability-<method>-<N>.json``.

:mod:`lks.report` reads these files back and writes them as tables.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lks.capability import compare_capability, evaluate_capability
from lks.config import from_dict
from lks.formats import load_edits
from lks.methods import editor_class, load_editor, method_names
from lks.metrics import UneditedMemo, evaluate_edits
from lks.utils import git_state, machine, sha256_file, sha256_text, write_json

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


def cells(profile: GridProfile) -> list[Cell]:
    """The grid in run order: small sizes first, so every size is complete before a larger one starts."""
    return [Cell(d, m, n) for n in sorted(profile.sizes) for d in profile.datasets for m in profile.methods]


def dataset_label(dataset: str) -> str:
    """The folder name of a data set: its registered name, or a JSON file's stem."""
    return Path(dataset).stem if dataset.endswith(".json") else dataset


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
        return Path(self.results_dir) / self.profile.model / dataset_label(cell.dataset) / f"{cell.method}-{cell.n}.json"

    def capability_path(self, cell: Cell | None) -> Path:
        root = Path(self.results_dir) / self.profile.model
        if cell is None:
            return root / "capability-unedited.json"
        return root / dataset_label(cell.dataset) / f"capability-{cell.method}-{cell.n}.json"

    def editor_path(self, cell: Cell) -> Path:
        return Path(self.editors_dir) / self.profile.model / dataset_label(cell.dataset) / f"{cell.method}-{cell.n}"

    @staticmethod
    def finished(path: Path) -> dict[str, Any] | None:
        """The contents of a finished results file (valid JSON of this format), else None."""
        try:
            saved = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return saved if isinstance(saved, dict) and saved.get("format") == FORMAT else None

    def done(self, path: Path) -> bool:
        return self.finished(path) is not None

    def status(self, cell: Cell) -> str:
        """``"done"``; ``"rescore"``: its file was scored otherwise (an older run; running the cell
        again re-scores its saved editor); or ``"missing"``."""
        rec = self.finished(self.result_path(cell))
        return "missing" if rec is None else "done" if rec.get("scoring") == self.scoring() else "rescore"

    def pending(self, only: Sequence[str] = ()) -> list[tuple[str, Cell]]:
        """What is left: ``("edit", cell)`` and ``("capability", cell)`` steps, in run order; with
        ``only``, the cells whose name (``zsre/memit-1000``) matches one of these shell patterns."""
        todo = []
        for cell in cells(self.profile):
            if only and not any(fnmatch.fnmatchcase(cell.name, pat) for pat in only):
                continue
            if self.status(cell) != "done":
                todo.append(("edit", cell))
            if cell.n == self.profile.capability_n and not self.done(self.capability_path(cell)):
                todo.append(("capability", cell))
        return todo

    def run(self, only: Sequence[str] = ()) -> None:
        """Every pending step (of the ``only`` cells), with progress; finished ones are skipped
        (re-running resumes). Several processes may share a grid: a step another one has finished
        or holds (a lock file beside the editor) is skipped."""
        todo = self.pending(only)
        total = len(cells(self.profile)) + (len(self.profile.datasets) * len(self.profile.methods)
                                            if self.profile.capability_n else 0)
        self.log(f"grid {self.profile.model}: {total - len(self.pending())} of {total} steps done; "
                 f"{len(todo)} to run here" + (f" (cells {', '.join(only)})" if only else ""))
        for i, (kind, cell) in enumerate(todo, 1):
            t0, step = time.perf_counter(), f"[{i}/{len(todo)}] {kind} {cell.name}"
            out = self.result_path(cell) if kind == "edit" else self.capability_path(cell)
            with claimed(self.editor_path(cell).with_name(f"{cell.method}-{cell.n}.lock")) as mine:
                if not mine or self.done(out):
                    self.log(f"{step}: {'finished' if self.done(out) else 'running'} in another process; skipped")
                    continue
                self.log(f"{step} ...")
                if kind == "edit":
                    summary = self.run_cell(cell)["summary"]
                    self.log(f"{step}: " + ", ".join(f"{k} {summary[k]:.3f}" for k in
                                                     ("reliability", "generality", "locality", "efficacy") if k in summary)
                             + f" ({time.perf_counter() - t0:.0f} s)")
                else:
                    self.run_capability(cell)
                    self.log(f"{step}: done ({time.perf_counter() - t0:.0f} s)")

    # -- one cell -------------------------------------------------------------------------------
    def scoring(self) -> dict[str, Any]:
        """The profile's evaluation settings, recorded in each cell's file: a file scored otherwise is redone."""
        p = self.profile
        return {"eval_n": p.eval_n, "fluency_n": p.fluency_n, "fluency_tokens": p.fluency_tokens, "seed": p.seed}

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
                  "scoring": self.scoring(),
                  "scored": {"teacher_forced": f"edits 0-{len(shown) - 1}", "generation": sample},
                  "fit_seconds": editor.fit_seconds, "editor_reused": reused,
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

    def capability_table(self, editor: Any, partial: Path, editor_id: str | None = None) -> tuple[pd.DataFrame, float]:
        """``(table with attrs["items"], seconds)``: the capability tasks run one at a time, each
        task's result kept in the folder ``partial`` until all are done, so that an interrupted run
        resumes at its first unfinished task (a task's run does not depend on the others'). A kept
        result counts only with the same settings and ``editor_id`` (:func:`editor_digest`)."""
        kw, settings, parts, seconds = self.capability_kwargs(), self.capability_settings(), [], 0.0
        for task in kw["tasks"]:
            path = partial / f"{task}.json"
            saved = json.loads(path.read_text()) if path.is_file() else {}
            if saved.get("settings") != settings or saved.get("editor") != editor_id:
                t0 = time.perf_counter()
                df = evaluate_capability(self.model, self.tokenizer, editor=editor, **{**kw, "tasks": [task]})
                saved = {"settings": settings, "editor": editor_id, "seconds": time.perf_counter() - t0,
                         "table": _records(df), "items": _records(df.attrs["items"])}
                write_json(path, saved)
            parts.append(saved)
            seconds += saved["seconds"]
        df = pd.DataFrame([row for part in parts for row in part["table"]])
        df.attrs["items"] = pd.DataFrame([row for part in parts for row in part["items"]])
        return df, seconds

    def saved_unedited(self) -> pd.DataFrame | None:
        """The stored unedited capability table (per-item ``attrs["items"]``) of these settings, if any."""
        saved = self.finished(self.capability_path(None))
        if saved is None or saved.get("settings") != self.capability_settings():
            return None
        df = pd.DataFrame(saved["table"])
        df.attrs["items"] = pd.DataFrame(saved["items"])
        return df

    def unedited_capability(self, wait: bool = True, poll: float = 60.0) -> pd.DataFrame | None:
        """The unedited model's capability table (with per-item ``attrs["items"]``), run once and kept.
        One process runs it (a lock file beside the partial results); another one waits for it
        (``wait``, polling every ``poll`` seconds) or gets None."""
        root = Path(self.editors_dir) / self.profile.model
        partial, lock = root / "capability-unedited.partial", root / "capability-unedited.lock"
        while True:
            with claimed(lock) as mine:
                df = self.saved_unedited()  # under the lock: a finished run is never repeated
                if df is not None:
                    return df
                if mine:
                    df, seconds = self.capability_table(None, partial)
                    write_json(self.capability_path(None), {
                        "format": FORMAT, "model": self.profile.model, "settings": self.capability_settings(),
                        "seconds": seconds, **provenance(self.code),
                        "table": _records(df), "items": _records(df.attrs["items"])})
                    shutil.rmtree(partial, ignore_errors=True)
                    return df
            if not wait:
                return None
            self.log(f"unedited capability: running in another process ({lock}); waiting")
            time.sleep(poll)

    def run_capability(self, cell: Cell) -> dict[str, Any]:
        """The capability tasks with the cell's editor, paired with the unedited run on the same items.
        When another process is running the unedited tasks, the edited ones go first."""
        before = self.unedited_capability(wait=False)
        edits, _ = self.edits(cell)
        editor, _ = self.editor(cell, edits)
        partial = self.editor_path(cell).with_name(f"{cell.method}-{cell.n}.capability.partial")
        after, seconds = self.capability_table(editor, partial, editor_digest(self.editor_path(cell)))
        if before is None:
            before = self.unedited_capability()
        comp = compare_capability(before, after, seed=self.profile.seed)
        record = {"format": FORMAT, "model": self.profile.model, "data": dataset_label(cell.dataset),
                  "method": cell.method, "n": cell.n, "n_edits": len(edits), "seconds": seconds, **provenance(self.code),
                  "before": _records(before), "after": _records(after), "comparison": _records(comp)}
        write_json(self.capability_path(cell), record)
        shutil.rmtree(partial, ignore_errors=True)
        return record


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


def _start_tag(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks after boot, from /proc), None where unknown: with
    the pid it names one process, since pids are reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(text: str) -> bool:
    """Whether the process a lock file names (``"pid [start tag]"``) is still running."""
    try:
        pid, *tag = text.split()
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return not tag or _start_tag(int(pid)) in (None, tag[0])  # another process with a reused pid: not it


@contextmanager
def claimed(lock: Path) -> Iterator[bool]:
    """Hold ``lock`` (a file with this process's id and start time) for the block: yields False
    when a live process holds it already; a lock left by a dead process is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _holder_alive(lock.read_text()):
                yield False
                return
            lock.unlink(missing_ok=True)  # its process is gone
            continue
        pid = os.getpid()
        os.write(fd, f"{pid} {_start_tag(pid) or ''}".strip().encode())
        os.close(fd)
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(df.to_json(orient="records"))


class peak_rss:
    """Context manager: the peak resident memory (MiB) of the process within the block, as
    ``{"peak_rss_mb": ..., "peak_rss_scope": ...}``. Linux resets the high-water mark
    (``/proc/self/clear_refs``), so the peak is the block's own; elsewhere it is the process's."""

    def __enter__(self) -> dict[str, Any]:
        self.out: dict[str, Any] = {}
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scope = "cell"
        except OSError:
            self.scope = "process"
        return self.out

    def __exit__(self, *exc: Any) -> None:
        mb = None
        if self.scope == "cell":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    mb = int(line.split()[1]) / 1024
        if mb is None:
            mb, self.scope = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process"
        self.out.update(peak_rss_mb=round(mb, 1), peak_rss_scope=self.scope)


def code_version() -> str | None:
    """The checkout's git commit, ``-dirty`` when its code differs from it (None outside git)."""
    state = git_state()
    return state["commit"] and state["commit"] + ("-dirty" if state["dirty"] else "")


def provenance(code: str | None) -> dict[str, Any]:
    """The code's version, the machine (CPU, cores, torch threads, GPU, versions) and the date."""
    return {"git_commit": code, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
