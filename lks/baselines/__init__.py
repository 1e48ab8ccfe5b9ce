"""Weight-editing baselines, each an :class:`lks.methods.Editor` registered in :mod:`lks.methods`.

* ``ft`` - FT-L, constrained fine-tuning of one MLP output projection (:mod:`lks.baselines.ft`);
* ``memit`` - MEMIT, least-squares updates over a band of layers (:mod:`lks.baselines.memit`);
* ``alphaedit`` - AlphaEdit, MEMIT's update in the null space of preserved keys
  (:mod:`lks.baselines.alphaedit`); ``alphaedit-seq`` - its sequential form (batches of 100).

Hyperparameters per model live under ``"baselines"`` in the model's config file
(``lks/configs/<model>.json``). :func:`lks.methods.load_editor` loads any saved editor.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module (imported on first use)
_LAZY = {"FTEditor": "lks.baselines.ft", "FTConfig": "lks.baselines.ft", "MEMITEditor": "lks.baselines.memit",
         "MEMITConfig": "lks.baselines.memit", "AlphaEditEditor": "lks.baselines.alphaedit",
         "AlphaEditConfig": "lks.baselines.alphaedit", "AlphaEditSeqEditor": "lks.baselines.alphaedit",
         "AlphaEditSeqConfig": "lks.baselines.alphaedit", "key_second_moment": "lks.baselines.stats"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lks.baselines' has no attribute {name!r}")
