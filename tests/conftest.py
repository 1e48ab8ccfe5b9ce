"""Shared fixtures: a tiny random Llama built in code (fast) and the embedded model (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def make_tiny_llama(layers: int = 2, hidden: int = 48, vocab: int = 320, seed: int = 0):
    """A 2-layer random LlamaForCausalLM (hidden 48), frozen, float32, with lks_name set."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lks_name = "tiny-llama"
    return model


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (float32, CPU) and its tokenizer."""
    import lks

    try:
        return lks.load_model("smollm2-135m", device="cpu")
    except FileNotFoundError as e:  # pragma: no cover - CI installs it
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The benchmark data directory ($LKS_DATA_DIR or ../shared/data); skips when absent."""
    root = Path(os.environ.get("LKS_DATA_DIR", SHARED_DATA))
    if not root.is_dir():
        pytest.skip(f"benchmark data directory {root} not found (set LKS_DATA_DIR)")
    return root


TINY_CORPUS = [
    "The mother tongue of Danielle Darrieux is French", "Danielle Darrieux's native language is French",
    "The capital of France is Paris", "Paris is the capital city of France", "Berlin is in Germany",
    "The official religion of Edwin of Northumbria is Christianity", "Toko Yasuda plays the guitar",
    "Apple is headquartered in Cupertino", "The native language of Zoë Saldaña is English and Spanish",
    "was born in", "works in the field of", "is a citizen of", "is located in", "English Islam Swedish",
]


def make_tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in code on a tiny corpus (offsets, padding, no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TINY_CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="session")
def tiny_pair():
    """(tiny random Llama with 3 layers, tiny tokenizer), vocab sizes matched."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(layers=3, vocab=len(tok))
    return model, tok


def prepared_editor(model, tok, edits, cfg, editor_cfg, std: float = 0.0):
    """An editor with its training cache built as ``fit`` builds it (no training step taken).

    ``std`` > 0 sets the generator's weights to N(0, std^2) (seeded), so the edit changes the
    logits (the residual generator's own init is zero). Returns ``(editor, per_edit, seqs, cache)``.
    """
    import torch

    from lks.editor import LKSEditor

    editor = LKSEditor(model, tok, editor_cfg)
    editor.train_config = cfg
    editor._set_edits(edits)
    per_edit, seqs, _ = editor._build_sequences(edits, cfg)
    cache = editor._precompute(seqs, cfg, progress=False)
    if std > 0:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in editor.generator.parameters():
                p.normal_(0, std)
    return editor, per_edit, seqs, cache


CAPABILITY_FIXTURES = Path(__file__).parent / "fixtures" / "capability"


@pytest.fixture(scope="session")
def capability_dir(tmp_path_factory) -> Path:
    """The capability fixtures laid out as a data directory. The WikiText-2 fixture is stored under
    another name (a 215-byte hand-written text; the repository never tracks a file named like the
    real data set) and gets its data-directory name here."""
    import shutil

    root = tmp_path_factory.mktemp("capability-data")
    shutil.copytree(CAPABILITY_FIXTURES, root, dirs_exist_ok=True)
    (root / "wikitext2" / "wiki_test_fixture.txt").rename(root / "wikitext2" / "wiki.test.raw")
    return root
