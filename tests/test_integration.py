"""Integration tests on the embedded SmolLM2-135M-Instruct: what only a real model shows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lks
from lks.config import EditorConfig, TrainConfig
from lks.data import subject_positions
from lks.hooks import LayerHooks

pytestmark = pytest.mark.slow


def test_embedded_model_knows_paris(smol):
    model, tok = smol
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    assert tok.pad_token is not None
    enc = tok(["The capital of France is"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


def test_embedded_tokenizer_and_weights_as_recorded(smol):
    """The converted GGUF model: dense layers, no quantization config, and token ids as every recorded
    result has them: one leading BOS (transformers 4.x's conversion added it; 5.x follows the file's
    add_bos_token=False unless lks.models asks), EOS as the file says. Oracle: the GGUF metadata."""
    from gguf import GGUFReader

    model, tok = smol
    fields = GGUFReader(str(lks.models.embedded_model_path())).fields
    bos, eos = (int(fields[f"tokenizer.ggml.{k}_token_id"].contents()) for k in ("bos", "eos"))
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == bos and bos not in ids[1:]
    assert tok.eos_token_id == eos
    assert getattr(model.config, "quantization_config", None) is None
    assert all(type(m).__name__ == "Linear" for m in model.modules() if "Linear" in type(m).__name__)


def test_swapping_a_subject_block_moves_the_answer(smol):
    """France's block (layer 12) in a prompt about Germany changes the next-token distribution,
    and leaves every position before the subject untouched."""
    model, tok = smol
    layer = 12
    enc, pos = subject_positions(tok, ["The capital of France is", "The capital of Germany is"], ["France", "Germany"], "right")
    with LayerHooks(model, capture=[layer]) as hooks:
        base = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    france = hooks.captured[layer][0, pos[0]]
    with LayerHooks(model, edit_layer=layer) as hooks:
        hooks.replace([1], [int(pos[1])], france[None])
        swapped = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    p = int(pos[1])
    assert torch.allclose(swapped[:, :p], base[:, :p], atol=1e-5)   # causal: nothing before changes
    assert torch.allclose(swapped[0], base[0], atol=1e-5)            # the other row is untouched
    last = int(enc["attention_mask"][1].sum()) - 1
    kl = torch.nn.functional.kl_div(swapped[1, last].log_softmax(-1), base[1, last].log_softmax(-1),
                                    log_target=True, reduction="sum")
    assert kl > 0.1
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    assert swapped[1, last].softmax(-1)[paris] > base[1, last].softmax(-1)[paris]


def test_token_layer_swap_against_plain_runs(smol):
    """Oracles from plain forward passes: a swap of A's own state changes nothing (P equals the
    unedited value everywhere when B is A), and the swap at the prompt's last position at the
    last layer hands over B's whole final state, so P(B's object) equals B's own prediction."""
    from lks.study import first_target_token, token_layer_swap

    model, tok = smol
    by = {r.subject: r for r in lks.builtin_edits()}
    a, b = by["France"], by["Japan"]
    n_layers = len(lks.get_layers(model))
    same = token_layer_swap(model, tok, a, a, layers=[0, n_layers - 1])
    assert same.p_b.to_numpy() == pytest.approx(same.p_b_base.to_numpy(), abs=1e-5)
    df = token_layer_swap(model, tok, a, b, layers=[n_layers - 1])
    tok_b = first_target_token(tok, [b.prompt], [b.ground_truth])[0]
    with torch.inference_mode():
        own = model(**tok(b.prompt, return_tensors="pt")).logits[0, -1].float().softmax(-1)[tok_b]
    assert float(df.p_b.iloc[-1]) == pytest.approx(float(own), abs=1e-4)
    assert int(df.is_subject_last.sum()) == 1 and df[df.is_subject_last].token.iloc[0].strip() == "France"
    with pytest.raises(ValueError, match="equal token length"):
        token_layer_swap(model, tok, a, lks.EditRecord("Bosnia and Herzegovina", "The capital of Bosnia and Herzegovina is",
                                                       "Sarajevo", "Sarajevo"))


def test_paraphrase_ceiling_counts_a_repeated_prompt_as_known(smol):
    """Oracle: a 'paraphrase' that is the edit prompt itself is answered exactly when the prompt is,
    so every known fact counts once; a paraphrase about another subject's fact is not counted
    for a record the model does not know on its prompt."""
    import dataclasses

    from lks.study import known_facts, paraphrase_ceiling

    model, tok = smol
    # the shipped facts are ones the model knows; every other one gets a false "true" object (its
    # counterfactual target), which the model does not predict
    recs = [dataclasses.replace(r, rephrases=["unused", r.prompt], ground_truth=r.ground_truth if i % 2 else r.target)
            for i, r in enumerate(lks.builtin_edits().head(40))]
    known = known_facts(model, tok, lks.EditSet(recs))
    got = paraphrase_ceiling(model, tok, lks.EditSet(recs))
    assert 0 < len(known) < len(recs)
    assert got == {"records": len(recs), "known_on_prompt": len(known), "paraphrases_of_known": len(known),
                   "known_on_paraphrase": len(known)}


@pytest.fixture(scope="module")
def fitted(smol):
    model, tok = smol
    edits = lks.builtin_edits().head(16)
    editor = lks.LKSEditor(model, tok, EditorConfig(layer=20, generator="residual"))
    editor.fit(edits, TrainConfig(lr=1e-3, epochs=12, batch_size=2, loc_per_subject=2), progress=False)
    return editor, edits


def test_edits_take_and_unrelated_prompts_are_untouched(fitted):
    editor, edits = fitted
    from lks.metrics import evaluate_edits

    _, s = evaluate_edits(editor, edits)
    assert s["reliability"] >= 0.9 > s["reliability_base"]
    assert s["scope_recall_prompt"] == 1.0
    unrelated = ["The largest planet in the solar system is", "Water boils at a temperature of"]
    assert editor.generate(unrelated, max_new_tokens=6) == editor.generate(unrelated, max_new_tokens=6, edited=False)


def test_capability_suite_runs_through_the_editor(fitted, data_root):
    from lks.capability import evaluate_capability

    editor, _ = fitted
    df = evaluate_capability(editor.model, editor.tokenizer, tasks=("sst2",), data_dir=data_root, limit=8,
                             editor=editor, progress=False)
    row = df[df.task == "sst2"].iloc[0]
    assert row["rows_seen"] >= 8 and 0 <= row["value"] <= 1


def test_cli_train_and_generate(tmp_path):
    out = tmp_path / "ed"
    run = [sys.executable, "-m", "lks"]
    r = subprocess.run(run + ["train", "--data", "builtin", "--n", "6", "--epochs", "2", "--out", str(out),
                              "--evaluate", "false"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["n_edits"] == 6
    r = subprocess.run(run + ["generate", "--editor", str(out), "--max-new-tokens", "3", "The capital of France is"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "The capital of France is ->" in r.stdout
    r = subprocess.run(run + ["train", "--out", str(out), "--evaluate", "False", "--generator", "bogus"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr
