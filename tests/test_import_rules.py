"""The layering of fedarches, as a test: which top-level unit may import which.

A unit is a subpackage of ``fedarches`` (``format``, ``server``, ...) or a
top-level module (``model``, ``errors``, ...); any module not named below is
its own unit and only the general rules (nobody imports ``cli``, no cycles)
apply to it. Every import counts, including those inside functions, because a
deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedarches"

ANY = None  # "no restriction beyond the general rules"

# unit          -> units it MAY import (ANY: all but the forbidden ones below)
ALLOWED: dict[str, set[str] | None] = {
    "errors": set(),
    "config": {"errors"},
    "atomic": {"errors"},
    "format": {"errors", "config", "atomic"},
    "models": {"config", "errors"},
}
# unit          -> units it must NEVER import
FORBIDDEN: dict[str, set[str]] = {
    "data": {"server", "client", "federation", "cli"},
    "labels": {"model", "server", "client", "federation", "cli"},
    "metrics": {"model", "server", "client", "federation", "cli"},
    "neighbours": {"model", "server", "client", "federation", "cli"},
    "server": {"client", "federation", "cli"},
    "client": {"server", "federation", "cli"},
    "federation": {"cli"},
    "testing": {"cli"},
}
# third-party modules a unit must never import
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "models": {"anndata", "scanpy"},  # pure torch: the model never sees an AnnData
}

# Edges that break the rules today in files this refactor has not reached yet:
# (importer unit, imported unit, importing module). Remove each when fixed.
KNOWN_VIOLATIONS: set[tuple[str, str, str]] = set()
# Unit-level cycles that exist today, as sorted tuples of units.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    return (SRC / f"{name}.py").is_file() or (SRC / name / "__init__.py").is_file()


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fedarches":
        return None
    return parts[1] if len(parts) > 1 else "fedarches"


def _imports(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            if mod == "fedarches":  # from fedarches import errors (not __version__)
                out.extend(f"fedarches.{a.name}" for a in node.names if _is_module(a.name))
    return out


def _edges() -> tuple[dict[tuple[str, str], set[str]], dict[str, set[str]]]:
    """(importer unit, imported unit) -> modules, and unit -> third-party top names."""
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    third: dict[str, set[str]] = defaultdict(set)
    for path in sorted(SRC.rglob("*.py")):
        mod = _module_name(path)
        src = _unit(mod)
        for imported in _imports(path):
            dst = _unit(imported)
            if dst is None:
                third[src].add(imported.split(".")[0])
            elif dst not in (src, "fedarches"):
                edges[(src, dst)].add(mod)
    return edges, third


def _violations() -> set[tuple[str, str, str]]:
    edges, _ = _edges()
    bad: set[tuple[str, str, str]] = set()
    for (src, dst), modules in edges.items():
        allowed = ALLOWED.get(src, ANY)
        wrong = (
            (allowed is not None and dst not in allowed)
            or dst in FORBIDDEN.get(src, set())
            or (dst == "cli" and src != "cli")
        )
        if wrong:
            bad.update((src, dst, m) for m in modules)
    return bad


def _cycles() -> set[tuple[str, ...]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    edges, _ = _edges()
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in edges:
        graph[src].add(dst)
        graph.setdefault(dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.add(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_the_package():
    edges, third = _edges()
    assert ("format", "errors") in edges and "torch" in third["models"]


def test_no_forbidden_edge_between_units():
    bad = _violations()
    new = sorted(bad - KNOWN_VIOLATIONS)
    assert not new, "forbidden imports (importer unit, imported unit, module):\n" + "\n".join(map(str, new))


def test_known_violations_are_still_real():
    """A fixed violation must leave KNOWN_VIOLATIONS, so the list only shrinks."""
    stale = sorted(KNOWN_VIOLATIONS - _violations())
    assert not stale, f"these are fixed, remove them from KNOWN_VIOLATIONS: {stale}"


def test_no_cycle_between_units():
    new = sorted(_cycles() - KNOWN_CYCLES)
    assert not new, f"import cycles between units: {new}"


@pytest.mark.parametrize("unit", sorted(FORBIDDEN_THIRD_PARTY))
def test_forbidden_third_party_imports(unit):
    _, third = _edges()
    assert not third[unit] & FORBIDDEN_THIRD_PARTY[unit]
