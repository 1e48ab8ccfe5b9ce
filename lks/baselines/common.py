"""What the weight-editing baselines share: the editor interface, the forward passes, the batches.

A weight editor's whole edit is a set of additive changes ``deltas[layer]`` (same shape as that
layer's MLP output projection, ``mlp.down_proj.weight`` ``[d_model, intermediate]`` on Llama-family
models). :class:`WeightEditor` gives every method the interface of :class:`lks.LKSEditor`:
``fit``, ``applied`` (adds the deltas on enter, puts the ORIGINAL tensors back on exit, so the
weights are restored bit for bit, also after an exception), ``generate``, ``save`` / ``load``
(``deltas.safetensors`` + ``config.json`` with a ``method`` key), ``model``, ``tokenizer``,
``n_edits``, ``fit_seconds``.

The forward passes of the optimisation loops run the frozen lower layers once (their output is
cached, :func:`lks.hooks.layer_output`) and only the layers above it each step (:func:`upper_hidden`, the
same ``skip_lower_layers`` trick as LKS's training path).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lks.config import from_dict
from lks.data import EditSet, find_subject, subject_token_index
from lks.hooks import LayerHooks, layer_output
from lks.methods import ApplyStats, Editor, accepted_edits, method_names, replace_settings
from lks.models import cache_dir, get_layer, get_layers, model_device, skip_lower_layers
from lks.suffix import PrefixKV, suffix_forward, suffix_positions, upper_keys_values
from lks.utils import atomic_dir, pad_ids, save_tensors, sha256_text, write_json

FORMAT_VERSION = 1
PROJ = "mlp.down_proj"  # the MLP output projection inside a Llama/Mistral/Qwen2 decoder layer


def down_proj(model: nn.Module, layer: int) -> nn.Linear:
    """The MLP output projection of decoder ``layer`` (Llama family: ``mlp.down_proj``)."""
    try:
        mod = get_layer(model, layer).get_submodule(PROJ)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} layer {layer} has no {PROJ}; the weight-editing baselines "
                         "support Llama-family models (Llama, Mistral, Qwen2, SmolLM)") from None
    if not isinstance(mod, nn.Linear):
        raise ValueError(f"{PROJ} of layer {layer} is a {type(mod).__name__}, not nn.Linear")
    return mod


def method_config(cls: type, model: nn.Module, method: str) -> Any:
    """The registered model's ``"baselines": {method: {...}}`` as dataclass ``cls`` (defaults for
    models without a config file); unknown keys are rejected with a message naming them."""
    from lks.config import model_spec, registered_models

    name = getattr(model, "lks_name", "")
    if name not in registered_models():
        return cls()
    spec = model_spec(name)
    unknown = sorted(set(spec.baselines) - set(method_names()))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in configs/{name}.json:baselines; valid keys: {sorted(method_names())}")
    return from_dict(cls, dict(spec.baselines.get(method, {})), f"configs/{name}.json:baselines.{method}")


# --------------------------------------------------------------------------------------------
# Batches: prompt + target, with the subject's last token
# --------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One tokenised text: ``ids``, the subject's last token ``subj``, the positions whose logits
    predict the target tokens ``tgt_pos`` (``tgt_ids`` the tokens), ``edit`` the edit it belongs to."""

    ids: list[int]
    subj: int
    tgt_pos: list[int]
    tgt_ids: list[int]
    edit: int


def encode_rows(tok: Any, texts: Sequence[str], subjects: Sequence[str], edit_of: Sequence[int],
                targets: Sequence[str | None] | None = None) -> list[Row]:
    """Tokenise ``text + " " + target`` (or ``text`` alone) and locate the subject's last token
    (its first mention, :func:`lks.data.find_subject`) and the target tokens. As in
    :func:`lks.metrics.teacher_forced`, target tokens are those starting at or after the text's
    character length (byte-level BPE tokenises " Paris" and "Paris" differently)."""
    targets = list(targets) if targets is not None else [None] * len(texts)
    full = [t if g is None else f"{t} {g}" for t, g in zip(texts, targets)]
    enc = tok(full, return_offsets_mapping=True)
    rows = []
    for ids, offs, text, subj, e, g in zip(enc["input_ids"], enc["offset_mapping"], texts, subjects, edit_of, targets):
        s_pos = subject_token_index(offs, *find_subject(text, subj))
        tgt = [j for j, (a, b) in enumerate(offs) if g is not None and a >= len(text) and b > a and j > 0]
        rows.append(Row(list(ids), s_pos, [j - 1 for j in tgt], [ids[j] for j in tgt], e))
    return rows


def chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


# --------------------------------------------------------------------------------------------
# Forward passes in two parts
# --------------------------------------------------------------------------------------------
def upper_hidden(model: nn.Module, layer: int, hidden: torch.Tensor, mask: torch.Tensor, as_tuple: bool,
                 params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Final (normed) hidden states ``[batch, T, d]`` when decoder ``layer`` outputs ``hidden``:
    only layers ``layer+1..N`` run. ``params`` overrides parameters of ``model.base_model`` by name
    (``torch.func.functional_call``), which is how FT-L puts ``W + delta`` in the autograd graph."""
    base = model.base_model
    with skip_lower_layers(model, layer, hidden, as_tuple):
        kwargs = {"inputs_embeds": torch.zeros_like(hidden), "attention_mask": mask, "use_cache": False}
        out = torch.func.functional_call(base, params, (), kwargs) if params else base(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def target_nll(model: nn.Module, final: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Mean NLL of each row's target tokens ``[len(rows)]`` from the final hidden states; logits
    are computed at the target positions only."""
    r_idx = torch.tensor([i for i, r in enumerate(rows) for _ in r.tgt_pos], device=final.device)
    p_idx = torch.tensor([p for r in rows for p in r.tgt_pos], device=final.device)
    tgt = torch.tensor([t for r in rows for t in r.tgt_ids], device=final.device)
    head = model.get_output_embeddings()
    logp = torch.log_softmax(head(final[r_idx, p_idx].to(head.weight.dtype)).float(), -1)
    nll = -logp.gather(-1, tgt[:, None])[:, 0]
    per_row = torch.zeros(len(rows), device=final.device).index_add(0, r_idx, nll)
    return per_row / torch.tensor([max(1, len(r.tgt_pos)) for r in rows], device=final.device)


# --------------------------------------------------------------------------------------------
# The editor interface
# --------------------------------------------------------------------------------------------
class WeightEditor(Editor):
    """Base class of the weight-editing baselines; subclasses set ``method``, ``label``,
    ``config_class`` and implement ``_fit(edits) -> {layer: delta}``.

    Args:
        model: a frozen Llama-family causal LM (see :func:`lks.load_model`).
        tokenizer: its tokenizer.
        config: the method's hyperparameters; default: the registered model's ``"baselines"`` entry.
    """

    method: ClassVar[str] = ""
    config_class: ClassVar[type] = object

    def __init__(self, model: nn.Module, tokenizer: Any, config: Any = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config if config is not None else method_config(self.config_class, model, self.method)
        n = len(get_layers(model))
        for layer in getattr(self.config, "layers", None) or [self.config.layer]:
            if not 0 <= layer < n:
                raise ValueError(f"{self.method}: layer {layer} is out of range for {getattr(model, 'lks_name', '')!r} "
                                 f"({n} decoder layers); set the layers in configs/<model>.json 'baselines'")
        self.deltas: dict[int, torch.Tensor] = {}
        self.n_edits = 0
        self.fit_seconds = 0.0
        self.fit_threads = 0  # torch threads of the fit: bit-reproducible at the same count
        self.prior_seconds = 0.0
        self.history: list[dict[str, float]] = []
        self.data_checksum = ""

    @classmethod
    def configs(cls, model: nn.Module, overrides=None, *, seed: int | None = None) -> tuple[Any, None]:
        """``(method config, None)``: the model's registered ``"baselines"`` entry with ``overrides``
        (the fits draw no random numbers: ``seed`` changes nothing)."""
        registered = method_config(cls.config_class, model, cls.method)
        return replace_settings(registered, dict(overrides or {}), f"{cls.method} config"), None

    @classmethod
    def setting_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls.config_class)}

    def routes(self, prompts: Sequence[str]) -> list[bool]:
        """A weight edit acts on every prompt."""
        return [True] * len(prompts)

    # -- fit ------------------------------------------------------------------------------------
    def diagnostics(self, edits: EditSet) -> dict[str, float]:
        """How large the update is and how much of its plan it delivers (issue 37's mechanism figure):
        ``delta_rel_L<i>`` = ``||Delta_i|| / ||W_i||`` per edited layer, ``edits_per_dim`` (fitted
        edits per key dimension of the first edited layer) and, for MEMIT and AlphaEdit,
        ``target_realised``: the mean over the fit's batches of the share of the planned change of the
        band's last output that the updates deliver (:func:`lks.baselines.memit.target_diagnostics`)."""
        out = {f"delta_rel_L{k}": float(d.float().norm() / down_proj(self.model, k).weight.float().norm())
               for k, d in sorted(self.deltas.items())}
        if self.deltas:
            out["edits_per_dim"] = self.n_edits / down_proj(self.model, min(self.deltas)).in_features
        ends = [h["target_realised"] for h in self.history if "target_realised" in h]
        if ends:
            out["target_realised"] = sum(ends) / len(ends)
        return out

    def fit(self, edits: EditSet, config: Any = None, *, on_conflict: str = "error",
            checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
            progress: bool = True) -> list[dict[str, float]]:
        """Compute the weight change for ``edits`` (the model's weights are left as they were).

        ``config`` replaces the editor's method config for this fit; ``on_conflict="first"`` drops
        later edits of the same subject and prompt with another target. An interrupted fit resumes
        from the lks cache (FT-L's last step, MEMIT's target chunks), not from ``checkpoint_dir``."""
        if config is not None:
            self.config = config
        edits, _ = accepted_edits(edits, on_conflict)
        self.fit_threads = torch.get_num_threads()
        t0 = time.perf_counter()
        self.history, self.prior_seconds = [], 0.0  # prior: a resumed fit's earlier runs (set by _fit)
        self.deltas = {k: v.detach().float().cpu() for k, v in self._fit(edits, progress).items()}
        self.fit_seconds = self.prior_seconds + time.perf_counter() - t0
        self.n_edits, self.data_checksum = len(edits), edits.checksum()
        return self.history

    def _fit(self, edits: EditSet, progress: bool) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def _cache_path(self, kind: str, spec: dict[str, Any]) -> Path | None:
        """``<lks cache dir>/<kind>/<hash>.safetensors``, the hash of the model's registered name and
        ``spec`` (MEMIT's target chunks, an interrupted FT-L fit); None for an unnamed model, which
        has no stable key."""
        name = getattr(self.model, "lks_name", "")
        if not name:
            return None
        blob = json.dumps({"model": name, **spec}, sort_keys=True)
        return cache_dir() / kind / f"{sha256_text(blob)[:24]}.safetensors"

    def _save_state(self, path: Path, tensors: dict[str, torch.Tensor], started: float, **meta: str) -> None:
        """Write an unfinished fit's resumable state (atomically): ``tensors``, ``meta``, the history
        so far and the fit's seconds (the earlier processes' plus this one's since ``started``)."""
        save_tensors(path, tensors, metadata={**meta, "history": json.dumps(self.history),
                                              "seconds": str(self.prior_seconds + time.perf_counter() - started)})

    def _load_state(self, path: Path | None) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """An interrupted fit's state written by :meth:`_save_state` (tensors, metadata), or None;
        restores its history and counts its seconds in ``fit_seconds``."""
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        self.history, self.prior_seconds = json.loads(meta["history"]), float(meta["seconds"])
        return tensors, meta

    # -- apply ----------------------------------------------------------------------------------
    @contextmanager
    def applied(self, model: nn.Module | None = None) -> Iterator[ApplyStats]:
        """Inside the block the model's down_proj weights are ``W + delta``; on exit (also after an
        exception) the original tensors are put back, so the weights are restored bit for bit."""
        model = model if model is not None else self.model
        if not self.deltas:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() or load() first")
        stats = ApplyStats()

        def count(input_ids, attention_mask):  # counts calls and rows; replaces nothing
            stats.calls += 1
            if input_ids is not None:
                stats.rows_seen += int(input_ids.shape[0])
                stats.rows_routed += int(input_ids.shape[0])
            return None

        with added_weights(model, self.deltas):
            with LayerHooks(model, edit_layer=min(self.deltas), replacer=count):
                yield stats

    # -- save / load ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Save to a directory (atomically): ``config.json`` (method, model, hyperparameters) and
        ``deltas.safetensors`` (``layer.<i>``: the change of that layer's down_proj weight)."""
        from safetensors.torch import save_file

        import lks
        from lks.checkpoint import model_identity

        if not self.deltas:
            raise RuntimeError(f"{type(self).__name__} is not fitted: nothing to save")
        cfg = {"format_version": FORMAT_VERSION, "lks_version": lks.__version__, "method": self.method,
               "model": model_identity(self.model) | {"class": type(self.model).__name__}, "config": dataclasses.asdict(self.config),
               "layers": sorted(self.deltas), "n_edits": self.n_edits, "fit_seconds": self.fit_seconds, "fit_threads": self.fit_threads,
               "data_checksum": self.data_checksum, "history": self.history,
               "versions": {"torch": torch.__version__}}
        path = Path(path)
        with atomic_dir(path) as tmp:
            write_json(tmp / "config.json", cfg)
            save_file({f"layer.{k}": v.contiguous() for k, v in self.deltas.items()}, str(tmp / "deltas.safetensors"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, tokenizer: Any) -> WeightEditor:
        """Load a saved editor for ``model``; a checkpoint of another method, model or layer shape
        is refused with a one-line error."""
        from safetensors.torch import load_file

        from lks.checkpoint import check_model, model_identity, read_json

        path = Path(path)
        cfg = read_json(path / "config.json")
        if cfg.get("method") != cls.method:
            raise ValueError(f"checkpoint {path} holds a {cfg.get('method') or 'lks'!r} editor, not {cls.method!r}")
        editor = cls(model, tokenizer, from_dict(cls.config_class, cfg["config"], f"{path}/config.json:config"))
        check_model(cfg.get("model", {}), model, path)
        have = model_identity(model)
        file = path / "deltas.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint file {file} is missing")
        tensors = load_file(str(file))
        for key, delta in tensors.items():
            layer = int(key.split(".")[1])
            if not 0 <= layer < have["num_layers"] or delta.shape != down_proj(model, layer).weight.shape:
                raise ValueError(f"checkpoint {path}: {key} of shape {tuple(delta.shape)} does not fit layer {layer} "
                                 f"of {have['name']!r}")
            editor.deltas[layer] = delta
        editor.n_edits, editor.fit_seconds = cfg.get("n_edits", 0), cfg.get("fit_seconds", 0.0)
        editor.fit_threads = cfg.get("fit_threads", 0)
        editor.history, editor.data_checksum = cfg.get("history", []), cfg.get("data_checksum", "")
        return editor


@contextmanager
def added_weights(model: nn.Module, deltas: dict[int, torch.Tensor]) -> Iterator[None]:
    """Inside the block, layer ``i``'s down_proj weight is ``W + deltas[i]``; the original tensor
    objects are put back on exit, so the model leaves bit-identical (also after an exception)."""
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for layer, delta in deltas.items():
            w = down_proj(model, layer).weight
            saved.append((w, w.data))
            w.data = w.data + delta.to(device=w.device, dtype=w.dtype)
        yield
    finally:
        for w, data in reversed(saved):
            w.data = data




@dataclass
class SuffixPart:
    """A chunk of rows prepared for suffix-only passes of the layers above ``layer``.

    A change written at each row's position ``subj`` cannot reach earlier tokens (attention is
    causal), so the upper layers' keys/values of the tokens before it are computed once (into
    ``prefix``, shared by every chunk of a fit: rows that begin alike share stored rows) and every
    optimisation step runs only the suffix ``subj..end`` of each row (``h``, right-padded; the
    edited token is suffix position 0). ``rows`` carry target positions relative to the suffix.
    :func:`suffix_hidden` equals the full pass of :func:`upper_hidden` (tested).
    """

    rows: list[Row]
    h: torch.Tensor               # [B, Ts, d] layer output on the suffixes (float32)
    mask: torch.Tensor            # [B, P + Ts]
    position_ids: torch.Tensor    # [B, Ts] true positions
    prefix: PrefixKV              # the keys/values of the tokens before each row's edited token
    seq: list[int]                # the rows' sequence numbers in ``prefix``
    layer: int
    as_tuple: bool


@torch.no_grad()
def suffix_part(model: nn.Module, layer: int, rows: Sequence[Row], pad_id: int, dtype: torch.dtype,
                prefix: PrefixKV | None = None, seq: Sequence[int] | None = None) -> SuffixPart:
    """Run ``rows`` once (lower layers, then the upper ones with a cache) and keep what the
    suffix-only passes need (see :class:`SuffixPart`). ``dtype``: the upper layers' dtype.
    ``prefix`` / ``seq``: a store planned over more rows and these rows' numbers in it (default:
    a store of these rows alone)."""
    dev = model_device(model)
    if prefix is None:
        prefix, seq = PrefixKV.plan([r.ids for r in rows], [r.subj for r in rows]), list(range(len(rows)))
    assert seq is not None and len(seq) == len(rows)
    ids, mask = pad_ids([r.ids for r in rows], pad_id, dev)
    h, as_tuple = layer_output(model, ids, mask, layer)
    with skip_lower_layers(model, layer, h.to(dtype), as_tuple):
        out = model.base_model(inputs_embeds=torch.zeros_like(h, dtype=dtype), attention_mask=mask, use_cache=True)
    prefix.put(list(seq), upper_keys_values(out.cache, model, layer), device=dev)
    starts = [r.subj for r in rows]
    lens = [len(r.ids) - s for r, s in zip(rows, starts)]
    P, Ts, B = max(starts), max(lens), len(rows)
    hs = torch.zeros(B, Ts, h.shape[-1], device=dev)
    m = torch.zeros(B, P + Ts, dtype=torch.long, device=dev)
    new_rows = []
    for b, (r, s, n) in enumerate(zip(rows, starts, lens)):
        hs[b, :n] = h[b, s:s + n].float()
        m[b, P - s:P + n] = 1
        new_rows.append(Row(r.ids, 0, [p - s for p in r.tgt_pos], r.tgt_ids, r.edit))
    return SuffixPart(new_rows, hs, m, suffix_positions(starts, Ts, dev), prefix, list(seq), layer, as_tuple)


def join_rows(pieces: Sequence[tuple[SuffixPart, int]]) -> SuffixPart:
    """One :class:`SuffixPart` of rows ``(part, b)`` taken from parts that share a prefix store, each
    padded only as far as the rows it holds need: an optimisation whose rows finish at different
    steps runs the rest in full blocks (MEMIT's targets). Rows taken from one part in their order
    give that part back."""
    src = pieces[0][0]
    dev = src.h.device
    first = [part.prefix.lengths[part.seq[b]] for part, b in pieces]
    lens = [int(part.mask[b, part.mask.shape[1] - part.h.shape[1]:].sum()) for part, b in pieces]
    P, Ts = max(first), max(lens)
    h = torch.zeros(len(pieces), Ts, src.h.shape[-1], device=dev)
    m = torch.zeros(len(pieces), P + Ts, dtype=torch.long, device=dev)
    for r, ((part, b), s, n) in enumerate(zip(pieces, first, lens)):
        h[r, :n] = part.h[b, :n]
        m[r, P - s:P + n] = 1
    return SuffixPart([part.rows[b] for part, b in pieces], h, m, suffix_positions(first, Ts, dev), src.prefix,
                      [part.seq[b] for part, b in pieces], src.layer, src.as_tuple)


def suffix_hidden(model: nn.Module, part: SuffixPart, add: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Final hidden states ``[B, Ts, d]`` of the suffixes with ``add`` ``[B, d]`` added to each
    row's edited token (suffix position 0) in the output of ``part.layer`` (:func:`lks.suffix.suffix_forward`)."""
    h = part.h if add is None else torch.cat([part.h[:, :1] + add[:, None], part.h[:, 1:]], 1)
    B, P = h.shape[0], part.mask.shape[1] - h.shape[1]
    kv = part.prefix.gather(part.seq, P, B, dtype, h.device)
    return suffix_forward(model, part.layer, h.to(dtype), part.mask, part.position_ids, kv, part.as_tuple)
