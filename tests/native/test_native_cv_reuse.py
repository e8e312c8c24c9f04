"""Chaining-value reuse in the native applier (native/src/blake3.c np_blake3_hash_keep and
np_blake3_hash_reuse, used by native/src/hashpool.c and engine.c): a tensor that rows, elements or qrows ops
change is hashed again from the chaining values of its base's unchanged 64 KiB / 4 KiB subtrees.

- The two functions against blake3-py, through every BLAKE3 implementation this CPU runs, from a
  shared library built here from native/src/blake3*.c alone: sizes around a chunk and around a
  subtree (where no chaining value is kept and the input is hashed as it is), exactly 1, 2 and 3
  subtrees and one byte either side, large random sizes; random dirty marks with bytes changed
  only where marked (and marks where nothing changed); and a change outside the marks is not
  read (the proof that the unmarked bytes are taken from the kept values).
- End to end: a patch whose rows change in the first, a middle and the last subtree of a tensor of
  many subtrees (and scattered elements of another, and a tensor whose size is no multiple of a
  subtree), applied by nnpatch-apply in every verify mode: the Python applier's bytes, digests
  checked (the normal and the sanitizer build); a chain of two rows patches; the op forced to
  elements or rows; a base byte flipped where no op writes is still refused as before
  (BaseMismatchError, exit 4, nothing left behind).
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
from pathlib import Path

import blake3
import numpy as np
import pytest

import nnpatch
from nnpatch.weights import SafetensorsFile
from nnpatch.weights import write_safetensors as _write

from .native_run import assert_ok, assert_refused, leftovers
from .native_run import native as run_native
from .test_native_differential import forced

ROOT = Path(__file__).resolve().parents[2]
SUB, FINE, CHUNK = 64 * 1024, 4 * 1024, 1024
IMPLS = {1: "scalar", 2: "sse41", 3: "avx2", 4: "neon", 5: "avx512"}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler")
    out = tmp_path_factory.mktemp("b3") / "libb3reuse.so"
    sources = sorted(str(p) for p in (ROOT / "native" / "src").glob("blake3*.c"))
    r = subprocess.run([cc, "-std=c99", "-D_GNU_SOURCE", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
                        "-I", str(ROOT / "native" / "src"), *sources, "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    so = ctypes.CDLL(str(out))
    so.np_blake3_subtrees.restype = ctypes.c_size_t
    so.np_blake3_subtrees.argtypes = [ctypes.c_size_t]
    so.np_blake3_impl_available.restype = ctypes.c_int
    so.np_blake3_impl_available.argtypes = [ctypes.c_int]
    args = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p]
    so.np_blake3_hash_keep.argtypes = args
    so.np_blake3_hash_reuse.argtypes = args
    so.np_blake3_hash_keep.restype = so.np_blake3_hash_reuse.restype = None
    so.np_blake3_subtree_cvs.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                         ctypes.c_void_p]
    so.np_blake3_subtree_cvs.restype = None
    return so


def impls(lib) -> list[int]:
    return [i for i in IMPLS if lib.np_blake3_impl_available(i)]


def keep(lib, impl, data: bytes, dirty: np.ndarray):
    nsub = lib.np_blake3_subtrees(len(data))
    sub = ctypes.create_string_buffer(32 * max(nsub, 1))
    fine = ctypes.create_string_buffer(512 * max(int(np.count_nonzero(dirty)), 1))
    out = ctypes.create_string_buffer(32)
    lib.np_blake3_hash_keep(impl, data, len(data), dirty.ctypes.data, sub, fine, out)
    return out.raw, sub, fine


def reuse(lib, impl, data: bytes, dirty: np.ndarray, sub, fine) -> bytes:
    out = ctypes.create_string_buffer(32)
    lib.np_blake3_hash_reuse(impl, data, len(data), dirty.ctypes.data, sub, fine, out)
    return out.raw


def check(lib, rng: random.Random, n: int, p_dirty: float = 0.3) -> None:
    """Random bytes of length n, random dirty marks, bytes changed inside the marks and after the
    last whole subtree: both functions give blake3-py's digests, in every implementation."""
    old = bytearray(rng.randbytes(n))
    nsub = lib.np_blake3_subtrees(n)
    assert nsub == (n // SUB if n > SUB else 0)
    dirty = np.zeros(max(nsub, 1), dtype=np.uint16)
    for b in range(nsub):
        if rng.random() < p_dirty:
            dirty[b] = rng.choice([1, 1 << 15, 0xFFFF, rng.getrandbits(16) or 1, 0b0110_0000_0000_0110])
    new = bytearray(old)
    for b in range(nsub):
        for j in range(16):
            if dirty[b] >> j & 1 and rng.random() < 0.8:  # marked, and (mostly) changed
                at = b * SUB + j * FINE + rng.randrange(FINE)
                new[at] ^= 1 + rng.randrange(255)
    for _ in range(3):  # the rest after the last whole subtree is always read
        if n > nsub * SUB:
            at = rng.randrange(nsub * SUB, n)
            new[at] ^= 0x5A
    old, new = bytes(old), bytes(new)
    for impl in impls(lib):
        d, sub, fine = keep(lib, impl, old, dirty)
        assert d == blake3.blake3(old).digest(), (IMPLS[impl], n)
        assert reuse(lib, impl, new, dirty, sub, fine) == blake3.blake3(new).digest(), (IMPLS[impl], n)
        assert reuse(lib, impl, old, dirty, sub, fine) == blake3.blake3(old).digest(), (IMPLS[impl], n)


EDGES = [0, 1, 1023, 1024, 1025, FINE - 1, FINE, FINE + 1, SUB - 1, SUB, SUB + 1, SUB + CHUNK,
         2 * SUB - 1, 2 * SUB, 2 * SUB + 1, 3 * SUB - 1, 3 * SUB, 3 * SUB + 1, 4 * SUB, 5 * SUB + 3 * CHUNK + 17,
         8 * SUB, 17 * SUB + FINE]


@pytest.mark.parametrize("n", EDGES)
def test_keep_and_reuse_at_the_edges(lib, n):
    rng = random.Random(n)
    for p in (0.0, 0.5, 1.0):
        check(lib, rng, n, p)


def test_keep_and_reuse_large_random_sizes(lib):
    rng = random.Random(1234)
    for _ in range(12):
        check(lib, rng, rng.randrange(SUB, 6 << 20), rng.choice([0.05, 0.3, 0.9]))


@pytest.mark.parametrize("n", [2 * SUB + 1, 3 * SUB, 5 * SUB + 3 * CHUNK + 17, 17 * SUB + FINE, 64 * SUB])
def test_subtree_cvs_in_pieces_join_to_the_digest(lib, n):
    """np_blake3_subtree_cvs over pieces of an input (as np_hash_file hands them to the hashing
    threads to prove an output file's digest, issue 28 item 5), joined by np_blake3_hash_reuse with
    no dirty marks: blake3-py's digest of the whole, in every implementation, for any cut."""
    rng = random.Random(n)
    data = rng.randbytes(n)
    nsub = lib.np_blake3_subtrees(n)
    dirty = np.zeros(nsub, dtype=np.uint16)
    for impl in impls(lib):
        for piece in (1, 2, 3, nsub):
            cvs = ctypes.create_string_buffer(32 * nsub)
            for b in range(0, nsub, piece):
                k = min(piece, nsub - b)
                at = ctypes.addressof(cvs) + 32 * b
                lib.np_blake3_subtree_cvs(impl, data[b * SUB:], b, k, at)
            assert reuse(lib, impl, data, dirty, cvs, None) == blake3.blake3(data).digest(), (IMPLS[impl], n, piece)


def test_unmarked_bytes_are_not_read(lib):
    """A byte changed outside the marks does not reach the digest: what reuse gives is the digest of
    the old bytes there (so the unmarked subtrees really come from the kept values), while a marked
    change does."""
    rng = random.Random(7)
    n = 9 * SUB + 100
    old = rng.randbytes(n)
    dirty = np.zeros(9, dtype=np.uint16)
    dirty[4] = 1 << 3
    for impl in impls(lib):
        _, sub, fine = keep(lib, impl, old, dirty)
        for at in (0, 4 * SUB, 4 * SUB + 2 * FINE + 5, 8 * SUB + SUB - 1):
            new = bytearray(old)
            new[at] ^= 1
            assert reuse(lib, impl, bytes(new), dirty, sub, fine) == blake3.blake3(old).digest(), (IMPLS[impl], at)
        new = bytearray(old)
        new[4 * SUB + 3 * FINE + 9] ^= 1
        new[n - 1] ^= 1
        assert reuse(lib, impl, bytes(new), dirty, sub, fine) == blake3.blake3(bytes(new)).digest(), IMPLS[impl]


# --- end to end ----------------------------------------------------------------------------------

ROWS, COLS = 96, 3072  # 12 KiB rows: 1.125 MiB, 18 subtrees; rows cross subtree and fine boundaries
CHANGED = [0, 1, 47, 48, 95]  # in the first, a middle and the last subtree


def write_safetensors(path, arrays: dict[str, np.ndarray]) -> None:
    _write(path, {k: ("F32", a.shape, a.astype("<f4").tobytes()) for k, a in arrays.items()})


def pair(tmp_path: Path):
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((ROWS, COLS)) * 0.02).astype("<f4")
    e = (rng.standard_normal((300, 700)) * 0.02).astype("<f4")  # 820 KiB: 12 subtrees and a rest
    small = (rng.standard_normal((16, 1024)) * 0.02).astype("<f4")  # exactly one subtree: hashed as it is
    keepme = rng.standard_normal((40, 1000)).astype("<f4")
    base = {"w": w, "e": e, "small": small, "keep": keepme}
    w2, e2, s2 = w.copy(), e.copy(), small.copy()
    w2[CHANGED] += np.float32(1e-3)
    flat = e2.reshape(-1)
    flat[[0, 5, 70_000, 133_333, flat.size - 1]] += np.float32(1e-3)
    s2[[3, 15]] += np.float32(1e-3)
    target = {"w": w2, "e": e2, "small": s2, "keep": keepme}
    write_safetensors(tmp_path / "base.safetensors", base)
    write_safetensors(tmp_path / "target.safetensors", target)
    return tmp_path / "base.safetensors", tmp_path / "target.safetensors"


def ops_of(patch) -> dict[str, str]:
    with nnpatch.read_patch(patch) as p:
        return {op.name: op.kind for op in p.ops}


def test_rows_in_first_middle_last_subtree(native_impl, tmp_path):
    base, target = pair(tmp_path)
    patch = tmp_path / "u.nnpatch"
    nnpatch.diff(base, target, patch)
    kinds = ops_of(patch)
    assert kinds["w"] == "rows" and kinds["small"] == "rows" and kinds["e"] in ("elements", "rows"), kinds
    py = tmp_path / "py.safetensors"
    nnpatch.apply(base, patch, py)
    want = py.read_bytes()
    assert want == target.read_bytes()
    for verify in ("default", "touched", "full"):
        out = tmp_path / f"n-{verify}.safetensors"
        assert_ok(run_native(native_impl, base, patch, "-o", out, "--verify", verify))
        assert out.read_bytes() == want, verify


@pytest.mark.parametrize("op", ["elements", "rows"])
def test_forced_op_kinds(native, tmp_path, op):
    base, target = pair(tmp_path)
    patch = tmp_path / "u.nnpatch"
    with forced(op, None, None):
        nnpatch.diff(base, target, patch)
    assert ops_of(patch)["w"] == op
    out = tmp_path / "n.safetensors"
    assert_ok(run_native(native, base, patch, "-o", out))
    assert out.read_bytes() == target.read_bytes()


def test_chain_of_two_rows_patches(native, tmp_path):
    base, mid = pair(tmp_path)
    with SafetensorsFile(mid) as m:
        t = {n: m.raw(n).view("<f4").reshape(m.tensors[n].shape).copy() for n in m.tensors}
    t["w"][[20, 70]] -= np.float32(2e-3)
    end = tmp_path / "end.safetensors"
    write_safetensors(end, t)
    p1, p2 = tmp_path / "1.nnpatch", tmp_path / "2.nnpatch"
    nnpatch.diff(base, mid, p1)
    nnpatch.diff(mid, end, p2)
    out = tmp_path / "n.safetensors"
    assert_ok(run_native(native, base, p1, p2, "-o", out))
    assert out.read_bytes() == end.read_bytes()


@pytest.mark.parametrize("where", ["w", "e"])
def test_base_flipped_where_no_op_writes_is_refused(native_impl, tmp_path, where):
    base, target = pair(tmp_path)
    patch = tmp_path / "u.nnpatch"
    nnpatch.diff(base, target, patch)
    with SafetensorsFile(base) as m:
        begin = m.tensors[where].begin
    bad = bytearray(base.read_bytes())
    # a byte of row 30 of w (no op writes it), or element 200_000 of e
    bad[begin + (30 * COLS * 4 if where == "w" else 200_000 * 4) + 1] ^= 0x10
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(bytes(bad))
    for verify in ("default", "touched"):
        out_dir = tmp_path / f"out-{where}-{verify}"
        out_dir.mkdir()
        r = run_native(native_impl, broken, patch, "-o", out_dir / "n.safetensors", "--verify", verify)
        assert_refused(r, 4)
        assert "wrong base" in r.err, r
        assert leftovers(out_dir) == []
    with pytest.raises(nnpatch.BaseMismatchError):
        nnpatch.apply(broken, patch, tmp_path / "py-broken.safetensors")


def test_output_file_digest_in_pieces_end_to_end(native_impl, tmp_path):
    """An output of 3 pieces and a rest (np_hash_file's pieces of 16 MiB, on the hashing threads):
    every verify mode proves the file digest and applies exactly (default and touched too, issue 28
    item 5); the same patch claiming another target.blake3 is refused (exit 4) with nothing left."""
    rng = np.random.default_rng(9)
    big = (rng.standard_normal((12 * 1024 + 7, 1024)) * 0.02).astype("<f4")  # 48 MiB + 28 KiB
    big2 = big.copy()
    big2[[0, 5000, big.shape[0] - 1]] += np.float32(1e-3)
    write_safetensors(tmp_path / "base.safetensors", {"big": big})
    write_safetensors(tmp_path / "target.safetensors", {"big": big2})
    base, target, patch = tmp_path / "base.safetensors", tmp_path / "target.safetensors", tmp_path / "u.nnpatch"
    nnpatch.diff(base, target, patch)
    for verify in ("default", "touched", "full"):
        out = tmp_path / f"n-{verify}.safetensors"
        assert_ok(run_native(native_impl, base, patch, "-o", out, "--verify", verify))
        assert out.read_bytes() == target.read_bytes(), verify
    from tests import craft
    h = craft.decode_patch(patch.read_bytes())
    h["target"]["blake3"] = "cd" * 32
    lie = tmp_path / "lie.nnpatch"
    lie.write_bytes(craft.encode_patch(h))
    for verify in ("default", "touched"):
        out = tmp_path / f"lie-{verify}.safetensors"
        r = run_native(native_impl, base, lie, "-o", out, "--verify", verify)
        assert_refused(r, 4)
        assert not out.exists(), verify
    assert leftovers(tmp_path, "base.safetensors", "target.safetensors", "u.nnpatch", "lie.nnpatch",
                     *(f"n-{v}.safetensors" for v in ("default", "touched", "full"))) == []
