"""General-capability evaluation: does an edited model still reason, classify and model language?

The paper's second claim is that editing 10,000 facts leaves a model's general abilities intact.
This module measures those abilities before and after editing with five standard benchmarks, each
following the prompt format and metric of EleutherAI's lm-evaluation-harness (v0.4 task YAMLs;
the version of each task is stated in its function's docstring). The code is our own.

============  ==========================  ==================================================
task          kind                        metric(s)
============  ==========================  ==================================================
gsm8k         few-shot CoT generation     exact_match (flexible extraction), strict_match
sst2          log-likelihood, 2 choices   acc
rte           log-likelihood, 2 choices   acc
wikitext2     sliding-window perplexity   token_perplexity, word_perplexity, bits_per_byte
mmlu          5-shot log-likelihood       acc (micro), acc_macro, acc per subject
============  ==========================  ==================================================

Everything the model sees goes through two primitives, :func:`loglikelihood` (batched, right
padded) and :func:`generate_until` (greedy, left padded), plus :func:`perplexity` for rolling
windows. An optional ``editor`` is only used through ``with editor.applied(model) as stats`` and the
two counters ``stats.rows_seen`` / ``stats.rows_routed``; nothing here knows how editing works.

Importing the module has no side effects (no model, data or network access).
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import math
import os
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

TASKS: tuple[str, ...] = ("gsm8k", "sst2", "rte", "wikitext2", "mmlu")

# lm-evaluation-harness defaults: gsm8k.yaml uses 5 shots, the GLUE tasks 0, MMLU 5 (from dev).
DEFAULT_FEWSHOT: dict[str, int] = {"gsm8k": 5, "sst2": 0, "rte": 0, "mmlu": 5}

# Metrics for which a larger value is better; everything else (perplexities, bits per byte) is
# lower-is-better. ``compare_capability`` uses this to say whether a change is a regression.
HIGHER_IS_BETTER = ("acc", "acc_macro", "exact_match", "strict_match")

COLUMNS = ["task", "metric", "value", "stderr", "ci_low", "ci_high", "n", "seconds", "routed", "rows_seen"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile

SST2_CHOICES = ("negative", "positive")  # label 1 = positive, as in GLUE
RTE_CHOICES = ("True", "False")          # label 0 = entailment -> "True", as in the harness
MMLU_LETTERS = ("A", "B", "C", "D")
GSM8K_UNTIL = ("Question:", "\n\n", "</s>", "<|im_end|>")


# ---------------------------------------------------------------------------------------------
# Data loading
# ---------------------------------------------------------------------------------------------

def _fallback_root(data_dir: str | os.PathLike | None) -> Path:
    """The data directory: explicit argument > $LKS_DATA_DIR > ~/.cache/lks/data (``lks.data.data_dir``)."""
    try:
        from lks.data import data_dir as resolve
    except ImportError:  # lks.data absent: same order, reimplemented
        if data_dir is not None:
            return Path(data_dir).expanduser()
        env = os.environ.get("LKS_DATA_DIR")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "lks" / "data"
    return Path(resolve(data_dir))


def _data_path(relpath: str, data_dir: str | os.PathLike | None) -> Path | None:
    """Local path of a benchmark file, or ``None`` when it is not there.

    ``lks.data.data_file`` is preferred: it verifies the file against its pinned SHA-256 (and may
    fetch a missing file that has a public URL). It is imported lazily so this module also works
    without it. Only "missing" is turned into ``None``: a checksum mismatch still raises.
    """
    try:
        from lks.data import data_file
    except ImportError:
        data_file = None
    if data_file is not None:
        try:
            return Path(data_file(relpath, data_dir=data_dir))
        except FileNotFoundError:
            return None
    path = _fallback_root(data_dir) / relpath
    return path if path.is_file() else None


def _missing(relpath: str, data_dir: str | os.PathLike | None, hint: str) -> FileNotFoundError:
    root = _fallback_root(data_dir)
    return FileNotFoundError(
        f"benchmark file {relpath!r} not found under {root} (pass data_dir=, set LKS_DATA_DIR, or "
        f"call the loader with online=True to download it with `datasets.load_dataset({hint})`)"
    )


def _online(path: str, name: str | None, split: str):
    """``datasets.load_dataset`` behind a lazy import (only reached when ``online=True``)."""
    import datasets

    return datasets.load_dataset(path, name, split=split)


def _gsm8k_record(question: str, answer: str) -> dict[str, str]:
    return {"question": question, "answer": answer, "target": answer.split("####")[-1].strip()}


def load_gsm8k(data_dir: str | os.PathLike | None = None, *, online: bool = False) -> list[dict[str, str]]:
    """GSM8K test split: dicts with ``question``, ``answer`` (full solution) and ``target`` (the number).

    Reads ``gsm8k/test.jsonl``; with ``online=True`` and no local file, ``openai/gsm8k`` "main".
    """
    path = _data_path("gsm8k/test.jsonl", data_dir)
    if path is None:
        if not online:
            raise _missing("gsm8k/test.jsonl", data_dir, '"gsm8k", "main"')
        return [_gsm8k_record(r["question"], r["answer"]) for r in _online("gsm8k", "main", "test")]
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [_gsm8k_record(r["question"], r["answer"]) for r in rows]


def load_sst2(data_dir: str | os.PathLike | None = None, *, online: bool = False) -> list[dict[str, Any]]:
    """SST-2 validation split: dicts with ``sentence`` and ``label`` (1 = positive, 0 = negative).

    Reads GLUE's ``sst2/dev.tsv``; with ``online=True`` and no local file, ``glue``/``sst2``.
    """
    path = _data_path("sst2/dev.tsv", data_dir)
    if path is None:
        if not online:
            raise _missing("sst2/dev.tsv", data_dir, '"glue", "sst2"')
        return [{"sentence": r["sentence"], "label": int(r["label"])} for r in _online("glue", "sst2", "validation")]
    # GLUE's TSV is not CSV-quoted (sentences contain bare quotes), so split on tabs by hand.
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    s_col, l_col = header.index("sentence"), header.index("label")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return [{"sentence": r[s_col], "label": int(r[l_col])} for r in rows]


def _rte_label(value: Any) -> int:
    """Map any RTE label spelling to 0 = entailment, 1 = not entailment."""
    if isinstance(value, str) and not value.isdigit():
        if value not in ("entailment", "not_entailment"):
            raise ValueError(f"unknown RTE label {value!r}")
        return 0 if value == "entailment" else 1
    return int(value)


def load_rte(data_dir: str | os.PathLike | None = None, *, online: bool = False) -> list[dict[str, Any]]:
    """RTE validation split: dicts with ``premise``, ``hypothesis``, ``label`` (0 = entailment).

    Prefers SuperGLUE's ``rte/superglue_val.jsonl`` (string labels), then GLUE's
    ``rte/validation.parquet`` (``sentence1``/``sentence2``, 0 = entailment); both are the same
    277 pairs. With ``online=True`` and neither file, ``glue``/``rte``.
    """
    path = _data_path("rte/superglue_val.jsonl", data_dir)
    if path is not None:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [{"premise": r["premise"], "hypothesis": r["hypothesis"], "label": _rte_label(r["label"])}
                for r in rows]
    path = _data_path("rte/validation.parquet", data_dir)
    if path is not None:
        rows = pd.read_parquet(path).to_dict("records")
    elif online:
        rows = list(_online("glue", "rte", "validation"))
    else:
        raise _missing("rte/superglue_val.jsonl", data_dir, '"glue", "rte"')
    return [{"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": _rte_label(r["label"])}
            for r in rows]


def load_wikitext2(data_dir: str | os.PathLike | None = None, *, online: bool = False) -> str:
    """The raw WikiText-2 test split as one string (``wikitext2/wiki.test.raw``, 1.29 MB).

    With ``online=True`` and no local file, ``wikitext``/``wikitext-2-raw-v1``: its rows are the
    file's lines (newline included), so joining them restores the raw file.
    """
    path = _data_path("wikitext2/wiki.test.raw", data_dir)
    if path is None:
        if not online:
            raise _missing("wikitext2/wiki.test.raw", data_dir, '"wikitext", "wikitext-2-raw-v1"')
        return "".join(_online("wikitext", "wikitext-2-raw-v1", "test")["text"])
    return Path(path).read_text(encoding="utf-8")


_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def split_wikitext_documents(text: str) -> list[str]:
    """Split raw WikiText into articles at top-level headings (`` = Title = `` lines).

    Concatenating the result gives back ``text`` exactly. The test split has 62 articles.
    """
    docs: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _WIKI_TITLE.match(line.rstrip("\n")) or not docs:
            docs.append([])
        docs[-1].append(line)
    # Blank lines before the first title belong to that first article, not a document of their own.
    if len(docs) > 1 and not "".join(docs[0]).strip():
        docs[1] = docs[0] + docs[1]
        docs = docs[1:]
    return ["".join(d) for d in docs]


def _mmlu_record(subject: str, row: Sequence[str]) -> dict[str, Any]:
    question, *choices, answer = row
    return {"subject": subject, "question": question, "choices": list(choices), "answer": int(answer)}


def _read_mmlu_csv(path: Path, subject: str) -> list[dict[str, Any]]:
    # csv module, not pandas: pandas would turn answer options such as "None" or "NA" into NaN.
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if rows and rows[0][:1] == ["question"]:
        rows = rows[1:]
    return [_mmlu_record(subject, r) for r in rows if len(r) == 6]


def load_mmlu(data_dir: str | os.PathLike | None = None, split: str = "test", *,
              online: bool = False) -> list[dict[str, Any]]:
    """MMLU: dicts with ``subject``, ``question``, ``choices`` (4) and ``answer`` (0-3).

    Reads ``mmlu/{split}/{subject}_{split}.csv`` for every subject present (57 in the full set),
    sorted by subject; ``split`` is ``"test"`` (14,042 questions) or ``"dev"`` (5 per subject, the
    few-shot exemplars). With ``online=True`` and no local files, ``cais/mmlu`` "all".
    """
    folder = _fallback_root(data_dir) / "mmlu" / split
    files = sorted(folder.glob(f"*_{split}.csv")) if folder.is_dir() else []
    if not files:
        if not online:
            raise _missing(f"mmlu/{split}/*_{split}.csv", data_dir, '"cais/mmlu", "all"')
        return [{"subject": r["subject"], "question": r["question"], "choices": list(r["choices"]),
                 "answer": int(r["answer"])} for r in _online("cais/mmlu", "all", split)]
    records: list[dict[str, Any]] = []
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")]
        # Resolve through lks.data as well so the checksum of each file is verified when known.
        path = _data_path(f"mmlu/{split}/{f.name}", data_dir) or f
        records.extend(_read_mmlu_csv(path, subject))
    return records


# ---------------------------------------------------------------------------------------------
# Subsets and statistics
# ---------------------------------------------------------------------------------------------

def subset_indices(n: int, limit: int | None, seed: int, task: str) -> np.ndarray:
    """Deterministic random subset of ``range(n)`` of size ``limit`` (all of it when ``None``).

    A seeded random sample rather than the head of the file, because benchmark files are often
    ordered (by subject, source or label) and the head would be biased. The generator is keyed by
    ``(seed, task)`` so tasks get independent samples; indices come back sorted.
    """
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    return np.sort(rng.choice(n, size=limit, replace=False))


def accuracy_stats(correct: Sequence[bool] | np.ndarray) -> dict[str, float]:
    """Mean, standard error and 95% CI of a 0/1 vector.

    ``stderr`` is the harness's sample standard error ``sqrt(p(1-p)/(n-1))``; the interval is the
    Wilson score interval, which unlike ``p +- 1.96 se`` stays inside [0, 1] and is not degenerate
    at p = 0 or 1 with the small ``limit`` values used during development.
    """
    x = np.asarray(correct, dtype=float)
    n = len(x)
    if n == 0:
        return {"value": math.nan, "stderr": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    p = float(x.mean())
    se = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    # min/max with p: at p = 0 or 1 rounding would otherwise put the bound a hair past the estimate.
    lo, hi = min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))
    return {"value": p, "stderr": se, "ci_low": lo, "ci_high": hi, "n": n}


def _bootstrap_mean_nll(nll: np.ndarray, tokens: np.ndarray, seed: int, n_boot: int = 1000) -> np.ndarray:
    """Bootstrap distribution of the per-token NLL, resampling windows (ratio of sums, not mean of ratios)."""
    if len(nll) < 2:
        return np.full(1, nll.sum() / max(tokens.sum(), 1))
    rng = np.random.default_rng([seed, 2])
    idx = rng.integers(0, len(nll), size=(n_boot, len(nll)))
    return nll[idx].sum(1) / np.maximum(tokens[idx].sum(1), 1)


def _transformed_stats(point: float, boot: np.ndarray, f: Callable[[np.ndarray], np.ndarray], n: int) -> dict:
    vals = f(boot)
    lo, hi = np.percentile(vals, [2.5, 97.5]) if len(vals) > 1 else (math.nan, math.nan)
    se = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
    return {"value": float(f(np.asarray(point))), "stderr": se, "ci_low": float(lo), "ci_high": float(hi), "n": n}


# ---------------------------------------------------------------------------------------------
# Model primitives
# ---------------------------------------------------------------------------------------------

def _encode(tok, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _max_positions(model, cap: int = 8192) -> int:
    return int(min(getattr(model.config, "max_position_embeddings", cap) or cap, cap))


def _pad_id(tok) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tok, name, None)
        if value is not None:
            return int(value)
    return 0


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and ``continuation`` as they appear *together* in one text.

    Byte-level BPE tokenises " positive" differently alone than after "Answer:", so the pair is
    encoded jointly and split where the separately encoded context ends (its common prefix with the
    joint encoding, in case a merge crosses the boundary). Trailing whitespace of the context is
    moved onto the continuation first, as the harness does. Special tokens (the BOS that the
    SmolLM2 tokenizer prepends) are added exactly as the tokenizer does by default, so the context
    and the joint text agree on them.
    """
    stripped = context.rstrip()
    if stripped != context:
        continuation = context[len(stripped):] + continuation
        context = stripped
    whole = _encode(tok, context + continuation)
    ctx = _encode(tok, context)
    cut = 0
    while cut < min(len(ctx), len(whole)) and ctx[cut] == whole[cut]:
        cut += 1
    if cut == len(whole):
        raise ValueError(f"continuation {continuation!r} produced no tokens after context {context[-40:]!r}")
    return whole[:cut], whole[cut:]


def _supports_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _selected_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """Float32 logits at sequence ``positions`` (same for every row): ``[batch, len(positions), vocab]``.

    With a 49k vocabulary, full logits for 8 x 1024 tokens are 1.6 GB; ``logits_to_keep`` (when the
    model supports it) applies the LM head to the needed positions only.
    """
    if _supports_logits_to_keep(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=positions)
        return out.logits.float()
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits[:, positions].float()


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position without materialising a full log_softmax copy."""
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def _group_requests(tok, requests: Sequence[tuple[str, str]], max_length: int) -> dict[tuple[int, ...], list]:
    """Map each distinct model input (context + continuation minus its last token) to its requests.

    Multiple-choice questions with one-token answers (" A".." D") share one input, so MMLU needs
    one forward pass per question instead of four. Inputs longer than ``max_length`` lose tokens
    on the left: the distant context first, the continuation only if it alone is that long.
    """
    groups: dict[tuple[int, ...], list] = defaultdict(list)
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tok, context, continuation)
        # An empty context (tokenizer without BOS) still needs one input token to predict from.
        ctx = ctx or [_pad_id(tok) if getattr(tok, "bos_token_id", None) is None else int(tok.bos_token_id)]
        full = (ctx + cont)[-(max_length + 1):]
        cont = cont[-(len(full) - 1):]
        groups[tuple(full[:-1])].append((i, cont))
    return groups


@torch.inference_mode()
def loglikelihood(model, tok, requests: Sequence[tuple[str, str]], batch_size: int = 8, *,
                  max_length: int | None = None, progress: bool = False, desc: str = "loglikelihood") -> list[float]:
    """Sum of log-probabilities of each ``continuation`` given its ``context``, in nats.

    Pairs are encoded jointly (:func:`encode_pair`), identical model inputs are scored once, and
    inputs are sorted by length (longest first, so padding is minimal and an out-of-memory error
    shows up on the first batch) and right-padded with an attention mask. Right padding leaves
    every real token at its natural position, so no position-id correction is needed.

    Args:
        model: a causal LM returning ``.logits``.
        tok: its tokenizer (``tok(text, add_special_tokens=...)["input_ids"]``).
        requests: ``(context, continuation)`` pairs.
        batch_size: sequences per forward pass.
        max_length: longest input in tokens (default: the model's, capped at 8192).
        progress: show a tqdm bar.

    Returns:
        One float per request, in request order.
    """
    max_length = max_length or _max_positions(model)
    groups = _group_requests(tok, requests, max_length)
    keys = sorted(groups, key=len, reverse=True)
    device, pad = _device(model), _pad_id(tok)
    result = [0.0] * len(requests)
    bar = tqdm(total=len(keys), desc=desc, disable=not progress, leave=False)
    for batch in _batches(keys, batch_size):
        ids, mask = _right_pad(batch, pad, device)
        # Logit at position p predicts token p + 1: a continuation of length c in an input of
        # length L is predicted by positions L - c .. L - 1.
        needed = sorted({p for key in batch for _, cont in groups[key] for p in range(len(key) - len(cont), len(key))})
        column = {p: j for j, p in enumerate(needed)}
        logits = _selected_logits(model, ids, mask, torch.tensor(needed, device=device))
        for row, key in enumerate(batch):
            for i, cont in groups[key]:
                cols = torch.tensor([column[p] for p in range(len(key) - len(cont), len(key))], device=device)
                targets = torch.tensor(cont, device=device)
                result[i] = float(_token_logprobs(logits[row, cols], targets).double().sum())
        bar.update(len(batch))
    bar.close()
    return result


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    hits = [text.find(s) for s in until if s and s in text]
    return text[: min(hits)] if hits else text


def _stop_criteria(tok, prompt_len: int, until: Sequence[str]):
    """A per-row StoppingCriteria: a row is done once its generated text contains a stop string."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            texts = tok.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=False)
            done = [any(s in t for s in until) for t in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_StopStrings()])


def _eos_ids(model, tok) -> list[int]:
    ids = {getattr(tok, "eos_token_id", None)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(int(i) for i in ids if i is not None)


@torch.inference_mode()
def generate_until(model, tok, prompts: Sequence[str], *, until: Sequence[str] = GSM8K_UNTIL,
                   max_new_tokens: int = 256, batch_size: int = 8, progress: bool = False,
                   desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts``, each cut at the first stop string in ``until``.

    Prompts are left-padded (so every row's next token is at the last position) with an attention
    mask; ``model.generate`` derives position ids from that mask. Generation of a row stops at an
    EOS token or once a stop string appears; the batch stops when all rows have. Prompts longer than
    the model's context minus ``max_new_tokens`` lose tokens on the left.
    """
    from transformers import GenerationConfig

    device, pad = _device(model), _pad_id(tok)
    budget = max(1, _max_positions(model) - max_new_tokens)
    encoded = [_encode(tok, p)[-budget:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad, eos_token_id=_eos_ids(model, tok) or None,
                              bos_token_id=getattr(tok, "bos_token_id", None))
    outputs: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for batch in _batches(order, batch_size):
        ids, mask = _left_pad([encoded[i] for i in batch], pad, device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             stopping_criteria=_stop_criteria(tok, ids.shape[1], until))
        texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        for i, text in zip(batch, texts, strict=True):
            outputs[i] = _cut_at_stop(text, until)
        bar.update(len(batch))
    bar.close()
    return outputs


@dataclass
class PerplexityResult:
    """Per-window negative log-likelihoods (nats) and scored-token counts of a sliding-window pass."""

    window_nll: np.ndarray
    window_tokens: np.ndarray
    max_length: int
    stride: int

    @property
    def n_tokens(self) -> int:
        return int(self.window_tokens.sum())

    @property
    def mean_nll(self) -> float:
        return float(self.window_nll.sum() / max(self.n_tokens, 1))

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.mean_nll)


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` windows over a sequence of ``n_tokens`` tokens.

    The Hugging Face perplexity recipe: windows of ``max_length`` tokens start every ``stride``
    tokens, and each window scores only the tokens the previous one did not, so every token but
    the first (nothing predicts it) is scored exactly once, with at least ``max_length - stride``
    tokens of context after the first window.
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"need 0 < stride <= max_length, got stride={stride}, max_length={max_length}")
    windows, prev_end = [], 0
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + max_length, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def perplexity(model, tok, text: str, *, max_length: int = 1024, stride: int = 512, batch_size: int = 8,
               max_batch_tokens: int = 4096, progress: bool = False, desc: str = "perplexity") -> PerplexityResult:
    """Token-level perplexity of ``text`` with a sliding window (see :func:`sliding_windows`).

    The text is tokenised once, with the tokenizer's default special tokens (a leading BOS for
    SmolLM2), and the BOS itself is never scored. ``max_batch_tokens`` bounds windows per forward
    pass (``batch_size`` at most) because each scored token needs a vocabulary-sized logit row.
    When the text fits in one window the result is exactly full-context perplexity.
    """
    ids = _encode(tok, text)
    max_length = min(max_length, _max_positions(model))
    windows = sliding_windows(len(ids), max_length, min(stride, max_length))
    per_batch = max(1, min(batch_size, max_batch_tokens // max_length))
    device, pad = _device(model), _pad_id(tok)
    nll, counts = [], []
    bar = tqdm(total=len(windows), desc=desc, disable=not progress, leave=False)
    for batch in _batches(windows, per_batch):
        inp, mask = _right_pad([ids[b:e] for b, e, _ in batch], pad, device)
        # Token t (begin <= t - 1) is predicted by position t - 1 - begin of its window.
        needed = sorted({t - 1 - b for b, e, f in batch for t in range(f, e)})
        column = {p: j for j, p in enumerate(needed)}
        logits = _selected_logits(model, inp, mask, torch.tensor(needed, device=device))
        for row, (b, e, f) in enumerate(batch):
            cols = torch.tensor([column[t - 1 - b] for t in range(f, e)], device=device)
            lp = _token_logprobs(logits[row, cols], torch.tensor(ids[f:e], device=device))
            nll.append(-float(lp.double().sum()))
            counts.append(e - f)
        bar.update(len(batch))
    bar.close()
    return PerplexityResult(np.array(nll), np.array(counts), max_length, stride)


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------

@dataclass
class TaskContext:
    """What every task function receives (one object keeps their signatures short)."""

    model: Any
    tok: Any
    data_dir: str | os.PathLike | None
    limit: int | None
    seed: int
    batch_size: int
    num_fewshot: int | None
    progress: bool
    online: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def shots(self, task: str) -> int:
        return DEFAULT_FEWSHOT.get(task, 0) if self.num_fewshot is None else self.num_fewshot


def _metric_row(metric: str, stats: dict, task: str | None = None) -> dict[str, Any]:
    row = {"metric": metric, **stats}
    if task is not None:
        row["task"] = task
    return row


_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"


def normalize_number(text: str) -> str:
    """Canonical form of a numeric answer: no commas, ``$`` or trailing period; ``18.00`` -> ``18``."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def extract_gsm8k_answer(generation: str, strict: bool = False) -> str | None:
    """The numeric answer in a GSM8K generation, normalised, or ``None``.

    Order: ``#### N`` (the dataset's own format, which the few-shot exemplars teach), then
    ``The answer is N`` (chain-of-thought style), then the last number in the text (the harness's
    "flexible-extract"). ``strict=True`` accepts only ``#### N`` ("strict-match").
    """
    m = re.search(r"####\s*(" + _NUM + ")", generation)
    if m:
        return normalize_number(m.group(1))
    if strict:
        return None
    m = re.search(r"[Tt]he (?:final )?answer is:?\s*(" + _NUM + ")", generation)
    if m:
        return normalize_number(m.group(1))
    numbers = re.findall(_NUM, generation)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_prompt(question: str, shots: Sequence[dict[str, str]]) -> str:
    """harness ``gsm8k`` format: ``Question: ...\\nAnswer: <solution>`` shots joined by a blank line."""
    prefix = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{prefix}Question: {question}\nAnswer:"


def task_gsm8k(ctx: TaskContext) -> list[dict[str, Any]]:
    """GSM8K, lm-evaluation-harness ``gsm8k`` (task version 3.0), greedy chain-of-thought.

    The k exemplars (default 5) are the first k problems of the test file (we ship no train split),
    with their full reference solutions; they are excluded from scoring, so the full set has
    1,319 - k problems. Generation is greedy, stops at "Question:", a blank line or an end token,
    and is capped at ``max_new_tokens`` (option, default 256). ``exact_match`` uses
    :func:`extract_gsm8k_answer` (#### / "The answer is" / last number), ``strict_match`` only
    ``#### N``; both compare normalised numbers.
    """
    docs = load_gsm8k(ctx.data_dir, online=ctx.online)
    k = ctx.shots("gsm8k")
    shots, pool = docs[:k], docs[k:]
    chosen = [pool[i] for i in subset_indices(len(pool), ctx.limit, ctx.seed, "gsm8k")]
    prompts = [gsm8k_prompt(d["question"], shots) for d in chosen]
    gens = generate_until(ctx.model, ctx.tok, prompts, until=ctx.options.get("until", GSM8K_UNTIL),
                          max_new_tokens=ctx.options.get("max_new_tokens", 256), batch_size=ctx.batch_size,
                          progress=ctx.progress, desc="gsm8k")
    gold = [normalize_number(d["target"]) for d in chosen]
    flexible = [extract_gsm8k_answer(g) == t for g, t in zip(gens, gold, strict=True)]
    strict = [extract_gsm8k_answer(g, strict=True) == t for g, t in zip(gens, gold, strict=True)]
    return [_metric_row("exact_match", accuracy_stats(flexible)), _metric_row("strict_match", accuracy_stats(strict))]


def fewshot_context(docs: Sequence[dict], i: int, k: int, to_text: Callable[[dict], str],
                    to_target: Callable[[dict], str], seed: int, task: str) -> str:
    """Prompt for ``docs[i]`` preceded by ``k`` exemplars drawn (seeded) from the *other* documents.

    Like the harness when a task has no separate few-shot split: exemplars are sampled per
    document and never include the document itself. Each exemplar is ``text + " " + target``;
    exemplars and the query are joined by a blank line.
    """
    if k <= 0:
        return to_text(docs[i])
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), i])
    others = [j for j in rng.choice(len(docs), size=min(k + 1, len(docs)), replace=False) if j != i][:k]
    shots = [f"{to_text(docs[j])} {to_target(docs[j])}" for j in others]
    return "\n\n".join([*shots, to_text(docs[i])])


def _multiple_choice(ctx: TaskContext, task: str, docs: Sequence[dict], to_text: Callable[[dict], str],
                     choices: Sequence[str], gold: Callable[[dict], int]) -> list[bool]:
    """Accuracy vector of a log-likelihood multiple-choice task over a seeded subset of ``docs``."""
    k = ctx.shots(task)
    chosen = subset_indices(len(docs), ctx.limit, ctx.seed, task)
    contexts = [fewshot_context(docs, int(i), k, to_text, lambda d: choices[gold(d)], ctx.seed, task) for i in chosen]
    requests = [(c, f" {choice}") for c in contexts for choice in choices]
    ll = np.array(loglikelihood(ctx.model, ctx.tok, requests, ctx.batch_size, progress=ctx.progress, desc=task))
    pred = ll.reshape(len(chosen), len(choices)).argmax(1)
    return [int(p) == gold(docs[int(i)]) for p, i in zip(pred, chosen, strict=True)]


def sst2_text(doc: dict) -> str:
    return f"{doc['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:"


def rte_text(doc: dict) -> str:
    return f"{doc['premise']}\nQuestion: {doc['hypothesis']} True or False?\nAnswer:"


def task_sst2(ctx: TaskContext) -> list[dict[str, Any]]:
    """SST-2, lm-evaluation-harness ``sst2`` (GLUE, task version 1.0): " negative"/" positive" by log-likelihood.

    Validation split (872 sentences); default zero-shot like the harness, ``num_fewshot`` adds
    exemplars sampled from the other validation sentences (:func:`fewshot_context`).
    """
    docs = load_sst2(ctx.data_dir, online=ctx.online)
    correct = _multiple_choice(ctx, "sst2", docs, sst2_text, SST2_CHOICES, lambda d: d["label"])
    return [_metric_row("acc", accuracy_stats(correct))]


def task_rte(ctx: TaskContext) -> list[dict[str, Any]]:
    """RTE, lm-evaluation-harness ``rte`` (GLUE, task version 1.0): " True"/" False" by log-likelihood.

    Validation split (277 pairs), label 0 = entailment = "True"; zero-shot by default.
    """
    docs = load_rte(ctx.data_dir, online=ctx.online)
    correct = _multiple_choice(ctx, "rte", docs, rte_text, RTE_CHOICES, lambda d: d["label"])
    return [_metric_row("acc", accuracy_stats(correct))]


def task_wikitext2(ctx: TaskContext) -> list[dict[str, Any]]:
    """WikiText-2 (raw) test perplexity with a sliding window.

    Follows the Hugging Face perplexity recipe on the raw file (options ``max_length``, default
    1024, and ``stride``, default 512) rather than the harness's per-document rolling
    log-likelihood (``wikitext`` task version 2.0, which also detokenises); ``word_perplexity``
    (``exp(NLL / words)``, words = whitespace-separated) and ``bits_per_byte`` (``NLL / (ln 2 *
    UTF-8 bytes)``) are reported like the harness's metrics from the same NLL. ``limit`` means the
    first ``limit`` articles (deterministic head, not a random sample: perplexity needs contiguous
    text). Uncertainty: bootstrap over windows of the per-token NLL, mapped to each metric.
    """
    text = load_wikitext2(ctx.data_dir, online=ctx.online)
    if ctx.limit is not None:
        text = "".join(split_wikitext_documents(text)[: ctx.limit])
    res = perplexity(ctx.model, ctx.tok, text, max_length=ctx.options.get("max_length", 1024),
                     stride=ctx.options.get("stride", 512), batch_size=ctx.batch_size, progress=ctx.progress,
                     desc="wikitext2")
    boot = _bootstrap_mean_nll(res.window_nll, res.window_tokens, ctx.seed)
    n_bytes, n_words = len(text.encode("utf-8")), len(text.split())
    # Word and byte metrics rescale the same total NLL, so the token/word and token/byte ratios
    # are treated as fixed and each bootstrap draw of the per-token NLL maps to all three metrics.
    per_word, per_byte = res.n_tokens / max(n_words, 1), res.n_tokens / max(n_bytes, 1)
    return [
        _metric_row("token_perplexity", _transformed_stats(res.mean_nll, boot, np.exp, res.n_tokens)),
        _metric_row("word_perplexity", _transformed_stats(res.mean_nll, boot, lambda m: np.exp(m * per_word), n_words)),
        _metric_row("bits_per_byte", _transformed_stats(res.mean_nll, boot, lambda m: m * per_byte / math.log(2), n_bytes)),
    ]


def mmlu_text(doc: dict) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, doc["choices"], strict=True))
    return f"{doc['question'].strip()}{options}\nAnswer:"


def mmlu_context(doc: dict, shots: Sequence[dict]) -> str:
    """harness ``mmlu`` default template: subject header, dev exemplars with " X" answers, the question."""
    header = f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"
    body = "".join(f"{mmlu_text(s)} {MMLU_LETTERS[s['answer']]}\n\n" for s in shots)
    return header + body + mmlu_text(doc)


def task_mmlu(ctx: TaskContext) -> list[dict[str, Any]]:
    """MMLU, lm-evaluation-harness ``mmlu`` default template (task version 1.0), 5-shot by default.

    The exemplars are the first k dev questions of the same subject (the harness's ``first_n``
    sampler). ``limit`` samples questions across all subjects; ``acc`` is the micro average over
    questions, ``acc_macro`` the mean of the per-subject accuracies, and one ``acc`` row per
    subject is reported with task ``mmlu_<subject>``.
    """
    test, dev = load_mmlu(ctx.data_dir, "test", online=ctx.online), load_mmlu(ctx.data_dir, "dev", online=ctx.online)
    shots: dict[str, list[dict]] = defaultdict(list)
    for d in dev:
        shots[d["subject"]].append(d)
    k = ctx.shots("mmlu")
    chosen = [test[i] for i in subset_indices(len(test), ctx.limit, ctx.seed, "mmlu")]
    requests = [(mmlu_context(d, shots[d["subject"]][:k]), f" {letter}") for d in chosen for letter in MMLU_LETTERS]
    ll = np.array(loglikelihood(ctx.model, ctx.tok, requests, ctx.batch_size, progress=ctx.progress, desc="mmlu"))
    correct = ll.reshape(len(chosen), 4).argmax(1) == np.array([d["answer"] for d in chosen])
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for d, c in zip(chosen, correct, strict=True):
        by_subject[d["subject"]].append(bool(c))
    macro = float(np.mean([np.mean(v) for v in by_subject.values()])) if by_subject else math.nan
    rows = [_metric_row("acc", accuracy_stats(correct)),
            _metric_row("acc_macro", {"value": macro, "stderr": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                                      "n": len(by_subject)})]
    rows += [_metric_row("acc", accuracy_stats(v), task=f"mmlu_{s}") for s, v in sorted(by_subject.items())]
    return rows


TASK_FUNCTIONS: dict[str, Callable[[TaskContext], list[dict[str, Any]]]] = {
    "gsm8k": task_gsm8k, "sst2": task_sst2, "rte": task_rte, "wikitext2": task_wikitext2, "mmlu": task_mmlu,
}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def _per_task(value: Any, task: str, default: Any = None) -> Any:
    return value.get(task, default) if isinstance(value, dict) else (default if value is None else value)


def _counters(stats: Any) -> tuple[int | None, int | None]:
    if stats is None:
        return None, None
    return getattr(stats, "rows_seen", None), getattr(stats, "rows_routed", None)


def _delta(after: int | None, before: int | None) -> Any:
    return pd.NA if after is None or before is None else int(after) - int(before)


def _run_task(task: str, ctx: TaskContext, stats: Any) -> list[dict[str, Any]]:
    """Run one task and stamp its rows with wall time and the editor's counter deltas."""
    seen0, routed0 = _counters(stats)
    t0 = time.perf_counter()
    rows = TASK_FUNCTIONS[task](ctx)
    seconds = time.perf_counter() - t0
    seen1, routed1 = _counters(stats)
    stamp = {"seconds": seconds, "rows_seen": _delta(seen1, seen0), "routed": _delta(routed1, routed0)}
    # Per-subject MMLU rows are breakdowns of the same run: they get no time or counters of their own.
    return [{"task": task, **row, **(stamp if row.get("task", task) == task else {})} for row in rows]


def evaluate_capability(model, tokenizer, tasks: Sequence[str] = TASKS, *,
                        data_dir: str | os.PathLike | None = None, limit: int | dict[str, int] | None = None,
                        seed: int = 0, batch_size: int = 8, num_fewshot: dict[str, int] | None = None,
                        editor: Any = None, progress: bool = True, online: bool = False,
                        task_options: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """Evaluate general capabilities (GSM8K, SST-2, RTE, WikiText-2, MMLU) of a (possibly edited) model.

    Args:
        model: a causal LM (eval mode; not modified).
        tokenizer: its tokenizer; its default special tokens (SmolLM2: a leading BOS) are kept.
        tasks: any of :data:`TASKS`, run in the given order.
        data_dir: benchmark data directory (default ``$LKS_DATA_DIR`` or ``~/.cache/lks/data``).
        limit: items per task (an int for all tasks or ``{task: n}``): a deterministic random sample
            drawn with ``seed`` (:func:`subset_indices`); for ``wikitext2`` the first ``n`` articles;
            for ``mmlu`` the number of questions over all subjects. ``None`` (or a task missing
            from the dict) = the full set.
        seed: seeds the subsets, few-shot sampling (SST-2/RTE with ``num_fewshot``) and bootstrap.
        batch_size: sequences per forward pass.
        num_fewshot: ``{task: k}`` overriding :data:`DEFAULT_FEWSHOT`.
        editor: optional object with an ``applied(model)`` context manager yielding stats with
            integer ``rows_seen`` / ``rows_routed`` counters; all tasks run inside one
            ``with editor.applied(model) as stats`` and each row records the counters' increase.
        progress: tqdm progress bars.
        online: allow ``datasets.load_dataset`` downloads for files missing locally.
        task_options: ``{"gsm8k": {"max_new_tokens": 256, "until": [...]},
            "wikitext2": {"max_length": 1024, "stride": 512}}``.

    Returns:
        A tidy DataFrame with columns :data:`COLUMNS`: one row per (task, metric); ``stderr`` and a
        95% ``ci_low``/``ci_high`` (Wilson for accuracies, bootstrap for perplexities), ``n``
        scored items (tokens/words/bytes for WikiText), wall ``seconds`` of the task, and the
        editor's ``routed`` / ``rows_seen`` increase during the task (``<NA>`` without editor).
    """
    unknown = [t for t in tasks if t not in TASK_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    rows: list[dict[str, Any]] = []
    scope = editor.applied(model) if editor is not None else contextlib.nullcontext(None)
    with scope as stats:
        for task in tasks:
            ctx = TaskContext(model, tokenizer, data_dir, _per_task(limit, task), seed, batch_size,
                              _per_task(num_fewshot, task), progress, online, dict((task_options or {}).get(task, {})))
            rows.extend(_run_task(task, ctx, stats))
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    for col in ("n", "routed", "rows_seen"):
        df[col] = df[col].astype("Int64")
    return df


def _stderr_of(df: pd.DataFrame, suffix: str) -> pd.Series:
    """Stderr column, falling back to the CI half-width / 1.96 where no stderr was reported."""
    se = df[f"stderr{suffix}"].astype(float)
    half = (df[f"ci_high{suffix}"].astype(float) - df[f"ci_low{suffix}"].astype(float)) / (2 * Z95)
    return se.fillna(half)


def compare_capability(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Difference ``after - before`` per (task, metric), with a verdict against the combined 95% CI.

    Rows are paired on ``(task, metric)``. The combined standard error is
    ``sqrt(se_before^2 + se_after^2)`` (treating the two runs as independent, which is conservative
    when both used the same items: a per-item paired test would be tighter). ``within_ci`` is true
    when ``0`` lies in ``diff +- 1.96 se``; ``note`` then says "within 95% CI", otherwise
    "better"/"worse" taking each metric's direction into account (perplexity: lower is better).
    """
    keys = ["task", "metric"]
    m = before.merge(after, on=keys, how="inner", suffixes=("_before", "_after"))
    se = np.sqrt(_stderr_of(m, "_before") ** 2 + _stderr_of(m, "_after") ** 2)
    out = m[keys].copy()
    out["before"], out["after"] = m["value_before"].astype(float), m["value_after"].astype(float)
    out["diff"] = out["after"] - out["before"]
    out["rel_diff"] = out["diff"] / out["before"].abs().replace(0, np.nan)
    out["diff_ci_low"], out["diff_ci_high"] = out["diff"] - Z95 * se, out["diff"] + Z95 * se
    out["within_ci"] = (out["diff_ci_low"] <= 0) & (out["diff_ci_high"] >= 0)
    higher = out["metric"].isin(HIGHER_IS_BETTER)
    improved = (out["diff"] > 0) == higher
    out["note"] = np.where(out["within_ci"], "within 95% CI",
                           np.where(improved, "better (outside 95% CI)", "worse (outside 95% CI)"))
    out.loc[se.isna() & (out["diff"] != 0), "note"] = "no CI available"
    out.loc[se.isna() & (out["diff"] == 0), ["within_ci", "note"]] = [True, "identical"]
    out["n_before"], out["n_after"] = m["n_before"], m["n_after"]
    return out.reset_index(drop=True)
