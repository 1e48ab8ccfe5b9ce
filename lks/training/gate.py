"""The gated generator's gate: its extra training examples, its warm-up, and its loss.

The ``gated`` generator multiplies its change of the knowledge block by a gate that reads the
original block: open (1) where the prompt asks the edited relation (edit prompt, paraphrases),
closed (0) where it asks another relation of the same subject (locality prompts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lks.config import TrainConfig
from lks.data import EditSet, subject_token_index
from lks.hypernet import KBGenerator
from lks.models import model_device
from lks.scope import ScopeIndicator
from lks.training.fastpath import Cache, FastPath
from lks.training.precision import fit_dtype
from lks.training.prompts import EditPrompts, edit_prompts
from lks.training.sequences import KIND_LOC, Seq, subject_span
from lks.utils import take_rows


@dataclass
class GateExamples:
    """Gate-only examples (their layer-L blocks only: no upper layers, no KL)."""

    kb: torch.Tensor        # [m, d] original blocks (bfloat16 when the fit runs in it)
    subj: torch.Tensor      # [m] subject ids
    label: torch.Tensor     # [m] 1 open, 0 closed
    skip: set[int]          # training sequences left out of the gate loss (see gate_examples)


@torch.no_grad()
def gate_examples(fast: FastPath, scope: ScopeIndicator, edits: EditSet, seqs: list[Seq], cfg: TrainConfig,
                  prompts: list[EditPrompts] | None = None, batch_size: int = 256) -> GateExamples:
    """Examples of the gate loss beyond the training sequences:

    * ``cfg.gate_negatives`` more locality prompts per edit (0), after the KL prompts in the list
      of ``prompts`` (:func:`lks.training.prompts.edit_prompts`, the prompts the training
      sequences were built from), so never one of them;
    * ``cfg.gate_prefixes`` = k: k copies of the edit prompt and its training paraphrases (1) and
      of k locality prompts (0), each behind an unrelated sentence - another edit's prompt with its
      original answer ("The mother tongue of Danielle Darrieux is French.") - as ROME's paraphrase
      prompts put a random sentence before the relation: the gate should read the relation, not
      how the text starts.

    A negative whose tokens up to the subject equal a positive's ("X was born in" and "X's mother
    tongue is") has that positive's very block: no gate can tell them apart, so it is dropped, and
    so are such KL locality sequences (``skip``); the KL loss still keeps them local."""
    rng = random.Random(f"{cfg.seed}\x00gate prefixes")
    items: list[tuple[str, int, float]] = []  # (text, subject id, label)
    for r, pr in zip(edits, prompts or edit_prompts(edits, cfg)):
        sid = scope.index_of(r.subject)
        locs = pr.locality
        items += [(q, sid, 0.0) for q in locs[pr.n_kl:]]
        positives = [r.prompt, *pr.equiv]
        for m in range(cfg.gate_prefixes):
            other = edits[rng.randrange(len(edits))]
            prefix = f"{other.prompt} {other.ground_truth}."
            if other.subject == r.subject or r.subject.casefold() in prefix.casefold():
                continue
            items += [(f"{prefix} {q}", sid, 1.0) for q in positives]
            items += [(f"{prefix} {locs[m % len(locs)]}", sid, 0.0)] if locs else []
    subjects = scope.subjects
    items = [it for it in items if subject_span(scope, it[0], subjects[it[1]]) is not None]
    enc = fast.tokenizer([t for t, _, _ in items], return_offsets_mapping=True) if items else {"input_ids": [], "offset_mapping": []}
    pos = [subject_token_index(offs, *subject_span(scope, t, subjects[s])) for (t, s, _), offs in zip(items, enc["offset_mapping"])]
    block = [(s, tuple(ids[:q + 1])) for (_, s, _), ids, q in zip(items, enc["input_ids"], pos)]
    opened = {(q.subject, tuple(q.ids[:q.subj_pos + 1])) for q in seqs if q.kind != KIND_LOC}
    opened |= {b for b, (_, _, y) in zip(block, items) if y == 1.0}
    skip = {j for j, q in enumerate(seqs) if q.kind == KIND_LOC and (q.subject, tuple(q.ids[:q.subj_pos + 1])) in opened}
    keep = [j for j, (b, (_, _, y)) in enumerate(zip(block, items)) if y == 1.0 or b not in opened]
    # a block depends only on the tokens up to the subject's last one (causal attention): each
    # example runs only that far, and examples that agree up to there run once
    blocks = {}  # token ids up to the subject's last token -> row of ``unique``
    owner = [blocks.setdefault(tuple(enc["input_ids"][j][:pos[j] + 1]), len(blocks)) for j in keep]
    unique = [list(b) for b in blocks]
    # in the cache's dtype (bfloat16 when the fit runs in it: 10,000 edits x 16 negatives ~ 180 MB)
    found = torch.empty(len(unique), fast.d, dtype=fit_dtype(fast.model, cfg.precision) or torch.float32)
    with fast.lower_pass(cfg.precision):
        for idx, states, mask in fast.lower_batches(unique, batch_size):
            last = mask.sum(1) - 1  # right-padded: each row's last real token is its subject's last
            found[torch.tensor(idx)] = states[torch.arange(len(idx), device=states.device), last].to(found.dtype).cpu()
    kb = found[torch.tensor(owner, dtype=torch.long)] if owner else found[:0]
    return GateExamples(kb, torch.tensor([items[j][1] for j in keep], dtype=torch.long),
                        torch.tensor([items[j][2] for j in keep]), skip)


def warm_gate(generator: KBGenerator, features: torch.Tensor, cache: Cache, seqs: list[Seq], gate: GateExamples,
              cfg: TrainConfig, batch: int = 2048) -> None:
    """``cfg.gate_steps`` steps of the gate loss alone on the cached blocks (seconds: no upper
    layers), before the epochs: the gate needs far more updates than the training steps give it
    (without them the gate was open on 47% of the held-out zsRE locality prompts in one
    measurement, with them 12%; docs/experiments.md, the context-gated generator)."""
    dev = features.device
    rows = [j for j in range(len(seqs)) if j not in gate.skip]
    # the blocks: training sequences' from the cache (rows ``at``), then the gate-only ones; read
    # per step from where they are (one concatenated copy was 385 MB at 10,000 zsRE edits)
    at = torch.tensor([cache.offsets[j] + seqs[j].subj_pos - cache.first[j] for j in rows])
    subj = torch.cat([torch.tensor([seqs[j].subject for j in rows]), gate.subj])
    label = torch.cat([torch.tensor([float(seqs[j].kind != KIND_LOC) for j in rows]), gate.label])
    weight = torch.where(label == 1, 0.5 / label.sum().clamp_min(1), 0.5 / (1 - label).sum().clamp_min(1))
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(generator.gate.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.gate_steps):
        idx = torch.randint(0, len(subj), (batch,), generator=gen)
        uniq, inv = subj[idx].unique(return_inverse=True)  # the gate MLP once per subject
        gate_rows = take_rows(generator.gate(features[uniq.to(dev)]), inv.to(dev))  # subjects repeat: deterministic backward
        kb, cached = torch.empty(batch, cache.states.shape[1]), idx < len(at)
        kb[cached] = cache.states[at[idx[cached]]].float()
        kb[~cached] = gate.kb[idx[~cached] - len(at)].float()
        logit = generator.gate_logit(kb.to(dev), gate_rows)
        w = weight[idx].to(dev)
        loss = (F.binary_cross_entropy_with_logits(logit, label[idx].to(dev), reduction="none") * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    generator.zero_grad(set_to_none=True)


def gate_loss(generator: KBGenerator, cache: Cache, seqs: list[Seq], batch: list[int], table, gate: GateExamples,
              d: int) -> torch.Tensor:
    """Balanced BCE of the gate on the original blocks of the batch's sequences: open (1) on edit
    and paraphrase prompts, closed (0) on locality prompts, with the batch's subjects' gate
    examples. ``table`` rows hold ``[change (d), gate feature]`` per subject."""
    dev = model_device(generator)
    batch = [j for j in batch if j not in gate.skip]
    kb = torch.cat([cache.at(j, seqs[j].subj_pos) for j in batch]).float()
    subj = torch.tensor([seqs[j].subject for j in batch])
    label = torch.tensor([float(seqs[j].kind != KIND_LOC) for j in batch])
    extra = torch.isin(gate.subj, subj)  # the gate-only examples of the batch's subjects
    kb, subj = torch.cat([kb, gate.kb[extra].float()]), torch.cat([subj, gate.subj[extra]])
    label = torch.cat([label, gate.label[extra]]).to(dev)
    logit = generator.gate_logit(kb.to(dev), table[subj][:, d:])
    bce = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    return sum((bce[label == v].mean() for v in (0.0, 1.0) if bool((label == v).any())), bce.sum() * 0.0) / 2
