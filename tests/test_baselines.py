"""Weight-editing baselines (lks.baselines) on the tiny random Llama: the closed forms against
independent solves, the constraints, applied/save/load, and that a fitted edit takes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import TINY_CORPUS, make_tiny_llama

from lks.baselines.alphaedit import (
    AlphaEditConfig,
    AlphaEditEditor,
    AlphaEditSeqConfig,
    AlphaEditSeqEditor,
    alphaedit_update,
    null_space_projector,
)
from lks.baselines.common import down_proj
from lks.baselines.ft import FTConfig, FTEditor
from lks.baselines.memit import MEMITConfig, MEMITEditor, memit_update
from lks.data import EditRecord, EditSet
from lks.methods import load_editor

# the subject ends each prompt: on a random 3-layer model a change at an earlier token barely
# reaches the last position's prediction
EDITS = EditSet([EditRecord("Danielle Darrieux", "The mother tongue of Danielle Darrieux", "English", "French"),
                 EditRecord("Toko Yasuda", "The guitar of Toko Yasuda", "piano", "guitar")])


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TINY_CORPUS * 40))
    return str(path)


def configs(corpus: str) -> dict:
    """Settings that make an edit take on the random tiny model (its hidden states are small)."""
    z = dict(layers=[0, 1], cov_tokens=1024, corpus=corpus, z_steps=40, z_lr=0.5, clamp=50.0, n_prefixes=2,
             prefix_tokens=4, kl_weight=0.0, weight_decay=0.0)
    return {"ft": (FTEditor, FTConfig(layer=1, lr=0.05, steps=40, bound=0.2)),
            "memit": (MEMITEditor, MEMITConfig(lam=1e-2, **z)),
            "alphaedit": (AlphaEditEditor, AlphaEditConfig(threshold=1e-3, alpha=1e-3, **z))}


def next_token(model, tok, prompt: str) -> int:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    return int(model(input_ids=ids).logits[0, -1].argmax())


def test_memit_update_solves_least_squares():
    torch.manual_seed(0)
    n, d_in, d_out, lam = 6, 20, 8, 0.7
    K, R = torch.randn(n, d_in), torch.randn(n, d_out)
    A = torch.randn(d_in, 3 * d_in)
    C = A @ A.T / A.shape[1]
    # oracle: min ||K D^T - R||^2 + lam ||L^T D^T||^2 (C = L L^T) as ONE stacked least-squares problem
    L = torch.linalg.cholesky(C.double())
    stacked = torch.cat([K.double(), lam ** 0.5 * L.T])
    rhs = torch.cat([R.double(), torch.zeros(d_in, d_out, dtype=torch.float64)])
    want = torch.linalg.lstsq(stacked, rhs).solution.T
    assert torch.allclose(memit_update(K, R, C, lam).double(), want, atol=1e-5)


def test_alphaedit_leaves_preserved_keys_unchanged():
    torch.manual_seed(0)
    d_in, d_out = 24, 10
    K0 = torch.randn(d_in, 14) @ torch.randn(14, 500)   # preserved keys span 14 of 24 dimensions
    C = K0 @ K0.T / K0.shape[1]
    P = null_space_projector(C, 1e-3)  # float32 C: the zero eigenvalues come out ~1e-5
    assert round(float(torch.trace(P))) == d_in - 14
    K, R = torch.randn(5, d_in), torch.randn(5, d_out)
    delta = alphaedit_update(K, R, P, alpha=0.1)
    assert float(delta.norm()) > 0.1
    assert float((delta @ K0).norm()) < 1e-4 * float(delta.norm()) * float(K0.norm())
    # oracle: ridge regression in the null space's basis U (delta = Y U^T)
    evals, evecs = torch.linalg.eigh(C.double())
    U = evecs[:, evals < 1e-3]
    KU = K.double() @ U
    Y = torch.linalg.solve(KU.T @ KU + 0.1 * torch.eye(U.shape[1], dtype=torch.float64), KU.T @ R.double()).T
    assert torch.allclose(delta.double(), Y @ U.T, atol=1e-4)


def test_sequential_alphaedit_update_keeps_the_earlier_keys():
    """Eq. 15: with the earlier batches' keys ``Kp``, the update minimises
    ``||D K1^T - R1^T||^2 + ||D Kp^T||^2 + alpha ||D||^2`` over D in the null space. Oracle: that
    problem as one stacked least-squares solve in the null space's basis."""
    torch.manual_seed(1)
    d_in, d_out, alpha = 24, 10, 0.3
    K0 = torch.randn(d_in, 12) @ torch.randn(12, 400)
    P = null_space_projector(K0 @ K0.T / K0.shape[1], 1e-3)
    K1, R1, Kp = torch.randn(5, d_in), torch.randn(5, d_out), torch.randn(7, d_in)
    delta = alphaedit_update(K1, R1, P, alpha, prior=Kp.T @ Kp)
    evals, evecs = torch.linalg.eigh((K0 @ K0.T / K0.shape[1]).double())
    U = evecs[:, evals < 1e-3]
    A = torch.cat([K1.double() @ U, Kp.double() @ U, alpha ** 0.5 * torch.eye(U.shape[1], dtype=torch.float64)])
    rhs = torch.cat([R1.double(), torch.zeros(7 + U.shape[1], d_out, dtype=torch.float64)])
    want = torch.linalg.lstsq(A, rhs).solution.T @ U.T
    assert torch.allclose(delta.double(), want, atol=1e-4)
    assert not torch.allclose(delta, alphaedit_update(K1, R1, P, alpha), atol=1e-3)  # the prior term matters


def test_sequential_alphaedit_batches(tiny_pair, corpus):
    """One batch holding every edit is the single-batch AlphaEdit, to the bit. In batches of one, the
    second batch's targets are optimised on the model the first batch edited: the target cache does
    not hand back the ones optimised for the unedited model; and both edits take."""
    model, tok = tiny_pair
    _, cfg = configs(corpus)["alphaedit"]
    single = AlphaEditEditor(model, tok, cfg)
    single.fit(EDITS, progress=False)
    seq_cfg = AlphaEditSeqConfig(**{**dataclasses.asdict(cfg), "batch_edits": len(EDITS)})
    whole = AlphaEditSeqEditor(model, tok, seq_cfg)
    whole.fit(EDITS, progress=False)
    assert all(torch.equal(whole.deltas[k], single.deltas[k]) for k in single.deltas)

    AlphaEditEditor(model, tok, cfg).fit(EDITS[1:], progress=False)  # caches edit 1's unedited-model target
    ones = AlphaEditSeqEditor(model, tok, dataclasses.replace(seq_cfg, batch_edits=1))
    import lks.baselines.alphaedit as ae

    calls = []
    real = ae.null_space_projector
    ae.null_space_projector = lambda C, t: calls.append(1) or real(C, t)
    try:
        ones.fit(EDITS, progress=False)
    finally:
        ae.null_space_projector = real
    assert len(calls) == len(seq_cfg.layers)  # one projector per layer, not one per layer and batch
    assert [h.get("targets", "optimised") for h in ones.history if "targets" in h or "step" in h][-1] != "cached"
    assert [h["edits"] for h in ones.history if "batch" in h] == [1, 2]
    with ones.applied():
        for r in EDITS:
            target = tok(f"{r.prompt} {r.target}")["input_ids"][len(tok(r.prompt)["input_ids"])]
            assert next_token(model, tok, r.prompt) == target


@pytest.mark.parametrize("norm,bound", [("inf", 2e-3), ("fro", 0.05)])
def test_ft_respects_its_bound(tiny_pair, norm, bound, tmp_path, monkeypatch):
    monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = tiny_pair
    ed = FTEditor(model, tok, FTConfig(layer=1, lr=0.05, steps=5, bound=bound, norm=norm))
    ed.fit(EDITS, progress=False)
    delta = ed.deltas[1]
    size = float(delta.abs().max()) if norm == "inf" else float(delta.norm())
    assert 0.5 * bound < size <= bound * (1 + 1e-5)


def test_ft_does_not_depend_on_how_rows_are_chunked(tiny_pair, tmp_path, monkeypatch):
    """FT-L's loss is a sum over rows: chunks of rows sorted by length (padded to their longest row)
    give the fit of one row at a time (no padding at all)."""
    monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = tiny_pair
    edits = EditSet([*EDITS, EditRecord("Paris", "Paris is the capital of", "Italy", "France"),
                     EditRecord("Toko Yasuda", "Toko Yasuda, a musician who plays the", "piano", "guitar")])
    assert len({len(tok(f"{r.prompt} {r.target}")["input_ids"]) for r in edits}) == len(edits)  # padding happens
    fits, losses = {}, {}
    for rows in (1, 3, 64):
        ed = FTEditor(model, tok, FTConfig(layer=1, lr=0.05, steps=4, bound=0.2, batch_rows=rows))
        ed.fit(edits, progress=False)
        fits[rows], losses[rows] = ed.deltas[1], torch.tensor([h["nll_mean"] for h in ed.history])
    assert float(fits[1].abs().max()) > 0.01 and float(losses[1][0] - losses[1][-1]) > 0.1
    for rows in (3, 64):
        assert torch.allclose(losses[rows], losses[1], rtol=1e-6)
        # Adam divides by the root of the squared gradient: where that is ~0, float rounding of
        # the sums moves an element by up to ~1e-5 (seen: 1 of 4,608 by 5e-6)
        assert torch.allclose(fits[rows], fits[1], atol=3e-5)


def test_ft_minibatch_epochs_equal_a_plain_adam_loop(tiny_pair, tmp_path, monkeypatch):
    """``batch_edits`` > 0 runs ROME's ``ft_main`` schedule: every epoch, one Adam step per minibatch of
    edits in data order, each projected onto the bound. Oracle: that loop written with the model's
    plain forward pass (``functional_call``) and the NLL of the tokens after the prompt."""
    from torch.func import functional_call

    monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = tiny_pair
    edits = EditSet([*EDITS, EditRecord("Paris", "Paris is the capital of", "Italy", "France")])
    cfg = FTConfig(layer=1, lr=0.05, steps=3, bound=0.05, batch_edits=2, stop_nll=1e-9)
    ed = FTEditor(model, tok, cfg)
    ed.fit(edits, progress=False)

    W = down_proj(model, 1).weight
    name = next(n for n, p in model.named_parameters() if p is W)
    delta = torch.zeros_like(W, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)

    def nll(r: EditRecord) -> torch.Tensor:
        n_prompt = len(tok(r.prompt)["input_ids"])
        ids = tok(f"{r.prompt} {r.target}", return_tensors="pt")["input_ids"]
        logits = functional_call(model, {name: W + delta}, (ids,)).logits[0]
        logp = torch.log_softmax(logits[n_prompt - 1:-1].float(), -1)
        return -logp.gather(-1, ids[0, n_prompt:, None]).mean()

    for _ in range(cfg.steps):
        for batch in (edits[0:2], edits[2:3]):
            opt.zero_grad()
            torch.stack([nll(r) for r in batch]).mean().backward()
            opt.step()
            with torch.no_grad():
                delta.clamp_(-cfg.bound, cfg.bound)
    assert float(delta.detach().abs().max()) > 0.01  # it moved
    assert [h["step"] for h in ed.history] == [0, 1, 2]
    assert torch.allclose(ed.deltas[1], delta.detach(), atol=3e-5)


@pytest.mark.parametrize("method", ["ft", "memit", "alphaedit"])
def test_fitted_edit_changes_the_prediction(tiny_pair, corpus, method):
    model, tok = tiny_pair
    cls, cfg = configs(corpus)[method]
    ed = cls(model, tok, cfg)
    ed.fit(EDITS, progress=False)
    r = EDITS[0]
    target = tok(f"{r.prompt} {r.target}")["input_ids"][len(tok(r.prompt)["input_ids"])]
    before = next_token(model, tok, r.prompt)
    with ed.applied():
        after = next_token(model, tok, r.prompt)
    assert before != target and after == target


def test_applied_restores_weights_bit_for_bit(tiny_pair, corpus):
    model, tok = tiny_pair
    cls, cfg = configs(corpus)["memit"]
    ed = cls(model, tok, cfg)
    ed.fit(EDITS, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ed.applied() as stats:
        assert not torch.equal(down_proj(model, 0).weight, before["model.layers.0.mlp.down_proj.weight"])
        model(input_ids=torch.tensor([[3, 4, 5], [6, 7, 8]]))
    assert (stats.calls, stats.rows_seen) == (1, 2)
    with pytest.raises(KeyError):
        with ed.applied():
            raise KeyError("inside")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_save_load_round_trip_and_refusal(tiny_pair, corpus, tmp_path):
    model, tok = tiny_pair
    cls, cfg = configs(corpus)["alphaedit"]
    ed = cls(model, tok, cfg)
    ed.fit(EDITS, progress=False)
    ed.save(tmp_path / "ed")
    back = load_editor(str(tmp_path / "ed"), model, tok)
    assert type(back) is AlphaEditEditor and back.config == ed.config and back.n_edits == 2
    assert all(torch.equal(back.deltas[k], ed.deltas[k]) for k in ed.deltas)
    assert back.generate([EDITS[0].prompt], max_new_tokens=3) == ed.generate([EDITS[0].prompt], max_new_tokens=3)
    other = make_tiny_llama(layers=2, vocab=len(tok))
    with pytest.raises(ValueError, match="was made for model"):
        load_editor(str(tmp_path / "ed"), other, tok)
    with pytest.raises(ValueError, match="holds a 'alphaedit' editor"):
        MEMITEditor.load(tmp_path / "ed", model, tok)


def test_unknown_config_key_is_refused():
    from lks.config import from_dict

    with pytest.raises(ValueError, match="unknown key.*'lamda'"):
        from_dict(MEMITConfig, {"lamda": 1.0})


@pytest.mark.parametrize("name", ["smollm2-135m", "llama2-7b-chat", "mistral-7b-instruct"])
def test_every_registered_model_has_typed_baseline_settings_inside_its_layers(name):
    """Each shipped config's "baselines" section parses into the methods' typed configs (what
    method_config reads for that model) and names layers the model has."""
    from types import SimpleNamespace

    from lks.baselines.common import method_config
    from lks.config import model_spec

    spec, model = model_spec(name), SimpleNamespace(lks_name=name)
    assert set(spec.baselines) == {"ft", "memit", "alphaedit", "alphaedit-seq"}
    for method, cls in (("ft", FTConfig), ("memit", MEMITConfig), ("alphaedit", AlphaEditConfig),
                        ("alphaedit-seq", AlphaEditSeqConfig)):
        cfg = method_config(cls, model, method)
        assert type(cfg) is cls and cfg != cls()  # registered values, not the dataclass defaults
        layers = [cfg.layer] if method == "ft" else cfg.layers
        assert all(0 < layer < spec.num_layers for layer in layers), (name, method, layers)


def test_key_statistics_are_cached(tiny_pair, corpus, monkeypatch):
    from lks.baselines import stats

    model, tok = tiny_pair
    first = stats.key_second_moment(model, tok, [1], 512, corpus=corpus, progress=False)[1]
    # the oracle: E[k k^T] of the down_proj inputs captured by a plain forward pass
    windows = stats.corpus_windows(tok, 512, corpus)
    keys = []
    handle = down_proj(model, 1).register_forward_pre_hook(lambda m, a: keys.append(a[0].reshape(-1, a[0].shape[-1])))
    try:
        model(input_ids=windows)
    finally:
        handle.remove()
    k = torch.cat(keys).double()
    assert torch.allclose(first.double(), k.T @ k / k.shape[0], atol=1e-6)

    def fail(*a, **kw):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(stats, "_accumulate", fail)
    again = stats.key_second_moment(model, tok, [1], 512, corpus=corpus, progress=False)[1]
    assert torch.equal(first, again)


def test_cli_train_and_evaluate_a_baseline(tiny_pair, corpus, tmp_path, monkeypatch, capsys):
    """``train --method ft`` saves a baseline that ``evaluate`` loads; an LKS-only option with a
    baseline method is one ``lks: error:`` line."""
    import json

    import lks
    from lks import cli

    monkeypatch.setattr(lks, "load_model", lambda *a, **k: tiny_pair)
    monkeypatch.setattr("lks.baselines.common.method_config", lambda cls, *a: configs(corpus)["ft"][1])
    data = tmp_path / "edits.json"
    data.write_text(json.dumps([r.to_dict() for r in EDITS]))
    out = tmp_path / "ft"
    assert cli.main(["train", "--method", "ft", "--data", str(data), "--out", str(out), "--evaluate", "false"]) == 0
    assert json.loads((out / "config.json").read_text())["method"] == "ft"
    capsys.readouterr()
    assert cli.main(["evaluate", "--editor", str(out), "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["n_edits"] == 2
    assert cli.main(["train", "--method", "memit", "--lr", "1", "--data", str(data), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("lks: error: --lr: not a setting of --method memit"), err


def test_suffix_pass_equals_the_full_pass(tiny_pair):
    """The target optimisation's suffix-only pass (prefix keys/values cached) gives the same final
    hidden states at the target positions as the plain pass of the upper layers."""
    from lks.baselines.common import encode_rows, suffix_hidden, suffix_part, upper_hidden
    from lks.hooks import layer_output
    from lks.utils import pad_ids

    model, tok = tiny_pair
    texts = ["The mother tongue of Danielle Darrieux is", "Paris is the capital. Toko Yasuda plays the"]
    rows = encode_rows(tok, texts, ["Danielle Darrieux", "Toko Yasuda"], [0, 1], ["English", "piano"])
    torch.manual_seed(0)
    add = torch.randn(2, model.config.hidden_size)
    part = suffix_part(model, 1, rows, tok.pad_token_id, torch.float32)
    fast = suffix_hidden(model, part, add, torch.float32)
    ids, mask = pad_ids([r.ids for r in rows], tok.pad_token_id, torch.device("cpu"))
    h, as_tuple = layer_output(model, ids, mask, 1)
    h = h.clone()
    for b, r in enumerate(rows):
        h[b, r.subj] += add[b]
    full = upper_hidden(model, 1, h, mask, as_tuple)
    for b, (r, q) in enumerate(zip(rows, part.rows)):
        assert torch.allclose(fast[b, q.tgt_pos], full[b, r.tgt_pos], atol=1e-5)


def test_target_chunks_share_prefix_rows_and_equal_the_full_pass(tiny_pair):
    """MEMIT's chunks write into one prefix store: rows whose token lists agree up to a prefix
    token share its stored row (oracle: the token tuples), the store holds what each row computes
    alone, and each chunk's suffix pass still equals the plain pass of the upper layers."""
    from lks.baselines.common import encode_rows, join_rows, suffix_hidden, suffix_part, upper_hidden
    from lks.hooks import layer_output
    from lks.suffix import PrefixKV
    from lks.utils import pad_ids

    model, tok = tiny_pair
    ctx = "Paris is the capital of France. "
    texts = [ctx + "The mother tongue of Danielle Darrieux is", ctx + "Toko Yasuda plays the",
             "The mother tongue of Danielle Darrieux is", ctx + "The mother tongue of Danielle Darrieux is"]
    subjects = ["Danielle Darrieux", "Toko Yasuda", "Danielle Darrieux", "Danielle Darrieux"]
    rows = encode_rows(tok, texts, subjects, [0, 1, 0, 0], ["English", "piano", "English", "English"])
    store = PrefixKV.plan([r.ids for r in rows], [r.subj for r in rows])
    distinct = {tuple(r.ids[:t + 1]) for r in rows for t in range(r.subj)}
    assert store.n_rows == len(distinct) < sum(r.subj for r in rows)
    torch.manual_seed(0)
    add = torch.randn(len(rows), model.config.hidden_size)
    parts = [(seq, suffix_part(model, 1, [rows[q] for q in seq], tok.pad_token_id, torch.float32, store, seq))
             for seq in ([0, 1], [2, 3])]
    for q, r in enumerate(rows):  # each stored row equals the row's own keys/values
        alone = suffix_part(model, 1, [r], tok.pad_token_id, torch.float32).prefix
        o = store.offsets[q]
        assert (store.rows[store.index[o:o + r.subj]] - alone.rows).abs().max().item() < 1e-5
    for seq, part in parts:
        fast = suffix_hidden(model, part, add[seq], torch.float32)
        chunk = [rows[q] for q in seq]
        ids, mask = pad_ids([r.ids for r in chunk], tok.pad_token_id, torch.device("cpu"))
        h, as_tuple = layer_output(model, ids, mask, 1)
        h = h.clone()
        for b, (q, r) in enumerate(zip(seq, chunk)):
            h[b, r.subj] += add[q]
        full = upper_hidden(model, 1, h, mask, as_tuple)
        for b, (r, pr) in enumerate(zip(chunk, part.rows)):
            assert torch.allclose(fast[b, pr.tgt_pos], full[b, r.tgt_pos], atol=1e-5)
    # rows joined across the two parts (MEMIT's repacked chunks) run as they did in their own parts
    (seq_a, a), (seq_b, b) = parts
    joined = join_rows([(b, 1), (a, 0), (b, 0)])
    fast = suffix_hidden(model, joined, add[[seq_b[1], seq_a[0], seq_b[0]]], torch.float32)
    own = {q: (suffix_hidden(model, part, add[seq], torch.float32), k) for seq, part in parts for k, q in enumerate(seq)}
    for r, q in enumerate([seq_b[1], seq_a[0], seq_b[0]]):
        out, k = own[q]
        pos = joined.rows[r].tgt_pos
        assert torch.allclose(fast[r, pos], out[k, pos], atol=1e-5)


def test_batched_targets_equal_one_at_a_time(tiny_pair):
    """The batched target optimisation solves each edit's problem as if it were alone (float32)."""
    import dataclasses

    from lks.baselines.memit import context_prefixes, target_vectors

    model, tok = tiny_pair
    cfg = dataclasses.replace(configs("unused")["memit"][1], z_steps=4, precision="float32", stop_nll=0.0,
                              kl_weight=0.5, weight_decay=0.1, clamp=0.5)
    prefixes = context_prefixes(model, tok, cfg)
    both, h = target_vectors(model, tok, EDITS, cfg, 1, prefixes, progress=False)
    for i in range(len(EDITS)):
        alone, h_i = target_vectors(model, tok, EDITS[i:i + 1], cfg, 1, prefixes, progress=False)
        assert torch.allclose(h_i[0], h[i], atol=1e-5)
        assert torch.allclose(alone[0], both[i], atol=1e-4)


def test_targets_are_cached_per_chunk_and_equal_the_whole_batch(tiny_pair, corpus, monkeypatch, tmp_path):
    """A chunked target optimisation (resumable, bounded memory) gives the targets of one batch,
    and a second fit finds every chunk in the cache."""
    import dataclasses

    import lks.baselines.memit as memit
    from lks.baselines.memit import context_prefixes, target_vectors

    model, tok = tiny_pair
    cfg = dataclasses.replace(configs(corpus)["memit"][1], z_steps=4, precision="float32", stop_nll=0.0)
    prefixes = context_prefixes(model, tok, cfg)
    whole, _ = target_vectors(model, tok, EDITS, cfg, 1, prefixes, progress=False)
    monkeypatch.setattr(memit, "TARGET_CHUNK", 1)
    ed = MEMITEditor(model, tok, cfg)
    chunked = ed._targets(EDITS, 1, prefixes, progress=False)
    assert torch.allclose(chunked, whole, atol=1e-4)
    assert len(list((tmp_path / "cache" / "targets").glob("*.safetensors"))) == len(EDITS)
    again = MEMITEditor(model, tok, cfg)
    assert torch.equal(again._targets(EDITS, 1, prefixes, progress=False), chunked)
    assert [h["targets"] for h in again.history] == ["cached"] * len(EDITS)


def _check_resumed_time_to_go(monkeypatch, caplog, ed, run, marker: str) -> list[str]:
    """A resume of five one-edit units (chunks or batches) whose first two have cached targets;
    every other unit's targets take 100 s on a fake clock, everything else none. Oracle: after
    unit k the line marked ``marker`` says n - 1 - k units of 100 s are left. Returns those lines."""
    import logging
    import time

    import lks.baselines.memit as memit

    edits = EditSet([EditRecord(f"Subject {k}", f"The city of Subject {k}", "Paris", "Rome") for k in range(5)])
    clock, cached = [0.0], {0, 1}

    def fake_chunk(self, chunk, layer, prefixes, progress, after):
        i = next(k for k, r in enumerate(edits.records) if r == chunk.records[0])
        if i in cached:
            self.history.append({"targets": "cached"})
        else:
            clock[0] += 100.0
            self.history.append({"step": 0, "edits": len(chunk), "done": len(chunk)})
        return torch.zeros(len(chunk), ed.model.config.hidden_size)

    monkeypatch.setattr(memit, "TARGET_CHUNK", 1)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(MEMITEditor, "_chunk_targets", fake_chunk)
    with caplog.at_level(logging.INFO, logger="lks"):  # every lks line, MEMIT's chunk lines included
        run(edits)
    lines = [r.getMessage() for r in caplog.records if marker in r.getMessage()]
    n = len(edits)
    assert len(lines) == n
    assert all("none computed in this run yet" in line for line in lines[:2])
    for k in range(2, n):
        assert f"about {100 * (n - 1 - k)} s to go" in lines[k], lines[k]
    return lines


def test_target_time_to_go_counts_only_chunks_optimised_in_this_run(tiny_pair, corpus, monkeypatch, caplog):
    """After a resume MEMIT's target time to go follows the pace of the chunks optimised in this
    process: cached chunks take no time and must not dilute it (the bug: 141 s "to go" for eight
    chunks of ~290 s)."""
    model, tok = tiny_pair
    ed = MEMITEditor(model, tok, configs(corpus)["memit"][1])
    _check_resumed_time_to_go(monkeypatch, caplog, ed, lambda e: ed._targets(e, 1, [], progress=False), "target vectors")


def test_sequential_alphaedit_time_to_go_counts_only_batches_optimised_in_this_run(tiny_pair, corpus, monkeypatch,
                                                                                 caplog):
    """The same for sequential AlphaEdit's batches (the bug: "about 3,127 s to go" for 93 batches
    of ~65 s); the solves take no time on the fake clock."""
    model, tok = tiny_pair
    cfg = AlphaEditSeqConfig(**{**dataclasses.asdict(configs(corpus)["alphaedit"][1]), "batch_edits": 1})
    ed = AlphaEditSeqEditor(model, tok, cfg)
    batches = _check_resumed_time_to_go(monkeypatch, caplog, ed, lambda e: ed._fit(e, progress=False),
                                        "AlphaEdit batch")
    # a batch is one target chunk: its line says how the targets came, with no chunk line of its own
    assert "targets cached 0 s" in batches[0] and "targets optimised 100 s" in batches[2], batches
    assert not [r for r in caplog.records if "target vectors" in r.getMessage()]


def test_targets_cache_key_names_rows_per_pass_and_threads(tiny_pair, corpus, tmp_path):
    """Targets optimised with other rows per pass or on another thread count round differently in
    bfloat16, so neither may read the other's cached chunks: each writes chunks of its own, while
    the same settings again write none."""
    from lks.baselines.memit import context_prefixes

    model, tok = tiny_pair
    cfg = dataclasses.replace(configs(corpus)["memit"][1], z_steps=2, precision="float32", stop_nll=0.0)
    prefixes = context_prefixes(model, tok, cfg)
    files = tmp_path / "cache" / "targets"

    def fit_targets(c: MEMITConfig) -> int:
        MEMITEditor(model, tok, c)._targets(EDITS, 1, prefixes, progress=False)
        return len(list(files.glob("*.safetensors")))

    n = fit_targets(cfg)
    assert n > 0 and fit_targets(cfg) == n  # the oracle: the same settings are read back
    assert fit_targets(dataclasses.replace(cfg, batch_rows=cfg.batch_rows + 1)) == 2 * n
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert fit_targets(cfg) == 3 * n
    finally:
        torch.set_num_threads(threads)


def test_an_interrupted_ft_fit_resumes_where_it_stopped(tiny_pair, corpus, monkeypatch):
    """FT-L keeps its state (delta, Adam moments, history) after every step until the fit ends: a
    fit interrupted at step 3 and run again ends where an uninterrupted fit ends (the oracle)."""
    import lks.baselines.ft as ft

    model, tok = tiny_pair
    cfg = FTConfig(layer=1, lr=0.05, steps=6, bound=0.2, stop_nll=1e-9)
    states = Path(corpus).parent / "cache" / "ft"  # the corpus fixture's LKS_CACHE_DIR
    full = FTEditor(model, tok, cfg)
    full.fit(EDITS, progress=False)
    assert not list(states.glob("*.safetensors"))  # a finished fit keeps no state

    real, calls = ft.project, []

    def crash_at_step_3(delta, bound, norm):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(delta, bound, norm)

    monkeypatch.setattr(ft, "project", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        FTEditor(model, tok, cfg).fit(EDITS, progress=False)
    monkeypatch.setattr(ft, "project", real)
    assert len(list(states.glob("*.safetensors"))) == 1

    resumed = FTEditor(model, tok, cfg)
    resumed.fit(EDITS, progress=False)
    assert [h.get("step") for h in resumed.history] == [0, 1, None, 2, 3, 4, 5]  # None: "resumed_at_step"
    assert resumed.history[2] == {"resumed_at_step": 2}
    assert torch.allclose(resumed.deltas[1], full.deltas[1], atol=1e-7)
    assert not list(states.glob("*.safetensors"))


def test_an_interrupted_sequential_alphaedit_fit_resumes_after_its_last_batch(tiny_pair, corpus, monkeypatch):
    """Sequential AlphaEdit keeps its state (updates, earlier keys' term, history) after every batch
    until the fit ends: a fit of three one-edit batches interrupted in its third batch and run again
    solves only that batch and ends, to the bit, where an uninterrupted fit ends (the oracle)."""
    edits = EditSet([*EDITS.records, EditRecord("Apple A5", "Apple A5 was created by", "Apple", "Google")])
    model, tok = tiny_pair
    cfg = AlphaEditSeqConfig(**{**dataclasses.asdict(configs(corpus)["alphaedit"][1]), "batch_edits": 1})
    states = Path(corpus).parent / "cache" / "alphaedit-seq"  # the corpus fixture's LKS_CACHE_DIR
    full = AlphaEditSeqEditor(model, tok, cfg)
    full.fit(edits, progress=False)
    assert not list(states.glob("*.safetensors"))  # a finished fit keeps no state

    real, batches = AlphaEditSeqEditor._spread, []

    def spread(self, batch, *a, **k):
        batches.append(batch.records[0].subject)
        if batches == ["Danielle Darrieux", "Toko Yasuda", "Apple A5"]:
            raise RuntimeError("interrupted in the third batch")
        return real(self, batch, *a, **k)

    monkeypatch.setattr(AlphaEditSeqEditor, "_spread", spread)
    with pytest.raises(RuntimeError, match="interrupted"):
        AlphaEditSeqEditor(model, tok, cfg).fit(edits, progress=False)
    assert len(list(states.glob("*.safetensors"))) == 1
    batches.clear()
    resumed = AlphaEditSeqEditor(model, tok, cfg)
    resumed.fit(edits, progress=False)
    assert batches == ["Apple A5"]  # only the interrupted batch was solved again
    assert {"resumed_at_edit": 2} in resumed.history
    assert [h["edits"] for h in resumed.history if "batch" in h] == [1, 2, 3]
    assert all(torch.equal(resumed.deltas[k], full.deltas[k]) for k in full.deltas)
    assert not list(states.glob("*.safetensors"))


def test_keys_and_outputs_match_one_row_at_a_time(tiny_pair):
    """MEMIT's key pass (rows batched shortest first) against each row run alone through plain
    torch hooks: keys are the down_proj inputs at the subject averaged over an edit's rows, outputs
    the layer's hidden state at the subject of the edit's FIRST row, here its longest one."""
    from lks.baselines.common import encode_rows
    from lks.baselines.memit import keys_and_outputs
    model, tok = tiny_pair
    pre = ["A few words of context come first. ", "", "Then: "]  # each edit's first row is its longest
    rows = encode_rows(tok, [p + r.prompt for r in EDITS for p in pre], [r.subject for r in EDITS for _ in pre],
                       [i for i in range(len(EDITS)) for _ in pre])
    K, h = keys_and_outputs(model, tok, rows, len(EDITS), 0, 1, batch_rows=2)
    w = [0.5, 0.2, 0.3] * len(EDITS)  # weighted keys (MEMITConfig.key_weights)
    K_w, _ = keys_and_outputs(model, tok, rows, len(EDITS), 0, 1, batch_rows=2, weights=w)

    layers = model.model.layers  # the tiny Llama's
    want_k, want_h, want_kw = torch.zeros_like(K), torch.zeros_like(h), torch.zeros_like(K)
    got: dict[str, torch.Tensor] = {}
    hooks = [down_proj(model, 0).register_forward_pre_hook(lambda m, a: got.__setitem__("k", a[0])),
             layers[1].register_forward_hook(lambda m, a, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o))]
    try:
        for j, r in enumerate(rows):
            with torch.no_grad():
                model(input_ids=torch.tensor([r.ids]))
            want_k[r.edit] += got["k"][0, r.subj] / len(pre)
            want_kw[r.edit] += w[j] * got["k"][0, r.subj]
            if j % len(pre) == 0:
                want_h[r.edit] = got["h"][0, r.subj]
    finally:
        for hk in hooks:
            hk.remove()
    assert torch.allclose(K, want_k, atol=1e-5)
    assert torch.allclose(h, want_h, atol=1e-5)
    assert torch.allclose(K_w, want_kw, atol=1e-5)


def test_key_weights_follow_memit_compute_ks():
    """``reference``: the plain prompt weighs 1/2 and the prefixed forms share the other 1/2
    (MEMIT averages within each context group, then over the groups); ``plain``: the plain prompt
    alone; ``mean``: equal."""
    from lks.baselines.memit import key_weights

    assert key_weights(3, "reference") == [0.5, 0.25, 0.25]
    assert key_weights(6, "reference") == [0.5] + [0.1] * 5
    assert key_weights(3, "plain") == [1.0, 0.0, 0.0]
    assert key_weights(3, "mean") == [1.0] * 3


def test_update_diagnostics_measure_the_applied_change_and_the_plan_realised(tiny_pair, corpus):
    """``delta_rel_L<i>`` equals the relative change of the weight inside ``applied`` (measured on the
    model); ``target_realised`` is near 1 when the ridge is negligible (lam 1e-2: the keys are
    fitted exactly) and near 0 when it dominates (lam 1e6: the update is ~0)."""
    model, tok = tiny_pair
    cls, cfg = configs(corpus)["memit"]
    out = {}
    for lam in (1e-2, 1e6):
        ed = cls(model, tok, dataclasses.replace(cfg, lam=lam))
        ed.fit(EDITS, progress=False)
        d = ed.diagnostics(EDITS)
        for layer in cfg.layers:
            W = down_proj(model, layer).weight.detach().clone()
            with ed.applied():
                moved = float((down_proj(model, layer).weight - W).norm() / W.norm())
            assert d[f"delta_rel_L{layer}"] == pytest.approx(moved, rel=1e-4)
        assert d["edits_per_dim"] == len(EDITS) / down_proj(model, cfg.layers[0]).in_features
        out[lam] = d["target_realised"]
    assert out[1e-2] > 0.9 and out[1e6] < 0.05


def test_update_mechanism_figure_from_a_grid_table():
    import pandas as pd

    from lks.plotting import plot_update_mechanism
    from lks.report import update_diagnostics

    table = pd.DataFrame({"data": ["zsre"] * 3, "method": ["memit", "memit", "lks"], "n": [10, 1000, 10],
                          "delta_rel_L4": [0.01, 0.5, None], "delta_rel_L5": [0.02, 0.6, None],
                          "edits_per_dim": [10 / 1536, 1000 / 1536, None], "target_realised": [0.9, 0.4, None]})
    long = update_diagnostics(table)
    assert len(long) == 4 and set(long.method) == {"memit"} and list(long.layer) == [4, 5, 4, 5]
    fig, axes = plot_update_mechanism(layers=long)
    assert axes.shape == (1, 2) and len(axes[0, 0].get_lines()) == 2 and len(axes[0, 1].collections) == 2
    # two data sets: a row each, their lines kept apart (one line per cell, its own layers)
    both = update_diagnostics(pd.concat([table, table.assign(data="counterfact", delta_rel_L4=[0.02, 0.9, None])]))
    fig, axes = plot_update_mechanism(layers=both)
    assert axes.shape == (2, 2) and [ax.get_title() for ax in axes[:, 0]] == ["counterfact", "zsre"]
    assert [list(line.get_ydata()) for line in axes[0, 0].get_lines()] == [[0.02, 0.02], [0.9, 0.6]]
    assert [list(line.get_xdata()) for line in axes[1, 0].get_lines()] == [[4, 5], [4, 5]]
    with pytest.raises(ValueError, match="no update diagnostics"):
        plot_update_mechanism(layers=update_diagnostics(table[table.method == "lks"].dropna(axis=1)))


def test_every_embedded_baseline_setting_names_its_source():
    """Each setting in smollm2-135m's baselines names where its value comes from (the reference
    implementation or the ablation that replaced it); alphaedit and alphaedit-seq inherit memit's
    sources for the settings they share; no source names a setting that is not there."""
    from lks.config import model_spec

    spec = model_spec("smollm2-135m")
    src = {k: v for k, v in spec.baseline_sources.items() if k != "//"}
    chain = {"ft": ["ft"], "memit": ["memit"], "alphaedit": ["alphaedit", "memit"],
             "alphaedit-seq": ["alphaedit-seq", "alphaedit", "memit"]}
    assert set(src) == set(spec.baselines) == set(chain)
    for method, settings in spec.baselines.items():
        for key in settings:
            found = [src[m][key] for m in chain[method] if key in src[m]]
            assert found and found[0].strip(), f"{method}.{key} names no source"
    for method, named in src.items():
        assert set(named) <= set(spec.baselines[method]), f"{method}: sources for absent settings"


def test_leverage_is_one_for_free_keys_and_falls_with_the_ridge(tiny_pair):
    """The logged leverage ``k_i^T (lam C + K^T K)^-1 k_i``: with fewer keys than dimensions and a
    vanishing ridge each key is fitted exactly (the hat matrix of independent rows is the identity:
    1); a ridge far above the keys' energy leaves ~0; the update itself is memit_update's."""
    model, tok = tiny_pair
    torch.manual_seed(0)
    K, R, C = torch.randn(5, 24), torch.randn(5, 8), torch.eye(24)
    for lam, want in ((1e-8, 1.0), (1e8, 0.0)):
        ed = MEMITEditor(model, tok, MEMITConfig(lam=lam, layers=[0, 1]))
        delta, info = ed._solve(K, R, 0, C)
        assert info["leverage"] == pytest.approx(want, abs=1e-4)
        assert torch.equal(delta, memit_update(K, R, C, lam))


def _early_stopping_targets(model, tok):
    """A float32 target config whose stop threshold lies between the edits' NLLs after four steps
    alone (so some edits finish before others), and its context prefixes."""
    import dataclasses

    from lks.baselines.memit import context_prefixes, target_vectors

    cfg = dataclasses.replace(configs("unused")["memit"][1], z_steps=8, precision="float32", z_lr=2.0,
                              kl_weight=0.1, weight_decay=0.01, clamp=4.0, batch_rows=64)
    prefixes = context_prefixes(model, tok, cfg)
    nll_at_end = []
    for i in range(len(EDITS)):
        hist: list = []
        target_vectors(model, tok, EDITS[i:i + 1], dataclasses.replace(cfg, stop_nll=0.0), 1, prefixes, False, hist)
        nll_at_end.append(hist[3]["nll_mean"])
    assert max(nll_at_end) > min(nll_at_end) * 1.1
    return dataclasses.replace(cfg, stop_nll=(min(nll_at_end) + max(nll_at_end)) / 2), prefixes


def test_target_chunk_lines_count_the_edit_steps_that_ran(tiny_pair, monkeypatch, caplog):
    """A chunk's line says how many steps its optimisation took and how many edit-steps (edits
    still running, summed over steps) it did; here some edits stop early, so the edit-steps are
    fewer than steps x edits. Oracle: the KL rows (one per running edit) that went through the
    upper layers with a delta, counted by wrapping the suffix pass."""
    import logging
    import re

    import lks.baselines.memit as memit

    model, tok = tiny_pair
    cfg, prefixes = _early_stopping_targets(model, tok)
    assert cfg.batch_rows // (len(prefixes) + 1) >= len(EDITS)  # one pass per step
    passes, real = [], memit.suffix_hidden

    def counting(model_, part, delta, dtype):
        if delta is not None:
            passes.append(len(part.rows) // (len(prefixes) + 1))
        return real(model_, part, delta, dtype)

    monkeypatch.setattr(memit, "suffix_hidden", counting)
    monkeypatch.delenv("LKS_CACHE_DIR", raising=False)
    monkeypatch.setattr(MEMITEditor, "_cache_path", lambda self, kind, spec: None)
    with caplog.at_level(logging.INFO, logger="lks"):
        MEMITEditor(model, tok, cfg)._targets(EDITS, 1, prefixes, progress=False)
    line = next(r.getMessage() for r in caplog.records if "target vectors" in r.getMessage())
    steps, work = map(int, re.search(r"optimised in (\d+) steps, ([\d,]+) edit-steps", line).groups())
    assert (steps, work) == (len(passes), sum(passes)), line
    assert len(EDITS) <= work < steps * len(EDITS), line


def test_targets_whose_edits_finish_early_equal_one_at_a_time(tiny_pair):
    """With a stop threshold some edits finish steps before others: their rows leave and the rest run
    in repacked chunks (both edits start in one chunk; once one is done the other runs on, its rows
    taken out of that chunk). Each target must still be the one its edit reaches alone (float32),
    and the finished edit must have stopped early."""
    from lks.baselines.memit import target_vectors

    model, tok = tiny_pair
    cfg, prefixes = _early_stopping_targets(model, tok)
    hist: list = []
    both, _ = target_vectors(model, tok, EDITS, cfg, 1, prefixes, False, hist)
    done = [h["done"] for h in hist]
    assert 0 < done[3] < len(EDITS), done  # some edits finished at step 3, others ran on
    for i in range(len(EDITS)):
        alone, _ = target_vectors(model, tok, EDITS[i:i + 1], cfg, 1, prefixes, progress=False)
        assert torch.allclose(alone[0], both[i], atol=1e-4)
