"""Tests of lks.capability, the glue around lm-evaluation-harness: per-item results equal the
harness's own ``simple_evaluate`` (which loads the model itself from disk), edits are seen through
the harness's batching (right-padded, reordered log-likelihood; left-padded generation with a KV
cache), and the paired statistics against independent computations (scipy's binomial test)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import prepared_editor

from lks import capability as cap
from lks import tasks as lt

OPTS = {"gsm8k": {"max_new_tokens": 6}, "wikitext2": {"max_length": 64}}
FEW = {"gsm8k": 1, "mmlu": 1}


@pytest.fixture(scope="module")
def runs(tiny_pair, capability_dir):
    """All five tasks on the tiny model through lks.capability, and through the harness's own
    entry point on the same configs with the model saved and loaded back by the harness ("hf")."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tok = tiny_pair
    ours = cap.evaluate_capability(model, tok, data_dir=capability_dir, num_fewshot=FEW, task_options=OPTS,
                                   batch_size=3, progress=False, limit={"sst2": 5})
    path = capability_dir.parent / "tiny-hf"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    theirs = {}
    for task in lt.TASKS:
        cfgs = lt.task_configs(task, capability_dir, num_fewshot=FEW.get(task), options=OPTS.get(task),
                                workdir=capability_dir.parent)
        samples = lt.item_samples(task, cfgs, 5, 0, capability_dir) if task == "sst2" else None
        args = {"pretrained": str(path), "dtype": "float32", "device": "cpu", **(
            {"max_length": OPTS[task]["max_length"]} if task == "wikitext2" else {})}
        out = simple_evaluate("hf", model_args=args, tasks=cfgs, samples=samples, log_samples=True, bootstrap_iters=0,
                              task_manager=TaskManager(include_defaults=False), random_seed=0, numpy_random_seed=0,
                              torch_random_seed=0, fewshot_random_seed=0, batch_size=1)
        theirs[task] = out
    return ours, theirs


def test_per_item_results_equal_the_harness_own_run(runs):
    ours, theirs = runs
    items = ours.attrs["items"]
    for task, out in theirs.items():
        ref = cap.per_item(out, task)
        mine = items[items.task.str.startswith("mmlu_") if task == "mmlu" else items.task == task]
        assert len(ref) and len(mine) == len(ref), task
        np.testing.assert_allclose(mine.value.to_numpy(), ref.value.to_numpy(), rtol=1e-4, err_msg=task)
        assert list(mine.doc_id) == list(ref.doc_id) and list(mine.metric) == list(ref.metric)
        for name, res in out["results"].items():  # the aggregate the harness itself reports
            for key, value in res.items():
                metric = cap.GSM8K_FILTERS.get(key.split(",")[-1], key.split(",")[0]) if task == "gsm8k" else key.split(",")[0]
                if isinstance(value, float) and "stderr" not in key and metric != "acc_norm":
                    got = ours.set_index(["task", "metric"]).loc[(name if name.startswith("mmlu_") else task, metric), "value"]
                    assert got == pytest.approx(value, rel=1e-4), (name, key)


def test_summary_shape_and_data_choices(runs, capability_dir):
    ours, _ = runs
    assert list(ours.columns) == cap.COLUMNS
    get = ours.set_index(["task", "metric"])
    assert get.loc[("sst2", "acc"), "n"] == 5 and get.loc[("rte", "acc"), "n"] == 4
    assert get.loc[("gsm8k", "exact_match"), "n"] == 4  # shots from train.jsonl: all 4 test items scored
    assert get.loc[("wikitext2", "word_perplexity"), "n"] == 3  # articles of the fixture
    assert {"mmlu_alpha_topic", "mmlu_beta"} <= set(ours.task) and get.loc[("mmlu", "acc"), "n"] == 5
    assert ours.rows_seen.isna().all()  # no editor
    gsm = lt.task_configs("gsm8k", capability_dir)[0]
    assert gsm["fewshot_split"] == "train" and gsm["dataset_kwargs"]["data_files"]["train"].endswith("gsm8k/train.jsonl")


def test_mmlu_keeps_answer_text(capability_dir, tiny_pair):
    from lm_eval.tasks import TaskManager

    cfg = lt.task_configs("mmlu", capability_dir)[0]
    task = TaskManager(include_defaults=False).load([cfg])["tasks"]["mmlu_alpha_topic"]
    doc = task.test_docs()[0]
    assert doc["choice3"] == "NA" and task.doc_to_target(doc) == 0  # "NA" stays a string, answer an index
    assert task.doc_to_text(doc).endswith("D. NA\nAnswer:")


def test_subset_and_missing_file(tmp_path, capability_dir):
    a = lt.subset_indices(100, 10, seed=0, task="sst2")
    assert np.array_equal(a, lt.subset_indices(100, 10, seed=0, task="sst2")) and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, lt.subset_indices(100, 10, seed=0, task="rte"))
    with pytest.raises(FileNotFoundError, match="sst2/dev.tsv"):
        lt.task_configs("sst2", tmp_path)
    with pytest.raises(ValueError, match="unknown task option"):
        lt.task_configs("sst2", capability_dir, options={"shots": 3})
    with pytest.raises(ValueError, match="stride must equal max_length"):
        lt.task_configs("wikitext2", capability_dir, options={"max_length": 64, "stride": 32})
    assert lt.task_configs("wikitext2", capability_dir, options={"max_length": 64, "stride": 64}, workdir=tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        cap.evaluate_capability(None, None, tasks=("nope",))
    samples = lt.item_samples("mmlu", [], 3, 0, capability_dir)
    assert sum(len(v) for v in samples.values()) == 3


# ------------------------------------------------------------------------------ edits through the harness

@pytest.fixture(scope="module")
def edited(tiny_pair):
    from lks.config import EditorConfig, TrainConfig
    from lks.data import EditRecord, EditSet

    model, tok = tiny_pair
    edits = EditSet([EditRecord(subject="Toko Yasuda", prompt="Toko Yasuda plays the", target="piano", case_id=0),
                     EditRecord(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is",
                                target="English", case_id=1)])
    from conftest import PLAIN_TRAIN

    cfg = TrainConfig(**PLAIN_TRAIN, batch_size=2, loc_per_subject=1, seed=0)
    editor, _ = prepared_editor(model, tok, edits, cfg, EditorConfig(layer=1, generator="linear"), 2.0)
    return editor


REQS = [("The capital of France is", " Paris"), ("Toko Yasuda plays the", " piano"),
        ("Berlin is in", " Germany and more"), ("Apple is headquartered in Cupertino and Toko Yasuda plays the", " guitar"),
        ("was born in", " Paris")]
NAMES = [False, True, False, True, False]


def _ll(lm, reqs):
    from lm_eval.api.instance import Instance

    return [r[0] for r in lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)],
                                           disable_tqdm=True)]


def _gen(lm, prompts):
    from lm_eval.api.instance import Instance

    kw = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    return lm.generate_until([Instance("generate_until", {}, (p, kw), i) for i, p in enumerate(prompts)],
                             disable_tqdm=True)


def test_edit_visible_in_harness_loglikelihood(tiny_pair, edited):
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_pair
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=5)
    base = _ll(lm, REQS)
    with edited.applied(model) as stats:
        batched = _ll(lm, REQS)  # one right-padded batch, reordered by length, no attention mask
    single = []
    for r in REQS:
        with edited.applied(model):
            single += _ll(HFLM(pretrained=model, tokenizer=tok, batch_size=1), [r])
    assert stats.rows_routed == sum(NAMES) and stats.rows_seen == len(REQS)
    for b, e, s, named in zip(base, batched, single, NAMES):
        assert (abs(e - b) > 1e-3) if named else (e == b)
        assert e == pytest.approx(s, abs=1e-4)  # padding and reordering do not change the routing


def test_edit_visible_in_harness_generation(tiny_pair, edited):
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_pair
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=5)
    prompts = [c for c, _ in REQS]
    base = _gen(lm, prompts)
    with edited.applied(model) as stats:
        batched = _gen(lm, prompts)  # left-padded with a mask, KV cache: only the prefill is routed
    assert stats.rows_routed == sum(NAMES) and stats.rows_seen == len(prompts)
    for b, e, named in zip(base, batched, NAMES):
        if not named:
            assert e == b
    assert any(e != b for b, e, n in zip(base, batched, NAMES) if n)
    # the first generated token's log-probability under the edit, through the harness: changed only when named
    with edited.applied(model):
        first = _ll(lm, [(p, tok.decode(tok(b, add_special_tokens=False)["input_ids"][:1])) for p, b in zip(prompts, base)])
    plain = _ll(lm, [(p, tok.decode(tok(b, add_special_tokens=False)["input_ids"][:1])) for p, b in zip(prompts, base)])
    assert all((f != p) == n for f, p, n in zip(first, plain, NAMES))


def test_evaluate_capability_counts_routing(tiny_pair, edited, capability_dir, capsys):
    model, tok = tiny_pair
    df = cap.evaluate_capability(model, tok, tasks=("rte", "sst2"), data_dir=capability_dir, editor=edited,
                                 batch_size=4, progress=False)
    assert capsys.readouterr().err == ""  # progress=False: no harness progress bars or warnings
    get = df.set_index(["task", "metric"])
    assert get.loc[("rte", "acc"), "rows_seen"] >= 4 and get.loc[("rte", "acc"), "routed"] == 0
    before = cap.evaluate_capability(model, tok, tasks=("rte", "sst2"), data_dir=capability_dir, progress=False)
    comp = cap.compare_capability(before, df)
    assert (comp["diff"] == 0).all() and (comp.p_value == 1).all()  # nothing routed: identical item scores


# ------------------------------------------------------------------------------ paired statistics

@pytest.mark.parametrize("b, c", [(0, 0), (3, 0), (7, 2), (10, 10), (1, 12)])
def test_mcnemar_exact_equals_binomial_test(b, c):
    from scipy.stats import binomtest

    both, neither = 5, 4
    before = [1] * b + [0] * c + [1] * both + [0] * neither
    after = [0] * b + [1] * c + [1] * both + [0] * neither
    got_b, got_c, p = cap.mcnemar_exact(before, after)
    assert (got_b, got_c) == (b, c)
    assert p == pytest.approx(1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue, rel=1e-12)


def test_paired_bootstrap_by_hand():
    d = np.array([0.5, 0.5, 0.5, 0.5])
    assert cap.paired_bootstrap(lambda i: d[i].mean(), 4) == (0.5, 0.5, 0.0)  # every resample is +0.5
    assert cap.paired_bootstrap(lambda i: 0.0 * d[i].mean(), 4) == (0.0, 0.0, 1.0)
    x = np.r_[np.ones(50), -np.ones(50)]  # symmetric differences: the interval covers 0, p is large
    lo, hi, p = cap.paired_bootstrap(lambda i: x[i].mean(), 100)
    se = 1 / math.sqrt(100)  # sd of the mean of +-1 differences
    assert lo == pytest.approx(-cap.Z95 * se, abs=0.05) and hi == pytest.approx(cap.Z95 * se, abs=0.05) and p > 0.5


@pytest.mark.parametrize("p,label", [(0.0, "p < 0.001"), (0.0009, "p < 0.001"), (0.001, "p 0.001"), (0.0042, "p 0.004"),
                                     (0.05, "p 0.05"), (1.0, "p 1.00"), (float("nan"), "p n/a")])
def test_p_label_stops_at_the_bootstrap_resolution(p, label):
    # 2,000 paired-bootstrap resamples: the smallest nonzero two-sided p is 2 / 2,000 = 0.001
    assert cap.p_label(p) == label


def test_compare_capability_paired_rows():
    items = lambda vals, task="sst2": pd.DataFrame({"task": task, "doc_id": range(len(vals)), "metric": "acc",  # noqa: E731
                                                     "value": vals, "units": np.nan})
    before, after = pd.DataFrame({"task": ["sst2"]}), pd.DataFrame({"task": ["sst2"]})
    before.attrs["items"], after.attrs["items"] = items([1] * 12 + [0] * 8), items([0] * 12 + [0] * 8)
    row = cap.compare_capability(before, after).iloc[0]
    assert row["diff"] == pytest.approx(-0.6) and (row.only_before, row.only_after) == (12, 0)
    assert row.p_value == pytest.approx(2 * 0.5**12) and row.note == "worse (p < 0.05)"
    ppl = lambda ll: pd.DataFrame({"task": "wikitext2", "doc_id": [0, 1, 2], "metric": "word_perplexity",  # noqa: E731
                                   "value": ll, "units": [10.0, 20.0, 30.0]})
    before.attrs["items"], after.attrs["items"] = ppl([-20.0, -40.0, -60.0]), ppl([-30.0, -60.0, -90.0])
    row = cap.compare_capability(before, after).iloc[0]
    assert (row.before, row.after) == (pytest.approx(math.exp(2)), pytest.approx(math.exp(3)))
    assert row.diff_ci_low == pytest.approx(math.exp(3) - math.exp(2)) and row.p_value == 0.0  # every doc worse
    assert row.note == "worse (p < 0.05)"


@pytest.mark.slow
def test_embedded_model_sst2_and_wikitext(smol, data_root):
    model, tokenizer = smol
    df = cap.evaluate_capability(model, tokenizer, ("sst2", "wikitext2"), data_dir=data_root,
                                 limit={"sst2": 16, "wikitext2": 1}, progress=False,
                                 task_options={"wikitext2": {"max_length": 512}})
    get = df.set_index(["task", "metric"])["value"]
    assert 0 <= get[("sst2", "acc")] <= 1 and 1 < get[("wikitext2", "word_perplexity")] < 1e4
    assert 0 < get[("wikitext2", "bits_per_byte")] < 3


def test_fewshot_exemplars_never_the_item_and_gsm8k_shots_from_train(tiny_pair, capability_dir):
    import json

    model, tok = tiny_pair
    cfgs = lt.task_configs("sst2", capability_dir, num_fewshot=2)
    out = cap.run_harness(model, tok, cfgs, batch_size=4)
    for s in out["samples"]["sst2"]:
        ctx = s["arguments"]["gen_args_0"]["arg_0"] if isinstance(s["arguments"], dict) else s["arguments"][0][0]
        parts = ctx.split("\n\n")
        assert len(parts) == 3 and s["doc"]["sentence"] not in "\n\n".join(parts[:2])  # 2 exemplars, never the item
    train = [json.loads(line)["question"] for line in (capability_dir / "gsm8k" / "train.jsonl").open()]
    test = [json.loads(line)["question"] for line in (capability_dir / "gsm8k" / "test.jsonl").open()]
    out = cap.run_harness(model, tok, lt.task_configs("gsm8k", capability_dir, num_fewshot=2,
                                                      options={"max_new_tokens": 2}), batch_size=4)
    for s in out["samples"]["gsm8k"]:
        ctx = s["arguments"]["gen_args_0"]["arg_0"] if isinstance(s["arguments"], dict) else s["arguments"][0][0]
        assert sum(q in ctx for q in train) == 2 and sum(q in ctx for q in test) == 1  # the item itself only
