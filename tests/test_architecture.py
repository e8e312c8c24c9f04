"""The package's layering, checked on its source: no import circles between nnpatch's
modules, no module importing another's private name, and nnpatch's own modules imported
at the top of each file (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nnpatch")

#: Modules that import some of nnpatch's own modules inside a function, each for a reason that
#: docs/ARCHITECTURE.md gives: the CLI loads a command's module only when it runs and the model
#: readers (numpy) for ``hash --tensors`` only when asked; the trainer's modules import torch, an
#: optional dependency (the demo's training step, the train-sparse command); weights.model keeps a
#: lazy compatibility seam for names that moved; kernel loads its optional C extension.
DEFERRED_OK = {"nnpatch.cli", "nnpatch.cli.hash", "nnpatch.trainer.command", "nnpatch.weights.model", "nnpatch.demo",
               "nnpatch.kernel"}


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, str]):
    """(importer, imported module, imported names, at top level) for every import of nnpatch."""
    for mod, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            at_top = id(node) in top or _in_type_checking(tree, node)
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, path.endswith("__init__.py"), node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    yield mod, sub if sub in modules else target, alias.name, at_top
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield mod, alias.name, None, at_top


def _in_type_checking(tree, node) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.dump(stmt.test):
            if any(n is node for n in ast.walk(stmt)):
                return True
    return False


def _graph(modules):
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, target, _, at_top in _imports(modules):
        if target in modules and target != mod and at_top:
            graph[mod].add(target)
    return graph


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph):
    """A package's __init__ re-exports its modules: an edge from a module to its own package's
    __init__ (``from . import x``) is not a layering arrow, so the checks look through it."""
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}


def test_no_import_circles():
    modules = _modules()
    assert _cycles(_without_package_inits(_graph(modules))) == []


def test_no_module_imports_another_modules_private_name():
    modules = _modules()
    bad = [(mod, target, name) for mod, target, name, _ in _imports(modules)
           if name and name.startswith("_") and not name.startswith("__") and target.startswith("nnpatch")
           and target != mod and name not in ("_kernel",)]
    assert bad == []


def test_own_modules_are_imported_at_the_top():
    modules = _modules()
    deferred = sorted({(mod, target) for mod, target, _, at_top in _imports(modules)
                       if not at_top and target.startswith("nnpatch") and mod not in DEFERRED_OK})
    assert deferred == []


def test_the_checks_see_a_circle_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
