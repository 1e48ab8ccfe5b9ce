"""RMSNorm for training steps: the forward of Llama's own, a backward that keeps one input copy.

Llama's ``RMSNorm`` (Mistral's is the same) computes ``w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)``
with ``x32 = x.float()``. Built from autograd ops in a bfloat16 pass it keeps, per norm, a float32
copy of ``x`` and the bfloat16 normed rows until the backward: 6 bytes per element, where the
layer's own saved tensors are bfloat16. A training step runs two norms per upper layer plus the
final one (19 for the embedded model at layer 20), and they were the step's largest saved
tensors (a step's memory profile, 200 zsRE edits: ``aten::pow``/``aten::mul`` on ``[72, 24, 576]``
float32, 144 MB each over the step). Here the forward runs the same ops (same bits) and keeps
only ``x`` (in its dtype) and the ``[rows, 1]`` float32 scale; the backward is written down:

``n = x32 * r``, ``r = (mean(x32^2) + eps)^-1/2``, ``g_n = (g * w).float()``:
``dx = r * (g_n - n * mean(g_n * n))`` (cast to ``x``'s dtype), ``dw = sum over rows of g * n``.

``tests/test_models_hooks.py`` checks the forward bit for bit and both gradients against autograd
through the module itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# norms whose forward is exactly the one above (checked by the tests on the class itself)
SAME_FORWARD = ("LlamaRMSNorm", "MistralRMSNorm")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[override]
        x32 = x.to(torch.float32)
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (x32 * r).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, r = ctx.saved_tensors
        n = x.to(torch.float32) * r
        dw = (g * n.to(x.dtype)).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        g_n = (g * weight).to(torch.float32)
        dx = r * (g_n - n * (g_n * n).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, None


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` (a :data:`SAME_FORWARD` module) through the lean backward."""
    return _RMSNorm.apply(x, norm.weight, norm.variance_epsilon)


@contextmanager
def lean_norms(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside the block, the :data:`SAME_FORWARD` norms among ``modules`` run :func:`rms_norm`;
    other modules are left as they are."""
    swapped = [m for m in modules if type(m).__name__ in SAME_FORWARD and "forward" not in vars(m)]
    try:
        for m in swapped:
            m.forward = lambda x, m=m: rms_norm(m, x)
        yield
    finally:
        for m in swapped:
            del m.forward
