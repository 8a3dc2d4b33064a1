"""The import graph: imports flow one way, and only the CLI imports cifarlab modules lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cifarlab"

# The layers, lowest first. A module may import from its own layer or any layer below it.
LAYERS = [
    {"errors", "files"},
    {"config"},
    {"hardware", "imaging", "index", "models", "kerasfast", "kerasnet", "builders"},
    {"data"},
    {"dupes", "callbacks"},
    {"tblog"},
    {"runs"},
    {"infer", "export"},
    {"loader", "optim", "checkpoint", "step"},
    {"trainer", "kerasfit"},
    {"doctor"},
    {"tune", "serve"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(cifarlab modules imported at module level, (line, module) imported inside a body)."""
    tree = ast.parse(path.read_text(), str(path))
    top: set[str] = set()
    nested: list[tuple[int, str]] = []

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        return []

    def visit(node: ast.AST, depth: int, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, depth, True)
                continue
            found = [n for n in names(child) if n == "cifarlab" or n.startswith("cifarlab.")]
            if found and not type_checking:
                if depth:
                    nested.extend((child.lineno, n) for n in found)
                else:
                    top.update(found)
            inner = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            visit(child, depth + inner, type_checking)

    visit(tree, 0, False)
    return top, nested


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        top, _ = _imports(path)
        # `from cifarlab.data import load_data` names cifarlab.data.load_data: keep real modules
        graph[name] = {m for m in top if m in modules and m != name}
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else ""
    for i, layer in enumerate(LAYERS):
        if key in layer:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it")


def test_no_function_level_imports_of_cifarlab_outside_the_cli():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "cli.py":
            continue
        _, nested = _imports(path)
        offenders += [f"{path.relative_to(SRC)}:{line}: {mod}" for line, mod in nested]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_flow_down_the_layers():
    upward = []
    for module, deps in _graph().items():
        if module == "cifarlab":
            continue
        for dep in deps:
            if dep != "cifarlab" and _layer(dep) > _layer(module):
                upward.append(f"{module} imports {dep}")
    assert not upward, "\n".join(sorted(upward))


def test_public_train_is_the_function_on_every_access():
    code = (
        "import cifarlab, cifarlab.trainer, cifarlab.runs\n"
        "from cifarlab import train\n"
        "import cifarlab as c\n"
        "assert callable(train) and train is c.train is cifarlab.trainer.train, train\n"
        "from cifarlab import train as again\n"
        "assert again is train\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_importing_cifarlab_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c",
                          "import sys, cifarlab, cifarlab.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_no_source_file_over_the_size_limit_unless_listed():
    # One idea each, even when long: the doctor's monitor (one callback and its samplers), the
    # content index (one hash table), the CLI (one command per function, nothing else).
    allowed = {"doctor/monitor.py", "index.py", "cli.py"}
    long = [f"{p.relative_to(SRC)}: {n} lines" for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420
            and str(p.relative_to(SRC)) not in allowed]
    assert not long, "\n".join(long)
