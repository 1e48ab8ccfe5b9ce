"""The losses of one training step (the paper's edit, equivalence and locality losses, plus the
KL after the target and the gate loss of the ``gated`` generator)."""

from __future__ import annotations

from typing import Any

import torch

from lks.config import TrainConfig
from lks.headloss import head_nll, head_topk_kl
from lks.hypernet import KBGenerator
from lks.training.fastpath import Cache, FastPath, step_blocks
from lks.training.gate import GateExamples, gate_loss
from lks.training.precision import HEAD_CHUNK
from lks.training.sequences import KIND_EDIT, KIND_EQUIV, KIND_LOC, Seq
from lks.utils import take_rows


class RowsOf:
    """Generated blocks of some subjects, indexable by global subject id like the full table."""

    def __init__(self, rows: torch.Tensor, subjects: list[int]) -> None:
        self.rows = rows
        self.subjects = subjects
        self.where = {s: i for i, s in enumerate(subjects)}

    def __getitem__(self, subj: torch.Tensor) -> torch.Tensor:
        index = torch.tensor([self.where[int(s)] for s in subj.tolist()], device=self.rows.device)
        return take_rows(self.rows, index)  # subjects repeat: a deterministic backward


def subject_table(generator: KBGenerator, features: torch.Tensor, seqs: list[Seq], batch: list[int]) -> RowsOf:
    """The generated blocks of the subjects of ``batch`` only, indexable by subject id."""
    subjects = sorted({seqs[j].subject for j in batch})
    return RowsOf(generator.table(features[torch.tensor(subjects, device=features.device)]), subjects)


def loss_rows(seqs: list[Seq], batch: list[int], cache: Cache) -> tuple[list[int], ...]:
    """Where the losses of ``batch`` (in this order) read the upper pass's rows: the NLL rows with
    their target tokens, sequence and the sequences' kinds; the KL rows with their reference rows
    and whether each is a locality row. The NLL and KL rows go through the output layer separately."""
    at, kl_rows, kl_ref, kl_loc = 0, [], [], []
    nll_rows, nll_tgt, nll_seq, seq_kind = [], [], [], []
    for j in batch:
        s, n, n_nll = seqs[j], len(seqs[j].loss_pos), len(seqs[j].loss_tgt)
        if n_nll:
            nll_rows.extend(range(at, at + n_nll))
            nll_tgt.extend(s.loss_tgt)
            nll_seq.extend([len(seq_kind)] * n_nll)
            seq_kind.append(s.kind)
        if n > n_nll:  # locality KL, or the KL after the target (TrainConfig.w_after)
            kl_rows.extend(range(at + n_nll, at + n))
            kl_ref.extend(range(cache.ref_row[j], cache.ref_row[j] + n - n_nll))
            kl_loc.extend([s.kind == KIND_LOC] * (n - n_nll))
        at += n
    return nll_rows, nll_tgt, nll_seq, seq_kind, kl_rows, kl_ref, kl_loc


def loss_counts(seqs: list[Seq], batch: list[int], cache: Cache) -> dict[str, int]:
    """What each loss of ``batch`` averages over: ``edit`` and ``equiv`` are means over their
    sequences (each of the NLL over its target tokens), ``loc`` and ``after`` over their KL rows
    (read from :func:`loss_rows`, which :func:`block_losses` reads too). Known before any pass, so
    that a step can run its blocks one at a time and still take the batch's means."""
    _, _, _, seq_kind, _, _, kl_loc = loss_rows(seqs, batch, cache)
    n_loc = sum(kl_loc)
    return {"edit": seq_kind.count(KIND_EDIT), "equiv": seq_kind.count(KIND_EQUIV),
            "loc": n_loc, "after": len(kl_loc) - n_loc}


def block_losses(fast: FastPath, hidden: torch.Tensor, cache: Cache, seqs: list[Seq], block: list[int],
                 counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """The share of the block ``block`` (upper-pass rows ``hidden``) in each of the batch's mean
    losses (``counts``: :func:`loss_counts`); a loss none of its rows feed is left out."""
    nll_rows, nll_tgt, nll_seq, seq_kind, kl_rows, kl_ref, kl_loc = loss_rows(seqs, block, cache)
    dev = hidden.device
    # output layer + loss fused (lks.headloss): vocabulary-sized logits only HEAD_CHUNK rows at
    # a time, their gradient taken in closed form; only [rows, d] is kept for the backward
    weight, bias = fast.head()
    head_kw: dict[str, Any] = {"chunk": HEAD_CHUNK, "pad": fast.logit_quantum()}
    part: dict[str, torch.Tensor] = {}
    if nll_rows:
        tok_nll = head_nll(hidden[torch.tensor(nll_rows, device=dev)], weight, bias,
                           torch.tensor(nll_tgt, device=dev), **head_kw)
        seq_idx = torch.tensor(nll_seq, device=dev)
        per_seq = torch.zeros(len(seq_kind), device=dev).index_add(0, seq_idx, tok_nll)
        per_seq = per_seq / torch.bincount(seq_idx, minlength=len(seq_kind)).clamp_min(1)  # mean over tokens
        kinds = torch.tensor(seq_kind, device=dev)
        for name, kind in (("edit", KIND_EDIT), ("equiv", KIND_EQUIV)):
            sel = kinds == kind
            if bool(sel.any()):
                part[name] = per_seq[sel].sum() / counts[name]
    if kl_rows:
        ref = torch.tensor(kl_ref)
        kl = head_topk_kl(hidden[torch.tensor(kl_rows, device=dev)], weight, bias, cache.ref_logp[ref].to(dev),
                          cache.ref_idx[ref].to(dev).long(), cache.ref_tail[ref].to(dev), **head_kw)
        is_loc = torch.tensor(kl_loc, device=dev)
        for name, sel in (("loc", is_loc), ("after", ~is_loc)):
            if bool(sel.any()):
                part[name] = kl[sel].sum() / counts[name]
    return part


def weighted_total(losses: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """``total``: the losses present in ``losses``, each times its weight in ``cfg``."""
    w = {"edit": cfg.w_edit, "equiv": cfg.w_equiv, "loc": cfg.w_loc, "after": cfg.w_after, "gate": cfg.w_gate}
    zero = torch.zeros((), device=next(iter(losses.values())).device) if losses else torch.zeros(())
    return sum((w[k] * v for k, v in losses.items() if k in w), zero)


def batch_loss(fast: FastPath, generator: KBGenerator, features: torch.Tensor, cache: Cache, seqs: list[Seq],
               batch: list[int], cfg: TrainConfig, gate: GateExamples | None = None,
               backward: bool = False) -> dict[str, torch.Tensor]:
    """Losses of one step on the sequences ``batch``: ``edit``, ``equiv`` (mean NLL of the target
    per sequence), ``loc`` (KL unedited || edited on locality prompts), ``after`` (the same KL after
    the target), ``gate`` and their weighted ``total``.

    With ``backward`` the gradient of ``total`` is added to the generator's parameters' ``.grad``
    one block at a time (only one block's activations alive at once: a step's peak memory is its
    largest block's, not the sum of its blocks') and the losses come back detached; the gradient is
    the one ``batch_loss(...)["total"].backward()`` gives, up to the order of float additions."""
    # generated blocks of this batch's subjects only: the whole table would cost a d x d
    # product per subject per step (at 10,000 subjects more than the rest of the step)
    table = subject_table(generator, features, seqs, batch)
    # blocks read a leaf copy of the table when they backpropagate on their own: each block's
    # backward stops there, and the table's own graph runs once at the end with their sum
    read = RowsOf(table.rows.detach().requires_grad_(), table.subjects) if backward else table
    # the batch's sequences (edit, rephrase, locality prompts of different lengths) run through
    # the upper layers in up to LENGTH_BUCKETS blocks, each padded only to its own longest
    # sequence; the losses are means, so the order of the rows does not matter
    counts = loss_counts(seqs, batch, cache)
    losses: dict[str, torch.Tensor] = {}
    for block in step_blocks(seqs, batch, cache.prefix is not None):
        hidden = fast.upper_hidden(cache, seqs, block, read, generator.combine)
        part = block_losses(fast, hidden, cache, seqs, block, counts)
        if backward:
            share = weighted_total(part, cfg)
            if share.requires_grad:
                share.backward()
            part = {k: v.detach() for k, v in part.items()}
        for k, v in part.items():
            losses[k] = losses[k] + v if k in losses else v
    zero = torch.zeros((), device=features.device)
    for k in ("edit", "equiv", "loc", "after"):
        losses.setdefault(k, zero)
    losses["gate"] = gate_loss(generator, cache, seqs, batch, table, gate, fast.d) if gate is not None else zero
    losses["total"] = weighted_total(losses, cfg)
    if backward:
        rest = cfg.w_gate * losses["gate"]
        if read.rows.grad is not None:  # the blocks' gradient at the table, through the generator
            rest = rest + (table.rows * read.rows.grad).sum()
        if rest.requires_grad:
            rest.backward()
        losses = {k: v.detach() for k, v in losses.items()}
    return losses


def topk_kl(ref_logp: torch.Tensor, ref_idx: torch.Tensor, ref_tail: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(reference || edited) over rows, with the reference kept as top-k + one tail bucket.

    The reference distribution is coarse-grained to its top-k tokens plus one bucket holding the
    rest of the mass; the edited distribution is coarse-grained the same way. This is the exact KL
    between the two coarse-grained distributions (a lower bound of the full KL, equal to it when
    k = vocab size), and needs ``k`` floats per position instead of the whole vocabulary. Training
    computes the same quantity fused with the output layer (:func:`lks.headloss.head_topk_kl`);
    this plain form is its test oracle.

    Args:
        ref_logp: ``[n, k]`` reference log-probs of its top-k tokens.
        ref_idx: ``[n, k]`` those token ids.
        ref_tail: ``[n]`` log of the reference's remaining mass (``-inf`` when k = vocab).
        logits: ``[n, vocab]`` edited logits.
    """
    logits = logits.float()
    # no [n, vocab] log-softmax: one logsumexp over the vocabulary, the rest on [n, k]. The edited
    # tail is log(1 - top-k mass), via expm1 (accurate until the tail falls below ~1e-6, where its
    # KL term is negligible), floored at 1e-12 so that a vanishing tail stays finite
    lq_top = logits.gather(-1, ref_idx) - logits.logsumexp(-1, keepdim=True)
    lq_tail = torch.log((-torch.expm1(lq_top.logsumexp(-1))).clamp_min(1e-12))
    p_top, p_tail = ref_logp.exp(), ref_tail.exp()
    kl = (p_top * (ref_logp - lq_top)).sum(-1)
    kl = kl + torch.where(p_tail > 0, p_tail * (ref_tail - lq_tail), torch.zeros_like(p_tail))
    return kl.mean()
