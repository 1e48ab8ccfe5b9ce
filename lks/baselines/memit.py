"""MEMIT (Meng, Sen Sharma, Andonian, Belinkov, Bau 2023, "Mass-Editing Memory in a Transformer").

Two steps (paper §3, Algorithm 1):

1. **Target vectors** (§3.1, eq. 16-17): for edit ``i`` find ``delta_i`` that, added to the output
   ``h_i^L`` of the LAST layer ``L`` of the band at the subject's last token, makes the model
   predict the new object: minimise the mean NLL of the target over the edit prompt and a few
   short random-prefix contexts, plus ``kl_weight`` times KL(unedited || edited) of the next token
   after "{subject} is a" (keeps the subject's other facts; ROME, Meng et al. 2022, eq. 4), plus
   ``weight_decay * ||delta||^2 / ||h||^2``; ``||delta||`` is clamped to ``clamp * ||h||`` after
   every step. ``z_i = h_i^L + delta_i``. All edits are optimised together: their losses are
   summed and each ``delta_i`` only reaches its own rows, so the batch is n independent problems
   in one forward/backward (:func:`target_vectors`).
2. **Spread over the band** (§3.2, Algorithm 1 lines 8-15): for each layer ``l`` of the band in
   turn, keys ``K`` (down_proj inputs at the subject's last token, averaged over the contexts),
   residual ``R = (z - h^L) / (layers left)`` with ``h^L`` recomputed under the updates so far, and
   the least-squares update (eq. 14) ``Delta = R K^T (C0 + K K^T)^-1``, ``C0 = lambda E[k k^T]``
   (:func:`memit_update`; in torch's ``[out, in]`` weight layout with keys as rows).

The random-prefix contexts are the unedited model's greedy continuations of a few opening words
(the paper samples them); one set per fit, shared by all edits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lks.baselines.common import (
    PROJ,
    Row,
    WeightEditor,
    added_weights,
    chunks,
    down_proj,
    encode_rows,
    lower_states,
    pad,
    target_nll,
    upper_hidden,
)
from lks.baselines.stats import CORPUS, key_second_moment
from lks.data import EditSet
from lks.hooks import LayerHooks, StopForward
from lks.models import model_device

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You", "It", "In", "A", "When", "She")


@dataclass
class MEMITConfig:
    """MEMIT hyperparameters (defaults: the SmolLM2-135M sweep, docs/baselines.md)."""

    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])  # the band; targets at the last
    lam: float = 1e4             # lambda: weight of E[k k^T] in C0 (eq. 14; MEMIT GPT-J: 15,000)
    cov_tokens: int = 100_000    # corpus tokens of the key statistics
    corpus: str = CORPUS         # their corpus: a data-directory file or a path (never a test split)
    z_steps: int = 20            # Adam steps of the target optimisation
    z_lr: float = 0.5            # its learning rate
    clamp: float = 0.75          # ||delta|| <= clamp * ||h||
    kl_weight: float = 0.0625    # weight of the "{subject} is a" KL term
    weight_decay: float = 0.5    # weight of ||delta||^2 / ||h||^2
    n_prefixes: int = 4          # random-prefix contexts besides the plain prompt
    prefix_tokens: int = 10      # tokens per prefix
    stop_nll: float = 0.05       # stop when every edit's mean target NLL is below this
    batch_rows: int = 64         # rows per forward/backward chunk

    def __post_init__(self) -> None:
        if not self.layers or sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"layers must be a non-empty increasing list, got {self.layers}")
        if min(self.lam, self.z_lr, self.clamp, self.cov_tokens, self.z_steps, self.batch_rows) <= 0:
            raise ValueError("lam, z_lr, clamp, cov_tokens, z_steps and batch_rows must be positive")


def memit_update(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT's batch update (eq. 14): ``Delta = R^T K (lam C + K^T K)^-1`` ``[d_out, d_in]``.

    Keys ``K`` ``[n, d_in]`` and residuals ``R`` ``[n, d_out]`` are rows (the paper's columns);
    ``Delta`` minimises ``||Delta K^T - R^T||^2 + lam tr(Delta C Delta^T)``. Solved in float64."""
    A = lam * C.double() + K.double().T @ K.double()
    return torch.linalg.solve(A, K.double().T @ R.double()).T.float()


def context_prefixes(model: nn.Module, tok, n: int, n_tokens: int) -> list[str]:
    """``""`` and ``n`` short texts (greedy continuations of opening words) ending in ". "."""
    out = [""]
    if n <= 0:
        return out
    dev = model_device(model)
    enc = tok(list(PREFIX_STARTS[:n]), return_tensors="pt", padding=True, padding_side="left").to(dev)
    with torch.no_grad():
        seq = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    for text in tok.batch_decode(seq, skip_special_tokens=True):
        out.append(" ".join(text.replace("{", " ").replace("}", " ").split()) + ". ")
    return out


def _edit_rows(tok, edits: EditSet, prefixes: Sequence[str], with_target: bool) -> list[Row]:
    texts, subjects, owners, targets = [], [], [], []
    for i, r in enumerate(edits):
        for pre in prefixes:
            texts.append(pre + r.prompt)
            subjects.append(r.subject)
            owners.append(i)
            targets.append(r.target)
    return encode_rows(tok, texts, subjects, owners, targets if with_target else None)


def target_vectors(model: nn.Module, tok, edits: EditSet, cfg: MEMITConfig, layer: int, prefixes: Sequence[str],
                   progress: bool = True, history: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``z`` ``[n, d]`` and current outputs ``h`` ``[n, d]`` of decoder ``layer`` at each
    edit's subject (plain prompt), by the batched optimisation described in the module docstring."""
    dev = model_device(model)
    n = len(edits)
    rows = _edit_rows(tok, edits, prefixes, with_target=True)
    kl_rows = encode_rows(tok, [f"{r.subject} is a" for r in edits], [r.subject for r in edits], list(range(n)))
    for r in kl_rows:
        r.tgt_pos = [len(r.ids) - 1]
    all_rows = rows + kl_rows
    is_kl = [False] * len(rows) + [True] * n
    # lower layers once per chunk; the unedited KL distributions once
    parts = []
    for idx in chunks(len(all_rows), cfg.batch_rows):
        sub = [all_rows[j] for j in idx]
        ids, mask = pad(sub, tok.pad_token_id, dev)
        h, as_tuple = lower_states(model, ids, mask, layer)
        parts.append((idx, sub, h, mask, as_tuple))
    h0 = torch.zeros(n, model.config.hidden_size, device=dev)
    ref: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for idx, sub, h, mask, as_tuple in parts:
            for j, r in zip(idx, sub):
                if j < len(rows) and j % len(prefixes) == 0:  # the plain prompt of edit r.edit
                    h0[r.edit] = h[j - idx[0], r.subj]
            kl_at = [(k, r) for k, (j, r) in enumerate(zip(idx, sub)) if is_kl[j]]
            if kl_at:
                fin = upper_hidden(model, layer, h, mask, as_tuple)
                for k, r in kl_at:
                    ref[r.edit] = torch.log_softmax(model.get_output_embeddings()(fin[k, r.tgt_pos[0]]).float(), -1)
    delta = torch.zeros(n, h0.shape[1], device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.z_lr)
    h_norm = h0.norm(dim=1)
    n_ctx = torch.zeros(n, device=dev).index_add(0, torch.tensor([r.edit for r in rows], device=dev),
                                                 torch.ones(len(rows), device=dev))
    bar = tqdm(range(cfg.z_steps), desc="MEMIT targets", disable=not progress)
    for step in bar:
        opt.zero_grad()
        nll_sum = torch.zeros(n, device=dev)
        kl_sum = torch.zeros(n, device=dev)
        for idx, sub, h, mask, as_tuple in parts:
            r_idx = torch.arange(len(sub), device=dev)
            p_idx = torch.tensor([r.subj for r in sub], device=dev)
            owner = torch.tensor([r.edit for r in sub], device=dev)
            h_ed = h.index_put((r_idx, p_idx), h[r_idx, p_idx] + delta[owner])
            fin = upper_hidden(model, layer, h_ed, mask, as_tuple)
            nll_rows = [k for k, j in enumerate(idx) if not is_kl[j]]
            loss = torch.zeros((), device=dev)
            if nll_rows:
                nll = target_nll(model, fin[nll_rows], [sub[k] for k in nll_rows])
                own = owner[nll_rows]
                nll_e = torch.zeros(n, device=dev).index_add(0, own, nll) / n_ctx
                loss = loss + nll_e.sum()
                nll_sum = nll_sum + nll_e.detach()
            for k, j in enumerate(idx):
                if is_kl[j]:
                    e = sub[k].edit
                    logp = torch.log_softmax(model.get_output_embeddings()(fin[k, sub[k].tgt_pos[0]]).float(), -1)
                    kl = torch.sum(ref[e].exp() * (ref[e] - logp))
                    loss = loss + cfg.kl_weight * kl
                    kl_sum[e] += kl.detach()
            loss.backward()
        decay = cfg.weight_decay * (delta.norm(dim=1) ** 2 / h_norm ** 2)
        decay.sum().backward()
        worst = float(nll_sum.max())
        if history is not None:
            history.append({"step": step, "nll_mean": float(nll_sum.mean()), "nll_max": worst,
                            "kl_mean": float(kl_sum.mean())})
        bar.set_postfix(nll=f"{float(nll_sum.mean()):.3f}", worst=f"{worst:.3f}")
        if worst < cfg.stop_nll:
            break
        opt.step()
        with torch.no_grad():  # clamp ||delta_i|| <= clamp * ||h_i||
            scale = (cfg.clamp * h_norm / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            delta.mul_(scale[:, None])
    return (h0 + delta).detach(), h0


@torch.no_grad()
def keys_and_outputs(model: nn.Module, tok, rows: Sequence[Row], n: int, key_layer: int, out_layer: int,
                     batch_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[n, d_in]`` (down_proj inputs of ``key_layer`` at the subject's last token, averaged
    over each edit's rows) and outputs of ``out_layer`` ``[n, d]`` at the same token of each
    edit's FIRST row (its plain prompt), under the model's current weights."""
    dev = model_device(model)
    keys = torch.zeros(n, down_proj(model, key_layer).in_features, device=dev)
    counts = torch.zeros(n, device=dev)
    outs = torch.zeros(n, model.config.hidden_size, device=dev)
    seen: set[int] = set()
    for idx in chunks(len(rows), batch_rows):
        sub = [rows[j] for j in idx]
        ids, mask = pad(sub, tok.pad_token_id, dev)
        with LayerHooks(model, capture=[out_layer], capture_inputs=[(key_layer, PROJ)], stop_after_capture=True) as hk:
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
        k_all, h_all = hk.captured_inputs[(key_layer, PROJ)], hk.captured[out_layer]
        for b, r in enumerate(sub):
            keys[r.edit] += k_all[b, r.subj].float()
            counts[r.edit] += 1
            if r.edit not in seen:
                seen.add(r.edit)
                outs[r.edit] = h_all[b, r.subj].float()
    return keys / counts[:, None], outs


class MEMITEditor(WeightEditor):
    """MEMIT baseline behind the :class:`lks.LKSEditor` interface (``fit``, ``applied``, ``generate``,
    ``save``, ``load``). See the module docstring for the method."""

    method = "memit"
    config_class = MEMITConfig

    def _solve(self, K: torch.Tensor, R: torch.Tensor, layer: int, C: torch.Tensor) -> torch.Tensor:
        return memit_update(K, R, C, self.config.lam)

    def _fit(self, edits: EditSet, progress: bool) -> dict[int, torch.Tensor]:
        cfg, model, tok = self.config, self.model, self.tokenizer
        band, last = list(cfg.layers), cfg.layers[-1]
        stats = key_second_moment(model, tok, band, cfg.cov_tokens, corpus=cfg.corpus, progress=progress)
        prefixes = context_prefixes(model, tok, cfg.n_prefixes, cfg.prefix_tokens)
        z, _ = target_vectors(model, tok, edits, cfg, last, prefixes, progress, self.history)
        rows = _edit_rows(tok, edits, prefixes, with_target=False)
        deltas: dict[int, torch.Tensor] = {}
        for j, layer in enumerate(band):
            with added_weights(model, deltas):  # the updates of the lower band layers so far
                K, h = keys_and_outputs(model, tok, rows, len(edits), layer, last, cfg.batch_rows)
            R = (z - h) / (len(band) - j)   # residual spread over the layers left (Algorithm 1)
            dev = K.device
            deltas[layer] = self._solve(K, R, layer, stats[layer].to(dev)).to(down_proj(model, layer).weight.dtype)
            self.history.append({"layer": layer, "residual_norm": float(R.norm(dim=1).mean()),
                                 "delta_norm": float(deltas[layer].norm())})
        return deltas
