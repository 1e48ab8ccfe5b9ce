"""LKS rows of the baselines table from saved registered-recipe runs (docs/experiments.md, "The
recipe at 100 and 1,000 edits"): the summary written by ``python -m lks evaluate`` (``NAME.eval.json``),
the fit seconds from the train log (``NAME.log``), plus ROME's neighbourhood score computed here from
the saved editor (``NAME/``). Writes ``results/smollm2-135m/<dataset>/lks-100.json``.

    python benchmarks/baseline_lks_rows.py /work/main/runs/q   # holds cf100-a8w10-gp2*, zsre100-R*
"""
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from baseline_grid import neighborhood_score  # noqa: E402

import lks
from lks.editor import LKSEditor
from lks.training.sequences import drop_conflicts
from lks.utils import write_json

root = sys.argv[1] if len(sys.argv) > 1 else "/work/main/runs/q"
model, tok = lks.load_model("smollm2-135m", device="cpu")
for data, name in [("counterfact", "cf100-a8w10-gp2"), ("zsre", "zsre100-R")]:
    src = f"{root}/{name}"
    s = json.load(open(f"{src}.eval.json"))
    fit = float(re.findall(r'fit_seconds": ([0-9.]+)', open(f"{src}.log").read())[-1])
    edits, dropped = drop_conflicts(lks.load_edits(data, data_dir="/work/shared/data", n=100))
    ed = LKSEditor.load(src, model, tok)
    s["neighborhood_score"] = neighborhood_score(ed, edits)
    cfg = json.load(open(f"{src}/config.json"))
    write_json(f"results/smollm2-135m/{data}/lks-100.json", {
        "model": "smollm2-135m", "data": data, "n": 100, "n_edits": len(edits), "dropped_conflicts": dropped,
        "method": "lks", "config": {"editor": cfg["editor"], "train": cfg["train"]}, "fit_seconds": fit,
        "peak_rss_mb": None, "source": f"lead's run {name} (python -m lks train --data {data} --n 100 --on-conflict first "
        "--evaluate false; python -m lks evaluate --editor ... --fluency-n 100), registered recipe; fit on one thread "
        "beside other jobs; neighborhood_score computed from the saved editor by benchmarks/baseline_lks_rows.py",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "summary": s})
    print(data, s["neighborhood_score"])
