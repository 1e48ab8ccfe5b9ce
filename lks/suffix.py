"""The suffix pass: the layers above an edit layer over each row's suffix, attending to the
cached keys/values of the tokens before it.

A change written into the output of decoder layer L at a row's token ``p`` cannot reach the
tokens before ``p`` (attention is causal), so their keys/values in layers L+1..N are computed once
and every later pass runs only tokens ``p..`` of each row. LKS's training steps
(:meth:`lks.training.fastpath.FastPath.upper_hidden`, with ``TrainConfig.prefix_cache``) and
MEMIT / AlphaEdit's target optimisation (:func:`lks.baselines.common.suffix_hidden`) both store
the prefixes in a :class:`PrefixKV` (one row per distinct token prefix) and run through
:func:`suffix_forward`. Tests: the suffix pass equals the full pass and shared rows hold what
each sequence computes alone, for both callers (``tests/test_editor.py``, ``tests/test_baselines.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lks.models import get_layers, make_past, past_key_value, skip_lower_layers
from lks.utils import starts

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer above L: keys, values [batch, kv_heads, P, head_dim]


def upper_keys_values(cache: Any, model: nn.Module, layer: int) -> KV:
    """Keys and values of layers ``layer+1..N`` from a transformers cache of a full pass."""
    return [past_key_value(cache, i) for i in range(layer + 1, len(get_layers(model)))]


def suffix_forward(model: nn.Module, layer: int, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                   kv: KV, as_tuple: bool) -> torch.Tensor:
    """Final (normed) hidden states ``[B, T, d]`` of the suffixes.

    Args:
        hidden: ``[B, T, d]`` output of decoder ``layer`` on each row's suffix (right-padded), in
            the upper layers' dtype.
        mask: ``[B, P + T]`` attention mask over the prefix slots (left-padded to ``P``) and the suffix.
        position_ids: ``[B, T]`` the suffix tokens' true positions (rotary embedding).
        kv: the prefixes' keys/values of layers ``layer+1..N`` (:data:`KV`, ``P`` slots each).
        as_tuple: whether the decoder layers return tuples (``lks.hooks.layer_output``).
    """
    B, P = hidden.shape[0], mask.shape[1] - hidden.shape[1]
    k0 = kv[0][0]
    dummy = k0.new_zeros(B, k0.shape[1], P, k0.shape[3])  # layers 0..layer are skipped and never read it
    past = make_past([(dummy, dummy)] * (layer + 1) + list(kv))
    # the suffix fills cache slots P..P+T-1 (the mask's query offset is the cache length P)
    with skip_lower_layers(model, layer, hidden, as_tuple):
        out = model.base_model(inputs_embeds=torch.zeros_like(hidden), attention_mask=mask, cache=past,
                               use_cache=True, position_ids=position_ids)
    return out.last_hidden_state


def prefix_rows(ids: Sequence[Sequence[int]], lengths: Sequence[int]) -> tuple[torch.Tensor, int]:
    """Rows of a prefix store: ``(index, n_rows)``, where ``index[offset_j + t]`` (offsets: the
    running sum of ``lengths``) is the row of token ``t`` of sequence ``j``'s prefix
    ``ids[j][:lengths[j]]``, and two tokens share a row exactly when the token lists up to them
    are equal.

    The keys/values of a token depend only on the tokens up to it (causal attention, positions
    from 0), so such tokens have the same keys/values and one row serves them all. Training
    sequences often begin alike (a subject, a relation template, MEMIT's context prefixes), so far
    fewer rows are needed than prefix tokens (``benchmarks/bench_memory.py`` prints both)."""
    rows: dict[tuple[int, int], int] = {}  # (row of the tokens before, token id) -> row
    index: list[int] = []
    for seq, n in zip(ids, lengths, strict=True):
        row = -1
        for tok in seq[:n]:
            row = rows.setdefault((row, tok), len(rows))
            index.append(row)
    return torch.tensor(index, dtype=torch.long), len(rows)


@dataclass
class PrefixKV:
    """Keys/values of layers ``L+1..N`` at the tokens before each sequence's edited token, one
    stored row per distinct token prefix (:func:`prefix_rows`).

    Sequence ``j``'s prefix tokens are rows ``index[offsets[j]:offsets[j] + lengths[j]]`` of
    ``rows`` (``[n_rows, n_upper, 2, kv_heads, head_dim]``, allocated by the first :meth:`put`).
    """

    index: torch.Tensor
    offsets: list[int]
    lengths: list[int]
    n_rows: int
    rows: torch.Tensor | None = None

    @classmethod
    def plan(cls, ids: Sequence[Sequence[int]], lengths: Sequence[int]) -> PrefixKV:
        """An empty store for the prefixes ``ids[j][:lengths[j]]``."""
        index, n_rows = prefix_rows(ids, lengths)
        return cls(index, starts(lengths)[0], list(lengths), n_rows)

    def put(self, batch: Sequence[int], kv: KV, device: torch.device | str = "cpu") -> None:
        """Store the prefixes of sequences ``batch`` from ``kv``, the upper layers' keys/values of a
        full pass over them (:func:`upper_keys_values`; row ``r`` holds sequence ``batch[r]``,
        right-padded, from position 0)."""
        stacked = torch.stack([torch.stack([k, v]) for k, v in kv])  # [n_upper, 2, B, kv_heads, T, head_dim]
        if self.rows is None:
            n_upper, _, _, n_kv, _, hd = stacked.shape
            self.rows = torch.empty(self.n_rows, n_upper, 2, n_kv, hd, dtype=stacked.dtype, device=device)
        for r, j in enumerate(batch):
            o, p = self.offsets[j], self.lengths[j]
            self.rows[self.index[o:o + p]] = stacked[:, :, r, :, :p].permute(3, 0, 1, 2, 4).to(self.rows.device)

    def gather(self, batch: Sequence[int], P: int, n_slots: int, dtype: torch.dtype,
               device: torch.device | str) -> KV:
        """The prefixes of sequences ``batch`` left-padded to ``P`` slots, as :func:`suffix_forward`
        reads them; ``n_slots`` >= ``len(batch)`` rows in all (the rest: zero keys/values)."""
        assert self.rows is not None, "PrefixKV.gather before put"
        flat = torch.full((n_slots, P), -1, dtype=torch.long)
        for r, j in enumerate(batch):
            o, p = self.offsets[j], self.lengths[j]
            flat[r, P - p:] = self.index[o:o + p]
        flat = flat.to(self.rows.device)
        kv = self.rows.index_select(0, flat.clamp(min=0).flatten()).view(n_slots, P, *self.rows.shape[1:])
        kv = kv.masked_fill((flat < 0)[:, :, None, None, None, None], 0)
        kv = kv.to(device=device, dtype=dtype).permute(2, 3, 0, 4, 1, 5)  # [n_upper, 2, B, kv_heads, P, head_dim]
        return [(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])]

    def nbytes(self) -> int:
        return 0 if self.rows is None else self.rows.numel() * self.rows.element_size()


def suffix_positions(first: Sequence[int], T: int, device: torch.device | str) -> torch.Tensor:
    """``[B, T]`` true positions of suffixes that start at token ``first[b]``."""
    return torch.tensor(list(first), device=device)[:, None] + torch.arange(T, device=device)[None, :]
