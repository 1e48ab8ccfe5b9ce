"""One cell of the baselines grid: fit a method on the first N edits of a data set, evaluate, and
write ``results/<model>/<dataset>/<method>-<N>.json`` (summary, config, fit seconds, peak RSS,
git commit). Resumable: a finished cell is skipped, a saved editor is reused.

    OMP_NUM_THREADS=1 python benchmarks/baseline_grid.py --data counterfact --method memit --n 100
    python benchmarks/baseline_grid.py --data zsre --method unedited --n 100

``unedited`` scores the model without any edit (the same metrics, edited = unedited).
Edits with the same subject and prompt but another target are dropped first (``on_conflict="first"``,
as in the LKS runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import lks
from lks.baselines import editor_class, load_editor
from lks.baselines.common import ApplyStats
from lks.metrics import evaluate_edits, teacher_forced
from lks.training.sequences import drop_conflicts
from lks.utils import write_json

REPO = Path(__file__).resolve().parents[1]


class Unedited:
    """An editor that edits nothing (the 'unedited' row)."""

    method, n_edits, fit_seconds = "unedited", 0, 0.0

    def __init__(self, model, tok) -> None:
        self.model, self.tokenizer = model, tok

    @contextmanager
    def applied(self, model=None):
        yield ApplyStats()


def neighborhood_score(editor, edits) -> float:
    """ROME's neighbourhood score (Meng et al. 2022, §3.2): on prompts about OTHER subjects with the
    edited relation, the edited model still prefers the true answer: P(true) > P(new target);
    mean over each edit's prompts, then over edits (nan without neighbourhood prompts)."""
    pairs = [(i, p, a) for i, r in enumerate(edits) for p, a in r.neighborhood]
    if not pairs:
        return float("nan")
    prompts = [p for _, p, _ in pairs]
    true = teacher_forced(editor.model, editor.tokenizer, prompts, [a for *_, a in pairs], context=editor.applied)
    new = teacher_forced(editor.model, editor.tokenizer, prompts, [edits[i].target for i, *_ in pairs],
                         context=editor.applied)
    per: dict[int, list[float]] = {}
    for (i, *_), t, n in zip(pairs, true, new):
        per.setdefault(i, []).append(float(t["logprob"] > n["logprob"]))
    return sum(sum(v) / len(v) for v in per.values()) / len(per)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="counterfact | zsre")
    p.add_argument("--method", required=True, choices=("unedited", "ft", "memit", "alphaedit"))
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--results", default=str(REPO / "results"))
    p.add_argument("--editors", default=str(REPO / "runs" / "editors"), help="where fitted editors are saved")
    args = p.parse_args()
    out = Path(args.results) / args.model / args.data / f"{args.method}-{args.n}.json"
    if out.is_file() and "neighborhood_score" in json.loads(out.read_text())["summary"]:
        print(f"{out} exists; skipped")
        return
    model, tok = lks.load_model(args.model, device="cpu")
    edits, dropped = drop_conflicts(lks.load_edits(args.data, data_dir=args.data_dir, n=args.n))
    saved = Path(args.editors) / args.model / args.data / f"{args.method}-{args.n}"
    if args.method == "unedited":
        editor = Unedited(model, tok)
    elif (saved / "config.json").is_file():
        editor = load_editor(str(saved), model, tok)
        if out.is_file():  # a finished cell from before the neighbourhood score: add it
            res = json.loads(out.read_text())
            res["summary"]["neighborhood_score"] = neighborhood_score(editor, edits)
            write_json(out, res)
            return
    else:
        editor = editor_class(args.method)(model, tok)
        editor.fit(edits)
        editor.save(saved)
    t0 = time.perf_counter()
    _, summary = evaluate_edits(editor, edits)
    summary["neighborhood_score"] = neighborhood_score(editor, edits)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "lks"], cwd=REPO, capture_output=True, text=True).stdout)
    cfg = getattr(editor, "config", None)
    write_json(out, {
        "model": args.model, "data": args.data, "n": args.n, "n_edits": len(edits), "dropped_conflicts": dropped,
        "method": args.method, "config": dataclasses.asdict(cfg) if cfg is not None else None,
        "fit_seconds": editor.fit_seconds, "eval_seconds": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "git_commit": commit + ("-dirty" if dirty else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "summary": summary,
    })
    print(json.dumps({k: summary.get(k) for k in ("reliability", "efficacy", "generality", "locality", "specificity")}))


if __name__ == "__main__":
    main()
