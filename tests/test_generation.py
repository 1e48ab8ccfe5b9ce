"""Generation-based edit metrics and the KL after the target (TrainConfig.w_after), on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import prepared_editor
from test_editor import TRAIN, tiny_edits

from lks.config import EditorConfig, TrainConfig
from lks.editor import LKSEditor
from lks.metrics import continuation_scores, distinct_n, generation_metrics, object_count
from lks.training.sequences import KIND_LOC, build_sequences


def test_object_count_matches_whole_words_case_insensitively():
    assert object_count("Italy. Italy is a country in italy", "Italy") == 3
    assert object_count("Italian food, Italy's capital", "Italy") == 1   # "Italian" is another word
    assert object_count("New  York and New\nYork", "New York") == 2      # any white space between words
    assert object_count("C++ and C", "C++") == 1                         # regex characters are literal
    assert object_count("anything", "  ") == 0


def test_continuation_scores_by_hand():
    # 1 target word: the object must be among the first 6 words
    s = continuation_scores("The profession of X is", " actor actor actor actor", "actor")
    assert (s["hit"], s["repeat"], s["distinct_1"], s["distinct_2"]) == (1.0, 1.0, 0.25, 1 / 3)
    s = continuation_scores("X is", " a very old and famous French actor.", "actor")
    assert (s["hit"], s["repeat"]) == (0.0, 0.0)  # "actor." is the 7th word
    s = continuation_scores("X is in", " the city of Naples, in Italy", "Naples")
    assert (s["hit"], s["repeat"], s["distinct_1"]) == (1.0, 0.0, 1.0)
    assert s["fluency"] > continuation_scores("X is in", " Naples Naples Naples Naples Naples", "Naples")["fluency"]
    assert distinct_n("one", 2) != distinct_n("one", 2)  # nan: no bigram


@pytest.mark.parametrize("train_rephrase", [True, False])
def test_generation_metrics_rows_and_an_editor_that_changes_nothing(tiny_pair, train_rephrase):
    """Edit prompts are 'prompt' rows; the rephrases training never saw are 'rephrase' rows. An
    untrained gated editor changes nothing, so its continuations are the unedited ones."""
    model, tok = tiny_pair
    cfg = TrainConfig(**{**TRAIN.__dict__, "train_rephrase": train_rephrase})
    editor, *_ = prepared_editor(model, tok, tiny_edits(), cfg, EditorConfig(layer=1, generator="gated"))
    edits = tiny_edits()
    df, s = generation_metrics(editor, edits, max_new_tokens=6)
    held = [p for r in edits for p in r.rephrases[int(train_rephrase):]]
    assert df[df.kind == "rephrase"].prompt.tolist() == held
    assert df[df.kind == "prompt"].prompt.tolist() == [r.prompt for r in edits]
    assert s["gen_reliability_n"] == 3 and s["gen_generality_n"] == len(held) and s["repeat_rate_n"] == 3 + len(held)
    assert (df.continuation == df.continuation_base).all()
    for key in ("gen_reliability", "gen_generality", "repeat_rate", "fluency", "distinct_1"):
        assert s[key] == s[f"{key}_base"]
    # the scores are continuation_scores of each row
    row = df.iloc[1]
    assert row["fluency"] == continuation_scores(row.prompt, row.continuation, row.target)["fluency"]
    # the forced reference: the unedited model continues "prompt target"
    for _, row in df.iterrows():
        assert row.continuation_forced_base.startswith(f" {row.target}")
        assert row.repeat_forced_base == float(object_count(row.continuation_forced_base, row.target) >= 2)
    assert s["repeat_rate_forced_base"] == df.repeat_forced_base.mean()


def after_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**TRAIN.__dict__, "w_after": 1.0, **kw})


def test_after_target_rows_follow_the_unedited_greedy_continuation(tiny_pair):
    """With after_tokens = 3 each edit/paraphrase sequence is extended by the unedited model's greedy
    continuation, and its KL rows are the last target token and the next two positions."""
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="residual"))
    edits = tiny_edits()
    editor.set_edits(edits)
    cfg = after_cfg(after_tokens=3)
    _, seqs, _ = build_sequences(model, tok, editor.scope, edits, cfg)
    _, plain, _ = build_sequences(model, tok, editor.scope, edits, TRAIN)
    assert [q.kind for q in seqs] == [q.kind for q in plain]
    for q, p in zip(seqs, plain):
        if q.kind == KIND_LOC:
            assert q == p
            continue
        assert q.ids[:len(p.ids)] == p.ids and len(q.ids) == len(p.ids) + 2 and q.loss_tgt == p.loss_tgt
        last = len(p.ids) - 1  # the target's last token
        assert q.loss_pos == p.loss_pos + [last, last + 1, last + 2]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([q.ids])).logits[0]
        assert logits[last:-1].argmax(-1).tolist() == q.ids[last + 1:]  # greedy: each new token is the argmax


def test_after_loss_is_the_kl_of_the_hooked_model_after_the_target(tiny_pair):
    """batch_loss's "after" term equals KL(unedited || edited) at the positions after the target,
    computed from two plain forward passes (loc_topk = vocabulary: the top-k KL is exact)."""
    model, tok = tiny_pair
    cfg = after_cfg(after_tokens=2, loc_topk=len(tok), prefix_cache=True)
    editor, tr = prepared_editor(model, tok, tiny_edits(), cfg, EditorConfig(layer=1, generator="residual"), 1.0)
    seqs = tr.seqs
    losses = {k: v.detach() for k, v in tr.batch_loss(list(range(len(seqs)))).items()}
    kls = []
    for q in seqs:
        if q.kind == KIND_LOC:
            continue
        ids = torch.tensor([q.ids])
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            with editor.applied(model):
                new = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for p in q.loss_pos[len(q.loss_tgt):]:
            kls.append(float((ref[p].exp() * (ref[p] - new[p])).sum()))
    assert len(kls) == 2 * sum(q.kind != KIND_LOC for q in seqs)
    assert float(losses["after"]) == pytest.approx(sum(kls) / len(kls), rel=1e-4, abs=1e-7)
    assert float(losses["after"]) > 1e-5  # the random generator changes what follows the target (a random
                                          # tiny model's logits are flat: its KLs are small)
    tr.cfg = dataclasses.replace(cfg, w_after=0.0)
    no_after = {k: v.detach() for k, v in tr.batch_loss(list(range(len(seqs)))).items()}
    assert float(losses["total"] - no_after["total"]) == pytest.approx(float(losses["after"]), abs=1e-5)
