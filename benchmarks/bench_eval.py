"""Benchmark of the evaluation's teacher-forced scoring (``lks.metrics.teacher_forced``).

Usage::

    python benchmarks/bench_eval.py [--data counterfact] [--n 200] [--threads 2] [--repeats 3]

Takes the teacher-forced pairs an evaluation of the first N edits scores (``evaluate_edits``: edit
prompt, held-out paraphrases, same-subject locality, specificity), on the unedited embedded model,
and times two forms on them, alternating, in one process:

* **head where needed** (``teacher_forced``): the vocabulary head and its log-softmax only at the
  positions that predict a target token;
* **full head** (the form before 2026-12-07, kept here as the baseline): the head and log-softmax
  at every position of every row.

Prints seconds per form (the best of ``--repeats``), the ratio full / head-where-needed, and the two
forms' agreement (largest log-prob difference, predictions that differ), and writes one record under
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing
sys.path.insert(0, str(REPO / "benchmarks"))


def full_head(model, tokenizer, prompts, targets, batch_size: int = 32) -> list[dict]:
    """The baseline: the same pairs, batches and target positions, the head at every position."""
    import torch

    from lks.utils import length_batches, pad_ids

    enc = tokenizer([f"{p} {t}" for p, t in zip(prompts, targets)], return_offsets_mapping=True)
    items = [(ids, [j for j, (s, e) in enumerate(offs) if s >= len(p) and e > s and j > 0])
             for ids, offs, p in zip(enc["input_ids"], enc["offset_mapping"], prompts)]
    out: list[dict] = [{"logprob": float("nan"), "pred": []} for _ in items]
    with torch.inference_mode():
        for idx in length_batches([len(ids) for ids, _ in items], batch_size):
            idx = [i for i in idx if items[i][1]]
            if not idx:
                continue
            ids, mask = pad_ids([items[i][0] for i in idx], tokenizer.pad_token_id, "cpu")
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
            for r, i in enumerate(idx):
                tgt = items[i][1]
                lp = logp[r, torch.tensor(tgt) - 1]
                true = torch.tensor([items[i][0][j] for j in tgt])
                out[i] = {"logprob": float(lp.gather(-1, true[:, None]).sum()), "pred": lp.argmax(-1).tolist()}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--data", default="counterfact")
    ap.add_argument("--n", type=int, default=200, help="edits whose evaluation pairs are scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch
    from records import code_state, write_record

    import lks
    from lks.metrics import _prompt_pairs, teacher_forced

    code_state()
    torch.set_num_threads(args.threads)
    model, tok = lks.load_model("smollm2-135m", device="cpu")
    edits, _ = lks.load_edits(args.data, data_dir=args.data_dir)[:args.n].drop_conflicts()
    pairs = [pair for kind, ps in _prompt_pairs(list(edits)).items() if kind in ("rel", "gen", "seen", "loc", "nb")
             for pair in ps]
    prompts, targets = [p for _, p, _ in pairs], [t for _, _, t in pairs]
    print(f"{args.data}, {len(edits)} edits: {len(pairs)} teacher-forced pairs; {args.threads} threads")

    forms = {"head where needed": lambda: teacher_forced(model, tok, prompts, targets),
             "full head": lambda: full_head(model, tok, prompts, targets)}
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    results = {}
    for _ in range(args.repeats):
        for name, run in forms.items():
            t0 = time.perf_counter()
            results[name] = run()
            seconds[name].append(time.perf_counter() - t0)
    best = {name: min(s) for name, s in seconds.items()}
    new, old = results["head where needed"], results["full head"]
    scored = [(a, b) for a, b in zip(new, old) if b["pred"]]
    diff = max(abs(a["logprob"] - b["logprob"]) for a, b in scored)
    preds = sum(a["pred"] != b["pred"] for a, b in scored)
    ratio = best["full head"] / best["head where needed"]
    for name, s in seconds.items():
        print(f"  {name}: {best[name]:.1f} s (runs: {', '.join(f'{x:.1f}' for x in s)})")
    print(f"  ratio full / where needed: {ratio:.2f}x; largest log-prob difference {diff:.2e}; "
          f"{preds} of {len(scored)} predictions differ")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path = write_record("bench_eval", data=args.data, edits=len(edits), seconds=best["head where needed"],
                        peak_rss_mib=peak, threads=args.threads,
                        extra={"pairs": len(pairs), "seconds_full_head": round(best["full head"], 2),
                               "runs": {k: [round(x, 2) for x in v] for k, v in seconds.items()}, "ratio": round(ratio, 3),
                               "max_logprob_diff": diff, "pred_diff": preds})
    print(f"record: {path}")


if __name__ == "__main__":
    main()
