"""Shared fixtures: a tiny random Llama built in code (fast) and the embedded model (slow)."""

from __future__ import annotations

import contextlib
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
    """The benchmark data directory: ``$LKS_DATA_DIR``, else ``../shared/data``.

    Without either the data-dependent tests are skipped (``pytest -rs`` lists them). When
    ``LKS_DATA_DIR`` is set, a missing directory or file is a failure, never a skip: a run that was
    given data must not pass by silently testing less."""
    given = os.environ.get("LKS_DATA_DIR")
    if given:
        if not Path(given).is_dir():
            pytest.fail(f"LKS_DATA_DIR={given} is not a directory")
        return Path(given)
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no benchmark data: LKS_DATA_DIR is not set and {SHARED_DATA} does not exist")
    return SHARED_DATA


def data_file(root: Path, relative: str) -> Path:
    """A file of the data directory ``root``; missing: a failure when ``LKS_DATA_DIR`` names the
    directory, else a skip (an incomplete fallback copy)."""
    path = root / relative
    if not path.is_file():
        message = f"benchmark data file {path} not found"
        if os.environ.get("LKS_DATA_DIR"):
            pytest.fail(message + " (LKS_DATA_DIR is set)")
        pytest.skip(message)
    return path


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


# The plain training settings the unit tests build on, independent of the recipe (the
# TrainConfig defaults): float32 (exact comparisons), no KL after the target, no bank
# paraphrases, generic locality relations, no prefix cache; a test sets what it tests.
PLAIN_TRAIN = dict(precision="float32", w_loc=1.0, w_after=0.0, after_tokens=1, gate_prefixes=0,
                   loc_templates="builtin", para_per_edit=0, train_rephrase=True, prefix_cache=False)


def prepared_editor(model, tok, edits, cfg, editor_cfg, std: float = 0.0):
    """An editor and its :class:`lks.training.Trainer`, prepared as ``fit`` prepares them (no
    training step taken).

    ``std`` > 0 sets the generator's weights to N(0, std^2) (seeded), so the edit changes the
    logits (the residual generator's own init is zero). Returns ``(editor, trainer)``.
    """
    import torch

    from lks.editor import LKSEditor
    from lks.training import Trainer

    editor = LKSEditor(model, tok, editor_cfg)
    editor.train_config = cfg
    trainer = Trainer(editor, cfg).prepare(edits, progress=False)
    if std > 0:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in editor.generator.parameters():
                p.normal_(0, std)
    return editor, trainer


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


@contextlib.contextmanager
def interrupted_at_step(step: int):
    """Inside the block, training step number ``step`` (counted from 1 across the fit) raises
    KeyboardInterrupt, as a fit killed mid-epoch would stop."""
    from lks.training import Trainer

    real, calls = Trainer.batch_loss, []

    def crashing(self, batch, **kw):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(self, batch, **kw)

    Trainer.batch_loss = crashing
    try:
        yield
    finally:
        Trainer.batch_loss = real
