"""The tidy view of an evaluation (lks.metrics.tidy / EditEvaluation.table), on hand-made results."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lks.metrics import TIDY_COLUMNS, EditEvaluation


def test_tidy_rows_by_hand():
    per_edit = pd.DataFrame({"reliability": [1.0, 0.0, 1.0, 1.0], "reliability_base": [0.0, 0.0, 0.0, 0.0],
                             "generality": [float("nan")] * 4,  # zsRE-like: no rephrases[1:]
                             "generality_seen": [0.5, 1.0, float("nan"), 0.0], "locality": [1.0, 1.0, 1.0, 1.0]})
    summary = {"generality_split": "held-out", "generality_seen_split": "held-out",
               "repeat_rate": 0.25, "repeat_rate_base": 0.0, "repeat_rate_n": 8, "repeat_rate_forced_base": 0.125}
    ev = EditEvaluation(per_edit, summary)
    df, s = ev  # unpacks as (per_edit, summary)
    assert df is per_edit and s is summary
    t = ev.table
    assert list(t.columns) == TIDY_COLUMNS
    row = t[(t.metric == "reliability") & (t.model == "edited")].iloc[0]
    # mean 0.75 of [1, 0, 1, 1]; sample std 0.5; half-width 1.96 * 0.5 / 2 = 0.49
    assert (row.value, row.n, row.split, row.prompt_kind) == (0.75, 4, "seen", "edit prompt")
    assert row.ci_low == pytest.approx(0.26) and row.ci_high == 1.0  # clipped at 1
    base = t[(t.metric == "reliability") & (t.model == "unedited")].iloc[0]
    assert (base.value, base.ci_low, base.ci_high) == (0.0, 0.0, 0.0)
    # no held-out rephrase: generality is rephrases[0]'s, 3 edits with one, mean 0.5
    gen = t[(t.metric == "generality") & (t.model == "edited")].iloc[0]
    assert (gen.value, gen.n, gen.split) == (0.5, 3, "held-out")
    assert set(t[t.metric == "repeat_rate"].model) == {"edited", "unedited", "unedited, given the new object"}
    forced = t[t.model == "unedited, given the new object"].iloc[0]
    assert forced.value == 0.125 and forced.n == 8 and math.isnan(forced.ci_low)
    assert "specificity" not in set(t.metric)  # no such column: no row


@pytest.mark.parametrize("n,size", [(0, 4), (1, 4), (10, 3), (37, 8), (64, 64)])
def test_length_batches_are_short_first_stable_and_cover_every_index_once(n, size):
    """Checked by properties, not by a second sort: every index once, lengths never fall, equal
    lengths keep their input order, and every batch but the last is full."""
    import random

    from lks.utils import length_batches

    lengths = [random.Random(i * 7 + n).randint(1, 5) for i in range(n)]  # few values: many ties
    batches = length_batches(lengths, size)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    for a, b in zip(flat, flat[1:]):
        assert lengths[a] < lengths[b] or (lengths[a] == lengths[b] and a < b)
    assert all(len(b) == size for b in batches[:-1]) and all(0 < len(b) <= size for b in batches)


def test_teacher_forced_matches_each_pair_scored_alone_on_full_logits(tiny_pair):
    """Batched scoring (the head applied only where a target token is predicted, rows of several lengths
    padded together) against an oracle: each pair alone, the full logits, log-softmax, the target
    tokens read by hand from the tokenizer's offsets."""
    import torch

    from lks.metrics import teacher_forced

    model, tok = tiny_pair
    prompts = ["The capital of France is", "Berlin is in", "Apple is headquartered in", "Toko Yasuda plays the",
               "The mother tongue of Danielle Darrieux is", "works in the field of", "x"]
    targets = ["Paris", "Germany", "Cupertino and Paris", "guitar", "French", "English Islam Swedish", ""]
    got = teacher_forced(model, tok, prompts, targets, batch_size=3)
    for p, t, g in zip(prompts, targets, got):
        enc = tok(f"{p} {t}", return_offsets_mapping=True)
        tgt = [j for j, (s, e) in enumerate(enc["offset_mapping"]) if s >= len(p) and e > s and j > 0]
        if not tgt:
            assert g["n"] == 0 and math.isnan(g["logprob"]) and math.isnan(g["acc"])
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([enc["input_ids"]])).logits[0].float(), -1)
        want = [int(enc["input_ids"][j]) for j in tgt]
        rows = logp[[j - 1 for j in tgt]]
        assert g["n"] == len(tgt) and g["pred"] == rows.argmax(-1).tolist()
        assert g["logprob"] == pytest.approx(float(sum(rows[k, w] for k, w in enumerate(want))), abs=1e-4)
        assert g["acc"] == pytest.approx(sum(int(rows[k].argmax()) == w for k, w in enumerate(want)) / len(tgt))
