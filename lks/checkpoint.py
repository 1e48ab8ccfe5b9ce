"""Saving, loading and resuming editors: safetensors for tensors, JSON for everything else.

An LKS editor (:meth:`lks.editor.LKSEditor.save`) is a directory::

    config.json              format version, the model it was made for, editor + train configs, history
    generator.safetensors    the generator's weights
    scope.safetensors        the feature vector of every subject
    subjects.json            the subjects and their feature texts

A running fit's checkpoint (``LKSEditor.fit(checkpoint_dir=...)``, written by
:class:`lks.training.Trainer` after every epoch) is a directory of two files, replaced by the
editor when the fit ends::

    train_state.json         epoch, best loss, history, edits' checksum, training config, optimizer layout, scheduler
    train_state.safetensors  the generator's weights (generator.*) and the optimizer's tensors (optimizer.*)

Writes are atomic (a crash mid-save leaves the previous save intact); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lks.models import get_layers
from lks.utils import atomic_dir, write_json

FORMAT_VERSION = 1


def write_checkpoint(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]],
                     documents: dict[str, dict[str, Any]]) -> Path:
    """Write an editor to the directory ``path``, atomically: ``config.json`` (``config`` with the
    format version), ``<name>.safetensors`` for each entry of ``tensors``, ``<name>.json`` for each
    of ``documents``."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_dir(path) as tmp:
        write_json(tmp / "config.json", {"format_version": FORMAT_VERSION, **config})
        for name, named in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, str(tmp / f"{name}.safetensors"))
        for name, doc in documents.items():
            write_json(tmp / f"{name}.json", doc)
    return path


def write_train_state(path: str | os.PathLike, state: dict[str, Any], tensors: dict[str, torch.Tensor],
                      optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """A running fit's checkpoint in the directory ``path``, atomically: ``train_state.json``
    (``state``, the optimizer's layout, the scheduler) and ``train_state.safetensors`` (``tensors``
    and the optimizer's tensors, ``optimizer.<name>``)."""
    from safetensors.torch import save_file

    flat, meta = optimizer_to_flat(optimizer)
    with atomic_dir(Path(path)) as tmp:
        save_file({**{k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                   **{f"optimizer.{k}": v for k, v in flat.items()}}, str(tmp / "train_state.safetensors"))
        write_json(tmp / "train_state.json", {**state, "optimizer": meta, "scheduler": scheduler.state_dict()})


def read_train_state(path: str | os.PathLike, running: dict[str, Any], optimizer: torch.optim.Optimizer,
                     scheduler: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """``(state, tensors)`` of the running fit checkpointed in ``path``, with the optimizer and
    scheduler loaded from it; None when it holds none. A checkpoint whose state differs from
    ``running`` in any of its keys (the edits' checksum, the training config) is refused."""
    path = Path(path)
    if not (path / "train_state.json").is_file():
        return None
    state = read_json(path / "train_state.json")
    if any(state.get(k) != v for k, v in running.items()):
        raise ValueError(f"checkpoint {path} holds a run on other edits or another training config; "
                         "use another checkpoint_dir or resume=False")
    tensors = read_tensors(path / "train_state.safetensors")
    optimizer_from_flat(optimizer, {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")},
                        state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state, {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}


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
