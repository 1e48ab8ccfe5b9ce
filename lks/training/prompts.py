"""Prompts generated for training, never the ones evaluation scores: locality prompts (the
edited subject's OTHER attributes, from relation templates, for the KL loss) and extra paraphrases
of an edit's prompt (from the paraphrase bank, :func:`lks.data.paraphrase_templates`), and each
edit's prompts under a training config (:func:`edit_prompts`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass

from lks.config import TrainConfig
from lks.data import EditRecord, _scored_prompts, paraphrase_templates, subject_template

# Generic relations for the KL (locality) loss: prompts about the edited subject's OTHER attributes
# must keep their original distribution. They are templates rather than benchmark prompts so the
# evaluation's locality prompts are never seen in training.
LOCALITY_TEMPLATES: tuple[str, ...] = (
    # people
    "{} was born in", "The native language of {} is", "{} is a citizen of", "{} works in the field of",
    "{} died in the city of", "The profession of {} is", "{} was educated at", "The religion of {} is",
    "{} is best known for", "{} speaks the language",
    # places
    "{} is located in", "{} is a city in the country of", "The population of {} is", "The official language of {} is",
    "{} shares a border with", "The climate of {} is", "The capital of {} is",
    # organisations, products and works
    "The headquarters of {} is in", "{} was founded in the year", "{} was founded by", "The CEO of {} is",
    "{} is owned by", "{} was created by", "{} is a member of",
)


LOCALITY_TEMPLATE_SETS = ("builtin", "harvested", "both")


def harvest_locality_templates(edits: Iterable[EditRecord], min_count: int = 5) -> dict[str, int]:
    """Relation templates of the edits' own locality prompts (subject replaced by ``{}``) that occur
    at least ``min_count`` times, with their counts, most frequent first.

    The shipped set (``lks/assets/locality_templates.json``, used by ``TrainConfig.loc_templates``)
    was harvested from records 5,000-9,999 of the LKS CounterFact and zsRE files, so the records the
    notebooks evaluate (the first N <= 1,000) did not contribute; see ``harvested_locality_templates``.
    """
    counts: dict[str, int] = {}
    for r in edits:
        for p, _ in r.locality:
            if (t := subject_template(p, r.subject)) is not None:
                counts[t] = counts.get(t, 0) + 1
    return dict(sorted(((t, c) for t, c in counts.items() if c >= min_count), key=lambda tc: (-tc[1], tc[0])))


def harvested_locality_templates() -> tuple[str, ...]:
    """The shipped harvested locality templates (see :func:`harvest_locality_templates`)."""
    from importlib import resources

    text = resources.files("lks").joinpath("assets/locality_templates.json").read_text(encoding="utf-8")
    return tuple(json.loads(text)["templates"])


def locality_templates(which: str = "builtin") -> tuple[str, ...]:
    """Templates for training locality prompts: ``"builtin"`` (:data:`LOCALITY_TEMPLATES`, generic
    relations), ``"harvested"`` (relations of the data sets' own locality prompts) or ``"both"``."""
    if which not in LOCALITY_TEMPLATE_SETS:
        raise ValueError(f"unknown locality template set {which!r}; choose one of {list(LOCALITY_TEMPLATE_SETS)}")
    out = LOCALITY_TEMPLATES if which != "harvested" else ()
    if which != "builtin":
        out = out + tuple(t for t in harvested_locality_templates() if t not in out)
    return out


def training_paraphrase_prompts(record: EditRecord, k: int, bank: dict[str, dict[str, int]] | None = None) -> list[str]:
    """Up to ``k`` extra training paraphrases of ``record.prompt``: the phrasings that the bank pairs
    with the prompt's template, most frequent first, filled with the subject.

    Any prompt equal (case-insensitively, stripped) to the record's prompt, a rephrase (the held-out
    ones included) or an evaluation locality/neighbourhood prompt is excluded, so no prompt that
    evaluation scores for this edit is trained on; the same PHRASING may be evaluated for another
    subject (docs/experiments.md reports generality both ways).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    t = subject_template(record.prompt, record.subject)
    if k == 0 or t is None:
        return []
    bank = paraphrase_templates() if bank is None else bank
    seen = _scored_prompts(record)
    out = [c.replace("{}", record.subject) for c in bank.get(t, {})]
    return [c for c in out if c.strip().casefold() not in seen][:k]


def training_locality_prompts(record: EditRecord, k: int, seed: int = 0, templates: str = "builtin") -> list[str]:
    """``k`` locality templates filled with ``record.subject`` for training (fewer if not enough remain).

    Deterministic per ``(record.subject, seed)``; any prompt equal (case-insensitively, stripped) to
    the record's prompt, a rephrase, or an evaluation locality/neighbourhood prompt is excluded, so
    training never sees a prompt that evaluation scores (with ``templates="harvested"`` the same
    RELATION may be trained for other subjects; the closing notes and README say so beside numbers).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    seen = _scored_prompts(record)
    cands = [t.replace("{}", record.subject) for t in locality_templates(templates)]
    cands = [c for c in cands if c.strip().casefold() not in seen]
    # a str seed is hashed with SHA-512 by random.Random, so this is stable across processes
    random.Random(f"{seed}\x00{record.subject}").shuffle(cands)
    return cands[:k]


def paraphrase_bank(cfg: TrainConfig) -> dict[str, dict[str, int]] | None:
    """The paraphrase bank when ``cfg`` trains bank paraphrases, else None."""
    return paraphrase_templates() if cfg.para_per_edit and cfg.w_equiv > 0 else None


def equiv_prompts(record: EditRecord, cfg: TrainConfig, bank: dict[str, dict[str, int]] | None) -> list[str]:
    """The equivalence loss's prompts of an edit: its own first rephrase (unless held out), then
    phrasings of its relation from the bank; none when the loss is off."""
    if cfg.w_equiv <= 0:
        return []
    return [*record.rephrases[:int(cfg.train_rephrase)], *training_paraphrase_prompts(record, cfg.para_per_edit, bank)]


@dataclass(frozen=True)
class EditPrompts:
    """The prompts a fit trains on for one edit, built once (:func:`edit_prompts`) for the training
    sequences (:func:`lks.training.sequences.build_sequences`) and the gate examples
    (:func:`lks.training.gate.gate_examples`)."""

    equiv: list[str]     # the equivalence loss's prompts (equiv_prompts)
    locality: list[str]  # the KL loss's locality prompts, then TrainConfig.gate_negatives more for the gate
    n_kl: int            # how many of ``locality`` the KL loss takes

    @property
    def kl_locality(self) -> list[str]:
        return self.locality[:self.n_kl]


def edit_prompts(edits: Iterable[EditRecord], cfg: TrainConfig) -> list[EditPrompts]:
    """Each edit's training prompts under ``cfg``. The locality list is one seeded shuffle cut after
    ``loc_per_subject + gate_negatives`` (:func:`training_locality_prompts`), so the gate's extra
    negatives are never KL prompts."""
    bank = paraphrase_bank(cfg)  # parsed once per fit
    k = cfg.loc_per_subject if cfg.w_loc > 0 else 0
    out = []
    for r in edits:
        locs = training_locality_prompts(r, k + cfg.gate_negatives, cfg.seed, cfg.loc_templates)
        out.append(EditPrompts(equiv_prompts(r, cfg, bank), locs, min(k, len(locs))))
    return out
