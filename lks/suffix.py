"""The suffix pass: the layers above an edit layer over each row's suffix, attending to the
cached keys/values of the tokens before it.

A change written into the output of decoder layer L at a row's token ``p`` cannot reach the
tokens before ``p`` (attention is causal), so their keys/values in layers L+1..N are computed once
and every later pass runs only tokens ``p..`` of each row. LKS's training steps
(:meth:`lks.training.fastpath.FastPath.upper_hidden`, with ``TrainConfig.prefix_cache``) and
MEMIT / AlphaEdit's target optimisation (:func:`lks.baselines.common.suffix_hidden`) both run
through :func:`suffix_forward`; each side stores its prefixes its own way (LKS: one row per
distinct token prefix, :func:`lks.training.fastpath.prefix_rows`; MEMIT: per chunk of rows).
Tests: the suffix pass equals the full pass (``tests/test_editor.py``, ``tests/test_baselines.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lks.models import get_layers, make_past, past_key_value, skip_lower_layers

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
