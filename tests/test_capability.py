"""Tests of lks.capability: loaders on fixture files, scoring primitives checked against direct
computations on the tiny random Llama with a character-level tokenizer, the driver's bookkeeping,
and (slow) a short run on the embedded SmolLM2 model."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lks import capability as cap


class CharTokenizer:
    """One token per ASCII character (id = ord + 3), BOS = 1 prepended by default, like SmolLM2's."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, add_bos: bool = True) -> None:
        self.add_bos = add_bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [3 + (ord(c) % 317) for c in text]
        return {"input_ids": ([self.bos_token_id] if self.add_bos and add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(int(i) - 3) if int(i) >= 3 else ("" if skip_special_tokens else f"<{int(i)}>")
                       for i in ids)

    def batch_decode(self, seqs, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def fx(monkeypatch, capability_dir) -> Path:
    """The fixture data directory. Its files are not the pinned originals, so lks.data's checksum
    check is bypassed by resolving paths directly (the real resolution is tested on shared data)."""
    def plain(relpath, data_dir):
        path = Path(data_dir) / relpath
        return path if path.is_file() else None

    monkeypatch.setattr(cap, "_data_path", plain)
    return capability_dir


def _direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, from one unbatched, unpadded forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------------------------- loaders

def test_load_gsm8k_fixture(fx):
    docs = cap.load_gsm8k(fx)
    assert len(docs) == 4
    assert docs[0]["target"] == "5" and docs[3]["target"] == "1,500"
    assert docs[1]["answer"].endswith("#### 8") and docs[1]["question"].startswith("A pen costs $2")


def test_load_sst2_fixture_keeps_quotes_and_labels(fx):
    docs = cap.load_sst2(fx)
    assert [d["label"] for d in docs] == [1, 0, 1, 0, 1, 0]
    assert docs[2]["sentence"] == 'a "wonderful" film . '


def test_load_rte_jsonl_and_parquet_agree(fx, tmp_path):
    docs = cap.load_rte(fx)
    assert [d["label"] for d in docs] == [1, 0, 0, 1]  # 0 = entailment
    (tmp_path / "rte").mkdir()
    pd.DataFrame({"sentence1": [d["premise"] for d in docs], "sentence2": [d["hypothesis"] for d in docs],
                  "label": [d["label"] for d in docs]}).to_parquet(tmp_path / "rte" / "validation.parquet")
    assert cap.load_rte(tmp_path) == docs


def test_load_wikitext2_and_document_split(fx):
    text = cap.load_wikitext2(fx)
    docs = cap.split_wikitext_documents(text)
    assert "".join(docs) == text
    assert len(docs) == 3  # "= = History = =" is a section, not an article
    assert docs[0].startswith(" \n = Alpha = ") and "History" in docs[0] and docs[2].lstrip().startswith("= Gamma")


def test_load_mmlu_fixture(fx):
    test, dev = cap.load_mmlu(fx, "test"), cap.load_mmlu(fx, "dev")
    assert len(test) == 5 and len(dev) == 4
    assert [d["subject"] for d in test] == ["alpha_topic"] * 3 + ["beta"] * 2
    assert test[0]["choices"] == ["4", "5", "6", "NA"]  # "NA" stays a string
    assert dev[1]["question"] == "Which is a letter, not a digit?" and dev[1]["choices"][3] == "None"
    assert [d["answer"] for d in test] == [0, 1, 3, 0, 2]


def test_missing_file_error_names_online_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LKS_OFFLINE", "1")  # lks.data would otherwise try known download URLs
    with pytest.raises(FileNotFoundError, match="online=True"):
        cap.load_sst2(tmp_path)
    with pytest.raises(FileNotFoundError, match="online=True"):
        cap.load_mmlu(tmp_path)


def test_loaders_resolve_and_verify_shared_data(data_root):
    assert len(cap.load_sst2(data_root)) == 872 and len(cap.load_rte(data_root)) == 277
    gsm = cap.load_gsm8k(data_root)
    assert len(gsm) == 1319 and gsm[0]["target"] == "18"
    dev = cap.load_mmlu(data_root, "dev")
    assert len(dev) == 285 and len({d["subject"] for d in dev}) == 57


def test_corrupt_known_file_is_an_error_not_missing(tmp_path):
    pytest.importorskip("lks.data")
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\nnot the real file\t1\n")
    with pytest.raises(ValueError, match="checksum"):
        cap.load_sst2(tmp_path)


# --------------------------------------------------------------------------------------------- prompts, labels, answers

@pytest.mark.parametrize("text, expected", [
    ("He has 3 + 2 = 5 apples.\n#### 5", "5"),
    ("#### 1,500", "1500"),
    ("So she pays $18.00 in total. The answer is $18.", "18"),
    ("The answer is 42. Then 7 more.", "42"),
    ("5 + 3 = 8 and then 8 * 2 = 16.", "16"),
    ("It costs -3.50 dollars.", "-3.5"),
    ("#### 7.0", "7"),
    ("no numbers here", None),
])
def test_extract_gsm8k_answer(text, expected):
    assert cap.extract_gsm8k_answer(text) == expected


def test_strict_extraction_needs_hashes():
    assert cap.extract_gsm8k_answer("The answer is 4.", strict=True) is None
    assert cap.extract_gsm8k_answer("x\n#### 4", strict=True) == "4"
    assert cap.normalize_number("1,234.") == "1234" and cap.normalize_number("$10.50") == "10.5"


def test_prompt_formats_and_label_mapping():
    assert cap.sst2_text({"sentence": "fine ."}) == "fine .\nQuestion: Is this sentence positive or negative?\nAnswer:"
    assert cap.SST2_CHOICES[1] == "positive"  # GLUE label 1
    assert cap.rte_text({"premise": "P.", "hypothesis": "H."}) == "P.\nQuestion: H. True or False?\nAnswer:"
    assert cap.RTE_CHOICES[cap._rte_label("entailment")] == "True"
    assert cap.RTE_CHOICES[cap._rte_label("not_entailment")] == "False" and cap._rte_label(1) == 1
    doc = {"subject": "high_school_physics", "question": " Q? ", "choices": list("wxyz"), "answer": 2}
    assert cap.mmlu_context(doc, [doc]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Q?\nA. w\nB. x\nC. y\nD. z\nAnswer: C\n\nQ?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    shots = [{"question": "q1", "answer": "a1\n#### 1"}]
    assert cap.gsm8k_prompt("q2", shots) == "Question: q1\nAnswer: a1\n#### 1\n\nQuestion: q2\nAnswer:"


def test_fewshot_context_excludes_the_document_itself():
    docs = [{"sentence": f"s{i}", "label": i % 2} for i in range(6)]
    for i in range(6):
        ctx = cap.fewshot_context(docs, i, 3, cap.sst2_text, lambda d: cap.SST2_CHOICES[d["label"]], 0, "sst2")
        parts = ctx.split("\n\n")
        assert len(parts) == 4 and parts[-1] == cap.sst2_text(docs[i])
        assert all(not p.startswith(f"s{i}\n") for p in parts[:-1])
        assert parts[0].endswith(" positive") or parts[0].endswith(" negative")


# --------------------------------------------------------------------------------------------- scoring primitives

def test_encode_pair_keeps_bos_and_moves_trailing_space(tok):
    ctx, cont = cap.encode_pair(tok, "Answer: ", "yes")
    assert ctx[0] == tok.bos_token_id and tok.decode(ctx[1:]) == "Answer:" and tok.decode(cont) == " yes"


def test_loglikelihood_matches_direct_log_softmax(tiny_model, tok):
    context, continuation = "The cat sat", " on the mat"
    ids = tok(context + continuation)["input_ids"]
    n_cont = len(continuation)
    expected = float(_direct_logprobs(tiny_model, ids)[-n_cont:].sum())
    (got,) = cap.loglikelihood(tiny_model, tok, [(context, continuation)])
    assert got == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_batched_padded_equals_one_by_one(tiny_model, tok):
    reqs = [("a", " b"), ("hello there", " friend"), ("x" * 40, " y"), ("hello there", " frie"),
            ("Q: 1+1?\nA:", " 2"), ("Q: 1+1?\nA:", " 3")]
    batched = cap.loglikelihood(tiny_model, tok, reqs, batch_size=4)
    single = [cap.loglikelihood(tiny_model, tok, [r], batch_size=1)[0] for r in reqs]
    np.testing.assert_allclose(batched, single, atol=1e-4)
    assert all(v < 0 for v in batched)


def test_loglikelihood_without_bos_uses_a_start_token(tiny_model):
    (ll,) = cap.loglikelihood(tiny_model, CharTokenizer(add_bos=False), [("", "ab")])
    assert math.isfinite(ll) and ll < 0


def test_perplexity_matches_exp_mean_nll(tiny_model, tok):
    text = "A short known text for the tiny model."
    ids = tok(text)["input_ids"]
    nll = -_direct_logprobs(tiny_model, ids)
    expected = math.exp(float(nll.mean()))
    full = cap.perplexity(tiny_model, tok, text, max_length=128, stride=128)
    assert full.n_tokens == len(ids) - 1
    assert full.token_perplexity == pytest.approx(expected, rel=1e-5)
    # The text fits in one window, so a smaller stride must change nothing.
    slid = cap.perplexity(tiny_model, tok, text, max_length=64, stride=16, batch_size=2)
    assert slid.token_perplexity == pytest.approx(expected, rel=1e-5)


def test_perplexity_disjoint_windows_match_chunked_hand_computation(tiny_model, tok):
    text = "abcdefghij" * 5
    ids = tok(text)["input_ids"]  # 51 tokens
    res = cap.perplexity(tiny_model, tok, text, max_length=20, stride=20, batch_size=3)
    total, count = 0.0, 0
    for begin in range(0, len(ids), 20):
        chunk = ids[begin:begin + 20]
        if len(chunk) > 1:
            total += float(-_direct_logprobs(tiny_model, chunk).sum())
            count += len(chunk) - 1
    # A window's first token has no context inside it, so with stride == max_length tokens 20 and 40
    # are scored by neither computation.
    assert res.n_tokens == count
    assert res.mean_nll == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("n, max_length, stride", [(51, 20, 20), (51, 20, 7), (100, 16, 5), (5, 16, 4), (2, 8, 8)])
def test_sliding_windows_score_every_token_once(n, max_length, stride):
    wins = cap.sliding_windows(n, max_length, stride)
    scored = [t for _, e, f in wins for t in range(f, e)]
    if stride == max_length:
        assert scored == [t for t in range(n) if t % max_length]  # window starts have no context
    else:
        assert scored == list(range(1, n))
    assert all(e - b <= max_length and b < f for b, e, f in wins)


def test_generate_until_batched_equals_single_and_cuts_at_stop(tiny_model, tok):
    prompts = ["Question: 1+1\nAnswer:", "hi", "a much longer prompt than the others"]
    batched = cap.generate_until(tiny_model, tok, prompts, until=("\n\n",), max_new_tokens=6, batch_size=3)
    single = [cap.generate_until(tiny_model, tok, [p], until=("\n\n",), max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert cap._cut_at_stop("12\n#### 3\n\nQuestion: x", cap.GSM8K_UNTIL) == "12\n#### 3"


# --------------------------------------------------------------------------------------------- driver

class FakeEditor:
    """Counts rows of non-decode forward calls, and "routes" rows whose input contains a double quote."""

    def __init__(self, tok: CharTokenizer) -> None:
        self.marker = tok('"', add_special_tokens=False)["input_ids"][0]
        self.entered = 0

    @contextmanager
    def applied(self, model):
        stats = SimpleNamespace(rows_seen=0, rows_routed=0)

        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is not None and ids.shape[1] > 1:  # prefill / scoring call, not a decode step
                stats.rows_seen += ids.shape[0]
                stats.rows_routed += int((ids == self.marker).any(1).sum())

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        self.entered += 1
        try:
            yield stats
        finally:
            handle.remove()


OPTS = {"gsm8k": {"max_new_tokens": 4}, "wikitext2": {"max_length": 64, "stride": 32}}


def _run(model, tok, data_dir, **kw):
    kw.setdefault("task_options", OPTS)
    kw.setdefault("num_fewshot", {"gsm8k": 1, "mmlu": 1})
    return cap.evaluate_capability(model, tok, data_dir=data_dir, progress=False, **kw)


@pytest.fixture
def run(fx):
    return lambda model, tok, **kw: _run(model, tok, fx, **kw)


def test_evaluate_capability_all_tasks_with_editor_counters(run, tiny_model, tok):
    editor = FakeEditor(tok)
    df = run(tiny_model, tok, editor=editor, batch_size=4)
    assert editor.entered == 1
    assert list(df.columns) == cap.COLUMNS
    get = df.set_index(["task", "metric"])
    assert get.loc[("sst2", "acc"), "n"] == 6 and get.loc[("rte", "acc"), "n"] == 4
    assert get.loc[("gsm8k", "exact_match"), "n"] == 3  # 4 problems minus 1 exemplar
    # sst2: 6 sentences x 2 choices, all distinct inputs; the one quoted sentence is routed twice.
    assert get.loc[("sst2", "acc"), "rows_seen"] == 12 and get.loc[("sst2", "acc"), "routed"] == 2
    assert get.loc[("rte", "acc"), "rows_seen"] == 8 and get.loc[("rte", "acc"), "routed"] == 0
    # mmlu: " A".." D" share one input per question, so one row per question.
    assert get.loc[("mmlu", "acc"), "rows_seen"] == 5
    assert get.loc[("gsm8k", "exact_match"), "rows_seen"] == 3  # one prefill row per prompt
    assert get.loc[("wikitext2", "token_perplexity"), "rows_seen"] >= 1
    assert {"mmlu_alpha_topic", "mmlu_beta"} <= set(df["task"])
    assert pd.isna(get.loc[("mmlu_beta", "acc"), "rows_seen"]) and get.loc[("mmlu_beta", "acc"), "n"] == 2
    acc = df[df["metric"].isin(["acc", "exact_match", "strict_match"])]
    assert acc["value"].between(0, 1).all() and (acc["ci_low"] <= acc["value"]).all()
    ppl = get.loc[("wikitext2", "token_perplexity")]
    assert 1 < ppl["value"] < 10 * 320 and ppl["ci_low"] <= ppl["value"] <= ppl["ci_high"]
    assert (df.loc[df["task"].isin(cap.TASKS), "seconds"] > 0).all()


def test_without_editor_counters_are_missing(run, tiny_model, tok):
    df = run(tiny_model, tok, tasks=("rte",))
    assert df["rows_seen"].isna().all() and df["routed"].isna().all()
    with pytest.raises(ValueError, match="unknown task"):
        run(tiny_model, tok, tasks=("nope",))


def test_subset_indices_deterministic_random_sample():
    a = cap.subset_indices(100, 10, seed=0, task="sst2")
    assert np.array_equal(a, cap.subset_indices(100, 10, seed=0, task="sst2"))
    assert not np.array_equal(a, cap.subset_indices(100, 10, seed=1, task="sst2"))
    assert not np.array_equal(a, cap.subset_indices(100, 10, seed=0, task="rte"))
    assert np.all(np.diff(a) > 0) and a.max() < 100 and not np.array_equal(a, np.arange(10))
    assert np.array_equal(cap.subset_indices(5, 10, 0, "x"), np.arange(5))
    assert np.array_equal(cap.subset_indices(5, None, 0, "x"), np.arange(5))


def test_limited_runs_are_reproducible(run, tiny_model, tok):
    kw = {"tasks": ("sst2", "mmlu", "wikitext2"), "limit": {"sst2": 3, "mmlu": 2, "wikitext2": 1}, "seed": 3}
    a, b = run(tiny_model, tok, **kw), run(tiny_model, tok, **kw)
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))
    get = a.set_index(["task", "metric"])
    assert get.loc[("sst2", "acc"), "n"] == 3 and get.loc[("mmlu", "acc"), "n"] == 2


def test_accuracy_stats_wilson_interval():
    s = cap.accuracy_stats([1, 0, 1, 1])
    assert s["value"] == 0.75 and s["n"] == 4
    assert s["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert 0 < s["ci_low"] < 0.75 < s["ci_high"] < 1
    perfect = cap.accuracy_stats([1] * 10)
    assert perfect["ci_high"] == 1 and perfect["ci_low"] < 1


def test_compare_capability_flags_changes_outside_ci():
    cols = {"stderr": [0.01, 0.5, 0.02], "ci_low": [0.0] * 3, "ci_high": [1.0] * 3, "n": [100] * 3,
            "task": ["sst2", "wikitext2", "rte"], "metric": ["acc", "token_perplexity", "acc"]}
    before = pd.DataFrame({**cols, "value": [0.80, 20.0, 0.60]})
    after = pd.DataFrame({**cols, "value": [0.70, 20.5, 0.61]})
    out = cap.compare_capability(before, after).set_index("task")
    assert out.loc["sst2", "diff"] == pytest.approx(-0.10)
    assert out.loc["sst2", "note"] == "worse (outside 95% CI)" and not out.loc["sst2", "within_ci"]
    assert out.loc["wikitext2", "within_ci"] and out.loc["rte", "note"] == "within 95% CI"
    worse_ppl = cap.compare_capability(before, after.assign(value=[0.8, 30.0, 0.6])).set_index("task")
    assert worse_ppl.loc["wikitext2", "note"] == "worse (outside 95% CI)"


# --------------------------------------------------------------------------------------------- embedded model

@pytest.mark.slow
def test_embedded_model_sst2_and_wikitext(smol, data_root):
    model, tokenizer = smol
    df = cap.evaluate_capability(model, tokenizer, ("sst2", "wikitext2"), data_dir=data_root,
                                 limit={"sst2": 16, "wikitext2": 1}, progress=False,
                                 task_options={"wikitext2": {"max_length": 512, "stride": 256}})
    get = df.set_index(["task", "metric"])["value"]
    assert 0 <= get[("sst2", "acc")] <= 1
    assert math.isfinite(get[("wikitext2", "token_perplexity")]) and 1 < get[("wikitext2", "token_perplexity")] < 200
