"""A fit's prepared training set on disk, so that a resumed fit skips its preparation.

Preparing a 10,000-edit fit of the SmolLM2-135M recipe takes about two hours on one CPU thread
(200 CounterFact edits, one thread, 2026-11: sequences with the unedited model's continuations 74
s, gate examples 50 s, layer-L cache 33 s; the continuations are now part of the cache's pass), as long as several epochs; without this a fit resumed from its
last epoch would redo all of it. With a checkpoint directory, :meth:`lks.LKSEditor.fit` keeps the
three parts under ``<lks cache dir>/prepared/<key>/``, each written (atomically) as soon as it is
ready, and deletes the folder when training ends.

The key hashes everything the parts depend on: the model's registered name, the editor and
training configs, the edits, the precision and device type, and the source of the modules that
compute them, so that changing that code invalidates the folder. A model without a registered
name has no stable key and nothing is stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lks.suffix import PrefixKV
from lks.training.fastpath import Cache
from lks.training.gate import GateExamples
from lks.training.sequences import Seq
from lks.utils import save_tensors

# the modules whose code computes the stored parts (paths relative to the lks package)
SOURCES = ("data.py", "scope.py", "hooks.py", "models.py", "suffix.py", "training/sequences.py", "training/gate.py",
           "training/prompts.py", "training/fastpath.py", "training/precision.py", "training/stored.py")
# 3: prefix keys/values as a lks.suffix.PrefixKV; 4: layer-L states from the subject on (Cache.first);
# 5: the continuations after the target generated in the cache's pass (sequences saved again with the cache)
FORMAT = "lks-prepared-5"


def prepared_dir(model: Any, spec: dict[str, Any]) -> Path | None:
    """The folder of a fit's prepared parts: ``spec`` (JSON-able: configs, edits checksum,
    precision, ...) plus the model's name and the source hash; None for an unnamed model."""
    from lks.models import cache_dir

    name = getattr(model, "lks_name", "")
    if not name:
        return None
    root = Path(__file__).resolve().parent.parent
    source = hashlib.sha256(b"".join((root / s).read_bytes() for s in SOURCES)).hexdigest()
    blob = json.dumps({"format": FORMAT, "model": name, "source": source, **spec}, sort_keys=True, default=str)
    return cache_dir() / "prepared" / hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read(path: Path) -> dict[str, torch.Tensor] | None:
    return load_file(str(path)) if path.is_file() else None


def save_sequences(folder: Path, per_edit: list[list[int]], seqs: list[Seq], skipped: dict[str, int]) -> None:
    """The training sequences (token ids and positions: JSON, a few MB at 10,000 edits)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".sequences.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"per_edit": per_edit, "skipped": skipped, "seqs": [list(asdict(q).values()) for q in seqs]}))
    os.replace(tmp, folder / "sequences.json")


def load_sequences(folder: Path) -> tuple[list[list[int]], list[Seq], dict[str, int]] | None:
    path = folder / "sequences.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    names = [f.name for f in fields(Seq)]
    return d["per_edit"], [Seq(**dict(zip(names, row))) for row in d["seqs"]], d["skipped"]


def save_gate(folder: Path, gate: GateExamples) -> None:
    save_tensors(folder / "gate.safetensors", {"kb": gate.kb, "subj": gate.subj, "label": gate.label,
                                         "skip": torch.tensor(sorted(gate.skip), dtype=torch.long)})


def load_gate(folder: Path) -> GateExamples | None:
    t = _read(folder / "gate.safetensors")
    if t is None:
        return None
    return GateExamples(t["kb"], t["subj"], t["label"], set(t["skip"].tolist()))


def save_cache(folder: Path, cache: Cache) -> None:
    tensors = {"states": cache.states, "offsets": torch.tensor(cache.offsets, dtype=torch.long),
               "first": torch.tensor(cache.first, dtype=torch.long),
               "ref_row_seq": torch.tensor(list(cache.ref_row), dtype=torch.long),
               "ref_row_at": torch.tensor(list(cache.ref_row.values()), dtype=torch.long)}
    for name in ("ref_logp", "ref_idx", "ref_tail"):
        if getattr(cache, name) is not None:
            tensors[name] = getattr(cache, name)
    if cache.prefix is not None and cache.prefix.rows is not None:
        tensors.update({"kv": cache.prefix.rows, "kv_index": cache.prefix.index,
                        "kv_offsets": torch.tensor(cache.prefix.offsets, dtype=torch.long),
                        "kv_lengths": torch.tensor(cache.prefix.lengths, dtype=torch.long)})
    save_tensors(folder / "cache.safetensors", tensors)


def load_cache(folder: Path) -> Cache | None:
    t = _read(folder / "cache.safetensors")
    if t is None:
        return None
    prefix = None
    if "kv" in t:
        prefix = PrefixKV(t["kv_index"], t["kv_offsets"].tolist(), t["kv_lengths"].tolist(), t["kv"].shape[0], t["kv"])
    return Cache(t["states"], t["offsets"].tolist(), t["first"].tolist(), t.get("ref_logp"), t.get("ref_idx"),
                 t.get("ref_tail"), dict(zip(t["ref_row_seq"].tolist(), t["ref_row_at"].tolist())), prefix)


def remove(folder: Path | None) -> None:
    """Delete a prepared folder (the fit it served has ended)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
