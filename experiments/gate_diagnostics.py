"""How often the ``gated`` generator's gate is open, by kind of prompt, for a saved editor.

    python experiments/gate_diagnostics.py --editor runs/editors/zsre-100 --data zsre --n 100

For each of the first ``--n`` edits of ``--data`` (the records the editor was fitted on), the
original layer-L block at the subject's last token of four kinds of prompt is passed to the
editor's gate, ``sigmoid(k . LN(KB) / sqrt(d) + c)``:

* ``prompt``: the edit prompt (seen in training, should be open);
* ``rephrase``: the data set's own paraphrase, ``rephrases[0]`` (held-out when the editor was
  fitted with ``train_rephrase=False``; should be open);
* ``locality``: the data set's same-subject locality prompt (held-out; should be closed);
* ``train_locality``: the first training locality prompt of the subject (seen; should be closed);
* ``mend_paraphrase_form`` / ``mend_generation_form``: CounterFact's held-out MEND rephrase
  (``rephrases[1]``), split by ROME prompt form (``lks.data.rephrase_form``); empty for zsRE.

Printed: for each kind, the number of prompts, the mean gate and the share with gate > 0.5; and,
for the locality prompts, how many share their tokens up to the subject with the edit prompt or
the paraphrase (the same block, so no gate can tell them apart). Prompts that do not name the
subject are skipped (nothing to edit).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import lks
from lks.data import rephrase_form, subject_positions
from lks.training.prompts import training_locality_prompts

REPO = Path(__file__).resolve().parents[1]


def _mend(record, form: str) -> str | None:
    """The record's second rephrase (the MEND one) if it has the given ROME form, else None."""
    text = record.rephrases[1] if len(record.rephrases) > 1 else None
    return text if text and record.subject in text and rephrase_form(text, record.subject) == form else None


def gate_report(editor: lks.LKSEditor, recs: list) -> dict:
    """Per kind of prompt: count, mean gate and share open (gate > 0.5), for the records ``recs``."""
    model, tok = editor.model, editor.tokenizer
    layer, table, d = editor.config.layer, editor.kb_table(), editor.d
    sid = {s: i for i, s in enumerate(editor.subjects)}
    cfg = editor.train_config
    kinds = {"prompt": lambda r: r.prompt,
             "rephrase": lambda r: r.rephrases[0] if r.rephrases else None,
             "locality": lambda r: r.locality[0][0] if r.locality else None,
             "train_locality": lambda r: (training_locality_prompts(r, 1, cfg.seed, cfg.loc_templates) or [None])[0],
             # CounterFact joined with the MEND file: its held-out rephrase, by ROME prompt form
             "mend_paraphrase_form": lambda r: _mend(r, "paraphrase"),
             "mend_generation_form": lambda r: _mend(r, "generation")}
    out: dict = {}
    for kind, get in kinds.items():
        pairs = [(t, r.subject) for r in recs if (t := get(r)) and r.subject in t]
        if not pairs:
            continue
        gates = []
        for i in range(0, len(pairs), 32):
            texts, subjects = [t for t, _ in pairs[i:i + 32]], [s for _, s in pairs[i:i + 32]]
            enc, pos = subject_positions(tok, texts, subjects)
            with torch.no_grad(), lks.LayerHooks(model, capture=[layer]) as hooks:
                model(**enc)
            kb = hooks.captured[layer][torch.arange(len(texts)), pos]
            rows = table[torch.tensor([sid[s] for s in subjects])]
            gates.append(torch.sigmoid(editor.generator.gate_logit(kb, rows[:, d:])))
        g = torch.cat(gates)
        out[kind] = {"n": len(g), "mean_gate": round(float(g.mean()), 3), "open": round(float((g > 0.5).float().mean()), 3)}

    def upto(text: str, subject: str) -> str:  # the text up to the subject's end: it fixes the block
        return text[:text.find(subject) + len(subject)]

    opened = {(r.subject, upto(p, r.subject)) for r in recs for p in (r.prompt, *r.rephrases[:1]) if r.subject in p}
    loc = [(r.subject, upto(p, r.subject)) for r in recs for p, _ in r.locality[:1] if r.subject in p]
    if "locality" in out:
        out["locality"]["same_block_as_prompt_or_rephrase"] = sum(x in opened for x in loc)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--editor", required=True, help="directory of a saved editor with generator 'gated'")
    ap.add_argument("--data", required=True, help="the edit set it was fitted on: counterfact | zsre | a file")
    ap.add_argument("--n", type=int, required=True, help="first N edits (as in the fit)")
    ap.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = lks.load_model("smollm2-135m", device="cpu")
    editor = lks.LKSEditor.load(args.editor, model, tok)
    if not editor.generator.has_gate:
        raise SystemExit(f"{args.editor}: generator {editor.config.generator!r} has no gate (use one fitted with --generator gated)")
    recs = [r for r in lks.load_edits(args.data, data_dir=args.data_dir, n=args.n) if r.subject in editor.subjects]
    print(json.dumps({"editor": args.editor, "generator": editor.config.generator,
                      "train_rephrase": editor.train_config.train_rephrase, **gate_report(editor, recs)}, indent=1))


if __name__ == "__main__":
    main()
