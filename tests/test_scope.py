"""Tests of lks.scope: the three matching stages, their priorities and spans, input validation,
Unicode, and hypothesis properties (inserted subjects are found exactly where they were put;
texts made of foreign words never match)."""

from __future__ import annotations

import json

import pytest
from conftest import data_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rapidfuzz import fuzz

from lks.scope import ScopeIndicator, ScopeMatch

SUBJECTS = ["Danielle Darrieux", "New York", "New York City", "Paris", "Apple", "U2", "Washington, D.C.",
            "Zoë Saldaña", "Málaga", "Đorđe Balašević", "İstanbul", "Pinterest"]


@pytest.fixture(scope="module")
def si() -> ScopeIndicator:
    return ScopeIndicator(SUBJECTS)


def span(text: str, m: ScopeMatch | None) -> str | None:
    return None if m is None else text[m.start:m.end]


# ---------------------------------------------------------------- exact and casefold


def test_exact_match_reports_subject_span_and_kind(si):
    text = "The mother tongue of Danielle Darrieux is"
    m = si.find(text)
    assert m == ScopeMatch(si.index_of("Danielle Darrieux"), "Danielle Darrieux", 21, 38, "exact", 100.0)
    assert span(text, m) == "Danielle Darrieux"


def test_longest_match_wins(si):
    text = "She moved to New York City in 1990"
    m = si.find(text)
    assert m.subject == "New York City" and span(text, m) == "New York City"
    assert si.find("She moved to New York in 1990").subject == "New York"


def test_equal_length_ties_go_to_the_earliest():
    si = ScopeIndicator(["Rome", "Oslo"])
    m = si.find("From Oslo to Rome")
    assert (m.subject, m.start) == ("Oslo", 5)


@pytest.mark.parametrize("text", ["Parisian cafes", "the parish church", "U23 squad", "ParisParis", "xParis"])
def test_no_match_inside_a_longer_word(si, text):
    assert si.find(text) is None


@pytest.mark.parametrize("text,start", [("Paris.", 0), ("(Paris)", 1), ("I saw Paris", 6), ("Paris-Dakar", 0),
                                        ("U2's album", 0), ("2009: U2", 6)])
def test_match_at_word_boundaries(si, text, start):
    m = si.find(text)
    assert m is not None and m.kind == "exact" and m.start == start


def test_possessive_matches(si):
    text = "Danielle Darrieux's native language is"
    m = si.find(text)
    assert m.kind == "exact" and span(text, m) == "Danielle Darrieux"


def test_subject_ending_in_punctuation_matches_before_anything(si):
    for text in ("Washington, D.C. is a city", "Washington, D.C.'s mayor", "in Washington, D.C."):
        assert span(text, si.find(text)) == "Washington, D.C."


def test_casefold_reports_span_in_the_original_text(si):
    text = "Everyone loves NEW YORK CITY!"
    m = si.find(text)
    assert m.kind == "casefold" and m.subject == "New York City" and m.score == 100.0
    assert span(text, m) == "NEW YORK CITY"


def test_casefold_span_survives_characters_whose_lowercase_is_longer(si):
    # "İ".lower() is two code points: a naive lowercase would shift every later offset.
    text = "İİİ and then paris"
    m = si.find(text)
    assert m.kind == "casefold" and span(text, m) == "paris"


def test_exact_stage_comes_before_casefold():
    si = ScopeIndicator(["New York", "new york city"])
    m = si.find("New York City")  # exact "New York" beats the longer casefold hit
    assert (m.subject, m.kind) == ("New York", "exact")


def test_subjects_differing_only_in_case():
    si = ScopeIndicator(["Apple", "apple"])
    assert (si.find("an apple a day").index, si.find("an apple a day").kind) == (1, "exact")
    assert (si.find("Apple Inc.").index, si.find("Apple Inc.").kind) == (0, "exact")
    assert (si.find("APPLE").index, si.find("APPLE").kind) == (0, "casefold")


def test_casefold_can_be_switched_off():
    si = ScopeIndicator(["Life"], casefold=False)
    assert si.find("a good life") is None
    assert si.find("Life is good").kind == "exact"


# ---------------------------------------------------------------- unicode


@pytest.mark.parametrize("text,subject,kind", [
    ("Zoë Saldaña stars in Avatar", "Zoë Saldaña", "exact"),
    ("ZOË SALDAÑA stars in Avatar", "Zoë Saldaña", "casefold"),
    ("Picasso was born in Málaga.", "Málaga", "exact"),
    ("born in MÁLAGA's old town", "Málaga", "casefold"),
    ("Đorđe Balašević sang", "Đorđe Balašević", "exact"),
    ("đorđe balašević sang", "Đorđe Balašević", "casefold"),
    ("I love İstanbul", "İstanbul", "exact"),
    ("I love İSTANBUL", "İstanbul", "casefold"),
])
def test_unicode_subjects(si, text, subject, kind):
    m = si.find(text)
    assert (m.subject, m.kind) == (subject, kind)
    assert span(text, m).lower() == subject.lower() or kind == "casefold"
    assert len(span(text, m)) == len(subject)


def test_unicode_letters_count_as_word_characters():
    si = ScopeIndicator(SUBJECTS, fuzzy=False)  # "xĐorđe" is one typo away: fuzzy would accept it
    assert si.find("the Málagaño region") is None
    assert si.find("xĐorđe Balašević") is None
    assert ScopeIndicator(SUBJECTS).find("xĐorđe Balašević").kind == "fuzzy"


# ---------------------------------------------------------------- fuzzy


def test_fuzzy_finds_a_misspelling(si):
    text = "The mother tongue of Danielle Darieux is"
    m = si.find(text)
    assert (m.subject, m.kind) == ("Danielle Darrieux", "fuzzy")
    assert span(text, m) == "Danielle Darieux"
    assert 90.0 <= m.score < 100.0


@pytest.mark.parametrize("typo", ["Danielle Darrieuxx", "Danielle Darriuex", "Danielel Darrieux", "danielle darrieu",
                                  "Daniele Darrieux's"])
def test_fuzzy_handles_insertions_swaps_deletions_and_case(si, typo):
    m = si.find(f"Who is {typo}?")
    assert m is not None and (m.subject, m.kind) == ("Danielle Darrieux", "fuzzy")


def test_fuzzy_disabled():
    si = ScopeIndicator(SUBJECTS, fuzzy=False)
    assert si.find("The mother tongue of Danielle Darieux is") is None


def test_fuzzy_threshold_is_respected():
    text, typo = "Is Danielle Darieux French?", "danielle darieux"
    score = fuzz.ratio("danielle darrieux", typo)
    below = ScopeIndicator(SUBJECTS, fuzzy_threshold=score - 0.5).find(text)
    above = ScopeIndicator(SUBJECTS, fuzzy_threshold=score + 0.5).find(text)
    assert below is not None and below.kind == "fuzzy" and below.score == pytest.approx(score)
    assert above is None
    # Every word verbatim, so the index lets it through at any threshold; the score decides.
    text = "Is Danielle X Darrieux French?"
    score = fuzz.ratio("danielle darrieux", "danielle x darrieux")
    assert ScopeIndicator(SUBJECTS, fuzzy_threshold=score + 0.5).find(text) is None
    m = ScopeIndicator(SUBJECTS, fuzzy_threshold=score - 0.5).find(text)
    assert m.kind == "fuzzy" and span(text, m) == "Danielle X Darrieux" and m.score == pytest.approx(score)


def test_fuzzy_min_length_keeps_short_names_from_matching_words():
    assert ScopeIndicator(["Pinterest"]).find("compound interest rates") is None
    m = ScopeIndicator(["Pinterest"], fuzzy_min_length=0).find("compound interest rates")
    assert (m.subject, m.kind) == ("Pinterest", "fuzzy")


def test_fuzzy_needs_every_word():
    si = ScopeIndicator(["Michael Jordan Smithfield"])
    assert si.find("Michael Jordan played") is None
    assert si.find("Michael Jordn Smithfield played").kind == "fuzzy"


def test_fuzzy_accepts_a_typo_in_a_common_word():
    # "University" occurs in more subjects than the index cap, so it is a "cold" word, found
    # through its own small index rather than the main one.
    unis = [f"University of Place{c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"] + ["Otterbein University"]
    si = ScopeIndicator(unis)
    m = si.find("He studied at Otterbein Universty")
    assert (m.subject, m.kind) == ("Otterbein University", "fuzzy")


def test_an_exact_hit_preempts_a_better_fuzzy_one():
    si = ScopeIndicator(["Helsinki", "Helsinki City Transport"])
    m = si.find("Helsinki City Trnsport runs the trams")
    assert (m.subject, m.kind) == ("Helsinki", "exact")
    assert ScopeIndicator(["Helsinki City Transport"]).find("Helsinki City Trnsport runs").kind == "fuzzy"


def test_no_match_returns_none(si):
    assert si.find("A sentence about nothing in particular.") is None
    assert si.find("") is None


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("subjects", [[], [""], ["Paris", "   "], ["Paris", "\t\n"]])
def test_invalid_subjects_raise(subjects):
    with pytest.raises(ValueError):
        ScopeIndicator(subjects)


def test_a_bare_string_is_rejected():
    with pytest.raises(TypeError):
        ScopeIndicator("Paris")


@pytest.mark.parametrize("kwargs", [{"fuzzy_threshold": -1}, {"fuzzy_threshold": 100.5}, {"fuzzy_min_length": -1}])
def test_invalid_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        ScopeIndicator(["Paris"], **kwargs)


def test_duplicates_are_dropped_keeping_first_order():
    si = ScopeIndicator(["Paris", "Rome", "Paris", "Oslo", "Rome"])
    assert si.subjects == ["Paris", "Rome", "Oslo"] and len(si) == 3
    assert [si.index_of(s) for s in ("Paris", "Rome", "Oslo")] == [0, 1, 2]
    assert si.find("to Oslo").index == 2 and "Rome" in si and "Berlin" not in si


def test_index_of_unknown_subject_raises_keyerror_naming_it(si):
    with pytest.raises(KeyError, match="Berlin"):
        si.index_of("Berlin")


def test_stats(si):
    st_ = si.stats()
    assert st_["n_subjects"] == len(SUBJECTS)
    assert st_["n_short"] == 1  # "U2"
    assert st_["n_single_word"] == sum(len(s.split()) == 1 for s in SUBJECTS if s != "Washington, D.C.")


# ---------------------------------------------------------------- hypothesis properties

# Subjects use letters a-m, filler words n-z: no filler word can overlap a subject.
SUBJECT_WORD = st.text(alphabet="abcdefghijklm", min_size=2, max_size=9).map(str.capitalize)
SUBJECT = st.lists(SUBJECT_WORD, min_size=1, max_size=4).map(" ".join)
FILLER = st.lists(st.text(alphabet="nopqrstuvwxyz", min_size=1, max_size=8), max_size=12)
PUNCT = st.sampled_from(["", ".", ",", "'s", "!", ")"])
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(subjects=st.lists(SUBJECT, min_size=1, max_size=8, unique=True), pick=st.integers(0, 7),
       before=FILLER, after=FILLER, punct=PUNCT, upper=st.booleans())
def test_inserted_subject_is_found_with_its_span(subjects, pick, before, after, punct, upper):
    subject = subjects[pick % len(subjects)]
    mention = subject.upper() if upper else subject
    prefix = " ".join(before) + (" " if before else "")
    text = prefix + mention + punct + (" " if after else "") + " ".join(after)
    m = ScopeIndicator(subjects).find(text)
    assert m is not None
    assert (m.subject, m.start, m.end) == (subject, len(prefix), len(prefix) + len(subject))
    assert m.kind == ("exact" if mention == subject else "casefold")


@SETTINGS
@given(subjects=st.lists(SUBJECT, min_size=1, max_size=8), words=FILLER, fuzzy=st.booleans())
def test_text_of_foreign_words_never_matches(subjects, words, fuzzy):
    si = ScopeIndicator(subjects, fuzzy=fuzzy)
    assert si.find(" ".join(words)) is None
    assert si.find(" ".join(words).upper()) is None


@SETTINGS
@given(words=st.lists(st.text(alphabet="abcdefghijklm", min_size=6, max_size=9), min_size=2, max_size=3),
       which=st.integers(0, 2), pos=st.integers(0, 8), op=st.sampled_from(["insert", "delete", "substitute"]),
       before=FILLER, after=FILLER)
def test_one_typo_in_a_long_subject_is_found_fuzzily(words, which, pos, op, before, after):
    subject = " ".join(w.capitalize() for w in words)
    w = words[which % len(words)]
    p = pos % len(w)
    bad = {"insert": w[:p] + "z" + w[p:], "delete": w[:p] + w[p + 1:], "substitute": w[:p] + "z" + w[p + 1:]}[op]
    typo = " ".join(bad if i == which % len(words) else x for i, x in enumerate(words))
    prefix = " ".join(before) + (" " if before else "")
    text = prefix + typo + (" " if after else "") + " ".join(after)
    m = ScopeIndicator([subject]).find(text)
    assert m is not None and (m.subject, m.kind) == (subject, "fuzzy")
    assert (m.start, m.end) == (len(prefix), len(prefix) + len(typo))


@SETTINGS
@given(subjects=st.lists(SUBJECT, min_size=1, max_size=6), texts=st.lists(st.text(max_size=40), max_size=6))
def test_find_on_arbitrary_text_returns_a_span_of_the_text(subjects, texts):
    si = ScopeIndicator(subjects)
    for t in texts:
        m = si.find(t)
        if m is not None:
            assert 0 <= m.start < m.end <= len(t) and si.subjects[m.index] == m.subject
            if m.kind == "exact":
                assert t[m.start:m.end] == m.subject


# ---------------------------------------------------------------- real edit data


def test_every_counterfact_prompt_mentions_its_subject(data_root):
    path = data_file(data_root, "lks/cf_eval_data.json")
    recs = json.loads(path.read_text(encoding="utf-8"))[:2000]
    si = ScopeIndicator([r["subject"] for r in recs])
    for r in recs:
        m = si.find(r["prompt"])
        # A longer edited subject that contains this one may win (longest match).
        assert m is not None and m.kind == "exact" and r["subject"] in m.subject, (r["prompt"], m)
