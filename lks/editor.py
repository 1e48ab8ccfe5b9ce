"""``LKSEditor``: fit a knowledge-block generator on an edit set, apply it, save and load it.

The three parts of the method, and where they live:

* **edit scope indicator** (:class:`lks.scope.ScopeIndicator`): which edited subject a prompt
  mentions and where (character span -> last token of the subject);
* **new-KB generator** (:mod:`lks.hypernet`): feature of the edit statement -> new knowledge block;
* **KB replacer** (:class:`lks.hooks.LayerHooks`): writes the new block into the output of decoder
  layer L at the subject's last token, for every prompt that mentions an edited subject.

Training lives in :mod:`lks.training` (the training set, the fast path, the losses, CPU tuning);
saving and loading in :mod:`lks.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lks.checkpoint import (
    check_model,
    model_identity,
    read_json,
    read_tensors,
    write_checkpoint,
)
from lks.config import EditorConfig, TrainConfig, from_dict, recipe
from lks.data import EditSet
from lks.hooks import LayerHooks, Replacement
from lks.hypernet import KBGenerator, make_generator
from lks.methods import ApplyStats, Editor, accepted_edits
from lks.models import check_layer, get_layers, model_device
from lks.routing import TokenRouter, scope_diagnostics
from lks.scope import ScopeIndicator
from lks.training.fastpath import FastPath
from lks.training.precision import fit_dtype, precision_used
from lks.training.stored import prepared_dir
from lks.training.stored import remove as remove_prepared
from lks.training.trainer import Trainer
from lks.utils import set_seed


def recipe_of(model: nn.Module, overrides: Mapping[str, Any] | None = None) -> tuple[EditorConfig, TrainConfig]:
    """:func:`lks.config.recipe` of a loaded model (by its ``lks_name``; an unregistered model gets
    the edit layer at two thirds of its depth)."""
    return recipe(getattr(model, "lks_name", ""), overrides, n_layers=len(get_layers(model)))


class LKSEditor(Editor):
    """Latent Knowledge Scalpel editor for one frozen causal LM.

    Args:
        model: a frozen causal LM (see :func:`lks.load_model`).
        tokenizer: its tokenizer (pad token set).
        config: architecture (layer, generator kind, fuzzy threshold). Defaults to the model's
            recipe (:func:`recipe_of`).

    Typical use::

        editor = LKSEditor(model, tok)
        editor.fit(edits)                # the model's recipe; or fit(edits, TrainConfig(...))
        print(editor.generate(["The mother tongue of Danielle Darrieux is"]))
        with editor.applied(model):
            model(**batch)          # any forward/generate call sees the edits
        editor.save("runs/cf-100")
    """

    method = "lks"
    label = "LKS"

    def __init__(self, model: nn.Module, tokenizer: Any, config: EditorConfig | None = None) -> None:
        if config is None:
            config = recipe_of(model)[0]
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        check_layer(model, config.layer)
        if any(p.requires_grad for p in model.parameters()):
            raise ValueError("the base model must be frozen (lks.load_model returns it frozen); "
                             "LKS never trains base-model weights")
        self.d = int(model.config.hidden_size)
        self.fast = FastPath(model, tokenizer, config.layer)  # layer-L passes and the training fast path
        self.generator: KBGenerator = make_generator(config.generator, self.d, config.mlp_ratio).to(model_device(model))
        self.subjects: list[str] = []
        self.feature_texts: list[str] = []
        self.features: torch.Tensor | None = None  # [n_subjects, d]
        self.scope: ScopeIndicator | None = None
        self.train_config: TrainConfig | None = None
        self.history: list[dict[str, float]] = []
        self.data_checksum: str = ""
        self.n_edits = 0
        self.dropped: list[int] = []       # edits fit(on_conflict="first") dropped, as indices into its input
        self.skipped: dict[str, int] = {}  # training prompts the last fit left out, by reason
        self.precision_used = ""           # TrainConfig.precision as resolved by the last fit
        self.precompute_seconds = 0.0
        self.fit_seconds = 0.0
        self.fit_phases: dict[str, float] = {}  # seconds per part of the last fit's process (Trainer.phases)
        self.fit_threads = 0               # torch threads of the last fit: a fit is bit-reproducible at the same count
        self._table: torch.Tensor | None = None   # cached generator table for inference
        self.router = TokenRouter(tokenizer)       # token ids -> the subject a row mentions (applied mode)

    def set_edits(self, edits: EditSet, cfg: TrainConfig | None = None) -> None:
        """Subjects, feature texts, scope indicator and feature vectors of ``edits`` (an untrained
        generator on them is a valid, if useless, editor). With ``cfg`` (from :meth:`fit`) the
        feature pass runs in the fit's precision (:meth:`lks.training.fastpath.FastPath.lower_pass`)."""
        edits.require_nonempty().check_conflicts()  # fit() has already dropped conflicts when asked to
        by_subject: dict[str, list[str]] = {}
        for r in edits:
            by_subject.setdefault(r.subject, [])
            stmt = r.feature_text()
            if stmt not in by_subject[r.subject]:
                by_subject[r.subject].append(stmt)
        self.subjects = list(by_subject)
        # edits of the same subject are joined into one statement: one KB per subject
        self.feature_texts = [" ".join(stmts) for stmts in by_subject.values()]
        self.scope = ScopeIndicator(self.subjects, fuzzy_threshold=self.config.fuzzy_threshold)
        bf16 = cfg is not None and fit_dtype(self.model, cfg.precision) is not None
        with self.fast.lower_pass(cfg.precision) if cfg is not None else nullcontext():
            # 1,000 CounterFact subjects: bfloat16 in batches of 256 2.8 s; float32 in batches of 64
            # 6.8 s (of 256: 8.5 s)
            self.features = self.fast.states_at_last_token(self.feature_texts, batch_size=256 if bf16 else 64)
        self.data_checksum = edits.checksum()
        self.n_edits = len(edits)
        self._table = None

    def fit(self, edits: EditSet, config: TrainConfig | None = None, *, checkpoint_dir: str | os.PathLike | None = None,
            resume: bool = True, progress: bool = True, precompute_batch_size: int = 256,
            on_conflict: str = "error") -> list[dict[str, float]]:
        """Train the generator on ``edits`` (the base model stays frozen).

        Args:
            edits: the edit set (non-empty; same subject + same prompt with different targets is
                rejected as a conflict; different facts about one subject share one KB).
            config: training recipe; defaults to the model's (:func:`recipe_of`).
            checkpoint_dir: if given, the fit's train state (generator, optimizer, history) is saved
                there after every epoch (atomically; the saved editor replaces it with ``save``), and
                ``resume=True`` continues from the last saved epoch when it holds the same edits and config.
            progress: show tqdm bars.
            precompute_batch_size: sequences per batch of the one-time layer-L and reference passes
                (length-sorted; 256 made the 1,000-edit precompute 35.5 -> 26.4-28.4 s against 64, two runs).
            on_conflict: ``"error"`` (default) rejects the same subject + prompt with two different
                targets; ``"first"`` keeps the first such edit and drops the later ones (CounterFact
                has 79 such pairs in its first 10,000 records), recorded in ``self.dropped``.

        Returns:
            The per-epoch history: ``epoch, loss, edit, equiv, loc, after, gate, lr, seconds``.
        """
        cfg = config or recipe_of(self.model)[1]
        edits, dropped = accepted_edits(edits, on_conflict)
        self.train_config = cfg
        self.precision_used = precision_used(self.model, cfg.precision)
        self.fit_threads = torch.get_num_threads()
        set_seed(cfg.seed)
        # a fresh generator, initialised under the seed: fit() is reproducible and never continues
        # a previous fit by accident (resuming is explicit, through checkpoint_dir)
        self.generator = make_generator(self.config.generator, self.d, self.config.mlp_ratio).to(model_device(self.model))
        t0 = time.perf_counter()
        self.dropped = dropped
        # with a checkpoint directory the prepared training set is kept until training ends, so
        # that a resumed fit skips its preparation (lks.training.stored)
        store = None if checkpoint_dir is None else prepared_dir(self.model, {
            "editor": dataclasses.asdict(self.config), "train": dataclasses.asdict(cfg), "edits": edits.checksum(),
            "precision": self.precision_used, "device": model_device(self.model).type})
        try:
            trainer = Trainer(self, cfg).prepare(edits, precompute_batch_size, progress, store)
            self.precompute_seconds, self.skipped = trainer.precompute_seconds, trainer.skipped
            self.history = trainer.train(checkpoint_dir, resume, progress)
            self.fit_phases = trainer.phases
        except Exception:  # an error (a refused checkpoint, a bug): not kept; an interruption is
            remove_prepared(store)
            raise
        remove_prepared(store)
        self._table = None
        self.fit_seconds = trainer.prior_seconds + time.perf_counter() - t0  # a resumed fit counts its earlier processes
        return self.history

    @classmethod
    def configs(cls, model: nn.Module, overrides=None, *, seed: int | None = None) -> tuple[EditorConfig, TrainConfig]:
        """The model's recipe (:func:`recipe_of`) with ``overrides``: a field of :class:`EditorConfig`
        goes to the editor config, any other to the :class:`TrainConfig`; ``seed`` sets the fit's seed."""
        over = dict(overrides or {})
        if seed is not None:
            over.setdefault("seed", seed)
        return recipe_of(model, over)

    @classmethod
    def setting_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(EditorConfig)} | {f.name for f in dataclasses.fields(TrainConfig)}

    @property
    def fit_config(self) -> TrainConfig | None:
        return self.train_config

    @property
    def rephrase_seen(self) -> bool:
        """``rephrases[0]`` is a training prompt unless the fit had ``train_rephrase=False``."""
        return self.train_config is None or self.train_config.train_rephrase

    def routes(self, prompts: Sequence[str]) -> list[bool]:
        """Whether the scope indicator finds an edited subject in each prompt."""
        self._require_fitted()
        assert self.scope is not None
        return [self.scope.find(p) is not None for p in prompts]

    def diagnostics(self, edits: EditSet) -> dict[str, float]:
        """The scope indicator's recall and precision on ``edits``' prompts (:func:`lks.routing.scope_diagnostics`)."""
        self._require_fitted()
        assert self.scope is not None
        return scope_diagnostics(self.scope, edits)

    @torch.inference_mode()
    def kb_table(self) -> torch.Tensor:
        """Generator output for every subject, ``[n_subjects, d]`` (cached until the next fit)."""
        self._require_fitted()
        if self._table is None:
            self.generator.eval()
            self._table = self.generator.table(self.features.to(model_device(self.model))).detach()
        return self._table

    def _require_fitted(self) -> None:
        if self.features is None or self.scope is None:
            raise RuntimeError("this editor has no edits yet: call fit(edits) or LKSEditor.load(path, model, tok)")

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[list[int], list[int], list[int]]:
        """Scope detection on token ids: ``(rows, positions, subject ids)`` of routed rows
        (:meth:`lks.routing.TokenRouter.route` with this editor's scope indicator)."""
        assert self.scope is not None, "this editor has no edits yet"
        return self.router.route(self.scope, input_ids, attention_mask)

    @contextmanager
    def applied(self, model: nn.Module | None = None) -> Iterator[ApplyStats]:
        """Inside the block, every forward / generate call on token ids sees the edits.

        Each batch row is routed separately: rows that mention an edited subject get its new
        knowledge block at the subject's last token; other rows run unedited. Yields an
        :class:`ApplyStats` with counters. Calls made with ``inputs_embeds`` cannot be routed and
        run unedited.
        """
        model = model if model is not None else self.model
        table = self.kb_table()
        stats = ApplyStats()
        combine = self.generator.combine

        def replacer(input_ids, attention_mask):
            stats.calls += 1
            if input_ids is None:
                return None
            stats.rows_seen += int(input_ids.shape[0])
            rows, pos, subj = self.route(input_ids, attention_mask)
            stats.rows_routed += len(rows)
            if not rows:
                return None
            dev = input_ids.device
            return Replacement(torch.tensor(rows, device=dev), torch.tensor(pos, device=dev),
                               table[torch.tensor(subj, device=table.device)], combine=combine)

        with LayerHooks(model, edit_layer=self.config.layer, replacer=replacer):
            yield stats

    def save(self, path: str | os.PathLike) -> Path:
        """Save to a directory (``config.json``, ``generator.safetensors``, ``scope.safetensors``,
        ``subjects.json``; see :mod:`lks.checkpoint`), atomically."""
        self._require_fitted()
        config = saved_config(self)
        return write_checkpoint(path, config, {"generator": self.generator.state_dict(), "scope": {"features": self.features}},
                                {"subjects": {"subjects": self.subjects, "feature_texts": self.feature_texts}})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, tokenizer: Any) -> LKSEditor:
        """Load a saved editor for ``model``; fails clearly if it was made for another model or a
        file is missing or corrupt."""
        path = Path(path)
        cfg = read_json(path / "config.json")
        check_model(cfg.get("model", {}), model, path)
        editor = cls(model, tokenizer, from_dict(EditorConfig, cfg["editor"], f"{path}/config.json:editor"))
        editor._restore(path, cfg)
        return editor

    def _restore(self, path: Path, cfg: dict[str, Any]) -> None:
        """The state of the editor saved in ``path`` (``cfg``: its config.json)."""
        self.generator.load_state_dict(read_tensors(path / "generator.safetensors"))
        self.generator.to(model_device(self.model)).eval()
        subj = read_json(path / "subjects.json")
        self.subjects, self.feature_texts = subj["subjects"], subj["feature_texts"]
        self.features = read_tensors(path / "scope.safetensors")["features"].to(model_device(self.model))
        if self.features.shape != (len(self.subjects), self.d):
            raise ValueError(f"corrupt checkpoint {path}: {len(self.subjects)} subjects but features of shape "
                             f"{tuple(self.features.shape)}")
        self.scope = ScopeIndicator(self.subjects, fuzzy_threshold=self.config.fuzzy_threshold)
        self.train_config = from_dict(TrainConfig, cfg["train"], "train") if cfg.get("train") else None
        self.history, self.data_checksum, self.n_edits = cfg.get("history", []), cfg.get("data_checksum", ""), cfg.get("n_edits", 0)
        self.precision_used = cfg.get("precision_used", "")
        self.fit_seconds = cfg.get("fit_seconds")  # None: saved before lks recorded it
        self.fit_threads = cfg.get("fit_threads", 0)
        self.fit_phases = cfg.get("fit_phases", {})
        self._table = None


def saved_config(editor: LKSEditor) -> dict[str, Any]:
    """What an LKS editor's ``config.json`` records (besides the format version)."""
    import transformers

    import lks

    return {"lks_version": lks.__version__, "method": editor.method,
            "model": model_identity(editor.model) | {"class": type(editor.model).__name__},
            "editor": dataclasses.asdict(editor.config),
            "train": dataclasses.asdict(editor.train_config) if editor.train_config else None,
            "n_edits": editor.n_edits, "n_subjects": len(editor.subjects), "data_checksum": editor.data_checksum,
            "history": editor.history, "fit_seconds": editor.fit_seconds, "precision_used": editor.precision_used,
            "fit_threads": editor.fit_threads, "fit_phases": editor.fit_phases,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
