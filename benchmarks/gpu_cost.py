"""What a grid costs on a GPU, measured on random weights in a registered model's shape.

    python benchmarks/gpu_cost.py --shape llama2-7b-chat --device cuda          # on a GPU: under 10 minutes
    python benchmarks/gpu_cost.py --shape smollm2-135m --device cuda --edits 100 # the embedded model's shape
    python benchmarks/gpu_cost.py --shape tiny --device cpu --edits 8 16         # the CPU variant (tests/test_benchmarks.py)

Runs from this checkout on a machine with no network and no data: torch and transformers, plus
the lks dependencies its import chain reaches (pandas with python-dateutil, pytz, tzdata and six;
pyahocorasick, rapidfuzz; 16 MB of wheels to carry: ``pip download pandas pyahocorasick
rapidfuzz -d wheels`` here, ``pip install --no-index --find-links wheels pandas pyahocorasick
rapidfuzz`` there). The model is
random weights in the shape of a registered model (``SHAPES``; bfloat16 on CUDA, float32 on CPU,
its vocabulary widened to the tokenizer's where that is larger), fitted with that model's
registered settings (``lks/configs/<shape>.json``); the tokenizer is the embedded SmolLM2's
(``benchmarks/assets/smollm2-tokenizer.json.gz``, Apache-2.0, written by ``--write-tokenizer``
from the embedded model); the edits are the shipped set (``lks.builtin_edits()``, 96 records)
repeated with numbered subjects up to the largest N; the key statistics read a text made of the
shipped paraphrase templates.

Per method it measures: LKS's preparation and seconds per epoch with its peak GPU memory at each
N; MEMIT's key statistics (tokens per second), target optimisation (seconds per edit) and solve;
AlphaEdit's solve (it reuses MEMIT's targets); an FT-L step; the evaluation (seconds per edit);
the forward throughput (tokens per second, batch 8 x 512) that the capability tasks run at. From
them it projects the grid of ``--profile`` (default: the shape's paper profile) in GPU-hours,
cell by cell, assuming what random weights cannot show: every fit runs its registered maximum
(LKS's epochs, MEMIT's target steps), and the time per unit grows linearly with N from the
largest N measured. Capability runs are not projected (their token count is not yet counted);
their rate is printed. Writes one JSON record (``benchmarks/records.py``) and prints the tables.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # lks from this checkout, installed or not
sys.path.insert(0, str(REPO / "benchmarks"))

TOKENIZER = REPO / "benchmarks" / "assets" / "smollm2-tokenizer.json.gz"
# the architectures of the registered models (their config.json values that set the cost)
SHAPES = {
    "llama2-7b-chat": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=32, vocab_size=32000)),
    "mistral-7b-instruct": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=49152)),
}
PAPER_PROFILE = {"llama2-7b-chat": "paper-llama2", "mistral-7b-instruct": "paper-mistral", "smollm2-135m": "cpu-full-smollm2"}
# the tiny shape has no registered settings: its layers, and fits short enough for a test
TINY = {"lks": {"layer": 2, "generator": "linear"}, "memit": {"layers": [0, 1], "z_steps": 3, "cov_tokens": 2000},
        "alphaedit": {"layers": [0, 1], "z_steps": 3, "cov_tokens": 2000}, "ft": {"layer": 1}}


def tokenizer():
    from transformers import PreTrainedTokenizerFast

    folder = Path(tempfile.mkdtemp(prefix="lks-tok-"))
    (folder / "tokenizer.json").write_bytes(gzip.decompress(TOKENIZER.read_bytes()))
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>", model_input_names=["input_ids", "attention_mask"])


def write_tokenizer() -> None:
    """The embedded model's tokenizer.json, gzipped, into benchmarks/assets/ (run where lks loads it)."""
    import lks

    _, tok = lks.load_model("smollm2-135m", device="cpu")
    folder = Path(tempfile.mkdtemp())
    tok.save_pretrained(folder)
    TOKENIZER.parent.mkdir(exist_ok=True)
    TOKENIZER.write_bytes(gzip.compress((folder / "tokenizer.json").read_bytes(), compresslevel=9, mtime=0))
    print(f"wrote {TOKENIZER} ({TOKENIZER.stat().st_size:,} bytes)")


def random_model(shape: str, vocab: int, device: str, dtype: torch.dtype):
    """Random weights in ``shape``, frozen, named so that lks picks the registered settings."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    kind, dims = SHAPES[shape]
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (MistralConfig, MistralForCausalLM)
    cfg = cfg_cls(**{**dims, "vocab_size": max(vocab, dims["vocab_size"])}, max_position_embeddings=4096,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(cfg).to(dtype)
    model.eval().requires_grad_(False)
    model.lks_name = shape
    return model


def edits_of(n: int):
    """``n`` edits: the shipped ones, then again with numbered subjects (distinct subjects, like lengths)."""
    import dataclasses

    import lks
    from lks.data import EditSet

    base, out = list(lks.builtin_edits()), []
    for i in range(n):
        r, k = base[i % len(base)], i // len(base)
        if k:
            new = f"{r.subject} {k + 1}"
            r = dataclasses.replace(r, subject=new, prompt=r.prompt.replace(r.subject, new),
                                    rephrases=[p.replace(r.subject, new) for p in r.rephrases],
                                    locality=[(p.replace(r.subject, new), a) for p, a in r.locality])
        out.append(r)
    return EditSet(out, name=f"builtin-x{n}")


def corpus_file() -> Path:
    """A text for the key statistics: the shipped paraphrase templates (no data directory needed)."""
    text = json.loads((REPO / "lks" / "assets" / "paraphrase_templates.json").read_text())
    lines = [s for v in (text.values() if isinstance(text, dict) else [text]) for s in json.dumps(v).split('", "')]
    path = Path(tempfile.mkdtemp(prefix="lks-corpus-")) / "corpus.txt"
    path.write_text("\n".join(lines * 20))
    return path


class Clock:
    """Wall seconds of a block, synchronised with the device, and the block's peak device memory."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> Clock:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def measure(model, tok, sizes: list[int], device: str, over: dict) -> dict:
    """Every cost the projection needs: LKS at each N of ``sizes``; the rest, whose cost per edit
    does not depend on N (targets, evaluation) or is a solve, at the smallest N."""
    from lks.baselines.stats import key_second_moment
    from lks.methods import editor_class
    from lks.metrics import evaluate_edits

    corpus, small = str(corpus_file()), min(sizes)
    out: dict = {"lks": {}}
    cfg, _ = editor_class("memit").configs(model, {**over.get("memit", {}), "corpus": corpus})
    with Clock(device) as c:  # into the run's cache: the fits below find the statistics there
        key_second_moment(model, tok, list(cfg.layers), cfg.cov_tokens, corpus=corpus, progress=False)
    out["stats"] = {"tokens": cfg.cov_tokens, "layers": len(cfg.layers), "seconds": c.seconds}
    for n in sizes:
        cls = editor_class("lks")
        cfg, tcfg = cls.configs(model, {**over.get("lks", {}), "epochs": 1}, seed=0)
        ed = cls(model, tok, cfg)
        with Clock(device) as c:
            hist = ed.fit(edits_of(n), tcfg, progress=False)
        out["lks"][n] = {"prepare_s": ed.precompute_seconds, "epoch_s": hist[-1]["seconds"], "peak_gib": c.peak_gib}
    edits = edits_of(small)
    k = min(small, 32)
    with Clock(device) as tf:
        evaluate_edits(ed, edits.head(k), fluency_edits=[])
    with Clock(device) as gen:
        evaluate_edits(ed, edits.head(k), fluency_edits=list(range(k)), fluency_tokens=30)
    out["eval"] = {"edits": k, "teacher_forced_s": tf.seconds / k, "generation_s": max(0.0, gen.seconds - tf.seconds) / k}
    for method in ("memit", "alphaedit"):
        cls = editor_class(method)
        cfg, _ = cls.configs(model, {**over.get(method, {}), "corpus": corpus})
        first, again = cls(model, tok, cfg), cls(model, tok, cfg)
        with Clock(device) as c1:
            first.fit(edits, progress=False)        # targets and solve (the statistics are cached)
        with Clock(device) as c2:
            again.fit(edits, progress=False)        # the targets from the cache too: the solve
        out[method] = {"n": small, "targets_s": c1.seconds - c2.seconds, "solve_s": c2.seconds, "peak_gib": c1.peak_gib}
    cls = editor_class("ft")
    cfg, _ = cls.configs(model, {**over.get("ft", {}), "steps": 2, "batch_edits": 0})
    with Clock(device) as c:
        cls(model, tok, cfg).fit(edits.head(min(small, 64)), progress=False)
    out["ft"] = {"rows": min(small, 64), "step_s": c.seconds / 2, "peak_gib": c.peak_gib}
    batch = torch.randint(0, len(tok), (8, 512), device=device)
    with torch.inference_mode():
        model(input_ids=batch[:1, :16])
        with Clock(device) as c:
            model(input_ids=batch)
    out["forward_tokens_per_s"] = batch.numel() / c.seconds
    return out


@contextmanager
def env(**kw: str) -> Iterator[None]:
    """Environment variables set for the block, restored after."""
    old = {k: os.environ.get(k) for k in kw}
    os.environ.update(kw)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def project(m: dict, profile, model) -> list[dict]:
    """Seconds of each cell of ``profile`` (per data set) from the measurements ``m``: linear in N
    from the largest N measured (LKS) or the one N measured (the rest); the registered maximum of
    epochs and steps (see the module docstring)."""
    from lks.methods import editor_class

    big, rows = max(m["lks"]), []
    _, tcfg = editor_class("lks").configs(model, seed=0)
    ft, _ = editor_class("ft").configs(model)
    for n in sorted(profile.sizes):
        for method in profile.methods:
            if method == "lks":
                fit = (m["lks"][big]["prepare_s"] + tcfg.epochs * m["lks"][big]["epoch_s"]) * n / big
            elif method == "ft":  # full batch: `steps` steps over every edit; else epochs of batch_edits rows
                rows_per_step = min(ft.batch_edits, n) if ft.batch_edits else n
                steps = ft.steps * (-(-n // ft.batch_edits) if ft.batch_edits else 1)
                fit = steps * m["ft"]["step_s"] * rows_per_step / m["ft"]["rows"]
            else:
                a = m["memit" if method == "memit" else "alphaedit"]
                solves = -(-n // 100) if method == "alphaedit-seq" else 1  # sequential: one solve per 100 edits
                fit = a["targets_s"] / a["n"] * n + a["solve_s"] * (n / solves) / a["n"] * solves
            ev = m["eval"]["teacher_forced_s"] * min(n, profile.eval_n) + m["eval"]["generation_s"] * min(n, profile.fluency_n)
            rows.append({"method": method, "n": n, "fit_s": fit, "eval_s": ev, "datasets": len(profile.datasets)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama2-7b-chat", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--edits", type=int, nargs="+", default=[100, 1000], help="numbers of edits measured")
    p.add_argument("--profile", default=None, help="grid profile projected (default: the shape's paper profile)")
    p.add_argument("--out", default=None, help="folder of the JSON record (default: benchmarks/results/)")
    p.add_argument("--write-tokenizer", action="store_true", help="write the shipped tokenizer file and exit")
    args = p.parse_args(argv)
    if args.write_tokenizer:
        write_tokenizer()
        return {}
    from records import code_state, write_record

    from lks.grid import load_profile

    code_state()  # the code that runs, named in the record written at the end

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tok = tokenizer()
    with tempfile.TemporaryDirectory() as cache, env(LKS_CACHE_DIR=cache):
        t0 = time.perf_counter()
        model = random_model(args.shape, len(tok), args.device, dtype)
        load_s = time.perf_counter() - t0
        m = measure(model, tok, sorted(args.edits), args.device, TINY if args.shape == "tiny" else {})
        profile = load_profile(args.profile or PAPER_PROFILE.get(args.shape, "cpu-small-smollm2"))
        rows = project(m, profile, model)
    total_h = sum((r["fit_s"] + r["eval_s"]) * r["datasets"] for r in rows) / 3600
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    result = {"shape": args.shape, "device": device, "dtype": str(dtype).removeprefix("torch."), "model_init_s": load_s,
              "measured": m, "profile": args.profile or PAPER_PROFILE.get(args.shape, "cpu-small-smollm2"),
              "projection": rows, "projected_hours": total_h}
    print(f"{args.shape} on {device} ({result['dtype']}, random weights); model built in {load_s:.0f} s")
    gib = lambda x: f", peak {x:.1f} GiB" if x is not None else ""  # noqa: E731
    for n, lk in sorted(m["lks"].items()):
        print(f"LKS, N={n}: preparation {lk['prepare_s']:.1f} s, one epoch {lk['epoch_s']:.1f} s{gib(lk['peak_gib'])}")
    for method in ("memit", "alphaedit"):
        a = m[method]
        print(f"{method}, N={a['n']}: targets {a['targets_s'] / a['n']:.2f} s per edit, solve {a['solve_s']:.1f} s{gib(a['peak_gib'])}")
    print(f"key statistics: {m['stats']['tokens']:,} tokens over {m['stats']['layers']} layers in {m['stats']['seconds']:.1f} s")
    print(f"FT-L: {m['ft']['step_s']:.2f} s per step of {m['ft']['rows']} rows{gib(m['ft']['peak_gib'])}; evaluation: "
          f"{m['eval']['teacher_forced_s']:.3f} s per edit teacher-forced, {m['eval']['generation_s']:.3f} s per edit generated")
    print(f"forward: {m['forward_tokens_per_s']:,.0f} tokens/s (batch 8 x 512; the capability runs' rate, not projected)")
    print(f"\nprojected {result['profile']} (fits + evaluations, every data set): {total_h:.1f} hours on {device}")
    print("| method | N | fit h | evaluation h |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['n']:,} | {r['fit_s'] * r['datasets'] / 3600:.2f} | {r['eval_s'] * r['datasets'] / 3600:.2f} |")
    write_record("gpu_cost", data="builtin", edits=max(args.edits), seconds=time.perf_counter() - t0, peak_rss_mib=None,
                 threads=torch.get_num_threads(), extra=result, folder=Path(args.out) if args.out else None)
    return result


if __name__ == "__main__":
    main()
