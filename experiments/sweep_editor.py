"""One point of the editor's hyperparameter sweep: fit, evaluate, print (and append) one JSON line.

    python experiments/sweep_editor.py --data counterfact --n 100 --gen residual --wloc 1
    python experiments/sweep_editor.py --data zsre --n 100 --out runs/sweep.jsonl

Reliability / seen generality are on what training saw; ``generality`` is on held-out paraphrases
(``gen_n`` edits have one); locality and specificity are on held-out prompts (see lks/metrics.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import lks
from lks.config import EditorConfig, TrainConfig
from lks.metrics import evaluate_edits

REPO = Path(__file__).resolve().parents[1]

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="counterfact", help="counterfact | zsre | builtin | path")
p.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
p.add_argument("--n", type=int, default=100, help="first N edits")
p.add_argument("--gen", default="residual", help="linear | mlp | residual")
p.add_argument("--layer", type=int, default=20)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--bs", type=int, default=16, help="edits per step")
p.add_argument("--loc", type=int, default=4, help="locality prompts per subject")
p.add_argument("--locpos", default="after_subject", help="last | after_subject")
p.add_argument("--wloc", type=float, default=1.0, help="locality loss weight")
p.add_argument("--precision", default="auto", help="float32 | bfloat16 | auto")
p.add_argument("--templates", default="builtin", help="training locality templates: builtin | harvested | both")
p.add_argument("--prefix-cache", type=int, default=1, help="1: cache prefix keys/values (TrainConfig.prefix_cache)")
p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
p.add_argument("--out", default=None, help="append the JSON line to this file")
a = p.parse_args()

torch.set_num_threads(a.threads)
model, tok = lks.load_model("smollm2-135m", device="cpu")
edits = lks.load_edits(a.data, data_dir=a.data_dir, n=a.n)
editor = lks.LKSEditor(model, tok, EditorConfig(layer=a.layer, generator=a.gen))
cfg = TrainConfig(lr=a.lr, epochs=a.epochs, batch_size=a.bs, loc_per_subject=a.loc, loc_positions=a.locpos,
                  w_loc=a.wloc, precision=a.precision, prefix_cache=bool(a.prefix_cache), loc_templates=a.templates)
t = time.perf_counter()
hist = editor.fit(edits, cfg, progress=False)
fit_s = time.perf_counter() - t
t = time.perf_counter()
_, s = evaluate_edits(editor, edits)
keys = ["reliability", "reliability_base", "generality", "generality_base", "generality_seen", "locality",
        "locality_acc", "locality_acc_base", "specificity", "efficacy", "score"]
out = {"args": vars(a), "fit_s": round(fit_s, 1), "eval_s": round(time.perf_counter() - t, 1),
       "precompute_s": round(editor.precompute_seconds, 1), "last_epoch": {k: round(v, 3) for k, v in hist[-1].items()},
       **{k: round(s[k], 3) for k in keys}, "generality_split": s["generality_split"], "gen_n": s["generality_n"]}
print(json.dumps(out))
if a.out:
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(out) + "\n")
