"""``LKSEditor``: fit a knowledge-block generator on an edit set, apply it, save and load it.

The three parts of the method, and where they live:

* **edit scope indicator** (:class:`lks.scope.ScopeIndicator`): which edited subject a prompt
  mentions and where (character span -> last token of the subject);
* **new-KB generator** (:mod:`lks.hypernet`): feature of the edit statement -> new knowledge block;
* **KB replacer** (:class:`lks.hooks.LayerHooks`): writes the new block into the output of decoder
  layer L at the subject's last token, for every prompt that mentions an edited subject.

Training (``fit``) uses a *fast path* that is exactly the hooked forward pass, reorganised:

1. every training prompt is run once through layers ``0..L`` (stopping there) and its layer-L
   output is cached; the feature vectors are computed once;
2. the reference (unedited) next-token distributions of the locality prompts are computed once
   from those caches and kept as top-k log-probs plus one tail bucket;
3. each step writes the generated blocks into the cached states and runs only layers
   ``L+1..N`` (``lks.models.skip_lower_layers``), with logits only where a loss reads them.

``tests/test_editor.py`` proves the fast path's logits equal the plain hooked forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lks.config import EditorConfig, TrainConfig, from_dict
from lks.data import (
    EditRecord,
    EditSet,
    find_subject,
    paraphrase_templates,
    subject_token_index,
    training_locality_prompts,
    training_paraphrase_prompts,
)
from lks.headloss import head_nll, head_topk_kl, pad_rows
from lks.hooks import LayerHooks, Replacement, StopForward, apply_replacement
from lks.hypernet import KBGenerator, make_generator
from lks.models import (
    check_layer,
    get_layers,
    lower_layers_dtype,
    make_past,
    model_device,
    past_key_value,
    skip_lower_layers,
    upper_layers_dtype,
)
from lks.scope import ScopeIndicator
from lks.utils import atomic_dir, release_memory, resolve_precision, set_seed, write_json

KIND_EDIT, KIND_EQUIV, KIND_LOC = 0, 1, 2
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Small containers
# --------------------------------------------------------------------------------------------
@dataclass
class ApplyStats:
    """Counters of an ``applied`` block (non-decode forward calls only)."""

    rows_seen: int = 0    # batch rows the replacer looked at
    rows_routed: int = 0  # rows in which an edited subject was found and its block replaced
    calls: int = 0        # forward calls of the model


@dataclass
class _Seq:
    """One tokenised training sequence (internal)."""

    subject: int            # subject id (row of the feature table)
    kind: int               # KIND_EDIT | KIND_EQUIV | KIND_LOC
    ids: list[int]          # token ids, incl. special tokens the tokenizer adds
    subj_pos: int           # index of the subject's last token
    loss_pos: list[int]     # positions whose logits are read (predicting the next token): the first
                            # len(loss_tgt) are NLL rows, the rest KL rows against the unedited model
                            # (locality sequences: all; edit/paraphrase ones: after the target)
    loss_tgt: list[int]     # target token ids for NLL (empty for locality sequences)


@dataclass
class _Cache:
    """Layer-L states of all training sequences, packed as one ``[sum T, d]`` tensor."""

    states: torch.Tensor          # [sum_len, d]
    offsets: list[int]            # start of sequence i in ``states``
    ref_logp: torch.Tensor | None = None   # [n_loc_pos, k] reference log-probs (top-k)
    ref_idx: torch.Tensor | None = None    # [n_loc_pos, k] their token ids
    ref_tail: torch.Tensor | None = None   # [n_loc_pos] log of the remaining probability mass
    ref_row: dict[int, int] = field(default_factory=dict)  # sequence index -> first row in ref_*
    # TrainConfig.prefix_cache: keys/values of layers L+1..N at the tokens before each subject's last
    # token (an edit cannot change them: attention is causal), [sum of prefix lengths, n_upper, 2,
    # kv_heads, head_dim], sequence i's rows from kv_offsets[i]; training then runs only the suffix
    kv: torch.Tensor | None = None
    kv_offsets: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Editor
# --------------------------------------------------------------------------------------------
class LKSEditor:
    """Latent Knowledge Scalpel editor for one frozen causal LM.

    Args:
        model: a frozen causal LM (see :func:`lks.load_model`).
        tokenizer: its tokenizer (pad token set).
        config: architecture (layer, generator kind, fuzzy threshold). Defaults to the registered
            model's recipe when ``model.lks_name`` is registered, else ``EditorConfig()``.

    Typical use::

        editor = LKSEditor(model, tok)
        editor.fit(edits, TrainConfig(epochs=10))
        print(editor.generate(["The mother tongue of Danielle Darrieux is"]))
        with editor.applied(model):
            model(**batch)          # any forward/generate call sees the edits
        editor.save("runs/cf-100")
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: EditorConfig | None = None) -> None:
        if config is None:
            config = _registered_defaults(model)[0]
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        check_layer(model, config.layer)
        if any(p.requires_grad for p in model.parameters()):
            raise ValueError("the base model must be frozen (lks.load_model returns it frozen); "
                             "LKS never trains base-model weights")
        self.d = int(model.config.hidden_size)
        self.generator: KBGenerator = make_generator(config.generator, self.d, config.mlp_ratio).to(model_device(model))
        self.subjects: list[str] = []
        self.feature_texts: list[str] = []
        self.features: torch.Tensor | None = None  # [n_subjects, d]
        self.scope: ScopeIndicator | None = None
        self.train_config: TrainConfig | None = None
        self.history: list[dict[str, float]] = []
        self.data_checksum: str = ""
        self.n_edits = 0
        self._table: torch.Tensor | None = None   # cached generator table for inference
        self._pieces: dict[int, str] = {}          # token id -> surface text (applied mode)
        self._as_tuple: bool | None = None
        self._lm_weight: torch.Tensor | None = None  # bfloat16 copy of the output embedding during fit
        self.precision_used = ""                     # TrainConfig.precision as resolved by the last fit
        # pad the fast path's shapes to SHAPE_QUANTA: None (default) where it pays, i.e. bfloat16 on
        # CPU (oneDNN's per-shape kernels); in float32 the padding only costs (~15% slower steps)
        self.quantize_shapes: bool | None = None

    # ----------------------------------------------------------------------------------------
    # Scope: subjects and feature vectors
    # ----------------------------------------------------------------------------------------
    def _set_edits(self, edits: EditSet, cfg: TrainConfig | None = None) -> None:
        """Subjects, feature texts, scope indicator and feature vectors of ``edits``. With ``cfg``
        (from :meth:`fit`) the feature pass runs in the fit's precision (see :meth:`_lower_pass`)."""
        edits.require_nonempty()
        _check_conflicts(edits)  # fit() has already dropped conflicts when asked to
        by_subject: dict[str, list[str]] = {}
        for r in edits:
            by_subject.setdefault(r.subject, [])
            stmt = r.feature_text()
            if stmt not in by_subject[r.subject]:
                by_subject[r.subject].append(stmt)
        self.subjects = list(by_subject)
        # edits of the same subject are joined into one statement: one KB per subject
        self.feature_texts = [" ".join(stmts) for stmts in by_subject.values()]
        self.scope = ScopeIndicator(self.subjects, fuzzy_threshold=self.config.fuzzy_threshold)
        bf16 = cfg is not None and self._bf16_swap(cfg) is not None
        with self._lower_pass(cfg) if cfg is not None else nullcontext():
            # 1,000 CounterFact subjects: bfloat16 in batches of 256 2.8 s; float32 in batches of 64
            # 6.8 s (of 256: 8.5 s)
            self.features = self._layer_states_at_last_token(self.feature_texts, batch_size=256 if bf16 else 64)
        self.data_checksum = edits.checksum()
        self.n_edits = len(edits)
        self._table = None

    @torch.no_grad()  # not inference_mode: these tensors are inputs of training steps later
    def _layer_states_at_last_token(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Layer-L output at the last real token of each text: ``[n, d]`` (stops at layer L).

        The texts run in order of token length (batches of similar lengths carry little padding;
        1,000 CounterFact feature texts: 11.6 -> 6.8 s, same values up to float rounding)."""
        out = torch.empty(len(texts), self.d)
        for idx, states, mask in self._lower_batches(self.tokenizer(list(texts))["input_ids"], batch_size):
            last = mask.sum(1) - 1
            out[torch.tensor(idx)] = states[torch.arange(len(idx), device=states.device), last].float().cpu()
        return out.to(model_device(self.model))

    def _lower_batches(self, ids: Sequence[list[int]], batch_size: int, desc: str | None = None
                       ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Layer-L outputs of token lists in order of length (batches of similar lengths carry
        little padding): yields ``(indices into ids, states [b, T, d], mask [b, T])``; ``desc``
        shows a progress bar. The glibc heap is trimmed every ``TRIM_EVERY`` batches."""
        dev = model_device(self.model)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None):
            idx = order[b:b + batch_size]
            x, mask = _pad([ids[i] for i in idx], self.tokenizer.pad_token_id, dev)
            yield idx, self._run_to_layer(x, mask), mask
            if (b // batch_size) % TRIM_EVERY == TRIM_EVERY - 1:
                release_memory(collect=False)  # see lks.utils.release_memory

    def _run_to_layer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Layer-L output ``[batch, seq, d]``; the layers above L are never run."""
        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids}
        dtype = next(get_layers(self.model)[0].parameters()).dtype
        emb = self.model.get_input_embeddings()
        if emb.weight.dtype != dtype:  # inside _lower_pass: bfloat16 layers, float32 (tied) embeddings
            inputs = {"inputs_embeds": emb(input_ids).to(dtype)}
        with LayerHooks(self.model, capture=[self.config.layer], stop_after_capture=True) as hooks:
            with suppress(StopForward):
                self.model(**inputs, attention_mask=attention_mask, use_cache=False)
        self._as_tuple = hooks.output_is_tuple
        return hooks.captured[self.config.layer]

    # ----------------------------------------------------------------------------------------
    # Training data
    # ----------------------------------------------------------------------------------------
    def _build_sequences(self, edits: EditSet, cfg: TrainConfig) -> tuple[list[list[int]], list[_Seq], dict[str, int]]:
        """Tokenise edit, equivalence and locality sequences; returns per-edit sequence ids."""
        assert self.scope is not None
        texts: list[tuple[str, int, int, str, str]] = []  # (text, edit idx, kind, prompt, subject)
        skipped = {"equiv_without_subject": 0}
        bank = _bank(cfg)  # parsed once per fit
        for i, r in enumerate(edits):
            texts.append((f"{r.prompt} {r.target}", i, KIND_EDIT, r.prompt, r.subject))
            for q in _equiv_prompts(r, cfg, bank):
                texts.append((f"{q} {r.target}", i, KIND_EQUIV, q, r.subject))
            if cfg.w_loc > 0:
                for p in training_locality_prompts(r, cfg.loc_per_subject, cfg.seed, cfg.loc_templates):
                    texts.append((p, i, KIND_LOC, p, r.subject))
        per_edit: list[list[int]] = [[] for _ in edits]
        seqs: list[_Seq] = []
        bs = 256
        for start in range(0, len(texts), bs):
            chunk = texts[start:start + bs]
            enc = self.tokenizer([t[0] for t in chunk], return_offsets_mapping=True, add_special_tokens=True)
            for (_text, i, kind, prompt, subject), ids, offs in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
                span = self._subject_span(prompt, subject)
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
                seqs.append(_Seq(self.scope.index_of(subject), kind, list(ids), pos, loss_pos, loss_tgt))
        if cfg.w_after > 0 and cfg.after_tokens > 1:
            self._continue_unedited(seqs, cfg.after_tokens - 1)
        return per_edit, seqs, skipped

    @torch.no_grad()
    def _continue_unedited(self, seqs: list[_Seq], n: int, batch_size: int = 64) -> None:
        """Extend every edit and paraphrase sequence ("prompt target") by the unedited model's own
        greedy continuation of up to ``n`` tokens (cut after an end-of-sequence token), and keep the
        KL rows that fall inside the extended sequence: after the target, the edited model should
        continue as the unedited model continues the same text."""
        todo = [j for j, q in enumerate(seqs) if q.kind != KIND_LOC]
        eos = self.tokenizer.eos_token_id
        dev = model_device(self.model)
        for b in range(0, len(todo), batch_size):
            idx = todo[b:b + batch_size]
            ids, mask = _pad([seqs[j].ids for j in idx], self.tokenizer.pad_token_id, dev, left=True)
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)[:, ids.shape[1]:].tolist()
            for r, j in enumerate(idx):
                new = out[r]
                if eos is not None and eos in new:
                    new = new[:new.index(eos) + 1]
                q = seqs[j]
                q.ids = q.ids + new
                q.loss_pos = q.loss_pos[:len(q.loss_tgt)] + [p for p in q.loss_pos[len(q.loss_tgt):] if p < len(q.ids)]

    def _subject_span(self, prompt: str, subject: str) -> tuple[int, int] | None:
        try:
            return find_subject(prompt, subject)
        except ValueError:
            m = self.scope.find(prompt) if self.scope is not None else None
            return (m.start, m.end) if m is not None and m.subject == subject else None

    @torch.no_grad()
    def _gate_examples(self, edits: EditSet, seqs: list[_Seq], cfg: TrainConfig, batch_size: int = 256) -> None:
        """Examples of the gated generator's gate loss beyond the training sequences (their layer-L
        states only: no upper layers, no KL), stored as ``self._gate_kb [m, d]``, subject ids
        ``self._gate_subj [m]`` and labels ``self._gate_label [m]`` (1 open, 0 closed):

        * ``cfg.gate_negatives`` more locality prompts per edit (0), after the KL prompts in the
          list of :func:`lks.data.training_locality_prompts`, so never one of them;
        * ``cfg.gate_prefixes`` = k: k copies of the edit prompt and its training paraphrases (1)
          and of k locality prompts (0), each behind an unrelated sentence - another edit's prompt
          with its original answer ("The mother tongue of Danielle Darrieux is French.") - as
          ROME's paraphrase prompts put a random sentence before the relation: the gate should
          read the relation, not how the text starts.

        A negative whose tokens up to the subject equal a positive's ("X was born in" and "X's
        mother tongue is") has that positive's very block: no gate can tell them apart, so it is
        dropped, and so are such KL locality sequences (``self._gate_skip``); the KL loss still
        keeps them local."""
        bank = _bank(cfg)
        rng = random.Random(f"{cfg.seed}\x00gate prefixes")
        items: list[tuple[str, int, float]] = []  # (text, subject id, label)
        k = cfg.loc_per_subject if cfg.w_loc > 0 else 0
        for r in edits:
            sid = self.scope.index_of(r.subject)
            locs = training_locality_prompts(r, k + cfg.gate_negatives, cfg.seed, cfg.loc_templates)
            items += [(q, sid, 0.0) for q in locs[k:]]
            positives = [r.prompt, *_equiv_prompts(r, cfg, bank)]
            for m in range(cfg.gate_prefixes):
                other = edits[rng.randrange(len(edits))]
                prefix = f"{other.prompt} {other.ground_truth}."
                if other.subject == r.subject or r.subject.casefold() in prefix.casefold():
                    continue
                items += [(f"{prefix} {q}", sid, 1.0) for q in positives]
                items += [(f"{prefix} {locs[m % len(locs)]}", sid, 0.0)] if locs else []
        items = [it for it in items if self._subject_span(it[0], self.subjects[it[1]]) is not None]
        enc = self.tokenizer([t for t, _, _ in items], return_offsets_mapping=True) if items else {"input_ids": [], "offset_mapping": []}
        pos = [subject_token_index(offs, *self._subject_span(t, self.subjects[s])) for (t, s, _), offs in zip(items, enc["offset_mapping"])]
        block = [(s, tuple(ids[:q + 1])) for (_, s, _), ids, q in zip(items, enc["input_ids"], pos)]
        opened = {(q.subject, tuple(q.ids[:q.subj_pos + 1])) for q in seqs if q.kind != KIND_LOC}
        opened |= {b for b, (_, _, y) in zip(block, items) if y == 1.0}
        self._gate_skip = {j for j, q in enumerate(seqs) if q.kind == KIND_LOC and (q.subject, tuple(q.ids[:q.subj_pos + 1])) in opened}
        keep = [j for j, (b, (_, _, y)) in enumerate(zip(block, items)) if y == 1.0 or b not in opened]
        ids = [enc["input_ids"][j] for j in keep]
        # in the cache's dtype (bfloat16 when the fit runs in it: 10,000 edits x 16 negatives ~ 180 MB)
        kb = torch.empty(len(keep), self.d, dtype=torch.bfloat16 if self._bf16_swap(cfg) else torch.float32)
        with self._lower_pass(cfg):
            for idx, states, _ in self._lower_batches(ids, batch_size):
                at = torch.tensor([pos[keep[i]] for i in idx], device=states.device)
                kb[torch.tensor(idx)] = states[torch.arange(len(idx), device=states.device), at].to(kb.dtype).cpu()
        self._gate_kb = kb
        self._gate_subj = torch.tensor([items[j][1] for j in keep], dtype=torch.long)
        self._gate_label = torch.tensor([items[j][2] for j in keep])

    def _warm_gate(self, cache: _Cache, seqs: list[_Seq], cfg: TrainConfig, batch: int = 2048) -> None:
        """``cfg.gate_steps`` steps of the gate loss alone on the cached blocks (seconds: no upper
        layers), before the epochs: the gate needs far more updates than the training steps give
        it (without them an earlier version was open on 47% of the held-out zsRE locality prompts,
        with them 12%; README, The context-gated generator)."""
        dev = model_device(self.model)
        rows = [j for j in range(len(seqs)) if j not in self._gate_skip]
        kb = torch.cat([torch.stack([cache.states[cache.offsets[j] + seqs[j].subj_pos] for j in rows]), self._gate_kb])
        subj = torch.cat([torch.tensor([seqs[j].subject for j in rows]), self._gate_subj])
        label = torch.cat([torch.tensor([float(seqs[j].kind != KIND_LOC) for j in rows]), self._gate_label])
        weight = torch.where(label == 1, 0.5 / label.sum().clamp_min(1), 0.5 / (1 - label).sum().clamp_min(1))
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.AdamW(self.generator.gate.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        feats = self.features.to(dev)
        for _ in range(cfg.gate_steps):
            idx = torch.randint(0, len(kb), (batch,), generator=gen)
            uniq, inv = subj[idx].unique(return_inverse=True)  # the gate MLP once per subject
            logit = self.generator.gate_logit(kb[idx].to(dev).float(), self.generator.gate(feats[uniq.to(dev)])[inv.to(dev)])
            w = weight[idx].to(dev)
            loss = (F.binary_cross_entropy_with_logits(logit, label[idx].to(dev), reduction="none") * w).sum() / w.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.generator.zero_grad(set_to_none=True)

    @torch.no_grad()  # not inference_mode: the cache feeds autograd-tracked training steps
    def _precompute(self, seqs: list[_Seq], cfg: TrainConfig, batch_size: int = 256, progress: bool = True) -> _Cache:
        """Cache layer-L states of every sequence and the reference locality distributions."""
        order = sorted(range(len(seqs)), key=lambda j: len(seqs[j].ids))  # length-bucketed batches
        offsets, total = _starts(len(s.ids) for s in seqs)
        # filled in place: one [sum T, d] tensor, never a second copy (10,000 edits: 1.4 GB float32)
        # stored in the lower pass's dtype (bfloat16 halves the largest cache; the values are bf16 anyway)
        cache = _Cache(torch.zeros(total, self.d, dtype=torch.bfloat16 if self._bf16_swap(cfg) else torch.float32), offsets)
        with self._lower_pass(cfg):
            for idx, states, _ in self._lower_batches([s.ids for s in seqs], batch_size,
                                                      "cache layer-L states" if progress else None):
                for row, j in enumerate(idx):
                    n = len(seqs[j].ids)
                    cache.states[offsets[j]:offsets[j] + n] = states[row, :n].cpu()
        # one pass through layers L+1..N (no edit): reference distributions at the KL rows (locality
        # sequences; after the target with TrainConfig.w_after) and, with prefix_cache, the
        # keys/values of every sequence's prefix
        loc = {j for j in order if len(seqs[j].loss_pos) > len(seqs[j].loss_tgt)}
        # (no upper layers when L is the last layer: nothing to cache)
        prefix_cache = cfg.prefix_cache and self.config.layer + 1 < len(get_layers(self.model))
        todo = order if prefix_cache else [j for j in order if j in loc]
        kv_offsets, total = _starts(s.subj_pos for s in seqs)

        def put_kv(j: int, kv: torch.Tensor) -> None:  # into one preallocated tensor, in sequence order
            if cache.kv is None:
                cache.kv, cache.kv_offsets = torch.empty(total, *kv.shape[1:], dtype=kv.dtype), kv_offsets
            cache.kv[kv_offsets[j]:kv_offsets[j] + len(kv)] = kv
        logps, idxs, tails, n_ref = [], [], [], 0
        with self._upper_pass(cfg):  # the same precision as the training steps: KL 0 for an unchanged block
            for b in tqdm(range(0, len(todo), batch_size), desc="upper-layer pass (references"
                          + (", prefix keys/values)" if prefix_cache else ")"), disable=not progress or not todo):
                batch = todo[b:b + batch_size]
                hidden = self._upper_hidden(cache, seqs, batch, None, kv_out=put_kv if prefix_cache else None)
                if (b // batch_size) % TRIM_EVERY == TRIM_EVERY - 1:
                    release_memory(collect=False)
                at, rows, lbatch = 0, [], []
                for j in batch:
                    n, n_nll = len(seqs[j].loss_pos), len(seqs[j].loss_tgt)
                    if j in loc:
                        rows.extend(range(at + n_nll, at + n))
                        lbatch.append(j)
                    at += n
                if not rows:
                    continue
                lp = torch.log_softmax(self._logits(hidden[torch.tensor(rows, device=hidden.device)]), -1)
                k = min(cfg.loc_topk, lp.shape[-1])
                top, ti = lp.topk(k, dim=-1)
                logps.append(top.cpu())
                idxs.append(ti.to(torch.int32).cpu())
                tails.append(_log_tail(lp, ti).cpu())
                for j in lbatch:  # KL rows of sequence j: ref_row[j] onwards, one per KL position
                    cache.ref_row[j] = n_ref
                    n_ref += len(seqs[j].loss_pos) - len(seqs[j].loss_tgt)
        if loc:
            cache.ref_logp, cache.ref_idx, cache.ref_tail = torch.cat(logps), torch.cat(idxs), torch.cat(tails)
        return cache

    # ----------------------------------------------------------------------------------------
    # The fast path: cached layer-L states -> layers L+1..N -> logits at loss positions
    # ----------------------------------------------------------------------------------------
    def _upper_logits(self, cache: _Cache, seqs: list[_Seq], batch: list[int], table: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[n_positions, vocab]`` (float32) at every ``loss_pos`` of the sequences in ``batch``.

        ``table`` (``[n_subjects, d]``, may require grad) holds each subject's generated block;
        ``None`` runs the unedited model.
        """
        return self._logits(self._upper_hidden(cache, seqs, batch, table))

    def _head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output layer's weight (a bfloat16 copy inside a bfloat16 fit) and bias."""
        head = self.model.get_output_embeddings()
        return (self._lm_weight if self._lm_weight is not None else head.weight), getattr(head, "bias", None)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output layer on final hidden rows ``[n, d]`` -> float32 logits ``[n, vocab]``."""
        weight, bias = self._head()
        n = hidden.shape[0]
        hidden = pad_rows(hidden, self._logit_quantum(weight))  # zero rows, sliced off again
        return F.linear(hidden.to(weight.dtype), weight, bias)[:n].float()

    def _logit_quantum(self, weight: torch.Tensor) -> int:
        """Logit rows are padded to a multiple of this (0: not padded; see ``SHAPE_QUANTA``)."""
        return SHAPE_QUANTA[3] if self._quantize(weight) else 0

    def _quantize(self, weight: torch.Tensor) -> bool:
        """Whether to pad shapes for a pass with weights like ``weight`` (see ``quantize_shapes``)."""
        if self.quantize_shapes is not None:
            return self.quantize_shapes
        return weight.dtype == torch.bfloat16 and weight.device.type == "cpu"

    def _upper_hidden(self, cache: _Cache, seqs: list[_Seq], batch: list[int], table: torch.Tensor | None,
                      kv_out: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Final hidden states ``[n_positions, d]`` at every ``loss_pos`` of the sequences in ``batch``.

        Layers L+1..N run on the cached layer-L states. When the cache holds prefix keys/values
        (``TrainConfig.prefix_cache``), only each sequence's suffix - from the subject's last token
        on - runs, attending to the cached prefix. ``kv_out`` (precompute) receives
        ``(sequence, its prefix keys/values)`` from a full pass instead.
        """
        dev = model_device(self.model)
        layers = get_layers(self.model)
        L = self.config.layer
        use_prefix = cache.kv is not None and kv_out is None
        starts = [seqs[j].subj_pos if use_prefix else 0 for j in batch]
        lens = [len(seqs[j].ids) - s0 for j, s0 in zip(batch, starts)]
        T, P, B = max(lens), max(starts), len(batch)
        if self._quantize(next(layers[-1].parameters())):  # few distinct shapes: see SHAPE_QUANTA
            B, T, P = quantized_shape(B, T, P)
        # [B, T, d] right-padded copy of the cached states (padding is masked out; rows past the
        # batch are dummies that see one zero token, so no attention row is fully masked)
        h = torch.zeros(B, T, self.d, device=dev)
        mask = torch.zeros(B, P + T, dtype=torch.long, device=dev)
        mask[len(batch):, P] = 1
        for row, (j, s0, n) in enumerate(zip(batch, starts, lens)):
            o = cache.offsets[j] + s0
            h[row, :n] = cache.states[o:o + n].to(dev)
            mask[row, P - s0:P + n] = 1  # prefix left-padded to P, suffix right-padded to T
        starts = starts + [0] * (B - len(batch))
        if table is not None:
            rows = torch.arange(len(batch), device=dev)
            pos = torch.tensor([seqs[j].subj_pos - s0 for j, s0 in zip(batch, starts)], device=dev)
            subj = torch.tensor([seqs[j].subject for j in batch], device=dev)
            h = apply_replacement(h, Replacement(rows, pos, table[subj], combine=self.generator.combine))
        # the upper layers' own dtype: bfloat16 inside _upper_pass when TrainConfig.precision asks
        dtype = next(layers[L + 1].parameters()).dtype if L + 1 < len(layers) else next(self.model.parameters()).dtype
        h = h.to(dtype)
        kwargs: dict[str, Any] = {"use_cache": kv_out is not None}
        if use_prefix:
            kwargs.update(self._prefix_inputs(cache, batch, starts, P, T, dtype, dev))
        with skip_lower_layers(self.model, L, h, bool(self._as_tuple)):
            out = self.model.base_model(inputs_embeds=torch.zeros_like(h), attention_mask=mask, **kwargs)
        last = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if kv_out is not None:
            kv = [past_key_value(out.past_key_values, i) for i in range(L + 1, len(layers))]
            for row, j in enumerate(batch):
                p = seqs[j].subj_pos  # [p, n_upper, 2, kv_heads, head_dim]
                kv_out(j, torch.stack([torch.stack([k[row, :, :p], v[row, :, :p]]) for k, v in kv])
                       .permute(3, 0, 1, 2, 4).cpu())
        g_rows = torch.tensor([r for r, j in enumerate(batch) for _ in seqs[j].loss_pos], device=dev)
        g_pos = torch.tensor([p - s0 for j, s0 in zip(batch, starts) for p in seqs[j].loss_pos], device=dev)
        return last[g_rows, g_pos]

    def _prefix_inputs(self, cache: _Cache, batch: list[int], starts: list[int], P: int, T: int,
                       dtype: torch.dtype, dev: torch.device) -> dict[str, Any]:
        """Model kwargs that make a suffix-only pass attend to the cached prefix keys/values."""
        assert cache.kv is not None
        _, n_upper, _, n_kv, hd = cache.kv.shape
        kv = torch.zeros(len(starts), P, n_upper, 2, n_kv, hd, dtype=dtype)
        for row, (j, p) in enumerate(zip(batch, starts)):  # zip: dummy rows keep zero keys/values
            o = cache.kv_offsets[j]
            kv[row, P - p:] = cache.kv[o:o + p]
        kv = kv.to(dev).permute(2, 3, 0, 4, 1, 5)  # [n_upper, 2, batch, kv_heads, P, head_dim]
        dummy = torch.zeros(len(starts), n_kv, P, hd, dtype=dtype, device=dev)  # layers 0..L never read it
        n_lower = self.config.layer + 1
        past = make_past([(dummy, dummy)] * n_lower + [(kv[i, 0], kv[i, 1]) for i in range(n_upper)])
        starts_t = torch.tensor(starts, device=dev)
        return {"past_key_values": past, "use_cache": True,
                "position_ids": starts_t[:, None] + torch.arange(T, device=dev)[None, :],  # true positions
                "cache_position": torch.arange(P, P + T, device=dev)}                      # slots after the prefix

    def _bf16_swap(self, cfg: TrainConfig) -> torch.dtype | None:
        """bfloat16 when the fit's precision asks for it and the model is float32 (a model loaded in
        bfloat16 or float16 already runs in half precision and is left as it is)."""
        want = resolve_precision(cfg.precision, model_device(self.model))
        model_dtype = next(self.model.parameters()).dtype
        self.precision_used = want if model_dtype == torch.float32 else str(model_dtype).replace("torch.", "")
        return torch.bfloat16 if want == "bfloat16" and model_dtype == torch.float32 else None

    @contextmanager
    def _lower_pass(self, cfg: TrainConfig) -> Iterator[None]:
        """Precision of the one-time layer-L pass of :meth:`_precompute` (``TrainConfig.precision``):
        in bfloat16 the cached states carry bfloat16 rounding, like the upper pass. The feature
        vectors of :meth:`fit` run in it too: they are computed once and stored with the editor, so
        inference reads the very vectors training saw (1,000 CounterFact subjects: within 1.1% of
        the float32 vectors on average, 4.5% at most, relative L2)."""
        if self._bf16_swap(cfg) is None:
            yield
            return
        with lower_layers_dtype(self.model, self.config.layer, torch.bfloat16, attn_implementation="eager"):
            yield

    @contextmanager
    def _upper_pass(self, cfg: TrainConfig) -> Iterator[None]:
        """Precision of the fast path's upper pass for one fit (``TrainConfig.precision``).

        ``"bfloat16"`` on a float32 model: layers L+1..N and the final norm hold bfloat16 weights
        inside the block (:func:`lks.models.upper_layers_dtype`, originals restored on exit), eager
        attention, and a bfloat16 copy of the output embedding for the logits (it may be tied to
        the input embedding, which the block must not change). Losses stay in float32.
        """
        if self._bf16_swap(cfg) is None:
            yield
            return
        head = self.model.get_output_embeddings()
        self._lm_weight = head.weight.detach().to(torch.bfloat16)
        try:
            with upper_layers_dtype(self.model, self.config.layer, torch.bfloat16, attn_implementation="eager"):
                yield
        finally:
            self._lm_weight = None

    def _batch_loss(self, cache: _Cache, seqs: list[_Seq], batch: list[int], cfg: TrainConfig) -> dict[str, torch.Tensor]:
        # generated blocks of this batch's subjects only: the whole table would cost a d x d
        # product per subject per step (at 10,000 subjects more than the rest of the step)
        subjects = sorted({seqs[j].subject for j in batch})
        feats = self.features[torch.tensor(subjects, device=self.features.device)]
        table = _RowsOf(self.generator.table(feats.to(model_device(self.model))), subjects)
        # the batch's sequences (edit, rephrase, locality prompts of different lengths) run through
        # the upper layers in up to LENGTH_BUCKETS blocks, each padded only to its own longest
        # sequence; the losses are means, so the order of the rows does not matter
        blocks = step_blocks(seqs, batch, cache.kv is not None)
        batch = [j for block in blocks for j in block]  # the row order of hidden
        hidden = torch.cat([self._upper_hidden(cache, seqs, block, table) for block in blocks])
        losses: dict[str, torch.Tensor] = {}
        zero = hidden.sum() * 0.0
        # the NLL rows and the KL rows go through the output layer separately (lks.headloss)
        at, kl_rows, kl_ref, kl_loc = 0, [], [], []
        nll_rows, nll_tgt, nll_seq, seq_kind = [], [], [], []
        for j in batch:
            s, n, n_nll = seqs[j], len(seqs[j].loss_pos), len(seqs[j].loss_tgt)
            if n_nll:
                nll_rows.extend(range(at, at + n_nll))
                nll_tgt.extend(s.loss_tgt)
                nll_seq.extend([len(seq_kind)] * n_nll)
                seq_kind.append(s.kind)
            if n > n_nll:  # locality KL, or the KL after the target (TrainConfig.w_after)
                kl_rows.extend(range(at + n_nll, at + n))
                kl_ref.extend(range(cache.ref_row[j], cache.ref_row[j] + n - n_nll))
                kl_loc.extend([s.kind == KIND_LOC] * (n - n_nll))
            at += n
        dev = hidden.device
        # output layer + loss fused (lks.headloss): vocabulary-sized logits only HEAD_CHUNK rows at
        # a time, their gradient taken in closed form; only [rows, d] is kept for the backward
        weight, bias = self._head()
        head_kw: dict[str, Any] = {"chunk": HEAD_CHUNK, "pad": self._logit_quantum(weight)}
        losses["edit"] = losses["equiv"] = zero
        if nll_rows:
            tok_nll = head_nll(hidden[torch.tensor(nll_rows, device=dev)], weight, bias,
                               torch.tensor(nll_tgt, device=dev), **head_kw)
            seq_idx = torch.tensor(nll_seq, device=dev)
            per_seq = torch.zeros(len(seq_kind), device=dev).index_add(0, seq_idx, tok_nll)
            per_seq = per_seq / torch.bincount(seq_idx, minlength=len(seq_kind)).clamp_min(1)  # mean over tokens
            kinds = torch.tensor(seq_kind, device=dev)
            for name, kind in (("edit", KIND_EDIT), ("equiv", KIND_EQUIV)):
                sel = kinds == kind
                if bool(sel.any()):
                    losses[name] = per_seq[sel].mean()
        losses["loc"] = losses["after"] = zero
        if kl_rows:
            ref = torch.tensor(kl_ref)
            kl = head_topk_kl(hidden[torch.tensor(kl_rows, device=dev)], weight, bias, cache.ref_logp[ref].to(dev),
                              cache.ref_idx[ref].to(dev).long(), cache.ref_tail[ref].to(dev), **head_kw)
            is_loc = torch.tensor(kl_loc, device=dev)
            for name, sel in (("loc", is_loc), ("after", ~is_loc)):
                if bool(sel.any()):
                    losses[name] = kl[sel].mean()
        losses["gate"] = self._gate_loss(cache, seqs, batch, table) if self.generator.has_gate else zero
        losses["total"] = (cfg.w_edit * losses["edit"] + cfg.w_equiv * losses["equiv"] + cfg.w_loc * losses["loc"]
                           + cfg.w_after * losses["after"] + cfg.w_gate * losses["gate"])
        return losses

    def _gate_loss(self, cache: _Cache, seqs: list[_Seq], batch: list[int], table: _RowsOf) -> torch.Tensor:
        """Balanced BCE of the gated generator's gate on the original blocks of the batch's sequences:
        open (1) on edit and paraphrase prompts, closed (0) on locality prompts, with the batch's
        subjects' examples of :meth:`_gate_examples`."""
        dev = model_device(self.model)
        batch = [j for j in batch if j not in self._gate_skip]  # see _gate_examples
        kb = torch.stack([cache.states[cache.offsets[j] + seqs[j].subj_pos] for j in batch]).float()
        subj = torch.tensor([seqs[j].subject for j in batch])
        label = torch.tensor([float(seqs[j].kind != KIND_LOC) for j in batch])
        extra = torch.isin(self._gate_subj, subj)  # the gate-only examples of the batch's subjects
        kb, subj = torch.cat([kb, self._gate_kb[extra].float()]), torch.cat([subj, self._gate_subj[extra]])
        label = torch.cat([label, self._gate_label[extra]]).to(dev)
        logit = self.generator.gate_logit(kb.to(dev), table[subj][:, self.d:])
        bce = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
        return sum((bce[label == v].mean() for v in (0.0, 1.0) if bool((label == v).any())), bce.sum() * 0.0) / 2

    # ----------------------------------------------------------------------------------------
    # fit
    # ----------------------------------------------------------------------------------------
    def fit(
        self,
        edits: EditSet,
        config: TrainConfig | None = None,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = True,
        progress: bool = True,
        precompute_batch_size: int = 256,
        on_conflict: str = "error",
    ) -> list[dict[str, float]]:
        """Train the generator on ``edits`` (the base model stays frozen).

        Args:
            edits: the edit set (non-empty; same subject + same prompt with different targets is
                rejected as a conflict; different facts about one subject share one KB).
            config: training recipe; defaults to the registered model's.
            checkpoint_dir: if given, the editor is saved there after every epoch (atomically), and
                ``resume=True`` continues from the last saved epoch when it holds the same edits.
            progress: show tqdm bars.
            precompute_batch_size: sequences per batch of the one-time layer-L and reference passes
                (length-sorted; 256 made the 1,000-edit precompute 35.5 -> 26.4-28.4 s against 64, two runs).
            on_conflict: ``"error"`` (default) rejects the same subject + prompt with two different
                targets; ``"first"`` keeps the first such edit and drops the later ones (CounterFact
                has 79 such pairs in its first 10,000 records), recorded in ``self.dropped``.

        Returns:
            The per-epoch history: ``epoch, loss, edit, equiv, loc, lr, seconds``.
        """
        cfg = config or _registered_defaults(self.model)[1]
        self.train_config = cfg
        set_seed(cfg.seed)
        # a fresh generator, initialised under the seed: fit() is reproducible and never continues
        # a previous fit by accident (resuming is explicit, through checkpoint_dir)
        self.generator = make_generator(self.config.generator, self.d, self.config.mlp_ratio).to(model_device(self.model))
        t0 = time.perf_counter()
        if on_conflict not in ("error", "first"):
            raise ValueError(f"on_conflict must be 'error' or 'first', got {on_conflict!r}")
        self.dropped: list[int] = []
        if on_conflict == "first":
            edits, self.dropped = drop_conflicts(edits)
        self._set_edits(edits, cfg)
        per_edit, seqs, skipped = self._build_sequences(edits, cfg)
        if self.generator.has_gate:
            self._gate_examples(edits, seqs, cfg)
        cache = self._precompute(seqs, cfg, precompute_batch_size, progress)
        release_memory()  # the precompute's transient tensors: return them to the OS before training
        self.precompute_seconds = time.perf_counter() - t0
        self.skipped = skipped

        batches = _length_batches(per_edit, seqs, cfg.batch_size)
        steps_total = len(batches) * cfg.epochs
        opt = torch.optim.AdamW(self.generator.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / max(1, steps_total)))
        self.history, start_epoch, best, bad = [], 0, math.inf, 0
        if checkpoint_dir is not None and resume:
            state = self._try_resume(checkpoint_dir, opt, sched)
            if state is not None:
                start_epoch, best, bad = state["epoch"], state["best"], state["bad_epochs"]
        if start_epoch == 0 and self.generator.has_gate and cfg.gate_steps > 0:
            self._warm_gate(cache, seqs, cfg)
        rng = random.Random(cfg.seed)
        for _ in range(start_epoch):  # replay the shuffles of finished epochs: same order as uninterrupted
            rng.shuffle(batches)
        self.generator.train()
        with self._upper_pass(cfg):
            self._train_epochs(cache, seqs, batches, cfg, opt, sched, rng, start_epoch, best, bad, checkpoint_dir, progress)
        self.generator.eval()
        self._table = None
        self.fit_seconds = time.perf_counter() - t0
        return self.history

    def _train_epochs(self, cache: _Cache, seqs: list[_Seq], batches: list[list[int]], cfg: TrainConfig, opt, sched,
                      rng: random.Random, start_epoch: int, best: float, bad: int,
                      checkpoint_dir: str | os.PathLike | None, progress: bool) -> None:
        """The epoch loop of :meth:`fit` (appends to ``self.history``, checkpoints every epoch)."""
        for epoch in range(start_epoch, cfg.epochs):
            if bad >= cfg.patience:
                break
            te = time.perf_counter()
            rng.shuffle(batches)
            sums = {"total": 0.0, "edit": 0.0, "equiv": 0.0, "loc": 0.0, "after": 0.0, "gate": 0.0}
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
            for batch in bar:
                losses = self._batch_loss(cache, seqs, batch, cfg)
                opt.zero_grad(set_to_none=True)
                losses["total"].backward()
                opt.step()
                sched.step()
                for k in sums:
                    sums[k] += float(losses[k].detach())
                bar.set_postfix(loss=f"{float(losses['total'].detach()):.3f}")
            n = max(1, len(batches))
            rec = {"epoch": epoch + 1, "loss": sums["total"] / n, "edit": sums["edit"] / n, "equiv": sums["equiv"] / n,
                   "loc": sums["loc"] / n, "after": sums["after"] / n, "gate": sums["gate"] / n, "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - te}
            self.history.append(rec)
            if rec["loss"] < best - cfg.min_delta:
                best, bad = rec["loss"], 0
            else:
                bad += 1
            if checkpoint_dir is not None:
                self.save(checkpoint_dir, _train_state={"epoch": epoch + 1, "best": best, "bad_epochs": bad},
                          _optimizer=opt, _scheduler=sched)

    # ----------------------------------------------------------------------------------------
    # Applying the edits
    # ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def kb_table(self) -> torch.Tensor:
        """Generator output for every subject, ``[n_subjects, d]`` (cached until the next fit)."""
        self._require_fitted()
        if self._table is None:
            self.generator.eval()
            self._table = self.generator.table(self.features.to(model_device(self.model))).detach()
        return self._table

    def _require_fitted(self) -> None:
        if self.features is None or self.scope is None:
            raise RuntimeError("this editor has no edits yet: call fit(edits) or LKSEditor.load(path, model, tok)")

    def _piece(self, tok_id: int) -> str:
        """Surface text of one token id (with its leading space), cached."""
        p = self._pieces.get(tok_id)
        if p is None:
            tk = self.tokenizer
            if not hasattr(self, "_special_ids"):
                self._special_ids = set(tk.all_special_ids)
            if tok_id in self._special_ids:
                p = ""
            else:
                # decode after an anchor token so a leading space is not stripped (SentencePiece)
                anchor = tk.convert_tokens_to_ids(tk.tokenize("a"))[-1:]
                p = tk.decode(anchor + [tok_id])[len(tk.decode(anchor)):]
            self._pieces[tok_id] = p
        return p

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[list[int], list[int], list[int]]:
        """Scope detection on token ids: ``(rows, positions, subject ids)`` of routed rows."""
        assert self.scope is not None
        rows, positions, subjects = [], [], []
        ids = input_ids.tolist()
        mask = attention_mask.tolist() if attention_mask is not None else None
        for r, row in enumerate(ids):
            keep = [j for j in range(len(row)) if mask is None or mask[r][j]]
            pieces = [self._piece(row[j]) for j in keep]
            text = "".join(pieces)
            split_chars = "\ufffd" in text  # a character split across byte-level tokens ("é" = 2 tokens)
            if split_chars:
                text = self.tokenizer.decode([row[j] for j in keep], skip_special_tokens=True)
            m = self.scope.find(text)
            if m is None:
                continue
            pos = self._token_at_char(row, keep, pieces, m.end - 1, split_chars)
            if pos is not None:
                rows.append(r)
                positions.append(pos)
                subjects.append(m.index)
        return rows, positions, subjects

    def _token_at_char(self, row: list[int], keep: list[int], pieces: list[str], char: int, split_chars: bool) -> int | None:
        """Position of the token whose text contains character ``char`` of the row's text."""
        if not split_chars:
            acc = 0
            for k, p in zip(keep, pieces):
                acc += len(p)
                if acc > char:
                    return k
            return None
        # rare (non-ASCII subjects on byte-level tokenizers): decode growing prefixes of the row,
        # a dangling partial character (U+FFFD at the end) does not count yet
        for n, k in enumerate(keep, start=1):
            if len(self.tokenizer.decode([row[j] for j in keep[:n]], skip_special_tokens=True).rstrip("\ufffd")) > char:
                return k
        return None

    @contextmanager
    def applied(self, model: nn.Module | None = None) -> Iterator[ApplyStats]:
        """Inside the block, every forward / generate call on token ids sees the edits.

        Each batch row is routed separately: rows that mention an edited subject get its new
        knowledge block at the subject's last token; other rows run unedited. Yields an
        :class:`ApplyStats` with counters. Calls made with ``inputs_embeds`` cannot be routed and
        run unedited.
        """
        model = model if model is not None else self.model
        table = self.kb_table()
        stats = ApplyStats()
        combine = self.generator.combine

        def replacer(input_ids, attention_mask):
            stats.calls += 1
            if input_ids is None:
                return None
            stats.rows_seen += int(input_ids.shape[0])
            rows, pos, subj = self.route(input_ids, attention_mask)
            stats.rows_routed += len(rows)
            if not rows:
                return None
            dev = input_ids.device
            return Replacement(torch.tensor(rows, device=dev), torch.tensor(pos, device=dev),
                               table[torch.tensor(subj, device=table.device)], combine=combine)

        with LayerHooks(model, edit_layer=self.config.layer, replacer=replacer):
            yield stats

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 20, edited: bool = True,
                 batch_size: int = 16, **gen_kwargs: Any) -> list[str]:
        """Greedy continuations of ``prompts`` (edited by default), without the prompt text."""
        out: list[str] = []
        dev = model_device(self.model)
        for i in range(0, len(prompts), batch_size):
            enc = self.tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                                 padding_side="left").to(dev)
            enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
            kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": self.tokenizer.pad_token_id,
                  **gen_kwargs}
            if edited:
                with self.applied(self.model):
                    seq = self.model.generate(**enc, **kw)
            else:
                seq = self.model.generate(**enc, **kw)
            out += self.tokenizer.batch_decode(seq[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    # ----------------------------------------------------------------------------------------
    # Save / load
    # ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, _train_state: dict | None = None, _optimizer=None, _scheduler=None) -> Path:
        """Save to a directory: ``config.json``, ``generator.safetensors``, ``scope.safetensors``,
        ``subjects.json`` (and ``train_state.*`` for resuming). The write is atomic: a crash
        mid-save leaves the previous save intact."""
        from safetensors.torch import save_file

        self._require_fitted()
        import transformers

        import lks

        path = Path(path)
        cfg = {
            "format_version": FORMAT_VERSION,
            "lks_version": lks.__version__,
            "model": {"name": getattr(self.model, "lks_name", ""), "hidden_size": self.d,
                      "num_layers": len(get_layers(self.model)), "class": type(self.model).__name__},
            "editor": dataclasses.asdict(self.config),
            "train": dataclasses.asdict(self.train_config) if self.train_config else None,
            "n_edits": self.n_edits,
            "n_subjects": len(self.subjects),
            "data_checksum": self.data_checksum,
            "history": self.history,
            "precision_used": self.precision_used,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        with atomic_dir(path) as tmp:
            write_json(tmp / "config.json", cfg)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.generator.state_dict().items()},
                      str(tmp / "generator.safetensors"))
            save_file({"features": self.features.detach().cpu().contiguous()}, str(tmp / "scope.safetensors"))
            write_json(tmp / "subjects.json", {"subjects": self.subjects, "feature_texts": self.feature_texts})
            if _train_state is not None and _optimizer is not None:
                tensors, meta = _optimizer_to_flat(_optimizer)
                save_file(tensors, str(tmp / "train_state.safetensors"))
                write_json(tmp / "train_state.json", {**_train_state, "optimizer": meta,
                                                      "scheduler": _scheduler.state_dict() if _scheduler else None})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, tokenizer: Any) -> LKSEditor:
        """Load a saved editor for ``model``; fails clearly if it was made for another model or a
        file is missing or corrupt."""
        path = Path(path)
        cfg = _read_json(path / "config.json")
        want, have = cfg.get("model", {}), {"hidden_size": int(model.config.hidden_size),
                                            "num_layers": len(get_layers(model)),
                                            "name": getattr(model, "lks_name", "")}
        if want.get("hidden_size") != have["hidden_size"] or want.get("num_layers") != have["num_layers"]:
            raise ValueError(f"checkpoint {path} was made for model {want.get('name')!r} (hidden {want.get('hidden_size')}, "
                             f"{want.get('num_layers')} layers), not for {have['name']!r} (hidden {have['hidden_size']}, "
                             f"{have['num_layers']} layers)")
        if want.get("name") and have["name"] and want["name"] != have["name"]:
            raise ValueError(f"checkpoint {path} was made for model {want['name']!r}, but the model given is "
                             f"{have['name']!r}")
        editor = cls(model, tokenizer, from_dict(EditorConfig, cfg["editor"], f"{path}/config.json:editor"))
        editor.generator.load_state_dict(_read_tensors(path / "generator.safetensors"))
        editor.generator.to(model_device(model)).eval()
        subj = _read_json(path / "subjects.json")
        editor.subjects, editor.feature_texts = subj["subjects"], subj["feature_texts"]
        editor.features = _read_tensors(path / "scope.safetensors")["features"].to(model_device(model))
        if editor.features.shape != (len(editor.subjects), editor.d):
            raise ValueError(f"corrupt checkpoint {path}: {len(editor.subjects)} subjects but features of shape "
                             f"{tuple(editor.features.shape)}")
        editor.scope = ScopeIndicator(editor.subjects, fuzzy_threshold=editor.config.fuzzy_threshold)
        editor.train_config = from_dict(TrainConfig, cfg["train"], "train") if cfg.get("train") else None
        editor.history, editor.data_checksum, editor.n_edits = cfg.get("history", []), cfg.get("data_checksum", ""), cfg.get("n_edits", 0)
        return editor

    def _try_resume(self, path: str | os.PathLike, opt, sched) -> dict | None:
        path = Path(path)
        if not (path / "train_state.json").is_file():
            return None
        cfg = _read_json(path / "config.json")
        if cfg.get("data_checksum") != self.data_checksum or cfg.get("train") != dataclasses.asdict(self.train_config):
            raise ValueError(f"checkpoint {path} holds a run on other edits or another training config; "
                             "use another checkpoint_dir or resume=False")
        state = _read_json(path / "train_state.json")
        self.generator.load_state_dict(_read_tensors(path / "generator.safetensors"))
        _optimizer_from_flat(opt, _read_tensors(path / "train_state.safetensors"), state["optimizer"])
        if state.get("scheduler"):
            sched.load_state_dict(state["scheduler"])
        self.history = list(cfg.get("history", []))
        return state


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def topk_kl(ref_logp: torch.Tensor, ref_idx: torch.Tensor, ref_tail: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(reference || edited) over rows, with the reference kept as top-k + one tail bucket.

    The reference distribution is coarse-grained to its top-k tokens plus one bucket holding the
    rest of the mass; the edited distribution is coarse-grained the same way. This is the exact KL
    between the two coarse-grained distributions (a lower bound of the full KL, equal to it when
    k = vocab size), and needs ``k`` floats per position instead of the whole vocabulary.

    Args:
        ref_logp: ``[n, k]`` reference log-probs of its top-k tokens.
        ref_idx: ``[n, k]`` those token ids.
        ref_tail: ``[n]`` log of the reference's remaining mass (``-inf`` when k = vocab).
        logits: ``[n, vocab]`` edited logits.
    """
    logits = logits.float()
    # no [n, vocab] log-softmax: one logsumexp over the vocabulary, the rest on [n, k]. The edited
    # tail is log(1 - top-k mass), via expm1 (accurate until the tail falls below ~1e-6, where its
    # KL term is negligible), floored at 1e-12 so that a vanishing tail stays finite
    lq_top = logits.gather(-1, ref_idx) - logits.logsumexp(-1, keepdim=True)
    lq_tail = torch.log((-torch.expm1(lq_top.logsumexp(-1))).clamp_min(1e-12))
    p_top, p_tail = ref_logp.exp(), ref_tail.exp()
    kl = (p_top * (ref_logp - lq_top)).sum(-1)
    kl = kl + torch.where(p_tail > 0, p_tail * (ref_tail - lq_tail), torch.zeros_like(p_tail))
    return kl.mean()


def _log_tail(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``idx``: ``[n]`` (``-inf`` when nothing is left)."""
    return logp.scatter(-1, idx, float("-inf")).logsumexp(-1)


def _pad(seqs: list[list[int]], pad_id: int, device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (``left``: left-pad, for generation) token lists: ``(ids [b, T], attention_mask [b, T])``."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _bank(cfg: TrainConfig) -> dict[str, dict[str, int]] | None:
    """The paraphrase bank when ``cfg`` trains bank paraphrases, else None."""
    return paraphrase_templates() if cfg.para_per_edit and cfg.w_equiv > 0 else None


def _equiv_prompts(record: EditRecord, cfg: TrainConfig, bank: dict[str, dict[str, int]] | None) -> list[str]:
    """The equivalence loss's prompts of an edit: its own first rephrase (unless held out), then
    phrasings of its relation from the bank; none when the loss is off."""
    if cfg.w_equiv <= 0:
        return []
    return [*record.rephrases[:int(cfg.train_rephrase)], *training_paraphrase_prompts(record, cfg.para_per_edit, bank)]


class _RowsOf:
    """Generated blocks of some subjects, indexable by global subject id like the full table."""

    def __init__(self, rows: torch.Tensor, subjects: list[int]) -> None:
        self.rows = rows
        self.where = {s: i for i, s in enumerate(subjects)}

    def __getitem__(self, subj: torch.Tensor) -> torch.Tensor:
        return self.rows[torch.tensor([self.where[int(s)] for s in subj.tolist()], device=self.rows.device)]


def _starts(lengths: Iterable[int]) -> tuple[list[int], int]:
    """Start offsets of consecutive blocks of the given lengths in one packed tensor, and the total."""
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += n
    return starts, total


# Padding quanta of the fast path's shapes: (batch rows, suffix tokens, prefix tokens, logit rows).
# oneDNN (bf16 on CPU) builds and caches a primitive per distinct matmul shape; a new shape costs
# ~3x a cached one, and its cache holds 1,024, so unquantised step shapes (a new row count almost
# every step at 1,000+ edits) keep missing it. Padding costs a few % more FLOPs (benchmarks/); in
# float32 (no per-shape kernels) that is all it does, so LKSEditor.quantize_shapes pads only bf16 on CPU.
SHAPE_QUANTA = (8, 2, 4, 32)


def _round_up(n: int, q: int) -> int:
    return -(-n // q) * q


def quantized_shape(rows: int, suffix: int, prefix: int, quanta: Sequence[int] | None = None) -> tuple[int, int, int]:
    """A block's (rows, suffix tokens, prefix tokens) padded up to ``quanta`` (default ``SHAPE_QUANTA``)."""
    q = SHAPE_QUANTA if quanta is None else quanta
    return _round_up(rows, q[0]), _round_up(suffix, q[1]), _round_up(prefix, q[2])


HEAD_CHUNK = 64     # loss rows per output-layer chunk in training (lks.headloss); 64, 128 and 256 timed alike
TRIM_EVERY = 4      # precompute batches between two heap trims (lks.utils.release_memory)
LENGTH_BUCKETS = 2  # blocks per training step (see _batch_loss): fewer, longer op chains; 2 was fastest of 1-4 (benchmarks/README)


def length_buckets(lens: Sequence[int], k: int) -> list[int]:
    """End indices of at most ``k`` contiguous buckets of the SORTED ``lens`` that minimise the
    padded token count (sum over buckets of size x longest length); exact dynamic programme."""
    n = len(lens)
    if n == 0:
        return []
    # cost[u][e]: least padded tokens of lens[:e] in u buckets; cut[u][e]: start of the last bucket
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0
    for u in range(1, k + 1):
        for e in range(1, n + 1):
            for b in range(u - 1, e):
                c = cost[u - 1][b] + lens[e - 1] * (e - b)
                if c < cost[u][e]:
                    cost[u][e], cut[u][e] = c, b
    u = min(range(1, k + 1), key=lambda v: (cost[v][n], v))
    ends, e = [], n
    while e > 0:
        ends.append(e)
        e, u = cut[u][e], u - 1
    return ends[::-1]


def step_blocks(seqs: Sequence[_Seq], batch: Iterable[int], prefix_cache: bool,
                buckets: int | None = None) -> list[list[int]]:
    """The blocks in which a training step runs ``batch`` through the upper layers: its sequences
    sorted by the tokens they send there (from the subject on with the prefix cache, else all),
    cut into at most ``buckets`` (default ``LENGTH_BUCKETS``) blocks with the least padding
    (:func:`length_buckets`)."""
    def run_len(j: int) -> int:
        return len(seqs[j].ids) - (seqs[j].subj_pos if prefix_cache else 0)

    order = sorted(batch, key=lambda j: (run_len(j), seqs[j].subj_pos))
    blocks, start = [], 0
    for end in length_buckets([run_len(j) for j in order], LENGTH_BUCKETS if buckets is None else buckets):
        blocks.append(order[start:end])
        start = end
    return blocks


def _length_batches(per_edit: list[list[int]], seqs: list[_Seq], batch_size: int) -> list[list[int]]:
    """Group edits of similar length into batches (less padding); each batch lists sequence ids."""
    order = sorted((i for i in range(len(per_edit)) if per_edit[i]),
                   key=lambda i: max(len(seqs[j].ids) for j in per_edit[i]))
    return [[j for i in order[b:b + batch_size] for j in per_edit[i]] for b in range(0, len(order), batch_size)]


def drop_conflicts(edits: EditSet) -> tuple[EditSet, list[int]]:
    """Keep the first edit of each (subject, prompt) and drop later ones with another target."""
    seen: dict[tuple[str, str], str] = {}
    keep, dropped = [], []
    for i, r in enumerate(edits):
        key = (r.subject, r.prompt.strip().lower())
        if key in seen and seen[key] != r.target:
            dropped.append(i)
            continue
        seen.setdefault(key, r.target)
        keep.append(r)
    return EditSet(keep, name=edits.name), dropped


def _check_conflicts(edits: EditSet) -> None:
    """Rule: the same subject with the same prompt and a different target is a conflict."""
    seen: dict[tuple[str, str], str] = {}
    for r in edits:
        key = (r.subject, r.prompt.strip().lower())
        if key in seen and seen[key] != r.target:
            raise ValueError(f"conflicting edits for subject {r.subject!r}: prompt {r.prompt!r} has targets "
                             f"{seen[key]!r} and {r.target!r}; keep one of them")
        seen[key] = r.target


def _registered_defaults(model: nn.Module) -> tuple[EditorConfig, TrainConfig]:
    from lks.config import model_spec, registered_models

    name = getattr(model, "lks_name", "")
    if name in registered_models():
        spec = model_spec(name)
        return spec.editor, spec.train
    n = len(get_layers(model))
    return EditorConfig(layer=min(n - 1, (2 * n) // 3)), TrainConfig()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt checkpoint file {path}: {e}") from e


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated headers/data
        raise ValueError(f"corrupt checkpoint file {path} (truncated or not safetensors): {e}") from e


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = []
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
            meta["state"][str(pid)].append(k)
    return tensors, meta


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {int(pid): {k: tensors[f"{pid}.{k}"] for k in keys} for pid, keys in meta["state"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
