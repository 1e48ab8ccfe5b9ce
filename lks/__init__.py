"""lks - Latent Knowledge Scalpel.

Edit thousands of facts in a frozen language model by replacing the hidden state of an edited
subject's last token ("knowledge block") at one decoder layer with a vector produced by a small
hypernetwork.

Importing this package has no side effects: no model loads, no file writes, no network, and
torch itself is imported only when a submodule that needs it is first used. Public names are
re-exported lazily from their modules (``lks.load_model`` is ``lks.models.load_model``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "set_seed": "lks.utils",
    "resolve_device": "lks.utils",
    "ModelSpec": "lks.config",
    "EditorConfig": "lks.config",
    "TrainConfig": "lks.config",
    "model_spec": "lks.config",
    "load_model": "lks.models",
    "get_layers": "lks.models",
    "get_layer": "lks.models",
    "embedded_model_path": "lks.models",
    "LayerHooks": "lks.hooks",
    "EditRecord": "lks.data",
    "EditSet": "lks.data",
    "load_edits": "lks.formats",
    "builtin_edits": "lks.formats",
    "data_dir": "lks.datadir",
    "subject_token_index": "lks.data",
    "ScopeIndicator": "lks.scope",
    "ScopeMatch": "lks.scope",
    "make_generator": "lks.hypernet",
    "LKSEditor": "lks.editor",
    "recipe": "lks.config",
    "Trainer": "lks.training",
    "evaluate_edits": "lks.metrics",
    "evaluate_capability": "lks.capability",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
