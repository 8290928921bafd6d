"""Reads the imports of a source tree with `ast` and checks them against a table of allowed
edges between folders, for import cycles and for private names used across modules.

The checker knows nothing of actmap: tests/test_architecture.py gives it actmap's table, and a
test runs it over a small planted package to show it reports what it should."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import networkx as nx

Where = Literal["module", "function", "types"]


@dataclass(frozen=True)
class Import:
    """One import statement's edge. `where` is "function" inside a def, "types" under
    `if TYPE_CHECKING:`, else "module" (what runs when the module is imported)."""

    source: str
    target: str  # a module of the tree, or the dotted name of an outside one
    name: str | None  # the name taken by `from target import name`, None for a module
    where: Where
    line: int


@dataclass(frozen=True)
class Violation:
    source: str
    target: str
    rule: str
    detail: str = ""

    @property
    def key(self) -> str:
        return f"{self.source} -> {self.target}: {self.rule}"

    def __str__(self) -> str:
        return f"{self.key} ({self.detail})" if self.detail else self.key


@dataclass(frozen=True)
class Allow:
    """A cell of the table: the edge is allowed when `test` holds for the import."""

    label: str
    test: Callable[[Import], bool]


YES = Allow("", lambda _: True)
TYPES_ONLY = Allow("for types only", lambda i: i.where == "types")


def only(*modules: str, label: str) -> Allow:
    return Allow(label, lambda i: i.target in modules)


@dataclass(frozen=True)
class Forbidden:
    """Outside packages a group of modules must not import (where listed in `wheres`)."""

    label: str
    applies: Callable[[str], bool]
    packages: frozenset[str]
    wheres: frozenset[Where] = frozenset({"module", "function", "types"})


@dataclass(frozen=True)
class Layers:
    folder: Callable[[str], str]  # module -> its row and column in the table
    allowed: Mapping[tuple[str, str], Allow]  # (from, to); the same folder is always allowed
    forbidden: Sequence[Forbidden] = field(default_factory=tuple)


def modules(root: Path, packages: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, Where]]:
    """Every import statement with where it sits, however deeply nested."""

    def walk(node: ast.AST, where: Where) -> Iterator[tuple[ast.Import | ast.ImportFrom, Where]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, where
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, "function")
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.body:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), "types")
                for statement in child.orelse:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), where)
            else:
                yield from walk(child, where)

    yield from walk(tree, "module")


def _resolve(dotted: str, known: Mapping[str, Path]) -> str:
    """The deepest module of the tree that `dotted` names, or `dotted` itself if outside."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return dotted


def _base(module: str, path: Path, statement: ast.ImportFrom) -> str:
    if not statement.level:
        return statement.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(statement.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{statement.module}" if statement.module else package


def imports_of(module: str, path: Path, known: Mapping[str, Path]) -> list[Import]:
    found: list[Import] = []
    for statement, where in _statements(ast.parse(path.read_text(), str(path))):
        line = statement.lineno
        if isinstance(statement, ast.Import):
            for alias in statement.names:
                found.append(Import(module, _resolve(alias.name, known), None, where, line))
            continue
        base = _base(module, path, statement)
        for alias in statement.names:
            if f"{base}.{alias.name}" in known:  # `from package import module`
                found.append(Import(module, f"{base}.{alias.name}", None, where, line))
            else:
                found.append(Import(module, _resolve(base, known), alias.name, where, line))
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_attributes(module: str, path: Path, known: Mapping[str, Path]) -> Iterator[Violation]:
    """`alias._name` where alias is bound to another module of the tree by an import."""
    tree = ast.parse(path.read_text(), str(path))
    bound: dict[str, str] = {}
    for statement, _ in _statements(tree):
        for alias in statement.names:
            if isinstance(statement, ast.Import):
                target = alias.name if alias.asname else alias.name.split(".")[0]
            else:
                target = f"{_base(module, path, statement)}.{alias.name}"
            if target in known and target != module:
                bound[alias.asname or alias.name.split(".")[0]] = target
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
        ):
            rule = f"private name {node.attr} across modules"
            yield Violation(module, bound[node.value.id], rule, f"line {node.lineno}")


def check(root: Path, packages: Sequence[str], layers: Layers) -> list[Violation]:
    known = modules(root, packages)
    edges = [i for module, path in known.items() for i in imports_of(module, path, known)]
    found: list[Violation] = []
    for i in edges:
        inside = i.target in known
        if inside and i.target != i.source:
            found.extend(_layer(i, layers))
            name = i.name or i.target.rpartition(".")[2]
            if _private(name):
                rule = f"private name {name} across modules"
                found.append(Violation(i.source, i.target, rule, f"line {i.line}"))
        for outside in layers.forbidden:
            top = i.target.split(".")[0]
            if (
                not inside
                and top in outside.packages
                and i.where in outside.wheres
                and outside.applies(i.source)
            ):
                found.append(Violation(i.source, i.target, outside.label, f"line {i.line}"))
    for module, path in known.items():
        found.extend(_private_attributes(module, path, known))
    found.extend(cycles(edges, known, {"module"}, "import cycle"))
    deferred = "import cycle through a deferred import"
    in_cycles = {(v.source, v.target) for v in found if v.rule == "import cycle"}
    found.extend(
        v
        for v in cycles(edges, known, {"module", "function"}, deferred)
        if (v.source, v.target) not in in_cycles
    )
    unique = {str(v): v for v in found}
    return sorted(unique.values(), key=str)


def _layer(i: Import, layers: Layers) -> Iterator[Violation]:
    start, end = layers.folder(i.source), layers.folder(i.target)
    if start == end:
        return
    allow = layers.allowed.get((start, end))
    if allow is None:
        yield Violation(i.source, i.target, f"{start} may not import {end}", f"line {i.line}")
    elif not allow.test(i):
        rule = f"{start} may import {end} {allow.label}"
        yield Violation(i.source, i.target, rule, f"{i.where}, line {i.line}")


def cycles(
    edges: Sequence[Import], known: Mapping[str, Path], wheres: set[Where], rule: str
) -> Iterator[Violation]:
    """Every edge (of the kinds in `wheres`) that lies on a cycle: an edge whose two ends are
    in the same strongly connected component always does, so each is reported with one such
    cycle."""
    graph: nx.DiGraph[str] = nx.DiGraph()
    graph.add_edges_from(
        (i.source, i.target)
        for i in edges
        if i.where in wheres and i.target in known and i.target != i.source
    )
    for component in nx.strongly_connected_components(graph):
        if len(component) < 2:
            continue
        inside = graph.subgraph(component)
        for source, target in sorted(inside.edges):
            back = nx.shortest_path(inside, target, source)
            yield Violation(source, target, rule, " -> ".join([source, *back]))
