"""Second moment of the MLP keys, ``C = E[k k^T]``, for MEMIT's and AlphaEdit's updates.

The keys ``k`` are the inputs of a layer's ``mlp.down_proj`` (``act(gate(x)) * up(x)``,
``[intermediate]``) at every token of a text corpus: MEMIT (Meng et al. 2023, eq. 11 and §3.2)
uses ``C0 = lambda * E[k k^T]`` to keep the layer's outputs on preserved knowledge; AlphaEdit
(Fang et al. 2025, §3.1) projects its update onto the null space of the same matrix.

The corpus is WikiText-2's VALIDATION split in its tokenised form (``wikitext2/wiki.valid.tokens``
of the data directory; never the test split, which the capability suite scores). Statistics are
computed once per (model, layer, corpus, token count), with a progress bar, and cached as
safetensors under ``<lks cache dir>/stats/<model>/`` (``$LKS_CACHE_DIR``, see :mod:`lks.models`).
``python -m lks stats`` computes them ahead of a fit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lks.baselines.common import PROJ, down_proj
from lks.hooks import LayerHooks, StopForward
from lks.models import cache_dir, model_device
from lks.utils import save_tensors

CORPUS = "wikitext2/wiki.valid.tokens"
SEQ_LEN = 256     # tokens per corpus window
BATCH = 8         # windows per forward pass


def stats_path(model: nn.Module, layer: int, n_tokens: int, corpus: str = CORPUS) -> Path:
    """Cache file of one layer's statistics (the model's ``lks_name``, the corpus file name, tokens)."""
    name = getattr(model, "lks_name", "") or type(model).__name__
    width = down_proj(model, layer).in_features
    tag = Path(corpus).name.replace(".", "_")
    return cache_dir() / "stats" / name.replace("/", "--") / f"{tag}-L{layer}-k{width}-n{n_tokens}.safetensors"


def corpus_windows(tok, n_tokens: int, corpus: str | os.PathLike = CORPUS, data_dir: str | None = None) -> torch.Tensor:
    """The corpus's first ``n_tokens`` tokens as ``[windows, SEQ_LEN]`` (the last window may be
    shorter than SEQ_LEN and is dropped unless it is the only one). ``corpus`` is a path or a file
    of the data directory."""
    from lks.datadir import data_file

    if "test" in Path(corpus).name:  # the capability suite scores WikiText-2 test: statistics never see it
        raise ValueError(f"corpus {corpus}: a test split; use the validation split ({CORPUS})")
    path = Path(corpus) if Path(corpus).is_file() else data_file(str(corpus), data_dir)
    text = " ".join(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    ids = tok(text[: 12 * n_tokens], add_special_tokens=False)["input_ids"][:n_tokens]  # ~4-5 chars per token
    if len(ids) < n_tokens:
        raise ValueError(f"{path} holds only {len(ids)} tokens, fewer than the {n_tokens} asked for")
    seq = min(SEQ_LEN, n_tokens)
    return torch.tensor(ids[: n_tokens // seq * seq]).view(-1, seq)


@torch.no_grad()
def _accumulate(model: nn.Module, windows: torch.Tensor, layers: Sequence[int], progress: bool) -> dict[int, torch.Tensor]:
    """Sum of ``k k^T`` over all tokens (float64) per layer, and divided by the token count."""
    dev = model_device(model)
    sums = {i: torch.zeros(down_proj(model, i).in_features, down_proj(model, i).in_features, dtype=torch.float64)
            for i in layers}
    count = 0
    with LayerHooks(model, capture_inputs=[(i, PROJ) for i in layers], stop_after_capture=True) as hooks:
        for b in tqdm(range(0, len(windows), BATCH), desc="key statistics", disable=not progress):
            x = windows[b:b + BATCH].to(dev)
            with suppress(StopForward):
                model(input_ids=x, use_cache=False)
            for i in layers:
                k = hooks.captured_inputs[(i, PROJ)].reshape(-1, sums[i].shape[0]).double().cpu()
                sums[i] += k.T @ k
            count += x.numel()
    return {i: (s / count).float() for i, s in sums.items()}


def key_second_moment(model: nn.Module, tok, layers: Sequence[int], n_tokens: int, *,
                      corpus: str | os.PathLike = CORPUS, data_dir: str | None = None,
                      progress: bool = True) -> dict[int, torch.Tensor]:
    """``E[k k^T]`` ``[intermediate, intermediate]`` of each layer's down_proj inputs over the
    corpus's first ``n_tokens`` tokens, from the cache when there (the missing layers are computed
    in one pass and cached)."""
    from safetensors.torch import load_file

    out: dict[int, torch.Tensor] = {}
    missing = []
    for i in layers:
        path = stats_path(model, i, n_tokens, str(corpus))
        if path.is_file():
            out[i] = load_file(str(path))["mom2"]
        else:
            missing.append(i)
    if missing:
        windows = corpus_windows(tok, n_tokens, corpus, data_dir)
        for i, mom2 in _accumulate(model, windows, missing, progress).items():
            save_tensors(stats_path(model, i, n_tokens, str(corpus)), {"mom2": mom2},
                         metadata={"layer": str(i), "tokens": str(windows.numel()), "corpus": str(corpus)})
            out[i] = mom2
    return {i: out[i] for i in layers}
