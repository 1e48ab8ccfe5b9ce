"""Edit data: records and sets, loaders for the public benchmark formats, the data directory, and
the token position of a subject's last token (the "knowledge block" lks replaces).

Formats read (each loader returns an :class:`EditSet`):

* LKS (``lks/cf_eval_data.json``, ``lks/zsre_eval_data.json``): ``subject, prompt, target,
  ground_truth, generality`` (one paraphrase) and ``locality {prompt, target}`` (another attribute
  of the SAME subject). No case id: the list index is the CounterFact case id.
* MEND/EasyEdit CounterFact: ``case_id, prompt, subject, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth``; its locality prompt is a DIFFERENT
  subject with the same relation, so it becomes a *neighbourhood* prompt.
* ROME CounterFact (``requested_rewrite`` with a ``{}`` prompt template).
* MEND zsRE (``src, alt, answers, rephrase, loc, loc_ans, subject``).
* our own JSON list of records (:meth:`EditSet.to_json`), also used for the shipped built-in set.

Nothing here touches the network at import; only :func:`data_file` may download, and only files
it knows a public URL and a SHA-256 for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import operator
import os
import random
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple, overload

if TYPE_CHECKING:  # torch/transformers are imported lazily: loading edit data needs neither
    import torch
    from transformers import BatchEncoding, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


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
# loaders
# --------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _build(items: Any, make: Callable[[int, dict], EditRecord], name: str, n: int | None, source: str) -> EditSet:
    """Turn raw items into an EditSet of at most ``n`` valid records.

    Real benchmark files can hold a few records whose subject is missing from the prompt; one such
    record must not abort a 10,000-record load, so they are skipped and counted in ONE warning.
    A missing key, by contrast, means the wrong format and raises.
    """
    if not isinstance(items, list):
        raise ValueError(f"{source}: expected a JSON list of records, got {type(items).__name__}")
    _check_n(n)
    records, skipped = [], []
    for i, item in enumerate(items):
        if n is not None and len(records) >= n:
            break
        try:
            records.append(make(i, item))
        except InvalidEditError as e:
            skipped.append(str(e))
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"{source}: record {i} is not in the expected format ({type(e).__name__}: {e})") from e
    if skipped:
        warnings.warn(f"{source}: skipped {len(skipped)} invalid record(s), e.g. {skipped[0]}", stacklevel=3)
    return EditSet(records, name=name)


def _as_list(x: Any) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _lks_record(i: int, d: dict) -> EditRecord:
    loc = [(x["prompt"], x["target"]) for x in _as_list(d.get("locality"))]
    return EditRecord(subject=d["subject"], prompt=d["prompt"], target=d["target"], ground_truth=d.get("ground_truth"),
                      rephrases=_as_list(d.get("generality")), locality=loc, case_id=i)


def _mend_cf_record(i: int, d: dict) -> EditRecord:
    nbr = [(d["locality_prompt"], d["locality_ground_truth"])] if d.get("locality_prompt") else []
    return EditRecord(subject=d["subject"], prompt=d["prompt"], target=d["target_new"], ground_truth=d.get("ground_truth"),
                      rephrases=_as_list(d.get("rephrase_prompt")), neighborhood=nbr, case_id=d.get("case_id", i))


def _rome_record(i: int, d: dict) -> EditRecord:
    rw = d["requested_rewrite"]
    true = rw.get("target_true", {}).get("str")
    # neighbourhood prompts are other subjects whose answer is the unedited true object.
    # attribute_prompts (other subjects whose true object is target_new) and generation_prompts
    # (free-text fluency) feed ROME's essence/fluency scores, which lks does not compute: dropped.
    return EditRecord(subject=rw["subject"], prompt=rw["prompt"].replace("{}", rw["subject"]),
                      target=rw["target_new"]["str"], ground_truth=true, rephrases=_as_list(d.get("paraphrase_prompts")),
                      neighborhood=[(p, true) for p in _as_list(d.get("neighborhood_prompts"))] if true else [],
                      case_id=d.get("case_id", i))


def _mend_zsre_record(i: int, d: dict) -> EditRecord:
    answers = _as_list(d.get("answers"))
    # "loc" is an unrelated Natural Questions prompt ("nq question: ..."), kept verbatim as in MEND.
    nbr = [(d["loc"], d["loc_ans"])] if d.get("loc") else []
    return EditRecord(subject=d["subject"], prompt=d["src"], target=d["alt"], ground_truth=answers[0] if answers else None,
                      rephrases=_as_list(d.get("rephrase")), neighborhood=nbr, case_id=d.get("case_id", i))


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


def load_lks_json(path: str | os.PathLike, n: int | None = None, name: str | None = None) -> EditSet:
    """Load the LKS format (CounterFact or zsRE); ``case_id`` is the list index.

    ``generality`` becomes ``rephrases[0]``; ``locality`` (same subject, other attribute) becomes
    ``locality``. ``n`` keeps the first ``n`` valid records.
    """
    path = Path(path)
    return _build(_read_json(path), _lks_record, name or path.stem, n, str(path))


def load_mend_counterfact(path: str | os.PathLike, n: int | None = None, name: str | None = None) -> EditSet:
    """Load CounterFact in the MEND/EasyEdit form; its locality prompt goes to ``neighborhood``."""
    path = Path(path)
    return _build(_read_json(path), _mend_cf_record, name or path.stem, n, str(path))


def load_rome_counterfact(path: str | os.PathLike, n: int | None = None, name: str | None = None) -> EditSet:
    """Load the original ROME CounterFact (``requested_rewrite``; neighbourhood answers = target_true)."""
    path = Path(path)
    return _build(_read_json(path), _rome_record, name or path.stem, n, str(path))


def load_mend_zsre(path: str | os.PathLike, n: int | None = None, name: str | None = None) -> EditSet:
    """Load MEND zsRE; ``answers[0]`` is the ground truth and ``loc`` goes to ``neighborhood``."""
    path = Path(path)
    return _build(_read_json(path), _mend_zsre_record, name or path.stem, n, str(path))


def join_by_case_id(lks_set: EditSet, mend_set: EditSet, inner: bool = False) -> EditSet:
    """Add MEND CounterFact's rephrase and neighbourhood prompt to the LKS records with the same case id.

    Each joined record keeps the LKS fields and gets ``rephrases = [LKS generality, MEND rephrase]``
    and the MEND locality prompt appended to ``neighborhood``. The public MEND file covers only part
    of the LKS case ids (4,558 of the first 10,000), so unmatched LKS records are kept unchanged
    unless ``inner`` is true. A pair whose subject or prompt disagree is not merged (warned).
    """
    by_id = {r.case_id: r for r in mend_set}
    out, joined, conflicts = [], 0, 0
    for r in lks_set:
        m = by_id.get(r.case_id)
        if m is not None and (m.subject.casefold() != r.subject.casefold() or m.prompt != r.prompt):
            conflicts, m = conflicts + 1, None
        if m is None:
            if not inner:
                out.append(r)
            continue
        joined += 1
        reph = r.rephrases + [p for p in m.rephrases if p not in r.rephrases]
        out.append(dataclasses.replace(r, rephrases=reph, neighborhood=r.neighborhood + m.neighborhood,
                                       ground_truth=r.ground_truth or m.ground_truth))
    if conflicts:
        warnings.warn(f"join_by_case_id: {conflicts} case id(s) with a different subject/prompt were not merged",
                      stacklevel=2)
    log.info("join_by_case_id: %d of %d %s records joined with %s", joined, len(lks_set), lks_set.name, mend_set.name)
    return EditSet(out, name=lks_set.name)


_FORMATS: dict[str, tuple[Callable[[dict], bool], Callable[[int, dict], EditRecord]]] = {
    "rome": (lambda d: "requested_rewrite" in d, _rome_record),
    "mend_counterfact": (lambda d: "target_new" in d and "rephrase_prompt" in d, _mend_cf_record),
    "mend_zsre": (lambda d: "src" in d and "alt" in d, _mend_zsre_record),
    "lks": (lambda d: "generality" in d or ("target" in d and isinstance(d.get("locality"), dict)), _lks_record),
    "lks_own": (lambda d: "target" in d and ("rephrases" in d or "neighborhood" in d or "case_id" in d), _own_record),
}


def load_edits(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
               n: int | None = None) -> EditSet:
    """Load an edit set by name or from a file.

    Args:
        name_or_path: ``"counterfact"`` (LKS CounterFact joined with MEND CounterFact by case id;
            without the MEND file: LKS only, with a warning), ``"zsre"`` (LKS zsRE), ``"builtin"``
            (the shipped set the embedded model knows), or a path to a JSON file in any supported
            format (detected from the first record's keys).
        data_dir: data directory for the named sets (see :func:`data_dir`).
        n: keep the first ``n`` records.
    """
    _check_n(n)
    if name_or_path == "counterfact":
        cf = load_lks_json(data_file("lks/cf_eval_data.json", data_dir), n=n, name="counterfact")
        try:
            mend = load_mend_counterfact(data_file("counterfact_mend/counterfact-edit.json", data_dir))
        except FileNotFoundError as e:
            warnings.warn(f"MEND CounterFact not found, using LKS CounterFact only (1 rephrase, no "
                          f"neighbourhood prompts): {e}", stacklevel=2)
            return cf
        return join_by_case_id(cf, mend)
    if name_or_path == "zsre":
        return load_lks_json(data_file("lks/zsre_eval_data.json", data_dir), n=n, name="zsre")
    if name_or_path == "builtin":
        return builtin_edits().head(n) if n is not None else builtin_edits()
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"{name_or_path!s} is neither a known edit set ('counterfact', 'zsre', "
                                "'builtin') nor an existing file")
    items = _read_json(path)
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        raise ValueError(f"{path}: expected a non-empty JSON list of records")
    for fmt, (match, make) in _FORMATS.items():
        if match(items[0]):
            if fmt == "lks_own":
                return _parse_own(items, path.stem, n, str(path))
            return _build(items, make, path.stem, n, str(path))
    raise ValueError(f"{path}: unrecognised record format with keys {sorted(items[0])}; "
                     f"supported: {list(_FORMATS)}")


def builtin_edits() -> EditSet:
    """The shipped edit set (``lks/assets/builtin_edits.json``): counterfactual edits of well-known
    facts that the embedded SmolLM2-135M-Instruct answers correctly before editing (its greedy
    continuation of each prompt starts with the ground truth)."""
    from importlib import resources

    text = resources.files("lks").joinpath("assets/builtin_edits.json").read_text(encoding="utf-8")
    return _parse_own(json.loads(text), "builtin", None, "lks/assets/builtin_edits.json")


# --------------------------------------------------------------------------------------------
# data directory and pinned data files
# --------------------------------------------------------------------------------------------

class DataFileInfo(NamedTuple):
    """A pinned data file: its hash, a direct public URL (if any) and human directions to it."""

    sha256: str
    url: str | None  # public direct download, or None when only a manual route exists
    source: str  # where a person gets it


_LKS_RAW = "https://raw.githubusercontent.com/Linuxin-xxx/LKS/main/data"
KNOWN_FILES: dict[str, DataFileInfo] = {
    "lks/cf_eval_data.json": DataFileInfo(
        "765a69a29238af887a40e22d0f0d9949cd3735d9fe3ac20c5fd3e9025e08f9b8", f"{_LKS_RAW}/counterfact/cf_eval_data.json",
        "the LKS repository, https://github.com/Linuxin-xxx/LKS (data/counterfact/cf_eval_data.json)"),
    "lks/zsre_eval_data.json": DataFileInfo(
        "d14acb1bc87411560a4d7ac385f6c9e4f27ec44888509e6617f87d12d54b55a8", f"{_LKS_RAW}/zsre/zsre_eval_data.json",
        "the LKS repository, https://github.com/Linuxin-xxx/LKS (data/zsre/zsre_eval_data.json)"),
    "counterfact_mend/counterfact-edit.json": DataFileInfo(
        "bfe31a7081932739406e282bb625d74222549c3386c15b1df3dfbc3978c69eec", None,
        "https://github.com/Jometeorie/KnowledgeSpread (data/counterfact/counterfact-edit.json; CounterFact "
        "in the MEND/EasyEdit form, case ids as in ROME's CounterFact)"),
    "gsm8k/test.jsonl": DataFileInfo(
        "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
        "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
        "https://github.com/openai/grade-school-math (grade_school_math/data/test.jsonl)"),
    "sst2/dev.tsv": DataFileInfo(
        "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0", None,
        "GLUE SST-2 (dev.tsv from the GLUE data), or datasets.load_dataset('glue', 'sst2') split 'validation'"),
    "rte/superglue_val.jsonl": DataFileInfo(
        "ab990507bf5f35dc176cba7770a72bfa2c50a88ed72b8cc95cfbf9db95ab1af1", None,
        "SuperGLUE RTE val.jsonl (https://super.gluebenchmark.com/tasks), or datasets.load_dataset('glue', 'rte')"),
    "rte/validation.parquet": DataFileInfo(
        "fb2aa2e04f551133ba663617a15ae133dc22b0f6a969bc0629b5ea6003ee9cf8", None,
        "GLUE RTE validation split: datasets.load_dataset('glue', 'rte')['validation'].to_parquet(...)"),
    "wikitext2/wiki.test.raw": DataFileInfo(
        "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08", None,
        "WikiText-2 raw test split: datasets.load_dataset('wikitext', 'wikitext-2-raw-v1', split='test')"),
}
_PREFIX_SOURCES = {"mmlu/": "MMLU (Hendrycks et al. 2021): datasets.load_dataset('cais/mmlu', 'all'), one csv per subject"}
ENV_DATA_DIR = "LKS_DATA_DIR"
_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> verified sha256


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The benchmark data directory: ``path`` if given, else ``$LKS_DATA_DIR``, else ``~/.cache/lks/data``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lks" / "data"


_resolve_dir = data_dir  # data_file's parameter shadows the function name


def _sha256_stream(path: Path) -> str:
    from lks.utils import sha256_file

    return sha256_file(path)


def _sums_entry(root: Path, rel: PurePosixPath) -> str | None:
    """Expected hash of ``rel`` from a SHA256SUMS file in its folder or any parent up to ``root``."""
    parts = rel.parts
    for k in range(len(parts) - 1, -1, -1):
        sums = root.joinpath(*parts[:k], "SHA256SUMS")
        if not sums.is_file():
            continue
        want = "/".join(parts[k:])
        for line in sums.read_text(encoding="utf-8").splitlines():
            digest, _, name = line.strip().partition(" ")
            if name.strip().lstrip("*").removeprefix("./") == want:
                return digest.lower()
    return None


def _verify(path: Path, rel: PurePosixPath, root: Path) -> None:
    info = KNOWN_FILES.get(str(rel))
    expected = info.sha256 if info else _sums_entry(root, rel)
    if expected is None:  # not pinned anywhere: nothing to check
        return
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if _VERIFIED.get(key) == expected:  # hashing 4 MB files on every load is wasted time
        return
    actual = _sha256_stream(path)
    if actual != expected:
        raise DataChecksumError(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}. "
                                "The file is corrupt or a different version; delete it and fetch it again "
                                f"({info.source if info else 'see the SHA256SUMS next to it'}).")
    _VERIFIED[key] = expected


def _open_url(url: str, timeout: float):
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - fixed https URLs from KNOWN_FILES


def _download(url: str, dest: Path, sha256: str, timeout: float = 15.0) -> None:
    """Stream ``url`` into a temporary sibling of ``dest``, check its hash, then rename into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    from lks.utils import temp_sibling

    fd, tmp = temp_sibling(dest)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, _open_url(url, timeout) as resp:
            while block := resp.read(1 << 20):
                h.update(block)
                f.write(block)
        if h.hexdigest() != sha256:
            raise DataChecksumError(f"downloaded {url} has sha256 {h.hexdigest()}, expected {sha256}")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def data_file(relpath: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Path of a benchmark data file, verified against its pinned SHA-256.

    Known files (``KNOWN_FILES``) are checked against the hash pinned here; other files (the MMLU
    csvs) against a ``SHA256SUMS`` in their folder or a parent, when there is one. A verified
    result is cached per (path, mtime, size) for the life of the process. A missing known file with
    a public URL is downloaded (atomically, 15 s timeout) unless ``download`` is false or
    ``$LKS_OFFLINE`` is set.

    Raises:
        FileNotFoundError: the file is missing and could not be downloaded; the message names the
            file, the directory searched, ``LKS_DATA_DIR`` and where to get it.
        DataChecksumError: the file (or the download) does not match its pinned hash.
    """
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"relpath must be relative to the data directory, got {relpath!r}")
    root = _resolve_dir(data_dir)
    path = root.joinpath(*rel.parts)
    if path.is_file():
        _verify(path, rel, root)
        return path
    info = KNOWN_FILES.get(str(rel))
    failure = ""
    if download and info is not None and info.url and not os.environ.get("LKS_OFFLINE"):
        try:
            _download(info.url, path, info.sha256)
            _verify(path, rel, root)
            return path
        except (OSError, urllib.error.URLError, TimeoutError) as e:
            failure = f"\nDownloading it from {info.url} failed: {e}"
    where = info.source if info else next((s for p, s in _PREFIX_SOURCES.items() if str(rel).startswith(p)),
                                          "see the lks README, section 'Data'")
    raise FileNotFoundError(
        f"data file {str(rel)!r} not found in the data directory {root} (looked for {path}).\n"
        f"Put the file there, or point ${ENV_DATA_DIR} (or data_dir=...) at the directory that holds it.\n"
        f"Where to get it: {where}{failure}")


# --------------------------------------------------------------------------------------------
# locality prompts for training
# --------------------------------------------------------------------------------------------

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
