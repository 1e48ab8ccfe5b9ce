"""Benchmark of the edit scope indicator (``lks.scope``) on real edit subjects.

Usage::

    python benchmarks/bench_scope.py [--data-dir DIR] [--n-subjects 10000] [--n-prompts 20000]

Subjects are the first ``--n-subjects`` distinct subjects of the LKS CounterFact file, then zsRE.
The mixed workload is 80% unrelated prompts (WikiText-2 sentences, GSM8K and MMLU questions in
equal shares), 15% edit prompts that mention their subject exactly and 5% of the same with one
random typo in the subject's longest word. Prints throughput (exact-only, the full indicator,
naive fuzzy scans on a small sample, extrapolated), hit rates per prompt class, and the
false-positive rate on unrelated prompts. Runs in about half a minute on one core.

Throughput is single-threaded and given twice: wall clock (``time.perf_counter``, what a caller
sees, inflated when other processes compete for the CPU) and this process's CPU time
(``time.process_time``, close to what an idle machine would show).
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import json
import os
import random
import re
import string
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rapidfuzz import fuzz, process

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from lks.scope import _WORD_RE, ScopeIndicator, _lower  # noqa: E402


def find_all(si):
    """Scope detection on each text of a list (what the timings call)."""
    return lambda texts: [si.find(t) for t in texts]


def load_records(data_dir: Path, n_subjects: int) -> list[dict]:
    """One record (the first) per distinct subject, CounterFact first, then zsRE."""
    seen: dict[str, dict] = {}
    for name in ("cf_eval_data.json", "zsre_eval_data.json"):
        for rec in json.loads((data_dir / "lks" / name).read_text(encoding="utf-8")):
            seen.setdefault(rec["subject"], rec)
            if len(seen) == n_subjects:
                return list(seen.values())
    return list(seen.values())


def load_unrelated(data_dir: Path, n: int, rng: random.Random) -> list[str]:
    """``n`` prompts drawn in equal shares from WikiText-2 sentences, GSM8K and MMLU questions."""
    wiki = []
    for line in (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("="):
            wiki += [s for s in re.split(r"(?<=[.!?])\s+", line) if 20 <= len(s) <= 300]
    gsm = [json.loads(x)["question"] for x in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines() if x]
    mmlu = []
    for path in sorted(glob.glob(str(data_dir / "mmlu" / "test" / "*.csv"))):
        with open(path, newline="", encoding="utf-8") as f:
            mmlu += [row["question"] for row in csv.DictReader(f)]
    pools = [wiki, gsm, mmlu]
    return [rng.choice(pools[i % 3]) for i in range(n)]


def misspell(word: str, rng: random.Random) -> str:
    """One random edit (delete / insert / substitute / swap) that keeps the first letter."""
    i = rng.randrange(1, len(word))
    op = rng.choice(("delete", "insert", "substitute", "swap"))
    if op == "swap" and i < len(word) - 1 and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "delete":
        return word[:i] + word[i + 1:]
    c = rng.choice([ch for ch in string.ascii_lowercase if ch != word[i].lower()])
    return word[:i] + c + word[i + (op != "insert"):]


def make_misspelled(rec: dict, rng: random.Random) -> tuple[str, str] | None:
    """(prompt, misspelled subject): one typo in the longest word (>= 4 chars) of the subject."""
    subj, prompt = rec["subject"], rec["prompt"]
    words = [m for m in _WORD_RE.finditer(subj) if len(m.group()) >= 4]
    if not words:
        return None
    m = max(words, key=lambda m: len(m.group()))
    bad = subj[:m.start()] + misspell(m.group(), rng) + subj[m.end():]
    out = prompt.replace(subj, bad, 1)
    return (out, bad) if subj not in out and bad != subj else None


def rate(fn: Callable[[Sequence[str]], object], items: Sequence[str], reps: int = 3) -> tuple[float, float]:
    """(prompts/s by wall clock, prompts/s by CPU time), best of ``reps`` runs."""
    wall = cpu = float("inf")
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(items)
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return len(items) / wall, len(items) / max(cpu, 1e-9)


def norm(s: str) -> str:
    return " ".join(_WORD_RE.findall(_lower(s)))


def exhaustive_fuzzy(si: ScopeIndicator, text: str) -> int | None:
    """The indicator's fuzzy stage WITHOUT its index: every subject against every word run.

    Same eligible subjects, scorer, threshold and spans, so its recall is the ceiling of the
    gated stage.
    """
    words = _WORD_RE.findall(_lower(text))
    best, best_i = -1.0, None
    fz = si.fuzzy_index
    for i, sub in enumerate(fz.sub_norm):
        if not fz.budget[i]:  # too short for fuzzy matching (fuzzy_min_length)
            continue
        k = fz.sub_nwords[i]
        spans = [" ".join(words[j:j + m]) for m in (k - 1, k, k + 1) if m >= 1 for j in range(len(words) - m + 1)]
        r = process.extractOne(sub, spans, scorer=fuzz.ratio, score_cutoff=si.fuzzy_threshold) if spans else None
        if r is not None and r[1] > best:
            best, best_i = r[1], i
    return best_i


def main(argv: list[str] | None = None) -> None:
    default_dir = os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=default_dir)
    ap.add_argument("--n-subjects", type=int, default=10_000)
    ap.add_argument("--n-prompts", type=int, default=20_000)
    ap.add_argument("--threshold", type=float, default=90.0)
    ap.add_argument("--naive-sample", type=int, default=100, help="prompts for the naive scans")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    data_dir = Path(args.data_dir)
    t_start = time.perf_counter()

    recs = load_records(data_dir, args.n_subjects)
    subjects = [r["subject"] for r in recs]
    n_unrel = int(0.80 * args.n_prompts)
    n_exact = int(0.15 * args.n_prompts)
    n_miss = args.n_prompts - n_unrel - n_exact
    unrelated = load_unrelated(data_dir, n_unrel, rng)
    exact = [(r["prompt"], r["subject"]) for r in rng.choices(recs, k=n_exact)]
    missp: list[tuple[str, str]] = []
    typos: list[tuple[str, str]] = []  # (true subject, misspelled subject)
    while len(missp) < n_miss:
        r = rng.choice(recs)
        made = make_misspelled(r, rng)
        if made is not None:
            missp.append((made[0], r["subject"]))
            typos.append((r["subject"], made[1]))
    general = [(r["generality"], r["subject"]) for r in rng.sample(recs, min(len(recs), 3000))]
    workload = unrelated + [p for p, _ in exact] + [p for p, _ in missp]
    rng.shuffle(workload)

    t0 = time.perf_counter()
    full = ScopeIndicator(subjects, fuzzy_threshold=args.threshold)
    t_build = time.perf_counter() - t0
    exact_only = ScopeIndicator(subjects, fuzzy=False)
    st = full.stats()
    wiki_words = collections.Counter(_WORD_RE.findall(_lower(" ".join(unrelated))))
    single = [s for s in subjects if len(_WORD_RE.findall(s)) == 1]
    common = sorted((s for s in single if wiki_words[_lower(s)] >= 5), key=lambda s: -wiki_words[_lower(s)])
    print(f"subjects: {st['n_subjects']} (index built in {t_build:.2f} s)")
    print(f"  short (<= 4 chars): {st['n_short']}; single-word: {st['n_single_word']}; single-word subjects "
          f"occurring >= 5 times as a word in the unrelated prompts: {len(common)}, e.g. {common[:12]}")
    print(f"  fuzzy index: {st['n_hot_keys']} hot keys (cap {st['key_cap']} subjects); {st['n_fuzzy_indexed']} subjects "
          f"long enough for fuzzy, {st['n_fuzzy_unreachable']} of them unreachable (no hot key)")
    lens = sorted(map(len, workload))
    print(f"workload: {len(workload)} prompts = {n_unrel} unrelated + {n_exact} exact + {n_miss} misspelled; "
          f"length mean {sum(lens) / len(lens):.0f}, median {lens[len(lens) // 2]} chars")

    # --- throughput ---------------------------------------------------------------------------
    cold = ScopeIndicator(subjects, fuzzy_threshold=args.threshold)  # empty per-token memo
    r_cold = rate(find_all(cold), workload, reps=1)
    r_exact = rate(find_all(exact_only), workload)
    r_full = rate(find_all(full), workload)
    r_unrel = rate(find_all(full), unrelated)
    short = [p for p in workload if len(p) <= 80]
    r_short = rate(find_all(full), short)
    r_exact_short = rate(find_all(exact_only), short)
    sample = rng.sample(workload, min(args.naive_sample, len(workload)))
    lows = [_lower(s) for s in subjects]
    r_naive = rate(lambda ts: [process.extractOne(_lower(t), lows, scorer=fuzz.partial_ratio,
                                                  score_cutoff=args.threshold) for t in ts], sample, reps=1)
    print("\nthroughput, prompts/s (single thread; wall clock | CPU time):")
    rows = [("exact-only (exact + casefold, one automaton pass)", r_exact),
            ("full indicator (exact-first + gated fuzzy), first pass, empty memo", r_cold),
            ("full indicator, warm per-token memo", r_full),
            ("full indicator, unrelated prompts only", r_unrel),
            (f"exact-only, prompts <= 80 chars only ({len(short)})", r_exact_short),
            (f"full indicator, prompts <= 80 chars only ({len(short)})", r_short),
            (f"naive fuzzy-only scan: partial_ratio vs all subjects [EXTRAPOLATED from {len(sample)}]", r_naive)]
    for name, (w, c) in rows:
        print(f"  {name:88s} {w:10,.0f} | {c:10,.0f}")
    print(f"  full (warm) / naive: {r_full[0] / r_naive[0]:,.0f}x wall, {r_full[1] / r_naive[1]:,.0f}x CPU;"
          f"  exact-only / full: {r_exact[1] / r_full[1]:.1f}x CPU")

    # --- hit rates per class --------------------------------------------------------------------
    print("\nhit rates: correct subject / any subject found  (kinds of the correct hits)")
    lenient = ScopeIndicator(subjects, fuzzy_threshold=args.threshold, fuzzy_min_length=0)
    for name, si, items in (("exact mention (edit prompt)", full, exact), ("misspelled mention", full, missp),
                            ("misspelled, fuzzy_min_length=0", lenient, missp),
                            ("paraphrase (generality prompt)", full, general)):
        res = [si.find(p) for p, _ in items]
        ok = [m for m, (_, s) in zip(res, items, strict=True) if m is not None and m.subject == s]
        anyhit = sum(m is not None for m in res)
        kinds = dict(collections.Counter(m.kind for m in ok))
        print(f"  {name:32s} {len(ok) / len(items):7.2%} / {anyhit / len(items):7.2%}   {kinds}")
    within = sum(fuzz.ratio(norm(s), norm(bad)) >= args.threshold for s, bad in typos) / len(typos)
    print(f"  typo'd subjects still within ratio {args.threshold:g} of the true one: {within:.2%} (the recall ceiling)")
    ms = missp[:60]
    t0 = time.perf_counter()
    ex = [exhaustive_fuzzy(full, p) for p, _ in ms]
    t_ex = time.perf_counter() - t0
    ex_ok = sum(i is not None and subjects[i] == s for i, (_, s) in zip(ex, ms, strict=True))
    fz = [full.fuzzy_index.find(_lower(p)) for p, _ in ms]
    fz_ok = sum(m is not None and subjects[m[0]] == s for m, (_, s) in zip(fz, ms, strict=True))
    print(f"  fuzzy stage alone on {len(ms)} misspelled prompts: gated {fz_ok}, ungated exhaustive scan {ex_ok} "
          f"(ungated speed [EXTRAPOLATED]: {len(ms) / t_ex:,.1f} prompts/s)")

    # --- false positives on unrelated text -----------------------------------------------------
    print(f"\nunrelated prompts ({len(unrelated)}) with a match (false-positive rate):")
    variants = (("full indicator (default fuzzy_min_length=10)", full),
                ("full indicator, fuzzy_min_length=0", lenient),
                ("exact + casefold (fuzzy=False)", exact_only),
                ("exact only (casefold=False, fuzzy=False)", ScopeIndicator(subjects, fuzzy=False, casefold=False)))
    for name, si in variants:
        res = [si.find(t) for t in unrelated]
        fp = [m for m in res if m is not None]
        print(f"  {name:48s} {len(fp) / len(unrelated):6.2%}  by kind {dict(collections.Counter(m.kind for m in fp))}")
    res = [full.find(t) for t in unrelated]
    for kind in ("exact", "casefold", "fuzzy"):
        top = collections.Counter(m.subject for m in res if m is not None and m.kind == kind).most_common(10)
        print(f"  top {kind:8s}: " + ", ".join(f"{s!r} x{c}" for s, c in top))
    ex_fz = [(m.subject, t[m.start:m.end], round(m.score, 1))
             for t, m in zip(unrelated, res, strict=True) if m is not None and m.kind == "fuzzy"]
    print(f"  fuzzy examples: {ex_fz[:8]}")
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
