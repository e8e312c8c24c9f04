"""The native applier's primitives against their Python references (issue 13).

native/src/blake3*.c against blake3-py and b3sum, through every implementation the CPU runs
(portable scalar, SSE4.1, AVX2, AVX-512; NEON in an aarch64 build under qemu), each forced with
the driver's NP_BLAKE3_FORCE; native/src/json.c and jsonscan.c (npj_parse, npj_shape)
against what nnpatch's readers decide: nnpatch/_json.py (loads_strict, json_shape) with the
patch reader's limits (16 levels, 4,194,304 values) and its refusal of NaN/Infinity. The C
verdict must equal the Python verdict on every text, and an accepted text must give the same
tree (ints exact, floats bit for bit, strings, keys in document order).

Each check runs against two builds of native/tests/prim_driver.c, made here with gcc from the
primitives' sources alone (so a half-built core never blocks them): -O2, and AddressSanitizer +
UndefinedBehaviorSanitizer. The driver's --batch mode checks thousands of texts per process,
each in its own exact-size allocation, so a read past a text's end is an ASan failure.

Where the spec and Python's json disagree the spec wins, and the Python reference here says so:
  - NaN/Infinity/-Infinity: refused (FORMAT.md section 5); loads_strict alone accepts them (the
    journal reader calls it without parse_constant), the patch reader refuses them.
  - lone surrogate escapes: refused (json.h, JOURNAL.md "Trust"); loads_strict refuses them, the
    patch reader's own json.loads call does not check.
  - integers of more than 4300 digits: refused, as CPython's int() refuses them (RFC 8259 lets a
    reader limit numbers), so the native and Python readers accept the same headers.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest
from hypothesis import given, strategies as st

from nnpatch._json import json_shape, reject_duplicates

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "native" / "tests" / "prim_driver.c", ROOT / "native" / "src" / "json.c",
           ROOT / "native" / "src" / "jsonscan.c",
           *sorted((ROOT / "native" / "src").glob("blake3*.c"))]
CFLAGS = ["-std=c99", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
          "-I", str(ROOT / "native" / "src")]
BUILDS = {
    "plain": ["-O2"],
    "asan": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
}
SANITIZER_EXIT = 86
SANITIZER_ENV = {
    "ASAN_OPTIONS": f"exitcode={SANITIZER_EXIT}:abort_on_error=0:detect_leaks=1:strict_string_checks=1",
    "UBSAN_OPTIONS": f"halt_on_error=1:exitcode={SANITIZER_EXIT}:print_stacktrace=1",
}
PATCH_LIMITS = (16, 4_194_304)


@dataclass
class Driver:
    name: str
    path: Path
    env: dict

    runner: tuple[str, ...] = ()  # e.g. ("qemu-aarch64",)

    def run(self, *args, input: bytes | None = None, timeout: float = 120) -> str:
        r = subprocess.run([*self.runner, str(self.path), *map(str, args)], input=input, capture_output=True,
                           timeout=timeout, env=self.env)
        assert r.returncode == 0 and not r.stderr, \
            f"{self.name} prim_driver {args[:3]} exited {r.returncode}:\n{r.stderr.decode(errors='replace')[-4000:]}"
        return r.stdout.decode("ascii")

    def batch(self, command: str, texts: list[bytes], *args) -> list[str]:
        payload = b"".join(b"%d\n%s" % (len(t), t) for t in texts)
        lines = self.run(command, *args, "--batch", "-", input=payload).split("\n")
        assert lines[-1] == "" and len(lines) == len(texts) + 1
        return lines[:-1]

    def forced(self, impl: str) -> "Driver":
        """This driver with BLAKE3 implementation impl (NP_BLAKE3_FORCE); a skip where it does not run."""
        have = self.run("b3-impls").split()
        if impl != "auto" and impl not in have:
            pytest.skip(f"BLAKE3 {impl} does not run here ({' '.join(have)})")
        return Driver(f"{self.name}/{impl}", self.path, {**self.env, "NP_BLAKE3_FORCE": impl}, self.runner)


@pytest.fixture(scope="session", params=list(BUILDS))
def driver(request, tmp_path_factory) -> Driver:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp(f"prim-{request.param}") / "prim_driver"
    r = subprocess.run([cc, *CFLAGS, *BUILDS[request.param], "-o", str(out), *map(str, SOURCES)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"building prim_driver ({request.param}) failed:\n{r.stderr[-6000:]}"
    env = dict(os.environ)
    if request.param == "asan":
        env.update(SANITIZER_ENV)
    return Driver(request.param, out, env)


# --- BLAKE3 ---------------------------------------------------------------------------------------

# every implementation np_blake3_init_impl knows for this machine's architecture; each test below
# runs through each that this CPU runs (the others skip)
B3_IMPLS = ["auto", "scalar", *{"x86_64": ["sse41", "avx2", "avx512"], "aarch64": ["neon"]}.get(platform.machine(), [])]
B3_ALL = ["scalar", "sse41", "avx2", "avx512", "neon"]


@pytest.fixture(params=B3_IMPLS)
def b3(request, driver) -> Driver:
    return driver.forced(request.param)


def pattern(n: int) -> bytes:
    """The official test vectors' input: byte i is i % 251."""
    return bytes(i % 251 for i in range(n))


OFFICIAL_LENGTHS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 63, 64, 65, 127, 128, 129, 1023, 1024, 1025, 2048, 2049,
                    3072, 3073, 4096, 4097, 5120, 5121, 6144, 6145, 7168, 7169, 8192, 8193, 16384, 31744,
                    102400]
BOUNDARY_LENGTHS = [1023, 1024, 1025, 2048, 3073, 65535, 65536, 65537, (1 << 20) + 1]


def test_blake3_empty_is_the_published_digest(b3):
    assert b3.run("b3", "-", input=b"").strip() == \
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


@pytest.mark.parametrize("n", OFFICIAL_LENGTHS)
def test_blake3_official_pattern(b3, n):
    data = pattern(n)
    assert b3.run("b3", "-", input=data).strip() == blake3.blake3(data).hexdigest()


def test_blake3_random_lengths_and_chunk_boundaries(b3):
    rng = random.Random(1)
    lengths = BOUNDARY_LENGTHS + [rng.randrange(0, 70_000) for _ in range(30)] + [rng.randrange(0, 300) for _ in range(10)]
    for n in lengths:
        data = rng.randbytes(n)
        assert b3.run("b3", "-", input=data).strip() == blake3.blake3(data).hexdigest(), n


def test_blake3_incremental_updates_and_final_leaves_the_hasher(b3):
    """Pieces of random sizes (empty ones too); the digest after each piece is the prefix's."""
    rng = random.Random(2)
    for n in [0, 1, 1024, 1025, 5000, 66_000, 70_000]:
        data = rng.randbytes(n)
        sizes = [rng.choice([0, 1, 63, 64, 65, 1023, 1024, 1025, rng.randrange(1, 4096)]) for _ in range(12)]
        if not any(sizes):
            sizes[0] = 1
        lines = b3.run("b3", "--updates", ",".join(map(str, sizes)), "-", input=data).split()
        *pairs, whole = lines
        assert whole == blake3.blake3(data).hexdigest()
        for at, digest in zip(pairs[::2], pairs[1::2]):
            assert digest == blake3.blake3(data[:int(at)]).hexdigest(), (n, sizes, at)


def test_blake3_matches_b3sum_on_files(b3, tmp_path):
    b3sum = shutil.which("b3sum")
    if b3sum is None:
        pytest.skip("b3sum is not installed")
    rng = random.Random(3)
    for n in [0, 1, 1024, 1025, 3 * 1024 + 1, (1 << 20) + 1, 3_000_000]:
        f = tmp_path / f"in{n}"
        f.write_bytes(rng.randbytes(n))
        want = subprocess.run([b3sum, "--num-threads", "1", "--no-names", str(f)], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert b3.run("b3", f).strip() == want, n


def test_blake3_impls_listed(driver):
    """b3-impls names the automatic choice first; the portable one always runs; an unknown or
    absent implementation is exit 3, not a silent fallback."""
    have = driver.run("b3-impls").split()
    assert have[0] in B3_ALL and "scalar" in have and len(set(have)) == len(have) and set(have) <= set(B3_ALL)
    absent = next((i for i in B3_ALL if i not in have), "nonsense")
    r = subprocess.run([str(driver.path), "b3", "-"], input=b"x", capture_output=True, timeout=60,
                       env={**driver.env, "NP_BLAKE3_FORCE": absent})
    assert r.returncode == 3 and b"does not run here" in r.stderr


# lengths where the subtree logic turns: 16 chunks (one AVX-512 group), 64 (the largest subtree)
SUBTREE_LENGTHS = [n * 1024 + d for n in (3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200)
                   for d in (-1, 0, 1)]


def test_blake3_subtree_boundaries(b3):
    rng = random.Random(4)
    for n in SUBTREE_LENGTHS:
        data = rng.randbytes(n)
        assert b3.run("b3", "-", input=data).strip() == blake3.blake3(data).hexdigest(), n


def test_blake3_large_random_lengths_and_split_points(b3):
    """Inputs up to 5 MB in one update, then fed in random pieces (whole-chunk multiples, odd
    sizes, tiny and empty ones): the digest after each piece is the prefix's."""
    rng = random.Random(5)
    lengths = [rng.randrange(1 << 20, 5 << 20) for _ in range(3)] + [(4 << 20), (4 << 20) + 1, (5 << 20) - 1024]
    for n in lengths:
        data = rng.randbytes(n)
        assert b3.run("b3", "-", input=data).strip() == blake3.blake3(data).hexdigest(), n
    for n in lengths[:4]:
        data = rng.randbytes(n)
        sizes = [rng.choice([0, 1, 1023, 1024, 1025, 16 << 10, 64 << 10, (64 << 10) + 1, 3 << 20,
                             rng.randrange(1, 1 << 20), rng.randrange(1, 300) * 1024])
                 for _ in range(rng.randrange(2, 9))]
        if not any(sizes):
            sizes[0] = 1024
        lines = b3.run("b3", "--updates", ",".join(map(str, sizes)), "-", input=data).split()
        *pairs, whole = lines
        assert whole == blake3.blake3(data).hexdigest(), (n, sizes)
        for at, digest in zip(pairs[::2], pairs[1::2]):
            assert digest == blake3.blake3(data[:int(at)]).hexdigest(), (n, sizes, at)


@pytest.fixture(scope="session")
def aarch64_driver(tmp_path_factory) -> Driver:
    """prim_driver cross-built for aarch64 (static) and run under qemu-aarch64: the NEON kernel."""
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cc is None or qemu is None:
        pytest.skip("no aarch64-linux-gnu-gcc or qemu-aarch64")
    out = tmp_path_factory.mktemp("prim-aarch64") / "prim_driver"
    r = subprocess.run([cc, *CFLAGS, "-O2", "-static", "-o", str(out), *map(str, SOURCES)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"building prim_driver (aarch64) failed:\n{r.stderr[-6000:]}"
    return Driver("aarch64", out, dict(os.environ), (qemu,))


@pytest.mark.parametrize("impl", ["scalar", "neon"])
def test_blake3_aarch64(aarch64_driver, impl):
    b3 = aarch64_driver.forced(impl)
    assert b3.run("b3-impls").split()[0] == "neon"
    rng = random.Random(6)
    for n in [0, 1, 64, 1024, 1025, 4096, 4097, 16384 + 1, 65536, 65537, 300_000, (1 << 20) + 5]:
        data = rng.randbytes(n)
        assert b3.run("b3", "-", input=data).strip() == blake3.blake3(data).hexdigest(), n
    data = rng.randbytes(700_000)
    lines = b3.run("b3", "--updates", "1,1023,65536,4097,0,200000", "-", input=data).split()
    *pairs, whole = lines
    assert whole == blake3.blake3(data).hexdigest()
    for at, digest in zip(pairs[::2], pairs[1::2]):
        assert digest == blake3.blake3(data[:int(at)]).hexdigest(), at


# --- the Python reference for JSON ------------------------------------------------------------------

def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


def py_parse(raw: bytes, depth: int = PATCH_LIMITS[0], values: int = PATCH_LIMITS[1]):
    """(True, object) or (False, reason): what nnpatch's readers decide about raw (see the module
    docstring): UTF-8, json_shape limits, json.loads without duplicates or NaN/Infinity, and
    loads_strict's refusal of lone surrogates."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return False, f"invalid UTF-8 at byte {e.start}"
    d, v = json_shape(raw)
    if d > depth:
        return False, "depth"
    if v > values:
        return False, "values"
    try:
        obj = json.loads(text, object_pairs_hook=reject_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        return False, str(e)
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False, "lone surrogate"
    return True, obj


def canon(o):
    """The driver's canonical form (see native/tests/prim_driver.c) of a Python JSON value."""
    if o is None or o is True or o is False or isinstance(o, str):
        return o
    if isinstance(o, int):
        return o if -(1 << 63) <= o < (1 << 64) else {"b": "-" if o < 0 else "+"}
    if isinstance(o, float):
        return {"f": struct.pack(">d", o).hex()}
    if isinstance(o, list):
        return [canon(x) for x in o]
    assert isinstance(o, dict)
    return {"o": [[k, canon(v)] for k, v in o.items()]}


def check_same(texts: list[bytes], lines: list[str], depth: int = PATCH_LIMITS[0], values: int = PATCH_LIMITS[1]):
    bad = []
    for text, line in zip(texts, lines):
        ok, obj = py_parse(text, depth, values)
        if line.startswith("ok "):
            if not ok:
                bad.append(f"C accepts, Python refuses ({obj}): {text[:300]!r}")
            elif json.loads(line[3:]) != canon(obj):
                bad.append(f"trees differ: {text[:300]!r}\n  C:  {line[:300]}\n  py: {json.dumps(canon(obj))[:300]}")
        else:
            assert line.startswith("error ") and len(line) > 6, line
            if ok:
                bad.append(f"C refuses ({line}), Python accepts: {text[:300]!r}")
            elif obj.startswith("invalid UTF-8") and line != f"error {obj}":  # both look at UTF-8 first
                bad.append(f"C says {line!r}, Python {obj!r}: {text[:300]!r}")
    assert not bad, f"{len(bad)} of {len(texts)} differ:\n" + "\n".join(bad[:10])


# --- JSON: a generator of JSON-ish texts --------------------------------------------------------------

class Obj(list):
    """An object as a list of (key, value) pairs, so keys can repeat."""


KEYS = ["a", "b", "A", "é", "\u0000", "a\u0000b", "😀", "key", "", " ", "\\", '"', "[", "{,", "/"]
FRAGMENTS = [
    b"\\ud800", b'"\\ud800"', b'"\\udc00"', b'"\\ud83d\\ude00"', b'"\\ud83d\\u0041"', b'"\\uD83D\\uDE00"',
    b'"\\ud83d"', b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e400", b"-1e400", b"1e-400", b"-0", b"-0.0",
    b"01", b"-01", b"1.", b".5", b"+1", b"1e", b"1e+", b"-", b"1.5e", b"0x10", b"1_000",
    b"123456789012345678901234567890", b"18446744073709551616", b"-9223372036854775809", b"9" * 4301,
    b",", b"]", b"}", b"[", b"{", b":", b'"', b"\\", b"\x00", b"\x01", b"\x1f", b"\x7f", b"\xff", b"\xfe",
    b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xf0\x9f\x98", b"\x80", b"\t", b"\n", b"\r", b" ", b"\x0c",
    b"\x0b", b"\xef\xbb\xbf", b"\xc2\xa0", b"/* c */", b"//", b"true", b"tru", b"nul", b"falsey",
    b'"\\u00"', b'"\\u00zz"', b'"\\x41"', b'"\\U0041"', b'"\\\'"', b'"\\/"', b'"\\u0000"', b'""', b"[]",
    b"{}", b'{"a":1,"a":2}', b'{"a":1,"\\u0061":2}', b"[1,]", b'{"a":1,}', b"[,1]", b"[1 2]",
    b'{"a" 1}', b"{1:2}", b"\"\t\"", b'"\n"', b'"\x1f"', b'"\x7f"', b"\\u0061",
]


def _emit_string(s: str, rng: random.Random) -> bytes:
    out = [b'"']
    for ch in s:
        c = ord(ch)
        if ch in '"\\':
            out.append(rng.choice([b"\\" + ch.encode(), b"\\u%04x" % c]))
        elif c < 0x20:
            short = {8: b"\\b", 9: b"\\t", 10: b"\\n", 12: b"\\f", 13: b"\\r"}.get(c)
            out.append(short if short and rng.random() < 0.5 else b"\\u%04x" % c)
        elif 0xD800 <= c <= 0xDFFF:  # a lone surrogate: an escape, or (invalid UTF-8) raw
            out.append(b"\\u%04X" % c if rng.random() < 0.9 else ch.encode("utf-8", "surrogatepass"))
        elif ch == "/" and rng.random() < 0.5:
            out.append(b"\\/")
        elif rng.random() < 0.15:
            if c > 0xFFFF:
                c -= 0x10000
                out.append(b"\\u%04x\\u%04X" % (0xD800 + (c >> 10), 0xDC00 + (c & 0x3FF)))
            else:
                out.append((b"\\u%04x" if rng.random() < 0.5 else b"\\u%04X") % c)
        else:
            out.append(ch.encode())
    out.append(b'"')
    return b"".join(out)


def _emit_float(x: float, rng: random.Random) -> bytes:
    if x != x:
        return b"NaN"
    if x in (float("inf"), float("-inf")):
        return b"1e400" if x > 0 else b"-1e400"
    s = rng.choice([repr(x), "%.17g" % x, "%.17e" % x, "%.3e" % x, "%.20f" % x])
    if "." not in s and "e" not in s and "E" not in s and "n" not in s:
        s += ".0"
    return s.encode()


def emit(v, rng: random.Random) -> bytes:
    def ws() -> bytes:
        return b"".join(rng.choice([b" ", b"\t", b"\n", b"\r"]) for _ in range(rng.choice([0, 0, 0, 1, 2])))

    if v is None:
        return b"null"
    if v is True:
        return b"true"
    if v is False:
        return b"false"
    if isinstance(v, int):
        return str(v).encode()
    if isinstance(v, float):
        return _emit_float(v, rng)
    if isinstance(v, str):
        return _emit_string(v, rng)
    if isinstance(v, Obj):
        return b"{" + ws() + (b"," + ws()).join(
            _emit_string(k, rng) + ws() + b":" + ws() + emit(x, rng) + ws() for k, x in v) + b"}"
    return b"[" + ws() + (b"," + ws()).join(emit(x, rng) + ws() for x in v) + b"]"


def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth < 6 and r < 0.4 - 0.05 * depth:
        n = rng.choice([0, 1, 2, 3]) if depth > 1 or rng.random() < 0.8 else rng.choice([5, 20, 40])
        if rng.random() < 0.5:
            return [random_value(rng, depth + 1) for _ in range(n)]
        keys = KEYS if rng.random() < 0.7 else [f"k{i}" for i in range(60)] + ["\udc00"]
        return Obj((rng.choice(keys), random_value(rng, depth + 1)) for _ in range(n))
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, 1, -1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 10**30,
                           -(10**30), 10**4299, rng.randrange(-10**6, 10**6)])
    if kind == 2:
        return rng.randrange(-(2**70), 2**70)
    if kind == 3:
        return rng.choice([0.0, -0.0, 0.1, 1e308, 5e-324, 2.2250738585072014e-308, float("inf"), float("-inf"),
                           rng.uniform(-1e6, 1e6), struct.unpack("<d", rng.randbytes(8))[0]])
    if kind == 4:
        mant = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))
        return float(f"{mant}e{rng.randint(-400, 400)}")
    alphabet = "ab é\"\\/\n\t\x00\x1f\x7f\u2028😀\U0010ffff" + ("\ud800\udfff" if rng.random() < 0.2 else "")
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))


def random_text(rng: random.Random) -> tuple[bytes, int, int]:
    """A JSON-ish text and the limits to read it with."""
    text = emit(random_value(rng), rng)
    if rng.random() < 0.15:  # nesting around the depth limit
        k = rng.randint(10, 18)
        text = b"[" * k + text + b"]" * k if rng.random() < 0.5 else b'{"a":' * k + text + b"}" * k
    if rng.random() < 0.1:
        text = rng.choice([b" ", b"\n", b"\t\r"]) + text + rng.choice([b"", b" ", b"\r\n"])
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3])):  # mutations
        at = rng.randint(0, len(text))
        op = rng.randrange(4)
        if op == 0:
            text = text[:at] + rng.choice(FRAGMENTS) + text[at:]
        elif op == 1:
            text = text[:at] + text[at + rng.randint(1, 4):]
        elif op == 2 and text:
            i = rng.randrange(len(text))
            text = text[:i] + bytes([rng.randrange(256)]) + text[i + 1:]
        else:
            j = rng.randint(at, min(len(text), at + 20))
            text = text[:j] + text[at:j] + text[j:]
    depth, values = PATCH_LIMITS
    if rng.random() < 0.2:
        depth = rng.choice([0, 1, 2, 4])
    if rng.random() < 0.2:
        values = rng.choice([0, 1, 3, 10, 30])
    return text, depth, values


# --- JSON: differential tests ----------------------------------------------------------------------

def test_json_bulk_differential(driver):
    """Thousands of generated texts, one process per limits pair."""
    rng = random.Random(13)
    groups: dict[tuple[int, int], list[bytes]] = {}
    for _ in range(4000):
        text, depth, values = random_text(rng)
        groups.setdefault((depth, values), []).append(text)
    accepted = 0
    for (depth, values), texts in groups.items():
        lines = driver.batch("json", texts, "--depth", depth, "--values", values)
        check_same(texts, lines, depth, values)
        accepted += sum(line.startswith("ok ") for line in lines)
    assert 800 < accepted < 3800  # both verdicts well exercised


@given(st.randoms(use_true_random=False))
def test_json_differential_hypothesis(driver, rng):
    text, depth, values = random_text(rng)
    line = driver.run("json", "--depth", depth, "--values", values, "-", input=text).rstrip("\n")
    check_same([text], [line], depth, values)


@given(st.lists(st.sampled_from([b'"', b"\\", b"[", b"]", b"{", b"}", b",", b"a", b"\\\"", b" "]), max_size=60))
def test_shape_matches_json_shape_hypothesis(driver, parts):
    text = b"".join(parts)
    assert driver.run("shape", "-", input=text).split() == [str(x) for x in json_shape(text)]


def test_shape_matches_json_shape_bulk(driver):
    rng = random.Random(5)
    alphabet = b'"\\[]{},a \n'
    texts = [bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(3000)]
    texts += [random_text(rng)[0] for _ in range(500)]
    lines = driver.batch("shape", texts)
    for text, line in zip(texts, lines):
        assert line.split() == [str(x) for x in json_shape(text)], text


# --- JSON: edge cases with their verdicts spelled out ---------------------------------------------------

EDGE = [
    # (text, accepted?)  Python agrees with each; the comment says where it takes the spec to agree
    (b"{}", True), (b"[]", True), (b"0", True), (b'""', True), (b" \t\r\n[ ]\n", True), (b"", False),
    (b" ", False), (b"\x0c[]", False), (b"\xef\xbb\xbf{}", False), (b"[]\x00", False), (b"[] []", False),
    (b"NaN", False), (b"[Infinity]", False), (b"-Infinity", False),  # loads_strict alone accepts these
    (b"1e400", True), (b"-1e400", True), (b"1e-400", True), (b"-0", True), (b"-0.0", True),
    (b"01", False), (b"-01", False), (b"1.", False), (b".5", False), (b"+1", False), (b"1e", False),
    (b"1E+2", True), (b"0e0", True), (b"-", False), (b"2.", False), (b"1.e5", False),
    (b"18446744073709551615", True), (b"18446744073709551616", True), (b"-9223372036854775808", True),
    (b"-9223372036854775809", True), (b"9" * 4300, True), (b"9" * 4301, False), (b"-" + b"9" * 4301, False),
    (b"0." + b"9" * 5000, True), (b"9" * 5000 + b".0", True),
    (b'"\\ud800"', False), (b'"\\udfff"', False), (b'"\\ud800\\ud800"', False), (b'"\\ud83d\\ude00"', True),
    (b'"\\ud83dA"', False), (b'{"\\ud800":1}', False), (b'"\xed\xa0\x80"', False),
    (b'"\xc0\x80"', False), (b'"\xe0\x80\xaf"', False), (b'"\xf4\x90\x80\x80"', False), (b'"\xf4\x8f\xbf\xbf"', True),
    (b'"\x00"', False), (b'"\x1f"', False), (b'"\x7f"', True), (b'"\\u0000"', True), (b'"\t"', False),
    (b'"\\a"', False), (b'"\\u12"', False), (b'"\\u12G4"', False), (b'"\\/"', True), (b'"abc', False),
    (b'{"a":1,"a":1}', False), (b'{"a":1,"\\u0061":2}', False), (b'{"a":{"b":1,"b":2}}', False),
    (b'[{"a":1},{"a":1}]', True), (b'{"a\\u0000b":1,"a\\u0000c":2}', True), (b'{"a\\u0000":1,"a\\u0000":2}', False),
    (b"[1,]", False), (b'{"a":1,}', False), (b"[,]", False), (b"{,}", False), (b'{"a"}', False),
    (b"[1 2]", False), (b"{1:2}", False), (b"tru", False), (b"nulls", False), (b"[1]]", False), (b"]", False),
    (b"[" * 16 + b"]" * 16, True), (b"[" * 17 + b"]" * 17, False), (b'[["[[[[[[[[[[[[[[[[[[["]]', True),
    (b"/**/1", False), (b"1 // c", False),
]


@pytest.mark.parametrize("limits", [PATCH_LIMITS])
def test_json_edge_cases(driver, limits):
    texts = [t for t, _ in EDGE]
    lines = driver.batch("json", texts)
    for (text, want), line in zip(EDGE, lines):
        assert line.startswith("ok ") == want, (text[:80], line[:200])
        assert py_parse(text)[0] == want, text[:80]
    check_same(texts, lines)


def test_json_duplicate_keys_in_large_objects(driver):
    """Objects beyond 16 members take the sorted path: a duplicate anywhere is found."""
    rng = random.Random(7)
    texts = []
    for n in [17, 100, 1000]:
        keys = [f"k{i}" for i in range(n)]
        texts.append(json.dumps(dict.fromkeys(keys, 1)).encode())
        for _ in range(5):
            i, j = rng.sample(range(n), 2)
            dup = list(keys)
            dup[j] = keys[i]
            texts.append(b"{" + b",".join(b'"%s":%d' % (k.encode(), m) for m, k in enumerate(dup)) + b"}")
    lines = driver.batch("json", texts)
    assert [line.startswith("ok ") for line in lines] == [True, False, False, False, False, False] * 3
    assert all("duplicate key" in line for line in lines if not line.startswith("ok "))
    check_same(texts, lines)


def test_json_floats_bit_exact(driver):
    """Decimal to double, correctly rounded as Python's float(): halfway cases, subnormals, long mantissas."""
    rng = random.Random(11)
    texts = [b"2.2250738585072011e-308", b"2.2250738585072012e-308", b"4.9406564584124654e-324",
             b"2.4703282292062327e-324", b"2.4703282292062328e-324", b"1.7976931348623157e308",
             b"1.7976931348623158e308", b"1.7976931348623159e308", b"9007199254740993.0",
             b"9007199254740992.5", b"0.1", b"0." + b"0" * 400 + b"1e400", b"1" + b"0" * 400 + b".0e-400",
             b"123456789012345678901234567890e-10", b"-0.0e5", b"0.0e-99999999999999999999",
             b"1e99999999999999999999", b"1e-99999999999999999999", b"1" * 1000 + b".5"]
    for _ in range(1500):
        mant = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 30)))
        if rng.random() < 0.5:
            mant = mant[:1] + "." + (mant[1:] or "0")
        mant = mant.lstrip("0") or "0"
        if mant.startswith("."):
            mant = "0" + mant
        texts.append(f"{rng.choice(['', '-'])}{mant}e{rng.randint(-345, 330)}".encode())
        texts.append(repr(struct.unpack("<d", rng.randbytes(8))[0]).encode())
    texts = [t for t in texts if b"n" not in t]  # nan/inf reprs
    lines = driver.batch("json", texts)
    check_same(texts, lines)


def test_json_value_limit_boundary(driver):
    """4,194,304 values pass, one more is refused; measured before anything is built."""
    at_limit = b"[" + b"0," * (PATCH_LIMITS[1] - 1) + b"0]"
    over = b"[" + b"0," * PATCH_LIMITS[1] + b"0]"
    lines = driver.batch("json", [at_limit, over])
    assert lines[0].startswith("ok [0,0,")
    assert lines[1] == f"error more than {PATCH_LIMITS[1]} values"
    assert json_shape(at_limit)[1] == PATCH_LIMITS[1] and json_shape(over)[1] == PATCH_LIMITS[1] + 1


def test_json_journal_depth_limit(driver):
    """The journal reader's limit (8) through the same parser; no value limit there."""
    texts = [b"[" * 8 + b"]" * 8, b"[" * 9 + b"]" * 9, b'{"a":' * 8 + b"1" + b"}" * 8]
    lines = driver.batch("json", texts, "--depth", 8, "--values", 2**64 - 1)
    assert [line.startswith("ok ") for line in lines] == [True, False, True]
    assert lines[1] == "error nesting deeper than 8 levels"
