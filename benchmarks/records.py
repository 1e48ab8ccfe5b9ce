"""Benchmark records: every measurement a benchmark makes is also written as one JSON file under
``benchmarks/results/`` (what ran, data set, edits, seconds, peak RSS, threads, machine, date,
commit), so that the numbers in ``benchmarks/README.md`` can be traced to a run.

    write_record("bench_memory", data="counterfact", edits=10000, seconds=1712.0, peak_rss_mib=5210.0,
                 threads=2, extra={...})
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
_CODE: dict[str, Any] = {}


def code_state() -> dict[str, Any]:
    """The checkout's commit and whether it is dirty (``lks.utils.git_state``), read at the first
    call and kept: a benchmark calls it when it starts, so a record names the code that ran even
    when commits land while it runs (they did, under a 40-minute 10,000-edit fit)."""
    if not _CODE:
        sys.path.insert(0, str(REPO))
        from lks.utils import git_state

        _CODE.update(git_state(REPO))
    return dict(_CODE)


def write_record(benchmark: str, *, data: str | None, edits: int | None, seconds: float, peak_rss_mib: float | None,
                 threads: int, extra: dict[str, Any] | None = None, folder: Path | None = None) -> Path:
    """Write one measurement as ``<folder>/<UTC time>-<benchmark>-<data>-<edits>.json`` and return its path."""
    sys.path.insert(0, str(REPO))
    from lks.utils import machine

    folder = folder if folder is not None else Path(os.environ.get("LKS_BENCH_RESULTS", RESULTS))
    folder.mkdir(parents=True, exist_ok=True)
    now = time.gmtime()
    record = {"benchmark": benchmark, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "data": data, "edits": edits, "seconds": round(seconds, 1),
              "peak_rss_mib": None if peak_rss_mib is None else round(peak_rss_mib, 1), "threads": threads,
              "machine": machine() | {"torch_threads": threads}, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", now),
              **code_state(), **(extra or {})}
    name = "-".join(str(x) for x in (time.strftime("%Y%m%dT%H%M%SZ", now), benchmark, data, edits) if x is not None)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(f".json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
