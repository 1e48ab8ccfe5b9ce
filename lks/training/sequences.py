"""The training set of a fit: tokenised edit, paraphrase and locality sequences.

Each edit contributes its prompt followed by the new target (NLL on the target tokens), prompts
that rephrase it (same NLL: the equivalence loss) and prompts about the same subject with other
relations (KL against the unedited model: the locality loss). With ``TrainConfig.w_after`` the
edit and paraphrase sequences are extended by the unedited model's own continuation, and the KL
also covers those positions (so free generation does not repeat the new object): the sequences
built here mark it pending (``Seq.to_continue``) and the layer-L cache's pass generates it
(:func:`lks.training.fastpath.continue_and_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lks.config import TrainConfig
from lks.data import EditSet, find_subject, subject_token_index
from lks.scope import ScopeIndicator
from lks.training.prompts import EditPrompts, edit_prompts
from lks.utils import length_batches

KIND_EDIT, KIND_EQUIV, KIND_LOC = 0, 1, 2


@dataclass
class Seq:
    """One tokenised training sequence."""

    subject: int            # subject id (row of the feature table)
    kind: int               # KIND_EDIT | KIND_EQUIV | KIND_LOC
    ids: list[int]          # token ids, incl. special tokens the tokenizer adds
    subj_pos: int           # index of the subject's last token
    loss_pos: list[int]     # positions whose logits are read (predicting the next token): the first
                            # len(loss_tgt) are NLL rows, the rest KL rows against the unedited model
                            # (locality sequences: all; edit/paraphrase ones: after the target)
    loss_tgt: list[int]     # target token ids for NLL (empty for locality sequences)
    to_continue: int = 0    # greedy tokens of the unedited model still to append (FastPath.precompute
                            # generates them; loss_pos already lists the KL rows they will hold)


def build_sequences(tokenizer: Any, scope: ScopeIndicator, edits: EditSet, cfg: TrainConfig,
                    prompts: list[EditPrompts] | None = None) -> tuple[list[list[int]], list[Seq], dict[str, int]]:
    """Tokenise the training sequences of ``edits``: ``(per-edit sequence ids, sequences, skipped
    counts)``; ``prompts``: each edit's training prompts (default: :func:`lks.training.prompts.edit_prompts`)."""
    texts: list[tuple[str, int, int, str, str]] = []  # (text, edit idx, kind, prompt, subject)
    skipped = {"equiv_without_subject": 0}
    for i, (r, pr) in enumerate(zip(edits, prompts or edit_prompts(edits, cfg))):
        texts.append((f"{r.prompt} {r.target}", i, KIND_EDIT, r.prompt, r.subject))
        for q in pr.equiv:
            texts.append((f"{q} {r.target}", i, KIND_EQUIV, q, r.subject))
        for p in pr.kl_locality:
            texts.append((p, i, KIND_LOC, p, r.subject))
    per_edit: list[list[int]] = [[] for _ in edits]
    seqs: list[Seq] = []
    bs = 256
    for start in range(0, len(texts), bs):
        chunk = texts[start:start + bs]
        enc = tokenizer([t[0] for t in chunk], return_offsets_mapping=True, add_special_tokens=True)
        for (_text, i, kind, prompt, subject), ids, offs in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            span = subject_span(scope, prompt, subject)
            if span is None:  # a paraphrase that does not name the subject: LKS cannot route it
                skipped["equiv_without_subject"] += 1
                continue
            pos = subject_token_index(offs, *span)
            if kind == KIND_LOC:
                # KL at the next-token position only, or at every position from the subject's
                # last token on (all the predictions the edited block can influence)
                first = len(ids) - 1 if cfg.loc_positions == "last" else pos
                loss_pos, loss_tgt = list(range(first, len(ids))), []
            else:
                # target tokens start at the prompt's length; tokenised TOGETHER with the prompt
                # because byte-level BPE gives " English" and "English" different ids
                tgt_end = len(prompt) + 1 + len(edits[i].target)
                tgt = [j for j, (s, e) in enumerate(offs) if len(prompt) <= s < tgt_end and e > s]
                if not tgt or tgt[0] == 0:
                    continue
                loss_pos, loss_tgt = [j - 1 for j in tgt], [ids[j] for j in tgt]
                if cfg.w_after > 0:  # KL rows: what follows the target (see TrainConfig.after_tokens)
                    loss_pos += list(range(tgt[-1], tgt[-1] + cfg.after_tokens))
            per_edit[i].append(len(seqs))
            pending = cfg.after_tokens - 1 if kind != KIND_LOC and cfg.w_after > 0 else 0
            seqs.append(Seq(scope.index_of(subject), kind, list(ids), pos, loss_pos, loss_tgt, pending))
    return per_edit, seqs, skipped


def subject_span(scope: ScopeIndicator | None, prompt: str, subject: str) -> tuple[int, int] | None:
    """Character span of ``subject`` in ``prompt``: exact, else the scope indicator's match of it."""
    try:
        return find_subject(prompt, subject)
    except ValueError:
        m = scope.find(prompt) if scope is not None else None
        return (m.start, m.end) if m is not None and m.subject == subject else None


def edit_batches(per_edit: list[list[int]], seqs: list[Seq], batch_size: int) -> list[list[int]]:
    """Training steps: ``batch_size`` edits of similar length each (less padding), every edit with
    all its sequences; each step lists sequence ids (:func:`lks.utils.length_batches` over the edits'
    longest sequences)."""
    edits = [i for i in range(len(per_edit)) if per_edit[i]]
    longest = [max(len(seqs[j].ids) for j in per_edit[i]) for i in edits]
    return [[j for k in batch for j in per_edit[edits[k]]] for batch in length_batches(longest, batch_size)]
