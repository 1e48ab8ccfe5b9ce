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
             embedded model this held locality higher at equal reliability (docs/experiments.md).
    residual_mlp ``KB' = KB + W2 GELU(W1 f + b1) + b2`` (d -> r*d -> d) with ``W2, b2``
             initialised to zero: the residual form with the MLP's capacity (a d x d map cannot
             give thousands of subjects each their own change of the block).
    gated    ``KB' = KB + sigmoid(k . LN(KB) / sqrt(d) + c) * delta``: ``delta`` as in residual_mlp,
             and ``(k, c)`` from a second MLP of the feature (d -> r*d -> d + 1); table rows are
             ``[delta, k, c]``. Residual_mlp's change, opened or closed by the *context* of the
             block: at the subject's last token, layer L has already read the words before the
             subject ("What is the occupation of ..."), so the gate can tell the edited relation
             from another one of the same subject. Not in the paper. The gate MLP's last layer
             starts at zero and ``c`` at 3 (gate 0.95), so it starts as residual_mlp with a
             slightly smaller step. Training adds a classification loss on the gate
             (``TrainConfig.w_gate``): open on the edit and paraphrase prompts, closed on the
             subject's locality prompts; without it the locality loss can close the gate
             everywhere ("no edit"). The embedded model's registered recipe.

Every kind applies its table rows through ``combine(original_kb, rows)``, the one function that
the KB replacer (:mod:`lks.hooks`) and the fast training path call.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lks.config import GENERATOR_KINDS


class KBGenerator(nn.Module):
    """Base class: ``forward(feature, original_kb) -> new_kb`` via ``table`` and ``additive``."""

    additive: bool = False
    has_gate: bool = False  # "gated": gate_logit(original_kb, gate_rows), trained by the editor's gate loss
    kind: str = ""

    def table(self, feature: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, d]
        raise NotImplementedError

    def combine(self, original_kb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """New blocks ``[n, d]`` (dtype of ``original_kb``) from the original blocks and table rows."""
        rows = rows.to(device=original_kb.device, dtype=original_kb.dtype)
        return original_kb + rows if self.additive else rows

    def forward(self, feature: torch.Tensor, original_kb: torch.Tensor | None = None) -> torch.Tensor:
        out = self.table(feature)
        if self.additive:
            if original_kb is None:
                raise ValueError(f"the {self.kind} generator needs the original knowledge block")
            out = self.combine(original_kb.to(out.dtype), out)
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


class GatedGenerator(KBGenerator):
    kind = "gated"
    additive = True  # needs the original block
    has_gate = True

    def __init__(self, d: int, ratio: int = 4) -> None:
        super().__init__()
        self.d = d
        self.net = nn.Sequential(nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d))  # delta, as residual_mlp
        self.gate = nn.Sequential(nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d + 1))  # key k, bias c
        for lin in (self.net[2], self.gate[2]):  # untrained editor == unedited model, gate open
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        with torch.no_grad():
            self.gate[2].bias[-1] = 3.0

    def table(self, feature: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, 2d + 1]: delta, k, c
        return torch.cat([self.net(feature), self.gate(feature)], dim=-1)

    def gate_logit(self, original_kb: torch.Tensor, gate_rows: torch.Tensor) -> torch.Tensor:
        """``[n]`` logits of the gate, ``k . LN(KB) / sqrt(d) + c`` (float32), from the blocks and
        the gate part ``[k, c]`` of the table rows (``rows[:, d:]``, or ``self.gate(feature)``)."""
        d = self.d
        kb, gate_rows = F.layer_norm(original_kb.float(), (d,)), gate_rows.to(original_kb.device).float()
        return (kb * gate_rows[:, :d]).sum(-1) / d ** 0.5 + gate_rows[:, d]

    def combine(self, original_kb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate_logit(original_kb, rows[:, self.d:]))[:, None]
        delta = rows[:, :self.d].to(original_kb.device).float()
        return (original_kb.float() + gate * delta).to(original_kb.dtype)


def make_generator(kind: str, d: int, mlp_ratio: int = 4) -> KBGenerator:
    """Build a generator by name: ``"linear"``, ``"mlp"``, ``"residual"``, ``"residual_mlp"`` or ``"gated"``."""
    if kind == "linear":
        return LinearGenerator(d)
    if kind == "mlp":
        return MLPGenerator(d, mlp_ratio)
    if kind == "residual":
        return ResidualGenerator(d)
    if kind == "residual_mlp":
        return ResidualMLPGenerator(d, mlp_ratio)
    if kind == "gated":
        return GatedGenerator(d, mlp_ratio)
    raise ValueError(f"unknown generator kind {kind!r}; choose one of {list(GENERATOR_KINDS)}")
