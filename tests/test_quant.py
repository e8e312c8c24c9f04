"""The ``qrows`` op (format 1.3, spec/FORMAT.md 7.5): nnpatch.quantdelta's arithmetic against an exact
rational reference written from the spec's words, code packing, the reader's checks, and patches that
carry quantized deltas from the writer to the applier."""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nnpatch
from nnpatch import quantdelta
from nnpatch.differ import load_quant_deltas, save_quant_deltas
from nnpatch.errors import PatchFormatError, UsageError
from nnpatch.quantdelta import QuantDelta
from nnpatch.weights import SafetensorsFile, write_safetensors

from .conftest import read

VECTORS = os.path.join(os.path.dirname(__file__), os.pardir, "spec", "vectors")


# --- the reference: exact rationals, one rounding per step -------------------------------------

#: dtype -> (precision in bits with the hidden one, exponent bits)
FORMATS = {"F32": (24, 8), "BF16": (8, 8), "F16": (11, 5)}
WIDTH = {"F32": 32, "BF16": 16, "F16": 16}


def decode(bits: int, fmt: str):
    """(sign, magnitude) with magnitude a Fraction, or 'inf', or 'nan'."""
    p, e = FORMATS[fmt]
    m = p - 1
    sign = bits >> (m + e) & 1
    exp = bits >> m & ((1 << e) - 1)
    mant = bits & ((1 << m) - 1)
    bias = (1 << (e - 1)) - 1
    if exp == (1 << e) - 1:
        return sign, ("nan" if mant else "inf")
    if exp == 0:
        return sign, Fraction(mant) * Fraction(2) ** (1 - bias - m)
    return sign, Fraction(mant + (1 << m)) * Fraction(2) ** (exp - bias - m)


def encode(sign: int, mag, fmt: str) -> int:
    """Round ``mag`` (a Fraction >= 0, or 'inf') to nearest, ties to even, into ``fmt``."""
    p, e = FORMATS[fmt]
    m = p - 1
    bias = (1 << (e - 1)) - 1
    emin, emax = 1 - bias, bias
    top = sign << (m + e)
    if mag == "inf":
        return top | (((1 << e) - 1) << m)
    if mag == 0:
        return top
    exp = mag.numerator.bit_length() - mag.denominator.bit_length()
    if Fraction(2) ** exp > mag:
        exp -= 1
    exp = max(exp, emin)
    q = Fraction(2) ** (exp - m)
    n, rem = divmod(mag, q)
    n = int(n)
    if rem * 2 > q or (rem * 2 == q and n & 1):
        n += 1
    if n == 1 << p:
        n, exp = 1 << m, exp + 1
    if exp > emax:
        return top | (((1 << e) - 1) << m)
    if n < 1 << m:  # subnormal (exp == emin)
        return top | n
    return top | ((exp - emin + 1) << m) | (n - (1 << m))


def reference(old: int, scale: int, code: int, dtype: str) -> int:
    """The spec's arithmetic on one element: bits in, bits out."""
    sx, x = decode(old, dtype)
    if code == 0 or isinstance(x, str):
        return old
    ss, s = decode(scale, "F32")
    st_ = ss ^ (code < 0)
    t = decode(encode(st_, s * abs(code), "F32"), "F32")[1]  # t = RN32(s * c)
    if t == "inf":
        y_sign, y = st_, "inf"
    else:
        exact = (-x if sx else x) + (-t if st_ else t)
        if exact == 0:
            y_sign, y = (1 if sx and st_ else 0), Fraction(0)
        else:
            y_sign, y = int(exact < 0), abs(exact)
        y_sign, y = y_sign, decode(encode(y_sign, y, "F32"), "F32")[1]  # y = RN32(x + t)
    return encode(y_sign, y, dtype)


def as_words(values, dtype):
    return np.array(values, dtype=quantdelta.word_dtype(dtype))


def finite_f32(bits: int) -> bool:
    return (bits >> 23 & 0xFF) != 0xFF


# --- the arithmetic ----------------------------------------------------------------------------

def _special_words(dtype):
    p, e = FORMATS[dtype]
    m = p - 1
    w = WIDTH[dtype]
    inf = ((1 << e) - 1) << m
    sign = 1 << (w - 1)
    return [0, sign, 1, sign | 1, (1 << m) - 1, 1 << m, inf - 1, sign | (inf - 1), inf, sign | inf, inf | 1,
            inf | (1 << (m - 1)), sign | inf | 3, ((bias := (1 << (e - 1)) - 1) << m), sign | (bias << m)]


words_of = {dt: st.one_of(st.integers(0, (1 << WIDTH[dt]) - 1), st.sampled_from(_special_words(dt)))
            for dt in FORMATS}
scales = st.one_of(st.integers(0, (1 << 32) - 1).filter(finite_f32),
                   st.sampled_from([0, 1 << 31, 1, 0x3F800000, 0x7F7FFFFF, 0x33800000, 0x00800000, 0x4F000000,
                                    0x3F800001, 0x3B800000, 0x1F800000, 0x5F800000]))


@pytest.mark.parametrize("dtype", list(FORMATS))
@given(data=st.data())
def test_arithmetic_matches_the_exact_reference(dtype, data):
    n = data.draw(st.integers(1, 24))
    bits = data.draw(st.sampled_from(quantdelta.BITS))
    lo, hi = quantdelta.code_range(bits)
    old = data.draw(st.lists(words_of[dtype], min_size=n, max_size=n))
    codes = data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    scale = data.draw(scales)
    got = quantdelta.apply_codes(as_words([old], dtype), np.array([scale], "<u4").view("<f4"),
                                 np.array([codes], np.int8), dtype)
    want = [reference(o, scale, c, dtype) for o, c in zip(old, codes)]
    assert [int(v) for v in got[0]] == want


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_every_special_combination(dtype):
    """Every special old word against a grid of scales and codes, against the reference."""
    old = _special_words(dtype)
    grid = [0, 1 << 31, 1, 0x3F800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x33800000, 0x00800000, 0x4F000000, 0x3F800001,
            0x3B800000, 0x00000003]
    codes = [-128, -8, -1, 0, 1, 7, 127]
    for scale in grid:
        for code in codes:
            got = quantdelta.apply_codes(as_words([old], dtype), np.array([scale], "<u4").view("<f4"),
                                         np.full((1, len(old)), code, np.int8), dtype)
            assert [int(v) for v in got[0]] == [reference(o, scale, code, dtype) for o in old], (scale, code)


def test_the_cases_the_spec_names():
    """Spec 7.5 by example: ties, overflow, no FMA, no flush to zero, NaN kept."""
    f32 = lambda v: int(np.array(v, "<f4").view("<u4"))  # noqa: E731

    def one(old, scale, code, dtype="F32"):
        return int(quantdelta.apply_codes(as_words([[old]], dtype), np.array([scale], "<f4"),
                                          np.array([[code]], np.int8), dtype)[0, 0])

    assert one(f32(1.0), 2.0 ** -24, 1) == f32(1.0)  # a tie goes to even
    assert one(0x7F7FFFFF, 2.0 ** 104, 1) == 0x7F800000  # overflow to +inf
    assert one(f32(-127.0), 1 + 2.0 ** -23, 127) == f32(2.0 ** -16)  # a fused multiply-add gives 127 * 2^-23
    assert one(f32(3 * 2.0 ** -149), 2.0 ** -149, -1) == 2  # subnormal result, not flushed
    assert one(0x7FC12345, 1.0, 3) == 0x7FC12345  # NaN payload kept
    assert one(f32(-0.0), 1.0, 0) == f32(-0.0)  # code 0: bits kept
    assert one(0x3F80, 2.0 ** -8 + 2.0 ** -30, 1, "BF16") == 0x3F80  # rounded to binary32 first, then a tie
    assert one(0x7BFF, 16.0, 1, "F16") == 0x7C00  # 65520: F16 overflow
    assert one(0x0003, 2.0 ** -25, 1, "F16") == 0x0004  # 3.5 * 2^-24: a subnormal tie goes to even


# --- packing -------------------------------------------------------------------------------------

@given(bits=st.sampled_from(quantdelta.BITS), k=st.integers(0, 5), n=st.integers(0, 11), seed=st.integers(0, 99))
def test_codes_pack_and_unpack(bits, k, n, seed):
    lo, hi = quantdelta.code_range(bits)
    codes = np.random.default_rng(seed).integers(lo, hi + 1, (k, n)).astype(np.int8)
    packed = quantdelta.pack_codes(codes, bits)
    assert packed.shape == (k, quantdelta.row_code_bytes(n, bits))
    assert np.array_equal(quantdelta.unpack_codes(packed.reshape(-1), k, n, bits, where="x"), codes)


def test_4bit_layout_is_low_nibble_first():
    packed = quantdelta.pack_codes(np.array([[1, -2, 7]], np.int8), 4)
    assert packed.tolist() == [[0xE1, 0x07]]
    with pytest.raises(PatchFormatError, match="padding nibble"):
        quantdelta.unpack_codes(np.array([0xE1, 0x17], np.uint8), 1, 3, 4, where="x")
    with pytest.raises(ValueError):
        quantdelta.pack_codes(np.array([[8]]), 4)


def test_quant_delta_checks_its_parts():
    with pytest.raises(ValueError, match="bits"):
        QuantDelta([0], [1.0], [[1]], 3)
    with pytest.raises(ValueError, match="scales"):
        QuantDelta([0, 1], [1.0, 2.0, 3.0], [[1], [2]], 8)
    with pytest.raises(ValueError, match="finite"):
        QuantDelta([0], [np.inf], [[1]], 8)
    with pytest.raises(ValueError, match="increasing"):
        QuantDelta([1, 0], [1.0], [[1], [2]], 8)


def test_quantize_gets_close():
    rng = np.random.default_rng(0)
    old = rng.standard_normal((6, 50)).astype("<f4")
    target = old + rng.standard_normal((6, 50)).astype("<f4") * 0.01
    for bits, tol in ((8, 1 / 127), (4, 1 / 7)):
        s, c = quantdelta.quantize(old.view("<u4"), target, "F32", bits)
        new = quantdelta.apply_codes(old.view("<u4"), s, c, "F32").view("<f4")
        top = np.abs(target - old).max(axis=1, keepdims=True)
        assert np.all(np.abs(new - target) <= top * tol * 0.51 + 1e-6)


# --- patches -------------------------------------------------------------------------------------

def _model(path, tensors):
    write_safetensors(path, {k: (dt, shape, w.tobytes()) for k, (dt, shape, w) in tensors.items()})


@pytest.mark.parametrize("dtype", list(FORMATS))
@given(data=st.data())
def test_writer_reader_apply_round_trip(dtype, data, tmp_path_factory, backend):
    """Random old tensors (specials included), random scales and codes: diff writes them, apply rebuilds
    the reference's bytes exactly."""
    tmp = tmp_path_factory.mktemp("q")
    rows_n, n = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 9))
    bits = data.draw(st.sampled_from(quantdelta.BITS))
    lo, hi = quantdelta.code_range(bits)
    old = np.array(data.draw(st.lists(words_of[dtype], min_size=rows_n * n, max_size=rows_n * n)),
                   dtype=quantdelta.word_dtype(dtype)).reshape(rows_n, n)
    rows = sorted(data.draw(st.sets(st.integers(0, rows_n - 1), min_size=1)))
    per_row = data.draw(st.booleans())
    sc = data.draw(st.lists(scales, min_size=len(rows) if per_row else 1, max_size=len(rows) if per_row else 1))
    codes = np.array(data.draw(st.lists(st.integers(lo, hi), min_size=len(rows) * n, max_size=len(rows) * n)),
                     np.int8).reshape(len(rows), n)
    qd = QuantDelta(rows, np.array(sc, "<u4").view("<f4"), codes, bits)
    new = qd.apply(old, dtype)
    for i, r in enumerate(rows):  # the reference, element by element
        s = sc[i] if per_row else sc[0]
        assert [int(v) for v in new[r]] == [reference(int(o), s, int(c), dtype) for o, c in zip(old[r], codes[i])]
    base, target, patch = tmp / "b.safetensors", tmp / "t.safetensors", tmp / "p.nnpatch"
    _model(base, {"w": (dtype, (rows_n, n), old)})
    _model(target, {"w": (dtype, (rows_n, n), new)})
    nnpatch.diff(base, target, patch, quantized={"w": qd})
    out = tmp / "out.safetensors"
    nnpatch.apply(base, patch, out)
    assert read(out) == read(target)
    with nnpatch.read_patch(patch) as p:
        # the lowest version with what it uses: qrows 1.3, packed sections 1.5
        assert p.header.version == ((1, 5) if p.header.packed else (1, 3) if p.ops else (1, 0))
        assert all(op.kind == "qrows" and op.bits == bits for op in p.ops)


def _pair(tmp_path, dtype="F32", bits=8, per_row=True):
    rng = np.random.default_rng(7)
    old = rng.standard_normal((32, 12)).astype("<f4")
    if dtype == "BF16":
        words = (old.view("<u4") >> 16).astype("<u2")
    elif dtype == "F16":
        words = old.astype("<f2").view("<u2")
    else:
        words = old.view("<u4")
    rows = np.array([2, 3, 17, 30])
    target = quantdelta.to_f32(words[rows], dtype) + rng.standard_normal((4, 12)).astype("<f4") * 0.02
    s, c = quantdelta.quantize(words[rows], target, dtype, bits, per_row=per_row)
    qd = QuantDelta(rows, s, c, bits)
    new = qd.apply(words, dtype)
    base, tgt = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    bias = np.arange(32, dtype="<f4")
    write_safetensors(base, {"w": (dtype, (32, 12), words.tobytes()), "b": ("F32", (32,), bias.tobytes())})
    write_safetensors(tgt, {"w": (dtype, (32, 12), new.tobytes()), "b": ("F32", (32,), (bias + 1).tobytes())})
    return base, tgt, qd


def test_a_patch_mixes_qrows_with_other_ops_and_reads_back(tmp_path):
    base, target, qd = _pair(tmp_path)
    patch = tmp_path / "p.nnpatch"
    r = nnpatch.diff(base, target, patch, quantized={"w": qd})
    assert {c.name: c.op for c in r.changes} == {"b": "whole", "w": "qrows"}
    with nnpatch.read_patch(patch) as p:
        op = next(o for o in p.ops if o.kind == "qrows")
        assert (op.count, op.bits, op.scales.size) == (4, 8, 16)
        assert not p.header.reversible
    for verify in ("default", "full", "touched"):
        out = tmp_path / f"out-{verify}.safetensors"
        nnpatch.apply(base, patch, out, verify=verify)
        assert read(out) == read(target)
    assert nnpatch.verify(patch, base=base, target=target).ok


def test_in_place_and_chain(tmp_path):
    base, target, qd = _pair(tmp_path, "BF16", 4, per_row=False)
    patch = tmp_path / "p.nnpatch"
    nnpatch.diff(base, target, patch, quantized={"w": qd})
    model = tmp_path / "model.safetensors"
    model.write_bytes(read(base))
    nnpatch.apply_in_place(model, patch)
    assert read(model) == read(target)
    # a chain: qrows, then a plain patch back
    back = tmp_path / "back.nnpatch"
    nnpatch.diff(target, base, back)
    out = tmp_path / "round.safetensors"
    nnpatch.apply_chain(base, [patch, back], out)
    assert read(out) == read(base)


def test_deltas_file_round_trip(tmp_path):
    base, target, qd = _pair(tmp_path, "F16", 4)
    q = tmp_path / "d.safetensors"
    save_quant_deltas(q, {"w": qd})
    back = load_quant_deltas(q)["w"]
    assert back.bits == 4 and np.array_equal(back.rows, qd.rows) and np.array_equal(back.codes, qd.codes)
    assert np.array_equal(back.scales.view("<u4"), qd.scales.view("<u4"))
    p1, p2 = tmp_path / "1.nnpatch", tmp_path / "2.nnpatch"
    nnpatch.diff(base, target, p1, quantized={"w": qd})
    nnpatch.diff(base, target, p2, quantized=q)
    assert read(p1) == read(p2)


def test_writer_refuses_deltas_that_do_not_make_the_target(tmp_path):
    base, target, qd = _pair(tmp_path)
    codes = qd.codes.copy()
    codes[0, 0] ^= 1
    wrong = QuantDelta(qd.rows, qd.scales, codes, 8)
    with pytest.raises(UsageError, match="does not rebuild the target"):
        nnpatch.diff(base, target, tmp_path / "p.nnpatch", quantized={"w": wrong})
    with pytest.raises(UsageError, match="no such tensor"):
        nnpatch.diff(base, target, tmp_path / "p.nnpatch", quantized={"nope": qd})
    with pytest.raises(UsageError, match="cannot be reverted"):
        nnpatch.diff(base, target, tmp_path / "p.nnpatch", quantized={"w": qd}, reversible=True)
    with pytest.raises(UsageError, match="do not fit 32 rows of 1 elements"):
        nnpatch.diff(base, target, tmp_path / "p.nnpatch", quantized={"b": QuantDelta([0], [1.0], [[1, 2]], 8)})
    assert not (tmp_path / "p.nnpatch").exists()


def test_diff_without_deltas_is_unchanged(tmp_path):
    """A pair diffed without deltas gets the usual ops and the usual version."""
    base, target, _ = _pair(tmp_path)
    patch = tmp_path / "p.nnpatch"
    r = nnpatch.diff(base, target, patch, aligned=True)  # the version of its ops alone
    assert {c.op for c in r.changes} <= {"rows", "elements", "whole"}
    with nnpatch.read_patch(patch) as p:
        assert p.header.version in ((1, 0), (1, 2))


# --- the vectors ----------------------------------------------------------------------------------

with open(os.path.join(VECTORS, "vectors.json"), encoding="utf-8") as _f:
    MANIFEST = json.load(_f)
QROWS = [v for v in MANIFEST["valid"] if v["name"].startswith("qrows-")]


def test_vectors_cover_qrows():
    assert {v["name"] for v in QROWS} == {"qrows-f32", "qrows-bf16", "qrows-f16"}
    assert all(v.get("since") == "1.3" for v in QROWS)
    invalid = {v["name"] for v in MANIFEST["invalid"] if v.get("since") == "1.3"}
    assert {"qrows-bad-bits", "qrows-codes-size", "qrows-scales-size", "qrows-nan-scale",
            "qrows-padding-nibble"} <= invalid


@pytest.mark.parametrize("vec", QROWS, ids=lambda v: v["name"])
def test_vector_targets_are_the_reference(vec):
    """Each qrows vector's target is what the exact reference makes from its base and deltas, and its
    special rows hold what they are meant to (NaN, infinities, subnormals, both code widths)."""
    deltas = load_quant_deltas(os.path.join(VECTORS, vec["options"]["quantized"]))
    assert {qd.bits for qd in deltas.values()} == {8, 4}
    with SafetensorsFile(os.path.join(VECTORS, vec["base"])) as b, \
            SafetensorsFile(os.path.join(VECTORS, vec["target"])) as t:
        for name, qd in deltas.items():
            info = b.tensors[name]
            n = math.prod(info.shape) // info.shape[0]
            old = b.bits(name).reshape(info.shape[0], n)
            new = t.bits(name).reshape(info.shape[0], n)
            for i, r in enumerate(qd.rows):
                s = int(qd.scales.view("<u4")[i if len(qd.scales) > 1 else 0])
                assert [int(v) for v in new[r]] == [reference(int(o), s, int(c), info.dtype)
                                                    for o, c in zip(old[r], qd.codes[i])], (name, r)
            changed = old[qd.rows.astype(int)]
            x = quantdelta.to_f32(changed, info.dtype)
            assert np.isnan(x).any() and np.isinf(x).any()
        y = quantdelta.to_f32(t.bits("w8"), t.tensors["w8"].dtype)
        assert np.isinf(y).any()  # an overflow made an infinity


def test_revert_refuses_qrows(tmp_path):
    vec = QROWS[0]
    with pytest.raises(PatchFormatError, match="is qrows"):
        nnpatch.revert(os.path.join(VECTORS, vec["target"]), os.path.join(VECTORS, vec["patch"]),
                       tmp_path / "back.safetensors")


@pytest.mark.parametrize("vec", QROWS, ids=lambda v: v["name"])
@given(data=st.data())
def test_corrupt_sections_are_refused_by_name(vec, data, tmp_path_factory):
    """Any byte of a qrows patch's sections changed, the trailer recomputed: apply fails with a named
    error (a non-finite scale or a padding nibble: PatchFormatError; other codes or indices: the
    target digest), never another exception, and writes nothing; or, where the change cannot show
    (a scale one unit in the last place off that rounds to the same bf16 values), it writes the target."""
    import blake3

    raw = bytearray(read(os.path.join(VECTORS, vec["patch"])))
    with nnpatch.read_patch(os.path.join(VECTORS, vec["patch"])) as p:
        spans = [(s.offset, s.offset + s.length) for op in p.ops for s in op.sections() if s.length]
    lo, hi = data.draw(st.sampled_from(spans))
    pos = data.draw(st.integers(lo, hi - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    raw[-32:] = blake3.blake3(bytes(raw[:-32])).digest()
    tmp = tmp_path_factory.mktemp("c")
    bad = tmp / "bad.nnpatch"
    bad.write_bytes(bytes(raw))
    out = tmp / "out.safetensors"
    try:
        nnpatch.apply(os.path.join(VECTORS, vec["base"]), bad, out)
    except nnpatch.NnpatchError:
        assert not out.exists()
    else:
        assert read(out) == read(os.path.join(VECTORS, vec["target"]))
