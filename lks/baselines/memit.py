"""MEMIT (Meng, Sen Sharma, Andonian, Belinkov, Bau 2023, "Mass-Editing Memory in a Transformer").

Two steps (paper §3, Algorithm 1):

1. **Target vectors** (§3.1, eq. 16-17): for edit ``i`` find ``delta_i`` that, added to the output
   ``h_i^L`` of the LAST layer ``L`` of the band at the subject's last token, makes the model
   predict the new object: minimise the mean NLL of the target over the edit prompt and a few
   short random-prefix contexts, plus ``kl_weight`` times KL(unedited || edited) of the next token
   after "{subject} is a" (keeps the subject's other facts; ROME, Meng et al. 2022, eq. 4), plus
   ``weight_decay * ||delta||^2 / ||h||^2``; ``||delta||`` is clamped to ``clamp * ||h||`` after
   every step. ``z_i = h_i^L + delta_i``. All edits are optimised together: their losses are
   summed and each ``delta_i`` only reaches its own rows, so the batch is n independent problems
   in one forward/backward (:func:`target_vectors`).
2. **Spread over the band** (§3.2, Algorithm 1 lines 8-15): for each layer ``l`` of the band in
   turn, keys ``K`` (down_proj inputs at the subject's last token, averaged over the contexts),
   residual ``R = (z - h^L) / (layers left)`` with ``h^L`` recomputed under the updates so far, and
   the least-squares update (eq. 14) ``Delta = R K^T (C0 + K K^T)^-1``, ``C0 = lambda E[k k^T]``
   (:func:`memit_update`; in torch's ``[out, in]`` weight layout with keys as rows).

The random-prefix contexts are the unedited model's greedy continuations of a few opening words
(the paper samples them); one set per fit, shared by all edits.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lks.baselines.common import (
    PROJ,
    Row,
    SuffixPart,
    WeightEditor,
    added_weights,
    chunks,
    down_proj,
    encode_rows,
    join_rows,
    suffix_hidden,
    suffix_part,
    target_nll,
)
from lks.baselines.stats import CORPUS, key_second_moment
from lks.data import EditSet
from lks.hooks import LayerHooks, StopForward
from lks.models import model_device, upper_layers_dtype
from lks.progress import ToGo
from lks.suffix import PrefixKV
from lks.utils import (
    length_batches,
    pad_ids,
    resolve_dtype,
    resolve_precision,
    save_tensors,
    take_rows,
)

log = logging.getLogger(__name__)
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You", "It", "In", "A", "When", "She")


@dataclass
class MEMITConfig:
    """MEMIT hyperparameters (defaults: close to the paper's GPT-J values; the registered SmolLM2-135M
    values are in lks/configs/smollm2-135m.json, chosen in docs/baselines.md)."""

    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])  # the band; targets at the last
    lam: float = 1e4             # lambda: weight of E[k k^T] in C0 (eq. 14; MEMIT GPT-J: 15,000)
    cov_tokens: int = 100_000    # corpus tokens of the key statistics
    corpus: str = CORPUS         # their corpus: a data-directory file or a path (never a test split)
    z_steps: int = 20            # Adam steps of the target optimisation
    z_lr: float = 0.5            # its learning rate
    clamp: float = 0.75          # ||delta|| <= clamp * ||h||
    kl_weight: float = 0.0625    # weight of the "{subject} is a" KL term
    weight_decay: float = 0.5    # weight of ||delta||^2 / ||h||^2
    n_prefixes: int = 4          # random-prefix contexts besides the plain prompt
    prefix_tokens: int = 10      # tokens per prefix
    stop_nll: float = 0.05       # an edit's target is done when its stop quantity is below this
    stop_on: str = "nll"         # that quantity: "nll" (its mean target NLL) or "loss" (its whole loss,
                                 # NLL + KL + decay, as ROME/MEMIT's compute_z stops on)
    decay_form: str = "squared"  # "squared": weight_decay * ||delta||^2 / ||h||^2; "reference":
                                 # weight_decay * ||delta|| / ||h||^2 (ROME/MEMIT's code)
    prefixes: str = "greedy"     # the context prefixes: "greedy" continuations or "sampled" (top-5, seed 0; MEMIT's)
    kl_form: str = "after"       # "after": KL(unedited || edited) of the token after "{subject} is a"; "reference":
                                 # KL(edited || unedited) at its subject's last token (ROME/MEMIT's compute_z)
    key_weights: str = "mean"    # a key from the edit's rows: "mean" of all; "reference": the plain
                                 # prompt 1/2, the prefixed rows 1/2 together (MEMIT's compute_ks); "plain": plain only
    batch_rows: int = 64         # rows per forward/backward chunk
    precision: str = "auto"      # upper layers during the target optimisation: "float32", "bfloat16" or
                                 # "auto" (bfloat16 where native, lks.utils.resolve_precision); ~2x on AVX-512-BF16

    def __post_init__(self) -> None:
        if not self.layers or sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"layers must be a non-empty increasing list, got {self.layers}")
        if min(self.lam, self.z_lr, self.clamp, self.cov_tokens, self.z_steps, self.batch_rows) <= 0:
            raise ValueError("lam, z_lr, clamp, cov_tokens, z_steps and batch_rows must be positive")
        for name, allowed in (("stop_on", ("nll", "loss")), ("decay_form", ("squared", "reference")),
                              ("key_weights", ("mean", "reference", "plain")), ("prefixes", ("greedy", "sampled")),
                              ("kl_form", ("after", "reference"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


def memit_update(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT's batch update (eq. 14): ``Delta = R^T K (lam C + K^T K)^-1`` ``[d_out, d_in]``.

    Keys ``K`` ``[n, d_in]`` and residuals ``R`` ``[n, d_out]`` are rows (the paper's columns);
    ``Delta`` minimises ``||Delta K^T - R^T||^2 + lam tr(Delta C Delta^T)``. Solved in float64."""
    A = lam * C.double() + K.double().T @ K.double()
    return torch.linalg.solve(A, K.double().T @ R.double()).T.float()


def context_prefixes(model: nn.Module, tok, cfg: MEMITConfig) -> list[str]:
    """``""`` and ``cfg.n_prefixes`` short texts of ``cfg.prefix_tokens`` new tokens continuing opening
    words, each ending in ". ": greedy continuations, or with ``cfg.prefixes == "sampled"`` top-5
    samples (MEMIT's ``generate_fast``) from a fixed seed, so a fit is reproducible."""
    out, n = [""], cfg.n_prefixes
    if n <= 0:
        return out
    dev = model_device(model)
    enc = tok(list(PREFIX_STARTS[:n]), return_tensors="pt", padding=True, padding_side="left").to(dev)
    sample = {"do_sample": True, "top_k": 5, "top_p": None, "temperature": None} if cfg.prefixes == "sampled" \
        else {"do_sample": False}
    with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(0)
        seq = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=cfg.prefix_tokens, pad_token_id=tok.pad_token_id, **sample)
    for text in tok.batch_decode(seq, skip_special_tokens=True):
        out.append(" ".join(text.replace("{", " ").replace("}", " ").split()) + ". ")
    return out


def _edit_rows(tok, edits: EditSet, prefixes: Sequence[str], with_target: bool) -> list[Row]:
    texts, subjects, owners, targets = [], [], [], []
    for i, r in enumerate(edits):
        for pre in prefixes:
            texts.append(pre + r.prompt)
            subjects.append(r.subject)
            owners.append(i)
            targets.append(r.target)
    return encode_rows(tok, texts, subjects, owners, targets if with_target else None)


def target_vectors(model: nn.Module, tok, edits: EditSet, cfg: MEMITConfig, layer: int, prefixes: Sequence[str],
                   progress: bool = True, history: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``z`` ``[n, d]`` and current outputs ``h`` ``[n, d]`` of decoder ``layer`` at each
    edit's subject (plain prompt), by the batched optimisation described in the module docstring.

    Each chunk holds whole edits (their context rows and their KL row). An edit whose mean target
    NLL is below ``stop_nll`` is done: its ``delta`` is frozen and its rows leave the optimisation;
    the edits still running are packed into full chunks again at every step (one edit alone would
    stop there too, so batching does not change the result)."""
    dev = model_device(model)
    n, n_ctx = len(edits), len(prefixes)
    ctx_rows = _edit_rows(tok, edits, prefixes, with_target=True)
    kl_rows = encode_rows(tok, [f"{r.subject} is a" for r in edits], [r.subject for r in edits], list(range(n)))
    for r in kl_rows:
        # the next token after "{subject} is a", or (reference) after the subject
        r.tgt_pos = [len(r.ids) - 1 if cfg.kl_form == "after" else r.subj]
    per_chunk = max(1, cfg.batch_rows // (n_ctx + 1))
    head = model.get_output_embeddings()
    h0 = torch.zeros(n, model.config.hidden_size, device=dev)
    ref = torch.zeros(n, head.weight.shape[0], device=dev)  # unedited log-probs after "{subject} is a"
    parts = []  # SuffixParts of whole edits: the lower layers and the prefixes run once
    # one prefix store for every chunk: the context prefixes are shared by all edits, so their
    # keys/values are stored once (row n_ctx * n + e is edit e's KL row)
    all_rows = ctx_rows + kl_rows
    prefix = PrefixKV.plan([r.ids for r in all_rows], [r.subj for r in all_rows])
    with torch.no_grad(), _precision(model, layer, cfg.precision) as dtype:
        for group in chunks(n, per_chunk):
            seq = [e * n_ctx + c for e in group for c in range(n_ctx)] + [n * n_ctx + e for e in group]
            rows = [all_rows[q] for q in seq]
            is_kl = torch.tensor([False] * (len(group) * n_ctx) + [True] * len(group), device=dev)
            part = suffix_part(model, layer, rows, tok.pad_token_id, dtype, prefix, seq)
            h0[torch.tensor(group, device=dev)] = part.h[: len(group) * n_ctx: n_ctx, 0]  # plain prompts
            fin = suffix_hidden(model, part, None, dtype).float()
            kl_k = is_kl.nonzero()[:, 0]
            pos = torch.tensor([part.rows[k].tgt_pos[0] for k in kl_k.tolist()], device=dev)
            ref[torch.tensor(group, device=dev)] = torch.log_softmax(head(fin[kl_k, pos]).float(), -1)
            parts.append(part)
    # each edit's rows, (part, row): its n_ctx context rows, then its KL row
    ctx_of: list[list[tuple[SuffixPart, int]]] = [[] for _ in range(n)]
    kl_of: dict[int, tuple[SuffixPart, int]] = {}
    for part in parts:
        for b, (row, q) in enumerate(zip(part.rows, part.seq)):
            if q >= n * n_ctx:
                kl_of[row.edit] = (part, b)
            else:
                ctx_of[row.edit].append((part, b))
    delta = torch.zeros(n, h0.shape[1], device=dev, requires_grad=True)
    with _precision(model, layer, cfg.precision) as dtype:
        _optimise(model, (ctx_of, kl_of, per_chunk), ref, h0, delta, dtype, cfg, n_ctx, progress, history)
    return (h0 + delta).detach(), h0


def edit_steps(history: Sequence[dict]) -> tuple[int, int]:
    """The steps a target optimisation's step entries (its ``history``) record and its edit-steps:
    an edit-step is one edit's rows through one forward and backward pass (the edits not done yet,
    summed over the steps; a step's cost follows it). ``(0, 0)`` with no step entry (cached targets)."""
    steps = [h for h in history if "step" in h]
    if not steps:
        return 0, 0
    n = steps[0]["edits"]
    running = [n] + [n - h["done"] for h in steps[:-1]]  # an edit done at step s still ran step s
    return len(steps), sum(running)


def target_work(history: Sequence[dict]) -> str:
    """``"20 steps, 7,214 edit-steps"`` (:func:`edit_steps`), "" for cached targets."""
    steps, work = edit_steps(history)
    return f"{steps} steps, {work:,} edit-steps" if steps else ""


@contextmanager
def _precision(model: nn.Module, layer: int, precision: str) -> Iterator[torch.dtype]:
    """Layers above ``layer`` (and the final norm) held in the resolved precision for the block."""
    dtype = resolve_dtype(resolve_precision(precision, model_device(model)))
    if dtype == torch.float32:
        yield dtype
        return
    with upper_layers_dtype(model, layer, dtype, attn_implementation="eager"):
        yield dtype


def _optimise(model, rows_of, ref, h0, delta, dtype, cfg: MEMITConfig, n_ctx: int, progress: bool,
              history: list | None) -> None:
    """The Adam loop of :func:`target_vectors` (``delta`` is updated in place). ``rows_of``: each
    edit's context rows and KL row (``(part, row)``) and the edits per chunk; every step runs the
    edits not done yet, ``per_chunk`` at a time."""
    ctx_of, kl_of, per_chunk = rows_of
    dev, n = h0.device, h0.shape[0]
    head = model.get_output_embeddings()
    opt = torch.optim.Adam([delta], lr=cfg.z_lr)
    h_norm = h0.norm(dim=1)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    nll_e = torch.full((n,), float("inf"), device=dev)
    loss_e = torch.full((n,), float("inf"), device=dev)
    kl_e = torch.zeros(n, device=dev)
    bar = tqdm(range(cfg.z_steps), desc="MEMIT targets", disable=not progress)
    for step in bar:
        opt.zero_grad()
        live = (~done).nonzero()[:, 0].tolist()
        for group in ([live[k] for k in c] for c in chunks(len(live), per_chunk)):
            g = torch.tensor(group, device=dev)
            part = join_rows([piece for e in group for piece in ctx_of[e]] + [kl_of[e] for e in group])
            is_kl = torch.arange(len(part.rows), device=dev) >= len(group) * n_ctx
            rows = part.rows
            owner = torch.tensor([r.edit for r in rows], device=dev)
            fin = suffix_hidden(model, part, take_rows(delta, owner), dtype).float()  # owners repeat
            ctx = (~is_kl).nonzero()[:, 0]
            nll = target_nll(model, fin[ctx], [rows[k] for k in ctx.tolist()])
            nll_g = torch.zeros(n, device=dev).index_add(0, owner[ctx], nll)[g] / n_ctx
            kl_k = is_kl.nonzero()[:, 0]
            pos = torch.tensor([rows[k].tgt_pos[0] for k in kl_k.tolist()], device=dev)
            logp = torch.log_softmax(head(fin[kl_k, pos]), -1)
            if cfg.kl_form == "after":
                kl = (ref[g].exp() * (ref[g] - logp)).sum(-1)   # KL(unedited || edited)
            else:
                kl = (logp.exp() * (logp - ref[g])).sum(-1)     # KL(edited || unedited)
            d_norm = delta[g].norm(dim=1)
            decay = cfg.weight_decay * (d_norm ** 2 if cfg.decay_form == "squared" else d_norm) / h_norm[g] ** 2
            loss = nll_g + cfg.kl_weight * kl + decay
            loss.sum().backward()
            nll_e[g], kl_e[g], loss_e[g] = nll_g.detach(), kl.detach(), loss.detach()
        done |= (nll_e if cfg.stop_on == "nll" else loss_e) < cfg.stop_nll
        if history is not None:
            history.append({"step": step, "edits": n, "nll_mean": float(nll_e.mean()), "nll_max": float(nll_e.max()),
                            "kl_mean": float(kl_e.mean()), "loss_mean": float(loss_e.mean()),
                            "done": int(done.sum())})
        bar.set_postfix(nll=f"{float(nll_e.mean()):.3f}", done=int(done.sum()))
        if bool(done.all()):
            break
        frozen = delta.detach()[done].clone()
        opt.step()
        with torch.no_grad():  # clamp ||delta_i|| <= clamp * ||h_i||; done edits keep their delta
            scale = (cfg.clamp * h_norm / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            delta.mul_(scale[:, None])
            delta[done] = frozen


@torch.no_grad()
def keys_and_outputs(model: nn.Module, tok, rows: Sequence[Row], n: int, key_layer: int, out_layer: int,
                     batch_rows: int, weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[n, d_in]`` (down_proj inputs of ``key_layer`` at the subject's last token, each edit's
    rows averaged with ``weights``, default equal) and outputs of ``out_layer`` ``[n, d]`` at the
    same token of each edit's FIRST row (its plain prompt), under the model's current weights. Rows
    run shortest first (:func:`lks.utils.length_batches`), so a batch pads little."""
    dev = model_device(model)
    keys = torch.zeros(n, down_proj(model, key_layer).in_features, device=dev)
    counts = torch.zeros(n, device=dev)
    outs = torch.zeros(n, model.config.hidden_size, device=dev)
    first: dict[int, int] = {}
    for j, r in enumerate(rows):
        first.setdefault(r.edit, j)
    for idx in length_batches([len(r.ids) for r in rows], batch_rows):
        sub = [rows[j] for j in idx]
        ids, mask = pad_ids([r.ids for r in sub], tok.pad_token_id, dev)
        with LayerHooks(model, capture=[out_layer], capture_inputs=[(key_layer, PROJ)], stop_after_capture=True) as hk:
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
        k_all, h_all = hk.captured_inputs[(key_layer, PROJ)], hk.captured[out_layer]
        for b, (j, r) in enumerate(zip(idx, sub)):
            w = 1.0 if weights is None else weights[j]
            keys[r.edit] += w * k_all[b, r.subj].float()
            counts[r.edit] += w
            if first[r.edit] == j:
                outs[r.edit] = h_all[b, r.subj].float()
    return keys / counts[:, None], outs


def key_weights(n_ctx: int, mode: str) -> list[float]:
    """Weights of one edit's rows (its plain prompt, then its ``n_ctx - 1`` prefixed forms) in its
    key (``MEMITConfig.key_weights``)."""
    if mode == "mean" or n_ctx == 1:
        return [1.0] * n_ctx
    if mode == "plain":
        return [1.0] + [0.0] * (n_ctx - 1)
    return [0.5] + [0.5 / (n_ctx - 1)] * (n_ctx - 1)  # "reference"


@torch.no_grad()
def layer_diagnostics(K: torch.Tensor, R: torch.Tensor, delta: torch.Tensor, W: torch.Tensor) -> dict[str, float]:
    """One band layer's update against its plan: ``residual_norm`` (mean ``||r_i||``, the change of the
    hidden state this layer is asked for), ``realised`` (mean over edits of the share of ``r_i`` the
    layer's own change ``Delta k_i`` delivers along it, ``<Delta k_i, r_i> / ||r_i||^2``),
    ``delta_norm`` and ``delta_rel`` (``||Delta|| / ||W||``) and ``edits_per_dim`` (edits per key dimension)."""
    got = K.double() @ delta.double().T  # [n, d_out]: the layer's output change at each edit's key
    share = (got * R.double()).sum(1) / R.double().pow(2).sum(1).clamp_min(1e-12)
    return {"residual_norm": float(R.norm(dim=1).mean()), "realised": float(share.mean()),
            "delta_norm": float(delta.norm()), "delta_rel": float(delta.norm() / W.float().norm()),
            "edits_per_dim": K.shape[0] / K.shape[1]}


@torch.no_grad()
def target_diagnostics(z: torch.Tensor, h0: torch.Tensor, h_end: torch.Tensor) -> dict[str, float]:
    """How far the band's updates moved the last band layer's output towards the targets:
    ``target_realised`` = mean over edits of ``1 - ||z_i - h_end_i|| / ||z_i - h0_i||`` (1: reached,
    0: not moved closer), with the mean distances before and after and the share of edits more than
    half-way."""
    before, after = (z - h0).norm(dim=1), (z - h_end).norm(dim=1)
    done = 1 - after / before.clamp_min(1e-12)
    return {"band": "end", "target_realised": float(done.mean()), "target_gap_before": float(before.mean()),
            "target_gap_after": float(after.mean()), "half_way": float((done > 0.5).float().mean())}


# edits per target optimisation (and per cache file). Their prefix keys/values (one stored row per
# distinct token prefix, bf16, 21 layers above layer 8) take 80 MB on CounterFact's first 500 and
# 149 MB on zsRE's, against 582 / 709 MB when every 64-row chunk kept its own left-padded copy
TARGET_CHUNK = 500


class MEMITEditor(WeightEditor):
    """MEMIT baseline behind the :class:`lks.LKSEditor` interface (``fit``, ``applied``, ``generate``,
    ``save``, ``load``). See the module docstring for the method."""

    method = "memit"
    label = "MEMIT"
    config_class = MEMITConfig
    shared_work = "key statistics"

    def prepare_shared(self, data_dir: str | None = None) -> None:
        cfg = self.config
        key_second_moment(self.model, self.tokenizer, list(cfg.layers), cfg.cov_tokens, corpus=cfg.corpus,
                          data_dir=data_dir, progress=False)

    def _solve(self, K: torch.Tensor, R: torch.Tensor, layer: int, C: torch.Tensor,
               prior: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The layer's update and what to log: the keys' mean leverage ``k_i^T (lam C + K^T K)^-1 k_i``
        (the share of its own residual an edit's key would realise if the other keys were orthogonal
        to it; it falls as the keys crowd the layer's input space). MEMIT has no sequential form
        here: ``prior`` must be None."""
        if prior is not None:
            raise ValueError("MEMIT edits one batch; earlier batches' keys are AlphaEdit's sequential term")
        A = self.config.lam * C.double() + K.double().T @ K.double()
        lev = (K.double() * torch.linalg.solve(A, K.double().T).T).sum(1)
        return memit_update(K, R, C, self.config.lam), {"leverage": float(lev.mean())}

    def _targets(self, edits: EditSet, layer: int, prefixes: Sequence[str], progress: bool,
                 after: str | None = None, chunk_lines: bool = True) -> torch.Tensor:
        """:func:`target_vectors`, :data:`TARGET_CHUNK` edits at a time, each chunk cached per (model,
        its edits, layer, target settings) under the lks cache directory: MEMIT and AlphaEdit with the
        same band share them, memory stays bounded, and an interrupted 10,000-edit fit resumes at the
        first chunk not yet cached. Each edit's target is optimised on its own rows only (the chunks
        change nothing but the batching: see :func:`target_vectors`). ``after``: the checksum of the
        edits already in the model's weights (a sequential fit), part of the cache key. ``chunk_lines``:
        log a line per chunk (a sequential fit's batch is one chunk and logs its own line)."""
        out, pace = [], ToGo(len(edits))
        for i in range(0, len(edits), TARGET_CHUNK):
            t, seen = time.perf_counter(), len(self.history)
            out.append(self._chunk_targets(EditSet(edits.records[i:i + TARGET_CHUNK]), layer, prefixes, progress, after))
            took = time.perf_counter() - t
            how = self.history[-1].get("targets", "optimised") if self.history else "optimised"
            line = pace.step(len(out[-1]), took, cached=how == "cached")
            work = target_work(self.history[seen:])
            if chunk_lines:
                log.info("target vectors of edits %d-%d of %d (%s%s, %.0f s; %s)", i + 1, i + len(out[-1]),
                         len(edits), how, f" in {work}" if work else "", took, line)
        return torch.cat(out)

    def _chunk_targets(self, edits: EditSet, layer: int, prefixes: Sequence[str], progress: bool,
                       after: str | None) -> torch.Tensor:
        from safetensors.torch import load_file

        keys = ("z_steps", "z_lr", "clamp", "kl_weight", "weight_decay", "n_prefixes", "prefix_tokens", "stop_nll",
                "precision", "stop_on", "decay_form", "prefixes", "kl_form", "batch_rows")
        # the thread count and the rows per pass are part of the key: bfloat16 sums round differently
        # on another number of threads or in other shapes, so targets cached by such a run would
        # differ in their last bits (issue 39)
        spec = {"edits": edits.checksum(), "layer": layer, "threads": torch.get_num_threads(),
                **{k: getattr(self.config, k) for k in keys}}
        if after is not None:
            spec["after"] = after
        path = self._cache_path("targets", spec)
        if path is not None and path.is_file():
            self.history.append({"targets": "cached", "path": str(path)})
            return load_file(str(path))["z"].to(model_device(self.model))
        z, _ = target_vectors(self.model, self.tokenizer, edits, self.config, layer, prefixes, progress, self.history)
        if path is not None:
            save_tensors(path, {"z": z.cpu()}, metadata={"spec": json.dumps(spec)})
        return z

    def _fit(self, edits: EditSet, progress: bool) -> dict[int, torch.Tensor]:
        cfg, model, tok = self.config, self.model, self.tokenizer
        stats = key_second_moment(model, tok, list(cfg.layers), cfg.cov_tokens, corpus=cfg.corpus, progress=progress)
        prefixes = context_prefixes(model, tok, cfg)
        z = self._targets(edits, cfg.layers[-1], prefixes, progress)
        deltas, _ = self._spread(edits, z, prefixes, stats)
        return deltas

    def _spread(self, edits: EditSet, z: torch.Tensor, prefixes: Sequence[str], stats: dict[int, torch.Tensor],
                prior: dict[int, torch.Tensor] | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Algorithm 1, lines 8-15: each band layer in turn solves for its share of the residual
        ``z - h`` (``h`` under the lower layers' updates so far). Returns the updates and each
        layer's keys ``[n, d_in]``; ``prior``: earlier batches' ``K^T K`` per layer (sequential AlphaEdit)."""
        cfg, model, tok = self.config, self.model, self.tokenizer
        band, last = list(cfg.layers), cfg.layers[-1]
        rows = _edit_rows(tok, edits, prefixes, with_target=False)
        weights = key_weights(len(prefixes), cfg.key_weights) * len(edits)
        deltas: dict[int, torch.Tensor] = {}
        keys: dict[int, torch.Tensor] = {}
        for j, layer in enumerate(band):
            with added_weights(model, deltas):  # the updates of the lower band layers so far
                K, h = keys_and_outputs(model, tok, rows, len(edits), layer, last, cfg.batch_rows, weights)
            if j == 0:
                h0 = h  # the last band layer's output before any update
            R = (z - h) / (len(band) - j)   # residual spread over the layers left (Algorithm 1)
            W = down_proj(model, layer).weight
            delta, info = self._solve(K, R, layer, stats[layer].to(K.device), None if prior is None else prior[layer])
            deltas[layer], keys[layer] = delta.to(W.dtype), K
            self.history.append({"layer": layer, **layer_diagnostics(K, R, delta, W), **info})
        with added_weights(model, deltas):
            _, h_end = keys_and_outputs(model, tok, rows, len(edits), band[0], last, cfg.batch_rows, weights)
        self.history.append(target_diagnostics(z, h0, h_end))
        return deltas, keys

