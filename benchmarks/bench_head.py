"""Training-step time with the fused output layer + losses (``lks.headloss``) vs the autograd version.

    python benchmarks/bench_head.py --n 1000 --steps 15 --rounds 4 --threads 2

One process, the registered recipe of ``smollm2-135m`` (bfloat16 + prefix cache on a CPU with AMX),
the first N CounterFact edits that ``fit`` accepts, one precompute, a generator with fixed random
weights (N(0, 0.02^2), so the edit changes the logits). Each round times the same ``--steps``
batches (fit's first-epoch order) once per variant, variants interleaved and their order reversed
every other round, so drift hits both alike; forward + backward of ``Trainer.batch_loss``, no
optimiser step (the generator stays fixed, so every round computes the same losses).

* **fused**: ``batch_loss`` as it is: ``lks.headloss.head_nll`` / ``head_topk_kl`` make the logits
  in chunks of ``lks.training.losses.HEAD_CHUNK`` rows and take their gradient in closed form.
* **autograd**: the same losses built from autograd ops, as ``batch_loss`` computed them before:
  ``F.cross_entropy`` / ``lks.training.losses.topk_kl`` on ``FastPath.logits`` (one float32
  ``[rows, vocab]`` tensor per loss, rows padded like the fused path's).

Printed: per round and variant the seconds per step and the summed loss (equal up to float
rounding), the first batch's losses and gradient (generator weights) of both, and the median
step time of each with the ratio autograd / fused.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

import lks  # noqa: E402
import lks.training.losses as E  # noqa: E402
from lks.config import model_spec  # noqa: E402
from lks.editor import LKSEditor  # noqa: E402
from lks.training import Trainer  # noqa: E402
from lks.training.sequences import edit_batches  # noqa: E402

MODEL = "smollm2-135m"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--n", type=int, default=1000, help="CounterFact edits (the first n that fit accepts)")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    spec = model_spec(MODEL)
    cfg = spec.train
    model, tok = lks.load_model(MODEL, device="cpu")
    edits, dropped = lks.load_edits("counterfact", data_dir=args.data_dir, n=args.n).drop_conflicts()
    editor = LKSEditor(model, tok, spec.editor)
    editor.train_config = cfg  # as fit() does
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for p in editor.generator.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    trainer = Trainer(editor, cfg).prepare(edits, 256, progress=False)
    seqs = trainer.seqs
    batches = edit_batches(trainer.per_edit, seqs, cfg.batch_size)
    random.Random(cfg.seed).shuffle(batches)  # fit's first-epoch order
    timed = batches[1:1 + args.steps]
    print(f"model {MODEL}, {len(edits)} CounterFact edits ({len(dropped)} conflicting dropped), {len(seqs)} sequences; "
          f"recipe: precision {cfg.precision}, prefix_cache {cfg.prefix_cache}, batch {cfg.batch_size}; "
          f"HEAD_CHUNK {E.HEAD_CHUNK}; {torch.get_num_threads()} thread(s); {len(timed)} timed steps per round")

    fused = (E.head_nll, E.head_topk_kl)

    def autograd_nll(h, weight, bias, target, chunk, pad):
        return F.cross_entropy(editor.fast.logits(h), target, reduction="none")

    def autograd_kl(h, weight, bias, ref_logp, ref_idx, ref_tail, chunk, pad):
        # topk_kl returns the mean over rows; batch_loss takes the mean of what this returns
        return E.topk_kl(ref_logp, ref_idx, ref_tail, editor.fast.logits(h)).expand(h.shape[0])

    variants = {"fused": fused, "autograd": (autograd_nll, autograd_kl)}

    def step(batch: list[int]) -> float:
        editor.generator.zero_grad(set_to_none=True)
        losses = trainer.batch_loss(batch)
        losses["total"].backward()
        return float(losses["total"].detach())

    times: dict[str, list[float]] = {k: [] for k in variants}
    with editor.fast.upper_pass(cfg.precision):
        first = {}
        for name, fns in variants.items():
            E.head_nll, E.head_topk_kl = fns
            losses = trainer.batch_loss(batches[0])
            losses["total"].backward()
            first[name] = ({k: float(v.detach()) for k, v in losses.items()},
                           torch.cat([p.grad.flatten() for p in editor.generator.parameters()]))
            editor.generator.zero_grad(set_to_none=True)
        (lf, gf), (la, ga) = first["fused"], first["autograd"]
        print("first batch: " + ", ".join(f"{k} {lf[k]:.6f} vs {la[k]:.6f}" for k in ("edit", "equiv", "loc", "total"))
              + f"; generator gradient: relative L2 difference {float((gf - ga).norm() / ga.norm()):.2e}")
        for r in range(args.rounds):
            order = list(variants.items()) if r % 2 == 0 else list(reversed(variants.items()))
            for name, fns in order:
                E.head_nll, E.head_topk_kl = fns
                step(batches[0])  # warm-up
                t0, total = time.perf_counter(), 0.0
                for b in timed:
                    total += step(b)
                times[name].append((time.perf_counter() - t0) / len(timed))
                print(f"round {r} {name:8s}: {times[name][-1]:.4f} s/step, summed loss {total:.6f}", flush=True)
    E.head_nll, E.head_topk_kl = fused
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median s/step: fused {med['fused']:.4f}, autograd {med['autograd']:.4f}; "
          f"speed-up of the step {med['autograd'] / med['fused']:.3f}x")
    print(f"total benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
