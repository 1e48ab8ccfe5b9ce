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
            lambda: build_sequences(ed.model, ed.tokenizer, ed.scope, edits, cfg, prompts), lambda got: f"{len(got[1])} training sequences", self.phases, "sequences")
        if ed.generator.has_gate:
            self.gate = _stored(store, stored.load_gate, stored.save_gate,
                                lambda: gate_examples(self.fast, ed.scope, edits, self.seqs, cfg, prompts),
                                lambda got: f"{len(got.label)} gate examples", self.phases, "gate")
        self.cache = _stored(store, stored.load_cache, stored.save_cache,
                             lambda: self.fast.precompute(self.seqs, cfg, batch_size, progress),
                             lambda got: f"layer-L cache of {len(got.states)} tokens", self.phases, "cache")
        release_memory()  # the precompute's transient tensors: return them to the OS before training
        self.precompute_seconds = time.perf_counter() - t0
        return self

    def batch_loss(self, batch: list[int]) -> dict[str, torch.Tensor]:
        """Losses of one step on the sequence ids ``batch`` (see :func:`lks.training.losses.batch_loss`)."""
        assert self.cache is not None, "call prepare(edits) first"
        ed = self.editor
        return batch_loss(self.fast, ed.generator, ed.features, self.cache, self.seqs, batch, self.cfg, self.gate)

    def train(self, checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
              progress: bool = True) -> list[dict[str, float]]:
        """The epochs (AdamW, linear decay, early stopping on the training loss); returns the history.

        With ``checkpoint_dir`` the generator, optimizer and scheduler are saved there after every
        epoch (:func:`lks.checkpoint.write_train_state`), and ``resume`` continues from the last
        saved epoch of the same edits and config."""
        assert self.cache is not None, "call prepare(edits) first"
        ed, cfg = self.editor, self.cfg
        batches = edit_batches(self.per_edit, self.seqs, cfg.batch_size)
        steps_total = len(batches) * cfg.epochs
        opt = torch.optim.AdamW(ed.generator.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / max(1, steps_total)))
        running = {"data_checksum": ed.data_checksum, "train": dataclasses.asdict(cfg)}  # what a resumed checkpoint must match
        saved = read_train_state(checkpoint_dir, running, opt, sched) if checkpoint_dir is not None and resume else None
        history, best, bad = self._resumed(saved) if saved is not None else ([], math.inf, 0)
        start_epoch = len(history)
        if start_epoch == 0 and self.gate is not None and cfg.gate_steps > 0:
            t = time.perf_counter()
            warm_gate(ed.generator, ed.features, self.cache, self.seqs, self.gate, cfg)
            self.phases["warm_gate"] = time.perf_counter() - t
        rng = random.Random(cfg.seed)
        for _ in range(start_epoch):  # replay the shuffles of finished epochs: same order as uninterrupted
            rng.shuffle(batches)
        ed.generator.train()
        with self.fast.upper_pass(cfg.precision):
            for epoch in range(start_epoch, cfg.epochs):
                if bad >= cfg.patience:
                    break
                rng.shuffle(batches)
                rec = self._epoch(epoch, batches, opt, sched, progress)
                history.append(rec)
                eta = (cfg.epochs - epoch - 1) * sum(h["seconds"] for h in history) / len(history)
                log.info("epoch %d/%d: loss %.4f (%.0f s; at most %.0f s to go)", epoch + 1, cfg.epochs, rec["loss"],
                         rec["seconds"], eta)
                best, bad = (rec["loss"], 0) if rec["loss"] < best - cfg.min_delta else (best, bad + 1)
                if checkpoint_dir is not None:
                    seconds = self.prior_seconds + time.perf_counter() - self.started
                    state = {"epoch": epoch + 1, "best": best, "bad_epochs": bad, "seconds": seconds, "history": history, **running}
                    weights = {f"generator.{k}": v for k, v in ed.generator.state_dict().items()}
                    write_train_state(checkpoint_dir, state, weights, opt, sched)
        ed.generator.eval()
        self.phases["epochs"] = sum(h["seconds"] for h in history[start_epoch:])
        return history

    def _resumed(self, saved: tuple[dict[str, Any], dict[str, torch.Tensor]]) -> tuple[list[dict[str, float]], float, int]:
        """``(history, best loss, epochs without improvement)`` of a checkpoint, its generator loaded."""
        state, tensors = saved
        self.editor.generator.load_state_dict({k[len("generator."):]: v for k, v in tensors.items()})
        history = state["history"]
        self.prior_seconds = float(state["seconds"])  # the interrupted processes' time, preparation included
        return history, state["best"], state["bad_epochs"]

    def _epoch(self, epoch: int, batches: list[list[int]], opt: torch.optim.Optimizer, sched: Any,
               progress: bool) -> dict[str, float]:
        """One pass over ``batches``; the epoch's record: mean losses, learning rate, seconds."""
        te = time.perf_counter()
        sums = dict.fromkeys(LOSS_NAMES, 0.0)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", disable=not progress, leave=False)
        for batch in bar:
            losses = self.batch_loss(batch)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
            sched.step()
            for k in sums:
                sums[k] += float(losses[k].detach())
            bar.set_postfix(loss=f"{float(losses['total'].detach()):.3f}")
        n = max(1, len(batches))
        return {"epoch": epoch + 1, "loss": sums["total"] / n, **{k: sums[k] / n for k in LOSS_NAMES if k != "total"},
                "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - te}
