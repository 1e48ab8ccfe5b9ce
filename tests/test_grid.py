"""The reproduction grid (lks.grid, ``python -m lks reproduce``) on the tiny model: every cell and
capability file is written, a finished one is never recomputed, a cell's numbers are those of its
saved editor on the first ``eval_n`` edits, and the capability run pairs with one unedited run."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import numpy as np
import pandas as pd
import pytest
from conftest import PLAIN_TRAIN, TINY_CORPUS

from lks import grid as G
from lks import report as R
from lks.data import EditSet
from lks.formats import load_edits
from lks.methods import load_editor, method_label
from lks.metrics import evaluate_edits, neighborhood_score
from lks.progress import Pace

RECORDS = [
    {"case_id": 0, "subject": "Danielle Darrieux", "prompt": "The mother tongue of Danielle Darrieux is", "target": "English",
     "ground_truth": "French", "rephrases": ["Danielle Darrieux's native language is"],
     "locality": [["Danielle Darrieux is a citizen of", "France"]], "neighborhood": [["The mother tongue of Toko Yasuda is", "Swedish"]]},
    {"case_id": 1, "subject": "Toko Yasuda", "prompt": "Toko Yasuda plays the", "target": "piano", "ground_truth": "guitar",
     "rephrases": ["The instrument of Toko Yasuda is"], "locality": [], "neighborhood": []},
    {"case_id": 2, "subject": "Edwin of Northumbria", "prompt": "The official religion of Edwin of Northumbria is",
     "target": "Islam", "ground_truth": "Christianity", "rephrases": [], "locality": [], "neighborhood": []},
    # the same subject and prompt as case 1 with another target: dropped by the documented rule
    {"case_id": 3, "subject": "Toko Yasuda", "prompt": "Toko Yasuda plays the", "target": "guitar", "ground_truth": "guitar",
     "rephrases": [], "locality": [], "neighborhood": []},
]


def profile(tmp_path, **kw) -> G.GridProfile:
    data = tmp_path / "tinyfacts.json"
    data.write_text(json.dumps(RECORDS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TINY_CORPUS * 40))
    z = dict(layers=[0, 1], cov_tokens=1024, corpus=str(corpus), z_steps=5, n_prefixes=1, prefix_tokens=4)
    base = dict(model="tiny", datasets=[str(data)], methods=["lks", "memit"], sizes=[2, 4], eval_n=2, fluency_n=1,
                fluency_tokens=3, capability_n=0,
                overrides={"lks": {**PLAIN_TRAIN, "layer": 1, "generator": "linear", "epochs": 2, "batch_size": 2,
                                   "loc_per_subject": 1, "gate_steps": 0},
                           "memit": z})
    return G.GridProfile(**{**base, **kw})


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / "cache"))


def test_grid_writes_every_cell_once(tiny_pair, tmp_path, cache, caplog):
    model, tok = tiny_pair
    prof = profile(tmp_path)
    grid = G.Grid(prof, model, tok, results_dir=tmp_path / "results", editors_dir=tmp_path / "editors", log=lambda m: None)
    assert [c.name for _, c in grid.pending()] == ["tinyfacts/lks-2", "tinyfacts/memit-2", "tinyfacts/lks-4",
                                                   "tinyfacts/memit-4"]
    caplog.set_level(logging.INFO, logger="lks")
    grid.run(only=["*/memit-*"])
    assert [c.name for _, c in grid.pending()] == ["tinyfacts/lks-2", "tinyfacts/lks-4"]
    grid.run()
    assert grid.pending() == []
    # progress inside a cell: the LKS fits' prepared parts and epochs, MEMIT's target chunks
    assert "training sequences" in caplog.text and "epoch 2/2: loss" in caplog.text
    assert "target vectors of edits 1-2 of 2 (optimised" in caplog.text
    rec = json.loads(grid.result_path(G.Cell(prof.datasets[0], "lks", 4)).read_text())
    # 4 records, case 3 conflicts with case 1: 3 edits, the first eval_n = 2 evaluated
    assert rec["n_edits"] == 3 and rec["dropped_conflicts"] == [3] and rec["n_evaluated"] == 2
    assert rec["format"] == G.FORMAT and rec["peak_rss_mb"] > 0 and rec["editor_reused"] is False and rec["train_config"]["epochs"] == 2
    assert {"reliability", "locality", "fluency", "repeat_rate", "neighborhood_score"} <= set(rec["summary"])

    # a re-run recomputes nothing
    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    grid.run_cell = boom
    grid.run()
    # the table of all cells
    table = R.read_grid(tmp_path / "results", "tiny")
    assert sorted(zip(table.method, table.n)) == [("lks", 2), ("lks", 4), ("memit", 2), ("memit", 4)]
    # edits fitted and edits evaluated, as the cell's file has them (3 and 2 at N = 4)
    assert table.set_index(["method", "n"]).loc[("lks", 4), ["n_edits", "n_evaluated"]].tolist() == [3, 2]
    md = R.markdown_table(table, dataclasses.replace(prof, sizes=(2, 4, 8)), prof.datasets[0]).splitlines()
    assert len(md) == 2 + 6 and md[4].startswith("| lks | 8 | not run yet")
    lks4 = table[(table.method == "lks") & (table.n == 4)].iloc[0]
    assert md[3].startswith(f"| lks | 4 | {lks4.reliability:.3f} | {lks4.generality:.3f} |")
    assert md[3].endswith(f"| 2 / 3 | {rec['date'][:10]} | {lks4.fit_seconds:.0f} |")  # evaluated / fitted, run; no star
    # the summary table and the generated blocks of a markdown file, from the cells' files themselves
    lks2, memit2 = (json.loads(grid.result_path(G.Cell(prof.datasets[0], m, 2)).read_text())["summary"]
                    for m in ("lks", "memit"))
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- grid-summary: how -->\nold\n<!-- /grid-summary -->\nmiddle\n"
                   "<!-- grid-table -->\n<!-- /grid-table -->\nend\n")
    R.write_tables(doc, table, dataclasses.replace(prof, sizes=(2, 8)), pd.DataFrame())
    lines = doc.read_text().splitlines()
    assert lines[:4] == ["intro", "<!-- grid-summary: how -->", "| data | edits | LKS | MEMIT |", "|---|---|---|---|"]
    assert lines[4] == (f"| tinyfacts | 2 | {lks2['locality']:.2f} / {lks2['reliability']:.2f} | "
                        f"{memit2['locality']:.2f} / {memit2['reliability']:.2f} |")
    assert lines[5:8] == ["| tinyfacts | 8 | not run yet | not run yet |", "<!-- /grid-summary -->", "middle"]
    assert lines[9] == "**tinyfacts**" and lines[-2:] == ["<!-- /grid-table -->", "end"]
    doc.write_text("no blocks\n")
    with pytest.raises(ValueError, match="no <!-- grid-table -->"):
        R.write_tables(doc, table, prof, pd.DataFrame())
    # a cell scored otherwise than the profile scores now (an earlier run) is marked in both tables
    earlier = dataclasses.replace(prof, fluency_n=prof.fluency_n + 1)
    assert R.summary_table(table, dataclasses.replace(prof, sizes=(2,))).splitlines()[2].count("†") == 0
    assert R.summary_table(table, dataclasses.replace(earlier, sizes=(2,))).splitlines()[2].count("†") == 2
    assert R.markdown_table(table, earlier, prof.datasets[0]).splitlines()[3].endswith(
        f"| 2 / 3 | {rec['date'][:10]} † | {lks4.fit_seconds:.0f} |")


def test_fluency_sample_is_all_or_a_seeded_uniform_draw():
    """All edits when there are no more than asked; otherwise ``k`` distinct ones, the same for a seed,
    and over many seeds every edit about equally often (uniform)."""
    assert G.fluency_sample(5, 300, 0) == [0, 1, 2, 3, 4]
    draw = G.fluency_sample(10_000, 300, 0)
    assert len(set(draw)) == 300 and draw == sorted(draw) and draw == G.fluency_sample(10_000, 300, 0)
    assert draw != G.fluency_sample(10_000, 300, 1)
    counts = np.bincount([i for seed in range(2000) for i in G.fluency_sample(10, 3, seed)], minlength=10)
    assert counts.min() > 0.85 * 600 and counts.max() < 1.15 * 600  # expected 2000 * 3 / 10 each


def test_a_cell_scored_otherwise_is_pending_again(tiny_pair, tmp_path, cache):
    """A finished file whose scoring differs from the profile's (e.g. an older run on the first
    1,000 edits) is run again; one scored as asked is not."""
    model, tok = tiny_pair
    prof = profile(tmp_path, methods=["memit"], sizes=[4])
    grid = G.Grid(prof, model, tok, results_dir=tmp_path / "results", editors_dir=tmp_path / "editors", log=lambda m: None)
    cell = G.Cell(prof.datasets[0], "memit", 4)
    grid.run_cell(cell)
    assert ("edit", cell) not in grid.pending() and grid.status(cell) == "done"
    path = grid.result_path(cell)
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "scoring": {**rec["scoring"], "eval_n": 1000}}))
    assert ("edit", cell) in grid.pending() and grid.status(cell) == "rescore"
    path.unlink()
    assert ("edit", cell) in grid.pending() and grid.status(cell) == "missing"


def test_a_cell_holds_its_saved_editors_numbers(tiny_pair, tmp_path, cache):
    """The summary in the file equals an evaluation, run here, of the saved editor on the first
    eval_n edits of the data set (conflicts dropped)."""
    model, tok = tiny_pair
    prof = profile(tmp_path, methods=["memit"], sizes=[4])
    grid = G.Grid(prof, model, tok, results_dir=tmp_path / "results", editors_dir=tmp_path / "editors", log=lambda m: None)
    cell = G.Cell(prof.datasets[0], "memit", 4)
    rec = grid.run_cell(cell)
    written = rec["summary"]
    sample = rec["scored"]["generation"]
    assert len(sample) == prof.fluency_n == 1 and set(sample) <= {0, 1}
    assert rec["scored"]["teacher_forced"] == "edits 0-1" and rec["scoring"]["eval_n"] == prof.eval_n
    editor = load_editor(str(grid.editor_path(cell)), model, tok)
    records = load_edits(prof.datasets[0]).records
    first_two = EditSet([records[0], records[1]])
    _, summary = evaluate_edits(editor, first_two, fluency_edits=sample, fluency_tokens=3)
    summary["neighborhood_score"] = neighborhood_score(editor, first_two)
    assert json.loads(json.dumps(summary)) == pytest.approx(written, nan_ok=True)
    # a changed setting means another editor: the saved one is not reused
    changed = {**prof.overrides, "memit": {**prof.overrides["memit"], "layers": [1]}}
    other = G.Grid(dataclasses.replace(prof, overrides=changed), model, tok, results_dir=tmp_path / "results", editors_dir=tmp_path / "editors", log=lambda m: None)
    editor, reused = other.editor(cell, grid.edits(cell)[0])
    assert editor.config.layers == [1] and not reused


def test_capability_pairs_with_one_unedited_run(tiny_pair, tmp_path, cache, capability_dir):
    model, tok = tiny_pair
    prof = profile(tmp_path, sizes=[2], capability_n=2, capability_tasks=["sst2", "rte"], capability_limit={"sst2": 4},
                   batch_size=4)
    grid = G.Grid(prof, model, tok, data_dir=str(capability_dir), results_dir=tmp_path / "results",
                  editors_dir=tmp_path / "editors", log=lambda m: None)
    grid.run()
    unedited = grid.capability_path(None)
    stamp = unedited.stat().st_mtime_ns
    frame = R.read_capability(tmp_path / "results", "tiny")
    assert sorted(set(frame.method)) == ["lks", "memit"]
    sst2 = frame[(frame.task == "sst2") & (frame.method == "memit")].iloc[0]
    assert sst2.n_pairs == 4 and 0 <= sst2.p_value <= 1
    # the stored unedited run is reused (same settings), not recomputed
    assert len(grid.unedited_capability().attrs["items"]) > 0 and unedited.stat().st_mtime_ns == stamp
    # the capability table, checked against the files themselves; a method without a file reads "not run yet"
    files = {m: json.loads(grid.capability_path(G.Cell(prof.datasets[0], m, 2)).read_text()) for m in ("lks", "memit")}
    acc = {m: {r["task"]: r for r in f["comparison"] if r["metric"] == "acc"} for m, f in files.items()}
    seen = {m: [r for r in f["after"] if r["metric"] == "acc"] for m, f in files.items()}
    md = R.capability_markdown(frame, dataclasses.replace(prof, methods=["lks", "memit", "ft"])).splitlines()
    n_rte = acc["lks"]["rte"]["n_pairs"]
    assert md[0] == f"| data | method | SST-2 acc (4 items) | RTE acc ({n_rte:,} items) | routed / seen rows |"
    assert md[2] == f"| - | unedited | {acc['lks']['sst2']['before']:.3f} | {acc['lks']['rte']['before']:.3f} | - |"
    for line, m in zip(md[3:5], ("lks", "memit")):
        data, method, *cells, routed = [c.strip() for c in line.strip("|").split("|")]
        assert (data, method) == ("tinyfacts", method_label(m))
        for cell, t in zip(cells, ("sst2", "rte")):  # "after (difference, p P)"
            after, diff, p = re.fullmatch(r"([\d.]+) \(([+-][\d.]+), p ([\d.]+)\)", cell).groups()
            row = acc[m][t]
            assert float(after) == pytest.approx(row["after"], abs=5e-4)
            assert float(diff) == pytest.approx(row["after"] - row["before"], abs=5e-4)
            assert float(p) == pytest.approx(row["p_value"], abs=5e-3)
        assert routed == f"{sum(r['routed'] for r in seen[m])} / {sum(r['rows_seen'] for r in seen[m])}"
    assert md[5] == "| tinyfacts | FT-L | not run yet |  |  |"  # SST-2, RTE, routed
    assert sum(r["routed"] for r in seen["memit"]) == sum(r["rows_seen"] for r in seen["memit"]) > 0  # weights: every row
    doc = tmp_path / "doc.md"
    doc.write_text("a\n<!-- grid-capability -->\nold\n<!-- /grid-capability -->\nb\n")
    R.write_tables(doc, R.read_grid(tmp_path / "results", "tiny"), prof, frame)
    lines = doc.read_text().splitlines()
    assert lines[2:2 + 5] == md[:5] and lines[-2:] == ["<!-- /grid-capability -->", "b"] and "old" not in lines


def test_capability_table_reads_perplexity_in_articles_and_a_bootstrap_p_of_zero_as_below_its_resolution():
    """Hand-made comparison rows: WikiText-2's items are articles; a paired-bootstrap p of 0 (no
    resample of 2,000 crossed zero) is written "p < 0.001", a small McNemar p with three decimals;
    a value and its difference above 1,000 carry thousands separators (a broken model's perplexity)."""
    prof = G.GridProfile(datasets=["zsre"], methods=["lks"], capability_tasks=["wikitext2", "rte"])
    rows = [dict(data="zsre", method="lks", n=10000, task="wikitext2", metric="word_perplexity", before=39.6,
                 after=2490.55, diff=2450.95, p_value=0.0, n_pairs=20, routed=90, rows_seen=101),
            dict(data="zsre", method="lks", n=10000, task="wikitext2", metric="bits_per_byte", before=1.0,
                 after=1.1, diff=0.1, p_value=0.5, n_pairs=20, routed=90, rows_seen=101),  # not a headline metric
            dict(data="zsre", method="lks", n=10000, task="rte", metric="acc", before=0.5, after=0.4, diff=-0.1,
                 p_value=0.0042, n_pairs=277, routed=7, rows_seen=277)]
    md = R.capability_markdown(pd.DataFrame(rows), prof).splitlines()
    assert md[0] == "| data | method | WikiText-2 word perplexity (20 articles) | RTE acc (277 items) | routed / seen rows |"
    assert md[2] == "| - | unedited | 39.60 | 0.500 | - |"
    assert md[3] == "| zsRE | LKS | 2,490.55 (+2,450.95, p < 0.001) | 0.400 (-0.100, p 0.004) | 97 / 378 |"


def test_an_interrupted_capability_run_resumes_at_its_unfinished_task(tiny_pair, tmp_path, cache, capability_dir,
                                                                      monkeypatch):
    """Each task's result is kept until all are done; the resumed run equals one run of all the
    tasks together (the oracle: lks.capability.evaluate_capability called once)."""
    import lks.capability as cap

    model, tok = tiny_pair
    prof = profile(tmp_path, sizes=[2], capability_n=2, capability_tasks=["sst2", "rte"], capability_limit={"sst2": 4},
                   batch_size=4)
    grid = G.Grid(prof, model, tok, data_dir=str(capability_dir), results_dir=tmp_path / "results",
                  editors_dir=tmp_path / "editors", log=lambda m: None)
    real, calls = cap.evaluate_capability, []

    def interrupted_at_rte(*args, **kw):
        calls.append(kw["tasks"])
        if kw["tasks"] == ["rte"] and len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(G, "evaluate_capability", interrupted_at_rte)
    with pytest.raises(KeyboardInterrupt):
        grid.unedited_capability()
    partial = tmp_path / "editors" / "tiny" / "capability-unedited.partial"
    assert [p.name for p in partial.iterdir()] == ["sst2.json"]
    resumed = grid.unedited_capability()
    assert calls == [["sst2"], ["rte"], ["rte"]] and not partial.exists()
    once = real(model, tok, **grid.capability_kwargs())
    for got, want, cols in ((resumed, once, ["task", "metric", "value", "n"]),
                            (resumed.attrs["items"], once.attrs["items"], ["task", "doc_id", "metric", "value"])):
        assert got[cols].to_numpy().tolist() == want[cols].to_numpy().tolist()


def test_kept_capability_tasks_count_only_with_the_editor_that_ran_them(tiny_pair, tmp_path, cache, capability_dir,
                                                                         monkeypatch):
    """An edited capability run stopped after its first task resumes there with the same saved
    editor; when the editor is fitted again (here: other settings, as an FT-L fit started afresh on
    another machine is another fit), the kept task is run again with the new editor."""
    import lks.capability as cap

    model, tok = tiny_pair
    kw = dict(methods=["memit"], sizes=[2], capability_n=2, capability_tasks=["sst2", "rte"],
              capability_limit={"sst2": 4}, batch_size=4)
    prof = profile(tmp_path, **kw)
    grid = G.Grid(prof, model, tok, data_dir=str(capability_dir), results_dir=tmp_path / "results",
                  editors_dir=tmp_path / "editors", log=lambda m: None)
    grid.unedited_capability()
    real, calls = cap.evaluate_capability, []

    def stops_at_rte(*args, **kw):
        calls.append((kw["tasks"], kw["editor"]))
        if kw["tasks"] == ["rte"] and len(calls) in (2, 3):
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(G, "evaluate_capability", stops_at_rte)
    cell = G.cells(prof)[0]
    with pytest.raises(KeyboardInterrupt):
        grid.run_capability(cell)  # fits the editor, runs sst2, stops in rte
    with pytest.raises(KeyboardInterrupt):
        grid.run_capability(cell)  # the same saved editor: sst2 is kept, rte stops again
    assert [t for t, _ in calls] == [["sst2"], ["rte"], ["rte"]]
    other = dataclasses.replace(prof, overrides={**prof.overrides, "memit": {**prof.overrides["memit"], "z_steps": 7}})
    grid2 = G.Grid(other, model, tok, data_dir=str(capability_dir), results_dir=tmp_path / "results",
                   editors_dir=tmp_path / "editors", log=lambda m: None)
    record = grid2.run_capability(cell)  # fitted again: sst2 runs again, with the new editor
    assert [t for t, _ in calls] == [["sst2"], ["rte"], ["rte"], ["sst2"], ["rte"]]
    assert calls[3][1] is not calls[0][1] and calls[3][1].config.z_steps == 7
    once = real(model, tok, editor=calls[3][1], **grid2.capability_kwargs())
    after = pd.DataFrame(record["after"])
    assert after[["task", "metric", "value"]].to_numpy().tolist() == once[["task", "metric", "value"]].to_numpy().tolist()


def test_a_capability_file_counts_only_with_its_cells_fit(tiny_pair, tmp_path, cache, capability_dir, monkeypatch):
    """A capability comparison belongs to one fit: the digest of the saved editor's files (the
    oracle: hashlib over them here) is in the cell's file and in the capability file. A file of an
    older run (no digest) or a cell fitted again (other settings) plans the capability step again;
    a cell re-scored with the same saved editor keeps its comparison without running a task."""
    import hashlib

    import lks.capability as cap

    model, tok = tiny_pair
    prof = profile(tmp_path, methods=["memit"], sizes=[2], capability_n=2, capability_tasks=["sst2"],
                   capability_limit={"sst2": 4}, batch_size=4)
    grid = G.Grid(prof, model, tok, data_dir=str(capability_dir), results_dir=tmp_path / "results",
                  editors_dir=tmp_path / "editors", log=lambda m: None)
    real, calls = cap.evaluate_capability, []
    monkeypatch.setattr(G, "evaluate_capability", lambda *a, **kw: calls.append(kw["editor"]) or real(*a, **kw))
    cell = G.cells(prof)[0]
    grid.run()
    assert grid.plan() == [] and len(calls) == 2  # the unedited run and the editor's

    def files():
        return json.loads(grid.result_path(cell).read_text()), json.loads(grid.capability_path(cell).read_text())

    def digest():
        files = sorted(p for p in grid.editor_path(cell).iterdir() if p.is_file())
        return hashlib.sha256(json.dumps({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}).encode()).hexdigest()

    fit, comparison = files()
    assert fit["editor"] == comparison["editor"] == digest()
    # both files as an older run wrote them: the capability step runs again, after scoring the cell's saved editor
    grid.result_path(cell).write_text(json.dumps({k: v for k, v in fit.items() if k != "editor"}))
    grid.capability_path(cell).write_text(json.dumps({k: v for k, v in comparison.items() if k not in ("editor", "settings")}))
    assert [s.name for s in grid.plan()] == ["capability tinyfacts/memit-2"]
    grid.run()
    assert len(calls) == 3 and files()[0]["editor"] == files()[1]["editor"] == digest() and grid.plan() == []

    other = dataclasses.replace(prof, overrides={**prof.overrides, "memit": {**prof.overrides["memit"], "z_steps": 7}})
    grid2 = G.Grid(other, model, tok, data_dir=str(capability_dir), results_dir=tmp_path / "results",
                   editors_dir=tmp_path / "editors", log=lambda m: None)
    grid.result_path(cell).unlink()  # the cell runs again, and its saved editor has other settings: fitted again
    assert [s.name for s in grid2.plan()] == ["key statistics", "edit tinyfacts/memit-2", "capability tinyfacts/memit-2"]

    def earlier_fit():  # what the capability table says of the comparison
        frame = R.read_capability(tmp_path / "results", "tiny")
        return set(frame.earlier_fit), R.capability_markdown(frame, prof).splitlines()[3].startswith("| tinyfacts | MEMIT (earlier fit) |")

    assert earlier_fit() == ({True}, True)  # no cell file: the comparison is of no fit the grid scores
    grid2.run_cell(cell)
    assert earlier_fit() == ({True}, True) and [s.name for s in grid2.plan()] == ["capability tinyfacts/memit-2"]
    grid2.run()  # ... and its capability step runs again
    assert earlier_fit() == ({False}, False)
    fit2, comparison2 = files()
    assert len(calls) == 4 and calls[-1].config.z_steps == 7
    assert fit2["editor"] == comparison2["editor"] == digest() != fit["editor"] and grid2.plan() == []

    rescore = {**fit2, "scoring": {**fit2["scoring"], "seed": 1}}  # scored otherwise: pending, its editor reused
    grid.result_path(cell).write_text(json.dumps(rescore))
    assert [s.name for s in grid2.plan()] == ["key statistics", "edit tinyfacts/memit-2", "capability tinyfacts/memit-2"]
    grid2.run()
    assert len(calls) == 4 and files()[0]["editor_reused"] and files()[1] == comparison2 and grid2.plan() == []


def test_the_plan_orders_every_step_after_what_it_reads(tiny_pair, tmp_path, cache, capability_dir):
    """AlphaEdit's cell waits for MEMIT's (its target vectors), a capability step for its cell's fit
    and for the unedited run, which comes once, just before the first capability step; a done
    cell's step is not planned, and its dependents do not wait for it."""
    model, tok = tiny_pair
    prof = profile(tmp_path, methods=["memit", "alphaedit"], sizes=[2, 4], capability_n=4, capability_tasks=["sst2"],
                   capability_limit={"sst2": 4}, batch_size=4)
    grid = G.Grid(prof, model, tok, data_dir=str(capability_dir), results_dir=tmp_path / "results",
                  editors_dir=tmp_path / "editors", log=lambda m: None)
    stats = "key statistics"  # MEMIT's and AlphaEdit's shared work
    plan = [(s.name, s.after) for s in grid.plan()]
    assert plan == [(stats, ()), ("edit tinyfacts/memit-2", (stats,)),
                    ("edit tinyfacts/alphaedit-2", (stats, "edit tinyfacts/memit-2")),
                    ("edit tinyfacts/memit-4", (stats,)), ("capability unedited", ()),
                    ("capability tinyfacts/memit-4", ("edit tinyfacts/memit-4", "capability unedited")),
                    ("edit tinyfacts/alphaedit-4", (stats, "edit tinyfacts/memit-4")),
                    ("capability tinyfacts/alphaedit-4", ("edit tinyfacts/alphaedit-4", "capability unedited"))]
    grid.run(only=["*/memit-4"])
    assert (grid.log_path(grid.plan()[0]).name, grid.log_path(G.Step("unedited")).name) == \
        ("key-statistics.log", "capability-unedited.log")
    plan = [(s.name, s.after) for s in grid.plan()]
    assert ("edit tinyfacts/alphaedit-4", (stats,)) in plan and ("capability unedited", ()) not in plan
    assert ("capability tinyfacts/alphaedit-4", ("edit tinyfacts/alphaedit-4",)) in plan


def test_each_step_logs_its_progress_to_its_own_file(tiny_pair, tmp_path, cache):
    model, tok = tiny_pair
    prof = profile(tmp_path, sizes=[2])
    lines = []
    grid = G.Grid(prof, model, tok, results_dir=tmp_path / "results", editors_dir=tmp_path / "editors", log=lines.append)
    grid.run()
    text = grid.log_path(G.Step("edit", G.Cell(prof.datasets[0], "lks", 2))).read_text()
    assert text.index("edit tinyfacts/lks-2: started (pid") < text.index("epoch 1/2: loss") < text.index("epoch 2/2: loss") \
        < text.index("edit tinyfacts/lks-2: finished in")
    assert "target vectors of edits 1-2 of 2" in grid.log_path(G.Step("edit", G.Cell(prof.datasets[0], "memit", 2))).read_text()
    assert re.fullmatch(r"\[1/3\] edit tinyfacts/lks-2: reliability .* \(\d+ s\); "
                        r"ETA \d\d:\d\d UTC \(about \d+ min, for 1 of 2 steps left\)", lines[2])
    assert lines[4].startswith("[2/3] key statistics: for memit (")
    assert lines[-1].startswith("[3/3] edit tinyfacts/memit-2: reliability") and "ETA" not in lines[-1]


def test_the_eta_scales_edit_steps_by_their_edits():
    """Oracle: the arithmetic by hand. 10 edits took 20 s, so 1,000 take 2,000 s; a capability
    step takes the mean of the finished capability and unedited steps (not of a cached key
    statistics step's 0 s: the bug, "about 0 min" before a capability step); two workers halve
    the sum."""
    pace, cell = Pace(), lambda n: G.Cell("zsre", "lks", n)
    assert pace.eta([G.Step("edit", cell(10))]) == "; 1 step(s) left"
    pace.add(G.Step("edit", cell(10)), 20.0)
    left = [G.Step("edit", cell(1000)), G.Step("capability", cell(1000))]
    assert re.fullmatch(r"; ETA \d\d:\d\d UTC \(about 33 min, for 1 of 2 steps left\)", pace.eta(left))
    pace.add(G.Step("shared", shared="key-stats"), 0.0)   # read from a cache: paces no capability step
    assert pace.eta(left).endswith("for 1 of 2 steps left)")
    pace.add(G.Step("unedited"), 400.0)
    pace.add(G.Step("capability", cell(10)), 200.0)
    assert pace.eta(left).endswith("(about 38 min)")          # 2,000 + 300 s
    assert pace.eta(left, workers=2).endswith("(about 19 min)")
    assert pace.eta(left * 3, workers=1).endswith("(about 1.9 h)")  # 6,900 s
    assert pace.eta([]) == ""
    from lks.progress import to_go

    assert to_go(10.0, 2, 6) == "10 s; about 20 s to go" and to_go(5.0, 0, 4).endswith("about 20 s to go")


def test_time_to_go_skips_work_read_from_a_cache():
    """A resumed fit: two cached items (no time), then items of 30 s each, 6 in all. The pace is
    30 s an item from the first fresh one on, whatever the cached ones took (worked by hand)."""
    from lks.progress import ToGo

    pace = ToGo(6)
    assert pace.step(1, 0.5, cached=True) == "none computed in this run yet"
    assert pace.step(1, 0.5, cached=True) == "none computed in this run yet"
    assert pace.step(1, 30.0) == "computed in this run 30 s; about 90 s to go"
    assert pace.step(2, 60.0) == "computed in this run 90 s; about 30 s to go"
    assert pace.step(1, 30.0).endswith("about 0 s to go")


def test_bad_profiles_are_refused(tmp_path):
    with pytest.raises(ValueError, match="methods: unknown"):
        G.GridProfile(methods=["rome"])
    with pytest.raises(ValueError, match="capability_n"):
        G.GridProfile(sizes=[10], capability_n=100)
    bad = tmp_path / "p.json"
    bad.write_text('{"sizes": [10], "colour": 1}')
    with pytest.raises(ValueError, match="colour"):
        G.load_profile(str(bad))
    with pytest.raises(FileNotFoundError, match="no-such-profile"):
        G.load_profile("no-such-profile")


@pytest.mark.parametrize("name,model", [("cpu-full-smollm2", "smollm2-135m"), ("paper-llama2", "llama2-7b-chat"),
                                        ("paper-mistral", "mistral-7b-instruct")])
def test_shipped_profiles_are_the_papers_grid(name, model):
    import yaml

    p = G.load_profile(name)
    assert p.model == model and p.sizes == (10, 100, 1000, 10000) and set(p.methods) == {"lks", "ft", "memit", "alphaedit",
                                                                                            "alphaedit-seq"}
    assert set(p.datasets) == {"zsre", "counterfact"} and p.capability_n == 10000 and p.overrides == {}
    assert len(G.cells(p)) == 40 and p.eval_n >= max(p.sizes)  # every edit of every cell scored
    # the profile's notebooks 03 and 04 read this grid, on this model
    for stem in ("03_scaling_to_10000_edits", "04_general_capability"):
        params = yaml.safe_load((G.REPO / "params" / name / f"{stem}.yaml").read_text())
        assert (params["grid_profile"], params["model_name"]) == (name, model), stem



def test_a_grids_carried_state_is_committable_and_leaves_the_code_clean(tmp_path):
    """runs/carried/ holds what a later machine needs to resume, weights excepted (the repository's
    .gitignore keeps the rest out), and its changes, like results/, do not mark a cell's code as dirty."""
    import shutil
    import subprocess

    from lks.utils import git_state

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    shutil.copy(G.REPO / ".gitignore", tmp_path / ".gitignore")
    (tmp_path / "lks").mkdir()
    (tmp_path / "lks" / "a.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "code")
    carried = ["runs/carried/cache/targets/z.safetensors",
               "runs/carried/editors/m/zsre/memit-10000.capability.partial/sst2.json",
               "runs/carried/editors/m/zsre/lks-10000.capability.partial/sst2.json",
               "runs/carried/editors/m/capability-unedited.partial/rte.json"]
    # rebuilt elsewhere, or weights (FT-L's and sequential AlphaEdit's step state, any method's editor folder, an LKS fit's epoch
    # checkpoint included), which the project never commits
    rebuilt = ["runs/carried/cache/models/m/model.safetensors", "runs/carried/cache/stats/m/L4.safetensors",
               "runs/carried/cache/ft/s.safetensors", "runs/carried/cache/alphaedit-seq/s.safetensors",
               "runs/carried/editors/m/zsre/ft-10000/deltas.safetensors",
               "runs/carried/editors/m/zsre/lks-10000/train_state.safetensors",
               "runs/carried/editors/m/counterfact/lks-10/generator.safetensors",
               "runs/carried/editors/m/counterfact/alphaedit-seq-10000/deltas.safetensors",
               "runs/carried/editors/m/zsre/memit-10000/deltas.safetensors",
               "runs/carried/editors/m/zsre/alphaedit-100/deltas.safetensors",
               "runs/carried/editors/m/zsre/ft-10000.lock", "runs/editors/m/zsre/lks-10/config.json"]
    for name in carried + rebuilt + ["results/m/zsre/ft-10.json"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    untracked = git("status", "--porcelain", "--untracked-files=all").split("\n")
    assert sorted(line[3:] for line in untracked if line.startswith("?? runs/")) == sorted(carried)
    assert git_state(tmp_path) == {"commit": git("rev-parse", "HEAD").strip(), "dirty": False}
    (tmp_path / "lks" / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path)["dirty"] is True


def test_grid_table_labels_every_metric_column_with_its_split():
    table = pd.DataFrame({"data": ["zsre"], "method": ["lks"], "n": [10], "n_evaluated": [10], "reliability": [0.9],
                          "generality": [0.7], "generality_split": ["seen"], "fluency_base": [4.4]})
    cells, legend = R.grid_table(table, ["reliability", "generality", "fluency_base", "repeat_rate"])
    assert list(cells.columns) == ["data", "method", "N", "evaluated", "reliability [seen]", "generality [seen]",
                                   "fluency unedited [seen + held-out]", "repeat_rate [seen + held-out]"]
    assert cells["generality [seen]"].tolist() == [0.7] and cells["repeat_rate [seen + held-out]"].isna().all()
    assert list(legend.column) == list(cells.columns[4:]) and legend.definition.str.len().min() > 10


def test_unedited_memo_gives_the_same_evaluation_and_skips_the_unedited_passes(tiny_pair, tmp_path, cache, monkeypatch):
    import lks.metrics as M

    model, tok = tiny_pair
    prof = profile(tmp_path, methods=["memit"], sizes=[4])
    grid = G.Grid(prof, model, tok, results_dir=tmp_path / "results", editors_dir=tmp_path / "editors", log=lambda m: None)
    cell = G.Cell(prof.datasets[0], "memit", 4)
    edits = grid.edits(cell)[0]
    editor, _ = grid.editor(cell, edits)
    plain = evaluate_edits(editor, edits, fluency_n=2, fluency_tokens=3).summary
    memo = M.UneditedMemo()
    first = evaluate_edits(editor, edits, fluency_n=2, fluency_tokens=3, memo=memo).summary
    assert first == pytest.approx(plain, nan_ok=True)
    calls = []
    real = M.teacher_forced
    monkeypatch.setattr(M, "teacher_forced", lambda *a, **k: calls.append((len(a[2]), k.get("context"))) or real(*a, **k))
    again = evaluate_edits(editor, edits, fluency_n=2, fluency_tokens=3, memo=memo).summary
    assert again == pytest.approx(first, nan_ok=True)
    ran = [context for n, context in calls if n]
    assert ran and all(c is not None for c in ran)  # only the edited passes ran


def test_cli_lists_the_pending_steps_and_prints_tables(tmp_path, capsys):
    from lks.cli import main

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"datasets": ["zsre"], "methods": ["lks", "memit"], "sizes": [10, 100], "capability_n": 100}))
    assert main(["reproduce", "--profile", str(path), "--results", str(tmp_path / "r"), "--list", "--only", "*/memit-*"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "key statistics", "edit zsre/memit-10  after: key statistics", "edit zsre/memit-100  after: key statistics",
        "capability unedited", "capability zsre/memit-100  after: edit zsre/memit-100, capability unedited"]
    # a cell scored otherwise is re-scored; a capability file whose cell is to run again runs again after it
    cell_dir = tmp_path / "r" / "smollm2-135m" / "zsre"
    cell_dir.mkdir(parents=True)
    (cell_dir / "memit-10.json").write_text(json.dumps({"format": G.FORMAT, "scoring": {"eval_n": 1}}))
    (cell_dir / "capability-memit-100.json").write_text(json.dumps({"format": G.FORMAT}))
    assert main(["reproduce", "--profile", str(path), "--results", str(tmp_path / "r"), "--list", "--only", "*/memit-*"]) == 0
    assert capsys.readouterr().out.splitlines()[1:5:3] == [
        "edit zsre/memit-10 (re-score)  after: key statistics",
        "capability zsre/memit-100 (again)  after: edit zsre/memit-100, capability unedited"]
    for name in ("memit-10.json", "capability-memit-100.json"):
        (cell_dir / name).unlink()
    assert main(["reproduce", "--profile", str(path), "--results", str(tmp_path / "r"), "--table"]) == 0
    cells, capability = capsys.readouterr().out.split("**General capability**")
    # 2 methods x 2 sizes; the unedited row's 5 tasks and one row per method
    assert cells.count("not run yet") == 4 and capability.count("not run yet") == 5 + 2
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- grid-summary -->\n<!-- /grid-summary -->\n")
    assert main(["reproduce", "--profile", str(path), "--results", str(tmp_path / "r"), "--write", str(doc)]) == 0
    assert doc.read_text().count("not run yet") == 4 and capsys.readouterr().out == ""
    (tmp_path / "plain.md").write_text("text\n")
    assert main(["reproduce", "--profile", str(path), "--results", str(tmp_path / "r"), "--write", str(tmp_path / "plain.md")]) == 2
    assert "plain.md: no <!-- grid-table -->" in capsys.readouterr().err
    assert main(["reproduce", "--profile", str(tmp_path / "missing.json"), "--list"]) == 2
