"""Validation during a fit (TrainConfig.val_edits): held-out prompts, their score, stopping on it,
and the step cap (TrainConfig.max_steps), on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import interrupted_at_step, prepared_editor
from test_editor import TRAIN, tiny_edits

import lks.training.trainer as trainer_module
from lks.config import EditorConfig, TrainConfig
from lks.editor import LKSEditor
from lks.training.prompts import edit_prompts
from lks.training.sequences import KIND_EQUIV, KIND_LOC
from lks.training.trainer import epochs_for
from lks.training.validation import Validation, validation_edits, validation_prompts

# bank paraphrases on, so that a held-out bank phrasing exists for the tiny edits
VAL = TrainConfig(**{**TRAIN.__dict__, "para_per_edit": 1, "val_edits": 3, "val_patience": 10, "epochs": 4})
GEN = EditorConfig(layer=1, generator="residual")


def scored_by_evaluation(r) -> set[str]:
    """Every prompt evaluation scores for record ``r`` (the oracle, written out from the record)."""
    return {p.strip().casefold() for p in [r.prompt, *r.rephrases, *(p for p, _ in r.locality),
                                            *(p for p, _ in r.neighborhood)]}


def test_validation_prompts_are_neither_trained_nor_scored():
    edits = tiny_edits()
    train, val = edit_prompts(edits, VAL), validation_prompts(edits, VAL)
    assert sum(len(v.equiv) for v in val) >= 1 and all(len(v.locality) == 1 for v in val)
    for r, t, v in zip(edits, train, val, strict=True):
        for q in v.equiv + v.locality:
            assert q not in t.equiv and q not in t.locality  # the gate's negatives are in t.locality too
            assert q.strip().casefold() not in scored_by_evaluation(r)


def test_validation_edits_are_a_seeded_sample():
    cfg = dataclasses.replace(VAL, val_edits=5)
    a = validation_edits(100, cfg)
    assert a == validation_edits(100, cfg) and len(set(a)) == 5 and a == sorted(a)
    assert a != validation_edits(100, dataclasses.replace(cfg, seed=1))
    assert validation_edits(3, cfg) == [0, 1, 2] and validation_edits(3, dataclasses.replace(cfg, val_edits=0)) == []


def test_validation_score_equals_plain_forward_passes(tiny_pair):
    """The score read from the cached fast path equals the rates computed from plain forward
    passes of the unedited and the edited model (``editor.applied``), float32."""
    model, tok = tiny_pair
    editor, tr = prepared_editor(model, tok, tiny_edits(), dataclasses.replace(VAL, prefix_cache=True), GEN, 0.5)
    val = tr.validation
    assert val is not None and {q.kind for q in val.seqs} == {KIND_EQUIV, KIND_LOC}
    got = val.score(editor.fast, editor.generator, editor.features)
    gen, loc = [], []
    for q in val.seqs:
        ids = torch.tensor([q.ids])
        with torch.no_grad():
            base = model(input_ids=ids).logits[0]
            with editor.applied(model):
                new = model(input_ids=ids).logits[0]
        if q.kind == KIND_EQUIV:
            gen.append(float(new[q.loss_pos[:len(q.loss_tgt)]].argmax(-1).tolist() == q.loss_tgt))
        else:
            loc.append(float(int(new[-1].argmax()) == int(base[-1].argmax())))
    assert got["val_generality"] == sum(gen) / len(gen)
    assert got["val_locality"] == sum(loc) / len(loc)
    assert got["val_score"] == pytest.approx((got["val_generality"] + got["val_locality"]) / 2)
    assert 0.0 < got["val_locality"]  # some locality prompts keep their prediction: the test can tell


def test_validation_stops_and_keeps_the_best_epoch(tiny_pair, monkeypatch):
    """Scores 0.5, 0.7, 0.6, 0.6: with val_patience 2 the fit stops after epoch 4 and its generator
    is epoch 2's, the weights an uninterrupted fit checkpointed after its second epoch."""
    model, tok = tiny_pair
    cfg = dataclasses.replace(VAL, epochs=6, val_patience=2)
    checkpoints = []
    real_write = trainer_module.write_train_state
    monkeypatch.setattr(trainer_module, "write_train_state", lambda path, state, tensors, *a: checkpoints.append(
        {k[len("generator."):]: v.clone() for k, v in tensors.items() if k.startswith("generator.")}) or real_write(path, state, tensors, *a))

    def fit(scores, tmp):
        it = iter(scores)
        monkeypatch.setattr(Validation, "score", lambda self, *a, **k: {"val_score": next(it)})
        editor = LKSEditor(model, tok, GEN)
        return editor, editor.fit(tiny_edits(), cfg, checkpoint_dir=tmp, progress=False)

    import tempfile

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        stopped, hist = fit([0.5, 0.7, 0.6, 0.6, 0.9, 0.9], a)
        assert [h["epoch"] for h in hist] == [1, 2, 3, 4] and [h["val_score"] for h in hist] == [0.5, 0.7, 0.6, 0.6]
        checkpoints.clear()
        _, full = fit([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], b)  # always better: all six epochs, the same steps
    assert len(full) == 6
    for k, v in stopped.generator.state_dict().items():
        assert torch.equal(v, checkpoints[1][k]), k
    assert any(not torch.equal(checkpoints[1][k], checkpoints[3][k]) for k in checkpoints[1])  # epochs 2 and 4 differ


def test_a_resumed_fit_with_validation_equals_the_uninterrupted_one(tiny_pair, tmp_path, monkeypatch):
    """Interrupted in epoch 3 and resumed, a fit with validation ends as the uninterrupted one: on
    the tiny model the score never improves after epoch 1, so both stop after epoch 4 and keep
    epoch 1's generator, which the resumed process reads from the checkpoint."""
    monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = tiny_pair
    cfg = dataclasses.replace(VAL, val_patience=3, epochs=6)
    full = LKSEditor(model, tok, GEN)
    hist_full = full.fit(tiny_edits(), cfg, progress=False)
    crashing = LKSEditor(model, tok, GEN)
    with interrupted_at_step(5), pytest.raises(KeyboardInterrupt):  # 2 steps per epoch: the first of epoch 3
        crashing.fit(tiny_edits(), cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    resumed = LKSEditor(model, tok, GEN)
    hist = resumed.fit(tiny_edits(), cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    strip = [{k: v for k, v in h.items() if "seconds" not in k} for h in hist]
    assert strip == [{k: v for k, v in h.items() if "seconds" not in k} for h in hist_full]
    assert len(hist) == 4 and len({h["val_score"] for h in hist}) == 1
    assert torch.equal(resumed.kb_table(), full.kb_table())


def test_max_steps_caps_the_epochs_and_the_schedule_ends_at_zero(tiny_pair):
    assert epochs_for(TRAIN, 7) == TRAIN.epochs
    cap = dataclasses.replace(TRAIN, epochs=20, max_steps=10)
    assert [epochs_for(cap, s) for s in (1, 3, 5, 10, 11, 100)] == [10, 4, 2, 1, 1, 1]
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, GEN)
    hist = editor.fit(tiny_edits(), dataclasses.replace(TRAIN, epochs=20, max_steps=3), progress=False)  # 2 steps an epoch
    assert len(hist) == 2 and hist[-1]["lr"] == 0.0
