"""Saving, loading and resuming editors: safetensors for tensors, JSON for everything else.

A saved editor is a directory::

    config.json              format version, the model it was made for, editor + train configs, history
    generator.safetensors    the generator's weights
    scope.safetensors        the feature vector of every subject
    subjects.json            the subjects and their feature texts
    train_state.*            (checkpoints of a running fit only) optimizer, scheduler, epoch

Writes are atomic (a crash mid-save leaves the previous save intact); nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lks.config import EditorConfig, TrainConfig, from_dict
from lks.models import get_layers, model_device
from lks.scope import ScopeIndicator
from lks.utils import atomic_dir, write_json

if TYPE_CHECKING:
    from lks.editor import LKSEditor

FORMAT_VERSION = 1


def save_editor(editor: LKSEditor, path: str | os.PathLike, *, train_state: dict | None = None,
                optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> Path:
    """Write ``editor`` to the directory ``path`` (with ``train_state`` and the optimizer: a resumable checkpoint)."""
    import transformers
    from safetensors.torch import save_file

    import lks

    editor._require_fitted()
    assert editor.features is not None
    path = Path(path)
    cfg = {
        "format_version": FORMAT_VERSION,
        "lks_version": lks.__version__,
        "method": editor.method,
        "model": model_identity(editor.model) | {"class": type(editor.model).__name__},
        "editor": dataclasses.asdict(editor.config),
        "train": dataclasses.asdict(editor.train_config) if editor.train_config else None,
        "n_edits": editor.n_edits,
        "n_subjects": len(editor.subjects),
        "data_checksum": editor.data_checksum,
        "history": editor.history,
        "fit_seconds": editor.fit_seconds,
        "precision_used": editor.precision_used,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    with atomic_dir(path) as tmp:
        write_json(tmp / "config.json", cfg)
        save_file({k: v.detach().cpu().contiguous() for k, v in editor.generator.state_dict().items()},
                  str(tmp / "generator.safetensors"))
        save_file({"features": editor.features.detach().cpu().contiguous()}, str(tmp / "scope.safetensors"))
        write_json(tmp / "subjects.json", {"subjects": editor.subjects, "feature_texts": editor.feature_texts})
        if train_state is not None and optimizer is not None:
            tensors, meta = optimizer_to_flat(optimizer)
            save_file(tensors, str(tmp / "train_state.safetensors"))
            write_json(tmp / "train_state.json", {**train_state, "optimizer": meta,
                                                  "scheduler": scheduler.state_dict() if scheduler else None})
    return path


def load_editor(cls: type[LKSEditor], path: str | os.PathLike, model: nn.Module, tokenizer: Any) -> LKSEditor:
    """Read a saved editor for ``model``; a clear error if it was made for another model or a file
    is missing or corrupt."""
    path = Path(path)
    cfg = read_json(path / "config.json")
    check_model(cfg.get("model", {}), model, path)
    editor = cls(model, tokenizer, from_dict(EditorConfig, cfg["editor"], f"{path}/config.json:editor"))
    editor.generator.load_state_dict(read_tensors(path / "generator.safetensors"))
    editor.generator.to(model_device(model)).eval()
    subj = read_json(path / "subjects.json")
    editor.subjects, editor.feature_texts = subj["subjects"], subj["feature_texts"]
    editor.features = read_tensors(path / "scope.safetensors")["features"].to(model_device(model))
    if editor.features.shape != (len(editor.subjects), editor.d):
        raise ValueError(f"corrupt checkpoint {path}: {len(editor.subjects)} subjects but features of shape "
                         f"{tuple(editor.features.shape)}")
    editor.scope = ScopeIndicator(editor.subjects, fuzzy_threshold=editor.config.fuzzy_threshold)
    editor.train_config = from_dict(TrainConfig, cfg["train"], "train") if cfg.get("train") else None
    editor.history, editor.data_checksum, editor.n_edits = cfg.get("history", []), cfg.get("data_checksum", ""), cfg.get("n_edits", 0)
    editor.precision_used = cfg.get("precision_used", "")
    editor.fit_seconds = cfg.get("fit_seconds")  # None: saved before lks recorded it
    return editor


def resume_state(editor: LKSEditor, path: str | os.PathLike, opt: torch.optim.Optimizer, sched: Any) -> dict | None:
    """Load the generator, optimizer and scheduler of a running fit's checkpoint into ``editor``
    (``None`` when ``path`` holds none); refuses a checkpoint of other edits or another config."""
    path = Path(path)
    if not (path / "train_state.json").is_file():
        return None
    cfg = read_json(path / "config.json")
    if cfg.get("data_checksum") != editor.data_checksum or cfg.get("train") != dataclasses.asdict(editor.train_config):
        raise ValueError(f"checkpoint {path} holds a run on other edits or another training config; "
                         "use another checkpoint_dir or resume=False")
    state = read_json(path / "train_state.json")
    editor.generator.load_state_dict(read_tensors(path / "generator.safetensors"))
    optimizer_from_flat(opt, read_tensors(path / "train_state.safetensors"), state["optimizer"])
    if state.get("scheduler"):
        sched.load_state_dict(state["scheduler"])
    editor.history = list(cfg.get("history", []))
    return state


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint records of the model it was made for."""
    return {"name": getattr(model, "lks_name", ""), "hidden_size": int(model.config.hidden_size),
            "num_layers": len(get_layers(model))}


def check_model(want: dict[str, Any], model: nn.Module, path: Path) -> None:
    """Refuse a checkpoint of ``path`` made for another model than ``model``."""
    have = model_identity(model)
    if want.get("hidden_size") != have["hidden_size"] or want.get("num_layers") != have["num_layers"]:
        raise ValueError(f"checkpoint {path} was made for model {want.get('name')!r} (hidden {want.get('hidden_size')}, "
                         f"{want.get('num_layers')} layers), not for {have['name']!r} (hidden {have['hidden_size']}, "
                         f"{have['num_layers']} layers)")
    if want.get("name") and have["name"] and want["name"] != have["name"]:
        raise ValueError(f"checkpoint {path} was made for model {want['name']!r}, but the model given is "
                         f"{have['name']!r}")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt checkpoint file {path}: {e}") from e


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated headers/data
        raise ValueError(f"corrupt checkpoint file {path} (truncated or not safetensors): {e}") from e


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as named tensors (safetensors) plus JSON metadata."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = []
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
            meta["state"][str(pid)].append(k)
    return tensors, meta


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {int(pid): {k: tensors[f"{pid}.{k}"] for k in keys} for pid, keys in meta["state"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
