"""Markdown table of the baselines grid: ``results/<model>/<dataset>/<method>-<N>.json``.

    python benchmarks/baseline_table.py --n 100

Column definitions: lks/metrics.py. Reliability and efficacy are on the edit prompts (seen in
fitting); generality, locality and specificity on prompts no method fitted on (held-out).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLS = [("reliability", "rel. (seen)"), ("generality_seen", "own para. (held-out)"), ("generality", "gen. (held-out)"),
        ("generality_paraphrase_form", "gen. para. form"), ("generality_generation_form", "gen. gener. form"),
        ("locality", "locality"), ("specificity", "specificity"), ("efficacy", "efficacy"),
        ("paraphrase_success", "para. success"), ("neighborhood_score", "neighb. score")]


def fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def row(name: str, s: dict, fit: float | None, rss: float | None) -> str:
    cells = [fmt(s.get(k)) for k, _ in COLS]
    return f"| {name} | " + " | ".join(cells) + f" | {'-' if fit is None else f'{fit:.0f}'} | {'-' if rss is None else f'{rss:.0f}'} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=100)
    args = p.parse_args()
    for data in ("counterfact", "zsre"):
        print(f"\n**{data}**, first {args.n} records\n")
        print("| method | " + " | ".join(h for _, h in COLS) + " | fit s | peak RSS MB |")
        print("|---" * (len(COLS) + 3) + "|")
        for method in ("unedited", "ft", "memit", "alphaedit", "lks"):
            f = REPO / "results" / args.model / data / f"{method}-{args.n}.json"
            if f.is_file():
                r = json.loads(f.read_text())
                print(row(method, r["summary"], r["fit_seconds"], r["peak_rss_mb"]))


if __name__ == "__main__":
    main()
