"""Fused output layer + loss for training: per-row losses whose gradient is computed in the forward.

A training step reads logits over the whole vocabulary (49,152 tokens for SmolLM2) at every loss
position. Built from autograd ops, each loss makes many vocabulary-sized passes (a float copy,
logsumexp, gather, and in the backward: the softmax recomputed, a zero-filled scatter, a cast
back) and keeps ``[rows, vocab]`` tensors alive until the backward. Here the logits of ``chunk``
rows at a time go through one log-softmax and a few in-place passes; the gradient with respect to
the logits is written down in closed form and turned at once into the gradient with respect to
the hidden rows (``[rows, d]``, the only thing kept for the backward). Same losses, same gradients
(``tests/test_editor.py`` checks both against autograd through :func:`lks.training.losses.topk_kl` and
``F.cross_entropy``). Measured (``benchmarks/bench_head.py``, registered recipe, 1,000 CounterFact
edits, 2 threads): a training step 1.13x faster than with the autograd losses.

Gradients (``Q = softmax(z)``, ``K`` the reference's top-k token ids, ``P`` its probabilities):

* token NLL ``lse(z) - z_t``: ``dz = Q - onehot(t)``.
* coarse-grained KL ``sum_K P_k (log P_k - log Q_k) + P_tail (log P_tail - log Q_tail)`` with
  ``Q_tail = 1 - S``, ``S = sum_K Q_k``: ``dz_j = Q_j (sum_K P - c S) + [j in K] (c Q_j - P_j)``,
  ``c = P_tail / Q_tail`` (0 where the tail term is 0 or ``Q_tail`` is floored, as in ``topk_kl``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TAIL_FLOOR = 1e-12  # lks.training.losses.topk_kl floors the edited tail mass here


def pad_rows(rows: torch.Tensor, multiple: int) -> torch.Tensor:
    """``rows`` ``[n, d]`` with zero rows appended up to a multiple of ``multiple`` (0: unchanged)."""
    extra = (-rows.shape[0]) % multiple if multiple else 0
    return torch.cat([rows, rows.new_zeros(extra, rows.shape[1])]) if extra else rows


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk, pad, target, ref_logp, ref_idx, ref_tail):  # type: ignore[override]
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad = torch.empty(n, weight.shape[1], dtype=torch.float32, device=hidden.device)
        for a in range(0, n, chunk):
            h = hidden[a:a + chunk].to(weight.dtype)
            m = h.shape[0]
            h = pad_rows(h, pad)  # both matmuls take few distinct shapes (oneDNN builds a kernel per shape)
            dz = torch.log_softmax(F.linear(h, weight, bias), -1, dtype=torch.float32)  # [rows, vocab]
            live = dz[:m]  # the real rows (a view): log-probs, then (after exp_) their gradient
            if target is not None:  # token NLL
                t = target[a:a + m, None]
                loss[a:a + m] = -live.gather(-1, t)[:, 0]
                dz.exp_()
                live.scatter_add_(-1, t, torch.full_like(t, -1.0, dtype=dz.dtype))
            else:  # coarse-grained KL(reference || edited)
                lp, idx, lp_tail = ref_logp[a:a + m], ref_idx[a:a + m], ref_tail[a:a + m]
                lq_top = live.gather(-1, idx)
                q_tail = -torch.expm1(lq_top.logsumexp(-1))
                lq_tail = torch.log(q_tail.clamp_min(TAIL_FLOOR))
                p_top, p_tail = lp.exp(), lp_tail.exp()
                has_tail = p_tail > 0
                kl = (p_top * (lp - lq_top)).sum(-1)
                loss[a:a + m] = kl + torch.where(has_tail, p_tail * (lp_tail - lq_tail), torch.zeros_like(p_tail))
                c = torch.where(has_tail & (q_tail > TAIL_FLOOR), p_tail / q_tail, torch.zeros_like(p_tail))
                q_top = lq_top.exp()
                dz.exp_()
                live.mul_((p_top.sum(-1) - c * (1.0 - q_tail))[:, None])
                live.scatter_add_(-1, idx, c[:, None] * q_top - p_top)
            grad[a:a + m] = (dz.to(weight.dtype) @ weight)[:m]  # (padding rows' results dropped)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss[:, None]).to(ctx.hidden_dtype), None, None, None, None, None, None, None, None


def head_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
             chunk: int = 64, pad: int = 0) -> torch.Tensor:
    """Per-row ``-log softmax(hidden @ weight.T + bias)[target]``, ``[n]`` float32.

    Equal to ``F.cross_entropy(F.linear(hidden, weight, bias).float(), target, reduction="none")``
    with gradients to ``hidden`` only (``weight`` and ``bias`` are treated as constants).
    ``chunk`` rows at a time; ``pad`` > 0 pads each chunk with zero rows to a multiple of ``pad``.
    """
    return _HeadLoss.apply(hidden, weight, bias, chunk, pad, target, None, None, None)


def head_topk_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ref_logp: torch.Tensor,
                 ref_idx: torch.Tensor, ref_tail: torch.Tensor, chunk: int = 64, pad: int = 0) -> torch.Tensor:
    """Per-row coarse-grained KL(reference || edited) of :func:`lks.training.losses.topk_kl` (which returns
    the mean of these), with the edited logits ``hidden @ weight.T + bias``; ``[n]`` float32."""
    return _HeadLoss.apply(hidden, weight, bias, chunk, pad, None, ref_logp.float(), ref_idx, ref_tail.float())
