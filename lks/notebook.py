"""The notebooks' shared setup, in one place instead of a cell copied into each notebook.

A notebook calls, after its ``parameters`` cell::

    run = lks.notebook.setup("02_hypernetwork_training", globals())
    editor_config, train_config = lks.notebook.recipe(model_name, epochs=epochs, seed=seed)
    dataset_name, = lks.notebook.pick_datasets(dataset, run.data_dir)
    ...
    run.write_results({...}, figures=[...])

* :func:`setup` sets torch's (OpenMP) threads and the seeds, quiets library chatter and records
  the notebook's parameters (every JSON literal defined so far: the parameters cell).
* :func:`recipe` is the model's registered editor and training recipe, changed only where a
  parameter is not ``None``.
* :func:`pick_datasets` / :func:`load_edit_set` / :func:`capability_tasks` choose benchmark files
  from the data directory and, when one is missing, say so loudly in the notebook's output (a
  markdown warning naming the file and how to get it), never by a silent skip.
* :func:`model_summary`, :func:`describe`, :func:`fmt` and :func:`show` print a model, a public
  function's contract, numbers and tables.
* :meth:`NotebookRun.write_results` writes ``results/<notebook>.json`` with the parameters, the git
  commit, the machine and the timings.

Importing this module has no side effects: torch, IPython, pandas and transformers are imported
inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import torch.nn as nn

    from lks.config import EditorConfig, TrainConfig
    from lks.data import EditSet

REPO = Path(__file__).resolve().parents[1]  # the checkout holding this package (an editable install)

# edit sets read from the data directory (LKS format), and what each capability task needs there
EDIT_FILES = {"counterfact": "lks/cf_eval_data.json", "zsre": "lks/zsre_eval_data.json"}
CAPABILITY_FILES = {"gsm8k": ("gsm8k/test.jsonl",), "sst2": ("sst2/dev.tsv",),
                    "rte": ("rte/superglue_val.jsonl", "rte/validation.parquet"),
                    "wikitext2": ("wikitext2/wiki.test.raw",), "mmlu": ("mmlu/test/", "mmlu/dev/")}
# the parameters every notebook has (setup reads them)
COMMON_PARAMETERS = ("seed", "torch_threads", "data_dir", "figure_dir", "results_dir")
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}

# general prompts that mention no edited subject (notebooks 03 and 04): an editor must leave them
# exactly as the unedited model has them
GENERAL_PROMPTS = (
    "Water boils at a temperature of", "The largest planet in the solar system is",
    "A triangle has three sides and a square has", "The opposite of hot is",
    "To bake bread you need flour, water and", "The chemical symbol for gold is",
    "In the morning, many people drink a cup of", "The first month of the year is",
    "A group of wolves is called a", "The sum of two and three is",
    "Photosynthesis converts sunlight into", "The author of a novel is called its",
)


# --------------------------------------------------------------------------------------------
# data directory and data sets
# --------------------------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The benchmark data directory a notebook reads.

    ``data_dir`` if given, else ``$LKS_DATA_DIR`` (even when it does not exist: that is how a run
    asks for no data), else ``~/.cache/lks/data`` (:func:`lks.datadir.data_dir`) when it exists,
    else the checkout's sibling ``../shared/data`` when it exists (the layout ``tests/conftest.py``
    uses), else ``~/.cache/lks/data``.
    """
    from lks.datadir import ENV_DATA_DIR
    from lks.datadir import data_dir as default_dir

    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR]).expanduser()
    home, sibling = default_dir(), REPO.parent / "shared" / "data"
    return sibling if not home.is_dir() and sibling.is_dir() else home


def has_data(relpath: str, data_dir: Path) -> bool:
    """Is ``relpath`` in ``data_dir``? A path ending in ``/`` names a folder. Nothing is downloaded;
    the loaders check each file's pinned SHA-256 when they read it."""
    path = data_dir / relpath
    return path.is_dir() if relpath.endswith("/") else path.is_file()


def warn(message: str) -> None:
    """Show ``message`` as a markdown warning block in a notebook (on stdout elsewhere)."""
    text = f"> **Warning** {message}"
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython ships with the notebook extra
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display({"text/markdown": text, "text/plain": text}, raw=True)  # plain text for viewers without markdown
    else:
        print(text)


def warn_missing(what: str, files: Sequence[str], data_dir: Path, instead: str) -> None:
    """The loud note for a data set that is not in the data directory."""
    where = " or ".join(f"`{f}`" for f in files)
    warn(f"**{what} is missing**: no {where} in the data directory `{data_dir}`, so {instead}. "
         f"To run it, set `LKS_DATA_DIR=/path/to/data` (or the `data_dir` parameter) to a directory "
         f"holding the files listed in the README, section Data.")


def pick_datasets(requested: str | Sequence[str], data_dir: Path,
                  auto: Sequence[str] = ("counterfact",)) -> list[str]:
    """Edit sets to use: ``"auto"`` means each of ``auto`` whose LKS-format file is in ``data_dir``
    (a warning for each one missing), or ``["builtin"]`` when none is; a name or a list of names
    (``"counterfact"``, ``"zsre"``, ``"builtin"``) is used as given and must be present.

    Raises:
        ValueError: an unknown name.
        FileNotFoundError: a requested set's file is not in ``data_dir``.
    """
    known = (*EDIT_FILES, "builtin")
    if requested == "auto":
        present = [d for d in auto if has_data(EDIT_FILES[d], data_dir)]
        for d in auto:
            if d not in present:
                warn_missing(f"The {d} edit set", [EDIT_FILES[d]], data_dir,
                             "this run uses " + (", ".join(present) if present else
                                                 "the edit set shipped with lks (`lks.builtin_edits()`)"))
        return present or ["builtin"]
    names = [requested] if isinstance(requested, str) else list(requested)
    bad = [d for d in names if d not in known]
    if not names or bad:
        raise ValueError(f"dataset must be 'auto' or a name / non-empty list of names from {list(known)}, got {requested!r}")
    for d in names:
        if d != "builtin" and not has_data(EDIT_FILES[d], data_dir):
            raise FileNotFoundError(f"dataset {d!r} needs {EDIT_FILES[d]} in the data directory {data_dir} "
                                    "(set LKS_DATA_DIR or data_dir; README, section Data)")
    return names


def load_edit_set(name: str, n: int, data_dir: Path) -> EditSet:
    """The first ``n`` edits of ``name`` (``"builtin"`` is capped at its size, with a note)."""
    import lks

    if name == "builtin":
        edits = lks.builtin_edits()
        if n > len(edits):
            print(f"note: the built-in set has {len(edits)} edits; using all of them instead of {n}")
        return edits.head(min(n, len(edits)))
    return lks.load_edits(name, data_dir=data_dir, n=n)


def capability_tasks(tasks: Sequence[str], data_dir: Path) -> list[str]:
    """The capability tasks whose benchmark files are in ``data_dir``, in the given order; a
    warning for each task that is missing (it is then skipped, visibly)."""
    unknown = [t for t in tasks if t not in CAPABILITY_FILES]
    if unknown:
        raise ValueError(f"unknown capability task(s) {unknown}; choose from {list(CAPABILITY_FILES)}")
    present = []
    for t in tasks:
        files = CAPABILITY_FILES[t]
        ok = all(has_data(f, data_dir) for f in files) if t == "mmlu" else any(has_data(f, data_dir) for f in files)
        if ok:
            present.append(t)
        else:
            warn_missing(f"The {t} benchmark", files, data_dir, f"{t} is skipped")
    return present


# --------------------------------------------------------------------------------------------
# the recipe
# --------------------------------------------------------------------------------------------
def recipe(model_name: str, **overrides: Any) -> tuple[EditorConfig, TrainConfig]:
    """:func:`lks.config.recipe` with a notebook's parameters as overrides; ``None`` means "the
    recipe's value" (the parameter cells' default)."""
    from lks.config import recipe

    return recipe(model_name, {k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------
def model_summary(model: nn.Module) -> str:
    """One line: name, decoder layers, hidden size, parameters, dtype, device and whether frozen."""
    from lks.models import get_layers, model_device

    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    name = getattr(model, "lks_name", type(model).__name__)
    return (f"{name}: {len(get_layers(model))} decoder layers, hidden size {model.config.hidden_size}, "
            f"{n:,} parameters, dtype {str(params[0].dtype).removeprefix('torch.')}, "
            f"device {model_device(model).type}, frozen: {not any(p.requires_grad for p in params)}")


def fmt(x: Any) -> str:
    """A number rounded for printing (floats to 3 decimals); anything else as text."""
    if x is None or isinstance(x, bool):
        return str(x)
    if hasattr(x, "item") and not isinstance(x, (list, tuple, dict)):
        x = x.item()  # numpy / torch scalars
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def describe(obj: Any) -> str:
    """A public function's or class's name, signature and docstring (its contract, not its code)."""
    import inspect

    name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
    try:
        sig = str(inspect.signature(obj)).replace("'", "")  # annotations are strings here
    except (TypeError, ValueError):
        sig = ""
    return f"{name}{sig}\n\n{inspect.getdoc(obj) or '(no docstring)'}"


def show(df: pd.DataFrame, **kwargs: Any) -> None:
    """Print a table with floats rounded to 3 decimals (plain text: no HTML, no reprs)."""
    print(df.to_string(float_format=lambda v: f"{v:.3f}", **kwargs))


# --------------------------------------------------------------------------------------------
# a run: parameters, timings, results file
# --------------------------------------------------------------------------------------------
def _is_literal(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_is_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_literal(v) for k, v in value.items())
    return False


def notebook_parameters(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON literals in ``namespace`` (a notebook's ``globals()`` right after its parameters
    cell), leaving out private names and IPython's own."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k not in _IPYTHON_NAMES and _is_literal(v)}


def _jsonable(x: Any) -> Any:
    """``x`` with dataclasses as dicts, numpy/torch scalars as numbers, paths as text and NaN as
    None (JSON has no NaN)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return x.as_posix()
    if hasattr(x, "item") and hasattr(x, "dtype"):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


@dataclass
class NotebookRun:
    """One run of a notebook: its name, parameters, directories and timings."""

    name: str                        # notebook stem, e.g. "02_hypernetwork_training"
    parameters: dict[str, Any]       # the parameters cell's values (after papermill's injection)
    data_dir: Path                   # benchmark data directory (may not exist)
    figure_dir: Path
    results_dir: Path
    started: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    timings: dict[str, float] = field(default_factory=dict)  # seconds per timed section
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def figure(self, name: str) -> Path:
        """Where figure ``name`` is saved (a PNG; the plot functions write an SVG beside it)."""
        return self.figure_dir / f"{name}.png"

    @contextmanager
    def timed(self, section: str) -> Iterator[None]:
        """Time the block; the seconds go to ``timings[section]`` and the results file."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[section] = self.timings.get(section, 0.0) + time.perf_counter() - t0

    def write_results(self, results: Mapping[str, Any], figures: Sequence[str | os.PathLike] = ()) -> Path:
        """Write ``<results_dir>/<name>.json``: the notebook, its parameters, ``results``, the
        figures (relative to the parent of ``results_dir``, the repository root by default), the git
        commit, the machine and the timings (total since :func:`setup`). Returns the path."""
        from lks.utils import git_state, machine, write_json

        root = self.results_dir.resolve().parent
        doc = {"notebook": self.name, "parameters": self.parameters, **results,
               "figures": [Path(f).resolve().relative_to(root).as_posix() for f in figures],
               "git": git_state(), "machine": machine(), "started": self.started,
               "timings": {**self.timings, "total": time.perf_counter() - self._t0}}
        path = self.results_dir / f"{self.name}.json"
        write_json(path, _jsonable(doc))
        print(f"wrote {path.as_posix()}")
        return path


def setup(name: str, namespace: Mapping[str, Any]) -> NotebookRun:
    """Start a notebook run: call it first thing in the cell after the parameters cell, with
    ``globals()``.

    Reads the common parameters (``seed``, ``torch_threads``: 0 keeps torch's default,
    ``data_dir``, ``figure_dir``, ``results_dir``) from ``namespace``, sets torch's threads (and
    ``OMP_NUM_THREADS`` for child processes), seeds Python, NumPy and torch, keeps progress bars and
    library chatter out of the outputs, and prints one line about the run.

    Raises:
        ValueError: a common parameter is missing.
    """
    import warnings

    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets
    import pandas as pd
    import torch
    import transformers

    import lks

    params = notebook_parameters(namespace)
    missing = [p for p in COMMON_PARAMETERS if p not in params]
    if missing:
        raise ValueError(f"{name}: the parameters cell must define {missing}")
    threads = params["torch_threads"]
    if not isinstance(threads, int) or threads < 0:
        raise ValueError(f"torch_threads must be an int >= 0, got {threads!r}")
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    lks.set_seed(params["seed"])
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars of every load_model
    pd.set_option("display.width", 160)
    run = NotebookRun(name=name, parameters=params, data_dir=resolve_data_dir(params["data_dir"]),
                      figure_dir=Path(params["figure_dir"]), results_dir=Path(params["results_dir"]))
    print(f"{name}: seed {params['seed']}, {torch.get_num_threads()} torch thread(s), "
          f"lks {lks.__version__} from {Path(lks.__file__).parent.as_posix()}")
    return run
