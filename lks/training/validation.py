"""Validation during a fit: held-out quality after every epoch, to stop when it stops improving.

With ``TrainConfig.val_edits = k`` a seeded sample of ``k`` edits gets two prompts that no loss
trains on and that evaluation never scores (:func:`validation_prompts`):

* the next phrasing the paraphrase bank pairs with the edit's prompt after the ``para_per_edit``
  trained ones (held-out generality: are all target tokens the argmax?);
* the next locality prompt after the ``loc_per_subject`` KL and ``gate_negatives`` gate prompts
  (held-out locality: is the next-token argmax the unedited model's?).

Their sequences run through the same cached fast path as the training steps
(:meth:`lks.training.fastpath.FastPath.upper_logits`), a few hundred rows per epoch. The score is
the mean of the two rates; the trainer keeps the best epoch's generator and stops after
``val_patience`` epochs without a better score (:meth:`lks.training.trainer.Trainer.train`).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import torch

from lks.config import TrainConfig
from lks.data import EditSet
from lks.hypernet import KBGenerator
from lks.training.fastpath import Cache, FastPath
from lks.training.losses import subject_table
from lks.training.prompts import (
    EditPrompts,
    paraphrase_bank,
    training_locality_prompts,
    training_paraphrase_prompts,
)
from lks.training.sequences import KIND_EQUIV, KIND_LOC, Seq, build_sequences


def validation_edits(n: int, cfg: TrainConfig) -> list[int]:
    """The sampled edits (indices, ascending): ``min(n, cfg.val_edits)`` of them, seeded by ``cfg.seed``."""
    k = min(n, cfg.val_edits)
    return sorted(random.Random(f"{cfg.seed}\x00validation").sample(range(n), k)) if k else []


def validation_prompts(edits: EditSet, cfg: TrainConfig) -> list[EditPrompts]:
    """Per edit: the first bank phrasing and the first locality prompt after those the fit trains on
    (either list may be empty when the bank or the templates have no more)."""
    bank = paraphrase_bank(dataclasses.replace(cfg, para_per_edit=cfg.para_per_edit + 1, w_equiv=1.0))
    k = cfg.loc_per_subject if cfg.w_loc > 0 else 0
    out = []
    for r in edits:
        para = training_paraphrase_prompts(r, cfg.para_per_edit + 1, bank)[cfg.para_per_edit:]
        loc = training_locality_prompts(r, k + cfg.gate_negatives + 1, cfg.seed, cfg.loc_templates)[k + cfg.gate_negatives:]
        out.append(EditPrompts(para, loc, len(loc)))
    return out


@dataclass
class Validation:
    """The validation sequences (held-out paraphrases and locality prompts) and their cache."""

    seqs: list[Seq]
    cache: Cache

    @classmethod
    def build(cls, fast: FastPath, scope: Any, edits: EditSet, cfg: TrainConfig) -> Validation | None:
        """None when ``cfg.val_edits`` is 0 or no sampled edit has a validation prompt."""
        picked = validation_edits(len(edits), cfg)
        if not picked:
            return None
        sub = EditSet([edits[i] for i in picked])
        # no continuation after the target: validation reads only the target and locality rows
        plain = dataclasses.replace(cfg, w_after=0.0)
        _, seqs, _ = build_sequences(fast.tokenizer, scope, sub, plain, validation_prompts(sub, cfg))
        seqs = [q for q in seqs if q.kind in (KIND_EQUIV, KIND_LOC)]
        if not seqs:
            return None
        return cls(seqs, fast.precompute(seqs, plain, progress=False))

    @torch.no_grad()
    def score(self, fast: FastPath, generator: KBGenerator, features: torch.Tensor,
              batch_size: int = 64) -> dict[str, float]:
        """``val_generality``, ``val_locality`` (rates over the prompts that exist) and ``val_score``
        (their mean, or the one that exists). Call inside ``fast.upper_pass`` as the steps run."""
        hits: dict[int, list[float]] = {KIND_EQUIV: [], KIND_LOC: []}
        for b in range(0, len(self.seqs), batch_size):
            batch = list(range(b, min(b + batch_size, len(self.seqs))))
            table = subject_table(generator, features, self.seqs, batch)
            pred = fast.upper_logits(self.cache, self.seqs, batch, table, generator.combine).argmax(-1).cpu()
            at = 0
            for j in batch:
                q = self.seqs[j]
                rows = pred[at:at + len(q.loss_pos)]
                at += len(q.loss_pos)
                if q.kind == KIND_EQUIV:
                    hits[KIND_EQUIV].append(float(rows[:len(q.loss_tgt)].tolist() == q.loss_tgt))
                else:  # the prompt's next token against the unedited model's argmax (top-k is sorted)
                    ref = self.cache.ref_idx[self.cache.ref_row[j] + len(q.loss_pos) - 1, 0]
                    hits[KIND_LOC].append(float(int(rows[-1]) == int(ref)))
        rates = {name: sum(h) / len(h) for name, h in (("val_generality", hits[KIND_EQUIV]),
                                                          ("val_locality", hits[KIND_LOC])) if h}
        return {**rates, "val_score": sum(rates.values()) / len(rates)}
