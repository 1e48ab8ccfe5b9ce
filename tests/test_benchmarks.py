"""Fast smoke tests of the benchmark helpers on the tiny random Llama (no embedded model, no data).

The training benchmark is only meaningful if its naive loop computes the same losses as the fast
path; these tests pin that at tiny scale, and the optimality of the length buckets lks trains in.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from bench_train import NaiveLoop, padded_tokens  # noqa: E402
from conftest import PLAIN_TRAIN, data_file, prepared_editor  # noqa: E402

from lks.config import EditorConfig, TrainConfig  # noqa: E402
from lks.data import EditRecord, EditSet  # noqa: E402
from lks.training.fastpath import length_buckets  # noqa: E402
from lks.training.sequences import edit_batches, subject_span  # noqa: E402


def _edits() -> EditSet:
    return EditSet([
        EditRecord(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is", target="English",
                   rephrases=["Danielle Darrieux's native language is"], case_id=0),
        EditRecord(subject="Edwin of Northumbria", prompt="The official religion of Edwin of Northumbria is",
                   target="Islam", rephrases=["The faith of Edwin of Northumbria is"], case_id=1),
        EditRecord(subject="Toko Yasuda", prompt="Toko Yasuda plays the", target="piano",
                   rephrases=["The instrument Toko Yasuda plays is the"], case_id=2),
    ])


@pytest.mark.parametrize("loc_positions", ["after_subject", "last"])
def test_naive_losses_equal_fast_path(tiny_pair, loc_positions):
    model, tok = tiny_pair
    cfg = TrainConfig(**PLAIN_TRAIN, batch_size=3, loc_per_subject=2, loc_topk=50, loc_positions=loc_positions, seed=0)
    edits = _edits()
    editor, tr = prepared_editor(model, tok, edits, cfg, EditorConfig(layer=1, generator="residual"), 0.5)
    batch = edit_batches(tr.per_edit, tr.seqs, cfg.batch_size)[0]

    def span(prompt, subject):
        return subject_span(editor.scope, prompt, subject)
    naive = NaiveLoop(model, tok, 1, cfg, edits, span)
    naive_pe = NaiveLoop(model, tok, 1, cfg, edits, span, per_example=True)
    with torch.no_grad():
        fast = tr.batch_loss(batch)
        nl = naive.loss(editor.generator, list(edits), kl="both")
        n1 = naive_pe.loss(editor.generator, list(edits), kl="topk")
    assert float(fast["loc"]) > 1e-6  # the edit really changes the locality prompts
    assert float(nl["total_topk"]) == pytest.approx(float(fast["total"]), rel=1e-4)
    assert float(n1["total_topk"]) == pytest.approx(float(fast["total"]), rel=1e-4)
    assert float(nl["loc_full"]) >= float(nl["loc_topk"]) - 1e-6  # coarse-graining lowers the KL


def test_length_buckets_is_optimal():
    lens = [3, 4, 4, 7, 8, 15, 16, 16]
    assert length_buckets([], 3) == []
    assert length_buckets([5], 3) == [1]
    for k in (1, 2, 3, 9):
        cuts = length_buckets(lens, k)
        assert cuts[-1] == len(lens) and len(cuts) <= k

        def cost(cs):
            return sum(lens[e - 1] * (e - s) for s, e in zip([0, *cs[:-1]], cs, strict=True))

        brute = min(cost([*c, len(lens)]) for r in range(min(k, len(lens))) for c in itertools.combinations(range(1, len(lens)), r))
        assert cost(cuts) == brute


def test_padded_tokens(tiny_pair):
    class S:
        def __init__(self, n):
            self.ids, self.subj_pos = [0] * n, 0

    seqs = [S(n) for n in (2, 2, 9, 10)]
    assert padded_tokens(seqs, [0, 1, 2, 3]) == 40
    assert padded_tokens(seqs, [0, 1, 2, 3], 2) == 2 * 2 + 2 * 10


def test_gate_report_counts_prompts_and_reads_the_gate(tiny_pair):
    from gate_diagnostics import gate_report

    from lks.editor import LKSEditor
    model, tok = tiny_pair
    edits = _edits()
    editor = LKSEditor(model, tok, EditorConfig(layer=1, generator="gated", mlp_ratio=2))
    editor.fit(edits, TrainConfig(**PLAIN_TRAIN, lr=1e-2, epochs=2, batch_size=2, loc_per_subject=2, loc_topk=50, gate_steps=50),
               progress=False)
    report = gate_report(editor, list(edits))
    assert report["prompt"]["n"] == len(edits) and report["train_locality"]["n"] == len(edits)
    assert report["rephrase"]["n"] == sum(bool(r.rephrases) for r in edits)
    assert "mend_paraphrase_form" not in report  # no record has a second rephrase
    assert all(0 <= v["open"] <= 1 and 0 < v["mean_gate"] < 1 for v in report.values())


def test_bench_train_runs_the_recipe_step_end_to_end(smol, data_root, capsys):
    """The README's training benchmark, shrunk: the registered recipe's step (gated generator)
    passes the loss check against the naive loop, is timed, and goes through the roofline."""
    import bench_train

    data_file(data_root, "lks/cf_eval_data.json")
    bench_train.main(["--data-dir", str(data_root), "--n", "4", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                      "--no-bf16", "--roofline", "--roofline-reps", "1"])
    out = capsys.readouterr().out
    assert "generator gated" in out
    assert "(OK, target <= 1e-3)" in out  # fast and naive losses agree
    assert "fraction of the matmul roofline" in out


def test_a_benchmark_record_names_what_ran_where_and_when(tmp_path):
    """benchmarks/records.py writes one JSON file per measurement with the fields the README's
    numbers are traced by."""
    import json
    import time

    from records import write_record

    path = write_record("bench_x", data="zsre", edits=10, seconds=12.345, peak_rss_mib=100.04, threads=2,
                        extra={"phases": {"cache": 1.0}}, folder=tmp_path)
    rec = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.endswith("-bench_x-zsre-10.json")
    assert (rec["benchmark"], rec["data"], rec["edits"], rec["seconds"], rec["peak_rss_mib"], rec["threads"]) == \
        ("bench_x", "zsre", 10, 12.3, 100.0, 2)
    assert rec["phases"] == {"cache": 1.0} and rec["machine"]["torch_threads"] == 2 and rec["machine"]["cpu"]
    assert rec["date"].startswith(time.strftime("%Y-%m-", time.gmtime())) and "commit" in rec and "dirty" in rec


def test_the_gpu_cost_benchmark_runs_on_the_tiny_shape_and_projects_every_cell(tmp_path, capsys):
    """benchmarks/gpu_cost.py's CPU variant (random weights in a tiny shape, no data): every cost is
    measured, every cell of the profile projected, and the record written."""
    import json

    import gpu_cost

    from lks.grid import load_profile

    res = gpu_cost.main(["--shape", "tiny", "--device", "cpu", "--edits", "4", "8", "--profile", "cpu-small-smollm2",
                         "--out", str(tmp_path)])
    m = res["measured"]
    assert sorted(m["lks"]) == [4, 8] and all(v["prepare_s"] > 0 and v["epoch_s"] > 0 for v in m["lks"].values())
    assert m["memit"]["targets_s"] > 0 and m["memit"]["solve_s"] > 0 and m["alphaedit"]["solve_s"] > 0
    assert m["ft"]["step_s"] > 0 and m["eval"]["teacher_forced_s"] > 0 and m["forward_tokens_per_s"] > 0
    assert m["stats"]["tokens"] == 2000 and m["stats"]["seconds"] > 0
    prof = load_profile("cpu-small-smollm2")
    rows = {(r["method"], r["n"]): r for r in res["projection"]}
    assert set(rows) == {(meth, n) for meth in prof.methods for n in prof.sizes}
    for meth in prof.methods:  # a cell of 10x the edits costs 10x (the projection is linear from the measured N)
        assert rows[(meth, 100)]["fit_s"] == pytest.approx(10 * rows[(meth, 10)]["fit_s"], rel=1e-9)
    total = sum((r["fit_s"] + r["eval_s"]) * r["datasets"] for r in res["projection"]) / 3600
    assert res["projected_hours"] == pytest.approx(total) and total > 0
    (record,) = tmp_path.glob("*-gpu_cost-builtin-8.json")
    assert json.loads(record.read_text())["projected_hours"] == pytest.approx(total)
    assert "projected cpu-small-smollm2" in capsys.readouterr().out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_memory_benchmark_child_ends_with_its_parent(tmp_path):
    """bench_memory's child measurement (end_with_parent) exits once its parent is killed, instead
    of fitting on for an hour; checked on a real process pair."""
    import os
    import subprocess
    import time

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    flag = tmp_path / "up"
    child_code = (f"import sys, time; sys.path.insert(0, {bench!r}); import bench_memory; "
                  f"bench_memory.end_with_parent(0.1); open({str(flag)!r}, 'w').close(); time.sleep(120)")
    parent_code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', {child_code!r}]); "
                   f"print(c.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())

    def running() -> bool:
        try:
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
        except (FileNotFoundError, IndexError):
            return False
        return state not in ("Z", "X")  # a zombie has ended; its reaper is not ours

    deadline = time.monotonic() + 60
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists() and running()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    ended = not running()
    if not ended:
        os.kill(pid, 9)
    assert ended


def test_the_target_benchmark_measures_each_data_set_and_records_it(smol, data_root, tmp_path, monkeypatch, capsys):
    """MEMIT's target benchmark, shrunk to two edits per data set: a line per data set, the second's
    ratios against the first, and a record per data set whose edit-steps lie between the steps taken
    (the last edit to stop ran every one) and two edits running every step."""
    import json

    import bench_targets

    for name in ("lks/cf_eval_data.json", "lks/zsre_eval_data.json"):
        data_file(data_root, name)
    monkeypatch.setenv("LKS_BENCH_RESULTS", str(tmp_path))
    bench_targets.main(["--data-dir", str(data_root), "--n", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert "counterfact, 2 edits" in out and "zsre, 2 edits" in out and "against counterfact:" in out
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*-bench_targets-*.json"))]
    assert sorted(r["data"] for r in records) == ["counterfact", "zsre"]
    for r in records:
        assert 1 <= r["steps"] <= r["z_steps"] and r["steps"] <= r["edit_steps"] <= 2 * r["steps"], r
        assert r["seconds"] >= r["steps_s"] > 0 and r["edits"] == 2
