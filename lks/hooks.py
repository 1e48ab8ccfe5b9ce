"""The one place in lks that registers forward hooks on a model.

``LayerHooks`` is a context manager that can

* **capture** the output hidden state ``[batch, seq, hidden]`` of chosen decoder layers, and the
  input of chosen submodules of a layer (``capture_inputs``: e.g. ``(8, "mlp.down_proj")``, the
  MLP "keys" ``[batch, seq, intermediate]`` that weight-editing baselines read), and
* **replace** the hidden state at given ``(row, position)`` pairs of one layer's output with given
  vectors, either statically (``hooks.replace(...)`` before the forward call) or dynamically
  (a ``replacer`` callback that sees each forward call's ``input_ids``/``attention_mask`` and
  returns what to replace; this is how ``LKSEditor.applied`` edits any ``model(...)`` or
  ``model.generate(...)`` call).

Decoder layers return a tensor (Llama-family in transformers 5) or a tuple whose first element
is the hidden state (some other families); both are handled and the output type is preserved.
During cached decoding (the model's ``cache`` already holds tokens and the call
feeds only new tokens), replacement is skipped: the edited state at the subject token was written
into the KV cache during the prefill and must not be applied again at a wrong position.
All hooks are removed on exit, also when the block raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lks.models import check_layer, get_layer, get_layers


@dataclass
class Replacement:
    """What to write into one layer's output: ``hidden[rows[i], positions[i]] = vectors[i]``.

    With ``additive=True`` the vectors are added instead (``hidden[r, p] += vectors[i]``), which is
    how the residual generator's ``KB' = KB + delta`` is applied without a second forward pass.
    With ``combine`` the written blocks are ``combine(hidden[rows, positions], vectors)``: an
    editor passes its generator's ``combine``, so every kind (and the gated one, whose ``vectors``
    are wider than ``hidden``) is applied by the same code in the hook and in the fast training path.
    """

    rows: torch.Tensor       # [n] long
    positions: torch.Tensor  # [n] long, index into the sequence axis of this forward call
    vectors: torch.Tensor    # [n, hidden] (or any width that ``combine`` reads)
    additive: bool = False
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (original [n, hidden], vectors) -> [n, hidden]

    def __post_init__(self) -> None:
        n = self.rows.shape[0]
        if self.positions.shape[0] != n or self.vectors.shape[0] != n:
            raise ValueError(f"replacement needs as many rows, positions and vectors; got "
                             f"{n}, {self.positions.shape[0]}, {self.vectors.shape[0]}")


class StopForward(Exception):
    """Raised by a ``stop_after_capture`` hook once the states it needs are captured."""


# replacer(input_ids [batch, seq] | None, attention_mask [batch, seq] | None) -> Replacement | None
Replacer = Callable[[torch.Tensor | None, torch.Tensor | None], Replacement | None]


def _past_length(past: Any) -> int:
    """Tokens a transformers ``Cache`` already holds (0 without one)."""
    return 0 if past is None else int(past.get_seq_length())


class LayerHooks:
    """Capture and/or replace decoder-layer outputs inside a ``with`` block.

    Args:
        model: a causal LM whose layers :func:`lks.models.get_layers` can find.
        capture: layer indices whose outputs to record in ``self.captured[layer]``.
        edit_layer: the layer whose output replacements are written to (``None``: no edits).
        replacer: optional callback computing a :class:`Replacement` for every forward call.
        detach: store captured states detached (default) or keep them in the autograd graph.
        stop_after_capture: raise :class:`StopForward` right after the deepest captured layer, so
            a caller that only needs states up to layer L does not pay for layers above it.
            Catch it around the forward call (``with suppress(StopForward): model(...)``).
        capture_inputs: ``(layer, submodule path inside that layer)`` pairs whose first positional
            input is recorded in ``self.captured_inputs[(layer, path)]`` (detached like the outputs).
            Their layers count as captured layers for ``stop_after_capture``.

    Example::

        with LayerHooks(model, capture=[8]) as hooks:
            model(**batch)
        h8 = hooks.captured[8]            # [batch, seq, hidden]
    """

    def __init__(
        self,
        model: nn.Module,
        capture: Iterable[int] = (),
        edit_layer: int | None = None,
        replacer: Replacer | None = None,
        detach: bool = True,
        stop_after_capture: bool = False,
        capture_inputs: Iterable[tuple[int, str]] = (),
    ) -> None:
        self.model = model
        self.capture_inputs = sorted({(check_layer(model, i), name) for i, name in capture_inputs})
        self.captured_inputs: dict[tuple[int, str], torch.Tensor] = {}
        self.capture_layers = sorted({check_layer(model, i) for i in capture} | {i for i, _ in self.capture_inputs})
        self.edit_layer = check_layer(model, edit_layer) if edit_layer is not None else None
        if replacer is not None and edit_layer is None:
            raise ValueError("a replacer needs edit_layer")
        self.replacer = replacer
        self.detach = detach
        self.stop_after_capture = stop_after_capture
        self.captured: dict[int, torch.Tensor] = {}
        self.output_is_tuple: bool | None = None  # learnt from the first captured output
        self.calls = 0                # forward calls of the whole model seen
        self.rows_replaced = 0        # (row, position) pairs written, summed over calls
        self._static: Replacement | None = None
        self._pending: Replacement | None = None
        self._decode_step = False
        self._handles: list[Any] = []

    # -- public API ---------------------------------------------------------------------------
    def replace(self, rows, positions, vectors: torch.Tensor, additive: bool = False,
                combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Replace (or add to, ``additive``; or ``combine`` with, see :class:`Replacement`) the hidden
        state at fixed ``(row, position)`` pairs in every following non-decode forward call."""
        if self.edit_layer is None:
            raise ValueError("LayerHooks was created without edit_layer")
        dev = vectors.device
        self._static = Replacement(torch.as_tensor(rows, dtype=torch.long, device=dev),
                                   torch.as_tensor(positions, dtype=torch.long, device=dev), vectors, additive, combine)

    def clear(self) -> None:
        """Forget captured states and any static replacement."""
        self.captured.clear()
        self.captured_inputs.clear()
        self._static = None

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> LayerHooks:
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
            for i, name in self.capture_inputs:
                sub = get_layer(self.model, i).get_submodule(name)
                self._handles.append(sub.register_forward_pre_hook(self._make_input_hook((i, name))))
            for i in sorted(set(self.capture_layers) | ({self.edit_layer} - {None})):
                self._handles.append(get_layer(self.model, i).register_forward_hook(self._make_layer_hook(i)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- hooks --------------------------------------------------------------------------------
    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        # the model's cache: ``cache=`` (what generate passes in transformers >= 5.2x) or its
        # deprecated name ``past_key_values=`` (earlier 5.x, and callers not yet renamed)
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        self._decode_step = _past_length(past) > 0
        self._pending = None
        if self.replacer is not None and not self._decode_step:
            self._pending = self.replacer(input_ids, kwargs.get("attention_mask"))

    def _make_input_hook(self, key: tuple[int, str]):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]  # [batch, seq, in_features]
            self.captured_inputs[key] = x.detach() if self.detach else x

        return hook

    def _make_layer_hook(self, layer: int):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            is_tuple = isinstance(output, tuple)
            self.output_is_tuple = is_tuple
            hidden = output[0] if is_tuple else output  # [batch, seq, hidden]
            if layer == self.edit_layer and not self._decode_step:
                for rep in (self._static, self._pending):
                    if rep is not None and rep.rows.numel():
                        hidden = self._apply(hidden, rep)
            if layer in self.capture_layers:
                self.captured[layer] = hidden.detach() if self.detach else hidden
                if self.stop_after_capture and layer == self.capture_layers[-1]:
                    raise StopForward(layer)
            if layer == self.edit_layer:
                return (hidden, *output[1:]) if is_tuple else hidden
            return None

        return hook

    def _apply(self, hidden: torch.Tensor, rep: Replacement) -> torch.Tensor:
        seq = hidden.shape[1]
        if int(rep.positions.max()) >= seq or int(rep.positions.min()) < 0:
            raise IndexError(f"replacement position out of range for a sequence of {seq} tokens")
        self.rows_replaced += int(rep.rows.numel())
        return apply_replacement(hidden, rep)


def apply_replacement(hidden: torch.Tensor, rep: Replacement) -> torch.Tensor:
    """Return ``hidden`` ``[batch, seq, d]`` with ``rep`` written in (not in place).

    ``index_put`` without ``accumulate`` keeps the autograd graph intact when the vectors require
    grad; the fast training path calls this same function on cached states, so both paths write
    knowledge blocks identically.
    """
    idx = (rep.rows.to(hidden.device), rep.positions.to(hidden.device))
    if rep.combine is not None:
        return hidden.index_put(idx, rep.combine(hidden[idx], rep.vectors).to(hidden.dtype))
    vec = rep.vectors.to(device=hidden.device, dtype=hidden.dtype)
    if rep.additive:
        vec = hidden[idx] + vec
    return hidden.index_put(idx, vec)


def input_embeds(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The input embeddings of ``input_ids`` in the decoder layers' dtype.

    The layers may hold another dtype than the embedding: bfloat16 lower layers inside
    :meth:`lks.training.fastpath.FastPath.lower_pass`, the embedding float32 because the output
    layer may share it. Every pass that feeds such layers starts here."""
    dtype = next(get_layers(model)[0].parameters()).dtype
    return model.get_input_embeddings()(input_ids).to(dtype)


@torch.no_grad()
def layer_output(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 layer: int) -> tuple[torch.Tensor, bool]:
    """Output ``[batch, seq, d]`` of decoder ``layer`` (the layers above it never run), and whether
    the decoder layers return tuples (what :func:`lks.models.skip_lower_layers` must mimic).
    The embeddings come from :func:`input_embeds` (the layers' dtype)."""
    with LayerHooks(model, capture=[layer], stop_after_capture=True) as hooks:
        try:
            model(inputs_embeds=input_embeds(model, input_ids), attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return hooks.captured[layer], bool(hooks.output_is_tuple)
