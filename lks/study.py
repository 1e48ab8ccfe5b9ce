"""The paper's empirical study: a subject's last-token hidden state behaves like a replaceable
"knowledge block" (notebook 01).

For two subjects A and B that share a relation ("The mother tongue of {} is"), run A's prompt with
A's last-subject-token hidden state at the output of layer l replaced by B's (taken from B's own
prompt). If the state is a self-contained block of knowledge about the subject, the model should
now answer with B's attribute. Two controls:

* ``same_subject`` - A's state taken from a *different* prompt about A (its paraphrase): the
  answer should not move;
* ``random`` - a random vector with the norm of B's state: the answer should break, but not
  towards B.

Pairs are drawn only from facts the model actually knows (its top-1 next token after the prompt is
the first token of the true object), as in ROME's "known facts" set.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import pandas as pd
import torch

from lks.data import EditRecord, EditSet, find_subject, subject_positions
from lks.hooks import LayerHooks
from lks.models import get_layers, model_device


def relation_template(record: EditRecord) -> str:
    """The prompt with the subject replaced by ``{}`` (a CounterFact relation template)."""
    s, e = find_subject(record.prompt, record.subject)
    return record.prompt[:s] + "{}" + record.prompt[e:]


def first_target_token(tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> list[int]:
    """Id of the first token of ``target`` when tokenised together with its prompt."""
    enc = tokenizer([f"{p} {t}" for p, t in zip(prompts, targets)], return_offsets_mapping=True)
    out = []
    for ids, offs, p in zip(enc["input_ids"], enc["offset_mapping"], prompts):
        out.append(next(ids[j] for j, (s, e) in enumerate(offs) if s >= len(p) and e > s))
    return out


@torch.inference_mode()
def next_token_logprobs(model, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Log-probabilities ``[n, vocab]`` of the next token after each prompt (left padding)."""
    dev, out = model_device(model), []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True, padding_side="left").to(dev)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
        out.append(torch.log_softmax(logits[:, -1].float(), -1).cpu())
    return torch.cat(out)


def known_facts(model, tokenizer, edits: EditSet, batch_size: int = 64) -> EditSet:
    """Records whose true object the model predicts: top-1 next token == first token of it."""
    recs = [r for r in edits if r.ground_truth]
    if not recs:
        return EditSet([], name=f"{edits.name}-known")
    lp = next_token_logprobs(model, tokenizer, [r.prompt for r in recs], batch_size)
    gold = first_target_token(tokenizer, [r.prompt for r in recs], [r.ground_truth for r in recs])
    keep = [r for r, row, g in zip(recs, lp, gold) if int(row.argmax()) == g]
    return EditSet(keep, name=f"{edits.name}-known")


def make_pairs(edits: EditSet, max_pairs: int = 200, seed: int = 0) -> list[tuple[EditRecord, EditRecord]]:
    """Pairs (A, B) with the same relation template, different subjects and different true objects."""
    by_rel: dict[str, list[EditRecord]] = defaultdict(list)
    for r in edits:
        by_rel[relation_template(r)].append(r)
    rng = random.Random(seed)
    pairs = []
    for recs in by_rel.values():
        for a in recs:
            options = [b for b in recs if b.subject != a.subject and b.ground_truth != a.ground_truth]
            if options:
                pairs.append((a, rng.choice(options)))
    rng.shuffle(pairs)
    return pairs[:max_pairs]


@torch.inference_mode()
def subject_states(model, tokenizer, prompts: Sequence[str], subjects: Sequence[str], layers: Sequence[int],
                   batch_size: int = 64) -> torch.Tensor:
    """Hidden state at each subject's last token, at the output of each layer: ``[n, len(layers), d]``."""
    dev, out = model_device(model), []
    for i in range(0, len(prompts), batch_size):
        enc, pos = subject_positions(tokenizer, list(prompts[i:i + batch_size]), list(subjects[i:i + batch_size]), "right")
        enc = enc.to(dev)
        with LayerHooks(model, capture=layers) as hooks:
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
        rows = torch.arange(len(pos), device=dev)
        out.append(torch.stack([hooks.captured[layer][rows, pos.to(dev)] for layer in layers], 1).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def swap_study(model, tokenizer, pairs: Sequence[tuple[EditRecord, EditRecord]], layers: Sequence[int] | None = None,
               batch_size: int = 64, seed: int = 0) -> pd.DataFrame:
    """Replace A's knowledge block with B's (and the two controls) at every layer.

    Returns:
        A tidy table, one row per (pair, layer, condition) with ``condition`` in
        ``swap | same_subject | random``: ``p_a`` / ``p_b`` (probability of the first token of A's /
        B's true object after the replacement), ``p_a_base`` / ``p_b_base`` (unedited), ``top1_b``
        (the top-1 token is B's object), ``top1_a`` (still A's).
    """
    layers = list(range(len(get_layers(model)))) if layers is None else list(layers)
    A, B = [a for a, _ in pairs], [b for _, b in pairs]
    prompts_a = [a.prompt for a in A]
    tok_a = torch.tensor(first_target_token(tokenizer, prompts_a, [a.ground_truth for a in A]))
    tok_b = torch.tensor(first_target_token(tokenizer, prompts_a, [b.ground_truth for b in B]))
    base = next_token_logprobs(model, tokenizer, prompts_a, batch_size)
    states_b = subject_states(model, tokenizer, [b.prompt for b in B], [b.subject for b in B], layers, batch_size)
    para = [a.rephrases[0] if a.rephrases else a.prompt for a in A]  # same subject, other wording
    states_same = subject_states(model, tokenizer, para, [a.subject for a in A], layers, batch_size)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(states_b.shape, generator=g)
    states_rand = noise / noise.norm(dim=-1, keepdim=True) * states_b.norm(dim=-1, keepdim=True)
    dev = model_device(model)
    n = len(pairs)
    rows = []
    for li, layer in enumerate(layers):
        for cond, states in (("swap", states_b), ("same_subject", states_same), ("random", states_rand)):
            lp = []
            for i in range(0, n, batch_size):
                enc, pos = subject_positions(tokenizer, prompts_a[i:i + batch_size], [a.subject for a in A[i:i + batch_size]], "right")
                enc = enc.to(dev)
                with LayerHooks(model, edit_layer=layer) as hooks:
                    hooks.replace(torch.arange(len(pos)), pos, states[i:i + batch_size, li].to(dev))
                    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
                last = enc["attention_mask"].sum(1) - 1
                lp.append(torch.log_softmax(logits[torch.arange(len(pos), device=dev), last].float(), -1).cpu())
            lp = torch.cat(lp)
            top = lp.argmax(-1)
            for k in range(n):
                rows.append({"pair": k, "subject_a": A[k].subject, "subject_b": B[k].subject, "layer": layer,
                             "condition": cond, "p_a": float(lp[k, tok_a[k]].exp()), "p_b": float(lp[k, tok_b[k]].exp()),
                             "p_a_base": float(base[k, tok_a[k]].exp()), "p_b_base": float(base[k, tok_b[k]].exp()),
                             "top1_b": bool(top[k] == tok_b[k]), "top1_a": bool(top[k] == tok_a[k])})
    return pd.DataFrame(rows)


def summarize_swaps(df: pd.DataFrame) -> pd.DataFrame:
    """Per layer and condition: swap success (top-1 is B's object), A kept, mean probability shift."""
    df = df.assign(shift_b=df.p_b - df.p_b_base, shift_a=df.p_a - df.p_a_base)
    return (df.groupby(["condition", "layer"])
              .agg(success=("top1_b", "mean"), kept_a=("top1_a", "mean"), shift_b=("shift_b", "mean"),
                   shift_a=("shift_a", "mean"), n=("pair", "size"))
              .reset_index())


@torch.inference_mode()
def token_layer_swap(model, tokenizer, a: EditRecord, b: EditRecord, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """The swap at every token and every layer (activation patching; ROME's causal trace and
    TransformerLens's patching maps do the same with noise): A's hidden state at one position and
    the output of one layer is replaced by B's at the same position, and the probability of B's
    object after A's prompt is read. Tests, instead of assuming, that the block that carries the
    fact sits at the subject's LAST token. The two prompts must have the same number of tokens
    (same relation, subjects of equal token length).

    Returns one row per (layer, position): ``token`` (A's token there), ``p_b`` (P(B's object)),
    ``p_b_base`` (unedited) and ``is_subject_last``."""
    dev = model_device(model)
    ids_a = tokenizer(a.prompt, return_tensors="pt")["input_ids"].to(dev)
    ids_b = tokenizer(b.prompt, return_tensors="pt")["input_ids"].to(dev)
    if ids_a.shape != ids_b.shape:
        raise ValueError(f"token_layer_swap needs prompts of equal token length: {a.prompt!r} has {ids_a.shape[1]} "
                         f"tokens, {b.prompt!r} {ids_b.shape[1]}")
    layers = list(range(len(get_layers(model)))) if layers is None else list(layers)
    n = ids_a.shape[1]
    tok_b = first_target_token(tokenizer, [b.prompt], [b.ground_truth or b.target])[0]
    _, last = subject_positions(tokenizer, [a.prompt], [a.subject], "right")
    with LayerHooks(model, capture=layers) as hooks:  # B's states at every position and layer
        model(input_ids=ids_b, use_cache=False)
    base = torch.softmax(model(input_ids=ids_a, use_cache=False).logits[0, -1].float(), -1)[tok_b]
    rows, batch = [], ids_a.expand(n, -1)  # row t replaces position t
    for layer in layers:
        with LayerHooks(model, edit_layer=layer) as hooks_a:
            hooks_a.replace(list(range(n)), list(range(n)), hooks.captured[layer][0])
            p = torch.softmax(model(input_ids=batch, use_cache=False).logits[:, -1].float(), -1)[:, tok_b]
        rows += [{"layer": layer, "position": t, "token": tokenizer.decode(ids_a[0, t]), "p_b": float(p[t]),
                  "p_b_base": float(base), "is_subject_last": t == int(last[0])} for t in range(n)]
    return pd.DataFrame(rows)


def paraphrase_ceiling(model, tokenizer, edits: EditSet, batch_size: int = 64) -> dict[str, int]:
    """How consistently the unedited model states what it knows, a ceiling for reading held-out
    generality: among the records with a true object and held-out paraphrases (``rephrases[1:]``),
    those whose true object it predicts after the edit prompt (:func:`known_facts`), and of their
    paraphrases, how many it also answers (the same top-1 first-token test)."""
    with_para = EditSet([r for r in edits if r.ground_truth and len(r.rephrases) > 1])
    known = known_facts(model, tokenizer, with_para, batch_size)
    paras = [(p, r.ground_truth) for r in known for p in r.rephrases[1:]]
    hits = 0
    if paras:
        lp = next_token_logprobs(model, tokenizer, [p for p, _ in paras], batch_size)
        gold = first_target_token(tokenizer, [p for p, _ in paras], [g for _, g in paras])
        hits = sum(int(row.argmax()) == g for row, g in zip(lp, gold))
    return {"records": len(with_para), "known_on_prompt": len(known), "paraphrases_of_known": len(paras),
            "known_on_paraphrase": hits}
