"""LKSEditor on a tiny random Llama: fast path == hooked forward, fit, save/load, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import PLAIN_TRAIN, interrupted_at_step, make_tiny_llama, prepared_editor

from lks.config import EditorConfig, TrainConfig
from lks.data import EditRecord, EditSet, paraphrase_templates, subject_template
from lks.editor import LKSEditor
from lks.headloss import head_nll, head_topk_kl
from lks.training import Trainer
from lks.training.fastpath import log_tail
from lks.training.losses import topk_kl
from lks.utils import pad_ids


def tiny_edits() -> EditSet:
    return EditSet([
        EditRecord(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is", target="English",
                   ground_truth="French", rephrases=["Danielle Darrieux's native language is", "Where Danielle Darrieux is from, people speak"],
                   locality=[("Danielle Darrieux was born in", "Paris")], neighborhood=[("The capital of France is", "Paris")], case_id=0),
        EditRecord(subject="Edwin of Northumbria", prompt="The official religion of Edwin of Northumbria is", target="Islam",
                   ground_truth="Christianity", rephrases=["Edwin of Northumbria is affiliated with", "The faith of Edwin of Northumbria is"],
                   locality=[("Edwin of Northumbria is a citizen of", "England")], neighborhood=[], case_id=1),
        EditRecord(subject="Toko Yasuda", prompt="Toko Yasuda plays the", target="piano", ground_truth="guitar",
                   rephrases=["The instrument Toko Yasuda plays is the", "Toko Yasuda performs on the"],
                   locality=[("Toko Yasuda works in the field of", "music")], neighborhood=[], case_id=2),
    ])


TRAIN = TrainConfig(**PLAIN_TRAIN, lr=1e-2, epochs=3, batch_size=2, loc_per_subject=2, loc_topk=50, patience=10, seed=0)


@pytest.mark.parametrize("prefix_cache", [False, True])
@pytest.mark.parametrize("kind", ["linear", "mlp", "residual", "residual_mlp", "gated"])
def test_fast_path_equals_hooked_forward(tiny_pair, kind, prefix_cache):
    """Cached layer-L states + layers L+1..N (with or without the cached prefix keys/values) give
    the logits of the plain hooked full forward pass."""
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator=kind))
    edits = tiny_edits()
    cfg = TrainConfig(**{**TRAIN.__dict__, "epochs": 1, "prefix_cache": prefix_cache})
    editor.fit(edits, cfg, progress=False)
    tr = Trainer(editor, cfg).prepare(edits, progress=False)
    seqs, cache = tr.seqs, tr.cache
    assert (cache.prefix is not None) == prefix_cache
    assert not prefix_cache or sum(s.subj_pos for s in seqs) > 0  # some sequences really have a prefix
    batch = list(range(len(seqs)))
    with torch.no_grad():
        fast = editor.fast.upper_logits(cache, seqs, batch, editor.kb_table(), editor.generator.combine)
    ids, mask = pad_ids([seqs[j].ids for j in batch], tok.pad_token_id, "cpu")
    with torch.no_grad(), editor.applied(model) as stats:
        full = model(input_ids=ids, attention_mask=mask).logits
    rows = [r for r, j in enumerate(batch) for _ in seqs[j].loss_pos]
    pos = [p for j in batch for p in seqs[j].loss_pos]
    ref = full[rows, pos]
    assert stats.rows_routed == len(batch)  # every training sequence names its subject
    assert (fast - ref).abs().max().item() < 1e-4
    # and the edit is real: the unedited logits differ
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits[rows, pos]
    assert (plain - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_precompute_is_the_same_in_any_batching(tiny_pair, prefix_cache):
    """The cache holds, per sequence, what a batch of that sequence alone gives (no padding):
    length-sorted batches of 2 or of everything only change the order the rows are filled in."""
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="gated"))
    cfg = TrainConfig(**{**TRAIN.__dict__, "epochs": 1, "prefix_cache": prefix_cache})
    seqs = Trainer(editor, cfg).prepare(tiny_edits(), progress=False).seqs
    assert len({len(s.ids) for s in seqs}) > 2  # lengths differ: the batches are padded and reordered
    alone, *others = (editor.fast.precompute(seqs, cfg, batch_size=b, progress=False) for b in (1, 2, len(seqs)))
    kl = sorted(alone.ref_row)
    assert kl and len(kl) < len(seqs)  # some sequences have KL rows, some (edit prompts) none
    for cache in others:
        assert (cache.states - alone.states).abs().max().item() < 1e-5
        assert sorted(cache.ref_row) == kl
        for j in kl:
            n = len(seqs[j].loss_pos) - len(seqs[j].loss_tgt)
            a, c = alone.ref_row[j], cache.ref_row[j]
            assert torch.equal(cache.ref_idx[c:c + n], alone.ref_idx[a:a + n])
            assert (cache.ref_logp[c:c + n] - alone.ref_logp[a:a + n]).abs().max().item() < 1e-4
        assert (cache.prefix is None) == (not prefix_cache)
        if prefix_cache:
            assert (cache.prefix.rows - alone.prefix.rows).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", ["residual", "residual_mlp", "gated"])
def test_residual_untrained_changes_nothing(tiny_pair, kind):
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator=kind))
    editor.set_edits(tiny_edits())
    prompts = ["Toko Yasuda plays the", "The capital of France is"]
    assert editor.generate(prompts, max_new_tokens=5) == editor.generate(prompts, max_new_tokens=5, edited=False)


def test_fit_lowers_loss_and_base_model_stays_frozen(tiny_pair):
    model, tok = tiny_pair
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="residual"))
    hist = editor.fit(tiny_edits(), TRAIN, progress=False)
    assert len(hist) == 3 and hist[-1]["edit"] < hist[0]["edit"]
    assert set(hist[0]) >= {"loss", "edit", "equiv", "loc", "lr", "seconds"}
    assert all(not p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mixed_batch_routes_per_row(tiny_pair):
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="linear"))
    editor.fit(tiny_edits(), TRAIN, progress=False)
    prompts = ["Toko Yasuda plays the", "The capital of France is", "Berlin is in"]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        base = model(**enc).logits[:, -1]
        with editor.applied(model) as stats:
            edited = model(**enc).logits[:, -1]
    assert stats.rows_seen == 3 and stats.rows_routed == 1
    assert (edited[0] - base[0]).abs().max() > 1e-3
    assert torch.allclose(edited[1:], base[1:], atol=1e-6)


def test_save_load_roundtrip_and_atomicity(tiny_pair, tmp_path):
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="mlp", mlp_ratio=2))
    editor.fit(tiny_edits(), TRAIN, progress=False)
    path = editor.save(tmp_path / "ed")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generator.safetensors", "scope.safetensors", "subjects.json"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model"]["hidden_size"] == 48 and cfg["editor"]["generator"] == "mlp" and cfg["n_edits"] == 3
    loaded = LKSEditor.load(path, model, tok)
    prompts = ["Toko Yasuda plays the", "The mother tongue of Danielle Darrieux is"]
    assert loaded.generate(prompts, max_new_tokens=4) == editor.generate(prompts, max_new_tokens=4)
    assert torch.equal(loaded.kb_table(), editor.kb_table())

    # a crash in the middle of a save leaves the previous save intact
    class Boom(Exception):
        pass

    def broken_state_dict(*a, **k):
        raise Boom()

    editor.generator.state_dict = broken_state_dict
    with pytest.raises(Boom):
        editor.save(path)
    assert LKSEditor.load(path, model, tok).n_edits == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ed"]


def test_load_rejects_other_model_and_corrupt_files(tiny_pair, tmp_path):
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="linear"))
    editor.fit(tiny_edits(), TrainConfig(**{**TRAIN.__dict__, "epochs": 1}), progress=False)
    path = editor.save(tmp_path / "ed")
    other = make_tiny_llama(layers=3, hidden=64, vocab=len(tok))
    with pytest.raises(ValueError, match="was made for model"):
        LKSEditor.load(path, other, tok)
    renamed = make_tiny_llama(layers=3, vocab=len(tok))
    renamed.lks_name = "another-model"
    with pytest.raises(ValueError, match="another-model"):
        LKSEditor.load(path, renamed, tok)
    data = (path / "generator.safetensors").read_bytes()
    (path / "generator.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt checkpoint file .*generator.safetensors"):
        LKSEditor.load(path, model, tok)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint file .*config.json"):
        LKSEditor.load(path, model, tok)


def test_resume_after_interruption_matches_uninterrupted_run(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = tiny_pair
    full = LKSEditor(model, tok, EditorConfig(layer=1, generator="residual"))
    full.fit(tiny_edits(), TRAIN, progress=False)

    crashing = LKSEditor(model, tok, EditorConfig(layer=1, generator="residual"))
    with interrupted_at_step(5), pytest.raises(KeyboardInterrupt):  # 2 steps per epoch: the first of epoch 3
        crashing.fit(tiny_edits(), TRAIN, checkpoint_dir=tmp_path / "ck", progress=False)
    state_path = tmp_path / "ck" / "train_state.json"
    state = json.loads(state_path.read_text())
    assert state["epoch"] == 2
    # the fit time counts the interrupted process: say it had run 1,000 s before the crash
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert not (tmp_path / "ck" / "config.json").exists()  # a running fit's checkpoint is its train state only
    state_path.write_text(json.dumps({**state, "seconds": 1000.0}))

    resumed = LKSEditor(model, tok, EditorConfig(layer=1, generator="residual"))
    t0 = time.perf_counter()
    hist = resumed.fit(tiny_edits(), TRAIN, checkpoint_dir=tmp_path / "ck", progress=False)
    assert 1000.0 < resumed.fit_seconds <= 1000.0 + time.perf_counter() - t0
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert torch.equal(resumed.kb_table(), full.kb_table())  # bit for bit (tests/test_determinism.py: on 2 threads too)
    # a checkpoint of another run is refused rather than silently mixed in
    with pytest.raises(ValueError, match="another training config"):
        LKSEditor(model, tok, EditorConfig(layer=1, generator="residual")).fit(
            tiny_edits(), TrainConfig(**{**TRAIN.__dict__, "lr": 0.5}), checkpoint_dir=tmp_path / "ck", progress=False)
    assert not any((tmp_path / "cache" / "prepared").iterdir())  # a failed fit keeps no prepared set


def test_a_resumed_fit_reads_its_prepared_training_set(tiny_pair, tmp_path, monkeypatch):
    """With a checkpoint directory the fit keeps its sequences, gate examples and layer-L cache
    (lks.training.stored) until training ends: a fit resumed after a crash computes none of them
    again and ends where an uninterrupted fit ends."""
    import lks.training.trainer as trainer_module
    from lks.training.fastpath import FastPath

    monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = tiny_pair
    ecfg = EditorConfig(layer=1, generator="gated")
    cfg = TrainConfig(**{**TRAIN.__dict__, "w_after": 1.0, "after_tokens": 3, "gate_prefixes": 1, "gate_negatives": 2,
                         "gate_steps": 5, "prefix_cache": True})
    full = LKSEditor(model, tok, ecfg)
    full.fit(tiny_edits(), cfg, progress=False)
    assert not (tmp_path / "cache").exists()  # no checkpoint directory: nothing stored

    with interrupted_at_step(3), pytest.raises(KeyboardInterrupt):  # in epoch 2
        LKSEditor(model, tok, ecfg).fit(tiny_edits(), cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    (folder,) = (tmp_path / "cache" / "prepared").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["cache.safetensors", "gate.safetensors", "sequences.json"]

    # the stored parts equal freshly computed ones (the oracle: a prepare with no store)
    fresh = Trainer(LKSEditor(model, tok, ecfg), cfg).prepare(tiny_edits(), progress=False)

    def never(*args, **kwargs):
        raise AssertionError("a stored part was computed again")

    for name in ("build_sequences", "gate_examples"):
        monkeypatch.setattr(trainer_module, name, never)
    monkeypatch.setattr(FastPath, "precompute", never)
    loaded = Trainer(LKSEditor(model, tok, ecfg), cfg).prepare(tiny_edits(), progress=False, store=folder)
    assert loaded.seqs == fresh.seqs and loaded.per_edit == fresh.per_edit and loaded.skipped == fresh.skipped
    assert loaded.gate.skip == fresh.gate.skip and fresh.gate.kb.shape[0] > 0
    for name in ("kb", "subj", "label"):
        assert torch.equal(getattr(loaded.gate, name), getattr(fresh.gate, name))
    assert fresh.cache.prefix is not None and fresh.cache.ref_logp is not None
    for name in ("states", "ref_logp", "ref_idx", "ref_tail"):
        assert torch.equal(getattr(loaded.cache, name), getattr(fresh.cache, name)), name
    for name in ("rows", "index"):
        assert torch.equal(getattr(loaded.cache.prefix, name), getattr(fresh.cache.prefix, name)), name
    assert (loaded.cache.offsets, loaded.cache.prefix.offsets, loaded.cache.prefix.lengths, loaded.cache.ref_row) == \
        (fresh.cache.offsets, fresh.cache.prefix.offsets, fresh.cache.prefix.lengths, fresh.cache.ref_row)

    resumed = LKSEditor(model, tok, ecfg)
    hist = resumed.fit(tiny_edits(), cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert torch.allclose(resumed.kb_table(), full.kb_table(), atol=1e-6)
    assert not folder.exists()  # training ended: the prepared set is deleted


def test_bad_input_errors(tiny_pair):
    model, tok = tiny_pair
    with pytest.raises(ValueError, match="unknown generator kind"):
        EditorConfig(generator="transformer")
    with pytest.raises(IndexError, match="valid layers are 0..2"):
        LKSEditor(model, tok, EditorConfig(layer=7))
    editor = LKSEditor(model, tok, EditorConfig(layer=1))
    with pytest.raises(ValueError, match="empty edit set"):
        editor.fit(EditSet([]), TRAIN, progress=False)
    e = tiny_edits()
    conflicting = EditSet(list(e) + [EditRecord(subject="Toko Yasuda", prompt="Toko Yasuda plays the", target="drums")])
    with pytest.raises(ValueError, match="conflicting edits for subject 'Toko Yasuda'"):
        editor.fit(conflicting, TRAIN, progress=False)
    other = LKSEditor(model, tok, EditorConfig(layer=1))
    other.fit(conflicting, TrainConfig(**{**TRAIN.__dict__, "epochs": 1}), progress=False, on_conflict="first")
    assert other.dropped == [3] and other.n_edits == 3
    with pytest.raises(RuntimeError, match="no edits yet"):
        with editor.applied(model):
            pass
    unfrozen = make_tiny_llama(layers=3, vocab=len(tok))
    unfrozen.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="must be frozen"):
        LKSEditor(unfrozen, tok, EditorConfig(layer=1))


def test_topk_kl_matches_full_kl_when_k_is_vocab():
    g = torch.Generator().manual_seed(0)
    ref_logits, new_logits = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g)
    p = torch.log_softmax(ref_logits, -1)
    full = torch.nn.functional.kl_div(torch.log_softmax(new_logits, -1), p, log_target=True, reduction="batchmean")
    top, idx = p.topk(30, -1)
    tail = torch.full((4,), float("-inf"))
    assert torch.allclose(topk_kl(top, idx, tail, new_logits), full, atol=1e-6)
    # with k < vocab it is a lower bound that is still zero iff the distributions agree
    top5, idx5 = p.topk(5, -1)
    tail5 = p.scatter(-1, idx5, float("-inf")).logsumexp(-1)
    approx = topk_kl(top5, idx5, tail5, new_logits)
    assert 0 <= approx <= full + 1e-6
    assert topk_kl(top5, idx5, tail5, ref_logits).abs() < 1e-6


def test_metrics_label_seen_vs_heldout_and_handle_missing_kinds(tiny_pair):
    """zsRE-like sets (one paraphrase, no neighbourhood) evaluate, and say generality is 'seen'."""
    from lks.metrics import evaluate_edits, fluency, harmonic_mean

    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="residual"))
    one = EditSet([EditRecord(subject=r.subject, prompt=r.prompt, target=r.target, ground_truth=r.ground_truth,
                              rephrases=r.rephrases[:1], locality=r.locality) for r in tiny_edits()])
    editor.fit(one, TRAIN, progress=False)
    df, s = evaluate_edits(editor, one)
    assert s["generality_split"] == "seen" and s["generality_n"] == 0
    assert s["generality"] == s["generality_seen"] and "specificity" in s
    assert len(df) == 3 and 0 <= s["reliability"] <= 1
    # "new phrasing": held-out paraphrases whose template the paraphrase bank does not hold
    bank = paraphrase_templates()
    held = [dataclasses.replace(r, rephrases=[r.rephrases[0], "Edwin of Northumbria is affiliated with the religion"])
            if i == 1 else r for i, r in enumerate(tiny_edits())]
    df2, s2 = evaluate_edits(editor, EditSet(held))
    assert s2["generality_split"] == "held-out" and s2["generality_n"] == 3
    new = [any(subject_template(p, r.subject) not in bank for p in r.rephrases[1:]) for r in held]
    assert 0 < sum(new) < 3  # this fixture has both kinds
    assert s2["generality_new_phrasing_n"] == sum(new)
    assert df2["generality_new_phrasing"].isna().tolist() == [not x for x in new]
    # by rephrase form: a sentence before the subject marks ROME's paraphrase prompts
    forms = [dataclasses.replace(r, rephrases=[r.rephrases[0], "Wars end. " + r.rephrases[1]]) if i != 1 else r
             for i, r in enumerate(tiny_edits())]
    df3, s3 = evaluate_edits(editor, EditSet(forms))
    assert s3["generality_paraphrase_form_n"] == 2 and s3["generality_generation_form_n"] == 1
    assert df3["generality_paraphrase_form"].isna().tolist() == [False, True, False]
    assert df3["generality_generation_form"].isna().tolist() == [True, False, True]
    both = df3[["generality_paraphrase_form", "generality_generation_form"]].max(axis=1)
    assert both.tolist() == df3["generality"].tolist()  # one held-out rephrase per edit: exactly one form holds it
    # a held-out rephrase that does not name the subject counts for generality, in neither form
    nameless = [dataclasses.replace(r, rephrases=[r.rephrases[0], "Her mother tongue is"]) if i == 0 else r
                for i, r in enumerate(forms)]
    df4, s4 = evaluate_edits(editor, EditSet(nameless))
    assert s4["generality_n"] == 3 and s4["generality_paraphrase_form_n"] + s4["generality_generation_form_n"] == 2
    assert df4["generality"].notna().all() and df4.loc[0, ["generality_paraphrase_form", "generality_generation_form"]].isna().all()
    assert fluency("a b a b a b") < fluency("the cat sat on a warm mat today")
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)


def test_bfloat16_fit_restores_the_model_exactly(tiny_pair):
    """precision="bfloat16" holds the upper layers in bf16 during fit only; the model leaves bit-identical."""
    model, tok = tiny_pair
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.config._attn_implementation
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="residual"))
    hist = editor.fit(tiny_edits(), TrainConfig(**{**TRAIN.__dict__, "precision": "bfloat16"}), progress=False)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert model.config._attn_implementation == attn
    assert editor.fast.lm_weight is None
    assert hist[-1]["edit"] < hist[0]["edit"]
    # zero-init residual: the first step's locality KL is ~0 (references in the same precision)
    assert hist[0]["loc"] < 0.05
    # the feature pass ran in bfloat16 too: close to, but not, the float32 vectors
    fp32 = editor.fast.states_at_last_token(editor.feature_texts)
    rel = ((editor.features - fp32).norm(dim=1) / fp32.norm(dim=1)).max().item()
    assert editor.features.dtype == torch.float32 and 0 < rel < 0.05


def test_upper_layers_dtype_restores_on_error(tiny_pair):
    from lks.models import get_layers, upper_layers_dtype

    model, _ = tiny_pair
    w = get_layers(model)[1].mlp.up_proj.weight
    ptr, ref = w.data_ptr(), w.detach().clone()
    with pytest.raises(RuntimeError, match="boom"), upper_layers_dtype(model, 0, torch.bfloat16):
        assert w.dtype == torch.bfloat16 and get_layers(model)[0].mlp.up_proj.weight.dtype == torch.float32
        raise RuntimeError("boom")
    assert w.data_ptr() == ptr and w.dtype == torch.float32 and torch.equal(w, ref)


def test_prefix_cache_gives_the_same_losses_and_gradients(tiny_pair):
    model, tok = tiny_pair
    edits = tiny_edits()
    out = {}
    for pc in (False, True):
        cfg = TrainConfig(**{**TRAIN.__dict__, "prefix_cache": pc})
        editor, tr = prepared_editor(model, tok, edits, cfg, EditorConfig(layer=1, generator="linear"), 0.3)
        losses = tr.batch_loss(list(range(len(tr.seqs))))
        losses["total"].backward()
        out[pc] = ({k: float(v.detach()) for k, v in losses.items()}, [p.grad.clone() for p in editor.generator.parameters()])
    assert out[False][0]["loc"] > 1e-4
    for k, v in out[False][0].items():
        assert out[True][0][k] == pytest.approx(v, rel=1e-4, abs=1e-6)
    for a, b in zip(out[False][1], out[True][1], strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_prefix_rows_are_shared_exactly_by_equal_token_prefixes(tiny_pair):
    """Two prefix tokens of the training sequences share a key/value row exactly when the token
    lists up to them are equal (oracle: the token tuples themselves); the tiny edits' sequences
    do share some (several begin with their subject), and each shared row holds the keys/values
    that every sequence using it would compute alone."""
    from lks.suffix import prefix_rows
    from lks.utils import starts

    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="gated"))
    cfg = TrainConfig(**{**TRAIN.__dict__, "epochs": 1, "prefix_cache": True})
    seqs = Trainer(editor, cfg).prepare(tiny_edits(), progress=False).seqs
    index, n_rows = prefix_rows([s.ids for s in seqs], [s.subj_pos for s in seqs])
    offsets, total = starts(s.subj_pos for s in seqs)
    assert index.shape == (total,)
    key_of = {}  # row -> the token tuple it stands for
    for s, o in zip(seqs, offsets):
        for t in range(s.subj_pos):
            assert key_of.setdefault(int(index[o + t]), tuple(s.ids[:t + 1])) == tuple(s.ids[:t + 1])
    assert len(key_of) == n_rows == len({tuple(s.ids[:t + 1]) for s in seqs for t in range(s.subj_pos)})
    assert n_rows < total  # some rows really are shared
    alone = [editor.fast.precompute([s], cfg, progress=False) for s in seqs]
    cache = editor.fast.precompute(seqs, cfg, progress=False)
    assert cache.prefix.n_rows == n_rows and cache.prefix.rows.shape[0] == n_rows
    assert torch.equal(cache.prefix.index, index) and cache.prefix.offsets == offsets
    for j, (s, o) in enumerate(zip(seqs, offsets)):
        if s.subj_pos:
            assert (cache.prefix.rows[index[o:o + s.subj_pos]] - alone[j].prefix.rows).abs().max().item() < 1e-5


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_shape_quantisation_changes_no_loss_or_gradient(tiny_pair, prefix_cache, monkeypatch):
    """Padding rows, tokens, prefix and logit rows to SHAPE_QUANTA (dummy rows included) leaves
    the losses and the generator's gradients as they are."""
    import lks.training.fastpath as FP
    from lks.training.precision import SHAPE_QUANTA

    model, tok = tiny_pair
    cfg = TrainConfig(**{**TRAIN.__dict__, "prefix_cache": prefix_cache})
    editor, tr = prepared_editor(model, tok, tiny_edits(), cfg, EditorConfig(layer=1, generator="linear"), 0.3)
    batch = list(range(len(tr.seqs)))
    monkeypatch.setattr(FP, "LENGTH_BUCKETS", 1)  # one block of the whole batch, so that ...
    assert len(batch) % SHAPE_QUANTA[0] != 0      # ... dummy rows are really added
    out = {}
    for q in (False, True):
        editor.fast.quantize_shapes = q
        editor.generator.zero_grad()
        losses = tr.batch_loss(batch)
        losses["total"].backward()
        out[q] = ({k: float(v.detach()) for k, v in losses.items()}, [p.grad.clone() for p in editor.generator.parameters()])
    assert all(math.isfinite(v) for v in out[True][0].values()) and out[False][0]["loc"] > 1e-4
    for k, v in out[False][0].items():
        assert out[True][0][k] == pytest.approx(v, rel=1e-5, abs=1e-6)
    for a, b in zip(out[False][1], out[True][1], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_round_up():
    from lks.training.precision import round_up

    assert [round_up(n, 8) for n in (1, 7, 8, 9, 16)] == [8, 8, 8, 16, 16]
    assert round_up(5, 1) == 5


def test_route_finds_non_ascii_subjects_split_across_byte_tokens(tiny_pair):
    """"é" is two byte-level tokens for the tiny tokenizer: each decodes to U+FFFD on its own."""
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="residual"))
    edits = EditSet([EditRecord(subject="Zoë Café", prompt="Zoë Café plays the", target="piano", case_id=0),
                     EditRecord(subject="Toko Yasuda", prompt="Toko Yasuda plays the", target="harp", case_id=1)])
    editor.set_edits(edits)
    prompts = ["The friend of Zoë Café plays the", "Toko Yasuda plays the", "Nobody here"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert any("\ufffd" in editor.router.piece(int(t)) for t in tok("é")["input_ids"])  # really split
    rows, pos, subj = editor.route(enc["input_ids"], enc["attention_mask"])
    assert rows == [0, 1] and [editor.subjects[i] for i in subj] == ["Zoë Café", "Toko Yasuda"]
    ids = enc["input_ids"][0].tolist()
    mask = enc["attention_mask"][0].tolist()
    real = [t for t, m in zip(ids, mask) if m]
    # the routed token is the last one of the subject: the prefix up to it decodes to "... Zoë Café"
    upto = [t for j, (t, m) in enumerate(zip(ids, mask)) if m and j <= pos[0]]
    assert tok.decode(upto).endswith("Zoë Café") and len(upto) < len(real)


def test_prefix_cache_at_the_last_layer_is_a_no_op(tiny_pair):
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=2, generator="residual"))  # 3 layers: nothing above
    hist = editor.fit(tiny_edits(), TrainConfig(**{**TRAIN.__dict__, "epochs": 1, "prefix_cache": True}), progress=False)
    assert len(hist) == 1 and math.isfinite(hist[0]["loss"])


@pytest.mark.parametrize("scale", [1.0, 5.0, 20.0])
def test_log_tail_is_the_log_mass_outside_the_top_k(scale):
    """log_tail sums the inside mass instead of a logsumexp over the complement (the oracle here);
    peaked rows (scale 20) leave almost nothing outside, and a row with everything inside gives -inf."""
    g = torch.Generator().manual_seed(2)
    lp = torch.log_softmax(torch.randn(32, 5000, generator=g) * scale, -1)
    top, idx = lp.topk(256, -1)
    oracle = lp.double().scatter(-1, idx, float("-inf")).logsumexp(-1)
    got = log_tail(top, lp.shape[-1])
    assert got.dtype == lp.dtype
    # absolute error in probability mass about 1e-6 (the float32 log-softmax's normalisation)
    assert torch.allclose(got.double().exp(), oracle.exp(), atol=2e-6, rtol=1e-4)
    big = oracle > -7  # a tail of mass > 9e-4: its log to 0.5%
    assert big.any() or scale > 10  # peaked rows (scale 20) have no such tail
    assert torch.allclose(got.double()[big], oracle[big], atol=5e-3)
    everything = torch.log_softmax(torch.randn(2, 8, generator=g), -1)
    assert torch.isneginf(log_tail(everything.topk(8, -1).values, 8)).all()


@pytest.mark.parametrize("scale", [1.0, 3.0, 8.0])
def test_topk_kl_equals_the_coarse_grained_kl_and_its_gradient(scale):
    """topk_kl takes the edited tail as 1 - top-k mass (no vocabulary-sized log-softmax); it must equal
    the KL of the two coarse-grained distributions computed the direct way, value and gradient."""
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(16, 2000, generator=g) * scale
    new = ref + torch.randn(16, 2000, generator=g) * 0.3
    lp = torch.log_softmax(ref, -1)
    top, idx = lp.topk(50, -1)
    tail = lp.scatter(-1, idx, float("-inf")).logsumexp(-1)
    a, b = new.clone().requires_grad_(), new.clone().requires_grad_()
    fast = topk_kl(top, idx, tail, a)
    lq = torch.log_softmax(b, -1)
    lq_tail = lq.scatter(-1, idx, float("-inf")).logsumexp(-1)
    direct = ((top.exp() * (top - lq.gather(-1, idx))).sum(-1) + tail.exp() * (tail - lq_tail)).mean()
    fast.backward()
    direct.backward()
    assert float(fast.detach()) == pytest.approx(float(direct.detach()), rel=1e-4, abs=1e-7)
    assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-7)


def test_feature_states_keep_input_order_across_length_sorted_batches(tiny_pair):
    """Texts run in order of length, in batches: each row is still its own text's state."""
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="residual"))
    texts = ["Toko Yasuda plays the piano and the guitar in a band", "Paris", "The capital of France is Paris",
             "Berlin is in Germany", "Danielle Darrieux"]
    batched = editor.fast.states_at_last_token(texts, batch_size=2)
    alone = torch.cat([editor.fast.states_at_last_token([t]) for t in texts])
    assert batched.shape == (len(texts), editor.d)
    assert (batched - alone).abs().max().item() < 1e-4
    assert (alone[0] - alone[1]).abs().max().item() > 1e-3  # the texts' states differ: order matters


@pytest.mark.parametrize("chunk,pad", [(7, 0), (7, 4), (256, 0)])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_fused_head_losses_equal_autograd_values_and_gradients(chunk, pad, scale):
    """lks.headloss computes the output layer + loss in chunks with the logit gradient in closed form;
    per-row values and the gradient to the hidden rows must equal autograd through F.linear +
    cross_entropy / topk_kl (float32), with and without a reference tail, in any row chunking."""
    g = torch.Generator().manual_seed(2)
    n, d, vocab = 23, 12, 300
    weight, bias = torch.randn(vocab, d, generator=g) * scale / 4, torch.randn(vocab, generator=g)
    hidden = torch.randn(n, d, generator=g)
    target = torch.randint(0, vocab, (n,), generator=g)
    w_row = torch.rand(n, generator=g)  # a weighted sum: row gradients scaled differently
    lp = torch.log_softmax(torch.randn(n, vocab, generator=g) * scale, -1)
    cases = [("nll", None)] + [("kl", k) for k in (20, vocab)]  # k = vocab: no tail bucket
    for kind, k in cases:
        a, b = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        if kind == "nll":
            fused = head_nll(a, weight, bias, target, chunk=chunk, pad=pad)
            ref = F.cross_entropy(F.linear(b, weight, bias), target, reduction="none")
        else:
            top, idx = lp.topk(k, -1)
            tail = lp.scatter(-1, idx, float("-inf")).logsumexp(-1)
            fused = head_topk_kl(a, weight, bias, top, idx, tail, chunk=chunk, pad=pad)
            ref = torch.stack([topk_kl(top[i:i + 1], idx[i:i + 1], tail[i:i + 1], F.linear(b[i:i + 1], weight, bias))
                               for i in range(n)])
        assert torch.allclose(fused, ref, rtol=1e-5, atol=1e-6), (kind, k)
        (fused * w_row).sum().backward()
        (ref * w_row).sum().backward()
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), (kind, k)


@pytest.mark.parametrize("quantize", [False, True])
def test_batch_loss_with_fused_head_equals_the_autograd_losses(tiny_pair, quantize, monkeypatch):
    """batch_loss through lks.headloss (chunked, padded rows) gives the losses and generator
    gradients of the same losses built from autograd ops on FastPath.logits."""
    import lks.training.losses as E

    model, tok = tiny_pair
    cfg = TrainConfig(**{**TRAIN.__dict__, "prefix_cache": True})
    editor, tr = prepared_editor(model, tok, tiny_edits(), cfg, EditorConfig(layer=1, generator="linear"), 0.3)
    editor.fast.quantize_shapes = quantize
    monkeypatch.setattr(E, "HEAD_CHUNK", 3)  # several chunks, a ragged last one
    batch = list(range(len(tr.seqs)))
    out = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(E, "head_nll", lambda h, w, b, t, chunk, pad: F.cross_entropy(
                editor.fast.logits(h), t, reduction="none"))
            monkeypatch.setattr(E, "head_topk_kl", lambda h, w, b, lp, idx, tail, chunk, pad: topk_kl(
                lp, idx, tail, editor.fast.logits(h)).expand(h.shape[0]))
        editor.generator.zero_grad(set_to_none=True)
        losses = tr.batch_loss(batch)
        losses["total"].backward()
        out.append(({k: float(v.detach()) for k, v in losses.items()}, [p.grad.clone() for p in editor.generator.parameters()]))
    assert out[0][0]["loc"] > 1e-4 and out[0][0]["edit"] > 1e-2
    for k, v in out[1][0].items():
        assert out[0][0][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    for a, b in zip(out[0][1], out[1][1], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("generator", ["linear", "gated"])
def test_backward_block_by_block_equals_the_whole_batch_graph(tiny_pair, generator):
    """batch_loss(backward=True), which backpropagates each block of the step on its own, gives the
    losses and generator gradients of one backward through the whole batch's graph (the losses
    KL after the target and, gated, the gate loss included)."""
    from lks.training.fastpath import step_blocks

    model, tok = tiny_pair
    cfg = TrainConfig(**{**TRAIN.__dict__, "prefix_cache": True, "w_after": 0.5, "after_tokens": 2, "w_gate": 0.7})
    editor, tr = prepared_editor(model, tok, tiny_edits(), cfg, EditorConfig(layer=1, generator=generator), 0.3)
    batch = list(range(len(tr.seqs)))
    assert len(step_blocks(tr.seqs, batch, True)) >= 2  # the blocks really run apart
    out = []
    for by_block in (False, True):
        editor.generator.zero_grad(set_to_none=True)
        losses = tr.batch_loss(batch, backward=by_block)
        if not by_block:
            losses["total"].backward()
        out.append(({k: float(v.detach()) for k, v in losses.items()}, [p.grad.clone() for p in editor.generator.parameters()]))
    assert out[0][0]["loc"] > 1e-4 and out[0][0]["after"] > 1e-6 and (generator != "gated" or out[0][0]["gate"] > 1e-3)
    for k, v in out[0][0].items():
        assert out[1][0][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert all(bool(g.abs().sum() > 0) for g in out[0][1])
    for a, b in zip(out[0][1], out[1][1], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_para_per_edit_adds_bank_paraphrases_to_the_equivalence_loss(tiny_pair):
    from lks.training.prompts import training_paraphrase_prompts
    from lks.training.sequences import KIND_EQUIV, build_sequences

    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="residual"))
    edits = tiny_edits()
    editor.set_edits(edits)
    counts = {}
    for k in (0, 2):
        per_edit, seqs, _ = build_sequences(tok, editor.scope, edits, TrainConfig(**{**TRAIN.__dict__, "para_per_edit": k}))
        counts[k] = [sum(seqs[j].kind == KIND_EQUIV for j in js) for js in per_edit]
    extra = [len(training_paraphrase_prompts(r, 2)) for r in edits]
    assert extra[0] == 2  # "The mother tongue of {} is" is in the shipped bank
    assert counts[0] == [1, 1, 1] and counts[2] == [1 + e for e in extra]
    # train_rephrase=False drops exactly the edit's own rephrases[0], keeps the bank prompts
    held = TrainConfig(**{**TRAIN.__dict__, "para_per_edit": 2, "train_rephrase": False})
    def equiv_ids(cfg):
        per_edit, seqs, _ = build_sequences(tok, editor.scope, edits, cfg)
        return [sorted(seqs[j].ids for j in js if seqs[j].kind == KIND_EQUIV) for js in per_edit]

    with_own = equiv_ids(TrainConfig(**{**TRAIN.__dict__, "para_per_edit": 2}))
    own = [tok(f"{r.rephrases[0]} {r.target}")["input_ids"] for r in edits]
    assert all(o in w for o, w in zip(own, with_own))
    assert equiv_ids(held) == [[x for x in w if x != o] for w, o in zip(with_own, own)]


def test_evaluation_labels_rephrase0_held_out_when_training_held_it_out(tiny_pair):
    from lks.metrics import evaluate_edits

    model, tok = tiny_pair
    one = EditSet([dataclasses.replace(r, rephrases=r.rephrases[:1], neighborhood=[]) for r in tiny_edits()])  # zsRE-like
    for train_rephrase, split in ((True, "seen"), (False, "held-out")):
        editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="residual"))
        editor.fit(one, TrainConfig(**{**TRAIN.__dict__, "epochs": 1, "train_rephrase": train_rephrase}), progress=False)
        _, s = evaluate_edits(editor, one)
        assert s["generality_seen_split"] == s["generality_split"] == split
        assert s["generality"] == s["generality_seen"]
    # the three rephrases[0] phrasings: two are in the shipped bank, "The instrument {} plays is the" is not
    bank = paraphrase_templates()
    assert [subject_template(r.rephrases[0], r.subject) not in bank for r in one] == [False, False, True]
    assert s["generality_seen_new_phrasing_n"] == 1


def test_gated_generator_learns_its_gate_from_the_gate_loss(tiny_pair, tmp_path):
    """The gate opens on the edit prompts and closes on the gate-only locality prompts; their
    cached blocks are the model's own layer-L states at the subject's last token, and a prompt
    that shares an edit prompt's tokens up to the subject (so its block) is no negative."""
    from lks.data import subject_positions
    from lks.hooks import LayerHooks
    from lks.training.prompts import training_locality_prompts
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="gated", mlp_ratio=2))
    edits = tiny_edits()
    cfg = dataclasses.replace(TRAIN, epochs=40, patience=40, gate_negatives=6)
    hist = editor.fit(edits, cfg, progress=False)
    assert hist[-1]["gate"] < hist[0]["gate"] / 2
    gate = Trainer(editor, cfg).prepare(edits, progress=False).gate  # the fit's gate examples, built again

    def blocks(prompts, subjects):
        enc, pos = subject_positions(tok, prompts, subjects)
        with torch.no_grad(), LayerHooks(model, capture=[1]) as hooks:
            model(**enc)
        return hooks.captured[1][torch.arange(len(prompts)), pos]

    # every negative is one of its subject's 6 candidates (after the 2 KL prompts), in order
    cands = {i: training_locality_prompts(r, 8, 0, "builtin")[2:] for i, r in enumerate(edits)}
    used = []
    for kb, i in zip(gate.kb, gate.subj.tolist()):
        match = [p for p, c in zip(cands[i], blocks(cands[i], [edits[i].subject] * 6)) if torch.allclose(kb, c, atol=1e-5)]
        assert match
        used.append((i, match[0]))
    # each subject has a training prompt that starts with it ("Toko Yasuda plays the", "Danielle
    # Darrieux's native language is", ...): "Toko Yasuda was born in" has its very block
    for i, r in enumerate(edits):
        assert [p for j, p in used if j == i] == [p for p in cands[i] if not p.startswith(r.subject)]
    assert len(used) < 18
    table = editor.kb_table()
    with torch.no_grad():
        open_ = torch.sigmoid(editor.generator.gate_logit(blocks([r.prompt for r in edits], [r.subject for r in edits]), table[:, 48:]))
        shut = torch.sigmoid(editor.generator.gate_logit(gate.kb, table[gate.subj][:, 48:]))
    assert open_.mean() > 0.5 > shut.mean()  # on average: "The religion of {} is" is close to edit 1
    loaded = LKSEditor.load(editor.save(tmp_path / "gated"), model, tok)
    prompts = [r.prompt for r in edits] + ["The capital of France is"]
    assert torch.equal(loaded.kb_table(), table)
    assert loaded.generate(prompts, max_new_tokens=4) == editor.generate(prompts, max_new_tokens=4)
    assert editor.generate(prompts, max_new_tokens=4) != editor.generate(prompts, max_new_tokens=4, edited=False)


def test_gate_prefixes_put_another_edits_statement_before_the_gate_examples(tiny_pair):
    from lks.data import subject_positions
    from lks.hooks import LayerHooks
    model, tok = tiny_pair
    edits = tiny_edits()
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="gated", mlp_ratio=2))
    cfg = dataclasses.replace(TRAIN, epochs=1, gate_negatives=0, gate_steps=0)
    assert len(Trainer(editor, cfg).prepare(edits, progress=False).gate.kb) == 0  # no negatives, no prefixes
    gate = Trainer(editor, dataclasses.replace(cfg, gate_prefixes=2)).prepare(edits, progress=False).gate
    label, subj = gate.label, gate.subj
    # each copy: the edit prompt and its trained rephrase (open), one locality prompt (closed,
    # unless it shares its block with a positive), behind another subject's statement
    assert int((label == 1).sum()) % 2 == 0 and 0 < int((label == 1).sum()) <= 12
    assert int((label == 0).sum()) <= 6
    for i, r in enumerate(edits):
        enc, pos = subject_positions(tok, [r.prompt, r.rephrases[0]], [r.subject] * 2)
        with torch.no_grad(), LayerHooks(model, capture=[1]) as hooks:
            model(**enc)
        plain = hooks.captured[1][torch.arange(2), pos]
        for kb in gate.kb[(subj == i) & (label == 1)]:  # the prefix changes the block
            assert not any(torch.allclose(kb, p, atol=1e-4) for p in plain)
