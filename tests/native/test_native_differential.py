"""Differential property tests (issue 13): hypothesis makes model pairs, Python's nnpatch.diff
makes the patch (its op, value codec and index format forced now and then, so that every one
the spec defines is exercised, not only those the differ would pick), and the Python applier
and ``nnpatch-apply`` must both rebuild the target byte for byte, or refuse with the same
exit code, writing nothing.

Covered: every safetensors dtype (BOOL, ints, F8, F16, BF16, F32, F64, C64) in weight-like
values and in raw bits (NaN payloads, infinities, -0.0), rank 0 and zero-size dimensions,
changed rows, scattered elements, whole tensors, dtype and shape changes, added and removed
tensors, metadata, non-canonical target layouts (order, padding), levels, reversible patches,
the three verify modes; chains of 2-3 patches in one call against apply_chain; signed patches
with --key (right key, another key, no signature); a wrong base.

Example counts come from the hypothesis profile (tests/conftest.py: HYPOTHESIS_PROFILE=fast 25,
ci 60, long 1000).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnpatch
import nnpatch.codecs as codecs
import nnpatch.differ as differ
from nnpatch import dtypes
from nnpatch.errors import NnpatchError
from nnpatch.hashing import model_digest
from nnpatch.signing import generate_keypair
from nnpatch.weights import write_safetensors
from nnpatch.weights.sniff import open_model

from .. import craft
from .conftest import _impls
from .native_run import assert_no_crash, assert_refused, leftovers
from .native_run import native as run_native

DTYPES = sorted(dtypes.ITEMSIZE)
VERIFY = ("default", "full", "touched")
MAX_ELEMENTS = 4096

# every example builds its own files in its own directory (hypothesis and function-scoped tmp_path)
HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


# --- values ------------------------------------------------------------------------------------------

def values(rng: np.random.Generator, dtype: str, n: int, style: str) -> bytes:
    """``n`` elements of ``dtype``: weight-like floats, raw random bits (every NaN payload), zeros,
    or special float values (NaN, infinities, -0.0, subnormals) mixed in."""
    width = dtypes.ITEMSIZE[dtype]
    if style == "zeros":
        return bytes(n * width)
    if dtype == "BOOL":
        return rng.integers(0, 2, size=n, dtype=np.uint8).tobytes()
    if style == "bits" or dtype not in ("F16", "BF16", "F32", "F64", "C64"):
        return rng.integers(0, 256, size=n * width, dtype=np.uint8).tobytes()
    f = rng.standard_normal(n * (2 if dtype == "C64" else 1)) * 0.05
    if style == "special" and len(f):
        pick = rng.random(len(f)) < 0.3
        f[pick] = rng.choice([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-310, 5e-45], size=int(pick.sum()))
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == "F16":
            return f.astype("<f2").tobytes()
        if dtype == "BF16":
            return (f.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        if dtype == "F64":
            return f.astype("<f8").tobytes()
        return f.astype("<f4").tobytes()  # F32, and C64 as pairs of F32


def perturb(rng: np.random.Generator, dtype: str, data: bytes, picked: np.ndarray) -> bytes:
    """``data`` with the elements where ``picked`` is true changed (a small step for floats, so the
    deltas look like a fine-tune; a random new value otherwise); at least one byte changes."""
    width = dtypes.ITEMSIZE[dtype]
    n = len(data) // width
    if n == 0 or not picked.any():
        return data
    words = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}[width]
    arr = np.frombuffer(data, words).copy()
    idx = np.flatnonzero(picked)
    if dtype in ("F32", "F64", "F16") and rng.random() < 0.7:
        f = arr.view({"F32": "<f4", "F64": "<f8", "F16": "<f2"}[dtype])
        with np.errstate(over="ignore", invalid="ignore"):
            f[idx] = f[idx] + f.dtype.type(1e-3) * rng.standard_normal(len(idx)).astype(f.dtype)
    else:
        new = np.frombuffer(values(rng, dtype, len(idx), "bits"), words)
        arr[idx] = new
    # a float step can round to the same bits, and random bits can repeat: force a change
    if arr.tobytes() == data:
        arr[idx[0]] ^= 1 if dtype != "BOOL" else 1
    out = arr.tobytes()
    return out


# --- models ------------------------------------------------------------------------------------------

NAME_CHARS = "abcxyz019._-/é中Ω"
names = st.text(alphabet=NAME_CHARS, min_size=1, max_size=10).filter(lambda s: s != "__metadata__")
shapes = st.one_of(
    st.just(()),  # rank 0
    st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple),  # small, zero-size dims likely
    st.tuples(st.integers(1, 64), st.integers(1, 64)),  # matrices: rows and elements ops
    st.tuples(st.integers(1, 12), st.integers(1, 6), st.integers(1, 5)),
).filter(lambda s: math.prod(s) <= MAX_ELEMENTS)
styles = st.sampled_from(["weights", "bits", "special", "zeros"])
metadata = st.one_of(st.none(), st.just({"format": "pt"}),
                     st.dictionaries(st.text(alphabet="abkv_é", min_size=1, max_size=5),
                                     st.text(alphabet="0123 xyzé", max_size=8), max_size=3))
CHANGES = ["same", "rows", "rows", "elements", "elements", "whole", "dtype", "shape", "remove", "bits"]


@st.composite
def tensor(draw, rng):
    dt = draw(st.sampled_from(DTYPES))
    shape = draw(shapes)
    return dt, shape, values(rng, dt, math.prod(shape), draw(styles))


@st.composite
def model(draw):
    """{name: (dtype, shape, bytes)}, metadata, and how the file is laid out."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ns = draw(st.lists(names, min_size=1, max_size=5, unique=True))
    return {n: draw(tensor(rng)) for n in ns}, draw(metadata), draw(st.sampled_from(["nnpatch", "craft"]))


@st.composite
def mutation(draw, m):
    """A target made from model ``m`` by a drawn change to each tensor, new tensors, new metadata."""
    tensors, meta, _ = m
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = {}
    for name, (dt, shape, data) in tensors.items():
        change = draw(st.sampled_from(CHANGES))
        n = math.prod(shape)
        if change == "same":
            out[name] = (dt, shape, data)
        elif change == "rows" and len(shape) >= 1 and shape[0] > 0 and n:
            rows = rng.random(shape[0]) < draw(st.sampled_from([0.05, 0.2, 0.6]))
            rows[rng.integers(shape[0])] = True
            picked = np.repeat(rows, n // shape[0])
            if draw(st.booleans()):  # only part of each changed row
                picked &= rng.random(n) < 0.5
                picked[np.flatnonzero(np.repeat(rows, n // shape[0]))[0]] = True
            out[name] = (dt, shape, perturb(rng, dt, data, picked))
        elif change == "elements" and n:
            picked = rng.random(n) < draw(st.sampled_from([0.01, 0.1, 0.45]))
            picked[rng.integers(n)] = True
            out[name] = (dt, shape, perturb(rng, dt, data, picked))
        elif change in ("whole", "rows", "elements") and n:
            out[name] = (dt, shape, perturb(rng, dt, data, np.ones(n, bool)))
        elif change == "bits":
            out[name] = (dt, shape, values(rng, dt, n, "bits"))
        elif change == "dtype":
            new_dt = draw(st.sampled_from([d for d in DTYPES if d != dt]))
            out[name] = (new_dt, shape, values(rng, new_dt, n, draw(styles)))
        elif change == "shape":
            new_shape = draw(shapes)
            if math.prod(new_shape) == n and draw(st.booleans()):  # a reshape keeping the bytes
                out[name] = (dt, new_shape, data)
            else:
                out[name] = (dt, new_shape, values(rng, dt, math.prod(new_shape), draw(styles)))
        elif change == "remove":
            continue
        else:
            out[name] = (dt, shape, data)
    for name in draw(st.lists(names, max_size=2, unique=True)):
        if name not in out:
            out[name] = draw(tensor(rng))
    new_meta = meta if draw(st.booleans()) else draw(metadata)
    return out, new_meta, draw(st.sampled_from(["nnpatch", "craft"]))


def write_model(path, m) -> str:
    """Write ``m``: by nnpatch's writer, or (``craft``) with tensors stored in reverse name order and
    the header JSON spaced and padded differently, which the patch's layout section must reproduce."""
    tensors, meta, style = m
    if style == "nnpatch" or not tensors:
        write_safetensors(path, tensors, meta)
        return os.fspath(path)
    obj, pos, blobs = {}, 0, []
    for name in sorted(tensors, reverse=True):
        dt, shape, data = tensors[name]
        obj[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    if meta is not None:
        obj = {"__metadata__": meta, **obj}
    text = json.dumps(obj, ensure_ascii=False, separators=(", ", ": ")).encode()
    text += b" " * (-len(text) % 8 + 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return os.fspath(path)


# --- forcing the differ's choices -----------------------------------------------------------------

def _pipelines():
    """Every value codec the spec allows: [delta] [esort] [planes] [zstd], esort only after a delta."""
    out = []
    for delta in (None, "xor", "add", "zadd"):
        for es in (False, True):
            if es and delta is None:
                continue
            for planes in (False, True):
                for z in (False, True):
                    out.append([s for s in (delta, "esort" if es else None, "planes" if planes else None,
                                            "zstd" if z else None) if s])
    return out


PIPELINES = _pipelines()
OPS = ("whole", "rows", "elements")
INDEX = [[f] for f in codecs.INDEX_FORMATS] + [[f, "zstd"] for f in codecs.INDEX_FORMATS]


def _allowed(codec: list[str], candidates) -> bool:
    """``codec`` may stand in for a candidate set: it keeps the set's needs (a delta stage where
    every candidate has one, none where none has, no esort where none has it)."""
    has_delta = [codecs.delta_stage(c) is not None for c in candidates]
    if all(has_delta) and codecs.delta_stage(codec) is None:
        return False
    if not any(has_delta) and codecs.delta_stage(codec) is not None:
        return False
    if "esort" in codec and not any("esort" in c for c in candidates):
        return False
    return True


@contextlib.contextmanager
def forced(op: str | None, codec: list[str] | None, index: list[str] | None):
    """Make nnpatch.diff pick ``op`` (where it is a candidate), the value ``codec`` (where the op's
    rules allow it) and the index format (where its bound allows it); None leaves a choice alone."""
    patches = []
    if op is not None:
        original_smallest = differ._smallest

        def smallest(writer, candidates):
            chosen = [c for c in candidates if c[0] == op]
            return original_smallest(writer, chosen or candidates)

        patches += [mock.patch.object(differ, "_smallest", smallest),
                    mock.patch.object(differ, "_TRY_ALL_OPS_BYTES", 1 << 40)]
    if codec is not None:
        original_choose = differ._choose_codec

        def choose(stream, candidates, level):
            ok = _allowed(codec, candidates)
            if stream.width == 1 and "planes" in codec:
                ok = False
            if "esort" in codec and (stream.old is None or stream.dtype not in codecs.EXPONENT_FIELDS):
                ok = False
            return original_choose(stream, (codec,) if ok else candidates, level)

        patches.append(mock.patch.object(differ, "_choose_codec", choose))
    if index is not None:
        original_index = codecs.best_index_encoding

        def best_index(indices, bound, level):
            fmt = index[0]
            if fmt == "u32" and bound > 1 << 32:
                return original_index(indices, bound, level)
            raw = codecs.encode_indices(indices, bound, fmt)
            if len(index) == 2:
                import zstandard
                z = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
                return list(index), z.compress(raw), len(raw)
            return list(index), raw, len(raw)

        patches.append(mock.patch.object(codecs, "best_index_encoding", best_index))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


diff_options = st.fixed_dictionaries({
    "level": st.sampled_from([1, 3, 5, 9, 19]),
    "reversible": st.booleans(),
    "op": st.sampled_from([None, *OPS]),
    "codec": st.one_of(st.none(), st.sampled_from(PIPELINES)),
    "index": st.one_of(st.none(), st.sampled_from(INDEX)),
    # the patch as the differ wrote it, or re-encoded from the spec by tests/craft.py: with a
    # zstd-compressed header (flag bit 1), or as a later minor version (which readers MUST accept)
    "container": st.sampled_from(["differ", "differ", "zstd-header", "minor-9"]),
})


def make_patch(base, target, out, opts, sign_key=None) -> str:
    with forced(opts["op"], opts["codec"], opts["index"]):
        nnpatch.diff(base, target, out, level=opts["level"], reversible=opts["reversible"], sign_key=sign_key)
    container = opts.get("container", "differ")
    if container != "differ" and sign_key is None:
        h = craft.decode_patch(read(out))
        data = craft.encode_patch(h, zstd_header=container == "zstd-header",
                                  version=(1, 9) if container == "minor-9" else None)
        with open(out, "wb") as f:
            f.write(data)
    tally(read(out), container)
    return os.fspath(out)


#: What the patches of this session held: ops, value codecs, index codecs, format versions.
coverage: dict[str, int] = {}


def tally(patch: bytes, container: str) -> None:
    h = craft.decode_patch(patch)
    keys = [f"version {h['_version'][0]}.{h['_version'][1]}", f"container {container}"]
    for op in h.get("ops", []):
        keys.append(f"op {op['op']}")
        if "values" in op:
            keys.append("values " + "+".join(op["values"]["codec"] or ["raw"]))
        if "index" in op:
            keys.append("index " + "+".join(op["index"]["codec"]))
        if "base_values" in op:
            keys.append("base_values")
    for k in keys:
        coverage[k] = coverage.get(k, 0) + 1


# --- comparing the two appliers -------------------------------------------------------------------

def read(p) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def python_apply(base, patches, out, **kw) -> int:
    """Python's exit code for applying ``patches`` (0, or its error's exit_code)."""
    try:
        if len(patches) == 1:
            nnpatch.apply(base, patches[0], out, **kw)
        else:
            nnpatch.apply_chain(base, patches, out, **kw)
        return 0
    except NnpatchError as e:
        return e.exit_code


def same_as_python(build, d, base, patches, *, verify="default", key=None, expect=None, tag="") -> int:
    """Apply with both; the same exit code, and on success the same bytes (== ``expect`` when given);
    on failure one Error line and nothing at -o or beside it."""
    py_out, c_dir = d / f"py{tag}.safetensors", d / f"c{tag}"
    c_dir.mkdir()
    c_out = c_dir / "out.safetensors"
    kw = {"verify": verify} | ({"key": key} if key else {})
    py_rc = python_apply(base, patches, py_out, **kw)
    args = [base, *patches, "-o", c_out, "--verify", verify, "--quiet"] + (["--key", key] if key else [])
    r = run_native(build, *args)
    assert_no_crash(r)
    assert r.rc == py_rc, f"Python exit {py_rc}, nnpatch-apply {r}"
    if py_rc == 0:
        assert r.err == "", str(r)
        got = read(c_out)
        assert got == read(py_out), "nnpatch-apply and Python wrote different bytes"
        if expect is not None:
            assert got == expect, "both wrote the same bytes, but not the target's"
        assert leftovers(c_dir, "out.safetensors") == []
    else:
        assert_refused(r, py_rc)
        assert leftovers(c_dir) == [], "a refused apply left a file behind"
    return py_rc


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for name in ("release", "other"):
        generate_keypair(str(d / f"{name}.pem"), str(d / f"{name}.pub.pem"))
    return d


_counts: dict[str, int] = {}


def count(name: str) -> None:
    _counts[name] = _counts.get(name, 0) + 1


def fresh(tmp_path, name: str):
    """A new directory for one hypothesis example (the function's tmp_path is shared by all)."""
    count(name)
    d = tmp_path / f"{name}-{_counts[name]}"
    d.mkdir()
    return d


# --- the properties -----------------------------------------------------------------------------------

def check_pair(build, tmp_path, data, opts, verify, name: str) -> None:
    m0 = data.draw(model(), label="base")
    m1 = data.draw(mutation(m0), label="target")
    d = fresh(tmp_path, name)
    base, target = write_model(d / "base.safetensors", m0), write_model(d / "target.safetensors", m1)
    patch = make_patch(base, target, d / "p.nnpatch", opts)
    rc = same_as_python(build, d, base, [patch], verify=verify, expect=read(target))
    assert rc == 0, "a patch made by nnpatch.diff did not apply to its own base"
    r = run_native(build, "--check", patch, "--base", base)
    assert r.rc == 0, str(r)


@settings(suppress_health_check=HEALTH, deadline=None)
@given(data=st.data(), opts=diff_options, verify=st.sampled_from(VERIFY))
def test_pair_applies_identically(native, tmp_path, data, opts, verify):
    check_pair(native, tmp_path, data, opts, verify, "pair")


@settings(suppress_health_check=HEALTH, deadline=None, max_examples=8)
@given(data=st.data(), opts=diff_options, verify=st.sampled_from(VERIFY))
def test_pair_under_sanitizers(request, tmp_path, data, opts, verify):
    """A sample of the pair property against the AddressSanitizer + UBSan build."""
    if "asan" not in _impls():
        pytest.skip("NNPATCH_NATIVE_IMPLS leaves the sanitizer build out")
    check_pair(request.getfixturevalue("asan"), tmp_path, data, opts, verify, "pair-asan")


@settings(suppress_health_check=HEALTH, deadline=None)
@given(data=st.data(), verify=st.sampled_from(VERIFY), links=st.integers(2, 3))
def test_chain_applies_identically(native, tmp_path, data, verify, links):
    d = fresh(tmp_path, "chain")
    models = [data.draw(model(), label="m0")]
    for i in range(links):
        models.append(data.draw(mutation(models[-1]), label=f"m{i + 1}"))
    paths = [write_model(d / f"m{i}.safetensors", m) for i, m in enumerate(models)]
    patches = [make_patch(paths[i], paths[i + 1], d / f"p{i}.nnpatch", data.draw(diff_options, label=f"opts{i}"))
               for i in range(links)]
    rc = same_as_python(native, d, paths[0], patches, verify=verify, expect=read(paths[-1]))
    assert rc == 0
    # the same chain with its links out of order: refused by both, with the same code
    same_as_python(native, d, paths[0], patches[::-1], verify=verify, tag="-reversed")


@settings(suppress_health_check=HEALTH, deadline=None, max_examples=10)
@given(data=st.data(), signer=st.sampled_from(["release", "other", "unsigned"]))
def test_signed_patch(native, tmp_path, keys, data, signer):
    m0 = data.draw(model(), label="base")
    m1 = data.draw(mutation(m0), label="target")
    d = fresh(tmp_path, "signed")
    base, target = write_model(d / "base.safetensors", m0), write_model(d / "target.safetensors", m1)
    sign_key = None if signer == "unsigned" else str(keys / f"{signer}.pem")
    patch = make_patch(base, target, d / "p.nnpatch", data.draw(diff_options), sign_key=sign_key)
    rc = same_as_python(native, d, base, [patch], key=str(keys / "release.pub.pem"), expect=read(target))
    assert rc == (0 if signer == "release" else 4)
    if signer != "unsigned":  # a signed patch applies without --key too
        assert same_as_python(native, d, base, [patch], tag="-nokey") == 0


def _model_digest(path) -> bytes:
    with open_model(path) as m:
        return model_digest(m)[0]


@settings(suppress_health_check=HEALTH, deadline=None, max_examples=10)
@given(data=st.data(), verify=st.sampled_from(VERIFY))
def test_wrong_base(native, tmp_path, data, verify):
    """A base that differs from the patch's: both refuse with the same code (4 where they can tell),
    in every verify mode: in touched mode a difference in a tensor the patch does not touch is
    copied unchecked, and then refused by the output's file digest, which every mode proves
    (issue 28 item 5)."""
    m0 = data.draw(model(), label="base")
    m1 = data.draw(mutation(m0), label="target")
    d = fresh(tmp_path, "wrong")
    base, target = write_model(d / "base.safetensors", m0), write_model(d / "target.safetensors", m1)
    patch = make_patch(base, target, d / "p.nnpatch", data.draw(diff_options))
    wrong = bytearray(read(base))
    (hlen,) = struct.unpack_from("<Q", wrong, 0)
    if len(wrong) > 8 + hlen:
        pos = data.draw(st.integers(8 + hlen, len(wrong) - 1), label="flipped byte")
        wrong[pos] ^= 0x40
    else:  # a model without tensor bytes: use the target as the wrong base, unless its tensors are the base's
        if _model_digest(base) == _model_digest(target):
            return  # only the file layout differs: a valid base (FORMAT.md section 9), which both accept
        wrong = bytearray(read(target))
    (d / "wrong.safetensors").write_bytes(bytes(wrong))
    if bytes(wrong) == read(base):
        return
    rc = same_as_python(native, d, str(d / "wrong.safetensors"), [patch], verify=verify)
    assert rc in (3, 4), f"a wrong base was applied (exit {rc})"


def test_report_counts():
    """The number of examples each property ran in this session (printed with -s; always passes)."""
    print("\ndifferential examples:", json.dumps(_counts, sort_keys=True))
    print("patch contents:", json.dumps(coverage, sort_keys=True, indent=1))
