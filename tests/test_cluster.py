"""The grid as Ray tasks (lks.cluster, ``python -m lks reproduce --executor ray``) on the tiny
model, against the sequential executor (the oracle: :meth:`lks.grid.Grid.run` in this process,
one thread, as each Ray task runs): a 4-cell grid on a local Ray with two workers writes the same
files, also when one worker is killed in the middle of a fit (Ray retries its step, which resumes
from the fit's last saved epoch)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import PLAIN_TRAIN, make_tiny_llama, make_tiny_tokenizer
from test_grid import RECORDS

import lks
from lks import grid as G

REPO = Path(__file__).resolve().parents[1]


def write_profile(tmp_path: Path) -> Path:
    """A 4-cell grid (LKS and MEMIT at 2 and 4 edits) on a tiny Llama saved as a local model folder."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(layers=3, vocab=len(tok))
    model.save_pretrained(tmp_path / "tiny-model")
    tok.save_pretrained(tmp_path / "tiny-model")
    (tmp_path / "tinyfacts.json").write_text(json.dumps(RECORDS))
    from conftest import TINY_CORPUS

    (tmp_path / "corpus.txt").write_text("\n".join(TINY_CORPUS * 40))
    memit = dict(layers=[0, 1], cov_tokens=1024, corpus=str(tmp_path / "corpus.txt"), z_steps=5, n_prefixes=1, prefix_tokens=4)
    # 150 epochs without early stopping: the LKS fit lasts long enough to be killed in its middle
    lks_over = {**PLAIN_TRAIN, "layer": 1, "generator": "linear", "epochs": 150, "patience": 1000, "batch_size": 2,
                "loc_per_subject": 1, "gate_steps": 0}
    prof = dict(model=str(tmp_path / "tiny-model"), datasets=[str(tmp_path / "tinyfacts.json")], methods=["lks", "memit"],
                sizes=[2, 4], eval_n=4, fluency_n=1, fluency_tokens=3, capability_n=0, cpus_per_step=1,
                overrides={"lks": lks_over, "memit": memit})
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof))
    return path


def summaries(results: Path) -> dict[str, dict]:
    return {p.relative_to(results).as_posix(): json.loads(p.read_text())["summary"] for p in sorted(results.rglob("*.json"))}


def close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


def test_ray_grid_equals_the_sequential_one_and_survives_a_killed_worker(tmp_path, monkeypatch):
    path = write_profile(tmp_path)
    prof = G.load_profile(str(path))
    # the oracle: the sequential executor in this process, on one thread, with its own caches
    monkeypatch.setenv("LKS_CACHE_DIR", str(tmp_path / "cache-seq"))
    model, tok = lks.load_model(prof.model, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        G.Grid(prof, model, tok, results_dir=tmp_path / "seq", editors_dir=tmp_path / "seq-editors", log=lambda m: None).run()
    finally:
        torch.set_num_threads(threads)
    assert len(summaries(tmp_path / "seq")) == 4

    env = {**os.environ, "LKS_CACHE_DIR": str(tmp_path / "cache-ray"), "RAY_DEDUP_LOGS": "0"}
    out = open(tmp_path / "ray.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lks", "reproduce", "--profile", str(path), "--executor", "ray",
                             "--workers", "2", "--device", "cpu", "--results", str(tmp_path / "ray"),
                             "--editors", str(tmp_path / "ray-editors")], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # kill the worker that fits LKS at 4 edits once it has finished a few epochs
        log = tmp_path / "ray-editors" / "tiny-model" / "tinyfacts" / "lks-4.log"
        deadline, killed = time.monotonic() + 300, None
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            text = log.read_text() if log.is_file() else ""
            if re.search(r"epoch 10/150", text):
                killed = int(re.search(r"started \(pid (\d+)", text).group(1))
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        assert killed is not None, "the LKS fit finished (or never started) before it could be killed"
        assert proc.wait(timeout=600) == 0, (tmp_path / "ray.log").read_text()[-3000:]
    finally:
        proc.kill()
        out.close()
    text = log.read_text()
    assert text.count("edit tinyfacts/lks-4: started") == 2 and f"started (pid {killed}" in text
    resumed = int(re.search(r"resumed from the checkpoint after epoch (\d+)", text).group(1))
    # the fit logs an epoch before it writes that epoch's checkpoint, so a kill right after the
    # "epoch 10/150" line can find epoch 9's checkpoint the last one written (seen under load)
    assert 9 <= resumed < 150 and text.count("edit tinyfacts/lks-4: finished") == 1
    # every file written, none half-written (each parses), no temporary file left; the same numbers
    ray = summaries(tmp_path / "ray")
    assert not [p for p in (tmp_path / "ray").rglob("*") if p.is_file() and p.suffix != ".json"]
    seq = summaries(tmp_path / "seq")
    assert ray.keys() == seq.keys()
    for name in seq:
        assert close(ray[name], seq[name]), name
    # the 4 cells and MEMIT's key statistics, once, finished before either MEMIT cell (which wait for it)
    done = re.findall(r"\n\[\d/5\] (key statistics|edit \S+): ", (tmp_path / "ray.log").read_text())
    assert sorted(done) == sorted(["key statistics", *(f"edit tinyfacts/{m}-{n}" for m in ("lks", "memit") for n in (2, 4))])
    assert done.index("key statistics") < min(done.index("edit tinyfacts/memit-2"), done.index("edit tinyfacts/memit-4"))
    assert "5 of 5 step(s) done" in (tmp_path / "ray.log").read_text()
