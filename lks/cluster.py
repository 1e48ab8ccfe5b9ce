"""A grid's steps as Ray tasks: on this machine's cores and GPUs, or on a Ray cluster.

    python -m lks reproduce --profile cpu-small-smollm2 --executor ray              # a local Ray, this machine
    python -m lks reproduce --profile paper-llama2 --executor ray --address auto    # a running cluster (docs/grid.md)

Each pending step of :meth:`lks.grid.Grid.plan` (a cell's fit and evaluation, the unedited
capability run, a cell's capability comparison) is one Ray task that asks for the profile's
``cpus_per_step`` CPUs (its torch threads), ``gpus_per_step`` GPUs and ``memory_gib_per_step``
memory; a task waits for the steps it depends on (their results are its arguments). A worker loads
the model once and keeps it for the steps it runs after. A worker that dies (killed, out of
memory, a lost node) has its step retried by Ray (``max_retries``); the step resumes from what the
dead one saved (an LKS fit from its last epoch, MEMIT from its last cached chunk of targets, a
capability run from its first unfinished task), and every file is written atomically, so none is
left half-written. The results files stay the source of truth: a finished step is not planned
again. Ray is an optional dependency (``pip install lks[cluster]``), imported only here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lks.grid import Grid, GridProfile, Step
from lks.progress import Pace

_WORKER: dict[str, Any] = {}  # in a Ray worker process: the model it loaded, reused by its later steps


def run_step(grid_kw: dict[str, Any], device: str, threads: int, step: Step, *_after: Any) -> dict[str, Any]:
    """One step in this (worker) process: the grid's model loaded once per process and kept.
    ``_after``: the results of the steps this one waits for (Ray passes them when they are done)."""
    import torch
    from transformers.utils import logging as hf_logging

    import lks

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # the weights' loading bar, once per worker, in every driver's output
    key = json.dumps({**grid_kw, "device": device}, sort_keys=True)
    if _WORKER.get("key") != key:
        profile = GridProfile(**grid_kw["profile"])
        model, tok = lks.load_model(profile.model, device=device)
        _WORKER.update(key=key, grid=Grid(profile, model, tok, data_dir=grid_kw["data_dir"],
                                          results_dir=Path(grid_kw["results_dir"]), editors_dir=Path(grid_kw["editors_dir"])))
    print(f"{step.name}: started", flush=True)  # Ray shows it in the driver's output, with this worker's pid
    return {**_WORKER["grid"].run_step(step), "pid": os.getpid()}


def run(grid: Grid, only: Sequence[str] = (), *, device: str = "auto", address: str | None = None,
        workers: int | None = None, max_retries: int = 3, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run ``grid``'s pending steps as Ray tasks; returns their results in the order they finished.

    ``address``: a running Ray cluster ("auto", "ray://host:10001"); None starts a local one with
    ``workers`` steps at a time (default: as many as this machine's cores allow at the profile's
    ``cpus_per_step``). ``grid.model`` is not used: each worker loads the profile's model on
    ``device`` ("auto": CUDA where the cluster has GPUs). Raises RuntimeError naming every step that failed, after the others finished.
    """
    import ray

    from lks.datadir import data_dir

    p = grid.profile
    steps = grid.plan(only)
    if not steps:
        log(f"grid {p.model}: nothing to run")
        return []
    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False)
        else:
            workers = workers or max(1, (os.cpu_count() or 1) // p.cpus_per_step)
            ray.init(num_cpus=workers * p.cpus_per_step, num_gpus=0 if device == "cpu" else None, include_dashboard=False)
    if device == "auto":  # what the workers will have: CUDA where the cluster has GPUs
        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    gpus = p.gpus_per_step if device.startswith("cuda") else 0
    task = ray.remote(run_step).options(num_cpus=p.cpus_per_step, num_gpus=gpus, max_retries=max_retries,
                                        memory=int(p.memory_gib_per_step * 2**30) or None)
    grid_kw = {"profile": dataclasses.asdict(p), "data_dir": str(data_dir(grid.data_dir)), "results_dir": str(grid.results_dir),
               "editors_dir": str(grid.editors_dir)}
    refs: dict[str, Any] = {}
    for step in steps:  # plan order: a step's dependencies are submitted before it
        refs[step.name] = task.remote(grid_kw, device, p.cpus_per_step, step, *(refs[a] for a in step.after))
    cluster = ray.cluster_resources()
    parallel = max(1, int(cluster.get("GPU" if gpus else "CPU", 1) // (gpus or p.cpus_per_step)))
    log(f"grid {p.model}: {len(steps)} step(s) as Ray tasks, up to {parallel} at a time "
        f"({p.cpus_per_step} CPU{f', {gpus:g} GPU' if gpus else ''} each; step logs beside the editors in {grid.editors_dir})")
    waiting, by_ref, pace, done, failed = list(refs.values()), {v: k for k, v in refs.items()}, Pace(), [], []
    t0, names = time.perf_counter(), {s.name: s for s in steps}
    while waiting:
        (ref,), waiting = ray.wait(waiting, num_returns=1)
        step = names[by_ref[ref]]
        try:
            out = ray.get(ref)
        except Exception as e:  # the step's own error, or one of the steps it waited for
            failed.append(step.name)
            log(f"[{len(done) + len(failed)}/{len(steps)}] {step.name}: FAILED ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            continue
        done.append(out)
        pace.add(step, out["seconds"])
        left = [names[by_ref[r]] for r in waiting]
        log(f"[{len(done) + len(failed)}/{len(steps)}] {step.name}: {out['brief']} ({out['seconds']:.0f} s, "
            f"worker pid {out['pid']}){pace.eta(left, parallel)}")
    log(f"grid {p.model}: {len(done)} of {len(steps)} step(s) done in {time.perf_counter() - t0:.0f} s")
    if failed:
        raise RuntimeError(f"{len(failed)} grid step(s) failed: {', '.join(failed)} (their logs: lks.grid.Grid.log_path)")
    return done
