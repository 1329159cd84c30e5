"""The package layout docs/DESIGN.md promises, checked from the source: imports go one way (function-level imports
included), no cycles between files or packages, no `_private` name imported across packages, no module over 400
lines, record keys spelled only in schema.py, and no test module importing another."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "collapse_probe"
MAX_LINES = 400

# Layers, low to high: a package may import its own layer or a lower one, never a higher one. Within a layer the
# package graph must still be acyclic. The package root (__init__: the public lazy exports) is the facade on top.
LAYERS: list[set[str]] = [
    {"errors", "schema", "tokens"},                                  # vocabulary
    {"runs", "models", "formats", "world", "tasks"},                 # core: files, weights, syntaxes, tool worlds
    {"capture", "detect", "train", "recover", "integrations"},       # features
    {"commands", "plots", "study"},                                  # the commands' work
    {"cli"},                                                         # the command line
    {"<root>"},                                                      # collapse_probe/__init__.py
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def unit(module: str) -> str:
    """The package a module belongs to (`runs`, `detect`, ...), its own name for a top-level file."""
    parts = module.split(".")
    return "<root>" if len(parts) == 1 else parts[1]


def imports(module: str) -> list[tuple[str, str]]:
    """(target module, imported name) for every import in the module, at any depth (functions included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, "") if sub in MODULES else (target, alias.name))
        elif isinstance(node, ast.Import):
            out.extend((alias.name, "") for alias in node.names)
    return [(t, n) for t, n in out if t in MODULES and t != module]


GRAPH = {m: imports(m) for m in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    color, stack = {}, []

    def visit(n: str) -> list[str] | None:
        color[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if color.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in color and (cyc := visit(m)):
                return cyc
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(edges):
        if n not in color and (cyc := visit(n)):
            return cyc
    return None


def test_every_package_has_a_layer():
    assert {unit(m) for m in MODULES} <= set(RANK), {unit(m) for m in MODULES} - set(RANK)


def test_imports_never_go_up_a_layer():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t, _ in targets if RANK[unit(t)] > RANK[unit(m)]]
    assert not upward, upward


def test_no_cycle_between_files():
    assert find_cycle({m: {t for t, _ in ts} for m, ts in GRAPH.items()}) is None


def test_no_cycle_between_packages():
    edges: dict[str, set[str]] = defaultdict(set)
    for m, targets in GRAPH.items():
        edges[unit(m)].update(unit(t) for t, _ in targets if unit(t) != unit(m))
    assert find_cycle(edges) is None


def test_no_private_name_imported_across_packages():
    bad = [f"{m}: {t}.{n}" for m, targets in GRAPH.items() for t, n in targets
           if unit(t) != unit(m) and (n.startswith("_") or t.rsplit(".", 1)[-1].startswith("_")) and n != "__version__"]
    assert not bad, bad


def test_no_module_over_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def schema_keys() -> set[str]:
    """The record keys schema.py spells: module-level string constants that name a metric (and the prefixes of
    the keys it builds)."""
    keys = set()
    for node in ast.parse((PKG / "schema.py").read_text()).body:
        if isinstance(node, ast.Assign):
            for c in ast.walk(node.value):
                if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value not in ("step", "time"):
                    keys.add(c.value)
    return {k for k in keys if "/" in k or k in {"success", "format_valid", "entropy", "kl", "grad_norm", "loss"}}


KEY_PREFIXES = ("cp/", "gp/", "fmt/", "monitor/", "eval/", "mm/")


def key_literals(path: Path, keys: set[str]) -> list[str]:
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            s = node.value
            if s.startswith(KEY_PREFIXES) or ("/" in s and s in keys):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {s!r}")
    return found


def test_record_keys_are_spelled_only_in_schema():
    keys = schema_keys()
    found = [hit for m, p in MODULES.items() if m != "collapse_probe.schema" for hit in key_literals(p, keys)]
    assert not found, found


def test_no_test_module_imports_another():
    tests = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    bad = []
    for p in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            bad.extend(f"{p.name}: {n}" for n in names if n.split(".")[-1] in tests or n.startswith("tests.test_"))
    assert not bad, bad
