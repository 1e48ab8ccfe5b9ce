"""Same seed, same thread count: the same editor bit for bit (LKS and MEMIT fits on two threads).

The oracle is the first fit itself: a second fit, and a fit interrupted and resumed, must equal it
exactly (``torch.equal``, not a tolerance). Before ``lks.utils.take_rows`` the gradients of a
repeated index were summed in the order threads reached them, so these fits differed in the last
bits (and, compounded over epochs, by up to 0.011 in a weight on the embedded model).
The model is wider than the other tests' (hidden 128): with fewer elements than about 10,000 the
CPU kernel that varied runs on one thread and the test could not fail. Checked: without the fix the
two LKS tests fail every time, the MEMIT one, which compares three fits, in 3 of 4 runs (thread timing decides).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import PLAIN_TRAIN, TINY_CORPUS, interrupted_at_step, make_tiny_llama, make_tiny_tokenizer
from test_editor import tiny_edits

from lks.baselines.memit import MEMITConfig, MEMITEditor
from lks.config import EditorConfig, TrainConfig
from lks.data import EditRecord, EditSet
from lks.editor import LKSEditor


@pytest.fixture()
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def wide_pair():
    tok = make_tiny_tokenizer()
    return make_tiny_llama(layers=3, hidden=128, vocab=len(tok)), tok


# the registered recipe's moving parts: gated generator, its warm-up (2,048 rows a step), the KL
# after the target, bank paraphrases, prefix cache
TRAIN = TrainConfig(**{**PLAIN_TRAIN, "w_after": 1.0, "after_tokens": 2, "gate_prefixes": 1, "gate_negatives": 2,
                       "para_per_edit": 2, "prefix_cache": True},
                    gate_steps=20, lr=1e-2, epochs=3, batch_size=2, loc_per_subject=2, loc_topk=50, patience=10, seed=0)
EDITOR = EditorConfig(layer=1, generator="gated")


def weights(editor: LKSEditor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in editor.generator.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"weights differ (max abs difference per tensor): {differ}"


def test_two_lks_fits_on_two_threads_are_identical(wide_pair, two_threads, tmp_path):
    model, tok = wide_pair
    first, second = LKSEditor(model, tok, EDITOR), LKSEditor(model, tok, EDITOR)
    first.fit(tiny_edits(), TRAIN, progress=False)
    second.fit(tiny_edits(), TRAIN, progress=False)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    assert_identical(weights(first), weights(second))
    first.save(tmp_path / "ed")
    assert LKSEditor.load(tmp_path / "ed", model, tok).fit_threads == 2  # recorded with the editor


def test_an_interrupted_and_resumed_lks_fit_equals_an_uninterrupted_one(wide_pair, two_threads, tmp_path, monkeypatch):
    monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = wide_pair
    full = LKSEditor(model, tok, EDITOR)
    full.fit(tiny_edits(), TRAIN, progress=False)

    with interrupted_at_step(5), pytest.raises(KeyboardInterrupt):  # 2 steps per epoch: the first of epoch 3
        LKSEditor(model, tok, EDITOR).fit(tiny_edits(), TRAIN, checkpoint_dir=tmp_path / "ck", progress=False)
    resumed = LKSEditor(model, tok, EDITOR)
    resumed.fit(tiny_edits(), TRAIN, checkpoint_dir=tmp_path / "ck", progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert_identical(weights(resumed), weights(full))


def test_two_memit_fits_on_two_threads_are_identical(wide_pair, two_threads, tmp_path, monkeypatch):
    monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TINY_CORPUS * 40))
    model, tok = wide_pair
    words = [w for line in TINY_CORPUS for w in line.split()]
    # 160 edits, 3 rows each (the prompt and two prefixed copies), 512 rows a chunk: enough to run threaded
    edits = EditSet([EditRecord(f"{words[i % len(words)]} {i}", f"The guitar of {words[i % len(words)]} {i}",
                                words[(i + 2) % len(words)], "x") for i in range(160)])
    cfg = MEMITConfig(layers=[0, 1], cov_tokens=1024, corpus=str(corpus), z_steps=12, z_lr=0.5, clamp=50.0,
                      n_prefixes=2, prefix_tokens=4, kl_weight=0.1, weight_decay=0.0, lam=1e-2, batch_rows=512)
    deltas = []
    for run in range(3):  # a varying sum shows in most runs, not all: a third fit catches more
        monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / f"cache{run}"))  # targets computed, not read back
        editor = MEMITEditor(model, tok, dataclasses.replace(cfg))
        editor.fit(edits, progress=False)
        deltas.append({str(k): v.clone() for k, v in editor.deltas.items()})
    assert_identical(deltas[0], deltas[1])
    assert_identical(deltas[0], deltas[2])
    editor.save(tmp_path / "memit")
    assert MEMITEditor.load(tmp_path / "memit", model, tok).fit_threads == 2
