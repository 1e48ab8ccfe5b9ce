"""Weight-editing baselines behind the :class:`lks.LKSEditor` interface.

* ``ft`` - FT-L, constrained fine-tuning of one MLP output projection (:mod:`lks.baselines.ft`);
* ``memit`` - MEMIT, least-squares updates over a band of layers (:mod:`lks.baselines.memit`);
* ``alphaedit`` - AlphaEdit, MEMIT's update in the null space of preserved keys
  (:mod:`lks.baselines.alphaedit`).

Each editor has ``fit(edits)``, ``applied(model)``, ``generate(prompts)``, ``save(dir)`` and
``load(dir, model, tok)``; hyperparameters per model live under ``"baselines"`` in the model's
config file (``lks/configs/<model>.json``). :func:`load_editor` loads any saved editor, LKS or
baseline, by the ``method`` key of its ``config.json``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

# method -> (module, class)
METHODS = {"ft": ("lks.baselines.ft", "FTEditor"), "memit": ("lks.baselines.memit", "MEMITEditor"),
           "alphaedit": ("lks.baselines.alphaedit", "AlphaEditEditor")}


def editor_class(method: str) -> type:
    """The editor class of ``method`` (``"lks"`` or a key of :data:`METHODS`)."""
    if method == "lks":
        from lks.editor import LKSEditor

        return LKSEditor
    if method not in METHODS:
        raise ValueError(f"unknown editing method {method!r}; choose one of {['lks', *METHODS]}")
    module, name = METHODS[method]
    return getattr(importlib.import_module(module), name)


def load_editor(path: str, model: Any, tokenizer: Any) -> Any:
    """Load a saved editor of any method (``config.json``'s ``method``; none means LKS)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"checkpoint file {cfg_file} is missing")
    try:
        method = json.loads(cfg_file.read_text()).get("method", "lks")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"corrupt checkpoint file {cfg_file}: {e}") from e
    return editor_class(method).load(path, model, tokenizer)


def __getattr__(name: str) -> Any:
    lazy = {cls: mod for mod, cls in METHODS.values()}
    lazy.update({"FTConfig": "lks.baselines.ft", "MEMITConfig": "lks.baselines.memit",
                 "AlphaEditConfig": "lks.baselines.alphaedit", "key_second_moment": "lks.baselines.stats"})
    if name in lazy:
        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'lks.baselines' has no attribute {name!r}")
