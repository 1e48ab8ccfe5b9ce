"""One fit of an editor's generator: the training set, its cache, the step and the epochs."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from lks.checkpoint import read_train_state, write_train_state
from lks.config import TrainConfig
from lks.data import EditSet
from lks.hypernet import KBGenerator
from lks.scope import ScopeIndicator
from lks.training import stored
from lks.training.fastpath import Cache, FastPath
from lks.training.gate import GateExamples, gate_examples, warm_gate
from lks.training.losses import batch_loss
from lks.training.prompts import edit_prompts
from lks.training.sequences import Seq, build_sequences, edit_batches
from lks.training.validation import Validation
from lks.utils import release_memory


class Trainable(Protocol):
    """What a fit reads of an editor (:class:`lks.LKSEditor`): its parts, and ``set_edits``."""

    model: Any
    tokenizer: Any
    fast: FastPath
    generator: KBGenerator
    features: torch.Tensor | None
    scope: ScopeIndicator | None
    data_checksum: str  # of the edits set_edits was given

    def set_edits(self, edits: EditSet, cfg: TrainConfig | None = None) -> None: ...


LOSS_NAMES = ("total", "edit", "equiv", "loc", "after", "gate")
log = logging.getLogger(__name__)  # a line per prepared part and per epoch (python -m lks reproduce shows them)


def _stored(store: Path | None, load: Callable, save: Callable, compute: Callable[[], Any], describe: Callable[[Any], str],
            phases: dict[str, float], name: str) -> Any:
    """One prepared part: read from ``store`` when there, else computed (and written to ``store``);
    logged, and its seconds added to ``phases[name]``."""
    t = time.perf_counter()
    got = load(store) if store else None
    if got is None:
        got = compute()
        if store:
            save(store, got)
    phases[name] = time.perf_counter() - t
    log.info("%s (%.0f s)", describe(got), phases[name])
    return got


@dataclasses.dataclass
class Stopping:
    """When the epochs stop: after ``patience`` epochs without a lower training loss, or, with
    validation (``TrainConfig.val_edits``), after ``val_patience`` epochs without a better
    validation score; the best-scoring epoch's generator is then the fit's result."""

    best_loss: float = math.inf
    bad: int = 0
    best_val: float = -math.inf
    val_bad: int = 0
    best_epoch: int = 0
    best_weights: dict[str, torch.Tensor] | None = None

    def update(self, rec: dict[str, float], cfg: TrainConfig, generator: torch.nn.Module) -> None:
        """Account for the finished epoch ``rec`` (its ``loss`` and, with validation, ``val_score``)."""
        self.best_loss, self.bad = (rec["loss"], 0) if rec["loss"] < self.best_loss - cfg.min_delta else (self.best_loss, self.bad + 1)
        if "val_score" in rec:
            if rec["val_score"] > self.best_val + cfg.min_delta:
                self.best_val, self.val_bad, self.best_epoch = rec["val_score"], 0, int(rec["epoch"])
                self.best_weights = {k: v.detach().clone() for k, v in generator.state_dict().items()}
            else:
                self.val_bad += 1

    def done(self, cfg: TrainConfig) -> bool:
        return self.bad >= cfg.patience or self.val_bad >= cfg.val_patience

    def state(self) -> dict[str, Any]:
        """The JSON part for a checkpoint (the best weights go with its tensors, ``best.<name>``)."""
        return {"best": self.best_loss, "bad_epochs": self.bad, "best_val": self.best_val, "val_bad": self.val_bad,
                "best_epoch": self.best_epoch}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Stopping:
        best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        return cls(state["best"], state["bad_epochs"], state["best_val"], state["val_bad"], state["best_epoch"], best or None)


def epochs_for(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The epochs a fit runs at most: ``cfg.epochs``, or fewer when ``cfg.max_steps`` caps the steps."""
    if cfg.max_steps <= 0:
        return cfg.epochs
    return max(1, min(cfg.epochs, math.ceil(cfg.max_steps / max(1, steps_per_epoch))))


class Trainer:
    """Trains ``editor.generator`` on an edit set with the fast path (the base model stays frozen).

    ``prepare`` builds everything a step reads (sequences, gate examples, the layer-L cache and
    the reference distributions); ``batch_loss`` is one step's losses; ``train`` runs the epochs
    with optional per-epoch checkpoints and resume. :meth:`lks.LKSEditor.fit` is
    ``Trainer(editor, cfg).prepare(edits).train(...)``; tests and benchmarks use the parts.
    """

    def __init__(self, editor: Trainable, cfg: TrainConfig) -> None:
        self.editor = editor
        self.cfg = cfg
        self.fast = editor.fast
        self.per_edit: list[list[int]] = []   # sequence ids of each edit
        self.seqs: list[Seq] = []
        self.skipped: dict[str, int] = {}     # training prompts left out, by reason
        self.cache: Cache | None = None
        self.gate: GateExamples | None = None  # the gated generator's extra examples
        self.validation: Validation | None = None  # TrainConfig.val_edits: held-out prompts scored per epoch
        self.precompute_seconds = 0.0
        self.started = time.perf_counter()  # the fit's start in this process (preparation included)
        self.prior_seconds = 0.0  # a resumed fit's earlier processes, read from its checkpoint
        # seconds of this process per part of the fit: scope (scope indicator and features),
        # sequences, gate, cache (prepare), warm_gate, epochs (train)
        self.phases: dict[str, float] = {}

    def prepare(self, edits: EditSet, batch_size: int = 256, progress: bool = True,
                store: Path | None = None) -> Trainer:
        """Scope and features of ``edits`` on the editor, then the training set and its cache.

        With ``store`` (a folder, see :mod:`lks.training.stored`) each of the three slow parts
        (sequences, gate examples, layer-L cache) is read from it when there, else computed and
        written to it."""
        t0 = time.perf_counter()
        ed, cfg = self.editor, self.cfg
        ed.set_edits(edits, cfg)
        assert ed.scope is not None
        self.phases["scope"] = time.perf_counter() - t0
        prompts = edit_prompts(edits, cfg)  # the training sequences and the gate examples read the same prompts
        self.per_edit, self.seqs, self.skipped = _stored(
            store, stored.load_sequences, lambda folder, got: stored.save_sequences(folder, *got),
            lambda: build_sequences(ed.tokenizer, ed.scope, edits, cfg, prompts), lambda got: f"{len(got[1])} training sequences", self.phases, "sequences")
        if ed.generator.has_gate:
            self.gate = _stored(store, stored.load_gate, stored.save_gate,
                                lambda: gate_examples(self.fast, ed.scope, edits, self.seqs, cfg, prompts),
                                lambda got: f"{len(got.label)} gate examples", self.phases, "gate")
        # the cache's pass appends the continuations to the sequences (Seq.to_continue): they are
        # written again, before the cache, so a stored cache always finds its extended sequences
        self.cache = _stored(store, stored.load_cache,
                             lambda folder, got: (stored.save_sequences(folder, self.per_edit, self.seqs, self.skipped),
                                                  stored.save_cache(folder, got)),
                             lambda: self.fast.precompute(self.seqs, cfg, batch_size, progress),
                             lambda got: f"layer-L cache of {len(got.states)} tokens", self.phases, "cache")
        if cfg.val_edits:
            t = time.perf_counter()
            self.validation = Validation.build(self.fast, ed.scope, edits, cfg)
            self.phases["validation"] = time.perf_counter() - t
        release_memory()  # the precompute's transient tensors: return them to the OS before training
        self.precompute_seconds = time.perf_counter() - t0
        return self

    def batch_loss(self, batch: list[int], backward: bool = False) -> dict[str, torch.Tensor]:
        """Losses of one step on the sequence ids ``batch``; with ``backward``, their gradient added
        to the generator's, block by block (see :func:`lks.training.losses.batch_loss`)."""
        assert self.cache is not None, "call prepare(edits) first"
        ed = self.editor
        return batch_loss(self.fast, ed.generator, ed.features, self.cache, self.seqs, batch, self.cfg, self.gate,
                          backward=backward)

    def train(self, checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
              progress: bool = True) -> list[dict[str, float]]:
        """The epochs (AdamW, linear decay, early stopping on the training loss); returns the history.

        With ``checkpoint_dir`` the generator, optimizer and scheduler are saved there after every
        epoch (:func:`lks.checkpoint.write_train_state`), and ``resume`` continues from the last
        saved epoch of the same edits and config."""
        assert self.cache is not None, "call prepare(edits) first"
        ed, cfg = self.editor, self.cfg
        batches = edit_batches(self.per_edit, self.seqs, cfg.batch_size)
        n_epochs = epochs_for(cfg, len(batches))
        steps_total = len(batches) * n_epochs
        opt = torch.optim.AdamW(ed.generator.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / max(1, steps_total)))
        running = {"data_checksum": ed.data_checksum, "train": dataclasses.asdict(cfg)}  # what a resumed checkpoint must match
        saved = read_train_state(checkpoint_dir, running, opt, sched) if checkpoint_dir is not None and resume else None
        history, stop = self._resumed(saved) if saved is not None else ([], Stopping())
        start_epoch = len(history)
        if start_epoch == 0 and self.gate is not None and cfg.gate_steps > 0:
            t = time.perf_counter()
            warm_gate(ed.generator, ed.features, self.cache, self.seqs, self.gate, cfg)
            self.phases["warm_gate"] = time.perf_counter() - t
        rng = random.Random(cfg.seed)
        for _ in range(start_epoch):  # replay the shuffles of finished epochs: same order as uninterrupted
            rng.shuffle(batches)
        with self.fast.upper_pass(cfg.precision, page_out_idle=True):
            for epoch in range(start_epoch, n_epochs):
                if stop.done(cfg):
                    break
                rng.shuffle(batches)
                rec = self._epoch(epoch, n_epochs, batches, opt, sched, progress)
                history.append(rec)
                stop.update(rec, cfg, ed.generator)
                eta = (n_epochs - epoch - 1) * sum(h["seconds"] for h in history) / len(history)
                log.info("epoch %d/%d: loss %.4f%s (%.0f s; at most %.0f s to go)", epoch + 1, n_epochs, rec["loss"],
                         f", validation {rec['val_score']:.3f}" if "val_score" in rec else "", rec["seconds"], eta)
                if checkpoint_dir is not None:
                    seconds = self.prior_seconds + time.perf_counter() - self.started
                    state = {"epoch": epoch + 1, **stop.state(), "seconds": seconds, "history": history, **running}
                    weights = {f"generator.{k}": v for k, v in ed.generator.state_dict().items()}
                    weights |= {f"best.{k}": v for k, v in (stop.best_weights or {}).items()}
                    write_train_state(checkpoint_dir, state, weights, opt, sched)
        if stop.best_weights is not None:  # validation: the best epoch's generator
            ed.generator.load_state_dict(stop.best_weights)
        ed.generator.eval()
        self.phases["epochs"] = sum(h["seconds"] for h in history[start_epoch:])
        return history

    def _resumed(self, saved: tuple[dict[str, Any], dict[str, torch.Tensor]]) -> tuple[list[dict[str, float]], Stopping]:
        """``(history, stopping state)`` of a checkpoint, its generator loaded."""
        state, tensors = saved
        self.editor.generator.load_state_dict({k[len("generator."):]: v for k, v in tensors.items() if k.startswith("generator.")})
        self.prior_seconds = float(state["seconds"])  # the interrupted processes' time, preparation included
        log.info("resumed from the checkpoint after epoch %d", len(state["history"]))
        return state["history"], Stopping.from_checkpoint(state, tensors)

    def _epoch(self, epoch: int, n_epochs: int, batches: list[list[int]], opt: torch.optim.Optimizer, sched: Any,
               progress: bool) -> dict[str, float]:
        """One pass over ``batches``, then the validation score; the epoch's record: mean losses,
        learning rate, seconds (of the steps; ``val_seconds`` for the validation)."""
        te = time.perf_counter()
        sums = dict.fromkeys(LOSS_NAMES, 0.0)
        ed = self.editor
        ed.generator.train()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{n_epochs}", disable=not progress, leave=False)
        for batch in bar:
            opt.zero_grad(set_to_none=True)
            losses = self.batch_loss(batch, backward=True)
            opt.step()
            sched.step()
            for k in sums:
                sums[k] += float(losses[k].detach())
            bar.set_postfix(loss=f"{float(losses['total'].detach()):.3f}")
        n = max(1, len(batches))
        rec = {"epoch": epoch + 1, "loss": sums["total"] / n, **{k: sums[k] / n for k in LOSS_NAMES if k != "total"},
               "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - te}
        if self.validation is not None:
            tv = time.perf_counter()
            ed.generator.eval()
            rec |= self.validation.score(self.fast, ed.generator, ed.features)
            rec["val_seconds"] = time.perf_counter() - tv
        return rec
