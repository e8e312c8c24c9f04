"""The safetensors reader agrees with the reference implementation and refuses malformed files."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given
from hypothesis import strategies as st

from nnpatch.errors import WeightsError
from nnpatch.weights import SafetensorsFile, parse_safetensors_header, write_safetensors

from .conftest import read

NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
                "I32": np.int32, "I64": np.int64, "BOOL": np.bool_, "U16": np.uint16, "I16": np.int16}


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.tuples(
    st.sampled_from(sorted(NUMPY_DTYPES)), st.lists(st.integers(0, 4), max_size=3)), max_size=5),
    st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
def test_writer_matches_reference_and_reader_agrees(tmp_path_factory, spec, metadata):
    tmp = tmp_path_factory.mktemp("w")
    rng = np.random.default_rng(0)
    arrays = {}
    for name, (dtype, shape) in spec.items():
        arrays[name] = rng.integers(0, 2, size=shape).astype(NUMPY_DTYPES[dtype])
    if not arrays and metadata == {}:
        return  # safetensors 0.8 writes invalid JSON here ('{},"__metadata__":{}}'); nothing to compare
    safetensors.numpy.save_file(arrays, str(tmp / "ref.safetensors"), metadata=metadata)
    write_safetensors(tmp / "mine.safetensors",
                      {k: (spec[k][0], v.shape, v.tobytes()) for k, v in arrays.items()}, metadata)
    if metadata is None or len(metadata) <= 1:
        # the reference writer orders metadata keys at random (a Rust HashMap); otherwise bytes must match
        assert read(tmp / "mine.safetensors") == read(tmp / "ref.safetensors")
    with SafetensorsFile(tmp / "mine.safetensors") as f:
        assert f.metadata == metadata
    with SafetensorsFile(tmp / "ref.safetensors") as f:
        assert f.metadata == metadata
        for name, arr in arrays.items():
            assert f.raw(name).tobytes() == arr.tobytes()
            assert f.tensors[name].shape == arr.shape


def _file(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("raw,message", [
    (b"\x01\x00", "not a safetensors file: 2 bytes, need at least 8"),
    (struct.pack("<Q", 10**9), "safetensors header of 1000000000 bytes exceeds the 100000000 limit"),
    (struct.pack("<Q", 50) + b"{}", "safetensors header truncated: declares 50 bytes, 2 present"),
    (_file({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "tensor 'a': unknown dtype 'F33'"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     "tensor 'a': data_offsets span 4 bytes, dtype and shape need 8"),
    (_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "tensor 'a': invalid shape [-1]"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
     "data offsets are not contiguous: tensor 'a' leaves a hole before it"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "data offsets are not contiguous: tensor 'b' overlaps the previous tensor"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2),
     "file is 71 bytes but the header describes 73 (truncated)"),
    (_file({"__metadata__": {"k": 1}}), "invalid safetensors header: __metadata__ must map strings to strings"),
    (struct.pack("<Q", 2) + b"[]", "not a safetensors file: header does not start with '{'"),
])
def test_malformed_headers(raw, message):
    with pytest.raises(WeightsError) as info:
        parse_safetensors_header(raw, file_size=len(raw), path="m")
    assert str(info.value) == f"m: {message}"


def test_duplicate_tensor_names_are_refused():
    text = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    raw = struct.pack("<Q", len(text)) + text + b"\0"
    with pytest.raises(WeightsError, match="duplicate key 'a'"):
        parse_safetensors_header(raw, file_size=len(raw), path="m")


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_weights_errors(raw):
    try:
        parse_safetensors_header(raw, file_size=len(raw), path="m")
    except WeightsError:
        pass


def test_lone_surrogate_names_are_refused(tmp_path):
    """safetensors' reference reader (serde_json) refuses a lone surrogate escape; so does nnpatch,
    instead of failing later when the name is hashed or written as UTF-8."""
    import json as _json
    import struct as _struct

    from nnpatch.weights import SafetensorsFile

    header = _json.dumps({"a\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    assert b"\\ud800" in header
    (tmp_path / "s.safetensors").write_bytes(_struct.pack("<Q", len(header)) + header + b"\x00")
    with pytest.raises(WeightsError, match="lone surrogate"):
        SafetensorsFile(tmp_path / "s.safetensors")


def test_fileno_and_buffer_give_the_file_and_its_map(tmp_path):
    """The zero-copy paths (copy_file_range from the descriptor, hashing the map) see the file's own bytes."""
    import os

    write_safetensors(tmp_path / "a.safetensors", {"t": ("U8", (3,), b"xyz")})
    with SafetensorsFile(tmp_path / "a.safetensors") as f:
        info = f.tensors["t"]
        assert os.pread(f.fileno(), info.nbytes, info.begin) == b"xyz"
        assert f.buffer[info.begin:info.end] == b"xyz"
        assert len(f.buffer) == f.size


