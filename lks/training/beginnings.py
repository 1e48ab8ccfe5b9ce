"""Layer-L states at the last token of many token lists whose beginnings repeat.

The gate examples (:func:`lks.training.gate.gate_examples`) are prompts cut after their subject:
thousands begin "The native language of", five begin with the same statement of another edit. A
token's keys/values depend only on the tokens up to it (causal attention), so each list is split
after the longest beginning it shares with another list; each distinct beginning runs once through
layers 0..L with its keys/values kept (a :class:`lks.suffix.PrefixKV`, one row per distinct token
prefix), and each list runs only its remaining tokens against them. On the gate examples of 1,000
edits this runs about half of the tokens (CounterFact 0.51, zsRE 0.58; docs/experiments.md).
``tests/test_editor.py`` checks the states against a plain pass of each list alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lks.hooks import layer_output
from lks.models import make_past, model_device, past_key_value
from lks.suffix import PrefixKV, suffix_positions
from lks.utils import length_batches, pad_ids, release_memory

CHUNK = 4096  # lists per store (in sorted order): its rows stay small (~16 KB each on SmolLM2 in bfloat16)


def shared_lengths(seqs: Sequence[Sequence[int]]) -> list[int]:
    """For token lists in sorted order: the length of the longest beginning each shares with
    another list (its sorted neighbours hold it), at most its length - 1 (its last token runs)."""
    def common(a: Sequence[int], b: Sequence[int]) -> int:
        k, n = 0, min(len(a), len(b))
        while k < n and a[k] == b[k]:
            k += 1
        return k

    near = [common(a, b) for a, b in zip(seqs, seqs[1:])]
    return [min(len(s) - 1, max(near[i - 1] if i else 0, near[i] if i < len(near) else 0)) for i, s in enumerate(seqs)]


@torch.no_grad()
def last_token_states(model, pad_id: int, layer: int, ids: Sequence[Sequence[int]], dtype: torch.dtype,
                      batch_size: int = 256, chunk: int = CHUNK) -> torch.Tensor:
    """Output of decoder ``layer`` at the last token of each of ``ids`` (non-empty lists): ``[n, d]``
    in ``dtype``, as a plain pass of each list alone gives it up to float rounding."""
    out = torch.empty(len(ids), int(model.config.hidden_size), dtype=dtype)
    order = sorted(range(len(ids)), key=lambda i: list(ids[i]))  # lists with a common beginning sit together
    for c in range(0, len(order), chunk):
        idx = order[c:c + chunk]
        seqs = [list(ids[i]) for i in idx]
        k = shared_lengths(seqs)
        store = PrefixKV.plan(seqs, k)
        # fill the store: one list per longest distinct beginning (the shorter ones are its rows too)
        by_begin = {tuple(s[:n]): j for j, (s, n) in enumerate(zip(seqs, k)) if n}
        begins = sorted(by_begin)
        longest = [by_begin[b] for b, nxt in zip(begins, begins[1:] + [()]) if tuple(nxt[:len(b)]) != b]
        for part in length_batches([k[j] for j in longest], batch_size):
            batch = [longest[p] for p in part]
            x, mask = pad_ids([seqs[j][:k[j]] for j in batch], pad_id, model_device(model))
            past = make_past([])
            layer_output(model, x, mask, layer, cache=past)
            store.put(batch, [past_key_value(past, i) for i in range(layer + 1)])
        # each list's remaining tokens against its beginning, shortest beginnings first
        rest = sorted(range(len(seqs)), key=lambda j: (k[j], len(seqs[j]) - k[j]))
        for b in range(0, len(rest), batch_size):
            batch = rest[b:b + batch_size]
            x, mask = pad_ids([seqs[j][k[j]:] for j in batch], pad_id, model_device(model))
            P = max(k[j] for j in batch)
            if P == 0:
                hidden, _ = layer_output(model, x, mask, layer)
            else:
                assert store.rows is not None  # some list in the batch has a beginning: the store was filled
                slots = torch.zeros(len(batch), P, dtype=mask.dtype, device=mask.device)
                for r, j in enumerate(batch):
                    slots[r, P - k[j]:] = 1  # the beginning, left-padded to P slots
                kv = store.gather(batch, P, len(batch), store.rows.dtype, mask.device)
                hidden, _ = layer_output(model, x, torch.cat([slots, mask], 1), layer, cache=make_past(kv),
                                         position_ids=suffix_positions([k[j] for j in batch], x.shape[1], mask.device))
            last = mask.sum(1) - 1
            out[torch.tensor([idx[j] for j in batch])] = hidden[torch.arange(len(batch), device=hidden.device), last].to(dtype).cpu()
        del store
        release_memory(collect=False)
    return out

