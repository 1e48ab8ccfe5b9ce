"""Markdown rows of weight-editor sweep points (the JSON lines of sweep_baselines.py), with the
update diagnostics each fit logged (lks.baselines.memit.layer_diagnostics / target_diagnostics):

    python experiments/sweep_table.py runs/s37/memit.jsonl [more.jsonl ...]

Columns: settings; reliability and efficacy (seen); generality, own paraphrase, locality,
specificity (held-out); score (harmonic mean of reliability, generality, locality); the share of
the target change the band realised; ||Delta||/||W|| at the band's first and last layer; the mean
leverage there; fit seconds.
"""

from __future__ import annotations

import json
import statistics
import sys


def score(d: dict) -> float:
    vals = [d["reliability"], d["generality"], d["locality"]]
    return 0.0 if min(vals) <= 0 else statistics.harmonic_mean(vals)


def row(d: dict) -> str:
    layers = [h for h in d["fit_log"] if "delta_rel" in h]
    end = [h["target_realised"] for h in d["fit_log"] if "target_realised" in h]
    first, last = (layers[0], layers[-1]) if layers else ({}, {})
    lev = "-" if "leverage" not in first else f"{first['leverage']:.2f} / {last['leverage']:.2f}"
    settings = " ".join(f"{k}={json.dumps(v)}" for k, v in d["set"].items()) or "registered"
    cells = [d["method"], settings, f"{d['reliability']:.3f}", f"{d.get('efficacy', float('nan')):.3f}",
             f"{d['generality']:.3f}", f"{d['generality_seen']:.3f}", f"{d['locality']:.3f}",
             f"{d.get('specificity', float('nan')):.3f}", f"{score(d):.3f}",
             f"{sum(end) / len(end):.2f}" if end else "-",
             f"{first['delta_rel']:.2f} / {last['delta_rel']:.2f}" if layers else "-", lev, f"{d['fit_seconds']:.0f}"]
    return "| " + " | ".join(cells) + " |"


print("| method | settings | rel. (seen) | efficacy (seen) | gen. (held-out) | own para. (held-out) | locality | "
      "specificity | score | target realised | ‖Δ‖/‖W‖ first / last layer | leverage first / last | fit s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    for line in open(path):
        print(row(json.loads(line)))
