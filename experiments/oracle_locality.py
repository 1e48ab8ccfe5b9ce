"""Upper bound of same-subject locality for a knowledge-block edit: one free vector per subject.

    python experiments/oracle_locality.py --layer 20 --loc 4 --wloc 1 --n 30
    python experiments/oracle_locality.py --layer 20 --loc 12 --wloc 3 --n 30 --out runs/oracle.jsonl
    python experiments/oracle_locality.py --data zsre --loc 12 --wloc 3 --n 30

For each of the first ``--n`` edits of ``--data`` (CounterFact by default), a vector ``delta`` (d floats, no hypernetwork) is
added to the subject's last-token state at the output of ``--layer``, and optimised alone with the
editor's own objective: mean NLL of the new target after the edit prompt + ``--wloc`` x KL(unedited
|| edited) over the positions from the subject on of ``--loc`` training locality prompts
(``lks.training.prompts.training_locality_prompts``, the registered templates). Adam, ``--steps`` full-model
steps. No generator shared across subjects can fit a subject better than its own free vector under
the same loss, so these numbers bound what ``LKSEditor`` can reach with that loss at that layer
(up to optimisation).

Printed (means over edits; held-out = never in the optimised loss):
* ``rel``: reliability, seen (teacher-forced top-1 accuracy of the target tokens);
* ``loc``: same-subject locality, held-out (top-1 agreement with the unedited model on the answer
  tokens of the data set's locality prompt, as ``lks.metrics``);
* ``loc_unseen_tmpl``: next-token agreement on 8 further template prompts of the subject, held-out.

Slow: ~10-17 s per edit on 2 CPU threads (full forward and backward passes, batch of one subject).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import lks
from lks.data import find_subject, subject_token_index
from lks.hooks import LayerHooks
from lks.training.prompts import training_locality_prompts
from lks.utils import pad_ids

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--loc", type=int, default=4, help="training locality prompts per subject")
    ap.add_argument("--wloc", type=float, default=1.0, help="weight of the KL term")
    ap.add_argument("--data", default="counterfact", help="edit set: counterfact | zsre | a file (lks.load_edits)")
    ap.add_argument("--n", type=int, default=30, help="first N edits")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.5, help="Adam learning rate of delta (states have norm ~10^2)")
    ap.add_argument("--templates", default="both", help="builtin | harvested | both")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the JSON line to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = lks.load_model("smollm2-135m", device="cpu")
    recs = list(lks.load_edits(args.data, data_dir=args.data_dir, n=args.n))

    def encode(texts: list[str], prompts: list[str], subject: str) -> list[tuple[list[int], int, list]]:
        """(ids, subject's last token, offsets) of each text; the subject is searched in its prompt."""
        enc = tok(texts, return_offsets_mapping=True)
        return [(ids, subject_token_index(offs, *find_subject(p, subject)), offs)
                for ids, offs, p in zip(enc["input_ids"], enc["offset_mapping"], prompts)]

    def logits(items, delta: torch.Tensor | None) -> torch.Tensor:
        ids, mask = pad_ids([it[0] for it in items], tok.pad_token_id, "cpu")  # right-padded, as fit pads
        with LayerHooks(model, edit_layer=args.layer, detach=False) as hooks:
            if delta is not None:
                hooks.replace(list(range(len(items))), [it[1] for it in items], delta.expand(len(items), -1), additive=True)
            return model(input_ids=ids, attention_mask=mask).logits.float()

    def answer_positions(it, prompt: str) -> list[int]:
        return [j for j, (s, e) in enumerate(it[2]) if s >= len(prompt) and e > s]

    rows, t0 = [], time.perf_counter()
    for r in recs:
        locs = training_locality_prompts(r, args.loc, 0, args.templates)
        items = encode([f"{r.prompt} {r.target}"] + locs, [r.prompt] + locs, r.subject)
        tgt = answer_positions(items[0], r.prompt)
        tgt_ids = torch.tensor([items[0][0][j] for j in tgt])
        kl_at = torch.tensor([(i, j) for i in range(1, len(items)) for j in range(items[i][1], len(items[i][0]))])
        with torch.no_grad():
            ref = torch.log_softmax(logits(items, None), -1)[kl_at[:, 0], kl_at[:, 1]]
        delta = torch.zeros(model.config.hidden_size, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=args.lr)
        for _ in range(args.steps):
            lp = torch.log_softmax(logits(items, delta), -1)
            nll = -lp[0, torch.tensor(tgt) - 1, tgt_ids].mean()
            kl = (ref.exp() * (ref - lp[kl_at[:, 0], kl_at[:, 1]])).sum(-1).mean()
            opt.zero_grad()
            (nll + args.wloc * kl).backward()
            opt.step()
        d = delta.detach()

        @torch.no_grad()
        def preds(prompt: str, answer: str, edited: bool, subject: str = r.subject, d: torch.Tensor = d) -> torch.Tensor:
            it = encode([f"{prompt} {answer}"], [prompt], subject)[0]
            pos = torch.tensor(answer_positions(it, prompt)) - 1
            return logits([it], d if edited else None)[0, pos].argmax(-1)

        row = {"rel": float((preds(r.prompt, r.target, True) == tgt_ids).float().mean())}
        agree = []
        for p, a in r.locality:
            try:
                agree.append(float((preds(p, a, True) == preds(p, a, False)).float().mean()))
            except ValueError:  # a locality prompt that does not name the subject: nothing to edit
                continue
        row["loc"] = float(np.mean(agree)) if agree else float("nan")
        unseen = training_locality_prompts(r, args.loc + 8, 0, args.templates)[args.loc:]
        with torch.no_grad():
            items = encode(unseen, unseen, r.subject)
            last = torch.tensor([len(it[0]) - 1 for it in items])
            rr = torch.arange(len(items))
            row["loc_unseen_tmpl"] = float((logits(items, d)[rr, last].argmax(-1)
                                            == logits(items, None)[rr, last].argmax(-1)).float().mean())
        row.update(kl_final=kl.item(), nll_final=nll.item(), delta_norm=float(d.norm()))
        rows.append(row)
    line = json.dumps({"data": args.data, "layer": args.layer, "loc_prompts": args.loc, "wloc": args.wloc, "n": len(rows), "steps": args.steps,
                       "seconds": round(time.perf_counter() - t0, 1),
                       **{k: round(float(np.nanmean([x[k] for x in rows])), 3) for k in rows[0]}})
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
