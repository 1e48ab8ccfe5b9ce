"""The package's shape (issue: modules that own their state): no import cycle, counting imports
under ``if TYPE_CHECKING`` and inside functions; modules, classes and functions short enough to
read. The oracle is the source itself, parsed with ``ast``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lks"
MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 500, 250, 60
# a longer one, and why (reviewed; keep this list short)
LONGER: dict[str, str] = {}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (``from pkg import submodule``: the submodule)."""
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in out if m in known and m != name}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_has_no_import_cycle():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    # the package's __init__ files re-export lazily (importlib), which ast does not see as imports
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_modules_classes_and_functions_are_short():
    long = []
    for name, path in sorted(modules().items()):
        tree = ast.parse(path.read_text())
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE and name not in LONGER:
            long.append(f"module {name}: {n} lines")
        for node in ast.walk(tree):
            size = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
            kind = {ast.ClassDef: ("class", MAX_CLASS), ast.FunctionDef: ("function", MAX_FUNCTION),
                    ast.AsyncFunctionDef: ("function", MAX_FUNCTION)}.get(type(node))
            if kind and size > kind[1] and f"{name}.{node.name}" not in LONGER:
                long.append(f"{kind[0]} {name}.{node.name}: {size} lines")
    assert not long, long


COMMAND = re.compile(r"python |\.py\b|lks (train|evaluate|reproduce|capability)|same commands? ")


def tables_without_a_command(text: str) -> list[str]:
    """Header rows of the markdown tables that name no command or script, neither in their rows
    nor in the section text before them (back to the previous table or heading)."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        if not line.startswith("|---"):
            continue
        j = i - 2
        while j >= 0 and not lines[j].startswith(("## ", "|---")):
            j -= 1
        k = i + 1
        while k < len(lines) and lines[k].startswith("|"):
            k += 1
        if not COMMAND.search("\n".join(lines[j + 1:i - 1] + lines[i + 1:k])):
            out.append(lines[i - 1])
    return out


def test_the_table_checker_flags_a_table_without_a_command():
    assert tables_without_a_command("## A\n\nMeasured.\n\n| a |\n|---|\n| 1 |\n") == ["| a |"]
    assert tables_without_a_command("## A\n\n`python x.py`:\n\n| a |\n|---|\n| 1 |\n") == []


def test_every_experiment_table_names_its_command():
    """Each results table in ``docs/experiments.md`` says which command or script made it (the
    recipe table, which lists settings, is the one exception)."""
    text = (PACKAGE.parent / "docs" / "experiments.md").read_text()
    assert [t for t in tables_without_a_command(text) if not t.startswith("| from | recipe |")] == []
