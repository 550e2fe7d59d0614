"""redisp's import graph against its declared layers (issue 12: no back-edges).

Every module under ``redisp/`` is parsed, not imported, so the graph is what
the source says, including imports inside functions: those are counted apart,
because they hide a dependency from anyone reading the top of the module,
and one that points up a layer is a back-edge like any other unless it is
listed in ``LAZY_UP`` with its reason.  A module may import from its own
layer or any layer below; the whole graph must have no cycle.  A layer is a
wing of the package (a sub-package) or a few top-level modules, so the tree
itself shows the order: a module's layer is that of its wing.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "redisp"

#: lowest first; each names wings (sub-packages, with every module in them) and
#: top-level modules; a module imports only from its own layer and those before it
LAYERS: list[tuple[str, list[str]]] = [
    ("foundations", ["redisp", "config", "metrics", "clients", "protocol", "event_loop"]),
    ("connections", ["backing"]),
    ("core", ["core"]),
    ("routing", ["routing"]),
    ("commands", ["commands"]),
    ("doors", ["doors"]),
    ("wiring", ["service", "tap", "probe"]),
]

#: (importer, imported) -> why a function-level import may point up a layer;
#: only a deliberate lazy import of an optional deployment module belongs here
LAZY_UP: dict[tuple[str, str], str] = {}

#: modules that exist without a .py file (a C extension, built when it can be)
COMPILED = {"core._lru", "protocol._resp"}

Edge = tuple[str, str]


def _resolve(dotted: list[str], modules: set[str]) -> str:
    """The module (or package) a dotted path inside redisp names; "redisp" for the root."""
    while dotted and ".".join(dotted) not in modules:
        dotted = dotted[:-1]
    return ".".join(dotted) or "redisp"


def _target(node: ast.Import | ast.ImportFrom, modules: set[str], package: list[str]
            ) -> Iterable[str]:
    """The redisp modules one import statement names ("redisp" for the root package)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == "redisp":
                yield _resolve(parts[1:], modules)
        return
    if node.level:  # relative: from the importer's own package, up level - 1
        base = package[:len(package) - (node.level - 1)] if node.level > 1 else list(package)
        base += node.module.split(".") if node.module else []
    else:
        parts = (node.module or "").split(".")
        if parts[0] != "redisp":
            return
        base = parts[1:]
    for alias in node.names:  # from redisp.x import y: y is a module or a name
        yield _resolve(base + [alias.name], modules)


def imports_of(source: str, modules: set[str], package: tuple[str, ...] = ()
               ) -> tuple[set[str], set[str]]:
    """(imported at module level, imported only inside a function) by one module
    of the sub-package ``package`` (dotted parts below redisp; () for the root).

    Module level includes ``try``/``if`` blocks at the top: they run on import.
    """
    tree = ast.parse(source)
    top: set[str] = set()
    lazy: set[str] = set()

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                (lazy if in_function else top).update(_target(child, modules, list(package)))
            walk(child, in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    walk(tree, False)
    return top, lazy - top


def _name(path: Path, package: Path) -> str:
    """A module's dotted name below redisp: "core.cache", "protocol" for its __init__."""
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or "redisp"


def module_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-level edges) of every module of ``package``."""
    files = {_name(p, package): p for p in package.rglob("*.py")}
    modules = set(files) | COMPILED
    top: dict[str, set[str]] = {}
    lazy: dict[str, set[str]] = {}
    for name, path in files.items():
        inside = tuple(_name(path.parent / "__init__.py", package).split(".")) \
            if path.parent != package else ()
        found_top, found_lazy = imports_of(path.read_text(), modules, inside)
        # a module's own package (its __init__) is part of it, not an edge
        top[name] = found_top - {name, name.rpartition(".")[0] or name}
        lazy[name] = found_lazy - {name, name.rpartition(".")[0] or name}
    return top, lazy


class _Ranks(dict):
    """Layer index by module: a module of a wing takes the wing's."""

    def __missing__(self, module: str) -> int:
        wing = module.partition(".")[0]
        if wing == module:
            raise KeyError(module)
        return self[wing]


def rank(layers: list[tuple[str, list[str]]] = LAYERS) -> dict[str, int]:
    return _Ranks({member: i for i, (_, members) in enumerate(layers) for member in members})


def upward(graph: Mapping[str, set[str]], ranks: Mapping[str, int]) -> list[Edge]:
    """Every edge from a module to one in a higher layer."""
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if ranks[b] > ranks[a])


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it (first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _named(edges: Iterable[Edge], ranks: Mapping[str, int]) -> str:
    names = [name for name, _ in LAYERS]
    return "; ".join(f"{a} ({names[ranks[a]]}) -> {b} ({names[ranks[b]]})" for a, b in edges)


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return module_graph()


# -- the real package -----------------------------------------------------------


def test_every_module_has_exactly_one_layer(graph):
    """A new top-level module must be placed; a removed one must leave the list;
    a wing holds modules only one level down (the tree stays two deep)."""
    top, _ = graph
    listed = [module for _, members in LAYERS for module in members]
    assert len(listed) == len(set(listed)), "a module listed in two layers"
    top_level = {m for m in set(top) | COMPILED if "." not in m}
    assert top_level == set(listed), "top-level modules and wings vs LAYERS"
    ranks = rank()
    for module in set(top) | COMPILED:
        assert module.count(".") <= 1, f"{module}: wings are one level deep"
        assert ranks[module] is not None


def test_module_level_imports_point_down_or_sideways(graph):
    top, _ = graph
    ranks = rank()
    edges = upward(top, ranks)
    assert not edges, "back-edges: " + _named(edges, ranks)


def test_function_level_imports_point_down_unless_listed_with_a_reason(graph):
    _, lazy = graph
    ranks = rank()
    edges = [edge for edge in upward(lazy, ranks) if edge not in LAZY_UP]
    assert not edges, "lazy back-edges (list them in LAZY_UP with a reason, or move " \
                      "the code): " + _named(edges, ranks)


def test_every_listed_lazy_import_still_exists(graph):
    _, lazy = graph
    stale = [edge for edge in LAZY_UP if edge[1] not in lazy.get(edge[0], ())]
    assert not stale and all(LAZY_UP.values()), stale


def test_the_import_graph_has_no_cycle(graph):
    top, lazy = graph
    every = {m: top[m] | {b for b in lazy[m] if (m, b) not in LAZY_UP} for m in top}
    assert find_cycle(every) is None, "import cycle: " + " -> ".join(find_cycle(every))


# -- the checks themselves --------------------------------------------------------


def test_imports_inside_functions_are_told_apart_from_the_top():
    source = """
from redisp.config import Config
import redisp
try:
    from redisp.core._lru import LruDict
except ImportError:
    pass

def later():
    from redisp.service import build_proxy
    from redisp.protocol import codec, frames
    import redisp.backing.tls

class K:
    def method(self):
        from redisp.config import RedisURL
        from .relay import encode
        from ..core import cache
"""
    modules = {"config", "core", "core._lru", "core.cache", "service", "protocol",
               "protocol.codec", "backing", "backing.tls", "backing.relay"}
    top, lazy = imports_of(source, modules, ("backing",))
    assert top == {"config", "redisp", "core._lru"}
    assert lazy == {"service", "protocol.codec", "protocol", "backing.tls", "backing.relay",
                    "core.cache"}, "config is at the top already; frames is a name"


def test_a_module_of_a_wing_takes_the_wings_layer():
    ranks = rank([("low", ["a", "w"]), ("high", ["b"])])
    assert ranks["w.x"] == ranks["a"] == 0 and ranks["b"] == 1
    assert upward({"w.x": {"b"}, "b": {"w.y"}}, ranks) == [("w.x", "b")]


def test_an_upward_edge_is_found_and_named():
    layers = [("low", ["a"]), ("high", ["b", "c"])]
    ranks = rank(layers)
    assert upward({"a": {"b"}, "b": {"a", "c"}, "c": set()}, ranks) == [("a", "b")]


def test_a_cycle_is_found_even_within_one_layer():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
