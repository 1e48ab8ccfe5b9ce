"""Copy notebooks/ and results/ into DEST for nbval, deciding which data-dependent outputs it compares.

    python tests/nbval_copy.py DEST

A code cell whose first line is ``# NBVAL_DATA`` prints numbers read from the benchmark data
directory (CounterFact's edits, the capability benchmarks); the committed outputs come from a run
with every benchmark file there. When the directory the notebooks will read
(:func:`lks.notebook.resolve_data_dir`) holds every file lks knows, nbval compares those cells
like any other; otherwise the copy's first line becomes ``# NBVAL_IGNORE_OUTPUT``, so ``make test``
passes with and without a data directory. Prints which of the two it chose.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from lks.datadir import KNOWN_FILES
from lks.notebook import has_data, resolve_data_dir

REPO = Path(__file__).resolve().parents[1]
DATA_MARK, IGNORE_MARK = "# NBVAL_DATA", "# NBVAL_IGNORE_OUTPUT"
DATA_FILES = (*KNOWN_FILES, "mmlu/")


def missing_data(data_dir: Path) -> list[str]:
    """The benchmark files the committed notebook outputs read that ``data_dir`` lacks."""
    return [f for f in DATA_FILES if not has_data(f, data_dir)]


def ignore_data_cells(nb: dict) -> int:
    """Turn every ``# NBVAL_DATA`` first line into ``# NBVAL_IGNORE_OUTPUT`` (in place); how many."""
    n = 0
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "code" and src.startswith(DATA_MARK):
            cell["source"] = IGNORE_MARK + src[len(DATA_MARK):]
            n += 1
    return n


def main(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "results", dest / "results", dirs_exist_ok=True)
    (dest / "figures").mkdir(exist_ok=True)
    data_dir = resolve_data_dir()
    missing = missing_data(data_dir)
    n = 0
    for path in sorted((REPO / "notebooks").glob("0*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        n += ignore_data_cells(nb) if missing else 0
        (dest / "notebooks").mkdir(exist_ok=True)
        (dest / "notebooks" / path.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"nbval: data directory {data_dir} " + (f"lacks {', '.join(missing)}: the {n} data-dependent cells are not compared"
                                                  if missing else "holds every benchmark file: data-dependent cells are compared"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/nbval_copy.py DEST")
    main(Path(sys.argv[1]))
