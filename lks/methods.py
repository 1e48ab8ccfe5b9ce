"""Editing methods: one interface (:class:`Editor`) and one registry (method name -> editor class).

Every editing method, LKS and the weight-editing baselines alike, is an :class:`Editor`. The
drivers (the grid, the command line, the metrics, the capability tasks) use only this interface
and the registry, never a method's name or class: adding a method is one class and one
:func:`register` call (kmeng01/rome keeps the same map in ``experiments/evaluate.py``'s ``ALG_DICT``).

    cls = editor_class("memit")
    editor_cfg, fit_cfg = cls.configs(model, {"lam": 1e3})   # the model's registered settings, overridden
    editor = cls(model, tok, editor_cfg)
    editor.fit(edits, fit_cfg)
    with editor.applied(model) as stats: ...
    editor.save("runs/memit"); load_editor("runs/memit", model, tok)
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lks.data import EditSet
from lks.models import model_device


@dataclass
class ApplyStats:
    """Counters of an ``applied`` block (forward calls that are not single-token decode steps)."""

    rows_seen: int = 0    # batch rows the editor looked at
    rows_routed: int = 0  # rows the edit acted on (a weight editor: every row)
    calls: int = 0        # forward calls of the model


class Editor(ABC):
    """The interface of every editing method.

    Subclasses set ``method`` (the registry name) and ``label`` (the name in tables and figures),
    and implement ``configs``, ``fit``, ``applied``, ``routes``, ``save`` and ``load``. After a fit
    or a load an editor holds ``n_edits``, ``fit_seconds``, ``fit_threads`` (torch threads: a fit is
    the same bit for bit at the same count), ``data_checksum`` (of the edits it was fitted on) and
    ``history`` (one dict per epoch or step).
    """

    method: ClassVar[str] = ""
    label: ClassVar[str] = ""
    # what a grid (lks.grid.Grid.plan) may order and share between this method's cells; declared
    # here, so that no driver asks for a method's name
    shared_work: ClassVar[str] = ""  # work every fit on a model shares (see prepare_shared): one grid step
    runs_after: ClassVar[str] = ""   # a method whose cell (same data set and N) runs first: its cache is read here

    model: nn.Module
    tokenizer: Any
    config: Any
    n_edits: int
    fit_seconds: float
    fit_threads: int
    data_checksum: str
    history: list[dict[str, Any]]

    @classmethod
    @abstractmethod
    def configs(cls, model: nn.Module, overrides: Mapping[str, Any] | None = None, *, seed: int | None = None) -> tuple[Any, Any]:
        """``(editor config, fit config)``: the settings registered for ``model``
        (``lks/configs/<model>.json``) with ``overrides`` (setting name -> value) applied; ``seed``
        sets the fit's seed where the method draws random numbers. A name that is not a setting of
        the method raises ``ValueError`` naming it."""

    @classmethod
    @abstractmethod
    def setting_names(cls) -> set[str]:
        """The names ``configs`` accepts as overrides."""

    def prepare_shared(self, data_dir: str | None = None) -> None:
        """Do and cache ``shared_work`` for this editor's config (MEMIT, AlphaEdit: the key
        statistics of its band), so that later fits find it; nothing for a method without any."""
        return None

    @abstractmethod
    def fit(self, edits: EditSet, config: Any = None, *, on_conflict: str = "error",
            checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
            progress: bool = True) -> list[dict[str, Any]]:
        """Fit the edit on ``edits`` with the fit config ``config`` (default: the registered one);
        ``checkpoint_dir``: where an interrupted fit keeps what it needs to resume (methods that
        keep their resumable state elsewhere ignore it). Returns ``history``."""

    @property
    def fit_config(self) -> Any:
        """The fit config of the last fit (None for methods whose settings are all in ``config``)."""
        return None

    @abstractmethod
    def applied(self, model: nn.Module | None = None) -> AbstractContextManager[ApplyStats]:
        """Inside the block every forward / generate call of ``model`` sees the edits; yields
        :class:`ApplyStats`. On exit the model is as it was, bit for bit."""

    @abstractmethod
    def routes(self, prompts: Sequence[str]) -> list[bool]:
        """Whether the edit acts on each prompt (LKS: its scope indicator finds an edited subject;
        a weight editor: always)."""

    @abstractmethod
    def save(self, path: str | os.PathLike) -> Path:
        """Write the editor to the directory ``path`` (``config.json`` with a ``method`` key, safetensors)."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, tokenizer: Any) -> Editor:
        """Read a saved editor for ``model``; a one-line error for another model, method or a bad file."""

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 20, edited: bool = True,
                 batch_size: int = 16, **gen_kwargs: Any) -> list[str]:
        """Greedy continuations of ``prompts`` (edited by default), without the prompt text."""
        return greedy_continuations(self, prompts, max_new_tokens, edited, batch_size, **gen_kwargs)

    def settings(self) -> dict[str, Any]:
        """The configs as a results file records them: ``config`` and, where there is one, ``train_config``."""
        out = {"config": dataclasses.asdict(self.config)}
        if self.fit_config is not None:
            out["train_config"] = dataclasses.asdict(self.fit_config)
        return out

    @property
    def rephrase_seen(self) -> bool:
        """Whether the fit trained on each edit's own paraphrase (``rephrases[0]``): then it is a
        seen prompt, not a held-out one, in :func:`lks.metrics.evaluate_edits`."""
        return False

    def diagnostics(self, edits: EditSet) -> dict[str, float]:
        """Method-specific numbers :func:`lks.metrics.evaluate_edits` adds to its summary."""
        return {}


def accepted_edits(edits: EditSet, on_conflict: str) -> tuple[EditSet, list[int]]:
    """The edits a fit takes, and the indices it dropped: ``on_conflict="first"`` keeps the first of
    two edits with the same subject and prompt but different targets, ``"error"`` refuses them."""
    if on_conflict not in ("error", "first"):
        raise ValueError(f"on_conflict must be 'error' or 'first', got {on_conflict!r}")
    edits.require_nonempty()
    if on_conflict == "first":
        return edits.drop_conflicts()
    edits.check_conflicts()
    return edits, []


def replace_settings(config: Any, overrides: Mapping[str, Any], where: str) -> Any:
    """``dataclasses.replace(config, **overrides)`` with an unknown name reported by name."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; valid: {sorted(names)}")
    return dataclasses.replace(config, **overrides)


@torch.inference_mode()
def greedy_continuations(editor: Editor, prompts: Sequence[str], max_new_tokens: int = 20, edited: bool = True,
                         batch_size: int = 16, **gen_kwargs: Any) -> list[str]:
    """Greedy continuations of ``prompts`` by ``editor.model``, inside ``editor.applied`` when
    ``edited``, left-padded in batches, without the prompt text."""
    model, tok = editor.model, editor.tokenizer
    out: list[str] = []
    dev = model_device(model)
    for i in range(0, len(prompts), batch_size):
        enc = tok(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True, padding_side="left").to(dev)
        enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
        kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id, **gen_kwargs}
        with editor.applied(model) if edited else nullcontext():
            seq = model.generate(**enc, **kw)
        out += tok.batch_decode(seq[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------
# name -> the editor class, or "module:Class" imported on first use (importing lks stays cheap)
_REGISTRY: dict[str, type[Editor] | str] = {
    "lks": "lks.editor:LKSEditor",
    "ft": "lks.baselines.ft:FTEditor",
    "memit": "lks.baselines.memit:MEMITEditor",
    "alphaedit": "lks.baselines.alphaedit:AlphaEditEditor",
    "alphaedit-seq": "lks.baselines.alphaedit:AlphaEditSeqEditor",
}


def register(name: str, cls: type[Editor] | str) -> None:
    """Make ``name`` a method of the grid and the command line (``cls``: an :class:`Editor`
    subclass, or ``"module:Class"``)."""
    _REGISTRY[name] = cls


def method_names() -> list[str]:
    """The registered methods, LKS first."""
    return list(_REGISTRY)


def editor_class(name: str) -> type[Editor]:
    """The editor class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown editing method {name!r}; choose one of {method_names()}")
    cls = _REGISTRY[name]
    if isinstance(cls, str):
        module, attr = cls.split(":")
        cls = _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    return cls


def method_label(name: str) -> str:
    """The name of a method in tables and figures (``"FT-L"``); an unregistered one: itself."""
    return editor_class(name).label if name in _REGISTRY else name


def load_editor(path: str | os.PathLike, model: nn.Module, tokenizer: Any) -> Editor:
    """Load a saved editor of any method (``config.json``'s ``method``; none: LKS, as saved before
    editors recorded it)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"checkpoint file {cfg_file} is missing")
    try:
        method = json.loads(cfg_file.read_text()).get("method", "lks")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"corrupt checkpoint file {cfg_file}: {e}") from e
    return editor_class(method).load(path, model, tokenizer)
