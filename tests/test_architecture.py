"""The package's layering, checked on its source (docs/ARCHITECTURE.md):

- no import circles between nnpatch's modules, counting every import: at the top of a file,
  inside a function, under ``TYPE_CHECKING``, and the CLI's lazily loaded commands;
- every import points down (or across) the layer table of docs/ARCHITECTURE.md, which the test
  reads, so that the page and the code cannot drift apart; every module has a layer;
- no module imports another module's private (``_name``) name;
- nnpatch's own modules are imported at the top of each file, except the deferrals the page
  lists (they still count for circles and direction)."""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "nnpatch")
DOC = os.path.join(ROOT, "docs", "ARCHITECTURE.md")

#: Modules that import some of nnpatch's own modules inside a function, each for a reason that
#: docs/ARCHITECTURE.md ("Deferred imports, and why") gives: the CLI loads a command's module only
#: when it runs, and the model readers (numpy) for ``hash --tensors`` only when asked; the
#: train-sparse command and the demo import the trainer (torch, an optional dependency) only when
#: training is asked for; kernel loads its optional C extension; report, which the CLI's error
#: handler imports on every run, loads hashing (OpenSSL's hashlib, through hmac) only to draw a chart.
DEFERRED_OK = {"nnpatch.cli", "nnpatch.cli.hash", "nnpatch.cli.train_sparse", "nnpatch.demo", "nnpatch.kernel",
               "nnpatch.report"}


def _modules() -> dict[str, str]:
    """Module name -> source file; a C extension (``_kernel.c``) is a module that imports nothing."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith((".py", ".c")):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, ROOT).rsplit(".", 1)[0].replace(os.sep, ".")
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
    """(importer, imported module, imported name, at top level) for every import statement."""
    for mod, path in modules.items():
        if not path.endswith(".py"):
            continue
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


def _lazy_commands():
    """The CLI's command table: ``nnpatch.cli`` imports these modules by name (importlib), not by
    an import statement, so the AST does not see them."""
    from nnpatch.cli import _COMMANDS

    return {("nnpatch.cli", f"nnpatch.cli.{module}") for module, _ in _COMMANDS.values()}


def _in_type_checking(tree, node) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.dump(stmt.test):
            if any(n is node for n in ast.walk(stmt)):
                return True
    return False


def _graph(modules) -> dict[str, set[str]]:
    """Every import between nnpatch's modules, wherever it is written."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    edges = {(mod, target) for mod, target, _, _ in _imports(modules)} | _lazy_commands()
    for mod, target in edges:
        if target in modules and target != mod:
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


def _layers() -> list[tuple[str, list[str]]]:
    """The layer table of docs/ARCHITECTURE.md, bottom up: (layer, the modules its second column
    names: ``name`` for a module, ``name/`` for a package and everything in it)."""
    with open(DOC, encoding="utf-8") as f:
        doc = f.read()
    section = doc[doc.index("## The layers, bottom up"):]
    section = section[: section.index("\n## ", 1)]
    layers = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] == "layer" or set(cells[0]) <= {"-", " "}:
            continue
        layers.append((cells[0], [n.removesuffix(".c") for n in re.findall(r"`([^`]+)`", cells[1])]))
    return layers


def _layer_of(module: str, layers) -> int | None:
    short = module.removeprefix("nnpatch").lstrip(".") or "__init__"
    for i, (_, names) in enumerate(layers):
        for n in names:
            if short == n.rstrip("/") or (n.endswith("/") and short.startswith(n[:-1] + ".")):
                return i
    return None


def _upward(graph, layers) -> list[tuple[str, str, str, str]]:
    """(importer, imported, importer's layer, imported's layer) for each import that points up."""
    out = []
    for mod, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = _layer_of(mod, layers), _layer_of(target, layers)
            if a is not None and b is not None and b > a:
                out.append((mod, target, layers[a][0], layers[b][0]))
    return out


def test_no_import_circles_counting_every_import():
    assert _cycles(_graph(_modules())) == []


def test_every_module_has_a_layer_on_the_page():
    layers = _layers()
    assert len(layers) >= 10, "the layer table of docs/ARCHITECTURE.md was not found"
    assert [m for m in sorted(_modules()) if _layer_of(m, layers) is None] == []


def test_imports_point_down_the_layer_table():
    assert _upward(_graph(_modules()), _layers()) == []


def test_no_module_imports_another_modules_private_name():
    modules = _modules()
    # a private module (``from .. import _kernel``) is a module, not a private name
    bad = [(mod, target, name) for mod, target, name, _ in _imports(modules)
           if name and name.startswith("_") and not name.startswith("__") and target.startswith("nnpatch")
           and target != mod and not target.endswith("." + name)]
    assert bad == []


def test_own_modules_are_imported_at_the_top():
    modules = _modules()
    deferred = sorted({(mod, target) for mod, target, _, at_top in _imports(modules)
                       if not at_top and target.startswith("nnpatch") and mod not in DEFERRED_OK})
    assert deferred == []


def test_the_checks_see_a_circle_and_an_upward_import_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    layers = [("bottom", ["errors", "weights/"]), ("top", ["cli/"])]
    graph = {"nnpatch.errors": {"nnpatch.cli.apply"}, "nnpatch.weights.sniff": {"nnpatch.errors"},
             "nnpatch.cli.apply": {"nnpatch.weights.sniff"}}
    assert _upward(graph, layers) == [("nnpatch.errors", "nnpatch.cli.apply", "bottom", "top")]
