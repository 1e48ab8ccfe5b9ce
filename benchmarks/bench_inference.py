"""Benchmark of inference with edits applied: added latency of ``LKSEditor.applied`` per prompt.

Usage::

    python benchmarks/bench_inference.py [--data-dir DIR] [--sizes 10,1000,10000] [--batch-sizes 1,32]
                                         [--new-tokens 20] [--reps 7] [--threads 1]

For each number of loaded edits (``--sizes``; subjects = the first distinct subjects of the LKS
CounterFact file, then zsRE, as in ``bench_scope.py``), each batch size, each workload and each
mode, the same batch of prompts runs through the unedited model and through the model inside
``editor.applied(model)`` (the context is entered per call, as a caller would). Runs are
interleaved - unedited, then every editor size, then the same in reverse order - so drift hits
all alike; per-prompt latency is the median over ``--reps`` rounds divided by the batch size.

* modes: **prefill** (one forward pass over the prompt) and **generate** (greedy
  ``model.generate``, exactly ``--new-tokens`` new tokens via ``min_new_tokens``).
* workloads: **mixed** (``1 - --edited-share`` unrelated prompts - WikiText-2 sentences, GSM8K and
  MMLU questions in equal shares - and ``--edited-share`` CounterFact prompts that mention one of
  the loaded subjects) and **all-edited** (every prompt mentions a loaded subject).

Editors are built WITHOUT training: the latency of ``applied`` does not depend on the generator's
weights, so each editor gets ``subjects``, ``scope = ScopeIndicator(subjects)`` and
``features = torch.zeros(n, d)`` directly; the recipe's gated generator starts with a zero change,
so its knowledge blocks equal the original ones, every replacement is still written (an
``index_put`` per routed row), and edited and unedited outputs are identical (checked).

Because the added latency is small next to a forward pass and this machine is shared, the
overhead is also measured directly, component by component (noise-free next to the end-to-end
difference): ``LKSEditor.route`` per prompt (token-piece decoding ``TokenRouter.piece`` + joining, and
``ScopeIndicator.find`` on the decoded text), the cold cost of ``TokenRouter.piece`` for a token id seen for
the first time, and the hook's ``apply_replacement``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_scope import load_records, load_unrelated  # noqa: E402

import lks  # noqa: E402
from lks.config import model_spec  # noqa: E402
from lks.editor import LKSEditor  # noqa: E402
from lks.hooks import Replacement, apply_replacement  # noqa: E402
from lks.scope import ScopeIndicator  # noqa: E402

MODEL = "smollm2-135m"


def make_editor(model, tok, subjects: list[str]) -> LKSEditor:
    """An untrained editor with ``subjects`` loaded (zero features; see the module docstring)."""
    spec = model_spec(MODEL)
    ed = LKSEditor(model, tok, spec.editor)
    ed.subjects = list(subjects)
    ed.feature_texts = list(subjects)
    ed.scope = ScopeIndicator(ed.subjects, fuzzy_threshold=spec.editor.fuzzy_threshold)
    ed.features = torch.zeros(len(ed.subjects), ed.d)
    ed.kb_table()  # computed once, cached (as after fit / load)
    return ed


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def per_call(fn: Callable[[], object], min_s: float = 0.2, reps: int = 5) -> float:
    """Seconds per call of a cheap ``fn``: median of ``reps`` timings of a loop of >= ``min_s``."""
    n, t = 1, timed(fn)
    while t * n < min_s and n < 1_000_000:
        n *= 4
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> None:
    default_dir = os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=default_dir)
    ap.add_argument("--sizes", default="10,1000,10000", help="numbers of loaded edits (comma-separated)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7, help="rounds per (batch size, workload, mode)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--edited-share", type=float, default=0.2, help="share of edit prompts in the mixed workload")
    ap.add_argument("--max-chars", type=int, default=200, help="longest unrelated prompt kept")
    ap.add_argument("--modes", default="prefill,generate")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    sizes = [int(x) for x in args.sizes.split(",")]
    bss = [int(x) for x in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    t_start = time.perf_counter()

    model, tok = lks.load_model(MODEL, device="cpu")
    recs = load_records(Path(args.data_dir), max(sizes))
    if len(recs) < max(sizes):
        raise SystemExit(f"only {len(recs)} distinct subjects available, need {max(sizes)}")
    subjects = [r["subject"] for r in recs]
    t0 = time.perf_counter()
    editors = {n: make_editor(model, tok, subjects[:n]) for n in sizes}
    print(f"model {MODEL} (float32, CPU, attention {model.config._attn_implementation}); torch {torch.__version__}; "
          f"{torch.get_num_threads()} thread(s) (--threads; default 1 because the machine is shared); "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at start")
    print(f"editors for {sizes} edits built in {time.perf_counter() - t0:.1f} s WITHOUT training: subjects from "
          f"CounterFact(+zsRE), ScopeIndicator(subjects), features = zeros(n, {editors[sizes[0]].d}), {editors[sizes[0]].config.generator} "
          f"generator at its zero init (latency does not depend on the weights)")

    unrelated = [p for p in load_unrelated(Path(args.data_dir), 4000, rng) if len(p) <= args.max_chars]
    max_bs = max(bss)
    n_pool = max_bs * (args.reps + args.warmup)

    def workload(kind: str, n_sub: int) -> list[str]:
        """Prompts for one round after another; edit prompts mention one of the first ``n_sub`` subjects."""
        edit_prompts = [r["prompt"] for r in recs[:min(sizes)]]  # mention a subject loaded in EVERY editor
        if kind == "all-edited":
            return [rng.choice(edit_prompts) for _ in range(n_pool)]
        k = round(args.edited_share * max_bs)
        out = []
        for _ in range(args.reps + args.warmup):
            batch = [rng.choice(edit_prompts) for _ in range(k)] + rng.sample(unrelated, max_bs - k)
            rng.shuffle(batch)
            out += batch
        return out

    workloads = {w: workload(w, min(sizes)) for w in ("mixed", "all-edited")}
    for w, ps in workloads.items():
        lens = [len(tok(p)["input_ids"]) for p in ps]
        print(f"workload {w}: {len(ps)} prompts, {statistics.mean(lens):.1f} tokens on average "
              f"(edit prompts mention one of the first {min(sizes)} subjects, loaded in every editor)")

    # ---------------------------------------------------------------- end-to-end latency
    results: dict[tuple, dict] = {}
    check = {}
    for bs in bss:
        for w, prompts in workloads.items():
            for mode in modes:
                times: dict[str, list[float]] = {"unedited": [], **{f"{n}": [] for n in sizes}}
                routed: dict[str, list[int]] = {f"{n}": [0, 0] for n in sizes}
                order = ["unedited"] + [f"{n}" for n in sizes]
                for rnd in range(args.warmup + args.reps):
                    if bs == 1:  # one prompt per round, taken from the round's slice
                        batch = [prompts[rnd * max_bs + (rnd % max_bs)]]
                    else:
                        batch = prompts[rnd * max_bs: rnd * max_bs + bs]
                    side = "left" if mode == "generate" else "right"
                    enc = tok(batch, return_tensors="pt", padding=True, padding_side=side)
                    enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
                    outs = {}
                    for name in (order if rnd % 2 == 0 else order[::-1]):
                        ed = None if name == "unedited" else editors[int(name)]

                        def run(ed=ed, enc=enc, mode=mode):
                            with torch.inference_mode():
                                if mode == "prefill":
                                    return model(**enc, use_cache=False).logits[:, -1]
                                return model.generate(**enc, max_new_tokens=args.new_tokens,
                                                      min_new_tokens=args.new_tokens, do_sample=False,
                                                      pad_token_id=tok.pad_token_id)

                        t0 = time.perf_counter()
                        if ed is None:
                            out = run()
                        else:
                            with ed.applied(model) as stats:
                                out = run()
                        dt = time.perf_counter() - t0
                        outs[name] = out
                        if rnd >= args.warmup:
                            times[name].append(dt / len(batch))
                            if ed is not None:
                                routed[name][0] += stats.rows_routed
                                routed[name][1] += stats.rows_seen
                    same = all(torch.equal(outs[n], outs["unedited"]) if mode == "generate"
                               else torch.allclose(outs[n], outs["unedited"], atol=1e-4) for n in outs)
                    check[(bs, w, mode)] = check.get((bs, w, mode), True) and same
                results[(bs, w, mode)] = {"times": times, "routed": routed}
                base = statistics.median(times["unedited"])
                print(f"  done: batch {bs:2d}, {w:10s}, {mode:8s}: unedited {base * 1e3:8.2f} ms/prompt "
                      f"({time.perf_counter() - t_start:.0f} s elapsed)")

    print(f"\nlatency per prompt (median of {args.reps} interleaved rounds; ms per prompt = batch time / batch size); "
          f"overhead = edited / unedited - 1 (target <= 5% with 10,000 edits):")
    hdr = f"  {'batch':>5s} {'workload':10s} {'mode':9s} {'unedited ms':>12s}"
    for n in sizes:
        hdr += f" | {f'{n} edits: ms':>15s} {'overhead':>9s} {'routed':>7s}"
    print(hdr)
    for (bs, w, mode), r in results.items():
        base = statistics.median(r["times"]["unedited"])
        line = f"  {bs:5d} {w:10s} {mode:9s} {base * 1e3:12.2f}"
        for n in sizes:
            med = statistics.median(r["times"][f"{n}"])
            rt, seen = r["routed"][f"{n}"]
            line += f" | {med * 1e3:15.2f} {med / base - 1:+9.1%} {rt / max(seen, 1):7.0%}"
        print(line)
    print(f"  edited outputs identical to unedited (zero-delta generator): "
          f"{'yes' if all(check.values()) else 'NO: ' + str([k for k, v in check.items() if not v])}")
    print("  'routed' = share of prompts (rows of prefill calls) in which the scope indicator found a subject")

    # ---------------------------------------------------------------- where the time goes
    print("\nwhere the added time goes (direct timings, single thread, per prompt; CPU-bound Python):")
    for w, prompts in workloads.items():
        sample = prompts[: max_bs * 4]
        enc1 = [tok([p], return_tensors="pt") for p in sample]
        ntok = statistics.mean(e["input_ids"].shape[1] for e in enc1)
        for n in sizes:
            ed = editors[n]
            for e in enc1:  # warm the piece cache
                ed.route(e["input_ids"], e["attention_mask"])
            ids = [e["input_ids"][0].tolist() for e in enc1]
            texts = ["".join(ed.router.piece(t) for t in row) for row in ids]
            t_route = per_call(lambda ed=ed, enc1=enc1: [ed.route(e["input_ids"], e["attention_mask"]) for e in enc1]) / len(enc1)
            t_piece = per_call(lambda ed=ed, ids=ids: ["".join(ed.router.piece(t) for t in row) for row in ids]) / len(ids)
            t_find = per_call(lambda ed=ed, texts=texts: [ed.scope.find(t) for t in texts]) / len(texts)
            print(f"  {w:10s} {n:6d} edits: route {t_route * 1e6:7.1f} us/prompt = piece decoding+join "
                  f"{t_piece * 1e6:6.1f} us + scope.find {t_find * 1e6:6.1f} us + rest "
                  f"{(t_route - t_piece - t_find) * 1e6:6.1f} us  ({ntok:.1f} tokens/prompt)")
    print("  estimated overhead from these components (route + apply_replacement per prompt, all-edited, "
          "largest editor) relative to the measured unedited latency:")
    ed = editors[max(sizes)]
    enc_all = [tok([p], return_tensors="pt") for p in workloads["all-edited"][: max_bs * 4]]
    t_r = per_call(lambda: [ed.route(e["input_ids"], e["attention_mask"]) for e in enc_all]) / len(enc_all)
    for (bs, w, mode), r in results.items():
        if w == "all-edited":
            h = torch.randn(bs, 24, ed.d)
            rep = Replacement(torch.arange(bs), torch.full((bs,), 12), torch.zeros(bs, ed.d), True)
            t_a = per_call(lambda h=h, rep=rep: apply_replacement(h, rep)) / bs
            base = statistics.median(r["times"]["unedited"])
            print(f"    batch {bs:2d} {mode:8s}: {(t_r + t_a) * 1e6:6.1f} us per prompt / {base * 1e3:8.2f} ms "
                  f"= {(t_r + t_a) / base:.3%}")
    vocab_ids = list(range(200, 2200))
    ed.router.pieces = {}
    t0 = time.perf_counter()
    for i in vocab_ids:
        ed.router.piece(i)
    t_cold = (time.perf_counter() - t0) / len(vocab_ids)
    print(f"  TokenRouter.piece, cold (first time a token id is seen; tokenizer decode): {t_cold * 1e6:.1f} us per token id "
          f"(warm: a dict look-up); its cache grows up to the vocabulary ({len(tok)} ids)")
    for bs in bss:
        T = 24
        h = torch.randn(bs, T, ed.d)
        rows = torch.arange(bs)
        rep = Replacement(rows, torch.full((bs,), T // 2), torch.zeros(bs, ed.d), True)
        t_apply = per_call(lambda h=h, rep=rep: apply_replacement(h, rep))
        print(f"  hook apply_replacement, batch {bs:2d} x {T} tokens, all rows routed: {t_apply * 1e6:.1f} us per call "
              f"= {t_apply / bs * 1e6:.1f} us per prompt")
    with torch.inference_mode():
        e = tok([workloads["mixed"][0]], return_tensors="pt")
        t_plain = per_call(lambda: model(**e, use_cache=False), min_s=0.5, reps=3)
        with ed.applied(model):
            t_edit = per_call(lambda: model(**e, use_cache=False), min_s=0.5, reps=3)
    print(f"  one prefill of a {e['input_ids'].shape[1]}-token prompt, batch 1: {t_plain * 1e3:.2f} ms unedited, "
          f"{t_edit * 1e3:.2f} ms inside applied ({max(sizes)} edits), difference {(t_edit - t_plain) * 1e6:+.0f} us")
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.1f} s (load average {os.getloadavg()[0]:.2f} at end)")


if __name__ == "__main__":
    main()
