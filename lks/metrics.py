"""Edit-quality metrics: reliability, generality, locality, specificity, efficacy, fluency, score.

Definitions (per edit, then averaged; every metric is computed for the edited model and, where it
makes sense, for the unedited model so the two stand side by side):

* **reliability** - teacher-forced top-1 accuracy of the new target's tokens after the edit prompt
  (the fraction of target tokens that are the argmax), as in the paper's code.
* **generality** - the same after a paraphrase. ``generality`` uses the *held-out* paraphrases
  (``rephrases[1:]``, never seen in training), averaged over the edits that have one
  (``generality_n``; in CounterFact the MEND rephrase exists for about 46% of the LKS records).
  ``generality_paraphrase_form`` / ``generality_generation_form`` split the held-out ones by
  :func:`lks.data.rephrase_form`: CounterFact's MEND rephrases are ROME *paraphrase prompts* (a
  random sentence, then the edited relation reworded; 69 of the 448 in the first 1,000 edits) or
  ROME *generation prompts* (379; many ask another attribute of the subject, "Lon Chaney speaks"
  -> "Lon Chaney lives in", so scoring the new target there rewards an edit that leaks into the
  subject's other facts, the opposite of locality).
  ``generality_seen`` is the paraphrase training uses (``rephrases[0]``); an editor trained with
  ``TrainConfig(train_rephrase=False)`` never saw it, and the summary then says
  ``generality_seen_split = "held-out"`` (else ``"seen"``); ``generality_seen_new_phrasing`` keeps
  the edits whose ``rephrases[0]`` phrasing is nowhere in the paraphrase bank. When no edit has a
  paraphrase in ``rephrases[1:]`` (zsRE), ``generality`` falls back to ``rephrases[0]`` and
  ``generality_split`` copies ``generality_seen_split``.
* **locality** - same-subject locality: top-1 agreement of the edited with the unedited model on
  the answer positions of the data set's locality prompt (another attribute of the same subject;
  never used in training). ``locality_acc`` is accuracy against the stored answer.
* **specificity** - neighbourhood specificity: the same agreement on prompts about *other*
  subjects with the same relation (CounterFact MEND form).
* **efficacy** / **paraphrase_success** - ROME-style: P(new target) > P(old target).
* **generation-based metrics** (:func:`generation_metrics`; ``evaluate_edits(..., fluency_n=N)``):
  the first N edits' prompts (seen in training) and held-out rephrases are continued greedily
  (``fluency_tokens`` new tokens) by the edited and by the unedited model, and each continuation
  is scored without teacher forcing:

  - ``gen_reliability`` (edit prompts) / ``gen_generality`` (held-out rephrases): the new object
    appears, as whole words and case-insensitively, among the continuation's first
    ``words(target) + 5`` words;
  - ``repeat_rate``: the new object appears two or more times in the continuation ("actor actor",
    "Italy. Italy is a country in Italy."). Beside it, ``repeat_rate_forced_base``: the same count
    when the *unedited* model continues ``prompt + " " + target`` (the object given, the rest its
    own), the rate of a model that took the new fact and then went on as before ("Manila, the
    capital of the Philippines. Manila is ..." counts in both);
  - ``fluency``: weighted n-gram entropy of prompt + continuation, ``1/3 H2 + 2/3 H3`` in bits
    (the weighting of ROME's ``compute_n_gram_entropy``: weights 2/3 and 4/3, averaged);
  - ``distinct_1`` / ``distinct_2``: distinct words / words and distinct word bigrams / bigrams
    of the continuation.

  Each comes with ``_base`` (unedited model) and ``_n`` (prompts).
* **score** - our overall score: the harmonic mean of reliability, generality and locality (the
  paper's "EP" is not defined in any public text we have, so we do not claim to reproduce it).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from lks.data import EditSet, paraphrase_templates, rephrase_form, subject_template
from lks.models import model_device
from lks.utils import length_batches, pad_ids


@torch.inference_mode()
def teacher_forced(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32,
                   context: Any = None) -> list[dict[str, Any]]:
    """Score ``target`` after ``prompt`` for each pair, teacher-forced.

    Prompt and target are tokenised together (``prompt + " " + target``) and split at the prompt's
    character length, because byte-level BPE tokenises " Paris" and "Paris" differently.

    Args:
        context: a context manager factory (e.g. ``editor.applied``) entered around each forward.

    Returns:
        Per pair: ``acc`` (fraction of target tokens that are the argmax), ``logprob`` (sum of
        target-token log-probs), ``pred`` (argmax ids at the target positions), ``n`` (target tokens).
    """
    if not prompts:
        return []
    dev = model_device(model)
    texts = [f"{p} {t}" for p, t in zip(prompts, targets)]
    enc = tokenizer(texts, return_offsets_mapping=True)
    items = []
    for ids, offs, p in zip(enc["input_ids"], enc["offset_mapping"], prompts):
        tgt = [j for j, (s, e) in enumerate(offs) if s >= len(p) and e > s and j > 0]
        items.append((ids, tgt))
    out: list[dict[str, Any]] = [{"acc": float("nan"), "logprob": float("nan"), "pred": [], "n": 0} for _ in items]
    for idx in length_batches([len(ids) for ids, _ in items], batch_size):
        if not (idx := [i for i in idx if items[i][1]]):  # a pair without target tokens keeps its nan row
            continue
        ids, mask = pad_ids([items[i][0] for i in idx], tokenizer.pad_token_id, dev)
        # the vocabulary head and its softmax only where a target token is predicted (benchmarks/bench_eval.py)
        first = min(items[i][1][0] for i in idx) - 1
        keep = torch.arange(first, max(items[i][1][-1] for i in idx), device=dev)
        with (context() if context else nullcontext()):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.float(), -1)
        for r, i in enumerate(idx):
            tgt = items[i][1]
            pos = torch.tensor(tgt) - 1 - first
            true = torch.tensor([items[i][0][j] for j in tgt])
            lp = logp[r, pos.to(dev)].cpu()
            pred = lp.argmax(-1)
            out[i] = {"acc": float((pred == true).float().mean()), "logprob": float(lp.gather(-1, true[:, None]).sum()),
                      "pred": pred.tolist(), "n": len(tgt)}
    return out


def ngram_entropy(text: str, n: int) -> float:
    """Entropy (bits) of the word n-gram distribution of ``text`` (0 for fewer than one n-gram)."""
    words = text.split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in grams.values())


def fluency(text: str) -> float:
    """Weighted bi/tri-gram entropy: ``1/3 H2 + 2/3 H3`` (bits)."""
    return ngram_entropy(text, 2) / 3 + 2 * ngram_entropy(text, 3) / 3


def object_count(text: str, obj: str) -> int:
    """How often ``obj`` occurs in ``text`` as whole words, case-insensitively ("Italy" in "Italy.
    Italy's" twice; "Ital" never); white space inside ``obj`` matches any white space."""
    words = obj.split()
    if not words:
        return 0
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    return len(re.findall(pattern, text, flags=re.IGNORECASE))


def distinct_n(text: str, n: int) -> float:
    """Distinct word n-grams / word n-grams of ``text`` (nan when it has none)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def continuation_scores(prompt: str, continuation: str, target: str) -> dict[str, float]:
    """Generation-based scores of one free continuation of ``prompt`` for the new object ``target``
    (definitions in the module docstring): ``hit``, ``repeat``, ``fluency``, ``distinct_1``, ``distinct_2``."""
    head = " ".join(continuation.split()[:len(target.split()) + 5])
    return {"hit": float(object_count(head, target) > 0), "repeat": float(object_count(continuation, target) >= 2),
            "fluency": fluency(f"{prompt}{continuation}"), "distinct_1": distinct_n(continuation, 1),
            "distinct_2": distinct_n(continuation, 2)}


def harmonic_mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    if not vals or min(vals) <= 0:
        return 0.0
    return len(vals) / sum(1 / v for v in vals)


def _agreement(a: list[int], b: list[int]) -> float:
    return float(np.mean([x == y for x, y in zip(a, b)])) if a and len(a) == len(b) else float("nan")


def _form(text: str, subject: str) -> str | None:
    """:func:`lks.data.rephrase_form`, or None for a rephrase that does not name the subject."""
    try:
        return rephrase_form(text, subject)
    except ValueError:
        return None


class UneditedMemo:
    """The unedited model's teacher-forced scores and greedy continuations, kept across evaluations.

    They depend only on the model, the prompt and the answer (or the number of new tokens), so
    evaluations of several editors of ONE model on overlapping edits (the grid: four methods, nested
    sets of edits) compute each once. Pass the same memo only with the same model and tokenizer."""

    def __init__(self) -> None:
        self.scores: dict[tuple[str, str], dict[str, Any]] = {}
        self.texts: dict[tuple[str, int], str] = {}

    def teacher_forced(self, editor, prompts: Sequence[str], answers: Sequence[str], batch_size: int) -> list[dict]:
        todo = sorted({(p, a) for p, a in zip(prompts, answers)} - self.scores.keys())
        res = teacher_forced(editor.model, editor.tokenizer, [p for p, _ in todo], [a for _, a in todo], batch_size=batch_size)
        self.scores.update(zip(todo, res))
        return [self.scores[(p, a)] for p, a in zip(prompts, answers)]

    def generate(self, editor, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
        todo = sorted({p for p in prompts if (p, max_new_tokens) not in self.texts})
        outs = editor.generate(todo, max_new_tokens=max_new_tokens, edited=False, batch_size=batch_size) if todo else []
        self.texts.update(((p, max_new_tokens), t) for p, t in zip(todo, outs))
        return [self.texts[(p, max_new_tokens)] for p in prompts]


def evaluate_edits(editor, edits: EditSet, *, batch_size: int = 32, fluency_n: int = 0,
                   fluency_tokens: int = 30, fluency_edits: Sequence[int] | None = None, progress: bool = False,
                   memo: UneditedMemo | None = None, neighborhood: bool = False) -> EditEvaluation:
    """Evaluate a fitted editor on ``edits`` (usually the edits it was trained on).

    Every forward call of the edited model goes through ``editor.applied``, so these numbers
    include the scope indicator's routing, exactly as a user would see them.

    Args:
        fluency_n: the first ``fluency_n`` edits' prompts and held-out rephrases are continued
            freely (``fluency_tokens`` new tokens, greedy) for the generation-based metrics of
            :func:`generation_metrics` (0 skips generation, which is the slow part).
        fluency_edits: instead of the first ``fluency_n``, these edits (indices into ``edits``;
            e.g. a seeded uniform sample, as the grid draws).
        memo: the unedited model's scores and continuations, shared with other evaluations
            (:class:`UneditedMemo`).
        neighborhood: add ROME's ``neighborhood_score`` (:func:`neighborhood_score`), reusing the
            specificity pass's scores of the true answers.

    Returns:
        An :class:`EditEvaluation`, which unpacks as ``(per_edit, summary)``: one row per edit, a
        dict of means plus counts and splits, and ``.table``, the tidy view (:func:`tidy`).
    """
    recs = list(edits)
    pairs = _prompt_pairs(recs)
    ed = {name: _score(editor, pairs[name], True, batch_size) for name in pairs}
    base = {name: _score(editor, pairs[name], False, batch_size, memo) for name in ("rel", "gen", "seen", "loc", "nb")}
    bank = paraphrase_templates()
    df = pd.DataFrame([_edit_row(i, r, ed, base, bank) for i, r in enumerate(recs)])
    summary = _summarize(df, not editor.rephrase_seen)
    summary["n_edits"] = len(recs)
    summary.update(editor.diagnostics(edits))
    if neighborhood:  # the true answers' edited scores are ed["nb"], in the same (edit, prompt) order
        true = [res for i in sorted(ed["nb"]) for res in ed["nb"][i]]
        summary["neighborhood_score"] = neighborhood_score(editor, edits, batch_size, true=true)
    chosen = recs[:fluency_n] if fluency_edits is None else [recs[i] for i in fluency_edits]
    if chosen:
        summary.update(generation_metrics(editor, EditSet(chosen), max_new_tokens=fluency_tokens, memo=memo)[1])
    return EditEvaluation(df, summary)


Pairs = list[tuple[int, str, str]]  # (edit index, prompt, answer)


def _prompt_pairs(recs: list) -> dict[str, Pairs]:
    """The teacher-forced prompts of an evaluation, by kind. Held-out paraphrases are
    ``rephrases[1:]`` (training may use ``rephrases[0]``, never the others)."""
    return {
        "rel": [(i, r.prompt, r.target) for i, r in enumerate(recs)],
        "old": [(i, r.prompt, r.ground_truth) for i, r in enumerate(recs) if r.ground_truth],
        "gen": [(i, p, r.target) for i, r in enumerate(recs) for p in r.rephrases[1:]],
        "gen_old": [(i, p, r.ground_truth) for i, r in enumerate(recs) if r.ground_truth for p in r.rephrases[1:]],
        "seen": [(i, r.rephrases[0], r.target) for i, r in enumerate(recs) if r.rephrases],
        "loc": [(i, p, a) for i, r in enumerate(recs) for p, a in r.locality],
        "nb": [(i, p, a) for i, r in enumerate(recs) for p, a in r.neighborhood],
    }


def _score(editor, pairs: Pairs, edited: bool, batch_size: int, memo: UneditedMemo | None = None
           ) -> dict[int, list[dict]]:
    """:func:`teacher_forced` results of ``pairs`` (through ``editor.applied`` when ``edited``; the
    unedited ones through ``memo`` when given), by edit."""
    prompts, answers = [p for _, p, _ in pairs], [t for _, _, t in pairs]
    if memo is not None and not edited:
        res = memo.teacher_forced(editor, prompts, answers, batch_size)
    else:
        res = teacher_forced(editor.model, editor.tokenizer, prompts, answers, batch_size=batch_size,
                             context=editor.applied if edited else None)
    grouped: dict[int, list[dict]] = {}
    for (i, _, _), r in zip(pairs, res):
        grouped.setdefault(i, []).append(r)
    return grouped


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _edit_row(i: int, r, ed: dict[str, dict[int, list[dict]]], base: dict[str, dict[int, list[dict]]],
              bank: dict) -> dict[str, Any]:
    """One edit's per-edit metrics from the scored prompts (``ed``: edited model, ``base``: unedited)."""
    row: dict[str, Any] = {"case_id": r.case_id, "subject": r.subject}
    row["reliability"] = ed["rel"][i][0]["acc"]
    row["reliability_base"] = base["rel"][i][0]["acc"]
    gen, gen_base = ed["gen"].get(i, []), base["gen"].get(i, [])
    row["generality"] = _nanmean([x["acc"] for x in gen])
    row["generality_base"] = _nanmean([x["acc"] for x in gen_base])
    held = r.rephrases[1:]  # this edit's held-out rephrases, in scoring order
    # those whose phrasing is nowhere in the paraphrase bank, so no bank prompt
    # (TrainConfig.para_per_edit) has that phrasing, for this subject or another
    row["generality_new_phrasing"] = _nanmean([x["acc"] for p, x in zip(held, gen)
                                               if subject_template(p, r.subject) not in bank])
    # by the form of the held-out rephrase (lks.data.rephrase_form): ROME's paraphrase prompts
    # reword the edited relation; its generation prompts often ask another attribute
    forms = [_form(p, r.subject) for p in held]
    for form in ("paraphrase", "generation"):
        row[f"generality_{form}_form"] = _nanmean([x["acc"] for f, x in zip(forms, gen) if f == form])
        row[f"generality_{form}_form_base"] = _nanmean([x["acc"] for f, x in zip(forms, gen_base) if f == form])
    seen = ed["seen"].get(i, [])
    row["generality_seen"] = _nanmean([x["acc"] for x in seen])
    # rephrases[0] whose phrasing is nowhere in the paraphrase bank (meaningful when it is held out)
    row["generality_seen_new_phrasing"] = _nanmean([x["acc"] for x in seen
                                                    if subject_template(r.rephrases[0], r.subject) not in bank])
    row["generality_seen_base"] = _nanmean([x["acc"] for x in base["seen"].get(i, [])])
    for name, key in (("locality", "loc"), ("specificity", "nb")):
        edited, unedited = ed[key].get(i, []), base[key].get(i, [])
        row[name] = _nanmean([_agreement(a["pred"], b["pred"]) for a, b in zip(edited, unedited)])
        row[f"{name}_acc"] = _nanmean([x["acc"] for x in edited])
        row[f"{name}_acc_base"] = _nanmean([x["acc"] for x in unedited])
    if i in ed["old"]:
        row["efficacy"] = float(ed["rel"][i][0]["logprob"] > ed["old"][i][0]["logprob"])
        if i in ed["gen_old"]:
            row["paraphrase_success"] = _nanmean([float(a["logprob"] > b["logprob"]) for a, b in zip(gen, ed["gen_old"][i])])
    return row


def _summarize(df: pd.DataFrame, rephrase0_held_out: bool) -> dict[str, Any]:
    """Means of the per-edit columns, with counts (``*_n``), splits (``*_split``) and the score."""
    summary: dict[str, Any] = {c: float(df[c].mean()) for c in df.columns if c not in ("case_id", "subject")}
    summary["generality_n"] = int(df["generality"].notna().sum())  # edits with a held-out paraphrase
    summary["generality_split"] = "held-out"
    summary["generality_new_phrasing_n"] = int(df["generality_new_phrasing"].notna().sum())
    summary["generality_seen_new_phrasing_n"] = int(df["generality_seen_new_phrasing"].notna().sum())
    for form in ("paraphrase", "generation"):
        summary[f"generality_{form}_form_n"] = int(df[f"generality_{form}_form"].notna().sum())
    summary["generality_seen_split"] = "held-out" if rephrase0_held_out else "seen"
    if summary["generality_n"] == 0:  # e.g. zsRE: one paraphrase per edit
        summary["generality"], summary["generality_base"] = summary["generality_seen"], summary["generality_seen_base"]
        summary["generality_split"] = summary["generality_seen_split"]
    summary["score"] = harmonic_mean([summary["reliability"], summary["generality"], summary["locality"]])
    return summary


# --------------------------------------------------------------------------------------------
# Typed results: one tidy row per (metric, model)
# --------------------------------------------------------------------------------------------
# metric -> (prompt kind, split). "split" says whether training saw those prompts: "seen" (the edit
# prompt), "held-out" (never trained on), or "summary:<key>" (read from the summary: rephrases[0] is
# seen unless the editor was trained with train_rephrase=False).
TIDY_METRICS: dict[str, tuple[str, str]] = {
    "reliability": ("edit prompt", "seen"),
    "generality": ("rephrase", "summary:generality_split"),
    "generality_paraphrase_form": ("rephrase, ROME paraphrase form", "held-out"),
    "generality_generation_form": ("rephrase, ROME generation form", "held-out"),
    "generality_new_phrasing": ("rephrase, phrasing not in the bank", "held-out"),
    "generality_seen": ("rephrases[0]", "summary:generality_seen_split"),
    "locality": ("same-subject locality prompt", "held-out"),
    "locality_acc": ("same-subject locality prompt", "held-out"),
    "specificity": ("neighbourhood prompt", "held-out"),
    "specificity_acc": ("neighbourhood prompt", "held-out"),
    "efficacy": ("edit prompt", "seen"),
    "paraphrase_success": ("rephrase", "held-out"),
}
# generation-based metrics (summary only: per prompt they live in generation_metrics' DataFrame)
TIDY_GENERATION: dict[str, tuple[str, str]] = {
    "gen_reliability": ("edit prompt, free generation", "seen"),
    "gen_generality": ("rephrase, free generation", "held-out"),
    "repeat_rate": ("edit prompt + rephrase, free generation", "seen + held-out"),
    "fluency": ("edit prompt + rephrase, free generation", "seen + held-out"),
}
TIDY_COLUMNS = ["metric", "model", "prompt_kind", "split", "value", "n", "ci_low", "ci_high"]


def tidy(per_edit: pd.DataFrame, summary: dict[str, Any]) -> pd.DataFrame:
    """The evaluation as one row per (metric, model) with the schema ``TIDY_COLUMNS``:

    * ``metric`` - a name of ``TIDY_METRICS`` or ``TIDY_GENERATION`` (definitions in the module docstring);
    * ``model`` - ``"edited"`` or ``"unedited"`` (the ``_base`` columns; for ``repeat_rate`` also
      ``"unedited, given the new object"``, the forced reference);
    * ``prompt_kind`` / ``split`` - which prompts, and whether training saw them (``"seen"`` /
      ``"held-out"``);
    * ``value`` - the mean over edits that have such prompts, ``n`` - their number;
    * ``ci_low`` / ``ci_high`` - a 95% interval of that mean over edits (normal approximation,
      ``1.96 s / sqrt(n)``, clipped to [0, 1]; NaN for n < 2 and for the generation metrics, whose
      per-prompt rows are not kept here).

    With no held-out rephrase at all (zsRE), ``generality`` is computed on ``rephrases[0]`` and
    carries its split, as the summary does.
    """
    rows = []
    fallback = int(per_edit["generality"].notna().sum()) == 0 if "generality" in per_edit else False
    for metric, (kind, split) in TIDY_METRICS.items():
        col = "generality_seen" if metric == "generality" and fallback else metric
        if split.startswith("summary:"):
            split = summary.get(split.split(":", 1)[1], "")
        for model, name in (("edited", col), ("unedited", f"{col}_base")):
            if name not in per_edit:
                continue
            x = per_edit[name].dropna().to_numpy(dtype=float)
            n = len(x)
            mean = float(x.mean()) if n else float("nan")
            half = 1.96 * float(x.std(ddof=1)) / math.sqrt(n) if n >= 2 else float("nan")
            lo, hi = (max(0.0, mean - half), min(1.0, mean + half)) if n >= 2 else (float("nan"), float("nan"))
            rows.append([metric, model, kind, split, mean, n, lo, hi])
    for metric, (kind, split) in TIDY_GENERATION.items():
        for model, name in (("edited", metric), ("unedited", f"{metric}_base")):
            if name in summary:
                rows.append([metric, model, kind, split, float(summary[name]), int(summary.get(f"{metric}_n", 0)),
                             float("nan"), float("nan")])
    if "repeat_rate_forced_base" in summary:  # the unedited model continuing "prompt target"
        kind, split = TIDY_GENERATION["repeat_rate"]
        rows.append(["repeat_rate", "unedited, given the new object", kind, split, float(summary["repeat_rate_forced_base"]),
                     int(summary.get("repeat_rate_n", 0)), float("nan"), float("nan")])
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


class EditEvaluation(NamedTuple):
    """What :func:`evaluate_edits` returns: unpacks as ``(per_edit, summary)``."""

    per_edit: pd.DataFrame       # one row per edit
    summary: dict[str, Any]      # means, counts (``*_n``) and splits (``*_split``), by name

    @property
    def table(self) -> pd.DataFrame:
        """The tidy view: one row per (metric, model) with split, n and a 95% interval (:func:`tidy`)."""
        return tidy(self.per_edit, self.summary)


def generation_metrics(editor, edits: EditSet, *, max_new_tokens: int = 30, batch_size: int = 32,
                       memo: UneditedMemo | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Free (greedy) continuations of each edit's prompt and held-out rephrases, edited and unedited,
    scored by :func:`continuation_scores` (definitions in the module docstring).

    The edit prompt is ``kind = "prompt"`` (seen in training); the rephrases training never saw
    (``rephrases[1:]``, and ``rephrases[0]`` when the editor was trained with
    ``train_rephrase=False``) are ``kind = "rephrase"`` (held-out), with their
    :func:`lks.data.rephrase_form` in ``form``.

    Returns:
        ``(per_prompt, summary)``: one row per prompt with both continuations and their scores
        (``_base``: unedited), and the summary's ``gen_reliability``, ``gen_generality``,
        ``repeat_rate``, ``fluency``, ``distinct_1``, ``distinct_2`` (each with ``_base`` and ``_n``),
        plus ``gen_generality_paraphrase_form`` / ``_generation_form`` where rephrases have them.
    """
    first_held = 1 if editor.rephrase_seen else 0
    items = []  # (edit index, kind, form, prompt)
    for i, r in enumerate(edits):
        items.append((i, "prompt", None, r.prompt))
        items += [(i, "rephrase", _form(p, r.subject), p) for p in r.rephrases[first_held:]]
    prompts = [p for *_, p in items]
    def unedited(texts: list[str], tokens: int) -> list[str]:
        if memo is not None:
            return memo.generate(editor, texts, tokens, batch_size)
        return editor.generate(texts, max_new_tokens=tokens, edited=False, batch_size=batch_size)

    outs = {"": editor.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size),
            "_base": unedited(prompts, max_new_tokens)}
    # the unedited model given the new object: its continuations, the object's token count fewer
    forced = [f"{p} {edits[i].target}" for i, *_, p in items]
    tok = editor.tokenizer
    n_obj = [len(ids) for ids in tok([f" {edits[i].target}" for i, *_ in items], add_special_tokens=False)["input_ids"]]
    forced_out = unedited(forced, max(1, max_new_tokens - min(n_obj)))
    rows = []
    for j, (i, kind, form, prompt) in enumerate(items):
        r = edits[i]
        row: dict[str, Any] = {"case_id": r.case_id, "subject": r.subject, "target": r.target, "kind": kind,
                               "form": form, "prompt": prompt}
        for key, gens in outs.items():
            row[f"continuation{key}"] = gens[j]
            row.update({f"{k}{key}": v for k, v in continuation_scores(prompt, gens[j], r.target).items()})
        cut = tok.decode(tok(forced_out[j], add_special_tokens=False)["input_ids"][:max(0, max_new_tokens - n_obj[j])])
        row["continuation_forced_base"] = f" {r.target}{cut}"
        row["repeat_forced_base"] = float(object_count(row["continuation_forced_base"], r.target) >= 2)
        rows.append(row)
    df = pd.DataFrame(rows)
    summary: dict[str, Any] = {}
    parts = [("gen_reliability", df.kind == "prompt", "hit"), ("gen_generality", df.kind == "rephrase", "hit"),
             ("gen_generality_paraphrase_form", df.form == "paraphrase", "hit"),
             ("gen_generality_generation_form", df.form == "generation", "hit"),
             *((name, df.kind.notna(), col) for name, col in (("repeat_rate", "repeat"), ("fluency", "fluency"),
                                                              ("distinct_1", "distinct_1"), ("distinct_2", "distinct_2")))]
    for name, sel, col in parts:
        if bool(sel.any()):
            summary[name], summary[f"{name}_base"] = float(df[sel][col].mean()), float(df[sel][f"{col}_base"].mean())
            summary[f"{name}_n"] = int(sel.sum())
    if len(df):
        summary["repeat_rate_forced_base"] = float(df["repeat_forced_base"].mean())
    return df, summary


def neighborhood_score(editor, edits: EditSet, batch_size: int = 32, true: list[dict] | None = None) -> float:
    """ROME's neighbourhood score (Meng et al. 2022, §3.2): on prompts about OTHER subjects with the
    edited relation, the edited model still prefers the true answer, P(true) > P(new target); the
    mean over each edit's prompts, then over edits (nan without neighbourhood prompts).

    ``true``: the edited model's scores of the true answers on these prompts, in order, when the
    caller has them (:func:`evaluate_edits` scores them for specificity)."""
    pairs = [(i, p, a) for i, r in enumerate(edits) for p, a in r.neighborhood]
    if not pairs:
        return float("nan")
    prompts = [p for _, p, _ in pairs]
    if true is None:
        true = teacher_forced(editor.model, editor.tokenizer, prompts, [a for *_, a in pairs], batch_size=batch_size,
                              context=editor.applied)
    new = teacher_forced(editor.model, editor.tokenizer, prompts, [edits[i].target for i, *_ in pairs],
                         batch_size=batch_size, context=editor.applied)
    per: dict[int, list[float]] = {}
    for (i, *_), t, n in zip(pairs, true, new):
        per.setdefault(i, []).append(float(t["logprob"] > n["logprob"]))
    return sum(sum(v) / len(v) for v in per.values()) / len(per)
