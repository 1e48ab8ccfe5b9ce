"""How much room AlphaEdit's null space leaves on a model: per band layer, the spectrum of the
keys' second moment ``E[k k^T]`` (the cached corpus statistics MEMIT and AlphaEdit use), the
null space's dimension at each threshold, the share of the corpus keys' energy inside it (what
AlphaEdit assumes is ~0: ``sum of eigenvalues below the threshold / trace``), and the share of the
edit keys' energy inside it (what is left for the edits to use).

    OMP_NUM_THREADS=1 python experiments/null_space.py --data counterfact --n 1000 --thresholds 0.003 0.01 0.03

Keys are those of the fit (``lks.baselines.memit.keys_and_outputs``: down_proj inputs at the
subject's last token, averaged over the edit prompt and the random-prefix contexts) under the
unedited weights, for the first ``n`` records (conflicts dropped), as the grid's cells use them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import lks
from lks.baselines.alphaedit import AlphaEditConfig, null_space_projector
from lks.baselines.common import method_config
from lks.baselines.memit import _edit_rows, context_prefixes, keys_and_outputs
from lks.baselines.stats import key_second_moment

REPO = Path(__file__).resolve().parents[1]

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--data", default="counterfact", help="counterfact | zsre | path")
p.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
p.add_argument("--n", type=int, default=1000, help="the first n records' keys")
p.add_argument("--thresholds", type=float, nargs="+", default=[0.003, 0.01, 0.03])
args = p.parse_args()

model, tok = lks.load_model(args.model, device="cpu")
cfg = method_config(AlphaEditConfig, model, "alphaedit")
stats = key_second_moment(model, tok, cfg.layers, cfg.cov_tokens, corpus=cfg.corpus, progress=False)
edits, _ = lks.load_edits(args.data, data_dir=args.data_dir, n=args.n).drop_conflicts()
rows = _edit_rows(tok, edits, context_prefixes(model, tok, cfg), with_target=False)
print(f"{args.model}, {args.data}: keys of the first {len(edits)} edits; registered threshold {cfg.threshold:g}; "
      f"E[kk^T] from {cfg.cov_tokens} tokens of {cfg.corpus}")
print("layer  dim  eig min / median / max      threshold  null dim  corpus energy in null  edit-key energy in null")
for layer in cfg.layers:
    K, _ = keys_and_outputs(model, tok, rows, len(edits), layer, cfg.layers[-1], cfg.batch_rows)
    C, Kd = stats[layer].double(), K.double()
    evals = torch.linalg.eigvalsh(C)
    spec = f"{float(evals.min()):.1e} / {float(evals.median()):.1e} / {float(evals.max()):.1e}"
    for t in args.thresholds:
        P = null_space_projector(C, t).double()  # AlphaEdit's own projector (eq. 8)
        corpus = float(torch.trace(P @ C) / torch.trace(C))  # = eigenvalues below t / all of them
        keys = float((((Kd @ P) * Kd).sum(1) / (Kd * Kd).sum(1)).mean())  # k^T P k / k^T k per edit
        dim = round(float(torch.trace(P)))
        print(f"{layer:5d} {len(evals):4d}  {spec:26s} {t:9.3g} {dim:9d} {corpus:22.3f} {keys:24.3f}")
