"""MEMIT/AlphaEdit target optimisation: all edits in one batched forward/backward per step versus
one edit at a time, measured in the same run (same steps, no early stop).

    OMP_NUM_THREADS=1 python benchmarks/bench_baselines.py --n 8 --steps 5

Prints one JSON line: seconds batched, seconds one at a time, their ratio, and the largest
difference between the two runs' target vectors. The problems are the same (tests/test_baselines.py
proves equality in float32 on the tiny model); in bfloat16 the padded batch rounds differently,
and Adam's normalised steps turn tiny gradient differences into steps of up to ``z_lr``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

import lks
from lks.baselines.memit import MEMITEditor, context_prefixes, target_vectors

REPO = Path(__file__).resolve().parents[1]

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--n", type=int, default=8, help="edits (CounterFact records 5000..)")
p.add_argument("--steps", type=int, default=5, help="optimisation steps")
p.add_argument("--precision", default="auto", help="float32 | bfloat16 | auto (the registered setting)")
p.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
args = p.parse_args()

model, tok = lks.load_model("smollm2-135m", device="cpu")
edits, _ = lks.load_edits("counterfact", data_dir=args.data_dir)[5000:5000 + args.n].drop_conflicts()
cfg = dataclasses.replace(MEMITEditor(model, tok).config, z_steps=args.steps, stop_nll=0.0,
                          precision=args.precision)
layer = cfg.layers[-1]
prefixes = context_prefixes(model, tok, cfg)
t0 = time.perf_counter()
z_batched, _ = target_vectors(model, tok, edits, cfg, layer, prefixes, progress=False)
batched = time.perf_counter() - t0
t0 = time.perf_counter()
z_single = torch.cat([target_vectors(model, tok, edits[i:i + 1], cfg, layer, prefixes, progress=False)[0]
                      for i in range(len(edits))])
single = time.perf_counter() - t0
print(json.dumps({"n": len(edits), "steps": args.steps, "threads": torch.get_num_threads(),
                  "batched_s": round(batched, 2), "one_at_a_time_s": round(single, 2),
                  "speedup": round(single / batched, 2),
                  "precision": args.precision, "max_abs_diff_z": float((z_batched - z_single).abs().max()),
                  "rel_diff_z": float((z_batched - z_single).norm() / z_single.norm())}))
