"""The command line on the tiny model: train -> saved editor -> capability before/after (no downloads)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import lks
from lks import capability as cap
from lks import cli


@pytest.fixture
def tiny_cli(monkeypatch, tiny_pair):
    monkeypatch.setattr(lks, "load_model", lambda *a, **k: tiny_pair)
    return tiny_pair


def test_task_ints():
    assert cli._task_ints(None, "limit") is None
    assert cli._task_ints("7", "limit") == 7
    assert cli._task_ints("sst2=3, rte=2", "limit") == {"sst2": 3, "rte": 2}
    with pytest.raises(SystemExit, match="--limit"):
        cli._task_ints("sst2=x", "limit")


def test_train_then_capability(tiny_cli, tmp_path, capsys, capability_dir):
    out = tmp_path / "ed"
    assert cli.main(["train", "--data", "builtin", "--n", "4", "--layer", "1", "--epochs", "3", "--out", str(out),
                     "--loc-templates", "harvested", "--precision", "float32", "--prefix-cache", "true",
                     "--para-per-edit", "2", "--train-rephrase", "false", "--w-after", "2", "--after-tokens", "3",
                     "--evaluate", "false"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["loc_templates"] == "harvested" and cfg["train"]["prefix_cache"] is True
    assert cfg["train"]["para_per_edit"] == 2 and cfg["train"]["train_rephrase"] is False
    assert (cfg["train"]["w_after"], cfg["train"]["after_tokens"]) == (2.0, 3)
    # the KL after the target is trained: once the generator has taken a step its block differs
    # and the term is far above the rounding of an unchanged block's KL (about 1e-8 in epoch 1,
    # where the generator's change starts at zero; a random tiny model's logits are flat)
    assert cfg["history"][-1]["after"] > 1e-6 > 10 * abs(cfg["history"][0]["after"])
    capsys.readouterr()
    assert cli.main(["evaluate", "--editor", str(out), "--data", "builtin", "--n", "4", "--fluency-n", "2",
                     "--fluency-tokens", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["gen_reliability_n"] == 2 and 0 <= summary["repeat_rate"] <= 1 and "repeat_rate_forced_base" in summary
    assert cli.main(["capability", "--editor", str(out), "--tasks", "sst2,wikitext2", "--limit", "sst2=4,wikitext2=1",
                     "--task-options", '{"wikitext2": {"max_length": 64}}',
                     "--data-dir", str(capability_dir), "--out", str(tmp_path / "cap-")]) == 0
    text = capsys.readouterr().out
    assert "unedited:" in text and "with 4 edits" in text and "after - before" in text
    for name in ("unedited", "edited", "comparison"):
        assert (tmp_path / f"cap-{name}.csv").is_file()
    comp = pd.read_csv(tmp_path / "cap-comparison.csv").set_index(["task", "metric"])
    edited = pd.read_csv(tmp_path / "cap-edited.csv").set_index(["task", "metric"])
    assert comp.loc[("sst2", "acc"), "n_pairs"] == 4 and set(comp.loc["wikitext2"].index) == set(cap.PERPLEXITY)
    assert edited.loc[("sst2", "acc"), "rows_seen"] >= 4  # every request went through the editor
    # the CLI's unedited numbers are the library's
    direct = cap.evaluate_capability(tiny_cli[0], tiny_cli[1], tasks=("sst2",), limit=4, data_dir=capability_dir,
                                     progress=False)
    unedited = pd.read_csv(tmp_path / "cap-unedited.csv").set_index(["task", "metric"])
    assert unedited.loc[("sst2", "acc"), "value"] == direct.set_index(["task", "metric"]).loc[("sst2", "acc"), "value"]


def test_every_recipe_option_of_train_reaches_the_config():
    """Each ``train`` option named after an EditorConfig or TrainConfig field is passed on to the
    method's settings (cli.TRAIN_OPTIONS); one missing from that list would be parsed and dropped."""
    import dataclasses

    from lks.config import EditorConfig, TrainConfig

    parser = cli.build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    fields = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(EditorConfig)}
    dests = {a.dest for a in train._actions} & fields
    assert dests and dests <= set(cli.TRAIN_OPTIONS), sorted(dests - set(cli.TRAIN_OPTIONS))
    assert {"val_edits", "val_patience", "max_steps"} <= dests
