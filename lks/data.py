"""Edit data: records and sets, the token position of a subject's last token (the "knowledge
block" lks replaces), and the forms of evaluation prompts.

* :class:`EditRecord` and :class:`EditSet`, with our own JSON form of a set (:meth:`EditSet.to_json`,
  :meth:`EditSet.from_json`);
* subject spans and token positions: :func:`find_subject`, :func:`subject_token_index`,
  :func:`subject_positions`;
* evaluation-prompt forms, used by :mod:`lks.metrics`: :func:`subject_template`,
  :func:`rephrase_form`, and the paraphrase bank (:func:`harvest_paraphrase_templates`,
  :func:`paraphrase_templates`).

Elsewhere: the public benchmark formats, :func:`lks.formats.load_edits`
and :func:`lks.formats.builtin_edits` are in :mod:`lks.formats`; the data directory and pinned
downloads (:func:`lks.datadir.data_file`) in :mod:`lks.datadir`; the prompts generated for
training (locality templates, extra paraphrases) in :mod:`lks.training.prompts`.

Nothing here touches the network or reads a data file at import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:  # torch/transformers are imported lazily: loading edit data needs neither
    import torch
    from transformers import BatchEncoding, PreTrainedTokenizerBase


class InvalidEditError(ValueError):
    """An edit record that cannot be used (empty field, subject absent from its prompt)."""


class DataChecksumError(ValueError):
    """A data file whose SHA-256 differs from the pinned value."""


# --------------------------------------------------------------------------------------------
# subject spans and token positions
# --------------------------------------------------------------------------------------------

def find_subject(prompt: str, subject: str) -> tuple[int, int]:
    """Character span ``(start, end)`` of the FIRST mention of ``subject`` in ``prompt``.

    An exact match is preferred; otherwise the first case-insensitive match (Unicode casefold) is
    returned. Casefolding can change a string's length ("ß" -> "ss", "İ" -> "i̇"), so the search
    runs on a folded copy that remembers which original character produced each folded one, and a
    match is only accepted when it starts and ends on original-character boundaries: the span is
    always in ``prompt``'s own offsets.

    Raises:
        ValueError: ``subject`` is empty or does not occur in ``prompt``.
    """
    if not subject:
        raise ValueError(f"empty subject for prompt {prompt!r}")
    i = prompt.find(subject)
    if i >= 0:
        return i, i + len(subject)
    owner: list[int] = []  # owner[k]: index in prompt of the char that produced folded char k
    for j, ch in enumerate(prompt):
        owner.extend([j] * len(ch.casefold()))
    folded, needle = prompt.casefold(), subject.casefold()
    k = folded.find(needle)
    while k >= 0:
        e = k + len(needle)
        if (k == 0 or owner[k - 1] != owner[k]) and (e == len(folded) or owner[e] != owner[e - 1]):
            return owner[k], owner[e - 1] + 1
        k = folded.find(needle, k + 1)
    raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")


def subject_token_index(offsets: Sequence[Sequence[int]] | Any, start: int, end: int) -> int:
    """Index of the last token overlapping the character span ``[start, end)``.

    That is the token containing character ``end - 1``: the subject's last token, whose hidden
    state lks replaces. Zero-width tokens (special and padding tokens, offset ``(0, 0)``) are
    ignored, so padding on either side and BOS/EOS tokens do not matter. A token's offsets may or
    may not include its leading space (" Paris" as (5, 11) or (6, 11)): either way it overlaps the
    span only if it holds subject characters.

    Args:
        offsets: the tokenizer's offset mapping for ONE sequence: ``(start, end)`` per token
            (list, tuple or an ``(n, 2)`` tensor/array).
        start: first character of the subject.
        end: one past its last character.

    Raises:
        ValueError: the span is empty or no token overlaps it (e.g. it was truncated away).
    """
    if end <= start:
        raise ValueError(f"empty character span [{start}, {end})")
    if hasattr(offsets, "tolist"):
        offsets = offsets.tolist()
    last = -1
    for i, (s, e) in enumerate(offsets):
        if e > s and s < end and e > start:
            last = i
    if last < 0:
        raise ValueError(f"no token overlaps characters [{start}, {end}); offsets={list(offsets)}")
    return last


def subject_positions(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], subjects: Sequence[str],
                      padding_side: str = "right") -> tuple[BatchEncoding, torch.Tensor]:
    """Encode a batch and locate each subject's last token in the encoding actually returned.

    Positions come from the offsets of this very padded batch, so left padding shifts them
    correctly. The tokenizer's ``padding_side`` is set for the call and restored afterwards
    (passing it as a call argument is not supported by every transformers version we allow).

    Returns:
        ``(encoding, positions)``: a ``BatchEncoding`` of tensors (``input_ids``,
        ``attention_mask``; no ``offset_mapping``) and a ``LongTensor`` of shape ``(batch,)``.
    """
    import torch

    if len(texts) != len(subjects):
        raise ValueError(f"{len(texts)} texts but {len(subjects)} subjects")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("subject_positions needs a fast tokenizer (offset mappings)")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    old = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        enc = tokenizer(list(texts), return_offsets_mapping=True, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = old
    offsets = enc.pop("offset_mapping")
    pos = [subject_token_index(offsets[b], *find_subject(t, s)) for b, (t, s) in enumerate(zip(texts, subjects, strict=True))]
    return enc, torch.tensor(pos, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# records and sets
# --------------------------------------------------------------------------------------------

def _pairs(items: Iterable[Any], what: str) -> list[tuple[str, str]]:
    out = []
    for it in items or ():
        if not isinstance(it, (list, tuple)) or len(it) != 2:
            raise InvalidEditError(f"{what} entries must be (prompt, answer) pairs, got {it!r}")
        out.append((str(it[0]), str(it[1])))
    return out


@dataclass
class EditRecord:
    """One counterfactual edit ``(subject, prompt) -> target`` with its evaluation prompts.

    Attributes:
        subject: the entity edited; must occur in ``prompt`` (case-insensitively at least).
        prompt: text ending right before the object, e.g. "The capital of France is".
        target: the new object, without a leading space ("Rome").
        ground_truth: the true object, when known.
        rephrases: paraphrases of ``prompt``; ``[0]`` may be used in training, later ones are
            held out for generality.
        locality: same-subject prompts about OTHER attributes, with their answers.
        neighborhood: different-subject prompts with the same relation, with their answers.
        case_id: id in the source benchmark (the list index when the source has none).
    """

    subject: str
    prompt: str
    target: str
    ground_truth: str | None = None
    rephrases: list[str] = field(default_factory=list)
    locality: list[tuple[str, str]] = field(default_factory=list)
    neighborhood: list[tuple[str, str]] = field(default_factory=list)
    case_id: int | str | None = None

    def __post_init__(self) -> None:
        for name in ("subject", "prompt", "target"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise InvalidEditError(f"EditRecord.{name} must be a non-empty string, got {v!r} "
                                       f"(subject={self.subject!r}, prompt={self.prompt!r})")
        # feature_text joins prompt and target with ONE space, so neither side may bring its own.
        self.prompt, self.target = self.prompt.rstrip(), self.target.strip()
        if isinstance(self.ground_truth, str):
            self.ground_truth = self.ground_truth.strip()
        if isinstance(self.rephrases, str):
            self.rephrases = [self.rephrases]
        self.rephrases = [str(r) for r in self.rephrases or ()]
        self.locality = _pairs(self.locality, "locality")
        self.neighborhood = _pairs(self.neighborhood, "neighborhood")
        try:
            find_subject(self.prompt, self.subject)
        except ValueError:
            raise InvalidEditError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}"
                                   f" (case_id={self.case_id!r})") from None

    def feature_text(self) -> str:
        """``prompt + " " + target``: the text whose subject token the editor trains on."""
        return f"{self.prompt} {self.target}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (pairs as 2-lists); the inverse of :meth:`from_dict`."""
        d = dataclasses.asdict(self)
        d["locality"] = [list(p) for p in self.locality]
        d["neighborhood"] = [list(p) for p in self.neighborhood]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditRecord:
        """Build from :meth:`to_dict` output; unknown keys are an error (catches format mix-ups)."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - names
        if extra:
            raise InvalidEditError(f"unknown EditRecord keys {sorted(extra)} (known: {sorted(names)})")
        return cls(**d)


class EditSet(Sequence[EditRecord]):
    """An ordered, named collection of :class:`EditRecord` (may be empty; see :meth:`require_nonempty`)."""

    def __init__(self, records: Iterable[EditRecord] = (), name: str = "edits") -> None:
        self.records: list[EditRecord] = list(records)
        self.name = name
        for i, r in enumerate(self.records):
            if not isinstance(r, EditRecord):
                raise TypeError(f"EditSet item {i} is {type(r).__name__}, not EditRecord")

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[EditRecord]:
        return iter(self.records)

    @overload
    def __getitem__(self, i: int) -> EditRecord: ...
    @overload
    def __getitem__(self, i: slice) -> EditSet: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return EditSet(self.records[i], name=self.name)
        return self.records[operator.index(i)]

    def __eq__(self, other: object) -> bool:  # content equality; the name is a label only
        return isinstance(other, EditSet) and self.records == other.records

    __hash__ = None  # mutable container

    def __repr__(self) -> str:
        return f"EditSet(name={self.name!r}, n={len(self)})"

    def subjects(self) -> list[str]:
        """Subjects in record order (aligned with the records; duplicates kept)."""
        return [r.subject for r in self.records]

    def head(self, n: int) -> EditSet:
        """The first ``n`` records."""
        return EditSet(self.records[:_check_n(n)], name=self.name)

    def sample(self, n: int, seed: int = 0) -> EditSet:
        """``n`` records drawn without replacement, deterministic in ``seed``, in original order."""
        if _check_n(n) > len(self):
            raise ValueError(f"cannot sample {n} records from edit set {self.name!r} of {len(self)}")
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        return EditSet([self.records[i] for i in idx], name=f"{self.name}-sample{n}-seed{seed}")

    def checksum(self) -> str:
        """SHA-256 of a canonical JSON dump of the records (order matters, the name does not)."""
        blob = json.dumps([r.to_dict() for r in self.records], sort_keys=True, ensure_ascii=False,
                          separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def require_nonempty(self) -> EditSet:
        """Return ``self``; raise ``ValueError`` when there is nothing to edit."""
        if not self.records:
            raise ValueError(f"empty edit set {self.name!r}: there are no edits to apply "
                             "(check the data file, the `n` limit or the filters used to build it)")
        return self

    def drop_conflicts(self) -> tuple[EditSet, list[int]]:
        """The set without conflicts, and the indices dropped: of the edits with the same subject and
        prompt (case and outer spaces ignored) but another target, the first is kept."""
        seen: dict[tuple[str, str], str] = {}
        keep, dropped = [], []
        for i, r in enumerate(self.records):
            key = (r.subject, r.prompt.strip().lower())
            if key in seen and seen[key] != r.target:
                dropped.append(i)
                continue
            seen.setdefault(key, r.target)
            keep.append(r)
        return EditSet(keep, name=self.name), dropped

    def check_conflicts(self) -> EditSet:
        """Return ``self``; raise ``ValueError`` naming the first conflict (see :meth:`drop_conflicts`)."""
        seen: dict[tuple[str, str], str] = {}
        for r in self.records:
            key = (r.subject, r.prompt.strip().lower())
            if key in seen and seen[key] != r.target:
                raise ValueError(f"conflicting edits for subject {r.subject!r}: prompt {r.prompt!r} has targets "
                                 f"{seen[key]!r} and {r.target!r}; keep one of them")
            seen[key] = r.target
        return self

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the records as a JSON list (atomically)."""
        from lks.utils import write_json

        write_json(path, [r.to_dict() for r in self.records])

    @classmethod
    def from_json(cls, path: str | os.PathLike, name: str | None = None) -> EditSet:
        """Read a file written by :meth:`to_json`; the name defaults to the file stem."""
        path = Path(path)
        return _parse_own(_read_json(path), name or path.stem, None, str(path))


def _check_n(n: int | None) -> int | None:
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    return n


# --------------------------------------------------------------------------------------------
# our own JSON form (EditSet.to_json / from_json)
# --------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _own_record(i: int, d: dict) -> EditRecord:
    return EditRecord.from_dict(d)


def _parse_own(items: Any, name: str, n: int | None, source: str) -> EditSet:
    # our own files must be clean: no skipping, the first bad record raises with its index
    if not isinstance(items, list):
        raise ValueError(f"{source}: expected a JSON list of records")
    out = []
    for i, d in enumerate(items[:n] if n is not None else items):
        try:
            out.append(_own_record(i, d))
        except (InvalidEditError, TypeError) as e:
            raise InvalidEditError(f"{source}: record {i}: {e}") from e
    return EditSet(out, name=name)


# --------------------------------------------------------------------------------------------
# evaluation-prompt forms and the paraphrase bank
# --------------------------------------------------------------------------------------------

def subject_template(text: str, subject: str) -> str | None:
    """``text`` with its one mention of ``subject`` replaced by ``{}`` (None if not exactly one)."""
    return text.replace(subject, "{}") if subject and text.count(subject) == 1 else None


# a sentence end (optionally closed by a quote or bracket) followed by white space, or a line break
_SENTENCE_BREAK = re.compile(r"[.!?][\"')\]]*\s|\n")


def rephrase_form(text: str, subject: str) -> str:
    """``"paraphrase"`` if ``text`` names ``subject`` after a sentence break, else ``"generation"``.

    CounterFact's MEND-form ``rephrase_prompt`` (our held-out paraphrase) mixes two kinds of ROME
    prompt. ROME's *paraphrase prompts* put a random sentence before the reworded relation ("Ádám
    Rajhona, 72, Hungarian actor. The twin city of Kharkiv is"); its *generation prompts* have no
    such prefix and often ask another attribute of the subject ("Lon Chaney speaks" -> "Lon Chaney
    lives in"). The sentence break before the subject tells them apart. A title such as "Dr. "
    right before the subject would also count as one; the shortest prefixes found this way in the
    first 1,000 CounterFact records ("vol. ", "Press. ") are fragments of ROME's random sentences.
    Raises ``ValueError`` if the subject is not in ``text``.
    """
    start, _ = find_subject(text, subject)
    return "paraphrase" if _SENTENCE_BREAK.search(text[:start]) else "generation"


def _scored_prompts(record: EditRecord) -> set[str]:
    """Every prompt that evaluation may score for ``record`` (stripped, case-folded): training-prompt
    generators exclude them."""
    return {x.strip().casefold() for x in (record.prompt, *record.rephrases,
                                           *(p for p, _ in record.locality), *(p for p, _ in record.neighborhood))}


def harvest_paraphrase_templates(edits: Iterable[EditRecord]) -> dict[str, dict[str, int]]:
    """Relation phrasings that a data set pairs itself: each record whose prompt and first rephrase
    both name the subject once links the two templates (subject replaced by ``{}``), both ways.

    Returns ``{template: {paraphrase template: count}}``, each inner dict most frequent first. The
    shipped bank (``lks/assets/paraphrase_templates.json``, used by ``TrainConfig.para_per_edit``)
    comes from records 5,000-9,999 of the LKS CounterFact and zsRE files and only their LKS
    ``generality`` field, never from the MEND rephrases that evaluation holds out.
    """
    pairs: dict[str, dict[str, int]] = {}
    for r in edits:
        if not r.rephrases:
            continue
        a, b = subject_template(r.prompt, r.subject), subject_template(r.rephrases[0], r.subject)
        if a is None or b is None or a == b:
            continue
        for x, y in ((a, b), (b, a)):
            pairs.setdefault(x, {})[y] = pairs.get(x, {}).get(y, 0) + 1
    return {t: dict(sorted(d.items(), key=lambda tc: (-tc[1], tc[0]))) for t, d in sorted(pairs.items())}


def paraphrase_templates() -> dict[str, dict[str, int]]:
    """The shipped paraphrase bank (see :func:`harvest_paraphrase_templates`)."""
    from importlib import resources

    text = resources.files("lks").joinpath("assets/paraphrase_templates.json").read_text(encoding="utf-8")
    return json.loads(text)["pairs"]
