"""CPU tuning of the fast path, in one place: the fit's precision and padded step shapes.

Nothing here changes what training computes beyond floating-point rounding; each knob was kept
because a benchmark showed it pays (``benchmarks/README.md``):

* ``TrainConfig.precision`` ``"bfloat16"`` (or ``"auto"`` on a CPU with AMX / AVX-512-BF16, or a
  bf16 GPU): the frozen model's passes of a fit hold bfloat16 weights (restored bit for bit on
  exit; :meth:`lks.training.fastpath.FastPath.lower_pass` / ``upper_pass``); losses stay float32.
  ~1.9x faster steps on AMX.
* shape quantisation (``SHAPE_QUANTA``): oneDNN builds and caches a kernel per distinct matmul
  shape in bfloat16 on CPU; padding rows and tokens to a few quanta keeps it hitting that cache.
* heap trims (``TRIM_EVERY``): the length-sorted precompute fragments glibc's heap
  (``lks.utils.release_memory``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lks.models import model_device
from lks.utils import resolve_precision

# Padding quanta of the fast path's shapes: (batch rows, suffix tokens, prefix tokens, logit rows).
# oneDNN (bf16 on CPU) builds and caches a primitive per distinct matmul shape; a new shape costs
# ~3x a cached one, and its cache holds 1,024, so unquantised step shapes (a new row count almost
# every step at 1,000+ edits) keep missing it. Padding costs a few % more FLOPs (benchmarks/); in
# float32 (no per-shape kernels) that is all it does, so FastPath pads only bf16 on CPU by default.
SHAPE_QUANTA = (8, 2, 4, 32)
HEAD_CHUNK = 64     # loss rows per output-layer chunk in training (lks.headloss); 64, 128 and 256 timed alike
TRIM_EVERY = 4      # precompute batches between two heap trims (lks.utils.release_memory)


def round_up(n: int, q: int) -> int:
    return -(-n // q) * q


def quantized_shape(rows: int, suffix: int, prefix: int, quanta: Sequence[int] | None = None) -> tuple[int, int, int]:
    """A block's (rows, suffix tokens, prefix tokens) padded up to ``quanta`` (default ``SHAPE_QUANTA``)."""
    q = SHAPE_QUANTA if quanta is None else quanta
    return round_up(rows, q[0]), round_up(suffix, q[1]), round_up(prefix, q[2])


def pads_shapes(weight: torch.Tensor, forced: bool | None = None) -> bool:
    """Whether a pass with weights like ``weight`` pads its shapes (``forced`` overrides)."""
    if forced is not None:
        return forced
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu"


def logit_quantum(weight: torch.Tensor, forced: bool | None = None) -> int:
    """Logit rows are padded to a multiple of this (0: not padded)."""
    return SHAPE_QUANTA[3] if pads_shapes(weight, forced) else 0


def precision_used(model: torch.nn.Module, precision: str) -> str:
    """``TrainConfig.precision`` as a fit on ``model`` resolves it: a model loaded in bfloat16 or
    float16 already runs in half precision and is left as it is."""
    model_dtype = next(model.parameters()).dtype
    if model_dtype != torch.float32:
        return str(model_dtype).replace("torch.", "")
    return resolve_precision(precision, model_device(model))


def fit_dtype(model: torch.nn.Module, precision: str) -> torch.dtype | None:
    """bfloat16 when the fit's precision asks for it and the model is float32, else None."""
    return torch.bfloat16 if precision_used(model, precision) == "bfloat16" and \
        next(model.parameters()).dtype == torch.float32 else None
