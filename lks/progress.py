"""What a long run tells its user while it runs: each step's progress appended to its own log file
(:func:`step_log`), the ETA of the steps left (:class:`Pace`, for :mod:`lks.grid` and
:mod:`lks.cluster`) and a fit's time to go (:func:`to_go`, :class:`ToGo`, for the baselines' logs)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Pace:
    """The ETA of the steps left, from the finished ones: an edit step at the seconds per edit of
    the finished edit steps (sizes differ by 1,000x), a capability step (or the unedited run) at
    their mean seconds, a shared step (key statistics) at the shared steps' own mean: one read
    from a cache takes 0 s and must not pace a capability step."""

    def __init__(self) -> None:
        self.edit_seconds, self.edit_n, self.other = 0.0, 0, {}

    @staticmethod
    def _group(step: Any) -> str:
        return "shared" if step.kind == "shared" else "capability"

    def add(self, step: Any, seconds: float) -> None:  # a :class:`lks.grid.Step`
        if step.kind == "edit":
            self.edit_seconds, self.edit_n = self.edit_seconds + seconds, self.edit_n + step.cell.n
        else:
            self.other.setdefault(self._group(step), []).append(seconds)

    def eta(self, left: Sequence[Any], workers: int = 1) -> str:
        """``"; ETA 14:05 UTC (about 2.1 h, for 5 of 7 steps left)"``, or "" with no step left."""
        if not left:
            return ""
        known, total = 0, 0.0
        for step in left:
            done = self.other.get(self._group(step), [])
            if step.kind == "edit" and self.edit_n:
                known, total = known + 1, total + self.edit_seconds / self.edit_n * step.cell.n
            elif step.kind != "edit" and done:
                known, total = known + 1, total + sum(done) / len(done)
        if not known:
            return f"; {len(left)} step(s) left"
        total /= max(1, min(workers, len(left)))
        when = time.strftime("%H:%M UTC", time.gmtime(time.time() + total))
        span = f"{total / 3600:.1f} h" if total >= 5400 else f"{total / 60:.0f} min"
        return f"; ETA {when} (about {span}" + (f", for {known} of {len(left)} steps left)" if known < len(left) else ")")


def to_go(seconds: float, done: int, total: int) -> str:
    """``"12 s; about 130 s to go"``: a progress line's time so far and the rest at the same pace."""
    return f"{seconds:.0f} s; about {seconds / max(done, 1) * (total - done):.0f} s to go"


class ToGo:
    """A fit's time to go, paced on the work done in this process only: work read back from a
    cache (a resumed fit) takes no time and must not dilute the pace of what is left."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.fresh, self.spent = total, 0, 0, 0.0

    def step(self, items: int, seconds: float, cached: bool = False) -> str:
        """Count ``items`` more done in ``seconds``; ``cached``: read back, not computed here."""
        self.done += items
        if not cached:
            self.fresh, self.spent = self.fresh + items, self.spent + seconds
        if not self.fresh:
            return "none computed in this run yet"
        return f"computed in this run {to_go(self.spent, self.fresh, self.fresh + self.total - self.done)}"


@contextmanager
def step_log(path: Path, logger: str) -> Iterator[logging.Logger]:
    """Append the lks loggers' INFO lines (fit progress) to ``path`` for the block; yields the logger
    named ``logger`` (the caller's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root, handler = logging.getLogger("lks"), logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    level = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield logging.getLogger(logger)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
