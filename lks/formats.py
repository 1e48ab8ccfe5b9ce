"""Reading edit sets: the public benchmark file formats, :func:`load_edits` and
:func:`builtin_edits` (each loader returns an :class:`lks.data.EditSet`).

Formats read:

* LKS (``lks/cf_eval_data.json``, ``lks/zsre_eval_data.json``): ``subject, prompt, target,
  ground_truth, generality`` (one paraphrase) and ``locality {prompt, target}`` (another attribute
  of the SAME subject). No case id: the list index is the CounterFact case id.
* MEND/EasyEdit CounterFact: ``case_id, prompt, subject, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth``; its locality prompt is a DIFFERENT
  subject with the same relation, so it becomes a *neighbourhood* prompt.
* ROME CounterFact (``requested_rewrite`` with a ``{}`` prompt template).
* MEND zsRE (``src, alt, answers, rephrase, loc, loc_ans, subject``).
* our own JSON list of records (:meth:`lks.data.EditSet.to_json`), also used for the shipped
  built-in set.

Named sets come from the data directory (:func:`lks.datadir.data_file`); nothing here touches the
network at import.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lks.data import EditRecord, EditSet, InvalidEditError, _check_n, _own_record, _parse_own, _read_json
from lks.datadir import data_file

log = logging.getLogger(__name__)


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
        data_dir: data directory for the named sets (see :func:`lks.datadir.data_dir`).
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
