"""Command line: ``python -m lks train | evaluate | generate | capability | stats`` (also installed as ``lks``).

Examples::

    python -m lks train --model smollm2-135m --data counterfact --n 100 --out runs/cf-100
    python -m lks evaluate --editor runs/cf-100 --data counterfact --n 100
    python -m lks generate --editor runs/cf-100 "The mother tongue of Danielle Darrieux is"
    python -m lks capability --editor runs/cf-100 --limit sst2=200,rte=277,mmlu=150,wikitext2=3,gsm8k=20
    python -m lks train --method memit --data counterfact --n 100 --out runs/memit-cf-100
    python -m lks stats --method memit      # the key statistics MEMIT/AlphaEdit need, ahead of a fit

Bad input (a missing or malformed file, an invalid option value) is reported as one line on stderr,
``lks: error: ...``, with exit status 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # lks.data/editor import torch: the parser must stay quick
    from lks.data import EditSet
    from lks.editor import LKSEditor


def _bool(text: str) -> bool:
    """Parse a boolean option strictly (``argparse``'s ``type=bool`` treats "False" as true)."""
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


DEBUG_HELP = "on bad input, show the full Python traceback instead of the one-line 'lks: error:' message"


def _common_options(sp: argparse.ArgumentParser) -> None:
    """``--debug``, ``--model``, ``--device``, ``--dtype``."""
    # also accepted after the subcommand; SUPPRESS keeps the subparser's default from
    # overwriting a --debug given before it
    sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sp.add_argument("--model", default="smollm2-135m",
                    help="registered model name (smollm2-135m, llama2-7b-chat, mistral-7b-instruct), "
                         "Hugging Face id or local directory (default: %(default)s)")
    sp.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda:0' (default: %(default)s)")
    sp.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the model's registered dtype)")


def _data_options(sp: argparse.ArgumentParser) -> None:
    """``--data``, ``--data-dir``, ``--n``."""
    sp.add_argument("--data", default="counterfact",
                    help="edit set: counterfact | zsre | builtin | path to a JSON file (default: %(default)s)")
    sp.add_argument("--data-dir", default=None, help="benchmark data directory (default: $LKS_DATA_DIR or ~/.cache/lks/data)")
    sp.add_argument("--n", type=int, default=None, help="use the first N edits (default: all)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lks", description="Latent Knowledge Scalpel: edit facts in a frozen LLM's activations.")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    common, data_args = _common_options, _data_options

    t = sub.add_parser("train", help="fit an editor on an edit set and save it")
    common(t)
    data_args(t)
    _train_options(t)

    e = sub.add_parser("evaluate", help="evaluate a saved editor; prints a JSON summary")
    common(e)
    data_args(e)
    e.add_argument("--editor", required=True, help="directory of a saved editor")
    e.add_argument("--fluency-n", type=int, default=0,
                   help="edits whose prompts and held-out rephrases are continued freely (greedy) for the "
                        "generation-based metrics: gen_reliability, gen_generality, repeat_rate, fluency, distinct_1/2 "
                        "(default: %(default)s, none)")
    e.add_argument("--fluency-tokens", type=int, default=30, help="new tokens per free continuation (default: %(default)s)")

    g = sub.add_parser("generate", help="greedy continuations with the edits applied")
    common(g)
    g.add_argument("--editor", required=True, help="directory of a saved editor")
    g.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate (default: %(default)s)")
    g.add_argument("--unedited", action="store_true", help="also print the unedited model's continuation")
    g.add_argument("prompts", nargs="+", help="prompts to continue")

    s = sub.add_parser("stats", help="compute and cache the key statistics E[kk^T] of MEMIT / AlphaEdit "
                                     "(WikiText-2 validation) ahead of a fit")
    common(s)
    s.add_argument("--method", choices=("memit", "alphaedit", "alphaedit-seq"), default="memit",
                   help="whose registered layer band and token count to use (default: %(default)s)")
    s.add_argument("--layers", default=None, help="comma-separated layers (default: the method's band)")
    s.add_argument("--tokens", type=int, default=None, help="corpus tokens (default: the method's cov_tokens)")
    s.add_argument("--data-dir", default=None, help="benchmark data directory (default: $LKS_DATA_DIR or ~/.cache/lks/data)")

    c = sub.add_parser("capability", help="general-capability tasks (GSM8K, SST-2, RTE, WikiText-2, MMLU) through "
                                          "lm-evaluation-harness, unedited and, with --editor, edited; prints "
                                          "before/after with 95%% CIs and paired p-values")
    common(c)
    _capability_options(c)
    r = sub.add_parser("reproduce", help="the paper's grid: methods x numbers of edits x data sets, one results file per "
                                         "cell, plus general capability at the profile's size; resumable")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    _reproduce_options(r)
    return p


class UsageError(SystemExit):
    """An option value that the command line itself rejects; the message says what to pass instead.

    A ``SystemExit`` so that a helper such as :func:`_task_ints` called outside :func:`main` still
    stops with its message; :func:`main` reports it like any other bad input.
    """


# Exceptions that mean bad input rather than a bug: main() reports them in one line, exit status 2.
# ValueError covers json.JSONDecodeError, UnicodeDecodeError, lks.data.InvalidEditError and
# DataChecksumError and the configs' validation; OSError covers FileNotFoundError, PermissionError
# and IsADirectoryError. Anything else (RuntimeError, TypeError, IndexError, ...) keeps its traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (UsageError, ValueError, OSError, KeyError)


def _capability_options(c: argparse.ArgumentParser) -> None:
    """The ``capability`` subcommand's own options."""
    c.add_argument("--editor", default=None, help="directory of a saved editor (omit: unedited model only)")
    c.add_argument("--tasks", default=",".join(("gsm8k", "sst2", "rte", "wikitext2", "mmlu")),
                   help="comma-separated tasks, run in this order (default: %(default)s)")
    c.add_argument("--limit", default=None,
                   help="items per task: N for every task, or task=N,task=N (wikitext2: articles; default: full sets)")
    c.add_argument("--num-fewshot", default=None, help="few-shot exemplars, task=k,task=k (default: the harness's)")
    c.add_argument("--task-options", default=None, help='per-task options as JSON: gsm8k max_new_tokens, until; wikitext2 max_length '
                        '(window), e.g. \'{"gsm8k": {"max_new_tokens": 128}}\'')
    c.add_argument("--data-dir", default=None, help="benchmark data directory (default: $LKS_DATA_DIR or ~/.cache/lks/data)")
    c.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="seed of the subsets, the harness's few-shot sampling and the bootstrap (default: %(default)s)")
    c.add_argument("--out", default=None, help="write the tidy results (and the comparison) as CSV files with this prefix")


def _train_options(t: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's own options (every recipe option defaults to None: the recipe's)."""
    from lks.config import GENERATOR_KINDS
    from lks.methods import method_names

    t.add_argument("--out", required=True, help="directory to save the editor to (also the checkpoint for resuming)")
    t.add_argument("--method", choices=method_names(), default="lks",
                   help="lks, or a weight-editing baseline with the model's registered hyperparameters "
                        "(configs/<model>.json 'baselines'); the options below are LKS's recipe, and set a "
                        "baseline's setting of the same name where it has one (default: %(default)s)")
    t.add_argument("--layer", type=int, default=None, help="decoder layer whose output holds the knowledge block")
    t.add_argument("--generator", choices=GENERATOR_KINDS, default=None, help="KB generator kind")
    t.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
    t.add_argument("--epochs", type=int, default=None, help="maximum number of epochs")
    t.add_argument("--batch-size", type=int, default=None, help="edits per optimisation step")
    t.add_argument("--loc-per-subject", type=int, default=None, help="locality prompts per subject for the KL loss")
    t.add_argument("--para-per-edit", type=int, default=None,
                   help="extra training paraphrases per edit for the equivalence loss, from the relation "
                        "phrasings that the data sets pair (lks/assets/paraphrase_templates.json)")
    t.add_argument("--train-rephrase", type=_bool, default=None,
                   help="train the equivalence loss on each edit's own first rephrase (true) or hold it out so that "
                        "evaluation scores it as a held-out paraphrase (false, the recipe's)")
    t.add_argument("--w-loc", type=float, default=None, help="weight of the locality (KL) loss")
    t.add_argument("--w-after", type=float, default=None,
                   help="weight of the KL after the target (keeps what follows the new object unedited)")
    t.add_argument("--after-tokens", type=int, default=None,
                   help="positions of that KL: the last target token and the next N-1 tokens of the unedited continuation")
    t.add_argument("--gate-negatives", type=int, default=None,
                   help="--generator gated only: extra locality prompts per edit for the gate loss")
    t.add_argument("--gate-prefixes", type=int, default=None,
                   help="--generator gated only: copies of each edit's gate examples behind another edit's statement")
    t.add_argument("--gate-steps", type=int, default=None,
                   help="--generator gated only: steps of the gate loss alone before the first epoch")
    t.add_argument("--w-gate", type=float, default=None,
                   help="--generator gated only: weight of the gate's open/closed classification loss")
    t.add_argument("--loc-templates", choices=("builtin", "harvested", "both"), default=None,
                   help="relations of the training locality prompts")
    t.add_argument("--precision", choices=("float32", "bfloat16", "auto"), default=None,
                   help="precision of the frozen model's passes during fit")
    t.add_argument("--prefix-cache", type=_bool, default=None,
                   help="cache keys/values of the tokens before the subject (true/false)")
    t.add_argument("--val-edits", type=int, default=None,
                   help="edits with a held-out paraphrase and locality prompt scored after every epoch (0: none)")
    t.add_argument("--val-patience", type=int, default=None,
                   help="with --val-edits: stop after this many epochs without a better score, keep the best epoch")
    t.add_argument("--max-steps", type=int, default=None,
                   help="cap the epochs at ceil(N / steps per epoch) (0: no cap)")
    t.add_argument("--seed", type=int, default=None, help="random seed")
    t.add_argument("--on-conflict", choices=("error", "first"), default="error",
                   help="same subject + prompt with two targets: fail (error) or keep the first (default: %(default)s)")
    t.add_argument("--resume", type=_bool, default=True, help="resume from --out if it holds a checkpoint of the same run (true/false)")
    t.add_argument("--evaluate", type=_bool, default=True, help="evaluate after training and write metrics.json (true/false)")


def _reproduce_options(r: argparse.ArgumentParser) -> None:
    """The options of ``reproduce``."""
    r.add_argument("--profile", required=True, help="params/<PROFILE>/reproduce.json (e.g. cpu-full-smollm2) or a JSON file")
    r.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda:0' (default: %(default)s)")
    r.add_argument("--data-dir", default=None, help="benchmark data directory (default: $LKS_DATA_DIR or ~/.cache/lks/data)")
    r.add_argument("--results", default=None, help="results directory (default: the checkout's results/)")
    r.add_argument("--editors", default=None, help="where fitted editors are kept (default: the checkout's runs/editors/)")
    r.add_argument("--list", action="store_true", help="print the steps still to run and exit (no model is loaded)")
    r.add_argument("--executor", choices=("sequential", "ray"), default="sequential", help="sequential: every step "
                   "here, in order (default); ray: each step a Ray task (pip install 'lks[cluster]'; docs/grid.md)")
    r.add_argument("--address", default=None, help="--executor ray: a running Ray cluster ('auto', 'HOST:6379'); default: a local one")
    r.add_argument("--workers", type=int, default=None, help="--executor ray, local: steps at a time (default: cores / cpus_per_step)")
    r.add_argument("--only", default=None, help="comma-separated shell patterns of cell names to run, e.g. "
                                                "'*/memit-*,zsre/lks-10000' (default: every cell)")
    r.add_argument("--table", action="store_true", help="print the finished cells as markdown tables, one per data set, "
                                                        "and the capability table; exit (no model is loaded)")
    r.add_argument("--write", nargs="+", default=None, metavar="FILE",
                   help="rewrite the <!-- grid-table --> / <!-- grid-summary --> / <!-- grid-capability --> blocks "
                        "of these markdown files from the finished files (README.md, docs/grid.md) and exit")


def _task_ints(text: str | None, what: str) -> int | dict[str, int] | None:
    """``"200"`` -> 200; ``"sst2=200,rte=50"`` -> ``{"sst2": 200, "rte": 50}``."""
    if text is None:
        return None
    try:
        if "=" not in text:
            return int(text)
        return {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(",") if item.strip())}
    except ValueError:
        raise UsageError(f"--{what}: expected N or task=N,task=N, got {text!r}") from None


def _task_options(text: str | None) -> dict[str, dict[str, Any]] | None:
    """``--task-options`` parsed: a JSON object of per-task option objects."""
    if text is None:
        return None
    example = '\'{"gsm8k": {"max_new_tokens": 128}}\''
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--task-options: not valid JSON ({e}); expected e.g. {example}") from None
    # anything else than {task: {...}} would fail deep inside evaluate_capability
    if not isinstance(opts, dict) or not all(isinstance(v, dict) for v in opts.values()):
        raise UsageError(f"--task-options: expected a JSON object of per-task objects, e.g. {example}; got {text!r}")
    return opts


def _check_model_options(args: argparse.Namespace) -> None:
    """Reject a malformed ``--device`` or ``--dtype`` before a model is loaded (torch's own error
    for a bad device string is a RuntimeError, which would pass for a bug)."""
    import torch

    from lks.utils import resolve_dtype

    try:
        if args.device != "auto":
            torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {args.device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if getattr(args, "dtype", None) is not None:
        try:
            resolve_dtype(args.dtype)
        except ValueError as e:
            raise UsageError(f"--dtype: {e}") from None


def _edits(args: argparse.Namespace) -> EditSet:
    """The ``--data`` edit set; errors that do not name the file (JSON syntax, encoding) get its name."""
    import lks

    # load_edits takes n=0 (an empty set) and says "n must be ..." for a negative one
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n: expected a positive number of edits, got {args.n}")
    try:
        return lks.load_edits(args.data, data_dir=args.data_dir, n=args.n)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # json.load raises these without the path
        raise ValueError(f"--data {args.data}: not a valid UTF-8 JSON file ({e}); fix it or pass another "
                         "edit set") from e


def _load_editor(path: str, model: Any, tok: Any) -> LKSEditor:
    """The saved editor of ``--editor`` (LKS or a baseline, by its config's ``method``), naming the
    option and directory where the errors do not."""
    from lks.methods import load_editor

    try:
        return load_editor(path, model, tok)
    except KeyError as e:  # a config.json or subjects.json that parses but lacks a section
        raise ValueError(f"--editor {path}: corrupt saved editor, missing key {e}; train it again") from e


def _capability_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``evaluate_capability`` from the options, checked before a model loads."""
    if args.out and not Path(f"{args.out}x").parent.is_dir():  # else it fails after the whole run
        raise UsageError(f"--out {args.out}: the folder of this CSV prefix does not exist; create it first")
    return dict(tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], data_dir=args.data_dir,
                limit=_task_ints(args.limit, "limit"), seed=args.seed, batch_size=args.batch_size,
                num_fewshot=_task_ints(args.num_fewshot, "num-fewshot"), task_options=_task_options(args.task_options))


def _capability(args: argparse.Namespace, model: Any, tok: Any, kw: dict[str, Any]) -> int:
    import time

    import pandas as pd

    from lks.capability import compare_capability, evaluate_capability

    t0 = time.perf_counter()
    before = evaluate_capability(model, tok, **kw)
    print(f"unedited: {time.perf_counter() - t0:.1f} s")
    cols = ["task", "metric", "value", "ci_low", "ci_high", "n", "seconds"]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(before[cols].to_string(index=False))
        frames = {"unedited": before}
        if args.editor:
            editor = _load_editor(args.editor, model, tok)
            t0 = time.perf_counter()
            after = evaluate_capability(model, tok, editor=editor, **kw)
            print(f"\nwith {editor.n_edits} edits ({args.editor}): {time.perf_counter() - t0:.1f} s")
            print(after[cols + ["routed", "rows_seen"]].to_string(index=False))
            comp = compare_capability(before, after)
            print("\nafter - before (paired on the same items: exact McNemar for accuracies, bootstrap for perplexities):")
            shown = ["task", "metric", "before", "after", "diff", "diff_ci_low", "diff_ci_high", "p_value", "n_pairs", "note"]
            print(comp.loc[comp.task.isin(kw["tasks"]), shown].to_string(index=False))
            frames.update(edited=after, comparison=comp)
    if args.out:
        for name, df in frames.items():
            df.to_csv(f"{args.out}{name}.csv", index=False)
    return 0


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (some, e.g. a missing data file's, span several)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # KeyError's str() is a repr
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 on bad input (:data:`INPUT_ERRORS`), reported as ONE line
        ``lks: error: ...`` on stderr. With ``--debug`` such an error propagates with its
        traceback instead. Malformed arguments exit through argparse (status 2 and a usage line);
        any other exception is a bug and always propagates.
    """
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except INPUT_ERRORS as e:
        if args.debug:
            raise
        print(f"lks: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    """The subcommand's work (see :func:`main`)."""
    import lks
    from lks.metrics import evaluate_edits

    # the checks of files and option values come before the model: loading a 7B model takes minutes
    _check_model_options(args)
    kw = _capability_kwargs(args) if args.command == "capability" else {}
    edits = _edits(args) if args.command in ("train", "evaluate") else None
    if getattr(args, "editor", None) and not Path(args.editor).is_dir():
        raise UsageError(f"--editor {args.editor}: no such directory; pass the --out directory of an 'lks train' run")
    if args.command == "train" and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory; pass a directory for the editor")
    if args.command == "train":
        from lks.methods import editor_class

        names = editor_class(args.method).setting_names()
        foreign = sorted(set(_given(args, TRAIN_OPTIONS)) - names)
        if foreign:
            raise UsageError(f"--{foreign[0].replace('_', '-')}: not a setting of --method {args.method} (its settings: "
                             f"{', '.join(sorted(names))}); the rest come from configs/<model>.json")
    if args.command == "stats" and args.layers is not None:
        try:
            args.layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--layers: expected comma-separated layer numbers, got {args.layers!r}") from None
    if args.command == "reproduce":
        return _reproduce(args)
    model, tok = lks.load_model(args.model, device=args.device, dtype=args.dtype)
    if args.command == "stats":
        return _stats(args, model, tok)
    if args.command == "generate":
        editor = _load_editor(args.editor, model, tok)
        edited = editor.generate(args.prompts, max_new_tokens=args.max_new_tokens)
        base = editor.generate(args.prompts, max_new_tokens=args.max_new_tokens, edited=False) if args.unedited else None
        for i, prompt in enumerate(args.prompts):
            print(f"{prompt} -> {edited[i]!r}" + (f"   (unedited: {base[i]!r})" if base else ""))
        return 0

    if args.command == "capability":
        return _capability(args, model, tok, kw)
    if args.command == "train":
        return _train(args, model, tok, edits)
    editor = _load_editor(args.editor, model, tok)
    _, summary = evaluate_edits(editor, edits, fluency_n=args.fluency_n, fluency_tokens=args.fluency_tokens)
    print(json.dumps(summary, indent=2))
    return 0


def _given(args: argparse.Namespace, names: list[str]) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


# train's options that set a method's setting of the same name
TRAIN_OPTIONS = ["layer", "generator", "lr", "epochs", "batch_size", "loc_per_subject", "para_per_edit", "train_rephrase",
                 "w_loc", "w_after", "after_tokens", "w_gate", "gate_negatives", "gate_prefixes", "gate_steps", "seed",
                 "loc_templates", "precision", "prefix_cache", "val_edits", "val_patience", "max_steps"]


def _train(args: argparse.Namespace, model: Any, tok: Any, edits: EditSet) -> int:
    """``train``: the method's registered settings with the given options, fit (resuming from
    ``--out``), save to ``--out``, evaluate into metrics.json."""
    from lks.methods import editor_class

    cls = editor_class(args.method)
    try:
        ecfg, fcfg = cls.configs(model, _given(args, TRAIN_OPTIONS))
        editor = cls(model, tok, ecfg)
    except ValueError as e:  # the configs' validation names the field, not the option
        raise UsageError(f"invalid training option: {e}; set it with the option of that name (lks train --help)") from None
    except IndexError as e:  # the registered default layer too may not fit a model given by path
        raise UsageError(f"--layer: {e}") from None
    history = editor.fit(edits, fcfg, checkpoint_dir=args.out, resume=args.resume, on_conflict=args.on_conflict)
    editor.save(args.out)
    print(json.dumps({"method": args.method, "steps": len(history), "fit_seconds": round(editor.fit_seconds, 1),
                      "final_loss": history[-1].get("loss") if history else None}))
    if args.evaluate:
        _evaluate_into(args.out, editor, edits)
    return 0


def _evaluate_into(out: str, editor: Any, edits: EditSet) -> None:
    """``train --evaluate``: the fitted editor's evaluation (with its fit seconds) to ``out/metrics.json``."""
    from lks.metrics import evaluate_edits
    from lks.utils import write_json

    _, summary = evaluate_edits(editor, edits)
    summary["fit_seconds"] = editor.fit_seconds
    write_json(Path(out) / "metrics.json", summary)
    print(json.dumps(summary, indent=2))


def _reproduce(args: argparse.Namespace) -> int:
    """``reproduce``: every pending step of a grid profile (:mod:`lks.grid`), or with ``--list`` the list."""
    import lks
    from lks import report
    from lks.grid import REPO, Grid, load_profile

    profile = load_profile(args.profile)
    where = {k: Path(v) for k, v in (("results_dir", args.results), ("editors_dir", args.editors)) if v}
    if args.table or args.write:
        report.publish(where.get("results_dir", REPO / "results"), profile, args.write, show=args.table)
        return 0
    only = [p.strip() for p in (args.only or "").split(",") if p.strip()]
    grid = Grid(profile, None, None, data_dir=args.data_dir, **where)
    if args.list:
        for step in grid.plan(only):
            rescore = step.kind == "edit" and grid.status(step.cell) == "rescore"
            again = step.kind == "capability" and grid.capability_status(step.cell) == "stale"  # its file: an earlier fit
            print(f"{step.name}" + (" (re-score)" if rescore else " (again)" if again else "")
                  + (f"  after: {', '.join(step.after)}" if step.after else ""))
        return 0
    if args.executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise UsageError("--executor ray needs Ray: pip install 'lks[cluster]' (or pip install ray)")
        from lks import cluster

        try:
            cluster.run(grid, only, device=args.device, address=args.address, workers=args.workers)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    grid.model, grid.tokenizer = lks.load_model(profile.model, device=args.device)
    grid.run(only)  # a line per step; each step's progress in its log file (lks.grid.Grid.log_path)
    return 0


def _stats(args: argparse.Namespace, model: Any, tok: Any) -> int:
    """``stats``: compute (or find in the cache) the key statistics of a method's layer band."""
    from lks.baselines.stats import key_second_moment, stats_path
    from lks.methods import editor_class

    cfg = editor_class(args.method)(model, tok).config
    layers, tokens = args.layers or cfg.layers, args.tokens or cfg.cov_tokens
    key_second_moment(model, tok, layers, tokens, corpus=cfg.corpus, data_dir=args.data_dir)
    for layer in layers:
        print(stats_path(model, layer, tokens, cfg.corpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
