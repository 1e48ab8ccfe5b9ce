"""Score an LKS fit from the train state it checkpointed (``bench_memory.py --keep DIR`` keeps one per
size: ``DIR/cf-N``), without fitting again: the editor's scope and features are rebuilt for the same
edits (the first N records that ``fit`` accepts, as bench_memory takes them) and the checkpoint's
generator is loaded. Prints one JSON line (and appends it to ``--out``).

    python experiments/eval_train_state.py runs/s36/editors-cf3/cf-10000 --n 10000 --eval-first 1000 --fluency-n 100

A saved editor's folder (``config.json``, e.g. a grid cell's ``runs/editors/smollm2-135m/counterfact/lks-10000``)
is scored the same way, loaded as saved:

    python experiments/eval_train_state.py runs/editors/smollm2-135m/counterfact/lks-10000 --n 10000 --eval-first 1000 --fluency-n 100

``--eval-first K`` scores the first K edits (the grid's 10,000-edit cells before issue 37 scored
the first 1,000, generation on the first 100), with all N edits in the editor. Reliability and
efficacy are on the edit prompts (seen in training); generality, locality and specificity on
held-out prompts (lks/metrics.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("state", help="folder holding train_state.json / train_state.safetensors, or a saved editor")
p.add_argument("--data", default="counterfact", choices=("counterfact", "zsre"))
p.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
p.add_argument("--n", type=int, default=10000, help="edits the fit saw: the first N accepted records")
p.add_argument("--eval-first", type=int, default=1000, help="edits scored (the first K of the N)")
p.add_argument("--fluency-n", type=int, default=100, help="of those, the first F continued freely (generation metrics)")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--out", help="append the JSON line to this file")
a = p.parse_args()

import torch  # noqa: E402
from bench_memory import first_without_conflicts  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import lks  # noqa: E402
from lks.config import (  # noqa: E402
    TrainConfig,  # noqa: E402
    from_dict,
    model_spec,
)
from lks.data import EditSet  # noqa: E402
from lks.editor import LKSEditor  # noqa: E402
from lks.hypernet import make_generator  # noqa: E402
from lks.metrics import evaluate_edits  # noqa: E402

torch.set_num_threads(a.threads)
model, tok = lks.load_model("smollm2-135m", device="cpu")
edits, _ = first_without_conflicts(lks.load_edits(a.data, data_dir=a.data_dir), a.n, a.data)
if (Path(a.state) / "train_state.json").is_file():
    state = json.loads((Path(a.state) / "train_state.json").read_text())
    if state["data_checksum"] != edits.checksum():
        sys.exit(f"{a.state}: the checkpoint was fitted on other edits than the first {a.n} accepted {a.data} records")
    spec = model_spec("smollm2-135m")
    cfg = from_dict(TrainConfig, state["train"], f"{a.state}/train_state.json:train")
    ed = LKSEditor(model, tok, spec.editor)
    ed.train_config = cfg  # the fit's recipe: which paraphrase is held out, the precision of the features
    ed.set_edits(edits, cfg)
    ed.generator = make_generator(spec.editor.generator, ed.d, spec.editor.mlp_ratio)
    tensors = load_file(str(Path(a.state) / "train_state.safetensors"))
    ed.generator.load_state_dict({k[len("generator."):]: v for k, v in tensors.items() if k.startswith("generator.")})
    ed.generator.eval()
else:  # a saved editor: its own subjects and recipe
    ed = LKSEditor.load(a.state, model, tok)
    state = {"epoch": len(ed.history), "history": ed.history}
    if ed.data_checksum != edits.checksum():
        sys.exit(f"{a.state}: the editor holds other edits than the first {a.n} accepted {a.data} records")
t0 = time.perf_counter()
_, s = evaluate_edits(ed, EditSet(edits.records[:a.eval_first]), fluency_n=a.fluency_n)
keys = ("reliability", "efficacy", "generality", "generality_n", "locality", "specificity", "repeat_rate", "repeat_rate_n",
        "gen_reliability", "score")
line = {"state": a.state, "data": a.data, "edits": len(edits), "epochs_done": state["epoch"], "evaluated": a.eval_first,
        "fluency_n": a.fluency_n, "eval_seconds": round(time.perf_counter() - t0, 1), **{k: s.get(k) for k in keys},
        "history": state["history"]}
print(json.dumps(line))
if a.out:
    with open(a.out, "a") as f:
        f.write(json.dumps(line) + "\n")
