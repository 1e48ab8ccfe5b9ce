"""Layer-L states at the last token of many token lists that begin alike, their beginnings run once.

The gated generator's gate examples (:func:`lks.training.gate.gate_examples`) put another edit's
statement before copies of an edit's prompts: every copy of one draw begins with the same dozen
tokens. :func:`last_token_states` runs each shared beginning through layers ``0..L`` once, keeps
its keys/values, and runs the copies' remaining tokens attending to them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lks.hooks import layer_output
from lks.models import make_past, model_device, past_key_value
from lks.training.fastpath import FastPath
from lks.utils import length_batches, pad_ids

SHARED_MIN = 4  # tokens a shared beginning needs before it runs once (fewer: not worth a pass of its own)


@torch.no_grad()
def last_token_states(fast: FastPath, ids: Sequence[list[int]], batch_size: int = 256, min_shared: int = SHARED_MIN) -> torch.Tensor:
    """Layer-L output at the last token of each token list: ``[n, d]`` in the layers' dtype.

    Lists that begin alike run their common beginning once: a list's beginning is the longest
    one it shares with another list (neighbours in lexicographic order), at least
    ``min_shared`` tokens and never its last token. Each distinct beginning runs through layers
    ``0..L`` once, keeping its keys/values; the lists then run only their remaining tokens,
    attending to them (the gate examples' copies behind another edit's statement share that
    statement). Equal to the plain pass up to float rounding (``tests/test_editor.py``)."""
    from transformers import DynamicCache

    n = len(ids)
    dev = model_device(fast.model)
    out: torch.Tensor | None = None
    cut = shared_beginnings(ids, min_shared)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(n):
        groups.setdefault(tuple(ids[i][:cut[i]]), []).append(i)

    def put(rows: list[int], states: torch.Tensor, last: torch.Tensor) -> None:
        nonlocal out
        if out is None:
            out = torch.empty(n, fast.d, dtype=states.dtype)
        out[torch.tensor(rows)] = states[torch.arange(len(rows), device=states.device), last].cpu()

    plain = groups.pop((), [])
    for idx, states, mask in fast.lower_batches([ids[i] for i in plain], batch_size):
        put([plain[k] for k in idx], states, mask.sum(1) - 1)
    heads = list(groups)
    for hb in length_batches([len(h) for h in heads], max(1, batch_size // 4)):
        x, hmask = pad_ids([list(heads[g]) for g in hb], fast.tokenizer.pad_token_id, dev, left=True)
        cache = DynamicCache()
        layer_output(fast.model, x, hmask, fast.layer, position_ids=(hmask.cumsum(1) - 1).clamp(min=0), cache=cache)
        kv = [past_key_value(cache, i) for i in range(fast.layer + 1)]
        items = [(g, i) for g, h in enumerate(hb) for i in groups[heads[h]]]
        for ib in length_batches([len(ids[i]) - cut[i] for _, i in items], batch_size):
            sel = torch.tensor([items[k][0] for k in ib], device=dev)
            rest, smask = pad_ids([ids[items[k][1]][cut[items[k][1]]:] for k in ib], fast.tokenizer.pad_token_id, dev)
            pos = torch.tensor([cut[items[k][1]] for k in ib], device=dev)[:, None] + torch.arange(rest.shape[1], device=dev)
            past = make_past([(k_.index_select(0, sel), v_.index_select(0, sel)) for k_, v_ in kv])
            states, _ = layer_output(fast.model, rest, torch.cat([hmask.index_select(0, sel), smask], 1), fast.layer,
                                     position_ids=pos, cache=past)
            put([items[k][1] for k in ib], states, smask.sum(1) - 1)
    assert out is not None or n == 0
    return out if out is not None else torch.empty(0, fast.d)


def shared_beginnings(ids: Sequence[Sequence[int]], min_shared: int) -> list[int]:
    """For each token list, the length of the longest beginning it shares with another list (its
    neighbours in lexicographic order have it), at most its length - 1; 0 when under ``min_shared``."""
    def common(a: Sequence[int], b: Sequence[int]) -> int:
        k, n = 0, min(len(a), len(b))
        while k < n and a[k] == b[k]:
            k += 1
        return k

    order = sorted(range(len(ids)), key=lambda i: list(ids[i]))
    near = [common(ids[a], ids[b]) for a, b in zip(order, order[1:])]
    cut = [0] * len(ids)
    for k, i in enumerate(order):
        s = min(max(near[k - 1] if k else 0, near[k] if k < len(near) else 0), len(ids[i]) - 1)
        cut[i] = s if s >= min_shared else 0
    return cut
