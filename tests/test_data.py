"""Tests for lks.data, lks.formats and lks.datadir: records, loaders, the data directory, subject token positions, built-in edits."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import urllib.error
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lks import data as D
from lks import datadir, formats
from lks.data import EditRecord, EditSet, find_subject, subject_token_index
from lks.training import prompts

FIX = Path(__file__).parent / "fixtures"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- records and sets

def test_record_validation_error_shows_subject_and_prompt():
    with pytest.raises(ValueError) as e:
        EditRecord(subject="Marie Curie", prompt="The capital of France is", target="Rome")
    assert "Marie Curie" in str(e.value) and "The capital of France is" in str(e.value)


@pytest.mark.parametrize("field", ["subject", "prompt", "target"])
def test_record_rejects_empty_fields(field):
    kw = {"subject": "France", "prompt": "The capital of France is", "target": "Rome", field: "  "}
    with pytest.raises(ValueError, match=field):
        EditRecord(**kw)


def test_record_case_insensitive_subject_normalisation_and_feature_text():
    r = EditRecord(subject="the Louvre", prompt="The Louvre is in ", target=" Rome", locality=[["a the Louvre", "b"]])
    assert r.feature_text() == "The Louvre is in Rome"  # one space: trailing/leading spaces dropped
    assert r.locality == [("a the Louvre", "b")]  # JSON lists become tuples


def _set(n: int = 5, name: str = "toy") -> EditSet:
    return EditSet([EditRecord(subject=f"Subj{i}", prompt=f"Subj{i} lives in", target=f"City{i}", ground_truth="X",
                               rephrases=[f"Subj{i} resides in"], locality=[(f"Subj{i} works as a", "baker")],
                               neighborhood=[("Other lives in", "Y")], case_id=i) for i in range(n)], name=name)


def test_editset_sequence_api(tmp_path):
    s = _set()
    assert len(s) == 5 and [r.case_id for r in s] == list(range(5))
    assert s[1].subject == "Subj1" and s[-1].case_id == 4
    sl = s[1:3]
    assert isinstance(sl, EditSet) and sl.subjects() == ["Subj1", "Subj2"] and sl.name == "toy"
    assert s.head(2).subjects() == ["Subj0", "Subj1"]
    a, b = s.sample(3, seed=1), s.sample(3, seed=1)
    assert a == b and len(a) == 3 and set(a.subjects()) <= set(s.subjects())
    assert [r.case_id for r in a] == sorted(r.case_id for r in a)
    with pytest.raises(ValueError):
        s.sample(6)
    assert s.checksum() == _set(name="other").checksum()  # content hash, name-independent
    assert s.checksum() != s.head(4).checksum()
    s.to_json(tmp_path / "toy.json")
    back = EditSet.from_json(tmp_path / "toy.json")
    assert back == s and back.name == "toy" and back.checksum() == s.checksum()
    with pytest.raises(TypeError):
        EditSet(["not a record"])


def test_empty_set_allowed_but_require_nonempty_raises():
    s = EditSet([], name="nothing")
    assert len(s) == 0
    with pytest.raises(ValueError, match="empty edit set"):
        s.require_nonempty()
    assert _set().require_nonempty() is not None


# ---------------------------------------------------------------- loaders

def test_load_lks_json_skips_invalid_with_one_counted_warning():
    with pytest.warns(UserWarning, match=r"skipped 1 invalid record.*Lake Baikal"):
        s = formats.load_lks_json(FIX / "lks_cf.json")
    assert s.name == "lks_cf" and len(s) == 4
    assert [r.case_id for r in s] == [0, 1, 3, 4]  # list index, kept across the skipped record
    r = s[0]
    assert (r.subject, r.target, r.ground_truth) == ("Ada Lovelace", "chemistry", "mathematics")
    assert r.rephrases == ["The discipline Ada Lovelace is known for is"]
    assert r.locality == [("Ada Lovelace was born in the city of", "London")] and r.neighborhood == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert formats.load_lks_json(FIX / "lks_cf.json", n=2).subjects() == ["Ada Lovelace", "Toyota Corolla"]


def test_load_mend_counterfact():
    s = formats.load_mend_counterfact(FIX / "mend_cf.json")
    assert [r.case_id for r in s] == [0, 3, 7]
    r = s[2]
    assert (r.subject, r.target, r.ground_truth) == ("Quebec", "English", "French")
    assert r.rephrases == ["In Quebec, most people speak"]
    assert r.neighborhood == [("The official language of Wallonia is", "French")] and r.locality == []


def test_load_rome_counterfact():
    s = formats.load_rome_counterfact(FIX / "rome_cf.json")
    r = s[0]
    assert r.case_id == 11 and r.subject == "Hardangerfjord"
    assert r.prompt == "Hardangerfjord, which is located in"
    assert (r.target, r.ground_truth) == ("Brazil", "Norway")
    assert len(r.rephrases) == 2
    assert r.neighborhood == [("Sognefjord, which is located in", "Norway"),
                              ("Geirangerfjord is located in the country of", "Norway")]
    assert s[1].prompt == "The mother tongue of Jean Gabin is" and s[1].neighborhood[0][1] == "French"


def test_load_mend_zsre():
    s = formats.load_mend_zsre(FIX / "mend_zsre.json")
    assert len(s) == 3 and [r.case_id for r in s] == [0, 1, 2]
    r = s[0]
    assert (r.target, r.ground_truth) == ("Kenya", "Tanzania")
    assert r.neighborhood == [("nq question: who wrote the novel moby dick", "Herman Melville")]
    assert find_subject(s[2].prompt, s[2].subject) == (20, 37)  # "The Rosetta Stone", found case-insensitively


def test_join_by_case_id():
    with pytest.warns(UserWarning):
        lks_set = formats.load_lks_json(FIX / "lks_cf.json")
    mend = formats.load_mend_counterfact(FIX / "mend_cf.json")
    j = formats.join_by_case_id(lks_set, mend)
    assert [r.case_id for r in j] == [0, 1, 3, 4]  # LKS order and records kept, case 7 (not in LKS) ignored
    ada = j[0]
    assert ada.rephrases == ["The discipline Ada Lovelace is known for is", "In her career, Ada Lovelace specialised in"]
    assert ada.neighborhood == [("Carl Friedrich Gauss worked in the field of", "mathematics")]
    assert ada.locality == lks_set[0].locality  # LKS locality (same subject) untouched
    assert j[1] == lks_set[1]  # unmatched records unchanged
    assert [r.case_id for r in formats.join_by_case_id(lks_set, mend, inner=True)] == [0, 3]
    bad = EditSet([EditRecord(subject="Quebec", prompt="Quebec is in", target="x", case_id=0)])
    with pytest.warns(UserWarning, match="not merged"):
        assert formats.join_by_case_id(lks_set, bad)[0] == lks_set[0]


@pytest.mark.parametrize("fname,loader", [("lks_cf.json", formats.load_lks_json), ("mend_cf.json", formats.load_mend_counterfact),
                                          ("rome_cf.json", formats.load_rome_counterfact), ("mend_zsre.json", formats.load_mend_zsre)])
def test_load_edits_detects_format(fname, loader):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert formats.load_edits(FIX / fname) == loader(FIX / fname)
        assert formats.load_edits(str(FIX / fname), n=1) == loader(FIX / fname, n=1)


def test_load_edits_own_format_and_errors(tmp_path):
    _set().to_json(tmp_path / "mine.json")
    assert formats.load_edits(tmp_path / "mine.json") == _set()
    with pytest.raises(FileNotFoundError, match="neither a known edit set"):
        formats.load_edits("no-such-set")
    (tmp_path / "odd.json").write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(ValueError, match="unrecognised record format"):
        formats.load_edits(tmp_path / "odd.json")
    (tmp_path / "broken.json").write_text(json.dumps([{"generality": "g", "subject": "s"}]))
    with pytest.raises(ValueError, match="record 0 is not in the expected format"):
        formats.load_edits(tmp_path / "broken.json")


def test_load_edits_counterfact_by_name(tmp_path, monkeypatch):
    # a data dir holding the fixtures under the real relative paths, with their hashes pinned
    for rel, fix in [("lks/cf_eval_data.json", "lks_cf.json"), ("counterfact_mend/counterfact-edit.json", "mend_cf.json")]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((FIX / fix).read_bytes())
        monkeypatch.setitem(datadir.KNOWN_FILES, rel, datadir.KNOWN_FILES[rel]._replace(sha256=_sha(FIX / fix)))
    with pytest.warns(UserWarning, match="skipped 1"):
        s = formats.load_edits("counterfact", data_dir=tmp_path)
    assert s.name == "counterfact" and len(s) == 4 and len(s[0].rephrases) == 2
    (tmp_path / "counterfact_mend/counterfact-edit.json").unlink()
    with pytest.warns(UserWarning, match="MEND CounterFact not found"):
        monkeypatch.setenv("LKS_OFFLINE", "1")
        assert len(formats.load_edits("counterfact", data_dir=tmp_path, n=2)) == 2


# ---------------------------------------------------------------- data directory and files

def test_data_dir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("LKS_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datadir.data_dir() == tmp_path / "home" / ".cache" / "lks" / "data"
    monkeypatch.setenv("LKS_DATA_DIR", str(tmp_path / "env"))
    assert datadir.data_dir() == tmp_path / "env"
    assert datadir.data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert datadir.data_dir(str(tmp_path / "arg")) == tmp_path / "arg"


def test_data_file_missing_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(datadir, "_open_url", lambda *a, **k: pytest.fail("no network call expected"))
    with pytest.raises(FileNotFoundError) as e:
        datadir.data_file("lks/cf_eval_data.json", data_dir=tmp_path, download=False)
    msg = str(e.value)
    for part in ("lks/cf_eval_data.json", str(tmp_path), "LKS_DATA_DIR", "github.com/Linuxin-xxx/LKS"):
        assert part in msg
    with pytest.raises(FileNotFoundError, match="cais/mmlu"):
        datadir.data_file("mmlu/test/anatomy_test.csv", data_dir=tmp_path)
    with pytest.raises(ValueError):
        datadir.data_file("../etc/passwd", data_dir=tmp_path)


def test_data_file_failed_download_is_reported(tmp_path, monkeypatch):
    calls = []

    def offline(url, timeout):
        calls.append((url, timeout))
        raise urllib.error.URLError("network unreachable")

    monkeypatch.delenv("LKS_OFFLINE", raising=False)
    monkeypatch.setattr(datadir, "_open_url", offline)
    with pytest.raises(FileNotFoundError, match="network unreachable") as e:
        datadir.data_file("gsm8k/test.jsonl", data_dir=tmp_path)
    assert calls and calls[0][0].endswith("grade_school_math/data/test.jsonl") and calls[0][1] <= 30
    assert "openai/grade-school-math" in str(e.value)
    assert not list(tmp_path.rglob("*"))[1:]  # at most the created folder, no partial file
    monkeypatch.setenv("LKS_OFFLINE", "1")
    calls.clear()
    with pytest.raises(FileNotFoundError):
        datadir.data_file("gsm8k/test.jsonl", data_dir=tmp_path)
    assert not calls


def test_data_file_download_is_verified_and_atomic(tmp_path, monkeypatch):
    payload = b'{"question": "1+1?", "answer": "#### 2"}\n'
    monkeypatch.delenv("LKS_OFFLINE", raising=False)
    monkeypatch.setattr(datadir, "_open_url", lambda url, timeout: io.BytesIO(payload))
    monkeypatch.setitem(datadir.KNOWN_FILES, "gsm8k/test.jsonl",
                        datadir.KNOWN_FILES["gsm8k/test.jsonl"]._replace(sha256=hashlib.sha256(payload).hexdigest()))
    p = datadir.data_file("gsm8k/test.jsonl", data_dir=tmp_path)
    assert p.read_bytes() == payload and p == tmp_path / "gsm8k" / "test.jsonl"
    p.unlink()
    monkeypatch.setattr(datadir, "_open_url", lambda url, timeout: io.BytesIO(b"tampered"))
    with pytest.raises(D.DataChecksumError):
        datadir.data_file("gsm8k/test.jsonl", data_dir=tmp_path)
    assert list((tmp_path / "gsm8k").iterdir()) == []  # temp file removed


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, monkeypatch, mask):
    """Results, saved editors and downloads get the permissions of any new file (tempfile and
    safetensors alone would leave them 0600 / 0700, unreadable to the rest of a shared machine)."""
    import torch

    from lks.utils import atomic_dir, save_tensors, write_json

    payload = b"{}\n"
    monkeypatch.delenv("LKS_OFFLINE", raising=False)
    monkeypatch.setattr(datadir, "_open_url", lambda url, timeout: io.BytesIO(payload))
    monkeypatch.setitem(datadir.KNOWN_FILES, "gsm8k/test.jsonl",
                        datadir.KNOWN_FILES["gsm8k/test.jsonl"]._replace(sha256=hashlib.sha256(payload).hexdigest()))
    old = os.umask(mask)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        with atomic_dir(tmp_path / "ed") as d:
            save_tensors(d / "t.safetensors", {"z": torch.zeros(2)})
        got = datadir.data_file("gsm8k/test.jsonl", data_dir=tmp_path / "data")
    finally:
        os.umask(old)
    file_mode, dir_mode = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}[mask]
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == file_mode
    assert stat.S_IMODE(got.stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "ed" / "t.safetensors").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "ed").stat().st_mode) == dir_mode


def test_data_file_checksum_mismatch_and_cache(tmp_path, monkeypatch):
    f = tmp_path / "lks" / "cf_eval_data.json"
    f.parent.mkdir()
    f.write_text("[]")
    with pytest.raises(D.DataChecksumError, match="checksum mismatch") as e:
        datadir.data_file("lks/cf_eval_data.json", data_dir=tmp_path)
    assert datadir.KNOWN_FILES["lks/cf_eval_data.json"].sha256 in str(e.value)
    # a good file is hashed once per (path, mtime, size)
    monkeypatch.setitem(datadir.KNOWN_FILES, "lks/cf_eval_data.json",
                        datadir.KNOWN_FILES["lks/cf_eval_data.json"]._replace(sha256=_sha(f)))
    n = []
    real = datadir._sha256_stream
    monkeypatch.setattr(datadir, "_sha256_stream", lambda p: n.append(p) or real(p))
    for _ in range(3):
        assert datadir.data_file("lks/cf_eval_data.json", data_dir=tmp_path) == f
    assert len(n) == 1
    f.write_text("[ ]")  # size changes: verified again, and now it mismatches
    with pytest.raises(D.DataChecksumError):
        datadir.data_file("lks/cf_eval_data.json", data_dir=tmp_path)


def test_data_file_unpinned_files_use_sha256sums(tmp_path):
    csv = tmp_path / "mmlu" / "dev" / "a_dev.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("q,a,b,c,d,0\n")
    assert datadir.data_file("mmlu/dev/a_dev.csv", data_dir=tmp_path) == csv  # no sums: unchecked
    (tmp_path / "mmlu" / "SHA256SUMS").write_text(f"{_sha(csv)}  ./dev/a_dev.csv\n")
    assert datadir.data_file("mmlu/dev/a_dev.csv", data_dir=tmp_path) == csv
    (tmp_path / "mmlu" / "SHA256SUMS").write_text(f"{'0' * 64}  ./dev/a_dev.csv\n")
    with pytest.raises(D.DataChecksumError):
        datadir.data_file("mmlu/dev/a_dev.csv", data_dir=tmp_path)


# ---------------------------------------------------------------- find_subject

ASCII = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
UNI = ASCII + "éüßçøİıΣσςΩжあ漢ﬁ"
words = st.lists(st.text(alphabet=UNI, min_size=1, max_size=7), min_size=0, max_size=5)
subj_words = st.lists(st.text(alphabet=UNI, min_size=1, max_size=7), min_size=1, max_size=3)


def _first_casefold_match(prompt: str, subject: str) -> int | None:
    target = subject.casefold()
    for i in range(len(prompt)):
        for j in range(i + 1, len(prompt) + 1):
            if prompt[i:j].casefold() == target:
                return i
    return None


@settings(max_examples=300, deadline=None)
@given(pre=words, sub=subj_words, post=words, repeat=st.booleans())
def test_find_subject_exact_first_mention(pre, sub, post, repeat):
    subject = " ".join(sub)
    prompt = " ".join(pre + [subject] + post + ([subject] if repeat else []))
    s, e = find_subject(prompt, subject)
    assert prompt[s:e] == subject and s == prompt.find(subject)


@settings(max_examples=300, deadline=None)
@given(pre=words, sub=subj_words, post=words, flips=st.lists(st.booleans(), min_size=40, max_size=40))
def test_find_subject_case_insensitive(pre, sub, post, flips):
    subject = " ".join(sub)
    variant = "".join(c.upper() if f else c.lower() for c, f in zip(subject, flips + [False] * len(subject), strict=False))
    assume(variant.casefold() == subject.casefold())  # e.g. "ı".upper() == "I" does not fold back
    prompt = " ".join(pre + [variant] + post)
    s, e = find_subject(prompt, subject)
    assert prompt[s:e].casefold() == subject.casefold()
    expected = prompt.find(subject) if subject in prompt else _first_casefold_match(prompt, subject)
    assert s == expected


def test_find_subject_length_changing_casefold_and_errors():
    assert find_subject("Die Straße von Messina", "STRASSE") == (4, 10)
    assert find_subject("Visit İstanbul today", "i̇stanbul") == (6, 14)
    assert find_subject("ﬁsh and ﬁsh", "FISH") == (0, 3)  # one ligature char folds to "fi"
    with pytest.raises(ValueError) as e:
        find_subject("The capital of France is", "Germany")
    assert "Germany" in str(e.value) and "The capital of France is" in str(e.value)
    with pytest.raises(ValueError):
        find_subject("ß", "s")  # only half of a folded character: not a match


# ---------------------------------------------------------------- subject_token_index on hand-made offsets

@st.composite
def tokenised(draw):
    """(text, offsets, subject span, index of the token holding the span's last char)."""
    ws = draw(st.lists(st.text(alphabet=ASCII + "éあ", min_size=1, max_size=6), min_size=1, max_size=6))
    i = draw(st.integers(0, len(ws) - 1))
    j = draw(st.integers(i + 1, len(ws)))
    with_space = draw(st.booleans())  # do token offsets include the leading space?
    offsets, owner_of_char, pos = [], {}, 0
    for k, w in enumerate(ws):
        if k:
            pos += 1  # the space
        cuts = sorted(draw(st.sets(st.integers(1, len(w) - 1), max_size=2))) if len(w) > 1 else []
        bounds = [0, *cuts, len(w)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            s = pos + a - (1 if (k and a == 0 and with_space) else 0)
            for c in range(pos + a, pos + b):
                owner_of_char[c] = len(offsets)
            offsets.append((s, pos + b))
        pos += len(w)
    text = " ".join(ws)
    start = sum(len(w) + 1 for w in ws[:i])
    end = start + len(" ".join(ws[i:j]))
    expected = owner_of_char[end - 1]
    # BOS and padding: zero-width tokens on either side
    n_left, n_right, bos = draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.booleans())
    prefix = [(0, 0)] * n_left + ([(0, 0)] if bos else [])
    return text, prefix + offsets + [(0, 0)] * n_right, (start, end), expected + len(prefix)


@settings(max_examples=400, deadline=None)
@given(case=tokenised())
def test_subject_token_index_hand_offsets(case):
    text, offsets, (start, end), expected = case
    assert subject_token_index(offsets, start, end) == expected
    s, e = offsets[expected]
    assert s <= end - 1 < e


def test_subject_token_index_errors_and_tensor_input():
    import torch

    assert subject_token_index(torch.tensor([[0, 0], [0, 3], [3, 9]]), 4, 9) == 2
    with pytest.raises(ValueError):
        subject_token_index([(0, 0), (0, 3)], 5, 9)
    with pytest.raises(ValueError):
        subject_token_index([(0, 3)], 2, 2)


# ---------------------------------------------------------------- with the real tokenizer (slow)

@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pre=words, sub=subj_words, post=words, repeat=st.booleans())
def test_subject_token_index_real_tokenizer(smol, pre, sub, post, repeat):
    tok = smol[1]
    subject = " ".join(sub)
    prompt = " ".join(pre + [subject] + post + ([subject] if repeat else []))
    start, end = find_subject(prompt, subject)
    enc = tok(prompt, return_offsets_mapping=True)
    idx = subject_token_index(enc["offset_mapping"], start, end)
    s, e = enc["offset_mapping"][idx]
    assert s <= end - 1 < e  # the token holds the subject's last character
    whole_word = (start == 0 or prompt[start - 1] == " ") and (end == len(prompt) or prompt[end] == " ")
    if whole_word:  # the first mention is a whole word (not "A" inside "AA" or "BA")
        assert e == end and subject.endswith(prompt[s:e].strip())  # so the token ends the subject
        if prompt[s:e].isascii():
            assert tok.decode([enc["input_ids"][idx]]).strip() == prompt[s:e].strip()


@pytest.mark.slow
@pytest.mark.parametrize("side", ["left", "right"])
def test_subject_positions_padding(smol, side):
    tok = smol[1]
    texts = ["The capital of France is", "Zoë Saldaña's mother tongue, as everyone knows, is", "Paris Hilton and Paris"]
    subjects = ["France", "zoë saldaña", "Paris"]
    before = tok.padding_side
    enc, pos = D.subject_positions(tok, texts, subjects, padding_side=side)
    assert tok.padding_side == before and "offset_mapping" not in enc
    assert pos.dtype.__str__() == "torch.int64" and pos.shape == (3,)
    width = enc["input_ids"].shape[1]
    for b, (t, s) in enumerate(zip(texts, subjects, strict=True)):
        single = tok(t, return_offsets_mapping=True)
        i = subject_token_index(single["offset_mapping"], *find_subject(t, s))
        shift = width - len(single["input_ids"]) if side == "left" else 0
        assert int(pos[b]) == i + shift
        assert int(enc["input_ids"][b, pos[b]]) == single["input_ids"][i]
        assert enc["attention_mask"][b, pos[b]] == 1
    assert tok.decode(enc["input_ids"][0, pos[0]]).strip() == "France"
    assert tok.decode(enc["input_ids"][2, pos[2]]).strip() == "Paris"  # the FIRST mention
    assert int(pos[2]) == int((enc["attention_mask"][2] == 0).sum()) * (side == "left") + 1  # right after BOS


# ---------------------------------------------------------------- training locality prompts

def test_training_locality_prompts():
    r = EditRecord(subject="Ada Lovelace", prompt="Ada Lovelace was born in", target="Paris",
                   rephrases=["The native language of ada lovelace is "], locality=[("Ada Lovelace is a citizen of", "UK")])
    a = prompts.training_locality_prompts(r, 8, seed=0)
    assert a == prompts.training_locality_prompts(r, 8, seed=0) and len(a) == 8 and len(set(a)) == 8
    assert a != prompts.training_locality_prompts(r, 8, seed=1)
    assert all("Ada Lovelace" in p for p in a)
    every = prompts.training_locality_prompts(r, 1000)
    assert len(every) == len(prompts.LOCALITY_TEMPLATES) - 3  # prompt, rephrase, locality prompt excluded
    banned = {"ada lovelace was born in", "the native language of ada lovelace is", "ada lovelace is a citizen of"}
    assert not banned & {p.casefold() for p in every}
    assert prompts.training_locality_prompts(r, 0) == []
    assert 20 <= len(prompts.LOCALITY_TEMPLATES) and all(t.count("{}") == 1 for t in prompts.LOCALITY_TEMPLATES)


# ---------------------------------------------------------------- built-in edits

def test_builtin_edits_are_well_formed():
    s = formats.builtin_edits()
    assert s.name == "builtin" and len(s) >= 60
    subjects = s.subjects()
    assert len(set(subjects)) == len(subjects)
    assert len({r.case_id for r in s}) == len(s)
    for a in subjects:  # no subject inside another: the scope indicator must be unambiguous
        assert not [b for b in subjects if a != b and a.casefold() in b.casefold()]
    for r in s:
        assert r.ground_truth and r.target.casefold() != r.ground_truth.casefold()
        assert len(r.rephrases) == 2 and len(r.locality) == 2 and 1 <= len(r.neighborhood) <= 2
        assert all(r.subject in p for p in r.rephrases) and all(r.subject in p for p, _ in r.locality)
        texts = [r.prompt, *r.rephrases, *(p for p, _ in r.locality), *(p for p, _ in r.neighborhood)]
        for other in subjects:  # no other EDITED subject appears in this record's prompts
            if other != r.subject:
                assert not [t for t in texts if other.casefold() in t.casefold()], (r.subject, other)
        assert not [p for p, _ in r.neighborhood if r.subject.casefold() in p.casefold()]
    assert formats.load_edits("builtin", n=7) == s.head(7)


@pytest.mark.slow
def test_builtin_edits_are_known_by_the_embedded_model(smol):
    """Every built-in prompt's greedy next token starts the ground truth (one batched forward pass)."""
    import torch

    model, tok = smol
    s = formats.builtin_edits()
    enc, _ = D.subject_positions(tok, [r.prompt for r in s], s.subjects(), padding_side="right")
    with torch.inference_mode():
        logits = model(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    first = logits[torch.arange(len(s)), last].argmax(-1)
    wrong = [(r.prompt, tok.decode(t)) for r, t in zip(s, first.tolist(), strict=True)
             if not (tok.decode(t).strip() and r.ground_truth.lower().startswith(tok.decode(t).strip().lower()))]
    assert not wrong


# ---------------------------------------------------------------- real benchmark files (when present)

def test_real_files_verify(data_root):
    for rel in datadir.KNOWN_FILES:
        if (data_root / rel).is_file():
            assert datadir.data_file(rel, data_dir=data_root, download=False) == data_root / rel


def test_real_lks_and_mend_files(data_root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real files have no invalid records
        cf = formats.load_lks_json(datadir.data_file("lks/cf_eval_data.json", data_root))
        zs = formats.load_lks_json(datadir.data_file("lks/zsre_eval_data.json", data_root))
        mend = formats.load_mend_counterfact(datadir.data_file("counterfact_mend/counterfact-edit.json", data_root))
        joined = formats.load_edits("counterfact", data_dir=data_root)
    assert len(cf) == len(zs) == len(mend) == len(joined) == 10_000
    assert all(len(r.rephrases) == 1 and len(r.locality) == 1 for r in cf)
    mend_by_id = {r.case_id: r for r in mend}
    shared = set(mend_by_id) & {r.case_id for r in cf}
    # The public MEND file covers only part of the LKS case ids (LKS record i is CounterFact case
    # i). Those records get its rephrase as a 2nd paraphrase, except where it repeats the LKS one.
    dups = {c for c in shared if mend_by_id[c].rephrases == cf[c].rephrases}
    two = [r for r in joined if len(r.rephrases) == 2]
    assert {r.case_id for r in two} == shared - dups and len(shared) > 4000 and len(dups) < 50
    assert all(len(r.neighborhood) == 1 for r in joined if r.case_id in shared)
    assert all(len(r.rephrases) == 1 and not r.neighborhood for r in joined if r.case_id not in shared)
    assert formats.load_edits("zsre", data_dir=data_root, n=5) == zs.head(5)


def test_harvested_locality_templates_exclude_evaluation_prompts():
    recs = [EditRecord(subject=s, prompt=f"{s} plays", target="x", locality=[(f"The birthplace of {s} is", "y")])
            for s in ("Ada Lovelace", "Alan Turing", "Grace Hopper")]
    assert prompts.harvest_locality_templates(recs, min_count=3) == {"The birthplace of {} is": 3}
    assert prompts.harvest_locality_templates(recs, min_count=4) == {}
    shipped = prompts.harvested_locality_templates()
    assert len(shipped) >= 50 and all(t.count("{}") == 1 for t in shipped)
    both = prompts.locality_templates("both")
    assert set(prompts.LOCALITY_TEMPLATES) <= set(both) and set(shipped) <= set(both) and len(set(both)) == len(both)
    r = EditRecord(subject="Ada Lovelace", prompt="Ada Lovelace plays", target="x",
                   locality=[("The birthplace of Ada Lovelace is", "London")])
    every = prompts.training_locality_prompts(r, 10_000, templates="harvested")
    assert "The birthplace of Ada Lovelace is" in [t.replace("{}", "Ada Lovelace") for t in shipped]
    assert "the birthplace of ada lovelace is" not in {p.casefold() for p in every}  # evaluation prompt held out
    with pytest.raises(ValueError, match="locality template set"):
        prompts.locality_templates("nope")


def test_paraphrase_bank_links_prompt_and_rephrase_templates_and_holds_out_evaluation_prompts():
    recs = [EditRecord(subject=s, prompt=f"The mother tongue of {s} is", target="x", rephrases=[f"{s}'s native language is"])
            for s in ("Ada Lovelace", "Alan Turing")]
    recs.append(EditRecord(subject="Grace Hopper", prompt="The mother tongue of Grace Hopper is", target="x",
                           rephrases=["Grace Hopper speaks"]))
    recs.append(EditRecord(subject="Bo", prompt="Bo Bo is", target="x", rephrases=["Bo says"]))  # two mentions: skipped
    bank = D.harvest_paraphrase_templates(recs)
    assert bank == {"The mother tongue of {} is": {"{}'s native language is": 2, "{} speaks": 1},
                    "{}'s native language is": {"The mother tongue of {} is": 2},
                    "{} speaks": {"The mother tongue of {} is": 1}}
    r = EditRecord(subject="Kurt Gödel", prompt="The mother tongue of Kurt Gödel is", target="y",
                   rephrases=["kurt gödel speaks", "Kurt Gödel's native language is"])  # both scored by evaluation
    assert prompts.training_paraphrase_prompts(r, 5, bank) == []
    r2 = EditRecord(subject="Kurt Gödel", prompt="The mother tongue of Kurt Gödel is", target="y")
    assert prompts.training_paraphrase_prompts(r2, 5, bank) == ["Kurt Gödel's native language is", "Kurt Gödel speaks"]
    assert prompts.training_paraphrase_prompts(r2, 1, bank) == ["Kurt Gödel's native language is"]  # most frequent first
    assert prompts.training_paraphrase_prompts(r2, 0, bank) == []
    with pytest.raises(ValueError, match="k must be >= 0"):
        prompts.training_paraphrase_prompts(r2, -1, bank)
    shipped = D.paraphrase_templates()
    assert len(shipped) > 1000 and all(t.count("{}") == 1 and all(u.count("{}") == 1 for u in d) for t, d in shipped.items())


@pytest.mark.parametrize("text, form", [
    ("Ádám Rajhona, 72, Hungarian actor. The twin city of Kharkiv is", "paraphrase"),  # break, then more words
    ('2069." Kharkiv is a twin city of', "paraphrase"),  # a quote closes the sentence
    ("Biography\n\n Kharkiv is a twin city of", "paraphrase"),  # a line break
    ("Kharkiv is a twin city of", "generation"),
    ("People in Kharkiv's twin city speak the language of", "generation"),
    ("Kharkiv is paired with which city? It is Kharkiv", "generation"),  # a break only AFTER the first mention
    ("The twin city of Kharkiv.Ukraine is", "generation"),  # a full stop without white space is no break
])
def test_rephrase_form(text, form):
    assert D.rephrase_form(text, "Kharkiv") == form


def test_rephrase_form_needs_the_subject():
    with pytest.raises(ValueError, match="Kharkiv"):
        D.rephrase_form("Lviv is a twin city of", "Kharkiv")


def test_rephrase_forms_of_the_real_counterfact_file(data_root):
    """The split that README and the closing notes report for the first 1,000 edits."""
    from collections import Counter

    joined = formats.load_edits("counterfact", data_dir=data_root, n=1000)
    forms = Counter(D.rephrase_form(p, r.subject) for r in joined for p in r.rephrases[1:])
    assert forms == {"paraphrase": 69, "generation": 379}
