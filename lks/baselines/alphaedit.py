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

* **Sequential editing** (§3.3, eq. 15; :class:`AlphaEditSeqEditor`, method ``alphaedit-seq``): the
  edits arrive in batches (the paper's experiments: 100 edits each); each batch's targets are
  optimised on the model as the earlier batches left it, and its update also keeps the earlier
  batches' edits: ``Delta_P = R K1^T P (K1 K1^T P + Kp Kp^T P + alpha I)^-1`` with ``Kp`` the keys of
  every earlier batch at that layer. ``alphaedit`` is the single-batch form (``Kp`` empty).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lks.baselines.common import added_weights, down_proj
from lks.baselines.memit import MEMITConfig, MEMITEditor, context_prefixes, target_work
from lks.baselines.stats import key_second_moment
from lks.data import EditSet
from lks.progress import ToGo

log = logging.getLogger(__name__)


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


def alphaedit_update(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, alpha: float = 1.0,
                     prior: torch.Tensor | None = None) -> torch.Tensor:
    """``Delta_P = R^T K P (P (K^T K + prior) + alpha I)^-1`` ``[d_out, d_in]`` (eq. 14, and eq. 15
    with ``prior = Kp^T Kp``, the earlier batches' keys; keys ``K`` ``[n, d_in]`` and residuals ``R``
    ``[n, d_out]`` as rows). Transposed, it solves ``(P (K^T K + prior) + alpha I) X = P K^T R``
    (``P`` symmetric); float64."""
    Kd, Pd = K.double(), P.double()
    M = Kd.T @ Kd if prior is None else Kd.T @ Kd + prior.double()
    A = Pd @ M + alpha * torch.eye(Pd.shape[0], dtype=torch.float64, device=Pd.device)
    return torch.linalg.solve(A, Pd @ Kd.T @ R.double()).T.float()


class AlphaEditEditor(MEMITEditor):
    """AlphaEdit baseline: MEMIT with the null-space-projected update (module docstring)."""

    method = "alphaedit"
    label = "AlphaEdit"
    config_class = AlphaEditConfig
    runs_after = "memit"  # MEMIT's cached target vectors, where the target settings agree

    def _solve(self, K: torch.Tensor, R: torch.Tensor, layer: int, C: torch.Tensor,
               prior: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        P = self._projector(layer, C)
        return alphaedit_update(K, R, P, self.config.alpha, prior), {"null_space_dim": int(round(float(torch.trace(P))))}

    def _projector(self, layer: int, C: torch.Tensor) -> torch.Tensor:
        """:func:`null_space_projector` of a layer's statistics, computed once per (layer, threshold):
        a sequential fit solves every band layer once per batch (500 eigendecompositions of
        ``[d_in, d_in]`` at 10,000 edits otherwise)."""
        cache = self.__dict__.setdefault("_projectors", {})
        # the statistics are fixed by the editor's model and these settings (lks.baselines.stats)
        key = (layer, self.config.threshold, self.config.cov_tokens, str(self.config.corpus))
        if key not in cache:
            cache[key] = null_space_projector(C, self.config.threshold)
        return cache[key]


@dataclass
class AlphaEditSeqConfig(AlphaEditConfig):
    """AlphaEdit's settings plus the size of each sequential batch."""

    batch_edits: int = 100       # edits per batch (AlphaEdit's sequential experiments: 100)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_edits <= 0:
            raise ValueError(f"batch_edits must be positive, got {self.batch_edits}")


class AlphaEditSeqEditor(AlphaEditEditor):
    """Sequential AlphaEdit (module docstring): ``batch_edits`` edits at a time, each batch's targets
    and keys under the earlier batches' updates, whose keys its update also preserves."""

    method = "alphaedit-seq"
    label = "AlphaEdit (seq.)"
    config_class = AlphaEditSeqConfig
    runs_after = ""  # its targets come from the model the earlier batches edited

    def _fit(self, edits: EditSet, progress: bool) -> dict[int, torch.Tensor]:
        cfg, model, tok = self.config, self.model, self.tokenizer
        stats = key_second_moment(model, tok, list(cfg.layers), cfg.cov_tokens, corpus=cfg.corpus, progress=progress)
        prefixes = context_prefixes(model, tok, cfg)  # the unedited model's, once
        deltas = {layer: torch.zeros_like(down_proj(model, layer).weight) for layer in cfg.layers}
        prior: dict[int, torch.Tensor] = {}
        # the fit's state after each batch (the updates so far, the earlier keys' term), kept in the
        # lks cache until the fit ends: a resume goes on after the last finished batch instead of
        # solving every earlier batch again (~10 s each on two CPU threads)
        state = self._cache_path("alphaedit-seq", {"edits": edits.checksum(), "threads": torch.get_num_threads(),
                                                   **dataclasses.asdict(cfg)})
        first = self._resume(state, deltas, prior)
        pace = ToGo(len(edits))  # paced on batches whose targets this process optimised, not cached ones
        if first:
            pace.step(first, 0.0, cached=True)
            log.info("sequential AlphaEdit resumes after edit %d of %d (the state its last finished batch left)",
                     first, len(edits))
        t_fit = time.perf_counter()
        for start in range(first, len(edits), cfg.batch_edits):
            t0, seen = time.perf_counter(), len(self.history)
            batch = EditSet(edits.records[start:start + cfg.batch_edits])
            after = EditSet(edits.records[:start]).checksum() if start else None
            with added_weights(model, deltas):  # the model as the earlier batches left it
                z = self._targets(batch, cfg.layers[-1], prefixes, progress, after, chunk_lines=False)
                t_targets = time.perf_counter() - t0
                new = self.history[seen:]  # a cached batch's targets leave one "cached" entry per chunk
                cached = bool(new) and all(h.get("targets") == "cached" for h in new)
                step, keys = self._spread(batch, z, prefixes, stats, prior or None)
            for layer in cfg.layers:
                deltas[layer] += step[layer]
                prior[layer] = prior.get(layer, 0) + keys[layer].double().T @ keys[layer].double()
            self.history.append({"batch": start // cfg.batch_edits, "edits": start + len(batch)})
            took = time.perf_counter() - t0
            work = target_work(new)
            log.info("AlphaEdit batch %d: edits %d-%d of %d (%.0f s, targets %s %.0f s%s; %s)", start // cfg.batch_edits,
                     start + 1, start + len(batch), len(edits), took, "cached" if cached else "optimised", t_targets,
                     f" in {work}" if work else "", pace.step(len(batch), took, cached))
            if state is not None and start + len(batch) < len(edits):
                self._save_state(state, {**{f"delta.{k}": v for k, v in deltas.items()},
                                         **{f"prior.{k}": v for k, v in prior.items()}}, t_fit, next=str(start + len(batch)))
        if state is not None:
            state.unlink(missing_ok=True)  # the fit is done: nothing to resume
        return deltas

    def _resume(self, state: Path | None, deltas: dict[int, torch.Tensor], prior: dict[int, torch.Tensor]) -> int:
        """Load an interrupted fit's updates, earlier keys' term and history from ``state`` (into
        ``deltas`` and ``prior``); the first edit still to fit (0 when there is nothing to resume)."""
        loaded = self._load_state(state)
        if loaded is None:
            return 0
        saved, meta = loaded
        for key, t in saved.items():
            kind, layer = key.split(".")
            if kind == "delta":
                deltas[int(layer)].copy_(t)
            else:
                prior[int(layer)] = t.to(deltas[int(layer)].device)
        first = int(meta["next"])
        self.history.append({"resumed_at_edit": first})
        return first
