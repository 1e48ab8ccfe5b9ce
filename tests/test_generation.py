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


def after_sequences(tiny_pair, cfg: TrainConfig) -> tuple[LKSEditor, list]:
    """A residual editor on the tiny model with the tiny edits set, and their training sequences
    under ``cfg`` (continuations pending)."""
    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="residual"))
    editor.set_edits(tiny_edits())
    return editor, build_sequences(tok, editor.scope, tiny_edits(), cfg)[1]


def assert_same_cache(got, want, seqs) -> None:
    """Layer-L states to 1e-5 and KL references (same top-k ids, log-probs to 1e-4) of every sequence."""
    assert sorted(got.ref_row) == sorted(want.ref_row)
    for j, q in enumerate(seqs):
        n = len(q.ids) - got.first[j]
        assert (got.at(j, got.first[j], n) - want.at(j, want.first[j], n)).abs().max().item() < 1e-5
        if j in got.ref_row:
            k = len(q.loss_pos) - len(q.loss_tgt)
            a, b = got.ref_row[j], want.ref_row[j]
            assert torch.equal(got.ref_idx[a:a + k], want.ref_idx[b:b + k])
            assert (got.ref_logp[a:a + k] - want.ref_logp[b:b + k]).abs().max().item() < 1e-4


def test_after_target_rows_follow_the_unedited_greedy_continuation(tiny_pair):
    """With after_tokens = 3 each edit/paraphrase sequence is built with 2 tokens pending, and the
    cache's pass extends it by the unedited model's greedy continuation; its KL rows are the last
    target token and the next two positions."""
    model, tok = tiny_pair
    cfg = after_cfg(after_tokens=3)
    editor, seqs = after_sequences(tiny_pair, cfg)
    _, plain, _ = build_sequences(tok, editor.scope, tiny_edits(), TRAIN)
    assert [q.kind for q in seqs] == [q.kind for q in plain]
    assert [q.to_continue for q in seqs] == [0 if q.kind == KIND_LOC else 2 for q in seqs]
    editor.fast.precompute(seqs, cfg, progress=False)
    for q, p in zip(seqs, plain):
        if q.kind == KIND_LOC:
            assert q == p
            continue
        assert q.ids[:len(p.ids)] == p.ids and len(q.ids) == len(p.ids) + 2 and q.loss_tgt == p.loss_tgt
        assert q.to_continue == 0
        last = len(p.ids) - 1  # the target's last token
        assert q.loss_pos == p.loss_pos + [last, last + 1, last + 2]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([q.ids])).logits[0]
        assert logits[last:-1].argmax(-1).tolist() == q.ids[last + 1:]  # greedy: each new token is the argmax


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_continuation_in_the_cache_pass_caches_what_the_extended_sequences_give(tiny_pair, prefix_cache):
    """The one-pass continuation (a key/value-cached decode after "prompt target") fills the cache
    with what the plain precompute of the already extended sequences computes: layer-L states,
    reference top-k log-probs at every KL row, prefix keys/values."""
    cfg = after_cfg(after_tokens=4, prefix_cache=prefix_cache)
    editor, seqs = after_sequences(tiny_pair, cfg)
    fused = editor.fast.precompute(seqs, cfg, batch_size=3, progress=False)  # batches of unequal lengths
    assert all(q.to_continue == 0 for q in seqs) and any(q.kind != KIND_LOC for q in seqs)
    plain = editor.fast.precompute(seqs, cfg, progress=False)  # nothing pending now: the full passes
    assert_same_cache(fused, plain, seqs)
    if prefix_cache:
        assert (fused.prefix.rows - plain.prefix.rows).abs().max().item() < 1e-5


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


def test_continuation_stops_after_an_end_of_sequence_token(tiny_pair, monkeypatch):
    """A continuation is cut after the end-of-sequence token, its KL rows with it, and the cache
    still equals the plain precompute of the cut sequences."""
    _, tok = tiny_pair
    cfg = after_cfg(after_tokens=4)
    editor, seqs = after_sequences(tiny_pair, cfg)
    j = next(i for i, q in enumerate(seqs) if q.kind != KIND_LOC)
    n0, before = len(seqs[j].ids), [dataclasses.replace(q) for q in seqs]
    editor.fast.precompute(seqs, cfg, progress=False)
    eos = seqs[j].ids[n0 + 1]  # the second token the unedited model appends to sequence j
    assert eos not in seqs[j].ids[:n0 + 1]
    monkeypatch.setattr(type(tok), "eos_token_id", property(lambda self: eos), raising=False)
    seqs = before
    fused = editor.fast.precompute(seqs, cfg, progress=False)
    assert len(seqs[j].ids) == n0 + 2 and seqs[j].ids[-1] == eos
    assert seqs[j].loss_pos[len(seqs[j].loss_tgt):] == [n0 - 1, n0, n0 + 1]  # 3 of the 4 KL rows are left
    assert_same_cache(fused, editor.fast.precompute(seqs, cfg, progress=False), seqs)


def test_a_store_left_before_the_continuation_resumes_to_the_same_training_set(tiny_pair, tmp_path, monkeypatch):
    """A fit stopped after its sequences were stored (continuations still pending) and before its
    layer-L cache: the resumed preparation generates the continuations from the stored sequences,
    and its sequences and cache equal those of a preparation never stopped (the oracle: no store);
    the store then holds the extended sequences."""
    from lks.training import stored
    from lks.training.trainer import Trainer

    cfg = after_cfg(after_tokens=3)
    editor, _ = after_sequences(tiny_pair, cfg)
    want = Trainer(editor, cfg).prepare(tiny_edits(), progress=False)
    store = tmp_path / "prepared"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(editor.fast, "precompute", stop)
    with pytest.raises(KeyboardInterrupt):
        Trainer(editor, cfg).prepare(tiny_edits(), progress=False, store=store)
    left = stored.load_sequences(store)
    assert left is not None and any(q.to_continue for q in left[1]) and stored.load_cache(store) is None
    monkeypatch.undo()
    got = Trainer(editor, cfg).prepare(tiny_edits(), progress=False, store=store)
    assert [(q.ids, q.loss_pos, q.to_continue) for q in got.seqs] == [(q.ids, q.loss_pos, 0) for q in want.seqs]
    assert_same_cache(got.cache, want.cache, want.seqs)
    again = stored.load_sequences(store)
    assert again is not None and [q.ids for q in again[1]] == [q.ids for q in want.seqs]


def test_references_taken_in_row_chunks_equal_one_pass(tiny_pair, monkeypatch):
    """The reference pass takes its vocabulary-sized logits ``REF_CHUNK`` rows at a time; with
    chunks of one row the cache holds what one chunk per batch gives (the oracle: the tiny tests'
    batches never reach the default 256 rows, so the default is one chunk), ids in uint16."""
    import lks.training.fastpath as fp

    cfg = after_cfg(after_tokens=3)
    editor, seqs = after_sequences(tiny_pair, cfg)
    whole = editor.fast.precompute(seqs, cfg, progress=False)
    assert max(len(q.loss_pos) for q in seqs) * len(seqs) < fp.REF_CHUNK  # one chunk per batch
    editor, seqs = after_sequences(tiny_pair, cfg)
    monkeypatch.setattr(fp, "REF_CHUNK", 1)
    rows = editor.fast.precompute(seqs, cfg, progress=False)
    assert whole.ref_idx.dtype == torch.uint16
    assert_same_cache(rows, whole, seqs)


def test_token_ids_take_the_narrowest_dtype_that_holds_every_id():
    """uint16 holds ids 0..65,535 (a vocabulary of up to 2**16), int32 beyond; each holds the
    vocabulary's largest id exactly (oracle: the dtype's own range)."""
    from lks.training.fastpath import token_id_dtype

    for vocab in (32_000, 49_152, 2**16, 2**16 + 1, 128_256):
        dtype = token_id_dtype(vocab)
        assert dtype == (torch.uint16 if vocab <= 2**16 else torch.int32), vocab
        assert torch.iinfo(dtype).max >= vocab - 1
        assert int(torch.tensor([vocab - 1], dtype=torch.int64).to(dtype).long()) == vocab - 1
