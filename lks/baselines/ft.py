"""FT-L: constrained fine-tuning of one MLP output projection.

As defined in ROME (Meng et al. 2022, §4.2 baselines and appendix: "FT-L" fine-tunes one layer's
MLP weights on the edit with an L-infinity norm constraint ``||theta' - theta||_inf <= epsilon``)
and used again as a baseline in MEMIT (Meng et al. 2023, §4): the change ``delta`` of
``mlp.down_proj.weight`` at ``layer`` minimises the mean NLL of each edit's target tokens given its
prompt (teacher-forced), with Adam; after every step ``delta`` is projected back onto the
constraint set (clamped elementwise to ``[-bound, bound]``, or rescaled to Frobenius norm
``bound`` with ``norm="fro"``). Each of ``steps`` epochs passes over the edits in minibatches of
``batch_edits`` edits in data order, one Adam step each (ROME's ``ft_main``), or, with
``batch_edits=0``, takes one full-batch step; a minibatch whose every edit is below ``stop_nll``
takes no step, and an epoch with no step ends the fit. Rows run in chunks of similar length.
After every epoch the state (``delta``, Adam's moments) is kept in the lks cache directory until
the fit ends, so that an interrupted fit resumes after its last finished epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lks.baselines.common import (
    Row,
    WeightEditor,
    chunks,
    down_proj,
    encode_rows,
    target_nll,
    upper_hidden,
)
from lks.data import EditSet
from lks.hooks import layer_output
from lks.models import model_device
from lks.progress import to_go
from lks.utils import length_batches, pad_ids

log = logging.getLogger(__name__)


@dataclass
class FTConfig:
    """FT-L hyperparameters (defaults: ROME's FT-L bound and learning rate; the registered SmolLM2-135M values are in
    lks/configs/smollm2-135m.json, chosen in docs/baselines.md)."""

    layer: int = 6            # decoder layer whose down_proj is fine-tuned
    lr: float = 5e-4          # Adam learning rate
    steps: int = 25           # epochs: passes over all edits (one Adam step each when batch_edits is 0)
    batch_edits: int = 0      # edits per Adam step: 0 = all (full batch); ROME's ft_main: 64-edit minibatches
    bound: float = 5e-4       # the constraint's radius
    norm: str = "inf"         # "inf": elementwise clamp (ROME's FT-L) | "fro": Frobenius-norm ball
    stop_nll: float = 0.05    # stop when every edit's mean target NLL is below this
    batch_rows: int = 64      # rows per forward/backward chunk

    def __post_init__(self) -> None:
        if self.norm not in ("inf", "fro"):
            raise ValueError(f"norm must be 'inf' or 'fro', got {self.norm!r}")
        if self.layer < 1:
            raise ValueError(f"layer must be >= 1 (the layer below it is cached), got {self.layer}")
        if min(self.lr, self.steps, self.bound, self.batch_rows) <= 0:
            raise ValueError("lr, steps, bound and batch_rows must be positive")
        if self.batch_edits < 0:
            raise ValueError(f"batch_edits must be >= 0 (0: full batch), got {self.batch_edits}")


def project(delta: torch.Tensor, bound: float, norm: str) -> torch.Tensor:
    """``delta`` projected (in place) onto ``{||delta||_inf <= bound}`` or ``{||delta||_F <= bound}``."""
    if norm == "inf":
        return delta.clamp_(-bound, bound)
    return delta.mul_(min(1.0, bound / max(float(delta.norm()), 1e-12)))


def by_length(rows: list[Row], size: int) -> list[list[Row]]:
    """``rows`` in chunks of ``size``, shortest first, so that padding each chunk to its longest row
    costs little (zsRE's / CounterFact's 10,000 edits in chunks of 64: 1.68x / 1.66x fewer token
    positions than in data order, ``benchmarks/bench_ft.py --n 10000 --reps 0``)."""
    return [[rows[j] for j in idx] for idx in length_batches([len(r.ids) for r in rows], size)]


@dataclass
class Part:
    """One chunk of rows with the output of decoder ``layer - 1``, which runs once per fit."""

    rows: list[Row]
    hidden: torch.Tensor
    mask: torch.Tensor
    as_tuple: bool


def lower_parts(model: nn.Module, tok: Any, chunked: list[list[Row]], layer: int) -> list[Part]:
    """Each chunk padded and run through the layers below ``layer`` (which FT-L does not change)."""
    parts = []
    for rows in chunked:
        ids, mask = pad_ids([r.ids for r in rows], tok.pad_token_id, model_device(model))
        h, as_tuple = layer_output(model, ids, mask, layer - 1)
        parts.append(Part(rows, h, mask, as_tuple))
    return parts


def backward_nll(model: nn.Module, parts: list[Part], layer: int, delta: torch.Tensor) -> torch.Tensor:
    """Each row's mean target NLL ``[rows]`` with ``delta`` added to ``layer``'s down_proj weight,
    accumulating the gradient of their mean into ``delta.grad`` one chunk at a time."""
    W = down_proj(model, layer).weight
    name = next(n for n, p in model.base_model.named_parameters() if p is W)
    n, out = sum(len(p.rows) for p in parts), []
    for p in parts:
        fin = upper_hidden(model, layer - 1, p.hidden, p.mask, p.as_tuple, params={name: W + delta})
        nll = target_nll(model, fin, p.rows)
        (nll.sum() / n).backward()
        out.append(nll.detach())
    return torch.cat(out)


class FTEditor(WeightEditor):
    """FT-L baseline behind the :class:`lks.LKSEditor` interface (see the module docstring)."""

    method = "ft"
    label = "FT-L"
    config_class = FTConfig

    def _fit(self, edits: EditSet, progress: bool) -> dict[int, torch.Tensor]:
        cfg, model, tok = self.config, self.model, self.tokenizer
        W = down_proj(model, cfg.layer).weight
        rows = encode_rows(tok, [r.prompt for r in edits], [r.subject for r in edits], list(range(len(edits))),
                           [r.target for r in edits])
        batches = [lower_parts(model, tok, by_length([rows[i] for i in b], cfg.batch_rows), cfg.layer)
                   for b in chunks(len(edits), cfg.batch_edits or len(edits))]
        delta = torch.zeros_like(W, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.lr)
        # an interrupted fit resumes at its last epoch (10,000 edits: minutes an epoch on one CPU thread)
        state = self._cache_path("ft", {"edits": edits.checksum(), **dataclasses.asdict(cfg)})
        first, t0 = self._resume(state, delta, opt), time.perf_counter()
        bar = tqdm(range(first, cfg.steps), desc="FT-L", disable=not progress)
        for step in bar:
            nll, moved = self._epoch(batches, delta, opt)
            self.history.append({"step": step, "nll_mean": float(nll.mean()), "nll_max": float(nll.max())})
            bar.set_postfix(nll=f"{float(nll.mean()):.3f}")
            log.info("FT-L epoch %d/%d: mean target NLL %.3f (%s)", step + 1, cfg.steps, float(nll.mean()),
                     to_go(time.perf_counter() - t0, step + 1 - first, cfg.steps - first))
            if not moved:
                break
            if state is not None:
                adam = opt.state[delta]
                self._save_state(state, {"delta": delta.detach(), "exp_avg": adam["exp_avg"], "exp_avg_sq": adam["exp_avg_sq"]},
                                 t0, step=str(step + 1), adam_step=str(int(adam["step"])))
        if state is not None:
            state.unlink(missing_ok=True)  # the fit is done: nothing to resume
        return {cfg.layer: delta.detach()}

    def _epoch(self, batches: list[list[Part]], delta: torch.Tensor, opt: torch.optim.Adam) -> tuple[torch.Tensor, bool]:
        """One pass over the minibatches: each one's target NLL (measured before its step) and whether
        any minibatch stepped."""
        cfg, out, moved = self.config, [], False
        for parts in batches:
            opt.zero_grad()
            nll = backward_nll(self.model, parts, cfg.layer, delta)
            out.append(nll)
            if float(nll.max()) < cfg.stop_nll:
                continue  # every edit of this minibatch is fitted: no step
            opt.step()
            moved = True
            with torch.no_grad():
                project(delta, cfg.bound, cfg.norm)
        return torch.cat(out), moved

    def _resume(self, state: Path | None, delta: torch.Tensor, opt: torch.optim.Adam) -> int:
        """Load an interrupted fit's ``delta``, Adam moments and history from ``state``; the step to
        continue from (0 when there is nothing to resume)."""
        loaded = self._load_state(state)
        if loaded is None:
            return 0
        saved, meta = loaded
        step = int(meta["step"])
        with torch.no_grad():
            delta.copy_(saved["delta"])
        opt.state[delta] = {"step": torch.tensor(float(meta.get("adam_step", step))), "exp_avg": saved["exp_avg"].to(delta.device),
                            "exp_avg_sq": saved["exp_avg_sq"].to(delta.device)}
        self.history.append({"resumed_at_step": step})
        return step
