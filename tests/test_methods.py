"""The editor interface and the method registry (lks.methods): every registered method is an
Editor, and a new method is one small class and one register() call away from the grid."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_grid import profile

from lks import grid as G
from lks import methods
from lks.baselines.common import WeightEditor, down_proj
from lks.data import EditSet
from lks.report import read_grid, summary_table

LKS_DIR = Path(__file__).resolve().parents[1] / "lks"


@dataclass
class ShrinkConfig:
    layer: int = 1
    factor: float = 0.5


class ShrinkEditor(WeightEditor):
    """A method in a few lines: scales one layer's MLP output projection (edits nothing in particular)."""

    method, label, config_class = "shrink", "Shrink", ShrinkConfig

    def _fit(self, edits: EditSet, progress: bool) -> dict[int, torch.Tensor]:
        return {self.config.layer: (self.config.factor - 1.0) * down_proj(self.model, self.config.layer).weight}


@pytest.fixture()
def shrink():
    methods.register("shrink", ShrinkEditor)
    yield ShrinkEditor
    methods._REGISTRY.pop("shrink")


@pytest.mark.parametrize("name", methods.method_names())
def test_every_registered_method_is_a_complete_editor(name):
    cls = methods.editor_class(name)
    assert issubclass(cls, methods.Editor) and cls.method == name and cls.label
    assert not getattr(cls, "__abstractmethods__", None), f"{name} leaves {cls.__abstractmethods__} unimplemented"


def test_a_registered_method_runs_a_one_cell_grid(tiny_pair, tmp_path, monkeypatch, shrink):
    monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = tiny_pair
    prof = profile(tmp_path, methods=["shrink"], sizes=[2], overrides={"shrink": {"factor": 0.25}})
    grid = G.Grid(prof, model, tok, results_dir=tmp_path / "results", editors_dir=tmp_path / "editors", log=lambda m: None)
    before = [p.clone() for p in model.parameters()]
    grid.run()
    assert grid.pending() == []
    rec = json.loads(grid.result_path(G.Cell(prof.datasets[0], "shrink", 2)).read_text())
    assert rec["method"] == "shrink" and rec["config"] == {"layer": 1, "factor": 0.25} and "train_config" not in rec
    assert {"reliability", "locality", "fluency"} <= set(rec["summary"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # applied() restored the weights
    saved = methods.load_editor(str(grid.editor_path(G.Cell(prof.datasets[0], "shrink", 2))), model, tok)
    assert isinstance(saved, ShrinkEditor) and saved.routes(["any prompt", "another"]) == [True, True]
    W = down_proj(model, 1).weight
    assert torch.equal(saved.deltas[1], (0.25 - 1.0) * W)
    assert "| Shrink |" in summary_table(read_grid(tmp_path / "results", prof.model), prof)


def test_an_unknown_setting_is_named(tiny_pair, shrink):
    model, _ = tiny_pair
    with pytest.raises(ValueError, match=r"shrink config: unknown setting\(s\) \['lr'\]"):
        ShrinkEditor.configs(model, {"lr": 1.0})
    with pytest.raises(ValueError, match="unknown editing method 'nope'"):
        methods.editor_class("nope")


def test_lks_routes_only_prompts_that_mention_an_edited_subject(tiny_pair):
    from test_editor import TRAIN, tiny_edits

    from lks.config import EditorConfig
    from lks.editor import LKSEditor

    model, tok = tiny_pair
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="linear"))
    editor.fit(tiny_edits(), TRAIN, progress=False)
    assert editor.routes(["Toko Yasuda plays the", "The capital of France is"]) == [True, False]


def test_drivers_never_branch_on_a_method_name():
    """Outside the registry and the methods themselves, no module compares a method name or
    sniffs an editor's attributes (STYLE.md: one interface, one registry)."""
    names = "|".join(methods.method_names())
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?["']({names})["']|["']({names})["']\s*(==|!=)|hasattr\(editor|getattr\(editor|getattr\(saved""")
    drivers = ["grid.py", "cli.py", "metrics.py", "capability.py", "report.py", "plotting.py", "notebook.py"]
    hits = [f"{f}:{i}: {line.strip()}" for f in drivers
            for i, line in enumerate((LKS_DIR / f).read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
