"""Points of a weight-editing baseline's sweep: fit on records that are never evaluated, score,
print (and append) one JSON line per point.

    python experiments/sweep_baselines.py --method memit --start 5000 --n 100 --set lam=5000 layers=[3,4,5,6,7]
    python experiments/sweep_baselines.py --method ft --set layer=6 bound=1e-3 --out runs/sweep_baselines.jsonl
    python experiments/sweep_baselines.py --method alphaedit --n 1000 --set --set threshold=0.03 --set alpha=10

Each ``--set`` is one point (overrides of the registered settings; a bare ``--set`` is the
registered point); the points run in one process and share the unedited model's scores.

The records are ``[start, start + n)`` of the LKS-format file (default 5000-5099: the acceptance
runs evaluate the first 100). Reliability and efficacy are on the edit prompt (seen in fitting);
generality, locality and specificity on held-out prompts (see lks/metrics.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
from pathlib import Path

import torch

import lks
from lks.methods import editor_class
from lks.metrics import UneditedMemo, evaluate_edits
from lks.utils import git_state

REPO = Path(__file__).resolve().parents[1]
KEYS = ("reliability", "efficacy", "generality", "generality_seen", "generality_paraphrase_form", "paraphrase_success",
        "locality", "specificity", "reliability_base", "efficacy_base")

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--method", required=True, choices=("ft", "memit", "alphaedit", "alphaedit-seq"))
p.add_argument("--data", default="counterfact", help="counterfact | zsre | path")
p.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
p.add_argument("--start", type=int, default=5000, help="first record (never evaluated elsewhere)")
p.add_argument("--n", type=int, default=100, help="records")
p.add_argument("--set", nargs="*", action="append", default=None,
               help="one point: config overrides key=JSON value, e.g. lam=5000 layers=[3,4,5] (repeat for more points)")
p.add_argument("--eval-n", type=int, default=0, help="evaluate only the first EVAL_N edited records (0: all)")
p.add_argument("--out", default=None, help="append the JSON line to this file")
args = p.parse_args()
# the fits' progress lines (target chunks with time to go, FT-L epochs, sequential batches) on stderr
logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
logging.getLogger("lks").setLevel(logging.INFO)

model, tok = lks.load_model("smollm2-135m", device="cpu")
edits, _ = lks.load_edits(args.data, data_dir=args.data_dir)[args.start:args.start + args.n].drop_conflicts()
cls = editor_class(args.method)
base = cls(model, tok).config
memo = UneditedMemo()
state = git_state(REPO)  # the code each point ran (its modules are imported at the start)
for point in args.set or [[]]:
    over = {k: json.loads(v) for k, v in (item.split("=", 1) for item in point)}
    cfg = type(base)(**{**dataclasses.asdict(base), **over})
    editor = cls(model, tok, cfg)
    editor.fit(edits, progress=False)
    _, s = evaluate_edits(editor, edits[:args.eval_n] if args.eval_n else edits, memo=memo)
    line = {"method": args.method, "data": args.data, "records": [args.start, args.start + args.n],
            "evaluated": s["n_edits"], "set": over, **state,
            "threads": torch.get_num_threads(),
            **{k: round(s[k], 4) for k in KEYS if k in s}, "fit_seconds": round(editor.fit_seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "fit_log": [h for h in editor.history if "step" in h][-1:] + [h for h in editor.history if "step" not in h]}
    print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")
