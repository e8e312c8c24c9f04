"""The native library's layout (issue 22, part of the `architecture` bar): modules without call
circles, files of a readable size, no environment reads in the library, each file naming its
Python twin, and one version number for nnpatch.h and the Python package.

The call graph is read from the built objects, not from the includes: `nm` lists what each
build/native/obj/MODULE.o defines and what it leaves undefined, and each undefined symbol is
resolved to the module that defines it. Static functions never show up, which is right: a
circle is a matter between modules.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from .conftest import ROOT

SRC = ROOT / "native" / "src"
HEADER = ROOT / "native" / "include" / "nnpatch.h"
MAX_FILE_LINES = 900
MAX_FUNCTION_LINES = 120
# BLAKE3's own SIMD dispatch: blake3.c picks a kernel in blake3_<isa>.c, which calls back into
# blake3.c's portable helpers; its layout is upstream BLAKE3's, kept so merges stay mechanical.
BLAKE3 = re.compile(r"blake3(_\w+)?$")
BLAKE3_KERNEL = re.compile(r"blake3_\w+\.c$")


def library_sources() -> list:
    return sorted(SRC.glob("*.c"))


def call_graph(objdir) -> dict[str, set[str]]:
    """Module -> the modules whose symbols it uses, from nm over objdir/*.o (one per native/src/*.c)."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.fail("nm (binutils) is needed to read the module graph")
    modules = {p.stem for p in library_sources()}
    defined: dict[str, str] = {}
    undefined: dict[str, set[str]] = {}
    for m in sorted(modules):
        obj = objdir / f"{m}.o"
        assert obj.is_file(), f"{obj} was not built"
        out = subprocess.run([nm, str(obj)], capture_output=True, text=True, check=True).stdout
        undefined[m] = set()
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "U":
                undefined[m].add(parts[1])
            elif len(parts) == 3 and parts[1] in "TDBRVWC":
                defined[parts[2]] = m
    return {m: {defined[s] for s in syms if s in defined and defined[s] != m} for m, syms in undefined.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_strongly_connected_finds_a_circle():
    """The check itself: a two-module circle and a three-module one are found, a chain is not."""
    g = {"a": {"b"}, "b": {"a", "c"}, "c": set(), "d": {"e"}, "e": {"f"}, "f": {"d"}, "g": {"c"}}
    assert sorted(strongly_connected(g)) == [["a", "b"], ["d", "e", "f"]]


def test_no_call_circles(native):
    graph = call_graph(native.dir / "obj")
    circles = [c for c in strongly_connected(graph) if not all(BLAKE3.match(m) for m in c)]
    assert not circles, f"modules calling each other in a circle: {circles}"


def test_no_file_over_the_limit():
    long = {p.name: n for p in library_sources() + sorted(SRC.glob("*.h"))
            if not BLAKE3_KERNEL.search(p.name) and (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def functions(path) -> list[tuple[str, int, int, str]]:
    """(name, first line, lines, the comment just above) of each function defined in a C file: a body
    opens with '{' alone in column 0 and closes with '}' alone in column 0 (the project's layout)."""
    lines = path.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        if line != "{":
            continue
        start = i - 1
        while start > 0 and "(" not in lines[start]:
            start -= 1
        while start > 0 and lines[start].startswith((" ", "\t")):  # a wrapped parameter list
            start -= 1
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == "}")
        above = start - 1
        comment = []
        while above >= 0 and lines[above].lstrip().startswith(("/*", "*", "//")):
            comment.insert(0, lines[above])
            above -= 1
        name = re.findall(r"(\w+)\s*\(", lines[start])
        found.append((name[0] if name else "?", start + 1, end - start + 1, "\n".join(comment)))
    return found


def test_functions_are_short_or_say_why():
    """No function over 120 lines unless the comment above it says why ("Long ...: reason")."""
    sources = library_sources() + sorted((ROOT / "native" / "cli").glob("*.c")) + sorted((ROOT / "native" / "jni").glob("*.c"))
    long = [f"{p.relative_to(ROOT)}:{first} {name} ({n} lines)" for p in sources
            for name, first, n, comment in functions(p)
            if n > MAX_FUNCTION_LINES and not re.search(r"\bLong\b[^:]*:\s*\S", comment)]
    assert not long, "functions over 120 lines without a written reason:\n" + "\n".join(long)


def test_no_getenv_in_the_library():
    """The library reads no environment: test hooks belong behind a build flag (issue 22)."""
    readers = [f"{p.name}:{i}" for p in library_sources() + sorted(SRC.glob("*.h"))
               for i, line in enumerate(p.read_text().splitlines(), 1)
               if re.search(r"\b(secure_)?getenv\s*\(", line)]
    assert not readers, f"getenv in native/src: {readers}"


TWIN = re.compile(r"Python twin[s]?:\s*((?:nnpatch|fuzz|tests)/[\w/]+\.py)", re.I)


@pytest.mark.parametrize("src", library_sources(), ids=lambda p: p.name)
def test_first_comment_names_the_python_twin(src):
    """Each file's first comment names its Python twin, a file that exists, or says why it has none."""
    text = src.read_text()
    m = re.match(r"\s*/\*(.*?)\*/", text, re.S)
    assert m, f"{src.name} does not open with a comment"
    comment = " ".join(m.group(1).replace("*", " ").split())
    if "no python twin" in comment.lower():
        assert re.search(r"no Python twin\W+\w+", comment, re.I), f"{src.name}: say why there is no Python twin"
        return
    twin = TWIN.search(comment)
    assert twin, f"{src.name}: the first comment must name its Python twin ('Python twin: nnpatch/....py')"
    assert (ROOT / twin.group(1)).is_file(), f"{src.name}: its Python twin {twin.group(1)} does not exist"


def python_version() -> str:
    """nnpatch/_version.py's __version__, or (until that file exists) the one in nnpatch/__init__.py."""
    for name in ("_version.py", "__init__.py"):
        path = ROOT / "nnpatch" / name
        if path.is_file():
            m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', path.read_text(), re.M)
            if m:
                return m.group(1)
    pytest.fail("no __version__ in nnpatch/_version.py or nnpatch/__init__.py")


def test_one_version_number():
    text = HEADER.read_text()
    parts = [int(re.search(rf"#define NNP_VERSION_{k}\s+(\d+)", text).group(1)) for k in ("MAJOR", "MINOR", "RELEASE")]
    assert ".".join(map(str, parts)) == python_version()
