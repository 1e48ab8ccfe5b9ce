"""Bad input on the command line: one ``lks: error:`` line on stderr and exit status 2, no
traceback; ``--debug`` lets the exception through. The tiny model stands in for a real one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_tiny_llama

import lks
from lks import cli
from lks.config import EditorConfig, TrainConfig
from lks.editor import LKSEditor


@pytest.fixture(autouse=True)
def tiny_model_only(monkeypatch, tiny_pair):
    """No test here may load a real model: ``lks.load_model`` returns the tiny pair (3 layers)."""
    monkeypatch.setattr(lks, "load_model", lambda *a, **k: tiny_pair)


def _save_editor(model, tok, out: Path) -> Path:
    editor = LKSEditor(model, tok, EditorConfig(layer=1))
    editor.fit(lks.builtin_edits().head(2), TrainConfig(epochs=1, loc_per_subject=0), progress=False)
    editor.save(out)
    return out


@pytest.fixture(scope="module")
def editors(tmp_path_factory, tiny_pair) -> dict[str, Path]:
    """Saved editors: ``ours`` for the tiny pair, ``other`` for a 2-layer model with its tokenizer."""
    root = tmp_path_factory.mktemp("editors")
    model, tok = tiny_pair
    return {"ours": _save_editor(model, tok, root / "ours"),
            "other": _save_editor(make_tiny_llama(layers=2, vocab=len(tok)), tok, root / "other")}


def _fails(capsys, argv: list[str], *names: str) -> str:
    """Run ``argv``; assert exit status 2 and ONE ``lks: error:`` line naming each of ``names``."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lks: error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _json_file(tmp_path: Path, content: str, name: str = "edits.json") -> str:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------
# --data and --n
# ------------------------------------------------------------------------------------------------

def test_data_file_missing(capsys, tmp_path):
    missing = str(tmp_path / "nope.json")
    _fails(capsys, ["train", "--data", missing, "--out", str(tmp_path / "ed")], missing, "neither a known edit set")


def test_data_malformed_json(capsys, tmp_path):
    path = _json_file(tmp_path, '[{"subject": "Paris",')
    _fails(capsys, ["evaluate", "--data", path, "--editor", str(tmp_path)], "--data", path, "not a valid UTF-8 JSON")


def test_data_not_utf8(capsys, tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"subject": "Zoë"}]'.encode("latin-1"))
    _fails(capsys, ["evaluate", "--data", str(path), "--editor", str(tmp_path)], str(path), "UTF-8")


def test_data_not_a_list(capsys, tmp_path):
    path = _json_file(tmp_path, '{"subject": "Paris"}')
    _fails(capsys, ["train", "--data", path, "--out", str(tmp_path / "ed")], path, "JSON list of records")


def test_data_unknown_record_format(capsys, tmp_path):
    path = _json_file(tmp_path, '[{"question": "Where is Paris?", "answer": "France"}]')
    _fails(capsys, ["train", "--data", path, "--out", str(tmp_path / "ed")], path, "unrecognised record format",
           "question")


def test_data_subject_not_in_prompt(capsys, tmp_path):
    record = {"subject": "Paris", "prompt": "The capital of France is", "target": "Rome", "case_id": 0}
    path = _json_file(tmp_path, json.dumps([record]))
    _fails(capsys, ["train", "--data", path, "--out", str(tmp_path / "ed")], path, "record 0", "'Paris'")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_n_not_positive(capsys, tmp_path, n):
    _fails(capsys, ["train", "--data", "builtin", "--n", n, "--out", str(tmp_path / "ed")], "--n", n)


# ------------------------------------------------------------------------------------------------
# --editor
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["evaluate", "generate", "capability"])
def test_editor_directory_missing(capsys, monkeypatch, tmp_path, command):
    def no_model(*a, **k):  # capability would run its whole unedited pass before loading the editor
        raise AssertionError("--editor must be checked before the model is loaded")

    monkeypatch.setattr(lks, "load_model", no_model)
    missing = str(tmp_path / "no-editor")
    extra = {"evaluate": ["--data", "builtin", "--n", "2"], "generate": ["The capital of France is"],
             "capability": ["--tasks", "sst2"]}[command]
    _fails(capsys, [command, "--editor", missing, *extra], "--editor", missing, "no such directory")


def test_editor_config_not_json(capsys, tmp_path, editors):
    ed = shutil.copytree(editors["ours"], tmp_path / "ed")
    (ed / "config.json").write_text("{ truncated", encoding="utf-8")
    _fails(capsys, ["evaluate", "--editor", str(ed), "--data", "builtin", "--n", "2"],
           str(ed / "config.json"), "corrupt checkpoint file")


def test_editor_config_missing_section(capsys, tmp_path, editors):
    ed = shutil.copytree(editors["ours"], tmp_path / "ed")
    cfg = json.loads((ed / "config.json").read_text())
    del cfg["editor"]
    (ed / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    _fails(capsys, ["generate", "--editor", str(ed), "The capital of France is"], "--editor", str(ed),
           "missing key 'editor'")


def test_editor_for_another_model(capsys, editors):
    other = str(editors["other"])
    _fails(capsys, ["evaluate", "--editor", other, "--data", "builtin", "--n", "2"], other, "2 layers", "3 layers")


def test_editor_scope_file_missing(capsys, tmp_path, editors):
    ed = shutil.copytree(editors["ours"], tmp_path / "ed")
    (ed / "scope.safetensors").unlink()
    _fails(capsys, ["generate", "--editor", str(ed), "x"], str(ed / "scope.safetensors"), "missing")


# ------------------------------------------------------------------------------------------------
# train options
# ------------------------------------------------------------------------------------------------

def test_layer_out_of_range(capsys, tmp_path):
    _fails(capsys, ["train", "--data", "builtin", "--n", "2", "--layer", "7", "--out", str(tmp_path / "ed")],
           "--layer", "layer 7", "0..2")


@pytest.mark.parametrize(("option", "value"), [("--epochs", "0"), ("--lr", "-1"), ("--batch-size", "0")])
def test_train_config_invalid(capsys, tmp_path, option, value):
    _fails(capsys, ["train", "--data", "builtin", "--n", "2", "--layer", "1", option, value,
                    "--out", str(tmp_path / "ed")], "invalid training option", option.lstrip("-").replace("-", "_"))


def test_train_out_is_a_file(capsys, tmp_path):
    out = _json_file(tmp_path, "", name="not-a-dir")
    _fails(capsys, ["train", "--data", "builtin", "--n", "2", "--layer", "1", "--out", out], "--out", out)


def test_device_and_dtype_invalid(capsys, tmp_path):
    argv = ["train", "--data", "builtin", "--n", "2", "--out", str(tmp_path / "ed")]
    _fails(capsys, [*argv, "--device", "gpu0"], "--device", "'gpu0'")
    _fails(capsys, [*argv, "--dtype", "float8"], "--dtype", "'float8'")


# ------------------------------------------------------------------------------------------------
# capability options (checked before the model loads: load_model must not be reached)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "names"), [
    (["--task-options", '{"gsm8k": {max_new_tokens: 1}}'], ["--task-options", "not valid JSON"]),
    (["--task-options", '["gsm8k"]'], ["--task-options", "JSON object of per-task objects"]),
    (["--limit", "sst2=ten"], ["--limit", "'sst2=ten'"]),
    (["--num-fewshot", "rte:2"], ["--num-fewshot", "'rte:2'"]),
    (["--out", "no/such/folder/cap-"], ["--out", "no/such/folder/cap-", "does not exist"]),
])
def test_capability_options_invalid(capsys, monkeypatch, argv, names):
    def no_model(*a, **k):
        raise AssertionError("the options must be checked before the model is loaded")

    monkeypatch.setattr(lks, "load_model", no_model)
    _fails(capsys, ["capability", "--tasks", "sst2", *argv], *names)


# ------------------------------------------------------------------------------------------------
# argparse's own errors (usage line + error, status 2) and --debug
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["train", "--data", "builtin", "--out", "x", "--generator", "giant"],
                                  ["train", "--data", "builtin", "--out", "x", "--resume", "maybe"]])
def test_argparse_errors(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lks train") and "lks train: error: argument" in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    missing = str(tmp_path / "nope.json")
    argv = ["train", "--data", missing, "--out", str(tmp_path / "ed")]
    argv = ["--debug", *argv] if where == "before" else [argv[0], "--debug", *argv[1:]]
    with pytest.raises(FileNotFoundError, match="neither a known edit set"):
        cli.main(argv)


def test_debug_documented():
    assert "--debug" in cli.build_parser().format_help()


def test_bugs_are_not_reported_as_bad_input(monkeypatch, tmp_path):
    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(lks, "load_model", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["train", "--data", "builtin", "--n", "2", "--out", str(tmp_path / "ed")])


def test_python_m_lks_exit_status(tmp_path):
    """The real entry point: status 2 and exactly one stderr line (the --data check runs before any
    model is loaded, so this needs no model)."""
    missing = str(tmp_path / "nope.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "lks", "train", "--data", missing, "--out", str(tmp_path / "ed")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"lks: error: {missing} is neither a known edit set ('counterfact', "
                                        "'zsre', 'builtin') nor an existing file"]
