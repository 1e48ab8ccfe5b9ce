"""AlphaEdit (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
Models", ICLR 2025).

Same target vectors and spread over the layer band as MEMIT (:mod:`lks.baselines.memit`); the
per-layer update is projected onto the null space of the preserved knowledge's keys:

* **Projector** (§3.1, eq. 6-8): eigendecomposition ``E[k k^T] = U Lambda U^T`` of the keys' second
  moment over the corpus (:mod:`lks.baselines.stats`); ``U_hat`` = the eigenvectors whose
  eigenvalue is below ``threshold``; ``P = U_hat U_hat^T``. Then ``P K0 ~ 0`` for the preserved
  keys ``K0``, so any update of the form ``Delta P`` leaves their outputs unchanged.
* **Update** (§3.2, eq. 13-14, the closed form of
  ``min ||(W + Delta P) K1 - V1||^2 + alpha ||Delta P||^2``): ``Delta_P = R K1^T P (K1 K1^T P +
  alpha I)^-1``. Because ``Delta_P (K1 K1^T P + alpha I) = R K1^T P`` implies ``Delta_P (I - P) = 0``,
  this ``Delta_P`` already equals ``Delta_P P`` and is added to ``W`` as is.

This is the single-batch form: the paper's sequential-editing term ``K_p K_p^T`` (keys of earlier
batches of edits) is left out, since every fit here edits one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lks.baselines.memit import MEMITConfig, MEMITEditor


@dataclass
class AlphaEditConfig(MEMITConfig):
    """MEMIT's settings (``lam`` unused) plus the null-space threshold and the L2 weight."""

    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    threshold: float = 1e-2      # eigenvalues of E[k k^T] below this span the null space
    alpha: float = 1.0           # weight of ||Delta P||^2 (the paper's identity term)


def null_space_projector(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """``P = U_hat U_hat^T`` from the eigenvectors of ``C`` (symmetric) with eigenvalue below
    ``threshold`` ``[d, d]`` (eq. 8)."""
    evals, evecs = torch.linalg.eigh(C.double())
    U = evecs[:, evals < threshold]
    return (U @ U.T).float()


def alphaedit_update(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``Delta_P = R^T K P (P K^T K + alpha I)^-1`` ``[d_out, d_in]`` (eq. 14, keys ``K`` ``[n, d_in]``
    and residuals ``R`` ``[n, d_out]`` as rows). Transposed, it solves
    ``(P K^T K + alpha I) X = P K^T R`` (``P`` symmetric); float64."""
    Kd, Pd = K.double(), P.double()
    A = Pd @ Kd.T @ Kd + alpha * torch.eye(Pd.shape[0], dtype=torch.float64, device=Pd.device)
    return torch.linalg.solve(A, Pd @ Kd.T @ R.double()).T.float()


class AlphaEditEditor(MEMITEditor):
    """AlphaEdit baseline: MEMIT with the null-space-projected update (module docstring)."""

    method = "alphaedit"
    label = "AlphaEdit"
    config_class = AlphaEditConfig

    def _solve(self, K: torch.Tensor, R: torch.Tensor, layer: int, C: torch.Tensor) -> torch.Tensor:
        P = null_space_projector(C, self.config.threshold)
        self.history.append({"layer": layer, "null_space_dim": int(round(float(torch.trace(P))))})
        return alphaedit_update(K, R, P, self.config.alpha)
