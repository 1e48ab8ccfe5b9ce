"""New-knowledge-block generators (hypernetworks).

A generator maps a *feature* vector ``f`` (the layer-L hidden state of the edit statement's last
token, ``[n, d]``) to a new knowledge block (KB) for the edited subject. It is split in two parts
so inference with 10,000 edits is a table lookup:

* ``table(f) -> [n, d]`` - everything that depends on the feature only; computed once per subject
  after training and stored.
* ``additive`` - whether the KB replacer writes ``table_row`` (the paper's ``linear`` and ``mlp``)
  or ``original_kb + table_row`` (``residual``) at the subject's last token.

Kinds:
    linear   ``KB' = W f + b`` (d -> d), the paper's default.
    mlp      ``KB' = W2 GELU(W1 f + b1) + b2`` (d -> r*d -> d), the paper's alternative.
    residual ``KB' = KB + W f + b`` with ``W, b`` initialised to zero, so an untrained editor
             changes nothing and training only has to learn the *change* of the block. On the
             embedded model this held locality higher at equal reliability (README, Hyperparameters).
    residual_mlp ``KB' = KB + W2 GELU(W1 f + b1) + b2`` (d -> r*d -> d) with ``W2, b2``
             initialised to zero: the residual form with the MLP's capacity (a d x d map cannot
             give thousands of subjects each their own change of the block).
"""

from __future__ import annotations

import torch
from torch import nn

from lks.config import GENERATOR_KINDS


class KBGenerator(nn.Module):
    """Base class: ``forward(feature, original_kb) -> new_kb`` via ``table`` and ``additive``."""

    additive: bool = False
    kind: str = ""

    def table(self, feature: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, d]
        raise NotImplementedError

    def forward(self, feature: torch.Tensor, original_kb: torch.Tensor | None = None) -> torch.Tensor:
        out = self.table(feature)
        if self.additive:
            if original_kb is None:
                raise ValueError(f"the {self.kind} generator needs the original knowledge block")
            out = original_kb.to(out.dtype) + out
        return out


class LinearGenerator(KBGenerator):
    kind = "linear"

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def table(self, feature: torch.Tensor) -> torch.Tensor:
        return self.proj(feature)


class MLPGenerator(KBGenerator):
    kind = "mlp"

    def __init__(self, d: int, ratio: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d))

    def table(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature)


class ResidualGenerator(KBGenerator):
    kind = "residual"
    additive = True

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        nn.init.zeros_(self.proj.weight)  # untrained editor == unedited model
        nn.init.zeros_(self.proj.bias)

    def table(self, feature: torch.Tensor) -> torch.Tensor:
        return self.proj(feature)


class ResidualMLPGenerator(MLPGenerator):
    kind = "residual_mlp"
    additive = True

    def __init__(self, d: int, ratio: int = 4) -> None:
        super().__init__(d, ratio)
        nn.init.zeros_(self.net[2].weight)  # untrained editor == unedited model (W1 still random,
        nn.init.zeros_(self.net[2].bias)    # so W2's first gradients are not zero)


def make_generator(kind: str, d: int, mlp_ratio: int = 4) -> KBGenerator:
    """Build a generator by name: ``"linear"``, ``"mlp"``, ``"residual"`` or ``"residual_mlp"``."""
    if kind == "linear":
        return LinearGenerator(d)
    if kind == "mlp":
        return MLPGenerator(d, mlp_ratio)
    if kind == "residual":
        return ResidualGenerator(d)
    if kind == "residual_mlp":
        return ResidualMLPGenerator(d, mlp_ratio)
    raise ValueError(f"unknown generator kind {kind!r}; choose one of {list(GENERATOR_KINDS)}")
