"""The package's layout keeps its architecture visible: small modules, a pure core that imports
no shell, and no import cycles (read from the source, not by importing it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "operator" / "ebbtide"
MAX_LINES = 400
# policy/ is the pure core: it may read the API models, nothing that does I/O or simulates.
POLICY_MAY_IMPORT = ("ebbtide.api", "ebbtide.policy")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules `path` imports (a package import counts as its __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_policy_core_imports_no_shell():
    known = set(modules())
    strays = {name: sorted(i for i in imports(path, known) if not i.startswith(POLICY_MAY_IMPORT))
              for name, path in modules().items() if name.startswith("ebbtide.policy")}
    assert not {name: found for name, found in strays.items() if found}


def test_there_are_no_import_cycles():
    known = set(modules())
    graph = {name: imports(path, known) - {name} for name, path in modules().items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise AssertionError(" -> ".join((*path[path.index(name):], name)))
        if name in done:
            return
        for child in sorted(graph[name]):
            visit(child, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())
