"""Epoch time of ``fit`` for several step-shape settings: length buckets and padding quanta.

    python benchmarks/bench_shapes.py --n 1000 --epochs 2 --threads 2 --reps 2 \
        --settings 3:1,1,1,1 3:8,2,4,32 2:8,2,4,32 2:1,1,1,1

A setting ``B:r,t,p,l`` sets ``lks.training.fastpath.LENGTH_BUCKETS = B`` and ``lks.training.precision.SHAPE_QUANTA = (r, t, p, l)``
(rows, suffix tokens, prefix tokens, logit rows; ``1,1,1,1`` = exact shapes). Each setting is fitted
in its own subprocess (the oneDNN kernel cache is per process, so settings must not share one),
with the registered recipe on the first N CounterFact edits; the settings are run in the given
order, ``--reps`` times round-robin, so drift of a shared machine hits them alike. Printed: each
run's epoch seconds and training losses (equal across settings up to float rounding: padding
changes no loss), then the mean epoch time per setting and its ratio to the first setting.

``--count`` fits nothing: per setting it counts the distinct shapes one epoch of ``fit`` sends
through the upper layers (the batches are fixed, so every epoch has the same set): (rows, suffix,
prefix) blocks, token counts per block, logit-row counts, and padded tokens per real token.

    python benchmarks/bench_shapes.py --count --n 10000 --settings 2:1,1,1,1 2:8,2,4,32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from bench_memory import first_without_conflicts, run_child  # noqa: E402 (this script's own folder)


def parse(setting: str) -> tuple[int, tuple[int, ...]]:
    buckets, quanta = setting.split(":")
    q = tuple(int(x) for x in quanta.split(","))
    if len(q) != 4 or min(q) < 1 or int(buckets) < 1:
        raise SystemExit(f"bad setting {setting!r}: expected B:r,t,p,l with positive integers")
    return int(buckets), q


def child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import lks
    import lks.training.fastpath as FP
    import lks.training.precision as PR
    from lks.config import model_spec
    from lks.editor import LKSEditor

    FP.LENGTH_BUCKETS, PR.SHAPE_QUANTA = parse(args.child)
    model, tok = lks.load_model("smollm2-135m", device="cpu")
    edits, _ = first_without_conflicts(lks.load_edits("counterfact", data_dir=args.data_dir), args.n)
    spec = model_spec("smollm2-135m")
    editor = LKSEditor(model, tok, spec.editor)
    editor.fast.quantize_shapes = PR.SHAPE_QUANTA != (1, 1, 1, 1)  # forced (the library pads only bf16 on CPU)
    cfg = dataclasses.replace(spec.train, epochs=args.epochs, **({"precision": args.precision} if args.precision else {}))
    editor.fit(edits, cfg, progress=False)
    return {"setting": args.child, "epoch_s": [h["seconds"] for h in editor.history],
            "loss": [h["loss"] for h in editor.history], "precision": editor.precision_used}


def count(args: argparse.Namespace) -> None:
    """Distinct step shapes of one epoch per setting (tokeniser only: no layer runs)."""
    import lks
    from lks.config import model_spec
    from lks.scope import ScopeIndicator
    from lks.training.fastpath import step_blocks
    from lks.training.precision import quantized_shape, round_up
    from lks.training.sequences import build_sequences, edit_batches

    model, tok = lks.load_model("smollm2-135m", device="cpu")
    edits, _ = first_without_conflicts(lks.load_edits("counterfact", data_dir=args.data_dir), args.n)
    spec = model_spec("smollm2-135m")
    scope = ScopeIndicator(list(dict.fromkeys(r.subject for r in edits)))  # no feature pass
    per_edit, seqs, _ = build_sequences(tok, scope, edits, spec.train)
    batches = edit_batches(per_edit, seqs, spec.train.batch_size)
    print(f"N={len(edits)} CounterFact edits, {len(seqs)} sequences, {len(batches)} steps per epoch (prefix cache on)")
    for setting in args.settings:
        n_buckets, quanta = parse(setting)
        blocks, tokens, logit_rows, padded, real = set(), set(), set(), 0, 0
        for batch in batches:
            rows = {"nll": 0, "kl": 0}
            for block in step_blocks(seqs, batch, True, n_buckets):  # as batch_loss runs them, prefix cache on
                # the continuation after the target is generated later (FastPath.precompute): its
                # full length counts here (one cut short by an end-of-sequence token is shorter)
                run = [len(seqs[j].ids) + seqs[j].to_continue - seqs[j].subj_pos for j in block]
                B, T, P = quantized_shape(len(block), max(run), max(seqs[j].subj_pos for j in block), quanta)
                blocks.add((B, T, P))
                tokens.add(B * T)
                padded += B * T
                real += sum(run)
                for j in block:  # the first len(loss_tgt) loss positions are NLL rows, the rest KL rows
                    rows["nll"] += len(seqs[j].loss_tgt)
                    rows["kl"] += len(seqs[j].loss_pos) - len(seqs[j].loss_tgt)
            logit_rows.update(round_up(r, quanta[3]) for r in rows.values() if r)
        print(f"  {setting:>12s}: {len(blocks)} (rows, suffix, prefix) blocks, {len(tokens)} token counts, "
              f"{len(logit_rows)} logit-row counts; padded / real tokens {padded / real:.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--precision", default=None, help="override the recipe's precision (float32 | bfloat16 | auto)")
    ap.add_argument("--settings", nargs="+", default=["3:1,1,1,1", "3:8,2,4,32", "2:8,2,4,32", "2:1,1,1,1"])
    ap.add_argument("--count", action="store_true", help="count each setting's distinct step shapes; fit nothing")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.count:
        for s in args.settings:
            parse(s)
        count(args)
        return
    if args.child is not None:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    for s in args.settings:
        parse(s)
    print(f"N={args.n} CounterFact edits, registered recipe, {args.epochs} epochs, {args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    runs: dict[str, list[float]] = {s: [] for s in args.settings}
    for rep in range(args.reps):
        for s in args.settings:
            cmd = [sys.executable, __file__, "--child", s, "--n", str(args.n), "--epochs", str(args.epochs),
                   "--threads", str(args.threads), "--data-dir", args.data_dir]
            cmd += ["--precision", args.precision] if args.precision else []
            t0 = time.perf_counter()
            r = run_child(cmd, f"setting {s}")
            runs[s].extend(r["epoch_s"])
            print(f"  rep {rep + 1} {s:>12s}: epochs {[round(x, 1) for x in r['epoch_s']]} s, loss "
                  f"{[round(x, 4) for x in r['loss']]} ({r['precision']}; {time.perf_counter() - t0:.0f} s in all)",
                  flush=True)
    base = sum(runs[args.settings[0]]) / len(runs[args.settings[0]])
    print("\nmean epoch time per setting (ratio: first setting / this one):")
    for s, xs in runs.items():
        m = sum(xs) / len(xs)
        print(f"  {s:>12s}: {m:6.1f} s  ({base / m:.2f}x)")


if __name__ == "__main__":
    main()
