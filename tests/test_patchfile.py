"""The container: exact layout, and a named error for every broken rule."""

from __future__ import annotations

import json
import os
import struct

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nnpatch
import crafting
from nnpatch import patchfile
from nnpatch.errors import PatchFormatError, UnsupportedVersionError
from nnpatch.patchfile import ALIGNMENT, MAGIC, PREAMBLE_SIZE, TRAILER_SIZE, parse_patch
from nnpatch.patchfile.writer import PatchWriter

from .conftest import read


@pytest.fixture
def written(tmp_path, pair):
    """A patch as the writer makes it (zstd header)."""
    base, target = pair()
    nnpatch.diff(base, target, tmp_path / "p.nnpatch")
    return read(tmp_path / "p.nnpatch")


@pytest.fixture
def patch_bytes(written):
    """The same patch with a plain JSON header, so tests can edit the text."""
    plain = crafting.with_header(written, crafting.header_json(written))
    return plain


def reseal(data: bytes) -> bytes:
    """Recompute the trailer so a test reaches the checks behind it."""
    return data[:-TRAILER_SIZE] + blake3.blake3(data[:-TRAILER_SIZE]).digest()


def test_plain_and_zstd_headers_apply_alike(tmp_path, pair, written, patch_bytes):
    base, target = pair()
    for i, data in enumerate((written, patch_bytes)):
        (tmp_path / f"{i}.nnpatch").write_bytes(data)
        nnpatch.apply(base, tmp_path / f"{i}.nnpatch", tmp_path / f"{i}.out")
        assert read(tmp_path / f"{i}.out") == read(target)


def rewrite_header(data: bytes, edit) -> bytes:
    """Change the JSON header, keeping its length (pad or fail) and the trailer valid."""
    (n,) = struct.unpack_from("<Q", data, 16)
    obj = json.loads(data[PREAMBLE_SIZE : PREAMBLE_SIZE + n])
    obj["created_by"] = ""  # room for edits that lengthen the header
    edit(obj)
    text = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert len(text) <= n, "edit made the header longer"
    text += b" " * (n - len(text))
    return reseal(data[:PREAMBLE_SIZE] + text + data[PREAMBLE_SIZE + n :])


def test_layout(patch_bytes):
    """The default layout (1.5): sections packed end to end, the trailer right after the last."""
    magic, major, minor, flags, n = struct.unpack_from("<8sHHIQ", patch_bytes, 0)
    assert magic == MAGIC == b"\x89NNP\r\n\x1a\n"
    header = parse_patch(patch_bytes)
    assert (major, minor) == (1, 5) and header.required_features == ["packed-sections"]
    assert flags == 0
    assert (PREAMBLE_SIZE + n) % ALIGNMENT == 0  # the header still ends on a boundary
    assert patch_bytes[-TRAILER_SIZE:] == blake3.blake3(patch_bytes[:-TRAILER_SIZE]).digest()
    cursor = PREAMBLE_SIZE + n
    for s in header.sections():
        assert s.offset == cursor
        cursor += s.length
    assert cursor == len(patch_bytes) - TRAILER_SIZE
    assert any(s.offset % ALIGNMENT for s in header.sections())  # packing saved something here
    text = patch_bytes[PREAMBLE_SIZE : PREAMBLE_SIZE + n].rstrip(b" ")
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_aligned_layout(tmp_path, pair):
    """--aligned: the 1.0-1.4 layout, every section and the trailer on a 64-byte boundary, the
    lowest version with the features used (a single-file target; esort where a section uses it)."""
    base, target = pair()
    nnpatch.diff(base, target, tmp_path / "p.nnpatch", aligned=True)
    data = read(tmp_path / "p.nnpatch")
    _, major, minor, flags, n = struct.unpack_from("<8sHHIQ", data, 0)
    header = parse_patch(data)
    uses_esort = any(op.values is not None and "esort" in op.values.codec for op in header.ops)
    assert (major, minor) == ((1, 2) if uses_esort else (1, 0)) and header.required_features == []
    assert (PREAMBLE_SIZE + n) % ALIGNMENT == 0
    assert (len(data) - TRAILER_SIZE) % ALIGNMENT == 0
    for s in header.sections():
        assert s.offset % ALIGNMENT == 0
    nnpatch.apply(base, tmp_path / "p.nnpatch", tmp_path / "out")
    assert read(tmp_path / "out") == read(target)


@pytest.mark.parametrize("length, packed", [(128, False), (100, True)])
def test_packing_only_when_it_saves_bytes(tmp_path, pair, length, packed):
    """Every section on a boundary and the data a whole number of 64-byte blocks: the writer keeps
    the 1.0 layout, which every reader takes; one byte of padding saved is a packed 1.5 patch."""
    base, _ = pair()
    nnpatch.diff(base, base, tmp_path / "same.nnpatch")
    header = parse_patch(read(tmp_path / "same.nnpatch"))
    w = PatchWriter(tmp_path / "p.nnpatch")
    header.target.layout = w.add_bytes(b" " * length, length, [])  # a layout section of that length
    header.version = None
    w.finish(header)
    written = parse_patch(read(tmp_path / "p.nnpatch"))
    assert written.packed is packed
    assert written.version == ((1, 5) if packed else (1, 0))
    assert os.path.getsize(tmp_path / "p.nnpatch") == written.target.layout.offset + length + TRAILER_SIZE + \
        (0 if packed else -length % ALIGNMENT)


def test_written_header_is_zstd_and_equivalent(written, patch_bytes):
    flags = struct.unpack_from("<I", written, 12)[0]
    assert flags & patchfile.FLAG_HEADER_ZSTD and len(written) < len(patch_bytes)
    a, b = parse_patch(written), parse_patch(patch_bytes)
    assert [op.to_json() for op in a.ops] == [op.to_json() for op in _shifted(b, a)]
    n = struct.unpack_from("<Q", written, 16)[0]
    frame_end = codecs_frame_end(written[PREAMBLE_SIZE : PREAMBLE_SIZE + n])
    assert not any(written[PREAMBLE_SIZE + frame_end : PREAMBLE_SIZE + n])  # zero padding


def _shifted(plain_header, zstd_header):
    delta = zstd_header.target.layout.offset - plain_header.target.layout.offset
    for op in plain_header.ops:
        for s in op.sections():
            s.offset += delta
    return plain_header.ops


def codecs_frame_end(raw: bytes) -> int:
    from nnpatch.codecs import zstd_frame_length

    return zstd_frame_length(raw)


def test_compressed_header_rules(written):
    n = struct.unpack_from("<Q", written, 16)[0]
    end = codecs_frame_end(written[PREAMBLE_SIZE : PREAMBLE_SIZE + n])
    if PREAMBLE_SIZE + end < PREAMBLE_SIZE + n:
        bad = bytearray(written)
        bad[PREAMBLE_SIZE + end] = 1
        with pytest.raises(PatchFormatError, match="padding after the zstd frame is not zero"):
            parse_patch(reseal(bytes(bad)))
    bad = bytearray(written)
    bad[PREAMBLE_SIZE] ^= 0xFF  # no longer a zstd frame
    with pytest.raises(PatchFormatError, match="compressed header"):
        parse_patch(reseal(bytes(bad)))


def test_writer_is_deterministic(tmp_path, pair):
    base, target = pair()
    nnpatch.diff(base, target, tmp_path / "a.nnpatch")
    nnpatch.diff(base, target, tmp_path / "b.nnpatch")
    assert read(tmp_path / "a.nnpatch") == read(tmp_path / "b.nnpatch")


def test_header_roundtrip(patch_bytes):
    header = parse_patch(patch_bytes)
    n = struct.unpack_from("<Q", patch_bytes, 16)[0]
    raw = patch_bytes[PREAMBLE_SIZE : PREAMBLE_SIZE + n]
    assert patchfile.encode_header(header.to_json()) == raw


def expect(data: bytes, cls, message: str) -> None:
    with pytest.raises(cls) as info:
        parse_patch(data, path="p.nnpatch")
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_bad_magic(patch_bytes):
    expect(b"PK\x03\x04" + patch_bytes[4:], PatchFormatError,
           "p.nnpatch: byte 0: not an nnpatch file (bad magic b'PK\\x03\\x04\\r\\n\\x1a\\n', "
           "expected b'\\x89NNP\\r\\n\\x1a\\n')")


def test_unknown_major_version(patch_bytes):
    data = patch_bytes[:8] + struct.pack("<HH", 2, 0) + patch_bytes[12:]
    expect(data, UnsupportedVersionError,
           "p.nnpatch: byte 8: unsupported format version 2.0 (this nnpatch reads 1.x)")


def test_newer_minor_version_is_read(patch_bytes):
    data = reseal(patch_bytes[:8] + struct.pack("<HH", 1, 7) + patch_bytes[12:])
    assert parse_patch(data).version == (1, 7)


def test_reserved_flag(patch_bytes):
    data = patch_bytes[:12] + struct.pack("<I", 4) + patch_bytes[16:]
    expect(data, UnsupportedVersionError, "p.nnpatch: byte 12: reserved flag bits set (0x0004)")


def test_unused_flags_are_ignored(patch_bytes):
    data = reseal(patch_bytes[:12] + struct.pack("<I", 0x00010000) + patch_bytes[16:])
    parse_patch(data)


def test_trailer_mismatch(patch_bytes):
    data = bytearray(patch_bytes)
    data[PREAMBLE_SIZE + 3] ^= 1
    expect(bytes(data), PatchFormatError,
           f"p.nnpatch: byte {len(data) - 32}: trailer hash mismatch: the file is corrupt or truncated")


def test_unknown_required_feature(patch_bytes):
    data = rewrite_header(patch_bytes, lambda h: h.update(required_features=["f"]))
    expect(data, UnsupportedVersionError,
           "p.nnpatch: requires feature 'f', which this nnpatch does not support")


def test_unknown_codec(patch_bytes):
    def edit(h):
        op = next(o for o in h["ops"] if o["name"] == "new_only")
        op["values"]["codec"] = ["lz4"]
    data = rewrite_header(patch_bytes, edit)
    position = [op.name for op in parse_patch(patch_bytes).ops].index("new_only")
    expect(data, UnsupportedVersionError,
           f"p.nnpatch: header: ops[{position}] ('new_only').values: unknown encoding 'lz4'")


def test_unknown_op(patch_bytes):
    def edit(h):
        h["ops"][0]["op"] = "move"
    expect(rewrite_header(patch_bytes, edit), UnsupportedVersionError,
           "p.nnpatch: header: ops[0].op: unknown operation 'move'")


def test_x_keys_are_ignored(patch_bytes):
    data = rewrite_header(patch_bytes, lambda h: h.update({"x-ci": 1}))
    assert parse_patch(data).extra == {"x-ci": 1}


def test_unsorted_ops(patch_bytes):
    def edit(h):
        h["ops"][0], h["ops"][1] = h["ops"][1], h["ops"][0]
    data = rewrite_header(patch_bytes, edit)
    with pytest.raises(PatchFormatError, match="ops must be sorted by name"):
        parse_patch(data)


def test_section_out_of_place(patch_bytes):
    def edit(h):
        h["target"]["layout"]["offset"] += 64
    with pytest.raises(PatchFormatError, match="out of place"):
        parse_patch(rewrite_header(patch_bytes, edit))


def test_trailing_bytes(patch_bytes):
    data = reseal(patch_bytes[:-TRAILER_SIZE] + b"\0" * 64 + patch_bytes[-TRAILER_SIZE:])
    with pytest.raises(PatchFormatError, match="trailing bytes"):
        parse_patch(data)


def test_duplicate_key(patch_bytes):
    n = struct.unpack_from("<Q", patch_bytes, 16)[0]
    text = patch_bytes[PREAMBLE_SIZE : PREAMBLE_SIZE + n]
    dup = text.replace(b'{"base":', b'{"base":0,"base":', 1)[:n]
    data = reseal(patch_bytes[:PREAMBLE_SIZE] + dup + patch_bytes[PREAMBLE_SIZE + n :])
    with pytest.raises(PatchFormatError, match="duplicate key 'base'"):
        parse_patch(data)


@given(st.data())
def test_truncation_and_bit_flips_raise_named_errors(patch_bytes, data):
    """Any damage gives PatchFormatError (never another exception)."""
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(patch_bytes) - 1))
        damaged = patch_bytes[:cut]
    else:
        pos = data.draw(st.integers(0, len(patch_bytes) - 1))
        bit = data.draw(st.integers(0, 7))
        damaged = bytearray(patch_bytes)
        damaged[pos] ^= 1 << bit
        damaged = bytes(damaged)
    with pytest.raises(PatchFormatError):
        parse_patch(damaged)
