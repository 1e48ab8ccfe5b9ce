"""Edit scope indicator: which edited subject (if any) a prompt mentions, and where.

LKS only replaces the knowledge block of a prompt that mentions an edited subject; every other
prompt must run through the frozen model untouched. The indicator therefore has two jobs of very
different cost: find a mention quickly when there is one, and say "no" even faster for the great
majority of prompts, which mention none of the (up to tens of thousands of) edited subjects.

Three stages, each run only when the previous one found nothing:

1. **exact** - Aho-Corasick over all subjects. A hit counts only at word boundaries: no letter
   or digit right before or after it ("Paris" is not in "Parisian", but "Danielle Darrieux's"
   mentions "Danielle Darrieux"); the check is skipped on a side where the subject itself ends
   in punctuation ("Washington, D.C."), as regex ``\\b`` would. The longest hit wins ("New York
   City" over "New York"), ties go to the earliest.
2. **casefold** - the same over lowercased text. Both stages share ONE automaton built over
   lowercased subjects: each hit is compared with the original text to tell exact from casefold,
   so a prompt without any mention costs a single automaton pass.
3. **fuzzy** - rapidfuzz ``fuzz.ratio`` between a candidate subject and the runs of prompt words
   with about as many words, to catch small misspellings ("Danielle Darieux"). Scoring every
   subject would cost milliseconds per prompt, so candidates come from an index built once:
   each subject word and its one-deletion variants (SymSpell) point to the subjects containing
   it, and a subject is scored only if every one of its words appears in the prompt within one
   typo and the typos fit the threshold. Prompt tokens are looked up once per vocabulary (a
   memo), common words not at all, so most prompts leave the stage after one set difference and
   a few dictionary look-ups.

Lowercasing is per character and keeps the string length, so every hit's span in the lowered
text is its span in the original text. A character whose lowercase form is longer (Turkish "İ")
is kept as it is on both sides: such subjects still match exactly, and casefold for their other
characters. No Unicode normalisation is done: give NFC text and subjects alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ahocorasick
from rapidfuzz import fuzz, process

# Words are maximal runs of Unicode letters and digits: "Darrieux's" -> "darrieux", "s", so a
# possessive or a punctuation mark never glues onto a name.
_WORD_RE = re.compile(r"[^\W_]+")
# Words shorter than this carry no fuzzy key ("of", "Li"); from _MIN_DELETE_WORD chars on a word
# also indexes its one-deletion variants (SymSpell): two words within one insertion, deletion,
# substitution or adjacent swap of each other always share the word itself or a variant.
_MIN_KEY_WORD = 3
_MIN_DELETE_WORD = 4
# Only "hot" keys are looked up per prompt word: at least _MIN_HOT_KEY chars and shared by at
# most max(_MIN_KEY_CAP, _KEY_CAP_FRACTION * n_subjects) subjects. Shorter or commoner keys
# ("are", a variant of "dare"; "john"; "city") say little about WHICH subject is meant and would
# drag a slice of the subjects into every prompt. A subject word whose own key is not hot
# ("cold": "john", "the", "bbc") is checked only once its subject has been proposed by its hot
# words (see _build_fuzzy_index).
_MIN_HOT_KEY = 4
_MIN_KEY_CAP = 16
_KEY_CAP_FRACTION = 0.002
# The commonest English words: as prompt words they occur in nearly every prompt, and each is
# within one typo of a handful of subject words ("with" - "wish", "many" - "mandy"), so letting
# them propose candidates costs time on every prompt for the rare subject misspelled into one.
# They are neither hot keys nor looked up; inside a subject they are cold (needed verbatim).
_STOPWORDS = frozenset("""
a about after all also an and any are as at be been before being between both but by can could
did do does each for from had has have he her here him his how if in into is it its just like
made make many may more most much must my new no not now of on one only or other our out over
said same she should since so some such than that the their them then there these they this
those through to too two under up very was way we well were what when where which while who
why will with would year years you your three four five first second every people time
""".split())
# Worst-case bound on rapidfuzz work per prompt: score at most this many candidates.
_MAX_CANDIDATES = 16
# The per-token memo of index look-ups is cleared when it reaches this size (bounds memory on
# endless streams of new words; prompt vocabularies are Zipfian, so it refills with what matters).
_CACHE_LIMIT = 200_000


@dataclass(frozen=True)
class ScopeMatch:
    """A mention of an edited subject in a text.

    Attributes:
        index: Index of the subject in ``ScopeIndicator.subjects``.
        subject: The edited subject string.
        start: Start of the mention's character span ``[start, end)`` in the ORIGINAL text.
        end: End (exclusive) of that span.
        kind: ``"exact"``, ``"casefold"`` or ``"fuzzy"``.
        score: 100.0 for exact and casefold matches, the rapidfuzz ``ratio`` for fuzzy ones.
    """

    index: int
    subject: str
    start: int
    end: int
    kind: str
    score: float


def _lower(text: str) -> str:
    """Lowercase ``text`` keeping its length and making each character's result context-free.

    ``str.lower`` is fast and per-character except for two rare cases: characters whose lowercase
    is longer ("İ" -> "i̇", which would shift every later offset) and the Greek capital sigma,
    lowered to "ς" or "σ" depending on its neighbours (so a subject lowered alone could differ
    from the same subject lowered inside a sentence). Those texts take a per-character path that
    keeps length-changing characters as they are and always maps "Σ" to "σ".
    """
    low = text.lower()
    if len(low) == len(text) and "Σ" not in text:
        return low
    return "".join(lc if len(lc := ch.lower()) == 1 else ch for ch in text)


def _word_keys(word: str) -> set[str]:
    """Fuzzy-index keys of a lowercased word: itself and, if long enough, its one-deletion variants."""
    if len(word) < _MIN_KEY_WORD:
        return set()
    if len(word) < _MIN_DELETE_WORD:
        return {word}
    keys = {word[:j] + word[j + 1:] for j in range(len(word))}
    keys.add(word)
    return keys


class ScopeIndicator:
    """Find which edited subject, if any, a text mentions (exact, then casefold, then fuzzy).

    Args:
        subjects: Edited subjects. Duplicates are dropped, keeping the order of first appearance,
            so ``ScopeMatch.index`` refers to ``self.subjects``.
        fuzzy_threshold: Minimum rapidfuzz ``ratio`` (0-100) for a fuzzy match.
        fuzzy: Whether to run the fuzzy stage at all.
        casefold: Keyword-only. Whether to run the casefold stage; without it a lowercase common
            word ("life") only matches a subject spelled exactly that way.
        fuzzy_min_length: Keyword-only. Subjects shorter than this (counted on their normalised
            form: lowercased words joined by single spaces) never match fuzzily. Within ratio 90
            of a short name there is usually an ordinary word - "Pinterest" / "interest",
            "Givers" / "gives", "Germany" / "German" - and such false positives would apply an
            edit to unrelated prompts (on 16,000 WikiText/GSM8K/MMLU prompts with 10,000 subjects
            the default cuts fuzzy false positives from 5.7% to 0.8% of prompts, and finds 79%
            instead of 85% of misspelled mentions). 0 restores plain threshold semantics.

    Raises:
        TypeError: ``subjects`` is a single string.
        ValueError: No subject, an empty or whitespace-only subject, a threshold outside
            [0, 100] or a negative ``fuzzy_min_length``.

    ``find`` memoises index look-ups per prompt token; the memo only saves time (results never
    depend on it), is bounded, and is safe to share between threads under the GIL.
    """

    def __init__(self, subjects: Sequence[str], fuzzy_threshold: float = 90.0, fuzzy: bool = True,
                 *, casefold: bool = True, fuzzy_min_length: int = 10) -> None:
        if isinstance(subjects, str):  # would silently become one subject per character
            raise TypeError("subjects must be a sequence of strings, not a single string")
        self.subjects: list[str] = list(dict.fromkeys(subjects))
        if not self.subjects:
            raise ValueError("ScopeIndicator needs at least one subject")
        for s in self.subjects:
            if not isinstance(s, str) or not s.strip():
                raise ValueError(f"subjects must be non-empty strings, got {s!r}")
        if not 0.0 <= fuzzy_threshold <= 100.0:
            raise ValueError(f"fuzzy_threshold must be in [0, 100], got {fuzzy_threshold}")
        if fuzzy_min_length < 0:
            raise ValueError(f"fuzzy_min_length must be >= 0, got {fuzzy_min_length}")
        self.fuzzy_threshold = float(fuzzy_threshold)
        self.fuzzy = fuzzy
        self.casefold = casefold
        self.fuzzy_min_length = fuzzy_min_length
        self._index = {s: i for i, s in enumerate(self.subjects)}
        self._build_automaton()
        self.fuzzy_index = FuzzyIndex(self.subjects, self.fuzzy_threshold, fuzzy_min_length)

    # ------------------------------------------------------------------ construction

    def _build_automaton(self) -> None:
        # Subjects that lowercase alike ("Apple", "APPLE") share one key; a hit is resolved to the
        # one spelled exactly like the text, else to the first of them (casefold).
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(self.subjects):
            groups.setdefault(_lower(s), []).append(i)
        self._auto = ahocorasick.Automaton()
        for key, ids in groups.items():
            # Boundaries are checked only on a side where the subject itself ends in a letter or
            # digit (as regex \b does): "Washington, D.C." may be followed by anything.
            self._auto.add_word(key, (len(key), key[0].isalnum(), key[-1].isalnum(), tuple(ids)))
        self._auto.make_automaton()

    # ------------------------------------------------------------------ public API

    def __len__(self) -> int:
        return len(self.subjects)

    def __contains__(self, subject: object) -> bool:
        return subject in self._index

    def index_of(self, subject: str) -> int:
        """Index of ``subject`` in ``self.subjects``.

        Raises:
            KeyError: ``subject`` is not one of the edited subjects.
        """
        try:
            return self._index[subject]
        except KeyError:
            raise KeyError(f"{subject!r} is not among the {len(self.subjects)} edited subjects") from None

    def find(self, text: str) -> ScopeMatch | None:
        """The best mention of an edited subject in ``text``, or None.

        Exact beats casefold beats fuzzy. Within exact and casefold the longest mention wins
        (ties: the earliest); within fuzzy the highest score (ties: the longer subject, then the
        earliest span). The order is strict: a misspelled "Helsinki City Trnsport" yields the
        edited subject "Helsinki" (exact), not "Helsinki City Transport" (fuzzy).
        """
        low = _lower(text)
        hit = self._find_aho(text, low)
        if hit is None and self.fuzzy:
            found = self.fuzzy_index.find(low)
            if found is not None:
                i, start, end, score = found
                hit = ScopeMatch(i, self.subjects[i], start, end, "fuzzy", score)
        return hit

    def stats(self) -> dict[str, Any]:
        """Index statistics, for reports and benchmarks.

        ``n_short`` counts subjects of <= 4 characters and ``n_single_word`` one-word subjects:
        both still match as whole words only, but are the likeliest to occur in unrelated text.
        ``n_fuzzy_indexed`` subjects are long enough to ever pass the fuzzy threshold;
        ``n_fuzzy_unreachable`` of them have no hot key (only common words like "John" or words
        of <= 3 chars), so the fuzzy stage never considers them. ``n_cold_words`` distinct
        subject words are too common or short for the index and are required verbatim.
        """
        return {"n_subjects": len(self.subjects), "n_short": sum(len(s) <= 4 for s in self.subjects),
                **self.fuzzy_index.stats()}

    # ------------------------------------------------------------------ stages

    def _find_aho(self, text: str, low: str) -> ScopeMatch | None:
        """Stages 1 and 2 in one automaton pass over the lowered text."""
        n = len(text)
        subjects = self.subjects
        best_exact: tuple[int, int, int] | None = None  # (start, end, subject index)
        best_fold: tuple[int, int, int] | None = None
        for last, (klen, left, right, ids) in self._auto.iter(low):
            start, end = last - klen + 1, last + 1
            if (left and start > 0 and text[start - 1].isalnum()) or (right and end < n and text[end].isalnum()):
                continue
            span = text[start:end]
            # Hits arrive ordered by end, so among equal lengths the first one seen is the
            # earliest: replace only on a strictly longer hit.
            for i in ids:
                if subjects[i] == span:
                    if best_exact is None or klen > best_exact[1] - best_exact[0]:
                        best_exact = (start, end, i)
                    break
            else:
                if best_fold is None or klen > best_fold[1] - best_fold[0]:
                    best_fold = (start, end, ids[0])
        if best_exact is not None:
            s, e, i = best_exact
            return ScopeMatch(i, subjects[i], s, e, "exact", 100.0)
        if best_fold is not None and self.casefold:
            s, e, i = best_fold
            return ScopeMatch(i, subjects[i], s, e, "casefold", 100.0)
        return None


class FuzzyIndex:
    """Stage 3 of :class:`ScopeIndicator`: the SymSpell index of the subjects' words (built once)
    and the fuzzy search of a lowered prompt (see the module docstring). ``subjects`` in the
    indicator's order; ``threshold`` and ``min_length`` as its ``fuzzy_threshold`` and
    ``fuzzy_min_length``."""

    def __init__(self, subjects: Sequence[str], threshold: float, min_length: int) -> None:
        self.threshold = threshold
        n = len(subjects)
        # Fuzzy matching compares word sequences (lowercased words joined by one space), so that
        # punctuation and spacing ("Gian-Carlo", "D.C.", "Helsinki!") cost nothing.
        all_words = [_WORD_RE.findall(_lower(s)) for s in subjects]
        self.sub_norm = [" ".join(ws) for ws in all_words]
        self.sub_nwords = [len(ws) for ws in all_words]
        # ratio = 100 * (1 - d / (len_a + len_b)) for indel distance d, so a match with a span of
        # at most L + d chars needs d <= 2 * slack * L / (1 - slack): the typo budget. Subjects
        # with a budget under 1 ("GQ", "Paul" at 90) or under fuzzy_min_length chars can only
        # match exactly or casefold.
        slack = 1.0 - threshold / 100.0
        self.budget = [math.floor(2 * slack * len(s) / max(1.0 - slack, 1e-9) + 1e-9)
                        if len(s) >= min_length else 0 for s in self.sub_norm]
        # Each subject's distinct words of >= _MIN_KEY_WORD chars ("of", "II" tell nothing) get
        # a slot; postings map a key to the subjects and slots of the words that have it.
        self._sub_words = [[w for w in dict.fromkeys(ws) if len(w) >= _MIN_KEY_WORD] if self.budget[i] else []
                           for i, ws in enumerate(all_words)]
        postings: dict[str, list[tuple[int, int, str]]] = {}  # key -> [(subject, slot, word)]
        for i, words in enumerate(self._sub_words):
            for slot, w in enumerate(words):
                for key in _word_keys(w):
                    postings.setdefault(key, []).append((i, slot, w))
        self.key_cap = cap = max(_MIN_KEY_CAP, math.ceil(_KEY_CAP_FRACTION * n))
        self._hot = {k: tuple(p) for k, p in postings.items()
                     if len(k) >= _MIN_HOT_KEY and k not in _STOPWORDS and len({i for i, _, _ in p}) <= cap}
        # Per subject: the slots of its hot words (own key hot, so found within one typo through
        # the index), spread to bit 3 * slot as in _token_hits codes; and its cold words. Short
        # cold words are needed verbatim ("60 Minutes" is not "20 minutes", nor "Apple A5"
        # "apple"); the longer ones ("john", "university") within one typo, looked up in a small
        # index of their own keys once a candidate has been proposed by its hot words.
        self._hot3 = [sum(1 << 3 * s for s, w in enumerate(words) if w in self._hot) for words in self._sub_words]
        cold_words = [[w for w in dict.fromkeys(ws) if w not in self._hot] if self.budget[i] else []
                      for i, ws in enumerate(all_words)]
        self._cold_strict = [tuple(w for w in ws if len(w) < _MIN_DELETE_WORD) for ws in cold_words]
        self._cold_loose = [tuple(w for w in ws if len(w) >= _MIN_DELETE_WORD) for ws in cold_words]
        self._cold_vocab = frozenset(w for ws in cold_words for w in ws)
        loose_keys: dict[str, list[str]] = {}
        for w in {w for ws in self._cold_loose for w in ws}:
            for key in _word_keys(w):
                loose_keys.setdefault(key, []).append(w)
        # One look-up per key of a new prompt word: its hot postings and the long cold words.
        self._keymap = {k: (self._hot.get(k, ()), tuple(loose_keys.get(k, ()))) for k in {*self._hot, *loose_keys}}
        self._n_reachable = len({i for p in self._hot.values() for i, _, _ in p})
        self._n_fuzzy_indexed = sum(1 for b in self.budget if b)
        self._cache: dict[str, tuple[tuple[tuple[int, int], ...], frozenset[str], frozenset[str]]] = {}
        # Tokens known to hit nothing (and the stopwords): removed from a prompt's token set by
        # one C-level set difference instead of a Python loop iteration each.
        self._skip: set[str] = set(_STOPWORDS)

    def _token_hits(self, token: str) -> tuple[tuple[tuple[int, int], ...], frozenset[str], frozenset[str]]:
        """Index hits of one lowercased whitespace token, memoised (prompt vocabularies are Zipfian).

        Returns:
            ``((subject, code), ...)`` for the subjects with a word within one typo of a word
            of the token; the token's words that are some subject's cold word; and the long
            cold words within one typo of a word of the token. ``code`` has
            bit ``3 * slot + c`` set when the subject's word in ``slot`` is matched at indel cost
            ``c``: 0 the same word, 1 one character inserted or deleted (one word is a deletion
            variant of the other), 2 a substitution or swap (they share a variant). OR-ing the
            codes of all tokens then tells each word's cheapest match.
        """
        hit = self._cache.get(token)
        if hit is None:
            merged: dict[int, int] = {}
            near: set[str] = set()
            keymap = self._keymap
            keys_view = keymap.keys()
            # a token of letters and digits only is one word: no regex (the common case)
            words = [token] if token.isalnum() else _WORD_RE.findall(token)
            for x in words:
                found = keys_view & _word_keys(x)  # usually empty; a C-level intersection
                if not found:
                    continue
                stop = x in _STOPWORDS  # no hot look-up, see _STOPWORDS
                for key in found:
                    entry = keymap[key]
                    near.update(entry[1])
                    for i, slot, w in () if stop else entry[0]:
                        cost = (key != x) + (key != w)
                        if cost <= self.budget[i]:  # else hopeless
                            merged[i] = merged.get(i, 0) | 1 << (3 * slot + cost)
            if len(self._cache) + len(self._skip) >= _CACHE_LIMIT:
                self._cache.clear()
                self._skip = set(_STOPWORDS)
            hit = (tuple(merged.items()), self._cold_vocab.intersection(words), frozenset(near))
            if any(hit):
                self._cache[token] = hit
            else:
                self._skip.add(token)
        return hit

    def find(self, low: str) -> tuple[int, int, int, float] | None:
        """``(subject index, start, end, score)`` of the best fuzzy mention in the lowered text
        ``low``, or None: the few subjects whose every word shows up within the typo budget
        (:meth:`candidates`) are scored on the runs of prompt words around them (:meth:`best_run`)."""
        live, cands = self.candidates(low)
        return self.best_run(low, live, cands) if cands else None

    def candidates(self, low: str) -> tuple[set[str], list[tuple[int, int]]]:
        """``(the prompt's tokens that look anything up, [(typo cost, subject index), ...])``: at
        most :data:`_MAX_CANDIDATES` subjects, fewest typos first when there are more."""
        # Whitespace tokens, not regex words: str.split is several times faster than a regex
        # over the whole prompt, and _token_hits splits a token into words once per vocabulary.
        codes: dict[int, int] = {}
        cold: list[tuple[frozenset[str], frozenset[str]]] = []
        cache, token_hits = self._cache, self._token_hits
        tokens = set(low.split())
        # Bare stopwords look nothing up (see _STOPWORDS); they only count as cold words verbatim.
        live = tokens.difference(self._skip)
        for tok in live:
            hot, exact, near = cache.get(tok) or token_hits(tok)
            if exact or near:
                cold.append((exact, near))
            for i, code in hot:
                codes[i] = codes.get(i, 0) | code
        cands = []
        hot3, budget, strict, loose = self._hot3, self.budget, self._cold_strict, self._cold_loose
        prompt_exact: frozenset[str] = frozenset()
        prompt_near: frozenset[str] | None = None
        for i, code in codes.items():
            # Cheapest match of each hot word (bit 3 * slot): c0 verbatim, c1 one indel, c2 two.
            # Every hot word must match, and the cold words as set out in __init__,
            # within the subject's typo budget.
            h = hot3[i]
            if (code | code >> 1 | code >> 2) & h != h:  # some hot word not matched at all (most)
                continue
            c0 = code & h
            cost = 0
            if c0 != h:
                c1 = code >> 1 & h & ~c0
                c2 = code >> 2 & h & ~(c0 | c1)  # c0 | c1 | c2 == h: checked above
                cost = c1.bit_count() + 2 * c2.bit_count()
                if cost > budget[i]:
                    continue
            if strict[i] or loose[i]:
                if prompt_near is None:
                    prompt_exact = frozenset().union(tokens.intersection(_STOPWORDS), *(e for e, _ in cold))
                    prompt_near = prompt_exact.union(*(n for _, n in cold))
                if not prompt_exact.issuperset(strict[i]) or not prompt_near.issuperset(loose[i]):
                    continue
                cost += sum(w not in prompt_exact for w in loose[i])  # a typo'd one costs >= 1
                if cost > budget[i]:
                    continue
            cands.append((cost, i))
        if len(cands) > _MAX_CANDIDATES:  # fewest typos first
            cands = sorted(cands)[:_MAX_CANDIDATES]
        return live, cands

    def best_run(self, low: str, live: set[str], cands: list[tuple[int, int]]) -> tuple[int, int, int, float] | None:
        """The best-scoring run of prompt words for any candidate (see :meth:`find`)."""
        cache, token_hits, budget = self._cache, self._token_hits, self.budget
        # Score each candidate on runs of m consecutive prompt words, m within 1 of its word count
        # (a typo can split or merge words), normalised like the subjects. The best run contains
        # a token that proposed the candidate and spans at most about the subject's length, so
        # only the words around those tokens are looked at - no pass over the whole prompt.
        ids = {i for _, i in cands}
        anchors: dict[int, set[str]] = {}
        for tok in live:
            for i, _ in (cache.get(tok) or token_hits(tok))[0]:
                if i in ids:
                    anchors.setdefault(i, set()).add(tok)
        best: tuple[float, int, int, int, int] | None = None  # (score, len, -start, end, -subject)
        for _, i in cands:
            sub, k = self.sub_norm[i], self.sub_nwords[i]
            reach = len(sub) + budget[i] + 2  # + 2: a little punctuation is not in the normal form
            for tok in anchors[i]:
                pos = low.find(tok)
                while pos >= 0:
                    # Words within reach, widened to whitespace so that none is cut in two, and
                    # the runs of them that overlap the token.
                    a = low.rfind(" ", 0, max(0, pos - reach)) + 1
                    b = low.find(" ", pos + len(tok) + reach)
                    bounds = [mt.span() for mt in _WORD_RE.finditer(low, a, len(low) if b < 0 else b)]
                    words = [low[s:e] for s, e in bounds]
                    q0 = next((q for q, (s, _) in enumerate(bounds) if s >= pos), len(bounds))
                    q1 = max((q for q, (_, e) in enumerate(bounds) if e <= pos + len(tok)), default=-1)
                    for m in (k - 1, k, k + 1):
                        starts = range(max(0, q0 - m + 1), min(q1, len(words) - m) + 1)
                        if m < 1 or not starts:
                            continue
                        runs = [" ".join(words[j:j + m]) for j in starts]
                        res = process.extractOne(sub, runs, scorer=fuzz.ratio, score_cutoff=self.threshold)
                        if res is not None:
                            j = starts[res[2]]
                            cand = (res[1], len(sub), -bounds[j][0], bounds[j + m - 1][1], -i)
                            if best is None or cand > best:
                                best = cand
                    pos = low.find(tok, pos + 1)
        if best is None:
            return None
        score, _, neg_start, end, neg_i = best
        return -neg_i, -neg_start, end, float(score)

    def stats(self) -> dict[str, Any]:
        """See :meth:`ScopeIndicator.stats`."""
        return {
            "n_single_word": sum(w == 1 for w in self.sub_nwords),
            "n_fuzzy_indexed": self._n_fuzzy_indexed,
            "n_fuzzy_unreachable": self._n_fuzzy_indexed - self._n_reachable,
            "n_hot_keys": len(self._hot),
            "n_cold_words": len(self._cold_vocab),
            "key_cap": self.key_cap,
            "token_cache_size": len(self._cache) + len(self._skip) - len(_STOPWORDS),
        }
