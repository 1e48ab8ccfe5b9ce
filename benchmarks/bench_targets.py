"""MEMIT's target vectors (AlphaEdit reads the same): the registered settings' target optimisation
for the first N edits of each data set, one subprocess per data set, and where its time goes.

    python benchmarks/bench_targets.py --data counterfact,zsre --n 100 --threads 2
    python benchmarks/bench_targets.py --data zsre --n 500 --threads 2 --baseline /tmp/base   # another checkout, same run

Per data set it prints the seconds (the shared precompute, then the Adam steps), the work (steps,
and edit-steps: the edits still running, summed over the steps, at most N x ``z_steps``; an edit
stops once its mean target NLL is below ``stop_nll``), milliseconds per edit-step, a row's target
tokens and suffix tokens (the edited token and those after it, which the steps run through the
upper layers), and peak RSS; with several data sets each one's ratios against the first,
with ``--baseline`` this checkout's against the other's. 10,000 edits at the measured seconds per
edit are printed as [PROJECTED]. The grid optimises 500 edits per cached chunk
(``lks.baselines.memit.TARGET_CHUNK``), so ``--n 500`` times one chunk. Nothing is read from or
written to the lks cache. Each measurement is also a JSON record under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from bench_memory import end_with_parent, first_without_conflicts, peak_rss, run_child  # noqa: E402
from records import code_state, write_record  # noqa: E402  (benchmarks/records.py)


def child(data: str, args: argparse.Namespace) -> dict:
    """One data set's targets, in a fresh process."""
    import torch

    torch.set_num_threads(args.threads)
    if args.lks_root:  # --baseline: the other checkout's lks
        sys.path.insert(0, args.lks_root)
    import lks
    import lks.baselines.memit as memit

    model, tok = lks.load_model("smollm2-135m", device="cpu")
    edits, _ = first_without_conflicts(lks.load_edits(data, data_dir=args.data_dir), args.n, data)
    cfg = memit.MEMITEditor(model, tok).config  # the registered settings
    prefixes = memit.context_prefixes(model, tok, cfg)
    steps_s, real = [0.0], memit._optimise

    def timed(*a, **k):  # the Adam steps; the rest of target_vectors is the shared precompute
        t = time.perf_counter()
        real(*a, **k)
        steps_s[0] += time.perf_counter() - t

    memit._optimise = timed
    history: list = []
    t0 = time.perf_counter()
    memit.target_vectors(model, tok, edits, cfg, cfg.layers[-1], prefixes, progress=False, history=history)
    seconds = time.perf_counter() - t0
    steps = [h for h in history if "step" in h]
    n = len(edits)
    # lks.baselines.memit.edit_steps; a --baseline checkout from before it (edits not in its history) counts here
    edit_steps = memit.edit_steps(history)[1] if hasattr(memit, "edit_steps") else \
        n + sum(n - h["done"] for h in steps[:-1])
    rows = memit._edit_rows(tok, edits, prefixes, with_target=True)  # the rows the steps run
    return {"data": data, "n": n, "threads": torch.get_num_threads(), "lks_file": lks.__file__,
            "seconds": seconds, "steps_s": steps_s[0], "precompute_s": seconds - steps_s[0],
            "steps": len(steps), "z_steps": cfg.z_steps, "edit_steps": edit_steps,
            "ms_per_edit_step": 1000 * steps_s[0] / max(edit_steps, 1),
            "done_at_end": steps[-1]["done"] if steps else 0,
            "target_tokens": sum(len(r.tgt_pos) for r in rows) / len(rows),
            "suffix_tokens": sum(len(r.ids) - r.subj for r in rows) / len(rows), "peak_rss_mib": peak_rss() / 2**20}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--data", default="counterfact,zsre", help="edit sets, comma-separated (their first N records)")
    ap.add_argument("--n", type=int, default=100, help="edits per data set (the grid's chunk: 500)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--no-record", action="store_true", help="do not write JSON records under benchmarks/results/")
    ap.add_argument("--baseline", default=None, help="a checkout to compare with (git worktree add /tmp/base REV): "
                                                     "each data set runs there first, then here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lks-root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        end_with_parent()
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return
    code_state()  # the code that ran, read before the first measurement
    first = None
    for data in args.data.split(","):
        cmd = [sys.executable, __file__, "--child", data, "--n", str(args.n), "--threads", str(args.threads),
               "--data-dir", args.data_dir]
        base = run_child(cmd + ["--lks-root", str(Path(args.baseline).resolve())], data) if args.baseline else None
        r = run_child(cmd, data)
        print(f"{data}, {r['n']} edits, {r['threads']} threads: {r['seconds']:.0f} s (precompute {r['precompute_s']:.0f}, "
              f"steps {r['steps_s']:.0f}); {r['steps']} of {r['z_steps']} steps, {r['edit_steps']:,} edit-steps "
              f"({r['edit_steps'] / (r['n'] * r['z_steps']):.0%} of every edit running every step; "
              f"{r['done_at_end']} of {r['n']} edits below the stop NLL at the end), {r['ms_per_edit_step']:.1f} ms "
              f"per edit-step; a row's target {r['target_tokens']:.1f} tokens, the "
              f"edited token and those after it {r['suffix_tokens']:.1f}; peak RSS {r['peak_rss_mib']:.0f} MiB; 10,000 edits [PROJECTED]: "
              f"{r['seconds'] / r['n'] * 10_000 / 60:.0f} min")
        extra = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()
                 if k not in ("seconds", "lks_file", "data", "n", "threads", "peak_rss_mib")}
        if base:
            print(f"  against the baseline ({base['lks_file']}): {base['seconds'] / r['seconds']:.2f}x faster, "
                  f"edit-steps {base['edit_steps']:,} there")
            extra["baseline"] = {"checkout": args.baseline, "seconds": round(base["seconds"], 1),
                                 "edit_steps": base["edit_steps"]}
        if first:
            print(f"  against {first['data']}: {r['seconds'] / r['n'] / (first['seconds'] / first['n']):.2f}x the seconds "
                  f"per edit, {r['edit_steps'] / r['n'] / (first['edit_steps'] / first['n']):.2f}x the edit-steps per "
                  f"edit, {r['ms_per_edit_step'] / first['ms_per_edit_step']:.2f}x the ms per edit-step")
        first = first or r
        if not args.no_record:
            path = write_record("bench_targets", data=data, edits=r["n"], seconds=r["seconds"],
                                peak_rss_mib=r["peak_rss_mib"], threads=r["threads"], extra=extra)
            print(f"  record: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
