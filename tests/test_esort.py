"""The ``esort`` value stage (format 1.2): words ordered by the old value's exponent."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nnpatch
import crafting
from nnpatch import codecs, differ, dtypes, kernel, patchfile
from nnpatch.errors import PatchFormatError
from nnpatch.hashing import hash_file
from nnpatch.applier import apply_in_place

from .conftest import read, save

FLOATS = sorted(codecs.EXPONENT_FIELDS)


def _reference_key(old_word: int, dtype: str) -> int:
    """The key by the definition in the spec's words: the exponent field of the value."""
    mant, bits = codecs.EXPONENT_FIELDS[dtype]
    return (old_word >> mant) & ((1 << bits) - 1)


@given(dtype=st.sampled_from(FLOATS), data=st.data())
def test_sort_keys_are_the_exponent_field(dtype, data):
    width = dtypes.ITEMSIZE[dtype]
    n = data.draw(st.integers(0, 50))
    raw = data.draw(st.binary(min_size=n * width, max_size=n * width))
    old = np.frombuffer(raw, np.uint8)
    shift, mask = codecs.exponent_key(dtype)
    got = kernel.sort_keys(old, width, shift, mask).tolist()
    words = [int.from_bytes(raw[i * width:(i + 1) * width], "little") for i in range(n)]
    assert got == [_reference_key(w, dtype) for w in words]


@given(dtype=st.sampled_from(FLOATS), planar=st.booleans(), data=st.data())
def test_unsort_inverts_sort_on_both_kernels(dtype, planar, data):
    width = dtypes.ITEMSIZE[dtype]
    n = data.draw(st.integers(0, 300))
    # few distinct exponents, so that many keys tie and stability matters
    exps = data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=4))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    old = rng.integers(0, 256, n * width, dtype=np.uint8)
    if width > 1 and n:
        old.reshape(n, width)[:, -1] = rng.choice(exps, n)
    vals = rng.integers(0, 256, n * width, dtype=np.uint8)
    stored = codecs.sort_words(vals, old, dtype)
    if planar:
        stored = codecs.to_planes(stored, width)
    shift, mask = codecs.exponent_key(dtype)
    previous = kernel.backend
    try:
        for backend in (["c"] if kernel._ext is not None else []) + ["numpy"]:
            kernel.select(backend)
            back = kernel.unsort(old, stored, width, shift=shift, mask=mask, planar=planar)
            if planar:
                back = codecs.from_planes(back, width)
            assert np.array_equal(back, vals), backend
    finally:
        kernel.select(previous)


def test_sort_order_is_stable_and_ascending():
    old = np.array([0x3F800000, 0x40000000, 0x3F800001, 0x00000001, 0x40000001], "<u4").view(np.uint8)
    vals = np.arange(5, dtype="<u4").view(np.uint8)
    got = codecs.sort_words(vals, old, "F32").view("<u4").tolist()
    assert got == [3, 0, 2, 1, 4]  # exponents 127, 128, 127, 0, 128 -> 0, then 127s, then 128s, each in position order


def test_unsort_refuses_mismatched_sizes(backend):
    with pytest.raises(ValueError):
        kernel.unsort(np.zeros(8, np.uint8), np.zeros(12, np.uint8), 4, shift=7, mask=0xFF, planar=False)
    with pytest.raises(ValueError):
        kernel.unsort(np.zeros(6, np.uint8), np.zeros(6, np.uint8), 4, shift=7, mask=0xFF, planar=True)


def test_spec_table_matches_the_code():
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "spec", "FORMAT.md"), encoding="utf-8") as f:
        text = f.read()
    for dtype in FLOATS:
        m = re.search(rf"^\| `{dtype}` \| (\d+) \| `0x([0-9A-F]+)` \|$", text, re.M)
        assert m, dtype
        assert (int(m.group(1)), int(m.group(2), 16)) == codecs.exponent_key(dtype)


# --- patches that use it ------------------------------------------------------------------------

def _finetune_pair(tmp_path, seed=0, dtype="F32", versions=2):
    """Weights of many magnitudes moved by updates of one absolute size, as a fine-tune does:
    the number of low bits that change depends on each weight's exponent, which esort exploits.
    Returns the paths of ``versions`` models, each a fine-tune of the one before."""
    rng = np.random.default_rng(seed)
    models = [{} for _ in range(versions)]
    for name, shape in (("a.weight", (96, 64)), ("b.weight", (64, 96)), ("c.weight", (5000,))):
        w = (rng.standard_normal(shape) * np.exp(rng.uniform(-6, 0, shape))).astype("<f4")
        for model in models:
            bits = (w.view("<u4") >> 16).astype("<u2") if dtype == "BF16" else w
            model[name] = (dtype, shape, bits.tobytes())
            v = w + (rng.standard_normal(shape) * 1e-3).astype("<f4")
            if name == "b.weight":
                v[::3] = w[::3]  # a row-sparse update: a rows op
            w = v
    for model in models:
        model["i"] = ("I32", (4,), np.arange(4, dtype="<i4").tobytes())
    return [save(tmp_path / f"m{seed}-{k}.safetensors", m) for k, m in enumerate(models)]


def _esort_ops(patch_path) -> list[str]:
    with nnpatch.read_patch(patch_path) as p:
        return [op.name for op in p.ops if op.values is not None and "esort" in op.values.codec]


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_diff_picks_esort_when_smaller_and_apply_is_exact(tmp_path, backend, dtype):
    a, b = _finetune_pair(tmp_path, dtype=dtype)
    p = tmp_path / "u.nnpatch"
    nnpatch.diff(a, b, p, aligned=True)  # packed, it would be 1.5
    assert _esort_ops(p), "no section chose esort"
    with open(p, "rb") as f:
        assert f.read(12)[8:12] == b"\x01\x00\x02\x00"  # stamped 1.2, the lowest version with esort
    out = tmp_path / "out.safetensors"
    nnpatch.apply(a, p, out, verify="full")
    assert read(out) == read(b) and hash_file(out) == hash_file(b)
    # without the stage the same patch is larger
    plain = tmp_path / "plain.nnpatch"
    saved = differ.RELATIVE_CODECS
    differ.RELATIVE_CODECS = tuple(c for c in saved if "esort" not in c)
    try:
        nnpatch.diff(a, b, plain)
    finally:
        differ.RELATIVE_CODECS = saved
    assert not _esort_ops(plain)
    assert p.stat().st_size < plain.stat().st_size


def test_esort_in_place_chain_and_stdin(tmp_path, backend):
    a, b, c = _finetune_pair(tmp_path, versions=3)
    p1, p2 = tmp_path / "1.nnpatch", tmp_path / "2.nnpatch"
    nnpatch.diff(a, b, p1)
    nnpatch.diff(b, c, p2)
    assert _esort_ops(p1) and _esort_ops(p2)
    out = tmp_path / "chain.safetensors"
    nnpatch.apply_chain(a, [p1, p2], out)
    assert read(out) == read(c)
    model = tmp_path / "model.safetensors"
    model.write_bytes(read(a))
    apply_in_place(model, p1)
    assert read(model) == read(b) and hash_file(model) == hash_file(b)
    streamed = tmp_path / "streamed.safetensors"
    r = subprocess.run([sys.executable, "-m", "nnpatch", "apply", a, "-", "-o", str(streamed)], input=read(p1),
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    assert read(streamed) == read(b)


def test_reversible_patches_never_use_esort(tmp_path):
    a, b = _finetune_pair(tmp_path)
    p = tmp_path / "r.nnpatch"
    nnpatch.diff(a, b, p, reversible=True)
    assert not _esort_ops(p)
    with nnpatch.read_patch(p) as patch:
        assert patch.header.reversible
    back = tmp_path / "back.safetensors"
    nnpatch.revert(b, p, back)
    assert read(back) == read(a)


def _edited(patch_path, edit) -> bytes:
    data = read(patch_path)
    obj = crafting.header_json(data)
    edit(obj)
    return crafting.with_header(data, obj)


def _first_esort(obj) -> dict:
    return next(op for op in obj["ops"] if "esort" in op.get("values", {}).get("codec", []))


@pytest.mark.parametrize("edit, message", [
    (lambda o: _first_esort(o)["values"].__setitem__("codec", ["esort", "planes", "zstd"]), "needs a delta stage"),
    (lambda o: _first_esort(o)["values"].__setitem__("codec", ["esort", "zadd", "planes", "zstd"]), "out of order"),
    (lambda o: _first_esort(o)["values"].__setitem__("codec", ["zadd", "esort", "esort", "zstd"]),
     "out of order or repeated"),
])
def test_malformed_esort_codecs_are_refused(tmp_path, edit, message):
    a, b = _finetune_pair(tmp_path)
    p = tmp_path / "u.nnpatch"
    nnpatch.diff(a, b, p)
    bad = tmp_path / "bad.nnpatch"
    bad.write_bytes(_edited(p, edit))
    with pytest.raises(PatchFormatError, match=message):
        nnpatch.read_patch(bad).close()


def test_esort_on_an_integer_tensor_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(-1000, 1000, (64, 64)).astype("<i4")
    y = x + rng.integers(-3, 4, (64, 64)).astype("<i4")
    a = save(tmp_path / "a.safetensors", {"w": ("I32", (64, 64), x.tobytes())})
    b = save(tmp_path / "b.safetensors", {"w": ("I32", (64, 64), y.tobytes())})
    p = tmp_path / "u.nnpatch"
    nnpatch.diff(a, b, p)
    assert not _esort_ops(p)

    def to_esort(o):
        v = o["ops"][0]["values"]
        v["codec"] = ["zadd", "esort"] + [s for s in v["codec"] if s in ("planes", "zstd")]

    bad = tmp_path / "bad.nnpatch"
    bad.write_bytes(_edited(p, to_esort))
    r = subprocess.run([sys.executable, "-m", "nnpatch", "apply", a, str(bad), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 3 and "esort" in r.stderr and "floating-point" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_encode_stream_with_esort_round_trips_through_the_applier(backend):
    """encode_value_stream + the applier's whole-op decode, on every float dtype and delta stage."""
    from nnpatch.applier.decode import run_step
    from nnpatch.applier.plan import Step
    from nnpatch.patchfile import Op, Section, TensorRef
    from nnpatch.weights import TensorInfo

    rng = np.random.default_rng(7)
    for dtype in FLOATS:
        width = dtypes.ITEMSIZE[dtype]
        n = 3000
        old = rng.integers(0, 256, n * width, dtype=np.uint8)
        new = rng.integers(0, 256, n * width, dtype=np.uint8)
        for delta in ("xor", "add", "zadd"):
            codec = [delta, "esort"] + (["planes"] if width > 1 else []) + ["zstd"]
            buf = io.BytesIO()
            length = codecs.encode_value_stream(buf, [(new, old)], codec=codec, width=width, size=len(new),
                                                level=3, dtype=dtype)
            section = Section(0, length, len(new), codec)

            class _P:
                path = "<mem>"

                def section(self, s, _b=buf.getvalue()):
                    return memoryview(_b)[s.offset:s.offset + s.length]

            ref = TensorRef(dtype, (n,), "0" * 64)
            op = Op("t", "whole", base=ref, target=ref)
            op.values = section
            info = TensorInfo("t", dtype, (n,), 0, n * width)
            dst = old.copy()
            run_step(Step(_P(), op, section, delta), info, dst)
            assert np.array_equal(dst, new), (dtype, delta)


@pytest.mark.parametrize("delta", ["zadd", "xor"])
@given(dtype=st.sampled_from(FLOATS), data=st.data())
def test_forced_esort_round_trips_every_float_dtype_exactly(tmp_path_factory, delta, dtype, data):
    """diff with esort as the only relative codec, on raw bit patterns (NaN payloads, infinities,
    subnormals, -0.0 included), then apply on both kernels: byte-identical, whatever op is chosen."""
    tmp = tmp_path_factory.mktemp("forced")
    width = dtypes.ITEMSIZE[dtype]
    rows = data.draw(st.integers(1, 40))
    cols = data.draw(st.integers(1, 40))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    old = rng.integers(0, 256, rows * cols * width, dtype=np.uint8)
    new = old.copy().reshape(rows, cols * width)
    kind = data.draw(st.sampled_from(["rows", "elements", "all"]))
    if kind == "rows":
        pick = rng.random(rows) < 0.3
        pick[rng.integers(rows)] = True
        new[pick] = rng.integers(0, 256, (int(pick.sum()), cols * width), dtype=np.uint8)
    elif kind == "elements":
        flat = new.reshape(-1, width)
        at = rng.choice(len(flat), size=max(1, len(flat) // 20), replace=False)
        flat[at] = rng.integers(0, 256, (len(at), width), dtype=np.uint8)
    else:
        new[:] = rng.integers(0, 256, new.shape, dtype=np.uint8)
    a = save(tmp / "a.safetensors", {"w": (dtype, (rows, cols), old.tobytes())})
    b = save(tmp / "b.safetensors", {"w": (dtype, (rows, cols), new.tobytes())})
    if read(a) == read(b):
        return
    codec = [delta, "esort", "planes", "zstd"] if width > 1 else [delta, "esort", "zstd"]
    saved = differ.RELATIVE_CODECS
    differ.RELATIVE_CODECS = (codec,)
    try:
        nnpatch.diff(a, b, tmp / "p.nnpatch")
    finally:
        differ.RELATIVE_CODECS = saved
    with nnpatch.read_patch(tmp / "p.nnpatch") as p:
        # the forced codec, or raw bytes where compression would have made the section larger
        assert all(op.values.codec in (codec, []) for op in p.ops)
    previous = kernel.backend
    try:
        for backend in (["c"] if kernel._ext is not None else []) + ["numpy"]:
            kernel.select(backend)
            out = tmp / f"out-{backend}.safetensors"
            nnpatch.apply(a, tmp / "p.nnpatch", out, verify="full")
            assert read(out) == read(b)
    finally:
        kernel.select(previous)
