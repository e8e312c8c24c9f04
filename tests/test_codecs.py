"""Every codec round-trips exactly, on every dtype width, and rejects damaged input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from nnpatch import codecs, kernel
from nnpatch.errors import PatchFormatError, UnsupportedVersionError

WIDTHS = [1, 2, 4, 8]
VALUE_CODECS = [[], ["zstd"], ["planes"], ["planes", "zstd"], ["xor"], ["xor", "planes", "zstd"],
                ["add", "planes", "zstd"], ["zadd", "planes", "zstd"], ["zadd", "zstd"], ["add"]]


def _decode(buf, codec, width, unit_elements, units, old: np.ndarray) -> np.ndarray:
    """Reference decoder: undo zstd, planes and delta with the kernel, chunk by chunk."""
    unit_bytes = unit_elements * width
    sizes = codecs.value_chunk_sizes(units, unit_bytes, unit_elements)
    out = old.copy()
    pos = 0
    mode = {"xor": "xor", "add": "add", "zadd": "zadd", None: "replace"}[codecs.delta_stage(codec)]
    for chunk in codecs.decoded_chunks(buf, codec, units * unit_bytes, sizes, where="t"):
        kernel.combine(out[pos : pos + len(chunk)], chunk, width, mode, planar="planes" in codec)
        pos += len(chunk)
    return out


@given(width=st.sampled_from(WIDTHS), codec=st.sampled_from(VALUE_CODECS), data=st.data(),
       unit_elements=st.integers(1, 5), chunk=st.sampled_from([1, 3, 1 << 20]))
def test_value_stream_roundtrip(width, codec, data, unit_elements, chunk):
    units = data.draw(st.integers(0, 40))
    n = units * unit_elements * width
    new = np.frombuffer(data.draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8)
    old = np.frombuffer(data.draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8)
    saved = codecs.CHUNK_ELEMENTS
    codecs.CHUNK_ELEMENTS = chunk
    try:
        per = codecs.chunk_units(unit_elements) * unit_elements * width
        pieces = [(new[i : i + per], old[i : i + per]) for i in range(0, n, per)]
        buf = io.BytesIO()
        codecs.encode_value_stream(buf, iter(pieces), codec=codec, width=width, size=n, level=3)
        got = _decode(buf.getvalue(), codec, width, unit_elements, units, old)
    finally:
        codecs.CHUNK_ELEMENTS = saved
    assert got.tobytes() == new.tobytes()


@given(st.sampled_from(WIDTHS), st.binary(max_size=256))
def test_planes_inverse(width, raw):
    raw = raw[: len(raw) // width * width]
    a = np.frombuffer(raw, dtype=np.uint8)
    assert codecs.from_planes(codecs.to_planes(a, width), width).tobytes() == raw
    assert codecs.to_planes(a, width).tobytes() == kernel.planes(a, width).tobytes()


@given(st.sampled_from(WIDTHS), st.sampled_from(["xor", "add", "zadd"]), st.data())
def test_delta_matches_kernel(width, stage, data):
    n = data.draw(st.integers(0, 30)) * width
    new = np.frombuffer(data.draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8)
    old = np.frombuffer(data.draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8)
    v = codecs.encode_delta(new, old, width, stage)
    assert v.tobytes() == kernel.encode_delta(old, new, width, stage).tobytes()


def test_zigzag_makes_small_differences_small():
    old = np.array([1000, 1000, 1000], dtype="<u4").view(np.uint8)
    new = np.array([1001, 999, 1000], dtype="<u4").view(np.uint8)
    assert codecs.encode_delta(new, old, 4, "zadd").view("<u4").tolist() == [2, 1, 0]


@st.composite
def index_sets(draw):
    bound = draw(st.integers(1, 5000))
    idx = sorted(draw(st.sets(st.integers(0, bound - 1), max_size=min(bound, 300))))
    return np.array(idx, dtype=np.uint64), bound


@given(index_sets(), st.sampled_from(codecs.INDEX_FORMATS), st.booleans())
def test_index_roundtrip(sample, fmt, packed):
    idx, bound = sample
    raw = codecs.encode_indices(idx, bound, fmt)
    codec = [fmt]
    payload = raw
    if packed:
        codec.append("zstd")
        payload = zstandard.ZstdCompressor(level=3).compress(raw)
    got = codecs.decode_indices(payload, codec, count=len(idx), bound=bound, size=len(raw), where="i")
    assert got.tolist() == idx.tolist()


@given(index_sets())
def test_best_index_encoding_roundtrips(sample):
    idx, bound = sample
    codec, payload, size = codecs.best_index_encoding(idx, bound, 3)
    got = codecs.decode_indices(payload, codec, count=len(idx), bound=bound, size=size, where="i")
    assert got.tolist() == idx.tolist()


@pytest.mark.parametrize("fmt,payload,count,bound,message", [
    ("u32", b"\x05\x00\x00\x00\x03\x00\x00\x00", 2, 10, "i: indices must be strictly increasing and below 10"),
    ("u32", b"\x05\x00\x00\x00", 1, 5, "i: indices must be strictly increasing and below 5"),
    ("u32", b"\x05\x00\x00", 1, 10, "i: 3 index bytes, 1 u32 indices need 4"),
    ("delta-varint", b"\x80", 1, 10, "i: varint stream holds 0 values, expected 1"),
    ("delta-varint", b"\x09\x00", 2, 10, "i: index out of range (bound 10)"),
    ("delta-varint", b"\xff" * 10 + b"\x01", 1, 10, "i: varint exceeds 64 bits"),
    ("bitmap", b"\x01\x02", 2, 9, "i: bitmap has bits set past position 9"),
    ("bitmap", b"\x03", 1, 8, "i: bitmap holds 2 indices, expected 1"),
])
def test_bad_indices(fmt, payload, count, bound, message):
    with pytest.raises(PatchFormatError) as info:
        codecs.decode_indices(payload, [fmt], count=count, bound=bound, size=len(payload), where="i")
    assert str(info.value) == message


def test_unknown_stages_are_refused_by_name():
    with pytest.raises(UnsupportedVersionError, match="unknown encoding 'lz4'"):
        codecs.check_value_codec(["lz4"], relative_allowed=True, where="v")
    with pytest.raises(UnsupportedVersionError, match="unknown index encoding 'roaring'"):
        codecs.check_index_codec(["roaring"], where="i")
    with pytest.raises(PatchFormatError, match="out of order"):
        codecs.check_value_codec(["zstd", "planes"], relative_allowed=True, where="v")
    with pytest.raises(PatchFormatError, match="needs an old tensor"):
        codecs.check_value_codec(["xor"], relative_allowed=False, where="v")


def test_zstd_section_rules():
    frame = zstandard.ZstdCompressor(level=3).compress(b"abc" * 100)
    assert b"".join(codecs.decoded_chunks(frame, ["zstd"], 300, [300], where="s")) == b"abc" * 100
    with pytest.raises(PatchFormatError, match="bytes after the zstd frame"):
        list(codecs.decoded_chunks(frame + b"x", ["zstd"], 300, [300], where="s"))
    with pytest.raises(PatchFormatError, match="declares 300 bytes, section size is 299"):
        list(codecs.decoded_chunks(frame, ["zstd"], 299, [299], where="s"))
    with pytest.raises(PatchFormatError, match="does not start with a zstd frame"):
        list(codecs.decoded_chunks(b"\0" * 20, ["zstd"], 3, [3], where="s"))
    unsized = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(b"abc")
    with pytest.raises(PatchFormatError, match="declares"):
        list(codecs.decoded_chunks(unsized, ["zstd"], 3, [3], where="s"))
    with pytest.raises(PatchFormatError):
        list(codecs.decoded_chunks(frame[:-4], ["zstd"], 300, [300], where="s"))


@given(st.binary(max_size=64))
def test_garbage_zstd_raises_only_format_errors(junk):
    frame = zstandard.ZstdCompressor(level=3).compress(b"xyz" * 50)
    for data in (junk, frame[:8] + junk, frame[: len(frame) // 2] + junk):
        try:
            list(codecs.decoded_chunks(data, ["zstd"], 150, [150], where="s"))
        except PatchFormatError:
            pass
