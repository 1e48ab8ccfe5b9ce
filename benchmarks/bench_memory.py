"""Benchmark of memory: peak RSS of ``LKSEditor.fit``, size of the saved editor, size of the caches.

Usage::

    python benchmarks/bench_memory.py [--data-dir DIR] [--n 1000] [--epochs 1] [--threads 1]
    python benchmarks/bench_memory.py --n 100,1000          # several sizes, one subprocess each
    python benchmarks/bench_memory.py --n 10000             # the full run (long on CPU)
    python benchmarks/bench_memory.py --data zsre --n 100,1000   # zsRE's edits instead of CounterFact's

Every N runs in its own subprocess, so peaks do not mix: load the embedded model, load the first N
edits of ``--data`` (CounterFact by default; skipping the records ``fit`` rejects as conflicts), ``fit`` them (the registered recipe, ``--epochs`` epochs, default 1), save the
editor to a temporary directory. Reported per N:

* peak RSS of the subprocess (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water
  mark) and the RSS after loading the model (psutil when installed, else ``/proc/self/statm``), so
  the peak attributable to the edits is the difference;
* the fast path's caches, captured from ``FastPath.precompute``'s return value: the layer-L states
  of every training sequence (``[sum of lengths, d]`` float32) and the top-k locality references
  (log-probs float32, token ids int32, tail float32);
* the saved editor's size on disk (``editor.save``).

Bytes per edit are printed so larger N can be projected linearly; projections are labelled
``[PROJECTED]``, measured numbers are not. The target for 10,000 edits is a peak <= 6 GiB (issue 36; 8 GiB before).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from records import code_state, write_record  # noqa: E402  (benchmarks/records.py)

TARGET_GIB = 6  # peak RSS of a 10,000-edit fit (issue 36)

MODEL = "smollm2-135m"
GIB, MIB = 1024**3, 1024**2


def rss_now() -> tuple[int, str]:
    """Current resident set size in bytes and the source of the number."""
    try:
        import psutil

        return psutil.Process().memory_info().rss, "psutil"
    except ImportError:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE"), "/proc/self/statm"


def peak_rss() -> int:
    """High-water RSS of this process in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def first_without_conflicts(edits, n: int, name: str = "counterfact"):
    """The first ``n`` records that ``fit`` accepts (:meth:`lks.data.EditSet.drop_conflicts`:
    a later record with the same subject and prompt and another target is skipped; 79 such records
    in CounterFact's 10,000) and how many were skipped before the n-th."""
    from lks.data import EditSet

    kept, dropped = edits.drop_conflicts()
    d = 0  # drops before the n-th kept record, which sits at index n - 1 + d
    while d < len(dropped) and dropped[d] < n + d:
        d += 1
    return EditSet(list(kept)[:n], name=f"{name}-{n}"), d


def end_with_parent(every_s: float = 5.0) -> None:
    """A child measurement ends when its parent does (a killed benchmark left 10,000-edit children
    running for an hour): a daemon thread checks the parent's pid every ``every_s`` seconds."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run_child(cmd: list[str], what: str) -> dict:
    """Run a benchmark subprocess and return the JSON of its ``RESULT`` line (exit with its output if it fails)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"child for {what} failed (exit {proc.returncode})")
    return json.loads(line[len("RESULT "):])


def child(n: int, args: argparse.Namespace) -> dict:
    """One measurement, run in a fresh process."""
    import torch

    torch.set_num_threads(args.threads)
    if args.lks_root:  # --baseline: the other checkout's lks
        sys.path.insert(0, args.lks_root)
    import lks
    from lks.config import model_spec
    from lks.editor import LKSEditor

    out: dict = {"n": n, "threads": torch.get_num_threads()}
    out["rss_start"], out["rss_source"] = rss_now()
    model, tok = lks.load_model(MODEL, device="cpu")
    out["rss_model"], _ = rss_now()
    out["peak_model"] = peak_rss()
    edits, out["dropped_conflicts"] = first_without_conflicts(
        lks.load_edits(args.data, data_dir=args.data_dir), n, args.data)
    spec = model_spec(MODEL)
    cfg = dataclasses.replace(spec.train, epochs=args.epochs)
    editor = LKSEditor(model, tok, spec.editor)
    editor.fast.quantize_shapes = args.quantize == "on"  # forced either way (the library default pads only in bf16 on CPU)
    out["quantize"] = args.quantize
    real_precompute, seen = editor.fast.precompute, {}

    def capture(seqs, *a, **kw):  # record the cache fit() builds (sizes only)
        cache = real_precompute(seqs, *a, **kw)
        seen["states"] = cache.states.numel() * cache.states.element_size()
        seen["tokens"] = int(cache.states.shape[0])
        seen["ref"] = sum(t.numel() * t.element_size() for t in (cache.ref_logp, cache.ref_idx, cache.ref_tail)
                          if t is not None)
        seen["ref_rows"] = 0 if cache.ref_logp is None else int(cache.ref_logp.shape[0])
        pre = getattr(cache, "prefix", None)  # code before lks.suffix.PrefixKV (--baseline): cache.kv
        rows = pre.rows if pre is not None else getattr(cache, "kv", None)
        seen["kv"] = 0 if rows is None else rows.numel() * rows.element_size()  # prefix keys/values
        seen["kv_rows"] = 0 if rows is None else int(rows.shape[0])  # one per distinct token prefix
        seen["prefix_tokens"] = sum(q.subj_pos for q in seqs)  # the rows without that sharing
        seen["sequences"] = len(cache.offsets)
        seen["rss_after_precompute"], _ = rss_now()
        seen["peak_after_precompute"] = peak_rss()
        return cache

    editor.fast.precompute = capture
    import logging

    lines: list[str] = []  # the fit's own log (a line per prepared part and per epoch), e.g. of a --baseline's code

    class Keep(logging.Handler):  # each line with the RSS then and the peak so far: where the peak arose
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.getMessage()} [RSS {rss_now()[0] / MIB:.0f} MiB, peak so far {peak_rss() / MIB:.0f} MiB]")

    logging.getLogger("lks").addHandler(Keep())
    logging.getLogger("lks").setLevel(logging.INFO)
    out["log"] = lines
    t0 = time.perf_counter()
    # --keep DIR: the editor is checkpointed there every epoch (an interrupted run resumes) and kept
    editor.fit(edits, cfg, progress=False, checkpoint_dir=Path(args.keep) / f"cf-{n}" if args.keep else None)
    out["fit_s"] = time.perf_counter() - t0
    out["epoch_s"] = [round(h["seconds"], 1) for h in editor.history]
    out["phases"] = {k: round(v, 1) for k, v in getattr(editor, "fit_phases", {}).items()}  # seconds per part
    out["lks_file"] = lks.__file__
    out["precision_used"] = editor.precision_used
    out["precompute_s"] = getattr(editor, "precompute_seconds", float("nan"))
    out["peak_fit"] = peak_rss()
    out["rss_after_fit"], _ = rss_now()
    with tempfile.TemporaryDirectory() as tmp:
        path = editor.save(Path(tmp) / "editor")
        out["saved"] = dir_size(path)
        out["saved_files"] = {p.name: p.stat().st_size for p in sorted(path.iterdir())}
    out.update(seen)
    out["n_edits"] = len(edits)
    out["n_subjects"] = len(editor.subjects)
    return out


def main(argv: list[str] | None = None) -> None:
    default_dir = os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=default_dir)
    ap.add_argument("--data", choices=("counterfact", "zsre"), default="counterfact", help="edit set (its first N records)")
    ap.add_argument("--n", default="1000", help="numbers of edits, comma-separated (one subprocess each)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--keep", default=None, help="checkpoint and keep the editors under this directory")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--project", type=int, default=10_000, help="N to project to from bytes per edit")
    ap.add_argument("--quantize", choices=("on", "off", "both"), default="on",
                    help="pad the fast path's shapes (lks.training.precision.SHAPE_QUANTA), forced on or off; the library "
                         "pads by default only in bfloat16 on CPU, so 'on' is the recipe's behaviour here; "
                         "'both' fits each N twice, off then on, and prints the epoch-time ratio")
    ap.add_argument("--no-record", action="store_true", help="do not write a JSON record under benchmarks/results/")
    ap.add_argument("--baseline", default=None,
                    help="a checkout of the code to compare with (e.g. git worktree add /tmp/base REV): each N is fitted "
                         "by it first, then by this checkout, and the ratios are printed")
    ap.add_argument("--lks-root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        end_with_parent()
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return

    t_start = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)
    print(f"model {MODEL} (float32, CPU); {args.threads} torch thread(s) (--threads; default 1 because the machine "
          f"is shared); fit with the registered recipe, epochs={args.epochs}; edits: {args.data}; load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    code_state()  # the commit the children import now, named in the records written at the end
    results = []
    runs = [(int(x), q) for x in args.n.split(",") for q in (("off", "on") if args.quantize == "both" else (args.quantize,))]
    for n, q in runs:
        cmd = [sys.executable, __file__, "--child", str(n), "--data", args.data, "--data-dir", args.data_dir,
               "--epochs", str(args.epochs),
               "--threads", str(args.threads), "--quantize", q] + (["--keep", args.keep] if args.keep else [])
        if args.baseline:
            base = run_child(cmd + ["--lks-root", str(Path(args.baseline).resolve())], f"N={n} (baseline)")
            print(f"  N={n}, baseline {args.baseline} ({base['lks_file']}): fit {base['fit_s']:.0f} s, of which precompute "
                  f"{base['precompute_s']:.0f} s; epochs {base['epoch_s']} s; peak RSS {base['peak_fit'] / MIB:.0f} MiB")
            print("    its log: " + "; ".join(base["log"]))
        t0 = time.perf_counter()
        r = run_child(cmd, f"N={n}")
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        print(f"  N={n}: done in {r['wall_s']:.0f} s (fit {r['fit_s']:.0f} s, of which precompute "
              f"{r['precompute_s']:.0f} s; epochs {r['epoch_s']} s; precision {r['precision_used']}; shapes quantised: "
              f"{q}); "
              f"{r['dropped_conflicts']} conflicting {args.data} records skipped")
        print("    seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in r["phases"].items()))
        print("    its log: " + "; ".join(r["log"]))
        extra = {"phases": r["phases"], "epochs": r["epoch_s"], "rss_model_mib": round(r["rss_model"] / MIB, 1),
                 "peak_after_precompute_mib": round(r["peak_after_precompute"] / MIB, 1),
                 "precision": r["precision_used"], "epochs_requested": args.epochs, "load_average_at_start": load_start,
                 "log": r["log"]}
        if args.baseline:
            print(f"    against the baseline: fit {base['fit_s'] / r['fit_s']:.2f}x, precompute "
                  f"{base['precompute_s'] / r['precompute_s']:.2f}x, epochs {sum(base['epoch_s']) / sum(r['epoch_s']):.2f}x faster; "
                  f"peak RSS {base['peak_fit'] / MIB:.0f} -> {r['peak_fit'] / MIB:.0f} MiB")
            extra["baseline"] = {"checkout": args.baseline, "fit_s": round(base["fit_s"], 1), "precompute_s": round(base["precompute_s"], 1),
                                 "epochs": base["epoch_s"], "peak_rss_mib": round(base["peak_fit"] / MIB, 1)}
        if not args.no_record:
            path = write_record("bench_memory", data=args.data, edits=r["n_edits"], seconds=r["fit_s"],
                                peak_rss_mib=r["peak_fit"] / MIB, threads=args.threads, extra=extra)
            print(f"    record: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")

    if args.quantize == "both":
        print("\nshape quantisation (same N, same edits, one subprocess each; epoch 1 builds new oneDNN primitives):")
        for off, on in zip(results[::2], results[1::2]):
            e_off, e_on = sum(off["epoch_s"]), sum(on["epoch_s"])
            print(f"  N={on['n_edits']}: epochs off {off['epoch_s']} s, on {on['epoch_s']} s; total {e_off:.0f} s -> "
                  f"{e_on:.0f} s ({e_off / e_on:.2f}x); precompute {off['precompute_s']:.0f} s -> {on['precompute_s']:.0f} s")
    src = results[0]["rss_source"]
    print(f"\nmeasured (peak = ru_maxrss of the subprocess; current RSS via {src}):")
    print(f"  {'N':>6s} {'subjects':>8s} {'seqs':>6s} {'RSS model':>10s} {'peak precomp':>13s} {'peak fit':>10s} "
          f"{'peak-model':>11s} {'L-states':>10s} {'top-k refs':>11s} {'prefix K/V':>11s} {'saved':>9s} {'fit s':>7s}")
    for r in results:
        print(f"  {r['n_edits']:6d} {r['n_subjects']:8d} {r['sequences']:6d} {r['rss_model'] / MIB:8.0f} M "
              f"{r['peak_after_precompute'] / MIB:11.0f} M "
              f"{r['peak_fit'] / MIB:8.0f} M {(r['peak_fit'] - r['rss_model']) / MIB:9.0f} M "
              f"{r['states'] / MIB:8.1f} M {r['ref'] / MIB:9.1f} M {r['kv'] / MIB:9.1f} M {r['saved'] / MIB:7.2f} M "
              f"{r['fit_s']:7.0f}")
    print("\nper edit (measured at each N):")
    for r in results:
        n = r["n_edits"]
        fixed = sum(v for k, v in r["saved_files"].items() if k.startswith(("generator", "config")))
        print(f"  N={n:6d}: L-states {r['states'] / n / 1024:7.1f} KiB ({r['tokens'] / n:.1f} tokens/edit), top-k refs "
              f"{r['ref'] / n / 1024:6.1f} KiB ({r['ref_rows'] / n:.1f} positions/edit), prefix K/V "
              f"{r['kv'] / n / 1024:6.1f} KiB ({r['kv_rows']} rows for {r['prefix_tokens']} prefix tokens: "
              f"{r['prefix_tokens'] / max(r['kv_rows'], 1):.2f}x shared), saved editor beyond the "
              f"generator {(r['saved'] - fixed) / n / 1024:5.2f} KiB, peak above the model "
              f"{(r['peak_fit'] - r['rss_model']) / n / 1024:7.1f} KiB")
        print("           saved files: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in r["saved_files"].items()))

    # projections for a larger N. The peak is (model) + (caches, linear in N) + (one training step's
    # transient, set by the batch size, not by N), so a slope between two sizes only means something
    # when both are well above the batch size; the cache-based projection adds the per-edit caches
    # once (``FastPath.precompute`` fills one preallocated tensor). The prefix K/V holds one row per
    # distinct token prefix, and more edits share more prefixes, so its linear projection is high.
    big = [r for r in results if r["n_edits"] == max(x["n_edits"] for x in results)][-1]  # with "both": quantised
    P, n = args.project, big["n_edits"]
    if P > n:
        per_cache = (big["states"] + big["ref"] + big["kv"]) / n
        peak_c = big["peak_fit"] + per_cache * (P - n)
        print(f"\n[PROJECTED] N={P} (not measured), linear from the measured N={n}:")
        files = big["saved_files"]
        fixed = sum(v for k, v in files.items() if k.startswith(("generator", "config")))
        saved_p = fixed + (big["saved"] - fixed) / n * P  # features + subject texts grow with N
        print(f"  [PROJECTED] caches: L-states {big['states'] / n * P / GIB:.2f} GiB + top-k refs "
              f"{big['ref'] / n * P / GIB:.2f} GiB + prefix K/V {big['kv'] / n * P / GIB:.2f} GiB = {per_cache * P / GIB:.2f} GiB; saved editor "
              f"{saved_p / MIB:.1f} MiB ({fixed / MIB:.2f} MiB generator + config, the rest per subject)")
        print(f"  [PROJECTED] peak RSS, cache-based (peak at N={n} + (L-states + refs + prefix K/V) per extra edit): "
              f"{peak_c / GIB:.2f} GiB (target <= {TARGET_GIB} GiB: {'within' if peak_c <= TARGET_GIB * GIB else 'ABOVE'})")
        sizes = {r["n_edits"]: r for r in results}  # one result per size (the last: quantised, with "both")
        if len(sizes) >= 2:
            big = sizes[max(sizes)]
            small = sizes[sorted(sizes)[-2]]
            slope = (big["peak_fit"] - small["peak_fit"]) / (big["n_edits"] - small["n_edits"])
            peak_s = big["peak_fit"] + slope * (P - n)
            print(f"  [PROJECTED] peak RSS, slope between N={small['n_edits']} and N={n} ({slope / 1024:.1f} KiB/edit): "
                  f"{peak_s / GIB:.2f} GiB (target <= {TARGET_GIB} GiB: {'within' if peak_s <= TARGET_GIB * GIB else 'ABOVE'}; "
                  f"meaningful only when both N are well above the batch size)")
    else:
        print(f"\nN={n} measured directly: peak {big['peak_fit'] / GIB:.2f} GiB (target <= {TARGET_GIB} GiB: "
              f"{'met' if big['peak_fit'] <= TARGET_GIB * GIB else 'NOT met'})")
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
