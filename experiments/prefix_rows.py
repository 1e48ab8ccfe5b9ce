"""How many rows MEMIT's prefix store keeps for one target chunk, against the padded copies.

Usage::

    python experiments/prefix_rows.py [--data-dir DIR] [--data counterfact] [--n 500]

Builds the rows :func:`lks.baselines.memit.target_vectors` optimises for the first ``--n`` edits
(the edit prompt behind each context prefix, and the KL row "{subject} is a"), plans a
:class:`lks.suffix.PrefixKV` over them and prints the prefix tokens, the stored rows, the slots
that 64-row chunks with their own left-padded copies held, and both sizes in bfloat16 for the
registered band. No model pass beyond the context prefixes' generation.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--data", choices=("counterfact", "zsre"), default="counterfact")
    ap.add_argument("--n", type=int, default=500, help="edits (one target chunk is 500)")
    args = ap.parse_args(argv)

    import lks
    from lks.baselines.common import encode_rows
    from lks.baselines.memit import MEMITEditor, _edit_rows, context_prefixes
    from lks.data import EditSet
    from lks.suffix import PrefixKV

    model, tok = lks.load_model("smollm2-135m", device="cpu")
    cfg = MEMITEditor.configs(model)[0]
    prefixes = context_prefixes(model, tok, cfg)
    edits = EditSet(list(lks.load_edits(args.data, data_dir=args.data_dir))[:args.n])
    rows = _edit_rows(tok, edits, prefixes, True)
    rows += encode_rows(tok, [f"{r.subject} is a" for r in edits], [r.subject for r in edits], list(range(len(edits))))
    store = PrefixKV.plan([r.ids for r in rows], [r.subj for r in rows])
    tokens = sum(r.subj for r in rows)
    per = cfg.batch_rows // (len(prefixes) + 1) * (len(prefixes) + 1)  # rows per chunk: whole edits
    padded = sum(max(r.subj for r in rows[i:i + per]) * len(rows[i:i + per]) for i in range(0, len(rows), per))
    c = model.config
    upper = c.num_hidden_layers - 1 - max(cfg.layers)
    row_bytes = upper * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2  # keys + values, bf16
    print(f"{args.data}, first {len(edits)} edits, context prefixes {prefixes}: {len(rows)} rows, {tokens} prefix tokens")
    print(f"  stored rows {store.n_rows} ({tokens / store.n_rows:.2f}x shared): {store.n_rows * row_bytes / 1e6:.0f} MB")
    print(f"  padded slots of {per}-row chunks {padded}: {padded * row_bytes / 1e6:.0f} MB "
          f"({padded / store.n_rows:.2f}x the stored rows); {upper} layers above layer {max(cfg.layers)}, "
          f"{row_bytes} bytes per row")


if __name__ == "__main__":
    main()
