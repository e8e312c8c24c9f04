"""Tests of nnpatch.kernel: both backends against a plain-Python reference,
against each other, and on every error path (nothing written out of bounds)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnpatch import kernel

HAVE_C = kernel._ext is not None
NO_C_REASON = "C extension nnpatch._kernel is not built (no compiler at install time?)"
BACKENDS = [
    pytest.param("c", marks=pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON)),
    "numpy",
]
WIDTHS = (1, 2, 4, 8)
GUARD = 0xA5
# example counts come from the profile loaded in conftest.py (HYPOTHESIS_PROFILE)
KSET = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", params=BACKENDS)
def kb(request):
    """The kernel module with the parametrized backend selected (restored after)."""
    before = kernel.backend
    kernel.select(request.param)
    assert kernel.backend == request.param
    yield kernel
    kernel.select(before)


# ---------------------------------------------------------------- reference

def words(b: bytes, w: int) -> list[int]:
    return [int.from_bytes(b[i:i + w], "little") for i in range(0, len(b), w)]


def unwords(ws: list[int], w: int) -> bytes:
    return b"".join(x.to_bytes(w, "little") for x in ws)


def ref_planes(src: bytes, w: int) -> bytes:
    n = len(src) // w
    return bytes(src[j * w + k] for k in range(w) for j in range(n))


def ref_unplanes(src: bytes, w: int) -> bytes:
    n = len(src) // w
    return bytes(src[k * n + j] for j in range(n) for k in range(w))


def ref_unzigzag(z: int, w: int) -> int:
    return (z >> 1) ^ (-(z & 1) % (1 << (8 * w)))


def ref_op(d: int, v: int, w: int, mode: str) -> int:
    m = 1 << (8 * w)
    return {
        "replace": lambda: v,
        "xor": lambda: d ^ v,
        "add": lambda: (d + v) % m,
        "sub": lambda: (d - v) % m,
        "zadd": lambda: (d + ref_unzigzag(v, w)) % m,
        "zsub": lambda: (d - ref_unzigzag(v, w)) % m,
    }[mode]()


def ref_combine(dst: bytes, vals: bytes, w: int, mode: str) -> bytes:
    return unwords([ref_op(d, v, w, mode) for d, v in zip(words(dst, w), words(vals, w))], w)


def ref_scatter(dst: bytes, rb: int, idx: list[int], vals: bytes, w: int, mode: str) -> bytes:
    out = bytearray(dst)
    for i, r in enumerate(idx):
        row = bytes(out[r * rb:(r + 1) * rb])
        out[r * rb:(r + 1) * rb] = ref_combine(row, vals[i * rb:(i + 1) * rb], w, mode)
    return bytes(out)


def guarded(data: bytes, offset: int) -> tuple[bytearray, memoryview]:
    """`data` placed at `offset` inside guard bytes; returns (whole, window).
    Odd offsets also exercise unaligned access."""
    whole = bytearray([GUARD]) * (offset + len(data) + 16)
    whole[offset:offset + len(data)] = data
    return whole, memoryview(whole)[offset:offset + len(data)]


def check_guards(whole: bytearray, offset: int, n: int) -> None:
    assert whole[:offset] == bytes([GUARD]) * offset
    assert whole[offset + n:] == bytes([GUARD]) * 16


# ---------------------------------------------------------------- strategies

@st.composite
def words_data(draw, max_words=40):
    w = draw(st.sampled_from(WIDTHS))
    n = draw(st.integers(0, max_words))
    return w, draw(st.binary(min_size=n * w, max_size=n * w))


@st.composite
def combine_case(draw):
    w, dst = draw(words_data())
    vals = draw(st.binary(min_size=len(dst), max_size=len(dst)))
    return w, dst, vals, draw(st.sampled_from(kernel.MODES)), draw(st.booleans()), \
        draw(st.integers(0, 7))


def _index_container(draw, idx: list[int]):
    kind = draw(st.sampled_from(["list", "uint64", "int64", "uint32", "tuple"]))
    if kind == "list":
        return list(idx)
    if kind == "tuple":
        return tuple(idx)
    return np.array(idx, dtype=kind)


@st.composite
def scatter_case(draw, elements: bool = False):
    w = draw(st.sampled_from(WIDTHS))
    row_words = 1 if elements else draw(st.one_of(st.integers(1, 5), st.integers(6, 40)))
    rb = row_words * w
    nrows = draw(st.integers(0, 30 if elements else 12))
    idx = sorted(draw(st.sets(st.integers(0, nrows - 1), max_size=nrows))) if nrows else []
    dst = draw(st.binary(min_size=nrows * rb, max_size=nrows * rb))
    vals = draw(st.binary(min_size=len(idx) * rb, max_size=len(idx) * rb))
    return (w, rb, idx, _index_container(draw, idx), dst, vals,
            draw(st.sampled_from(kernel.MODES)), draw(st.booleans()), draw(st.integers(0, 7)))


# ---------------------------------------------------------------- properties

@KSET
@given(words_data(max_words=64))
def test_planes_matches_reference_and_inverts(kb, case):
    w, src = case
    p = kb.planes(src, w)
    assert isinstance(p, np.ndarray) and p.dtype == np.uint8 and p.size == len(src)
    assert p.tobytes() == ref_planes(src, w)
    u = kb.unplanes(p, w)
    assert u.tobytes() == src
    assert kb.unplanes(src, w).tobytes() == ref_unplanes(src, w)
    assert kb.planes(kb.unplanes(src, w), w).tobytes() == src


@KSET
@given(words_data(), st.integers(0, 7))
def test_planes_out_param(kb, case, offset):
    w, src = case
    whole, win = guarded(bytes(len(src)), offset)
    r = kb.planes(src, w, out=win)
    assert r.tobytes() == ref_planes(src, w)
    check_guards(whole, offset, len(src))
    buf = np.empty(len(src), dtype=np.uint8)
    assert kb.unplanes(r, w, out=buf) is buf
    assert buf.tobytes() == src


@KSET
@given(combine_case())
def test_combine_matches_reference(kb, case):
    w, dst, vals, mode, planar, offset = case
    whole, win = guarded(dst, offset)
    kb.combine(win, ref_planes(vals, w) if planar else vals, w, mode, planar=planar)
    assert bytes(win) == ref_combine(dst, vals, w, mode)
    check_guards(whole, offset, len(dst))


@KSET
@given(scatter_case())
def test_scatter_rows_matches_reference(kb, case):
    w, rb, idx, idx_arg, dst, vals, mode, planar, offset = case
    whole, win = guarded(dst, offset)
    v = ref_planes(vals, w) if planar else vals
    kb.scatter_rows(win, rb, idx_arg, v, w, mode, planar=planar)
    assert bytes(win) == ref_scatter(dst, rb, idx, vals, w, mode)
    check_guards(whole, offset, len(dst))


@KSET
@given(scatter_case(elements=True))
def test_scatter_elements_matches_reference(kb, case):
    w, rb, idx, idx_arg, dst, vals, mode, planar, offset = case
    assert rb == w
    whole, win = guarded(dst, offset)
    v = ref_planes(vals, w) if planar else vals
    kb.scatter_elements(win, idx_arg, v, w, mode, planar=planar)
    assert bytes(win) == ref_scatter(dst, w, idx, vals, w, mode)
    check_guards(whole, offset, len(dst))


@KSET
@given(scatter_case(), st.booleans())
def test_gather_matches_reference(kb, case, use_out):
    w, rb, idx, idx_arg, src, _vals, _mode, _planar, _off = case
    expect = b"".join(src[r * rb:(r + 1) * rb] for r in idx)
    out = bytearray(len(expect)) if use_out else None
    got = kb.gather_rows(src, rb, idx_arg, out=out)
    assert got.tobytes() == expect
    if use_out:
        assert bytes(out) == expect
    # elements: words of the tensor
    n = len(src) // w
    eidx = [j for j in range(n) if j % 3 == 1]
    ge = kb.gather_elements(src, w, eidx)
    assert ge.tobytes() == b"".join(src[j * w:(j + 1) * w] for j in eidx)


@KSET
@given(words_data(), st.sampled_from(kernel.MODES), st.booleans(), st.data())
def test_encode_delta_then_combine_gives_target(kb, case, mode, planar, data):
    w, base = case
    target = data.draw(st.binary(min_size=len(base), max_size=len(base)))
    v = kb.encode_delta(base, target, w, mode)
    assert isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.size == len(base)
    d = bytearray(base)
    kb.combine(d, kb.planes(v, w) if planar else v, w, mode, planar=planar)
    assert bytes(d) == target
    # reference agrees with the encoder too
    assert ref_combine(base, v.tobytes(), w, mode) == target


@KSET
@given(combine_case())
def test_xor_is_its_own_inverse(kb, case):
    w, dst, vals, _mode, planar, _off = case
    v = ref_planes(vals, w) if planar else vals
    d = bytearray(dst)
    kb.combine(d, v, w, "xor", planar=planar)
    kb.combine(d, v, w, "xor", planar=planar)
    assert bytes(d) == dst


@KSET
@given(scatter_case(), st.sampled_from([("add", "sub"), ("sub", "add"),
                                        ("zadd", "zsub"), ("zsub", "zadd")]))
def test_inverse_modes_undo_each_other(kb, case, pair):
    w, rb, _idx, idx_arg, dst, vals, _mode, planar, _off = case
    v = ref_planes(vals, w) if planar else vals
    d = bytearray(dst)
    kb.scatter_rows(d, rb, idx_arg, v, w, pair[0], planar=planar)
    kb.scatter_rows(d, rb, idx_arg, v, w, pair[1], planar=planar)
    assert bytes(d) == dst


@KSET
@given(words_data())
def test_zigzag_of_small_differences_is_small(kb, case):
    # The point of zadd: target - base of +-k encodes as a value < 2k+1.
    w, base = case
    b = np.frombuffer(base, dtype=f"<u{w}")
    t = (b + np.array(1, dtype=b.dtype)).astype(f"<u{w}")  # +1 everywhere (wrapping)
    v = np.frombuffer(kb.encode_delta(base, t.tobytes(), w, "zadd").tobytes(), dtype=f"<u{w}")
    assert (v == 2).all()
    v = np.frombuffer(kb.encode_delta(t.tobytes(), base, w, "zadd").tobytes(), dtype=f"<u{w}")
    assert (v == 1).all()


# ---------------------------------------------------------------- C vs numpy

@pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("mode", kernel.MODES)
@pytest.mark.parametrize("planar", [False, True])
def test_c_and_numpy_agree_on_large_inputs(width, mode, planar):
    rng = np.random.default_rng(width * 100 + kernel.MODES.index(mode) * 2 + planar)
    before = kernel.backend
    try:
        rb = 37 * width  # odd row length: vector loop + scalar tail
        nrows = 301
        tensor = rng.integers(0, 256, nrows * rb + 3, dtype=np.uint8)[3:]  # unaligned
        rows = np.sort(rng.choice(nrows, 97, replace=False)).astype(np.uint64)
        vals = rng.integers(0, 256, rows.size * rb, dtype=np.uint8)
        n_el = nrows * rb // width
        els = np.sort(rng.choice(n_el, 1000, replace=False))
        evals = rng.integers(0, 256, els.size * width, dtype=np.uint8)
        full = rng.integers(0, 256, tensor.size, dtype=np.uint8)
        results = {}
        for name in ("c", "numpy"):
            kernel.select(name)
            a = tensor.copy()
            kernel.scatter_rows(a, rb, rows, vals, width, mode, planar=planar)
            b = tensor.copy()
            kernel.scatter_elements(b, els, evals, width, mode, planar=planar)
            c = tensor.copy()
            kernel.combine(c, full, width, mode, planar=planar)
            results[name] = (a.tobytes(), b.tobytes(), c.tobytes(),
                             kernel.planes(full, width).tobytes(),
                             kernel.unplanes(full, width).tobytes(),
                             kernel.gather_rows(tensor, rb, rows).tobytes(),
                             kernel.gather_elements(tensor, width, els).tobytes())
        for x, y in zip(results["c"], results["numpy"]):
            assert x == y
        assert results["c"][0] != tensor.tobytes() or mode == "replace"
    finally:
        kernel.select(before)


# ---------------------------------------------------------------- buffer kinds

def test_accepts_many_buffer_kinds(kb, tmp_path):
    import mmap
    data = bytes(range(32))
    f = tmp_path / "t.bin"
    f.write_bytes(data)
    with open(f, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        kb.scatter_rows(mm, 8, [1, 3], bytes(16), 4, "replace", planar=False)
        mm.flush()
        assert mm[:] == data[:8] + bytes(8) + data[16:24] + bytes(8)
    f32 = np.arange(8, dtype=np.float32).reshape(2, 4)
    kb.combine(f32, np.zeros(8, dtype=np.float32), 4, "xor", planar=True)
    assert (f32 == np.arange(8).reshape(2, 4)).all()
    kb.scatter_elements(f32, np.array([5], dtype=np.int16), np.float32(-1.0).tobytes(), 4,
                        "replace", planar=False)
    assert f32[1, 1] == -1.0
    assert kb.planes(memoryview(b"abcd"), 2).tobytes() == b"acbd"
    assert kb.planes(np.arange(4, dtype=np.uint16), 2).tobytes() == bytes([0, 1, 2, 3, 0, 0, 0, 0])


def test_empty_inputs(kb):
    assert kb.planes(b"", 8).size == 0
    assert kb.unplanes(b"", 4).size == 0
    d = bytearray()
    kb.combine(d, b"", 4, "add", planar=True)
    kb.scatter_rows(d, 8, [], b"", 4, "xor", planar=True)
    d = bytearray(16)
    kb.scatter_rows(d, 8, np.array([], dtype=np.uint64), b"", 4, "xor", planar=True)
    kb.scatter_elements(d, [], b"", 2, "zadd", planar=False)
    assert d == bytearray(16)
    assert kb.gather_rows(d, 4, []).size == 0
    assert kb.encode_delta(b"", b"", 8, "zsub").size == 0


# ---------------------------------------------------------------- errors

def _tensor(offset: int = 3, n: int = 64):
    whole = bytearray(range(offset + n + 16))
    return whole, memoryview(whole)[offset:offset + n]


@pytest.mark.parametrize("planar", [False, True])
@pytest.mark.parametrize("indices, match", [
    ([0, 8], "out of range"),                    # nrows = 8
    ([1, 2, 9], "out of range"),
    ([2**64 - 1], "out of range"),
    ([-1, 2], "out of range"),
    ([3, 3], "strictly increasing"),
    ([0, 5, 4], "strictly increasing"),
])
def test_bad_indices_raise_and_write_nothing(kb, indices, match, planar):
    whole, win = _tensor()
    before = bytes(whole)
    vals = bytes(len(indices) * 8)
    with pytest.raises(ValueError, match=match):
        kb.scatter_rows(win, 8, indices, vals, 4, "xor", planar=planar)
    with pytest.raises(ValueError, match=match):
        arr = np.array(indices, dtype=np.int64 if min(indices) < 0 else np.uint64)
        kb.scatter_rows(win, 8, arr, vals, 4, "replace", planar=planar)
    assert bytes(whole) == before
    # elements: 16 words of 4 bytes; doubling keeps each case's defect
    eidx = [i * 2 if 0 <= i < 2**32 else i for i in indices]
    with pytest.raises(ValueError, match=match):
        kb.scatter_elements(win, eidx, bytes(len(eidx) * 4), 4, "add", planar=planar)
    with pytest.raises(ValueError, match=match):
        kb.gather_rows(win, 8, indices)
    assert bytes(whole) == before


@pytest.mark.parametrize("indices", [[0.0, 1.0], [True], [[0, 1]], ["a"], [2**70]])
def test_non_integer_indices(kb, indices):
    with pytest.raises(ValueError):
        kb.scatter_rows(bytearray(64), 8, indices, bytes(8 * np.size(indices)), 4, "xor",
                        planar=False)


@pytest.mark.parametrize("width", [0, 3, 5, 16, -4, True, 4.0, "4", None])
def test_bad_width(kb, width):
    d = bytearray(64)
    for call in (lambda: kb.planes(bytes(64), width),
                 lambda: kb.unplanes(bytes(64), width),
                 lambda: kb.combine(d, bytes(64), width, "xor", planar=False),
                 lambda: kb.scatter_rows(d, 8, [0], bytes(8), width, "xor", planar=False),
                 lambda: kb.scatter_elements(d, [0], bytes(4), width, "xor", planar=False),
                 lambda: kb.gather_elements(d, width, [0]),
                 lambda: kb.encode_delta(d, d, width, "add")):
        with pytest.raises(ValueError, match="width"):
            call()
    assert d == bytearray(64)


@pytest.mark.parametrize("mode", ["mul", "", "XOR", None, 1])
def test_bad_mode(kb, mode):
    d = bytearray(64)
    with pytest.raises(ValueError, match="mode"):
        kb.combine(d, bytes(64), 4, mode, planar=False)
    with pytest.raises(ValueError, match="mode"):
        kb.scatter_rows(d, 8, [0], bytes(8), 4, mode, planar=False)
    with pytest.raises(ValueError, match="mode"):
        kb.encode_delta(d, d, 4, mode)


def test_wrong_sizes(kb):
    d = bytearray(64)
    with pytest.raises(ValueError, match="not a multiple of width"):
        kb.planes(bytes(6), 4)
    with pytest.raises(ValueError, match="out size"):
        kb.planes(bytes(8), 4, out=bytearray(12))
    with pytest.raises(ValueError, match="values size"):
        kb.combine(d, bytes(60), 4, "xor", planar=False)
    with pytest.raises(ValueError, match="not a multiple of width"):
        kb.combine(bytearray(6), bytes(6), 4, "xor", planar=False)
    with pytest.raises(ValueError, match="values size"):
        kb.scatter_rows(d, 8, [0, 1], bytes(8), 4, "xor", planar=False)
    with pytest.raises(ValueError, match="values size"):
        kb.scatter_elements(d, [0, 1], bytes(12), 4, "xor", planar=True)
    with pytest.raises(ValueError, match="row_nbytes"):
        kb.scatter_rows(d, 6, [0], bytes(6), 4, "xor", planar=False)
    for rb in (0, -8, 2.0, None):
        with pytest.raises(ValueError, match="row_nbytes"):
            kb.scatter_rows(d, rb, [0], bytes(8), 4, "xor", planar=False)
    with pytest.raises(ValueError, match="not a multiple of row_nbytes"):
        kb.scatter_rows(d, 24, [0], bytes(24), 4, "xor", planar=False)
    with pytest.raises(ValueError, match="out size"):
        kb.gather_rows(d, 8, [0, 1], out=bytearray(8))
    with pytest.raises(ValueError, match="base size"):
        kb.encode_delta(bytes(8), bytes(12), 4, "add")
    with pytest.raises(ValueError, match="not a multiple of width"):
        kb.encode_delta(bytes(6), bytes(6), 4, "add")
    with pytest.raises(ValueError, match="1-D"):
        kb.scatter_rows(d, 8, np.zeros((1, 1), dtype=np.uint64), bytes(8), 4, "xor", planar=False)
    assert d == bytearray(64)


def test_read_only_destinations(kb):
    ro = np.zeros(64, dtype=np.uint8)
    ro.flags.writeable = False
    for dst in (bytes(64), ro, memoryview(bytearray(64)).toreadonly()):
        with pytest.raises(TypeError, match="read-only"):
            kb.combine(dst, bytes(64), 4, "xor", planar=False)
        with pytest.raises(TypeError, match="read-only"):
            kb.scatter_rows(dst, 8, [0], bytes(8), 4, "xor", planar=False)
        with pytest.raises(TypeError, match="read-only"):
            kb.scatter_elements(dst, [0], bytes(4), 4, "xor", planar=False)
        with pytest.raises(TypeError, match="read-only"):
            kb.planes(bytes(64), 4, out=dst)
        with pytest.raises(TypeError, match="read-only"):
            kb.gather_rows(bytes(64), 8, [0], out=dst[:8])
    assert not ro.any()


def test_non_buffers_and_non_contiguous(kb):
    with pytest.raises(TypeError, match="buffer"):
        kb.planes([1, 2, 3, 4], 2)
    with pytest.raises(TypeError, match="buffer"):
        kb.combine(bytearray(4), "abcd", 4, "xor", planar=False)
    a = np.zeros((8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="contiguous"):
        kb.combine(a[:, ::2], bytes(32), 4, "xor", planar=False)
    with pytest.raises(ValueError, match="contiguous"):
        kb.planes(a.T, 4)


def test_overlap_rejected(kb):
    buf = bytearray(range(64))
    mv = memoryview(buf)
    with pytest.raises(ValueError, match="overlap"):
        kb.combine(mv[:32], mv[16:48], 4, "xor", planar=False)
    with pytest.raises(ValueError, match="overlap"):
        kb.scatter_rows(mv[:32], 8, [1], mv[24:32], 4, "add", planar=True)
    with pytest.raises(ValueError, match="overlap"):
        kb.planes(mv[:32], 4, out=mv[8:40])
    with pytest.raises(ValueError, match="overlap"):
        kb.gather_rows(mv[:32], 8, [0], out=mv[4:12])
    assert buf == bytearray(range(64))


# ---------------------------------------------------------------- C layer directly

@pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON)
def test_c_extension_validates_its_own_arguments():
    ext = kernel._ext
    whole, win = _tensor()
    before = bytes(whole)
    idx = np.array([1, 2], dtype=np.uint64)
    ok = (win, 8, idx, bytes(16), 4, 1, True)

    def bad(i, value):
        args = list(ok)
        args[i] = value
        return tuple(args)

    ext.scatter(*bad(3, bytes(16)))  # xor of zeros: valid, no change
    assert bytes(whole) == before
    cases = [
        (bad(4, 3), "width"), (bad(4, 0), "width"), (bad(5, 6), "mode"), (bad(5, -1), "mode"),
        (bad(1, 0), "row_nbytes"), (bad(1, -8), "row_nbytes"), (bad(1, 6), "row_nbytes"),
        (bad(1, 24), "not a multiple of row_nbytes"),
        (bad(2, bytes(15)), "multiple of 8"),
        (bad(3, bytes(8)), "values size"),
        (bad(2, np.array([1, 8], dtype=np.uint64)), "out of range"),
        (bad(2, np.array([5, 2**64 - 1], dtype=np.uint64)), "out of range"),
        (bad(2, np.array([2, 2], dtype=np.uint64)), "strictly increasing"),
        (bad(3, win[16:32]), "overlap"),
        (bad(2, win[:16]), "overlap"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            ext.scatter(*args)
    with pytest.raises(TypeError):
        ext.scatter(*bad(0, bytes(64)))
    assert bytes(whole) == before

    with pytest.raises(ValueError, match="width"):
        ext.combine(win, bytes(64), 3, 0, False)
    with pytest.raises(ValueError, match="mode"):
        ext.combine(win, bytes(64), 4, 99, False)
    with pytest.raises(ValueError, match="values size"):
        ext.combine(win, bytes(60), 4, 0, False)
    with pytest.raises(ValueError, match="multiple of width"):
        ext.combine(win[:6], bytes(6), 4, 0, False)
    with pytest.raises(ValueError, match="width"):
        ext.planes(bytes(8), win[:8], 3)
    with pytest.raises(ValueError, match="multiple of width"):
        ext.unplanes(bytes(6), win[:6], 4)
    with pytest.raises(ValueError, match="out size"):
        ext.planes(bytes(8), win[:16], 4)
    with pytest.raises(ValueError, match="out size"):
        ext.gather(bytes(64), 8, idx, win[:8])
    with pytest.raises(ValueError, match="out of range"):
        ext.gather(bytes(64), 8, np.array([9], dtype=np.uint64), win[:8])
    with pytest.raises(ValueError, match="strictly increasing"):
        ext.gather(bytes(64), 8, np.array([3, 1], dtype=np.uint64), win[:16])
    with pytest.raises(ValueError, match="row_nbytes"):
        ext.gather(bytes(64), 0, idx, win[:0])
    assert bytes(whole) == before


# ---------------------------------------------------------------- backend selection

def test_select(monkeypatch):
    before = kernel.backend
    try:
        kernel.select("numpy")
        assert kernel.backend == "numpy"
        kernel.select("auto")
        assert kernel.backend == ("c" if HAVE_C else "numpy")
        with pytest.raises(ValueError, match="backend"):
            kernel.select("fortran")
        monkeypatch.setattr(kernel, "_ext", None)
        with pytest.raises(RuntimeError, match="not built"):
            kernel.select("c")
        kernel.select("auto")
        assert kernel.backend == "numpy"
    finally:
        monkeypatch.undo()
        kernel.select(before)


@pytest.mark.parametrize("value, expect", [
    ("numpy", "numpy"), ("auto", "c" if HAVE_C else "numpy"), ("", "c" if HAVE_C else "numpy"),
    pytest.param("c", "c", marks=pytest.mark.skipif(not HAVE_C, reason=NO_C_REASON)),
])
def test_env_var_selects_backend(value, expect):
    env = dict(os.environ, NNPATCH_KERNEL=value)
    out = subprocess.run([sys.executable, "-c", "import nnpatch.kernel as k; print(k.backend)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expect


def test_env_var_rejects_unknown_value():
    env = dict(os.environ, NNPATCH_KERNEL="gpu")
    out = subprocess.run([sys.executable, "-c", "import nnpatch.kernel"],
                         env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "NNPATCH_KERNEL" in out.stderr


def test_concurrent_calls_from_threads(kb):
    # The C kernel releases the GIL; concurrent calls on separate buffers must
    # each give the single-threaded result.
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(7)
    rb, nrows = 4096, 64
    base = rng.integers(0, 256, nrows * rb, dtype=np.uint8)
    idx = np.arange(0, nrows, 3, dtype=np.uint64)
    vals = [rng.integers(0, 256, idx.size * rb, dtype=np.uint8) for _ in range(8)]

    def job(v):
        d = base.copy()
        kb.scatter_rows(d, rb, idx, kb.planes(v, 4), 4, "zadd", planar=True)
        return d.tobytes()

    expect = [job(v) for v in vals]
    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(job, vals)) == expect
