"""diff -> apply reproduces the target byte for byte, on every dtype and op."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import nnpatch
from nnpatch import dtypes
from nnpatch.hashing import hash_file

from .conftest import ALL_DTYPES, read, save
from conftest import assert_proven


def _roundtrip(tmp_path, base, target, **kw):
    patch = tmp_path / "p.nnpatch"
    out = tmp_path / "out.safetensors"
    result = nnpatch.diff(base, target, patch, **kw)
    applied = nnpatch.apply(base, patch, out)
    assert read(out) == read(target)
    assert hash_file(target) == hash_file(out)
    assert_proven(applied, target)
    assert nnpatch.verify(patch, base=base, target=out).ok
    return result


def test_every_op(tmp_path, pair, backend):
    base, target = pair()
    result = _roundtrip(tmp_path, base, target)
    ops = {c.name: c.op for c in result.changes}
    assert ops["conv.weight"] in ("rows", "whole")
    assert ops["emb"] in ("elements", "rows")
    assert ops["old_only"] == "remove"
    assert ops["new_only"] == "add"
    assert ops["reshaped"] == "whole"
    assert "same" not in ops and "empty" not in ops


def test_identical_models_give_an_empty_patch(tmp_path, pair):
    base, _ = pair()
    result = _roundtrip(tmp_path, base, base)
    assert result.changes == []
    assert result.patch_size < 1024


def test_reserialized_base_still_takes_the_patch(tmp_path, pair):
    base, target = pair()
    patch = tmp_path / "p.nnpatch"
    nnpatch.diff(base, target, patch)
    from nnpatch.weights import SafetensorsFile

    with SafetensorsFile(base) as f:
        tensors = {n: (i.dtype, i.shape, f.raw(n).tobytes()) for n, i in f.tensors.items()}
    other = save(tmp_path / "other.safetensors", tensors, {"different": "metadata"})
    assert read(other) != read(base)
    out = tmp_path / "out.safetensors"
    nnpatch.apply(other, patch, out)
    assert read(out) == read(target)


def test_rows_op_for_a_channel_update(tmp_path, backend):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 512)).astype("<f4")
    base = save(tmp_path / "a.safetensors", {"w": ("F32", w.shape, w.tobytes())})
    w2 = w.copy()
    w2[rng.choice(256, 20, replace=False)] = rng.standard_normal((20, 512)).astype("<f4")
    target = save(tmp_path / "b.safetensors", {"w": ("F32", w.shape, w2.tobytes())})
    result = _roundtrip(tmp_path, base, target)
    assert [c.op for c in result.changes] == ["rows"]
    assert result.changes[0].rows_changed == 20
    assert result.patch_size < 0.1 * w.nbytes


def test_large_tensor_chooses_by_estimate(tmp_path, monkeypatch, backend):
    from nnpatch import differ

    monkeypatch.setattr(differ, "_TRY_ALL_OPS_BYTES", 1024)
    monkeypatch.setattr(differ, "_TRY_ALL_BYTES", 1024)
    rng = np.random.default_rng(2)
    w = rng.standard_normal((300, 200)).astype("<f4")
    w2 = w.copy()
    w2[::7] *= 1.01
    w2[5, 5] = 0
    base = save(tmp_path / "a.safetensors", {"w": ("F32", w.shape, w.tobytes())})
    target = save(tmp_path / "b.safetensors", {"w": ("F32", w.shape, w2.tobytes())})
    _roundtrip(tmp_path, base, target)


def test_chunk_boundaries(tmp_path, monkeypatch, backend):
    """Streams longer than one planes chunk decode across chunk edges."""
    from nnpatch import codecs

    monkeypatch.setattr(codecs, "CHUNK_ELEMENTS", 10)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((50, 7)).astype("<f4")
    w2 = w + np.float32(1e-3)
    w3 = w.copy()
    w3.reshape(-1)[::3] += 1
    base = save(tmp_path / "a.safetensors", {"w": ("F32", w.shape, w.tobytes()), "v": ("F32", w.shape, w.tobytes())})
    target = save(tmp_path / "b.safetensors", {"w": ("F32", w.shape, w2.tobytes()),
                                               "v": ("F32", w.shape, w3.tobytes())})
    _roundtrip(tmp_path, base, target)


@st.composite
def models(draw):
    """A random base and target: dtypes, ranks 0-4, zero-size dims, sparse changes, adds and removes."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(0, 5))
    base, target = {}, {}
    for i in range(n):
        dtype = draw(st.sampled_from(ALL_DTYPES))
        rank = draw(st.integers(0, 4))
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=rank, max_size=rank)))
        nbytes = math.prod(shape) * dtypes.ITEMSIZE[dtype]
        data = rng.integers(0, 256, nbytes, dtype=np.uint8)
        name = draw(st.sampled_from(["w", "layer.0.weight", "ü/ñ", "b" * 40, "x"])) + str(i)
        fate = draw(st.sampled_from(["same", "sparse", "dense", "rows", "remove", "reshape", "retype"]))
        base[name] = (dtype, shape, data.tobytes())
        new = data.copy()
        if fate == "remove":
            continue
        if fate == "sparse" and nbytes:
            k = draw(st.integers(1, max(1, nbytes // 4)))
            pos = rng.choice(nbytes, size=min(k, nbytes), replace=False)
            new[pos] ^= rng.integers(1, 256, len(pos), dtype=np.uint8)
        elif fate == "dense":
            new = rng.integers(0, 256, nbytes, dtype=np.uint8)
        elif fate == "rows" and shape and shape[0] and nbytes:
            row = nbytes // shape[0]
            r = rng.integers(0, shape[0])
            new[r * row : (r + 1) * row] = rng.integers(0, 256, row, dtype=np.uint8)
        if fate == "reshape":
            target[name] = (dtype, tuple(reversed(shape)), new.tobytes())
        elif fate == "retype":
            other = draw(st.sampled_from(ALL_DTYPES))
            count = nbytes // dtypes.ITEMSIZE[other]
            target[name] = (other, (count,), new[: count * dtypes.ITEMSIZE[other]].tobytes())
        else:
            target[name] = (dtype, shape, new.tobytes())
    for j in range(draw(st.integers(0, 2))):
        dtype = draw(st.sampled_from(ALL_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        target[f"added{j}"] = (dtype, shape, rng.integers(0, 256, math.prod(shape) * dtypes.ITEMSIZE[dtype],
                                                          dtype=np.uint8).tobytes())
    meta = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
    return base, target, meta


@given(models(), st.sampled_from([1, 3, 9]))
def test_random_models_roundtrip(tmp_path_factory, model, level):
    tmp_path = tmp_path_factory.mktemp("rt")
    base_t, target_t, meta = model
    base = save(tmp_path / "a.safetensors", base_t, meta)
    target = save(tmp_path / "b.safetensors", target_t, {"m": "2"} if meta else None)
    _roundtrip(tmp_path, base, target, level=level)


@given(models())
def test_random_models_roundtrip_numpy_kernel(tmp_path_factory, model):
    from nnpatch import kernel

    previous = kernel.backend
    kernel.select("numpy")
    try:
        tmp_path = tmp_path_factory.mktemp("rtn")
        base_t, target_t, meta = model
        base = save(tmp_path / "a.safetensors", base_t, meta)
        target = save(tmp_path / "b.safetensors", target_t, meta)
        _roundtrip(tmp_path, base, target)
    finally:
        kernel.select(previous)
