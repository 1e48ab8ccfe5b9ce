"""lks.notebook, the notebooks' shared setup: data directory and data sets (with loud warnings),
the recipe, printing, parameters, seeds and threads, and the results file.

Fast: temporary directories stand in for the data directory, a tiny random Llama for the model.
Oracles are independent of the module: the registered recipe is read from its JSON file, the
built-in edit count from the asset file, the parameter count from the model's config, the git
commit from ``git log``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_tiny_llama

import lks.notebook as nb
from lks.config import EditorConfig, TrainConfig

COMMON = {"seed": 0, "torch_threads": 0, "data_dir": None, "figure_dir": "figures", "results_dir": "results"}


def touch(root: Path, rel: str) -> None:
    path = root / rel
    if rel.endswith("/"):
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")


# --------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------
def test_import_has_no_side_effects():
    code = ("import sys; import lks.notebook; "
            "print([m for m in ('torch', 'IPython', 'pandas', 'transformers', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# data directory, data sets, warnings
# --------------------------------------------------------------------------------------------
def test_data_dir_explicit_then_environment_even_when_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("LKS_DATA_DIR", str(tmp_path / "from-env"))
    assert nb.resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    # an environment variable naming a missing directory is how a run asks for no data
    assert nb.resolve_data_dir() == tmp_path / "from-env"


def test_data_dir_falls_back_to_the_checkouts_sibling_then_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("LKS_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(nb, "REPO", tmp_path / "checkout")
    cache = tmp_path / "home" / ".cache" / "lks" / "data"
    assert nb.resolve_data_dir() == cache  # neither exists
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert nb.resolve_data_dir() == tmp_path / "shared" / "data"
    cache.mkdir(parents=True)
    assert nb.resolve_data_dir() == cache  # the cache wins when both exist


def test_warn_prints_a_markdown_warning_outside_a_notebook(capsys):
    nb.warn("the sky is missing")
    assert capsys.readouterr().out == "> **Warning** the sky is missing\n"


def test_auto_without_data_falls_back_to_builtin_loudly(tmp_path, capsys):
    assert nb.pick_datasets("auto", tmp_path) == ["builtin"]
    out = capsys.readouterr().out
    assert "**Warning**" in out and "lks/cf_eval_data.json" in out and str(tmp_path) in out
    assert "LKS_DATA_DIR" in out and "builtin_edits" in out


def test_auto_with_data_uses_it_quietly(tmp_path, capsys):
    touch(tmp_path, "lks/cf_eval_data.json")
    assert nb.pick_datasets("auto", tmp_path) == ["counterfact"]
    assert capsys.readouterr().out == ""


def test_auto_with_two_sets_warns_for_the_missing_one(tmp_path, capsys):
    touch(tmp_path, "lks/zsre_eval_data.json")
    assert nb.pick_datasets("auto", tmp_path, auto=("counterfact", "zsre")) == ["zsre"]
    out = capsys.readouterr().out
    assert out.count("**Warning**") == 1 and "lks/cf_eval_data.json" in out and "uses zsre" in out


def test_named_sets_must_exist_and_be_known(tmp_path):
    assert nb.pick_datasets("builtin", tmp_path) == ["builtin"]
    with pytest.raises(FileNotFoundError, match="zsre_eval_data.json"):
        nb.pick_datasets(["zsre"], tmp_path)
    with pytest.raises(ValueError, match="wikidata"):
        nb.pick_datasets("wikidata", tmp_path)
    with pytest.raises(ValueError):
        nb.pick_datasets([], tmp_path)


def test_builtin_edit_set_is_capped_at_its_size_with_a_note(tmp_path, capsys):
    asset = json.loads((REPO / "lks" / "assets" / "builtin_edits.json").read_text(encoding="utf-8"))
    edits = nb.load_edit_set("builtin", len(asset) + 10, tmp_path)
    assert len(edits) == len(asset) and f"has {len(asset)} edits" in capsys.readouterr().out
    first = nb.load_edit_set("builtin", 5, tmp_path)
    assert [r.subject for r in first] == [d["subject"] for d in asset[:5]]


def test_capability_tasks_present_in_order_and_missing_ones_named(tmp_path, capsys):
    touch(tmp_path, "sst2/dev.tsv")
    touch(tmp_path, "rte/validation.parquet")  # either RTE file will do
    touch(tmp_path, "mmlu/test/")  # MMLU needs both folders
    assert nb.capability_tasks(["rte", "mmlu", "sst2", "gsm8k"], tmp_path) == ["rte", "sst2"]
    out = capsys.readouterr().out
    assert out.count("**Warning**") == 2 and "mmlu is skipped" in out and "gsm8k/test.jsonl" in out
    touch(tmp_path, "mmlu/dev/")
    assert nb.capability_tasks(["mmlu"], tmp_path) == ["mmlu"]
    with pytest.raises(ValueError, match="squad"):
        nb.capability_tasks(["squad"], tmp_path)


# --------------------------------------------------------------------------------------------
# the recipe
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["smollm2-135m", "llama2-7b-chat"])
def test_recipe_is_the_registered_config_file_with_overrides(name):
    """The config file's values (llama2's file spells out a whole, non-default training recipe),
    the defaults where the file is silent, the overrides where given."""
    spec = json.loads((REPO / "lks" / "configs" / f"{name}.json").read_text(encoding="utf-8"))
    editor, train = nb.recipe(name, epochs=3, layer=12, lr=None, seed=7)
    file_editor = {**dataclasses.asdict(EditorConfig()), **spec["editor"]}
    file_train = {**dataclasses.asdict(TrainConfig()), **spec["train"]}
    assert dataclasses.asdict(editor) == {**file_editor, "layer": 12}
    assert dataclasses.asdict(train) == {**file_train, "epochs": 3, "seed": 7}
    assert isinstance(editor, EditorConfig) and isinstance(train, TrainConfig)


def test_recipe_rejects_unknown_names_and_bad_values():
    with pytest.raises(ValueError, match="epoch"):
        nb.recipe("smollm2-135m", epoch=3)
    with pytest.raises(ValueError, match="generator"):
        nb.recipe("smollm2-135m", generator="transformer")


def test_recipe_of_an_unregistered_model_is_the_config_defaults():
    editor, train = nb.recipe("some/hf-model", batch_size=4)
    assert editor == EditorConfig() and train.batch_size == 4 and train.epochs == TrainConfig().epochs


# --------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------
def test_model_summary_counts_from_the_config():
    model = make_tiny_llama(layers=2, hidden=48, vocab=320)
    c = model.config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 2 * c.hidden_size ** 2 + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    expected = 2 * c.vocab_size * c.hidden_size + c.num_hidden_layers * per_layer + c.hidden_size
    line = nb.model_summary(model)
    assert line == (f"tiny-llama: 2 decoder layers, hidden size 48, {expected:,} parameters, dtype float32, "
                    "device cpu, frozen: True")
    next(model.parameters()).requires_grad_(True)
    assert nb.model_summary(model).endswith("frozen: False")


@pytest.mark.parametrize("value,text", [(0.92751, "0.928"), (np.float32(0.5), "0.500"), (3, "3"), (np.int64(3), "3"),
                                        (None, "None"), (True, "True"), (float("nan"), "nan"), ("held-out", "held-out"),
                                        (torch.tensor(0.25), "0.250"), (["a", "b"], "['a', 'b']")])
def test_fmt(value, text):
    assert nb.fmt(value) == text


def test_describe_shows_signature_and_docstring_not_code():
    def scale(x: float, factor: int = 2) -> float:
        """Multiply ``x`` by ``factor``."""
        return x * factor  # a comment that must not show

    text = nb.describe(scale)
    assert text.startswith("test_describe_shows_signature_and_docstring_not_code.<locals>.scale(x: float, factor: int = 2) -> float")
    assert "Multiply ``x`` by ``factor``." in text and "return" not in text


# --------------------------------------------------------------------------------------------
# parameters, setup, results
# --------------------------------------------------------------------------------------------
def test_parameters_are_the_json_literals_of_the_namespace():
    ns = {"In": ["", "x = 1"], "Out": {}, "_i1": "x = 1", "_": None, "get_ipython": print, "np": np,
          "model_name": "smollm2-135m", "data_dir": None, "lr": 1e-3, "layers": [1, 2], "ok": True,
          "limit": {"sst2": 32}, "nested": [{"a": [1, None]}], "pair": (1, 2), "path": Path("x")}
    assert nb.notebook_parameters(ns) == {"model_name": "smollm2-135m", "data_dir": None, "lr": 1e-3, "layers": [1, 2],
                                          "ok": True, "limit": {"sst2": 32}, "nested": [{"a": [1, None]}]}


@pytest.fixture
def restore_threads():
    n, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(n)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


def test_setup_sets_threads_and_seeds_and_names_the_run(tmp_path, capsys, restore_threads):
    ns = {**COMMON, "seed": 123, "torch_threads": 1, "data_dir": str(tmp_path / "data"), "n_edits": 16}
    run = nb.setup("99_test", ns)
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    expect = random.Random(123)
    assert random.random() == expect.random()
    assert np.random.rand() == np.random.RandomState(123).rand()
    assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(123)).item()
    assert run.parameters == ns and run.data_dir == tmp_path / "data"
    assert capsys.readouterr().out.startswith("99_test: seed 123, 1 torch thread(s), lks ")


def test_setup_requires_the_common_parameters():
    with pytest.raises(ValueError, match="results_dir"):
        nb.setup("99_test", {k: v for k, v in COMMON.items() if k != "results_dir"})
    with pytest.raises(ValueError, match="torch_threads"):
        nb.setup("99_test", {**COMMON, "torch_threads": -1})


def test_results_file(tmp_path, capsys):
    ns = {**COMMON, "figure_dir": str(tmp_path / "figures"), "results_dir": str(tmp_path / "results"), "n_edits": 4}
    run = nb.setup("99_test", ns)
    with run.timed("sleep"):
        time.sleep(0.05)
    fig = run.figure("99_curve")
    fig.parent.mkdir(parents=True)
    fig.write_bytes(b"png")
    path = run.write_results({"reliability": np.float64(0.75), "n": np.int64(3), "missing": float("nan"),
                              "config": EditorConfig(layer=3), "rows": [{"x": np.float32(0.5)}]}, figures=[fig])
    assert path == tmp_path / "results" / "99_test.json" and f"wrote {path.as_posix()}" in capsys.readouterr().out

    def no_nan(token):
        raise AssertionError(f"{token} in the results file")

    doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_nan)  # strict JSON
    assert doc["notebook"] == "99_test" and doc["parameters"] == ns
    assert doc["reliability"] == 0.75 and doc["n"] == 3 and doc["missing"] is None and doc["rows"] == [{"x": 0.5}]
    assert doc["config"] == {"layer": 3, "generator": EditorConfig().generator, "mlp_ratio": EditorConfig().mlp_ratio,
                             "fuzzy_threshold": EditorConfig().fuzzy_threshold}
    assert doc["figures"] == ["figures/99_curve.png"]
    assert doc["timings"]["sleep"] >= 0.05 and doc["timings"]["total"] >= doc["timings"]["sleep"]
    assert doc["machine"]["cores"] == os.cpu_count() and doc["machine"]["torch"] == torch.__version__
    head = subprocess.run(["git", "log", "-1", "--format=%H"], capture_output=True, text=True, cwd=REPO)
    if head.returncode == 0:
        assert doc["git"]["commit"] == head.stdout.strip() and isinstance(doc["git"]["dirty"], bool)
    assert not math.isnan(doc["timings"]["total"])
