"""The fast path of training: the hooked forward pass, reorganised so that a step runs little.

1. every training sequence is run once through layers ``0..L`` (stopping there) and its layer-L
   output is cached (:meth:`FastPath.precompute`; with ``TrainConfig.prefix_cache`` from the
   subject's last token on, all a step reads);
2. in the same batches, the reference (unedited) next-token distributions at the KL positions are
   computed once from those states and kept as top-k log-probs plus one tail bucket; with
   ``TrainConfig.prefix_cache`` the upper layers' keys/values of the tokens before each subject
   are cached too (an edit at the subject's last token cannot change them: attention is causal);
3. each step writes the generated blocks into the cached states and runs only layers ``L+1..N``
   (:meth:`FastPath.upper_hidden`, ``lks.models.skip_lower_layers``), with the output layer only
   where a loss reads it.

``tests/test_editor.py`` proves the fast path's logits equal the plain hooked forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lks.config import TrainConfig
from lks.headloss import pad_rows
from lks.hooks import LayerHooks, Replacement, apply_replacement, input_embeds, layer_output
from lks.models import (
    get_layers,
    lower_layers_dtype,
    model_device,
    skip_lower_layers,
    upper_layers_dtype,
    upper_modules,
)
from lks.rmsnorm import lean_norms
from lks.suffix import PrefixKV, suffix_forward, suffix_positions, upper_keys_values
from lks.training import precision
from lks.training.precision import TRIM_EVERY, fit_dtype, pads_shapes, quantized_shape
from lks.training.sequences import Seq
from lks.utils import length_batches, pad_ids, page_out, release_memory, starts

# one batch's references: top-k log-probs, their token ids (token_id_dtype), log tail mass, and the sequences
# whose KL rows they are, in order (FastPath.references)
References = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]
# KL rows whose logits a reference pass holds at once: 2,048 rows (a batch of 256 sequences with
# 8 KL rows each) made two [rows, 49,152] float32 tensors of 403 MB, the precompute's highest
# transient; 256 rows make them 50 MB
REF_CHUNK = 256
LENGTH_BUCKETS = 2  # blocks per training step (see step_blocks): fewer, longer op chains; 2 was fastest of 1-4 (benchmarks/README)


@dataclass
class Cache:
    """Layer-L states of all training sequences (each from ``first[j]`` on), packed as one ``[sum T, d]``
    tensor (:meth:`at` reads them), and what the KL losses and the prefix cache need."""

    states: torch.Tensor          # [sum_len, d]
    offsets: list[int]            # start of sequence i in ``states``
    first: list[int]              # first position kept of sequence i (its subject's last token with
                                  # the prefix cache, else 0): ``states`` hold positions first[i]..
    ref_logp: torch.Tensor | None = None   # [n_kl_rows, k] reference log-probs (top-k)
    ref_idx: torch.Tensor | None = None    # [n_kl_rows, k] their token ids
    ref_tail: torch.Tensor | None = None   # [n_kl_rows] log of the remaining probability mass
    ref_row: dict[int, int] = field(default_factory=dict)  # sequence index -> its first row in ref_*
    # TrainConfig.prefix_cache: keys/values of layers L+1..N at the tokens before each subject's last
    # token, one row per distinct token prefix; training then runs only each sequence's suffix
    prefix: PrefixKV | None = None
    _n_ref: int = 0  # rows reserved by plan_references

    def at(self, j: int, pos: int, n: int = 1) -> torch.Tensor:
        """Layer-L states ``[n, d]`` of sequence ``j`` at positions ``pos..pos+n-1`` (``pos >= first[j]``)."""
        o = self.offsets[j] + pos - self.first[j]
        return self.states[o:o + n]

    def plan_references(self, seqs: Sequence[Seq], kl: Iterable[int]) -> None:
        """Reserve the reference rows of the sequences ``kl``: ``len(loss_pos) - len(loss_tgt)``
        each (a continuation cut by an end-of-sequence token leaves its last ones unused)."""
        n = 0
        for j in sorted(kl):
            self.ref_row[j], n = n, n + len(seqs[j].loss_pos) - len(seqs[j].loss_tgt)
        self._n_ref = n

    def put_references(self, seqs: Sequence[Seq], got: References | None) -> None:
        """Write one batch's references (:meth:`FastPath.references`) into their reserved rows, in
        place: the reference tensors exist once, never as per-batch pieces and a concatenation
        (10,000 zsRE edits: 791 MiB)."""
        if got is None:
            return
        top, ids, tail, lbatch = got
        if self.ref_logp is None:  # unused rows stay zero
            self.ref_logp = top.new_zeros(self._n_ref, top.shape[1])
            self.ref_idx = ids.new_zeros(self._n_ref, ids.shape[1])
            self.ref_tail = tail.new_zeros(self._n_ref)
        assert self.ref_idx is not None and self.ref_tail is not None
        at = 0
        for j in lbatch:
            r, n = self.ref_row[j], len(seqs[j].loss_pos) - len(seqs[j].loss_tgt)
            self.ref_logp[r:r + n], self.ref_idx[r:r + n], self.ref_tail[r:r + n] = (
                top[at:at + n], ids[at:at + n], tail[at:at + n])
            at += n


class FastPath:
    """Layer-L passes, the cache, and the upper-layer pass of one model at one edit layer.

    Args:
        model: the frozen causal LM.
        tokenizer: its tokenizer (pad token set).
        layer: the edit layer L (decoder layer whose output holds the knowledge block).
        quantize_shapes: pad step shapes to ``SHAPE_QUANTA``; None (default) where it pays, i.e.
            bfloat16 on CPU (oneDNN's per-shape kernels); in float32 padding only costs (~15%).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, layer: int, quantize_shapes: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.d = int(model.config.hidden_size)
        self.quantize_shapes = quantize_shapes
        self.lm_weight: torch.Tensor | None = None  # bfloat16 copy of the output embedding (upper_pass)
        self.as_tuple = False                        # whether decoder layers return tuples (seen by the first lower pass)

    # ---- precision of a fit's passes ------------------------------------------------------------
    @contextmanager
    def lower_pass(self, precision: str) -> Iterator[None]:
        """Precision of the one-time layer-L passes (precompute, features, gate examples): in bfloat16
        the cached states carry bfloat16 rounding, like the upper pass. The feature vectors run in it
        too: computed once and stored with the editor, so inference reads the very vectors training
        saw (1,000 CounterFact subjects: within 1.1% of the float32 vectors on average, 4.5% at most,
        relative L2)."""
        if fit_dtype(self.model, precision) is None:
            yield
            return
        with lower_layers_dtype(self.model, self.layer, torch.bfloat16, attn_implementation="eager"):
            yield

    @contextmanager
    def upper_pass(self, precision: str, page_out_idle: bool = False) -> Iterator[None]:
        """Precision of the upper pass for one fit.

        bfloat16 on a float32 model: layers L+1..N and the final norm hold bfloat16 weights inside the
        block (:func:`lks.models.upper_layers_dtype`, originals restored on exit), eager attention, and
        a bfloat16 copy of the output embedding for the logits (it may be tied to the input embedding,
        which the block must not change). Losses stay in float32.

        ``page_out_idle`` (the epochs): the weights the steps never read leave memory until something
        reads them again (:func:`lks.utils.page_out`): layers 0..L, whose output the cache holds, and in
        bfloat16 the output embedding (the steps read its copy; the upper layers' float32 originals
        are paged out by ``upper_layers_dtype``).
        """
        bf16 = fit_dtype(self.model, precision) is not None
        head = self.model.get_output_embeddings().weight
        if page_out_idle:  # the copy below is taken first: it reads the embedding
            lower = [p.data for layer in list(get_layers(self.model))[:self.layer + 1] for p in layer.parameters()]
        try:
            self.lm_weight = head.detach().to(torch.bfloat16) if bf16 else None
            if page_out_idle:
                page_out(lower + ([head.data] if bf16 else []))
                del lower
            if not bf16:
                yield
                return
            with upper_layers_dtype(self.model, self.layer, torch.bfloat16, attn_implementation="eager"):
                yield
        finally:
            self.lm_weight = None

    # ---- layers 0..L -------------------------------------------------------------------------
    def run_to_layer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Layer-L output ``[batch, seq, d]``; the layers above L are never run (:func:`lks.hooks.layer_output`)."""
        hidden, self.as_tuple = layer_output(self.model, input_ids, attention_mask, self.layer)
        return hidden

    def lower_batches(self, ids: Sequence[list[int]], batch_size: int, desc: str | None = None
                      ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Layer-L outputs of token lists in order of length (batches of similar lengths carry
        little padding): yields ``(indices into ids, states [b, T, d], mask [b, T])``; ``desc``
        shows a progress bar. The glibc heap is trimmed every ``TRIM_EVERY`` batches."""
        dev = model_device(self.model)
        for k, idx in enumerate(tqdm(length_batches([len(x) for x in ids], batch_size), desc=desc, disable=desc is None)):
            x, mask = pad_ids([ids[i] for i in idx], self.tokenizer.pad_token_id, dev)
            yield idx, self.run_to_layer(x, mask), mask
            if k % TRIM_EVERY == TRIM_EVERY - 1:
                release_memory(collect=False)  # see lks.utils.release_memory

    @torch.no_grad()  # not inference_mode: these tensors are inputs of training steps later
    def states_at_last_token(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Layer-L output at the last real token of each text: ``[n, d]`` float32.

        The texts run in order of token length (1,000 CounterFact feature texts: 11.6 -> 6.8 s,
        same values up to float rounding)."""
        out = torch.empty(len(texts), self.d)
        for idx, states, mask in self.lower_batches(self.tokenizer(list(texts))["input_ids"], batch_size):
            last = mask.sum(1) - 1
            out[torch.tensor(idx)] = states[torch.arange(len(idx), device=states.device), last].float().cpu()
        return out.to(model_device(self.model))

    # ---- the one-time cache ------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: the cache feeds autograd-tracked training steps
    def precompute(self, seqs: list[Seq], cfg: TrainConfig, batch_size: int = 256, progress: bool = True) -> Cache:
        """Cache layer-L states of every sequence and the reference distributions at its KL rows.

        Each length-sorted batch runs layers ``0..L``, then at once layers ``L+1..N`` on those states
        (no edit): the reference distributions at the KL rows (locality sequences; after the target
        with ``TrainConfig.w_after``) and, with ``prefix_cache``, the keys/values of every sequence's
        prefix. With the prefix cache the steps never read a layer-L state before the subject's last
        token, so only the states from there on are kept (10,000 CounterFact edits: 46% of the tokens).
        Sequences with a pending continuation (``Seq.to_continue``) are extended here, in the same
        pass (:func:`continue_and_cache`)."""
        # (no upper layers when L is the last layer: nothing to cache)
        prefix_cache = cfg.prefix_cache and self.layer + 1 < len(get_layers(self.model))
        first = [s.subj_pos if prefix_cache else 0 for s in seqs]
        # room for each pending continuation (Seq.to_continue): generated in this pass, see continue_and_cache
        offsets, total = starts(len(s.ids) + s.to_continue - f for s, f in zip(seqs, first))
        # filled in place: one [sum T, d] tensor, never a second copy, in the lower pass's dtype
        # (bfloat16 halves the largest cache; the values are bf16 anyway)
        cache = Cache(torch.zeros(total, self.d, dtype=fit_dtype(self.model, cfg.precision) or torch.float32), offsets, first)
        loc = {j for j, s in enumerate(seqs) if len(s.loss_pos) > len(s.loss_tgt)}
        cache.prefix = PrefixKV.plan([s.ids for s in seqs], [s.subj_pos for s in seqs]) if prefix_cache else None
        cache.plan_references(seqs, loc)
        todo = [j for j, s in enumerate(seqs) if s.to_continue]
        done = [j for j, s in enumerate(seqs) if not s.to_continue]
        # the upper pass in the precision of the training steps: KL 0 for an unchanged block
        with self.lower_pass(cfg.precision), self.upper_pass(cfg.precision):
            for sub, states, _ in self.lower_batches([seqs[j].ids for j in done], batch_size,
                                                     "layer-L states, references" if progress else None):
                idx = [done[i] for i in sub]
                for row, j in enumerate(idx):
                    cache.states[offsets[j]:offsets[j] + len(seqs[j].ids) - first[j]] = states[row, first[j]:len(seqs[j].ids)].cpu()
                rows = [r for r, j in enumerate(idx) if prefix_cache or j in loc]
                if rows:
                    batch = [idx[r] for r in rows]
                    lower = states if len(rows) == len(idx) else states[rows]  # (all of it with the prefix cache)
                    hidden = self.upper_hidden(cache, seqs, batch, None, kv_out=cache.prefix, lower=lower)
                    cache.put_references(seqs, self.references(hidden, seqs, batch, loc, cfg.loc_topk))
            if todo:
                continue_and_cache(self, cache, seqs, todo, batch_size, cfg.loc_topk)
        return cache

    def references(self, hidden: torch.Tensor, seqs: list[Seq], batch: list[int], loc: set[int], topk: int
                   ) -> References | None:
        """The unedited top-k log-probs, their token ids and the tail of the KL rows of ``batch``'s
        sequences in ``loc`` (``hidden``: the upper pass's rows), and those sequences in order;
        None when none of them has a KL row."""
        at, rows, lbatch = 0, [], []
        for j in batch:
            n, n_nll = len(seqs[j].loss_pos), len(seqs[j].loss_tgt)
            if j in loc:
                rows.extend(range(at + n_nll, at + n))
                lbatch.append(j)
            at += n
        if not rows:
            return None
        tops, ids, tails = [], [], []
        for a in range(0, len(rows), REF_CHUNK):  # vocabulary-sized rows only REF_CHUNK at a time
            lp = torch.log_softmax(self.logits(hidden[torch.tensor(rows[a:a + REF_CHUNK], device=hidden.device)]), -1)
            top, ti = lp.topk(min(topk, lp.shape[-1]), dim=-1)
            tops.append(top.cpu())
            ids.append(ti.to(token_id_dtype(lp.shape[-1])).cpu())
            tails.append(log_tail(top, lp.shape[-1]).cpu())
        return torch.cat(tops), torch.cat(ids), torch.cat(tails), lbatch

    # ---- layers L+1..N -----------------------------------------------------------------------
    def upper_hidden(self, cache: Cache, seqs: list[Seq], batch: list[int], table: Any, combine: Callable | None = None,
                     kv_out: PrefixKV | None = None, lower: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``[n_positions, d]`` at every ``loss_pos`` of the sequences in ``batch``.

        ``table`` (indexable by subject ids, e.g. ``[n_subjects, d]``; may require grad) holds each
        subject's generated block, written with ``combine`` (the generator's); ``None`` runs the
        unedited model. Layers L+1..N run on the cached layer-L states. When the cache holds prefix
        keys/values, only each sequence's suffix - from the subject's last token on - runs,
        attending to the cached prefix. ``kv_out`` (precompute) receives the prefixes' keys/values
        from a full pass instead, on ``lower``: the batch's layer-L states from position 0
        (right-padded), which the cache no longer holds before the subject.
        """
        dev = model_device(self.model)
        layers = get_layers(self.model)
        L = self.layer
        use_prefix = cache.prefix is not None and kv_out is None
        first = [seqs[j].subj_pos if use_prefix else 0 for j in batch]
        lens = [len(seqs[j].ids) - s0 for j, s0 in zip(batch, first)]
        T, P, B = max(lens), max(first), len(batch)
        if pads_shapes(next(layers[-1].parameters()), self.quantize_shapes):  # few distinct shapes: precision.SHAPE_QUANTA
            B, T, P = quantized_shape(B, T, P)
        # [B, T, d] right-padded copy of the cached states (padding is masked out; rows past the
        # batch are dummies that see one zero token, so no attention row is fully masked)
        h = torch.zeros(B, T, self.d, device=dev)
        mask = torch.zeros(B, P + T, dtype=torch.long, device=dev)
        mask[len(batch):, P] = 1
        for row, (j, s0, n) in enumerate(zip(batch, first, lens)):
            h[row, :n] = (cache.at(j, s0, n) if lower is None else lower[row, s0:s0 + n]).to(dev)
            mask[row, P - s0:P + n] = 1  # prefix left-padded to P, suffix right-padded to T
        first = first + [0] * (B - len(batch))
        if table is not None:
            rows = torch.arange(len(batch), device=dev)
            pos = torch.tensor([seqs[j].subj_pos - s0 for j, s0 in zip(batch, first)], device=dev)
            subj = torch.tensor([seqs[j].subject for j in batch], device=dev)
            h = apply_replacement(h, Replacement(rows, pos, table[subj], combine=combine))
        # the upper layers' own dtype: bfloat16 inside upper_pass when TrainConfig.precision asks
        dtype = next(layers[L + 1].parameters()).dtype if L + 1 < len(layers) else next(self.model.parameters()).dtype
        h = h.to(dtype)
        # the norms keep one input copy for the backward, not a float32 one too (lks.rmsnorm)
        with lean_norms(upper_modules(self.model, L)):
            if use_prefix:
                assert cache.prefix is not None
                kv = cache.prefix.gather(batch, P, B, dtype, dev)
                last = suffix_forward(self.model, L, h, mask, suffix_positions(first, T, dev), kv, self.as_tuple)
            else:
                with skip_lower_layers(self.model, L, h, self.as_tuple):
                    out = self.model.base_model(inputs_embeds=torch.zeros_like(h), attention_mask=mask,
                                                use_cache=kv_out is not None)
                last = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if kv_out is not None:
            kv_out.put(batch, upper_keys_values(out.cache, self.model, L))
        g_rows = torch.tensor([r for r, j in enumerate(batch) for _ in seqs[j].loss_pos], device=dev)
        g_pos = torch.tensor([p - s0 for j, s0 in zip(batch, first) for p in seqs[j].loss_pos], device=dev)
        return last[g_rows, g_pos]

    # ---- the output layer --------------------------------------------------------------------
    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output layer's weight (a bfloat16 copy inside a bfloat16 fit) and bias."""
        out = self.model.get_output_embeddings()
        return (self.lm_weight if self.lm_weight is not None else out.weight), getattr(out, "bias", None)

    def logit_quantum(self) -> int:
        """Logit rows are padded to a multiple of this (0: not padded; see ``precision.SHAPE_QUANTA``)."""
        return precision.logit_quantum(self.head()[0], self.quantize_shapes)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output layer on final hidden rows ``[n, d]`` -> float32 logits ``[n, vocab]``."""
        weight, bias = self.head()
        n = hidden.shape[0]
        hidden = pad_rows(hidden, self.logit_quantum())  # zero rows, sliced off again
        return F.linear(hidden.to(weight.dtype), weight, bias)[:n].float()

    def upper_logits(self, cache: Cache, seqs: list[Seq], batch: list[int], table: Any, combine: Callable | None = None) -> torch.Tensor:
        """Logits ``[n_positions, vocab]`` (float32) at every ``loss_pos`` of the sequences in ``batch``."""
        return self.logits(self.upper_hidden(cache, seqs, batch, table, combine))


@torch.no_grad()
def continue_and_cache(fast: FastPath, cache: Cache, seqs: list[Seq], todo: list[int], batch_size: int,
                       topk: int) -> None:
    """The unedited model's continuation after the target, generated inside the layer-L cache's pass.

    Extends the sequences ``todo`` (each ``to_continue`` > 0) by the unedited model's greedy
    continuation (cut after an end-of-sequence token; KL rows past the end dropped) and fills their
    part of ``cache``: layer-L states from ``cache.first[j]`` on (the caller allocates room for the
    whole continuation), prefix keys/values, references (into the rows :meth:`Cache.plan_references`
    reserved). Call inside the precompute's precision passes.

    Why in the cache's pass: the cache needs the layer-L states, references and prefix keys/values
    of the very tokens the continuation's generation runs the model over, so one pass
    (:func:`greedy_pass`) gives both; before, the continuation was a pass of its own and the cache
    ran a second one over the extended sequences."""
    tok, dev = fast.tokenizer, model_device(fast.model)
    for idx in length_batches([len(seqs[j].ids) for j in todo], batch_size):
        batch = [todo[i] for i in idx]
        put = (lambda kv, batch=batch: cache.prefix.put(batch, kv)) if cache.prefix is not None else None
        tokens, states, finals, lens = greedy_pass(fast, [seqs[j].ids for j in batch],
                                                   max(seqs[j].to_continue for j in batch), put)
        T, hidden = max(lens), []  # the padded width
        for r, j in enumerate(batch):
            q, n0 = seqs[j], lens[r]
            got = tokens[r][:q.to_continue]
            if tok.eos_token_id is not None and tok.eos_token_id in got:
                got = got[:got.index(tok.eos_token_id) + 1]
            q.ids = q.ids + got
            q.loss_pos = q.loss_pos[:len(q.loss_tgt)] + [p for p in q.loss_pos[len(q.loss_tgt):] if p < len(q.ids)]
            q.to_continue = 0
            # position p of row r: column p of the first forward when p < its length n0, else T + (p - n0)
            col = torch.tensor([p if p < n0 else T + p - n0 for p in range(len(q.ids))], device=dev)
            o, f = cache.offsets[j], cache.first[j]
            cache.states[o:o + len(q.ids) - f] = states[r, col[f:]].cpu()
            hidden.append(finals[r, col[torch.tensor(q.loss_pos, device=dev)]])
        cache.put_references(seqs, fast.references(torch.cat(hidden), seqs, batch, set(todo), topk))


def greedy_pass(fast: FastPath, ids: list[list[int]], n: int, put_kv: Callable | None = None
                ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor, list[int]]:
    """The unedited model over token lists (right-padded to ``T``), then ``n`` greedy tokens one at a
    time with a key/value cache: ``(new tokens per row, layer-L outputs [B, T + n, d], final hidden
    states [B, T + n, d], lengths)``. Column ``T + s`` holds step ``s``'s token (fed at its row's
    true position ``length + s``; the padding between stays masked). The greedy tokens come from
    the model's own output layer (float32 logits, as the model generates), not from the bfloat16
    copy the references use: with that copy 864 of 7,663 sequences of 1,000 CounterFact edits
    differed from a float32 fit's, with the model's own 515 (as with the separate continuation pass
    before, 513). ``put_kv`` receives the upper layers' keys/values of the first forward
    (:func:`lks.suffix.upper_keys_values`)."""
    from transformers import DynamicCache

    model, L = fast.model, fast.layer
    dev = model_device(model)
    head = model.get_output_embeddings()  # in the model's dtype: the tokens of float32 logits
    x, mask = pad_ids(ids, fast.tokenizer.pad_token_id, dev)
    lens = mask.sum(1)
    states, finals, new, past = [], [], [], DynamicCache()
    with LayerHooks(model, capture=[L]) as hooks:
        # positions 0..T-1 on every row (right padding), as in the cache's other passes
        out = model.base_model(inputs_embeds=input_embeds(model, x), attention_mask=mask, cache=past, use_cache=True)
        fast.as_tuple = bool(hooks.output_is_tuple)
        if put_kv is not None:
            put_kv(upper_keys_values(past, model, L))
        last, pos = out.last_hidden_state[torch.arange(len(ids), device=dev), lens - 1], lens[:, None]
        for step in range(n + 1):
            states.append(hooks.captured[L])
            finals.append(out.last_hidden_state)
            if step == n:
                break
            new.append(head(last.to(head.weight.dtype)).argmax(-1, keepdim=True))
            mask = torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
            out = model.base_model(inputs_embeds=input_embeds(model, new[-1]), attention_mask=mask, position_ids=pos,
                                   cache=past, use_cache=True)
            last, pos = out.last_hidden_state[:, -1], pos + 1
    tokens = torch.cat(new, 1).tolist() if new else [[] for _ in ids]
    return tokens, torch.cat(states, 1), torch.cat(finals, 1), lens.tolist()


def token_id_dtype(vocab: int) -> torch.dtype:
    """The narrowest dtype that holds every token id of a ``vocab``-way output: uint16 up to 65,536
    (SmolLM2's 49,152, Llama-2's 32,000: the references' ids take half the bytes of int32), else int32."""
    return torch.uint16 if vocab <= 2**16 else torch.int32


def log_tail(top: torch.Tensor, vocab: int) -> torch.Tensor:
    """log of the probability mass outside the top-k log-probs ``top`` ``[n, k]`` of a ``vocab``-way
    distribution: ``[n]`` (``-inf`` when nothing is left, i.e. k = vocab).

    One minus the mass inside, summed in float64 from the ``k`` log-probs: no pass over the
    vocabulary (the complement's logsumexp took 8.7 of the 52 s of the layer-L cache at 1,000
    CounterFact edits). Absolute error about 1e-6 (the float32 log-softmax's normalisation), so a
    tail of mass 1e-5 or less is rough; its term in the KL is of that size."""
    if top.shape[-1] == vocab:  # the whole vocabulary inside (k = vocab in tests): exactly nothing left
        return top.new_full(top.shape[:-1], float("-inf"))
    inside = top.double().exp().sum(-1)
    return torch.log1p(-inside.clamp(max=1.0)).to(top.dtype)


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


def step_blocks(seqs: Sequence[Seq], batch: Iterable[int], prefix_cache: bool,
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
