"""Benchmark of LKS training: the fast cached path of ``LKSEditor.fit`` versus a naive loop.

Usage::

    python benchmarks/bench_train.py [--data-dir DIR] [--n 32] [--steps 4] [--batch-size 16]
                                     [--loc-per-subject 4] [--threads 1] [--per-example]
                                     [--roofline] [--no-bf16]

Both paths train the same generator (same initial weights) on the same CounterFact edits, with the
same ``TrainConfig`` (default: the registered recipe of ``smollm2-135m``) and the same batches, for
the same number of optimisation steps (AdamW + the linear-decay schedule of ``fit``). Steps of the
two paths are interleaved (fast, naive, fast, naive, ...) so machine drift hits both alike.

* **fast** is exactly what ``LKSEditor.fit`` runs per step: ``Trainer.batch_loss`` on cached layer-L
  states (layers L+1..N only, logits only at loss positions, reference locality distributions
  cached as top-k + tail). Its one-time cost (features, tokenisation, layer-L cache, reference
  distributions) is timed separately as "precompute".
* **naive** is a loop in the style of the paper's reference code. Per step it re-tokenises
  everything, recomputes the batch's feature vectors with a full forward pass (all layers, logits
  included), and for every loss runs a full forward pass through ALL layers with the knowledge
  block written by ``LayerHooks(model, edit_layer=L).replace(...)`` (subject positions from
  ``lks.data.subject_positions``), logits over the whole vocabulary at every position: one pass
  for the edit prompts, one for the rephrases, and for each locality-prompt slot one edited pass
  plus one unedited pass for the reference distribution (full-vocabulary KL). Same losses as the
  fast path: edit/equivalence NLL of the target tokens tokenised together with the prompt (mean
  per sequence, then over sequences), locality KL(orig || edited) at the positions set by
  ``cfg.loc_positions``, averaged over all those positions.

Two more paths are timed in the same interleaved loop: **fast-bf16** (default on; ``--no-bf16``
skips it) is the fast path with ``TrainConfig.precision="bfloat16"`` (upper layers held in
bfloat16 for the whole fit, eager attention; run on its own copy of the model so the float32
paths are untouched); the **fast** path is always float32. **naive-1** (``--per-example``) is the
naive loop with one forward pass per sequence.

Before timing, the losses of both paths are compared on the first batch (with a random, non-zero
generator so the edit actually changes the logits): the naive loss with the top-k + tail KL must
equal the fast loss (implementation check), and the naive full-vocabulary KL shows what the top-k
approximation costs. FLOPs of one step of each path are counted with ``FlopCounterMode``.
``--roofline`` compares the fast step's achieved FLOP/s with ``torch.matmul`` of representative
shapes measured in the same run (for fast-bf16: bfloat16 matmuls).

Timings are given as wall clock (``time.perf_counter``) and as this process's CPU time
(``time.process_time``); with one thread, CPU time is close to what an idle machine would show.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

import lks  # noqa: E402
from lks.config import TrainConfig, model_spec  # noqa: E402
from lks.data import EditRecord, subject_positions  # noqa: E402
from lks.editor import LKSEditor  # noqa: E402
from lks.hooks import LayerHooks  # noqa: E402
from lks.hypernet import KBGenerator, make_generator  # noqa: E402
from lks.training import Trainer  # noqa: E402
from lks.training.fastpath import LENGTH_BUCKETS, log_tail, step_blocks  # noqa: E402
from lks.training.losses import topk_kl  # noqa: E402
from lks.training.prompts import training_locality_prompts  # noqa: E402
from lks.training.sequences import KIND_LOC, edit_batches, subject_span  # noqa: E402

MODEL = "smollm2-135m"


# --------------------------------------------------------------------------------------------
# The naive reference loop
# --------------------------------------------------------------------------------------------
class NaiveLoop:
    """Training losses computed the straightforward way: every loss is a full hooked forward pass.

    Nothing is cached between steps except the edit records themselves and the grouping of edit
    statements per subject (pure data preparation, the same grouping as ``LKSEditor.set_edits``).
    It implements the paper's three losses (edit, equivalence on ``rephrases[0]``, locality).
    """

    def __init__(self, model, tok, layer: int, cfg: TrainConfig, edits,
                 subject_span: Callable[[str, str], tuple[int, int] | None], per_example: bool = False) -> None:
        self.model, self.tok, self.L, self.cfg = model, tok, layer, cfg
        self.per_example = per_example  # one forward pass per sequence instead of one per batch
        self.span = subject_span  # the editor's rule for locating the subject in a prompt
        by_subject: dict[str, list[str]] = {}
        for r in edits:
            stmts = by_subject.setdefault(r.subject, [])
            if r.feature_text() not in stmts:
                stmts.append(r.feature_text())
        self.feature_text = {s: " ".join(v) for s, v in by_subject.items()}

    # -- pieces ---------------------------------------------------------------------------------
    def features(self, subjects: list[str]) -> torch.Tensor:
        if self.per_example:
            return torch.cat([self._features([s]) for s in subjects])
        return self._features(subjects)

    @torch.no_grad()
    def _features(self, subjects: list[str]) -> torch.Tensor:
        """Layer-L state at the last token of each subject's edit statement: a FULL forward pass."""
        enc = self.tok([self.feature_text[s] for s in subjects], return_tensors="pt", padding=True,
                       padding_side="right")
        with LayerHooks(self.model, capture=[self.L]) as hooks:  # no early stop: all layers + lm head run
            self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
        last = enc["attention_mask"].sum(1) - 1
        return hooks.captured[self.L][torch.arange(len(subjects)), last].float()

    def _encode(self, items: list[tuple[str, str, str]]):
        """items ``(text, prompt, subject)`` -> (indices kept, encoding, subject positions)."""
        kept, surface = [], []
        for i, (_, prompt, subject) in enumerate(items):
            span = self.span(prompt, subject)
            if span is None:  # the fast path drops these too (a rephrase not naming the subject)
                continue
            kept.append(i)
            surface.append(prompt[span[0]:span[1]])  # first mention, as in the prompt
        if not kept:
            return kept, None, None
        enc, pos = subject_positions(self.tok, [items[i][0] for i in kept], surface, padding_side="right")
        return kept, enc, pos

    def _edited_logits(self, enc, pos, vectors: torch.Tensor, combine) -> torch.Tensor:
        """Full forward pass (all layers, logits at every position) with the KB replaced at layer L."""
        with LayerHooks(self.model, edit_layer=self.L) as hooks:
            hooks.replace(torch.arange(len(pos)), pos, vectors, combine=combine)
            return self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits

    def _nll_terms(self, items, table, row, combine) -> list[torch.Tensor]:
        if self.per_example:
            return [t for it in items for t in self._nll_batch([it], table, row, combine)]
        return self._nll_batch(items, table, row, combine)

    def _nll_batch(self, items, table, row, combine) -> list[torch.Tensor]:
        """Per-sequence mean NLL of the target tokens (tokenised together with the prompt)."""
        offs = self.tok([t for t, _, _ in items], return_offsets_mapping=True)["offset_mapping"]
        keep, tgts = [], []
        for it, o in zip(items, offs, strict=True):
            tgt = [j for j, (s, e) in enumerate(o) if s >= len(it[1]) and e > s]
            if tgt and tgt[0] > 0:
                keep.append(it)
                tgts.append(tgt)
        kept, enc, pos = self._encode(keep)
        if not kept:
            return []
        vec = table[torch.tensor([row[keep[i][2]] for i in kept])]
        logp = torch.log_softmax(self._edited_logits(enc, pos, vec, combine).float(), -1)  # [B, T, V]
        ids = enc["input_ids"]
        return [-logp[b, [j - 1 for j in tgts[i]], ids[b, tgts[i]]].mean() for b, i in enumerate(kept)]

    def _loc_rows(self, items, table, row, combine):
        if self.per_example:
            outs = [o for it in items if (o := self._loc_batch([it], table, row, combine)) is not None]
            return (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])) if outs else None
        return self._loc_batch(items, table, row, combine)

    def _loc_batch(self, items, table, row, combine):
        """(reference log-probs, edited logits) at the locality positions of one prompt slot."""
        kept, enc, pos = self._encode(items)
        if not kept:
            return None
        with torch.no_grad():  # the reference distribution, recomputed every step: unedited full pass
            ref_lp = torch.log_softmax(
                self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
                .logits.float(), -1)
        vec = table[torch.tensor([row[items[i][2]] for i in kept])]
        logits = self._edited_logits(enc, pos, vec, combine).float()
        lens = enc["attention_mask"].sum(1).tolist()
        b_idx, p_idx = [], []
        for b, (p, n) in enumerate(zip(pos.tolist(), lens, strict=True)):
            first = n - 1 if self.cfg.loc_positions == "last" else p
            b_idx += [b] * (n - first)
            p_idx += list(range(first, n))
        return ref_lp[b_idx, p_idx], logits[b_idx, p_idx]

    # -- the loss -------------------------------------------------------------------------------
    def loss(self, gen: KBGenerator, recs: list[EditRecord], kl: str = "full") -> dict[str, torch.Tensor]:
        """Losses of one batch of edit records; ``kl`` = "full" | "topk" | "both"."""
        cfg = self.cfg
        subjects = list(dict.fromkeys(r.subject for r in recs))
        row = {s: i for i, s in enumerate(subjects)}
        table = gen.table(self.features(subjects))  # [n_subjects_in_batch, d], requires grad
        add = gen.combine  # how the generator writes its table rows (hypernet.KBGenerator.combine)
        edit = self._nll_terms([(f"{r.prompt} {r.target}", r.prompt, r.subject) for r in recs], table, row, add)
        equiv = []
        if cfg.w_equiv > 0:
            equiv = self._nll_terms([(f"{r.rephrases[0]} {r.target}", r.rephrases[0], r.subject)
                                     for r in recs if r.rephrases], table, row, add)
        refs, eds = [], []
        if cfg.w_loc > 0:
            prompts = [training_locality_prompts(r, cfg.loc_per_subject, cfg.seed, cfg.loc_templates) for r in recs]
            for k in range(cfg.loc_per_subject):  # one edited + one unedited full pass per slot
                out = self._loc_rows([(p[k], p[k], r.subject) for p, r in zip(prompts, recs, strict=True)
                                      if len(p) > k], table, row, add)
                if out is not None:
                    refs.append(out[0])
                    eds.append(out[1])
        zero = table.sum() * 0.0
        losses = {"edit": torch.stack(edit).mean() if edit else zero,
                  "equiv": torch.stack(equiv).mean() if equiv else zero}
        if refs:
            ref_lp, ed = torch.cat(refs), torch.cat(eds)
            if kl in ("full", "both"):
                losses["loc_full"] = (ref_lp.exp() * (ref_lp - torch.log_softmax(ed, -1))).sum(-1).mean()
            if kl in ("topk", "both"):
                top, idx = ref_lp.topk(min(cfg.loc_topk, ref_lp.shape[-1]), dim=-1)
                losses["loc_topk"] = topk_kl(top, idx, log_tail(top, ref_lp.shape[-1]), ed)
        else:
            losses["loc_full"] = losses["loc_topk"] = zero
        for name in ("full", "topk"):
            if f"loc_{name}" in losses:
                losses[f"total_{name}"] = (cfg.w_edit * losses["edit"] + cfg.w_equiv * losses["equiv"]
                                           + cfg.w_loc * losses[f"loc_{name}"])
        losses["total"] = losses["total_full"] if "total_full" in losses else losses["total_topk"]
        return losses


def padded_tokens(seqs, batch: list[int], buckets: int = 1, suffix_only: bool = False) -> int:
    """Tokens that ``batch`` sends through the upper layers when run in ``buckets`` length buckets
    (``suffix_only``: with the prefix cache, from the subject's last token on)."""
    run = {j: len(seqs[j].ids) - (seqs[j].subj_pos if suffix_only else 0) for j in batch}
    return sum(len(block) * max(run[j] for j in block) for block in step_blocks(seqs, batch, suffix_only, buckets))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def make_opt(gen: torch.nn.Module, cfg: TrainConfig, steps_total: int):
    """AdamW + the linear decay ``LKSEditor.fit`` uses."""
    opt = torch.optim.AdamW(gen.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(1, steps_total)))
    return opt, sched


def step(loss_fn: Callable[[], dict[str, torch.Tensor]], opt, sched) -> tuple[float, float, float]:
    """One optimisation step; returns (wall s, CPU s, loss). ``loss_fn`` either returns the losses
    with their graph or has taken the backward itself (``batch_loss(..., backward=True)``, as fit does)."""
    t0, c0 = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    losses = loss_fn()
    if losses["total"].requires_grad:
        losses["total"].backward()
    opt.step()
    sched.step()
    loss = float(losses["total"].detach())
    return time.perf_counter() - t0, time.process_time() - c0, loss


def count_flops(fn: Callable[[], dict[str, torch.Tensor]]) -> tuple[int, dict]:
    """FLOPs of forward + backward of ``fn()["total"]`` (FlopCounterMode: matmuls, attention, conv)."""
    with FlopCounterMode(display=False) as fc:
        fn()["total"].backward()
    return fc.get_total_flops(), fc.get_flop_counts()


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def clock() -> Callable[[], float]:
    """CPU time of this process with one thread (robust to other load), else wall clock."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 7) -> float:
    """FLOP/s of ``[m, k] @ [k, n]``, median of ``reps`` timings (each ~5 GFLOP of work)."""
    now = clock()
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    flops = 2 * m * k * n
    inner = max(1, int(5e9 / flops))  # ~5 GFLOP per timing
    a @ b
    ts = []
    for _ in range(reps):
        t0 = now()
        for _ in range(inner):
            a @ b
        ts.append((now() - t0) / inner)
    return flops / statistics.median(ts)


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    default_dir = os.environ.get("LKS_DATA_DIR", str(REPO.parent / "shared" / "data"))
    spec = model_spec(MODEL)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=default_dir)
    ap.add_argument("--n", type=int, default=32, help="CounterFact edits (the first n)")
    ap.add_argument("--steps", type=int, default=4, help="timed optimisation steps per path (>= 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per path before timing")
    ap.add_argument("--batch-size", type=int, default=spec.train.batch_size)
    ap.add_argument("--loc-per-subject", type=int, default=spec.train.loc_per_subject)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the benchmark machine is shared)")
    ap.add_argument("--check-std", type=float, default=0.05,
                    help="std of the random generator weights for the loss check and the timed runs")
    ap.add_argument("--per-example", action="store_true",
                    help="also time a naive loop with one forward pass per sequence (batch size 1)")
    ap.add_argument("--no-bf16", action="store_true",
                    help="skip the bfloat16 variants of the fast path (TrainConfig.precision='bfloat16')")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="skip the prefix-cache variants of the fast path (TrainConfig.prefix_cache=True)")
    ap.add_argument("--roofline", action="store_true", help="compare the fast step's FLOP/s with plain matmuls")
    ap.add_argument("--roofline-reps", type=int, default=5)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    model, tok = lks.load_model(MODEL, device="cpu")
    edits = lks.load_edits("counterfact", data_dir=args.data_dir, n=args.n)
    # the recipe's step with what the naive loop implements: the paper's three losses, the equivalence
    # loss on each edit's rephrases[0] (no bank paraphrases), no KL after the target, no gate loss
    # (bench_memory.py times whole fits of the full recipe). "fast" is float32 without the prefix
    # cache (the recipe turns both on: without this "fast" would silently equal a variant below)
    cfg = dataclasses.replace(spec.train, batch_size=args.batch_size, loc_per_subject=args.loc_per_subject,
                              precision="float32", prefix_cache=False, w_after=0.0, w_gate=0.0,
                              para_per_edit=0, train_rephrase=True)
    with ExitStack() as stack:
        run(args, spec, model, tok, edits, cfg, stack, t_start)


def run(args, spec, model, tok, edits, cfg: TrainConfig, stack: ExitStack, t_start: float) -> None:
    L = spec.editor.layer
    print(f"model {MODEL} (layer L={L} of {len(lks.get_layers(model))}, d={model.config.hidden_size}, "
          f"vocab {model.config.vocab_size}, float32, CPU); torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s) (--threads; default 1 because the machine is shared), "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at start")
    print(f"edits: {len(edits)} CounterFact; TrainConfig: batch_size={cfg.batch_size}, "
          f"loc_per_subject={cfg.loc_per_subject}, loc_topk={cfg.loc_topk}, loc_positions={cfg.loc_positions}, "
          f"epochs={cfg.epochs}, lr={cfg.lr}, w=({cfg.w_edit}, {cfg.w_equiv}, {cfg.w_loc}); generator "
          f"{spec.editor.generator}")

    # --- fast path: one-time precompute (what fit() does before its first step) ---------------
    editor = LKSEditor(model, tok, spec.editor)
    editor.train_config = cfg  # as fit() does (the fast path reads e.g. its precision from it)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = Trainer(editor, cfg).prepare(edits, 64, progress=False)
    per_edit, seqs, skipped, cache = trainer.per_edit, trainer.seqs, trainer.skipped, trainer.cache
    pre_wall, pre_cpu = time.perf_counter() - t0, time.process_time() - c0
    n_loc = sum(s.kind == KIND_LOC for s in seqs)
    print(f"fast path precompute: {len(seqs)} sequences ({n_loc} locality), {cache.states.shape[0]} cached "
          f"tokens, {0 if cache.ref_logp is None else cache.ref_logp.shape[0]} reference positions; skipped "
          f"{skipped}; {pre_wall:.2f} s wall, {pre_cpu:.2f} s CPU")

    batches = edit_batches(per_edit, seqs, cfg.batch_size)
    random.Random(cfg.seed).shuffle(batches)  # fit's first-epoch order
    seq_edit = {j: i for i, js in enumerate(per_edit) for j in js}
    batch_edits = [sorted({seq_edit[j] for j in b}) for b in batches]

    # the same random non-zero initial generator for both paths (the seeded residual init is zero,
    # which would make the locality KL trivially 0 in the loss check)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for p in editor.generator.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * args.check_std)
    init_state = {k: v.clone() for k, v in editor.generator.state_dict().items()}
    variants = [("naive", False)] + ([("naive-1", True)] if args.per_example else [])
    naives = {}
    for name, per_ex in variants:
        gen = make_generator(spec.editor.generator, editor.d, spec.editor.mlp_ratio)
        gen.load_state_dict(init_state)
        naives[name] = (NaiveLoop(model, tok, L, cfg, edits, lambda p, s: subject_span(editor.scope, p, s),
                                  per_example=per_ex), gen)
    naive, naive_gen = naives["naive"]

    # --- loss check on the first batch ---------------------------------------------------------
    b0, e0 = batches[0], [edits[i] for i in batch_edits[0]]
    with torch.no_grad():
        fl = trainer.batch_loss(b0)
        nl = naive.loss(naive_gen, e0, kl="both")
    print(f"\nloss check on the first batch ({len(e0)} edits, {len(b0)} sequences; generator weights ~ "
          f"N(0, {args.check_std}^2), so the edit changes the logits):")
    print(f"  {'component':10s} {'fast':>12s} {'naive top-k KL':>15s} {'naive full KL':>14s}  "
          f"{'rel.diff fast vs naive(top-k)':>30s}")
    for name, f, nk, nf in (("edit", fl["edit"], nl["edit"], nl["edit"]),
                            ("equiv", fl["equiv"], nl["equiv"], nl["equiv"]),
                            ("loc (KL)", fl["loc"], nl["loc_topk"], nl["loc_full"]),
                            ("total", fl["total"], nl["total_topk"], nl["total_full"])):
        print(f"  {name:10s} {float(f):12.6f} {float(nk):15.6f} {float(nf):14.6f}  {rel(float(f), float(nk)):30.2e}")
    d_impl = rel(float(fl["total"]), float(nl["total_topk"]))
    d_topk = rel(float(nl["total_topk"]), float(nl["total_full"]))
    d_all = rel(float(fl["total"]), float(nl["total_full"]))
    ok = d_impl <= 1e-3
    print(f"  total: fast vs naive with the same top-{cfg.loc_topk}+tail KL: rel. diff {d_impl:.2e} "
          f"({'OK' if ok else 'MISMATCH'}, target <= 1e-3)")
    print(f"  total: naive top-k KL vs naive full-vocabulary KL (the top-k approximation): rel. diff {d_topk:.2e}"
          f" (locality KL {float(nl['loc_topk']):.6f} vs {float(nl['loc_full']):.6f})")
    print(f"  total: fast vs naive full-vocabulary KL (both effects): rel. diff {d_all:.2e}")
    # variants of the fast path (same initial generator, same batches): precision x prefix cache.
    # TrainConfig.precision="bfloat16" runs on its own copy of the model: FastPath.upper_pass
    # holds the upper layers in bfloat16 for a whole fit, which would change the float32 paths' model
    variants: dict[str, Trainer] = {}
    model_b = None
    for name, precision, pc in (("fast-pc", "float32", True), ("fast-bf16", "bfloat16", False),
                                ("fast-bf16-pc", "bfloat16", True)):
        if (precision == "bfloat16" and args.no_bf16) or (pc and args.no_prefix_cache):
            continue
        cfg_v = dataclasses.replace(cfg, precision=precision, prefix_cache=pc)
        if precision == "bfloat16":
            model_b = model_b if model_b is not None else copy.deepcopy(model)
        ed = LKSEditor(model_b if precision == "bfloat16" else model, tok, spec.editor)  # own generator and cache
        ed.train_config = cfg_v
        tv = Trainer(ed, cfg_v).prepare(edits, 64, progress=False)  # as fit prepares (features in its precision)
        ed.generator.load_state_dict(init_state)
        cache_v = tv.cache
        pre = cache_v.prefix
        extra = "" if pre is None else (f", prefix keys/values {pre.nbytes() / 2**20:.1f} MiB "
                                        f"for {pre.n_rows} distinct prefixes of {sum(q.subj_pos for q in tv.seqs)} prefix tokens")
        print(f"  {name} precompute: {tv.precompute_seconds:.2f} s wall{extra}")
        if precision == "bfloat16":
            stack.enter_context(ed.fast.upper_pass(cfg_v.precision))
        with torch.no_grad():
            vl = tv.batch_loss(b0)
        print(f"  total: {name} (precision {precision}, prefix_cache {pc}) vs fast: rel. diff "
              f"{rel(float(vl['total']), float(fl['total'])):.2e} (edit {float(vl['edit']):.6f}, "
              f"equiv {float(vl['equiv']):.6f}, loc {float(vl['loc']):.6f})")
        variants[name] = tv
    if "naive-1" in naives:
        with torch.no_grad():
            n1 = naives["naive-1"][0].loss(naives["naive-1"][1], e0, kl="full")
        print(f"  total: naive one-sequence-per-pass vs batched naive (full KL): rel. diff "
              f"{rel(float(n1['total']), float(nl['total_full'])):.2e} (padding only)")

    # --- FLOPs per step -------------------------------------------------------------------------
    editor.generator.zero_grad(set_to_none=True)
    f_fast, _ = count_flops(lambda: trainer.batch_loss(b0))
    editor.generator.zero_grad(set_to_none=True)
    f_naive, _ = count_flops(lambda: naive.loss(naive_gen, e0))
    naive_gen.zero_grad(set_to_none=True)
    print(f"\nFLOPs of one step on that batch (FlopCounterMode, forward + backward): fast {f_fast / 1e9:,.1f} GFLOP, "
          f"naive {f_naive / 1e9:,.1f} GFLOP, ratio {f_naive / f_fast:.1f}x (the speed-up a purely FLOP-bound "
          f"implementation would show)")
    real = sum(len(seqs[j].ids) for j in b0)
    print(f"  tokens through layers L+1..N in the fast step: {real} real, {padded_tokens(seqs, b0)} padded "
          f"in one padded block, {padded_tokens(seqs, b0, LENGTH_BUCKETS)} padded in {LENGTH_BUCKETS} length "
          f"buckets (as lks runs them)")
    f_var = {}
    for name, tv in variants.items():
        f_var[name], _ = count_flops(lambda tv=tv: tv.batch_loss(b0))
        tv.editor.generator.zero_grad(set_to_none=True)
        print(f"  {name}: {f_var[name] / 1e9:,.1f} GFLOP (naive / {name} FLOP ratio {f_naive / f_var[name]:.1f}x)")

    # --- timed steps, interleaved -------------------------------------------------------------
    steps_total = len(batches) * cfg.epochs
    paths: dict[str, tuple[Callable, tuple]] = {
        "fast": (lambda b, recs: trainer.batch_loss(b, backward=True), make_opt(editor.generator, cfg, steps_total))}
    for name, tv in variants.items():
        paths[name] = (lambda b, recs, tv=tv: tv.batch_loss(b, backward=True), make_opt(tv.editor.generator, cfg, steps_total))
    for name, (loop, gen) in naives.items():
        paths[name] = (lambda b, recs, loop=loop, gen=gen: loop.loss(gen, recs), make_opt(gen, cfg, steps_total))
    editor.generator.train()
    rec: dict[str, list[tuple[float, float, int]]] = {name: [] for name in paths}
    print("\ntimed steps (interleaved; fast = float32, no prefix cache; '-bf16' = TrainConfig.precision='bfloat16', "
          "'-pc' = TrainConfig.prefix_cache=True; "
          "'naive-1' = naive with one forward pass per sequence):")
    for i in range(args.warmup + args.steps):
        b, recs = batches[i % len(batches)], [edits[k] for k in batch_edits[i % len(batches)]]
        msg = []
        for name, (fn, (opt, sch)) in paths.items():
            w, c, _ = step(lambda fn=fn, b=b, recs=recs: fn(b, recs), opt, sch)
            msg.append(f"{name} {w:7.3f} s wall / {c:7.3f} s CPU")
            if i >= args.warmup:
                rec[name].append((w, c, len(recs)))
        print(f"  step {i + 1} ({'warm-up' if i < args.warmup else 'timed'}, {len(recs)} edits): " + " | ".join(msg))

    def rates(r):
        n = sum(x[2] for x in r)
        return (statistics.median(x[0] for x in r), statistics.median(x[1] for x in r),
                n / sum(x[0] for x in r), n / sum(x[1] for x in r))

    res = {name: rates(r) for name, r in rec.items()}
    print(f"\ntraining throughput, {args.steps} timed steps per path (batch {cfg.batch_size} edits), "
          f"{torch.get_num_threads()} thread(s):")
    print(f"  {'path':8s} {'s/step wall (median)':>21s} {'s/step CPU (median)':>20s} "
          f"{'edit-samples/s wall':>20s} {'edit-samples/s CPU':>19s} {'fast / this path: wall | CPU':>29s}")
    fsw, fsc = res["fast"][2], res["fast"][3]
    for name, (w, c, sw, sc) in res.items():
        print(f"  {name:8s} {w:21.3f} {c:20.3f} {sw:20.2f} {sc:19.2f} {fsw / sw:17.2f}x | {fsc / sc:.2f}x")
    nsw, nsc = res["naive"][2], res["naive"][3]
    r_wall, r_cpu = fsw / nsw, fsc / nsc
    print(f"  speed-up fast / naive (batched): {r_wall:.1f}x wall, {r_cpu:.1f}x CPU  (target >= 15x: "
          f"{'met' if min(r_wall, r_cpu) >= 15 else 'NOT met'}; FLOP ratio {f_naive / f_fast:.1f}x)")
    for a, b in [(v, "naive") for v in variants] + [(v, "fast") for v in variants] + \
            [(v, "naive-1") for v in ("fast", *variants)]:
        if a in res and b in res:
            print(f"  speed-up {a} / {b}: {res[a][2] / res[b][2]:.1f}x wall, {res[a][3] / res[b][3]:.1f}x CPU")
    # amortised: fast = precompute + epochs * N / rate; naive = epochs * N / rate
    N, E = len(edits), cfg.epochs
    am_w = (E * N / nsw) / (pre_wall + E * N / fsw)
    am_c = (E * N / nsc) / (pre_cpu + E * N / fsc)
    print(f"  one-time precompute of the fast path: {pre_wall:.2f} s wall / {pre_cpu:.2f} s CPU for {N} edits "
          f"= the time of {pre_wall * fsw / cfg.batch_size:.1f} fast steps of {cfg.batch_size} edits")
    print(f"  with precompute amortised over {E} epochs of {N} edits: {am_w:.1f}x wall, {am_c:.1f}x CPU "
          f"[PROJECTED from the measured rates: fast {pre_wall + E * N / fsw:.1f} s vs naive {E * N / nsw:.1f} s wall]")

    # --- roofline ------------------------------------------------------------------------------
    if args.roofline:
        roofline("fast", trainer, b0, args, f_fast, torch.float32)
        for name, tv in variants.items():
            roofline(name, tv, b0, args, f_var[name], torch.bfloat16 if tv.cfg.precision == "bfloat16" else torch.float32)
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.1f} s "
          f"(load average {os.getloadavg()[0]:.2f} at end)")


def roofline(label: str, trainer: Trainer, batch, args, flops: int, dtype) -> None:
    """Achieved FLOP/s of one training step vs plain matmuls of the shapes it is made of."""
    editor, cache, seqs = trainer.editor, trainer.cache, trainer.seqs
    d, V = editor.d, editor.model.config.vocab_size
    inter = editor.model.config.intermediate_size
    tokens = padded_tokens(seqs, batch, LENGTH_BUCKETS, cache.prefix is not None)  # through the upper layers, as lks runs them
    n_pos = sum(len(seqs[j].loss_pos) for j in batch)
    head = 4 * n_pos * d * V  # lm head: forward + input-gradient (its weight is frozen)
    now = clock()
    print(f"\nroofline of one {label} step (first batch: {len(batch)} sequences, {tokens} padded tokens through "
          f"layers L+1..N, {n_pos} logit rows), {torch.get_num_threads()} thread(s), times by "
          f"{'CPU time' if now is time.process_time else 'wall clock'}:")
    print(f"  FLOPs (FlopCounterMode, fwd+bwd): {flops / 1e9:.2f} GFLOP, of which lm head {head / 1e9:.2f} "
          f"(analytic 4*rows*d*V)")
    gen, name = editor.generator, str(dtype).replace("torch.", "")
    ts = []
    for _ in range(args.roofline_reps + 1):
        gen.zero_grad(set_to_none=True)
        t0 = now()
        loss = trainer.batch_loss(batch)["total"]
        loss.backward()
        ts.append(now() - t0)
    t_step = statistics.median(ts[1:])
    r_mlp = matmul_rate(tokens, d, inter, dtype)
    r_head = matmul_rate(n_pos, d, V, dtype)
    bound = (flops - head) / r_mlp + head / r_head  # time if every FLOP ran at its matmul's rate
    print(f"  [{name}] step (fwd+bwd, median of {args.roofline_reps}): {t_step * 1e3:.1f} ms -> "
          f"{flops / t_step / 1e9:.1f} GFLOP/s achieved; loss {float(loss.detach()):.6f}")
    print(f"  [{name}] matmul [{tokens}, {d}] x [{d}, {inter}]: {r_mlp / 1e9:.1f} GFLOP/s; "
          f"lm-head [{n_pos}, {d}] x [{d}, {V}]: {r_head / 1e9:.1f} GFLOP/s")
    frac = bound / t_step
    print(f"  [{name}] fraction of the matmul roofline (matmul-rate time / measured time): {frac:.0%} "
          f"(target >= 60%: {'met' if frac >= 0.6 else 'NOT met'}); vs the [tokens, d] x [d, "
          f"{inter}] rate alone: {flops / t_step / r_mlp:.0%}")
    gen.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
