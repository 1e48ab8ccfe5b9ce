"""FT-L's step: rows chunked shortest first (what the fit does, ``lks.baselines.ft.by_length``)
versus chunked in data order, measured in the same run (the steps interleaved).

    OMP_NUM_THREADS=1 python benchmarks/bench_ft.py --data zsre --n 640
    python benchmarks/bench_ft.py --data zsre --n 10000 --reps 0     # the padded positions only

Prints one JSON line: the token positions each arrangement pads to, the best step seconds of each
(forward and backward through the layers above FT-L's; the layers below run once per fit and are
not timed), their ratio, the largest difference of the two gradients relative to their largest
element, and the machine's CPU. The loss is a sum over rows, so the arrangements differ only by
float rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import lks
from lks.baselines.common import chunks, down_proj, encode_rows
from lks.baselines.ft import FTEditor, backward_nll, by_length, lower_parts
from lks.utils import machine

REPO = Path(__file__).resolve().parents[1]

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="zsre", help="zsre | counterfact")
p.add_argument("--n", type=int, default=640, help="edits (the data set's first N, conflicts dropped)")
p.add_argument("--reps", type=int, default=2, help="steps timed per arrangement, interleaved (0: count positions only)")
p.add_argument("--threads", type=int, default=1, help="torch threads")
p.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
args = p.parse_args()
torch.set_num_threads(args.threads)

model, tok = lks.load_model("smollm2-135m", device="cpu")
cfg = FTEditor(model, tok).config  # the registered layer and chunk size
edits, _ = lks.load_edits(args.data, data_dir=args.data_dir, n=args.n).drop_conflicts()
rows = encode_rows(tok, [r.prompt for r in edits], [r.subject for r in edits], list(range(len(edits))),
                   [r.target for r in edits])
arrangements = {"data_order": [[rows[j] for j in idx] for idx in chunks(len(rows), cfg.batch_rows)],
                "by_length": by_length(rows, cfg.batch_rows)}
positions = {f"positions_{k}": sum(max(len(r.ids) for r in c) * len(c) for c in v) for k, v in arrangements.items()}
head = {"data": args.data, "n": len(edits), "chunk_rows": cfg.batch_rows, "threads": torch.get_num_threads(), **positions}
if args.reps == 0:  # the padded token positions only
    print(json.dumps({**head, "cpu": machine()["cpu"]}))
    raise SystemExit
parts = {k: lower_parts(model, tok, v, cfg.layer) for k, v in arrangements.items()}
seconds = {k: [] for k in parts}
grads = {}
for _ in range(args.reps):
    for k, ps in parts.items():
        delta = torch.zeros_like(down_proj(model, cfg.layer).weight, requires_grad=True)
        t0 = time.perf_counter()
        backward_nll(model, ps, cfg.layer, delta)
        seconds[k].append(time.perf_counter() - t0)
        grads[k] = delta.grad
diff = (grads["by_length"] - grads["data_order"]).abs().max() / grads["data_order"].abs().max()
print(json.dumps({**head, **{f"step_s_{k}": round(min(v), 2) for k, v in seconds.items()},
                  "speedup": round(min(seconds["data_order"]) / min(seconds["by_length"]), 2),
                  "rel_max_grad_diff": float(diff), "cpu": machine()["cpu"]}))
