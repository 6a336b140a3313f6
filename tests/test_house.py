"""The house: which module may import which (lazy imports included), no import cycle in
``eaopd_mp`` or ``bench/``, no module over 600 lines. CONTRIBUTING.md draws the same map."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "eaopd_mp"

# Floors, bottom first. A module imports only from floors below its own, or from modules
# listed before it on its own floor.
FLOORS = [
    ("ground", ["gates", "errors", "layouts", "tp", "options", "core", "reference"]),
    ("chunk loop", ["teachers", "topk", "driver"]),
    ("plan and op", ["plan", "ops"]),
    ("inputs", ["inputs"]),
    ("front doors", ["parallel", "dtensor", "loss", "modules"]),
    ("integrations", ["engines", "hf", "trl", "served", "demo", "sharded",
                      "megatron.layouts", "megatron.forward", "megatron.batch",
                      "megatron.loss", "megatron.teachers", "megatron.steps", "megatron"]),
    ("package", [""]),
]
RANK = {name: (f, i) for f, (_, names) in enumerate(FLOORS) for i, name in enumerate(names)}
MAX_LINES = 600


def _modules(root: Path, package: str | None) -> dict[str, Path]:
    """Module name (relative to the package, ``""`` for its ``__init__``) -> file."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict, package: str | None) -> set[str]:
    """The modules of ``modules`` that ``path`` imports anywhere (functions included).
    ``package``: the package's name for absolute imports (None: sibling scripts, as bench/
    imports ``harness``)."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()

    def add(target: str, names=()):
        """``from target import names``: the modules among ``names``, else ``target``."""
        hits = {f"{target}.{n}".strip(".") for n in names} & set(modules)
        found.update(hits or ({target} & set(modules)))

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:
                base = here[:len(here) - node.level + 1] if node.level > 1 else here
                add(".".join([*base, *([node.module] if node.module else [])]), names)
            elif node.module and package and node.module.split(".")[0] == package:
                add(node.module.removeprefix(package).lstrip("."), names)
            elif node.module and package is None:
                add(node.module, names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if package and a.name.split(".")[0] == package:
                    add(a.name.removeprefix(package).lstrip("."))
                elif package is None:
                    add(a.name)
    found.discard(name)
    return found


def _graph(root: Path, package: str | None) -> dict[str, set[str]]:
    modules = _modules(root, package)
    return {m: _imports(m, p, modules, package) for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


@pytest.mark.parametrize("where", ["eaopd_mp", "bench"])
def test_no_import_cycle(where):
    graph = _graph(ROOT / where, "eaopd_mp" if where == "eaopd_mp" else None)
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_every_module_has_its_floor_and_imports_only_below():
    graph = _graph(PACKAGE, "eaopd_mp")
    missing = sorted(set(graph) - set(RANK))
    assert not missing, f"modules without a floor in FLOORS (and CONTRIBUTING.md): {missing}"
    upward = [f"{m or 'eaopd_mp'} -> {d or 'eaopd_mp'}" for m, deps in sorted(graph.items())
              for d in sorted(deps) if RANK[d] >= RANK[m]]
    assert not upward, f"imports from a lower module to a higher one: {upward}"


def test_modules_stay_short():
    long = {str(p.relative_to(ROOT)): n for where in ("eaopd_mp", "bench")
            for p in (ROOT / where).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checker_sees_lazy_imports_and_cycles(tmp_path):
    """The checks above can fail: a lazy (function-level) import closing a cycle is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .high import g\n    return g\n")
    (pkg / "high.py").write_text("from . import low\n")
    graph = _graph(pkg, "pkg")
    assert graph["low"] == {"high"} and graph["high"] == {"low"}
    assert _cycle(graph) in (["high", "low", "high"], ["low", "high", "low"])
