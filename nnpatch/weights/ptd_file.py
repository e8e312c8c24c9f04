"""ExecuTorch named-data files (``.ptd``, the FlatTensor format) as a :class:`~nnpatch.weights.model.Model`.

A ``.ptd`` file keeps a program's weights outside its ``.pte``: a flatbuffer
(file identifier ``FT01`` at bytes 4..8) into which ExecuTorch inserts an
extended header at byte 8 (magic ``FH01``, its length, the flatbuffer's
offset and size, the segment base offset and the segments' total size),
then data segments after the flatbuffer. The ``FlatTensor`` table lists the
segments (offset from the segment base, size) and the named data: a key
(the fully qualified name), a segment index and, for a tensor, its layout
(scalar type, sizes, dim order).

nnpatch patches it as an ``extents`` target (:mod:`.extents`), as it does
TFLite: one extent per segment that named data uses, named by its first key
(several keys may share a segment, which is then patched once, right for
all of them); everything else (header, flatbuffer, padding) is skeleton. The
``.pte`` is not touched. A tensor's dtype and shape come from its layout
when the layout is in the default dim order and describes the segment's
bytes exactly, so dimension 0 is a row; otherwise (opaque backend blobs,
permuted dim orders, packed types) it is ``U8`` of the segment's size.
"""

from __future__ import annotations

import struct

from ..dtypes import ITEMSIZE
from .extents import MAX_NAME, Extent
from .flatbuffer import Flatbuffer
from .model import MappedExtentsModel

#: The flatbuffer file identifier of flat_tensor.fbs, at bytes 4..8.
IDENTIFIER = b"FT01"
#: The extended header ExecuTorch inserts at byte 8: magic, length, flatbuffer offset and size,
#: segment base offset, segment data size.
HEADER_MAGIC = b"FH01"
_HEADER = struct.Struct("<4sIQQQQ")
MAX_DIMS = 16

# vtable slots (field ids in flat_tensor.fbs)
_FT_VERSION, _FT_SEGMENTS, _FT_NAMED = 0, 1, 2
_SEG_OFFSET, _SEG_SIZE = 0, 1
_ND_KEY, _ND_SEGMENT, _ND_LAYOUT = 0, 1, 2
_LAYOUT_TYPE, _LAYOUT_SIZES, _LAYOUT_DIM_ORDER = 0, 1, 2

#: executorch_flatbuffer.ScalarType -> (its name, the safetensors dtype or None: kept as U8 bytes)
SCALAR_TYPES = {
    0: ("BYTE", "U8"), 1: ("CHAR", "I8"), 2: ("SHORT", "I16"), 3: ("INT", "I32"), 4: ("LONG", "I64"),
    5: ("HALF", "F16"), 6: ("FLOAT", "F32"), 7: ("DOUBLE", "F64"), 11: ("BOOL", "BOOL"), 12: ("QINT8", "I8"),
    13: ("QUINT8", "U8"), 14: ("QINT32", "I32"), 15: ("BFLOAT16", "BF16"), 16: ("QUINT4X2", None),
    17: ("QUINT2X4", None), 22: ("BITS16", "U16"),
}


def parse(buf, path: str):
    """(metadata shown as text, [(extent, dtype, shape)]) of the ``.ptd`` bytes ``buf``."""
    fb = Flatbuffer(buf, path, "ExecuTorch .ptd")
    if len(buf) < 8 + _HEADER.size or bytes(buf[4:8]) != IDENTIFIER:
        fb.fail("no FT01 identifier at bytes 4..8, or no room for the extended header")
    magic, length, _, _, base, data_size = _HEADER.unpack_from(buf, 8)
    if magic != HEADER_MAGIC or length < _HEADER.size:
        fb.fail("no FH01 extended header at byte 8")
    if base > fb.size or data_size > fb.size - base:
        fb.fail(f"the segments ({data_size} bytes at {base}) run past the end of the {fb.size}-byte file")
    root = fb.table(fb.deref(0, "the root offset"), "the FlatTensor table")
    segments = root.tables(_FT_SEGMENTS, "segment")
    users: dict[int, list[tuple[str, object]]] = {}
    keys = set()
    for i, nd in enumerate(root.tables(_FT_NAMED, "named data")):
        raw = nd.string(_ND_KEY)
        try:
            key = raw.decode("utf-8") if raw and len(raw) <= MAX_NAME else None
        except UnicodeDecodeError:
            key = None
        if key is None:
            fb.fail(f"named data {i} has no key of 1 to {MAX_NAME} UTF-8 bytes")
        if key in keys:
            fb.fail(f"the key {key!r} appears twice")
        keys.add(key)
        seg = nd.scalar(_ND_SEGMENT, "<I", 0)
        if seg >= len(segments):
            fb.fail(f"{key!r} names segment {seg}, past the {len(segments)} segments")
        users.setdefault(seg, []).append((key, nd.table(_ND_LAYOUT, f"{key!r}'s tensor layout")))
    out = []
    for seg, sharers in sorted(users.items()):
        offset = segments[seg].scalar(_SEG_OFFSET, "<Q", 0)
        size = segments[seg].scalar(_SEG_SIZE, "<Q", 0)
        if offset > data_size or size > data_size - offset:
            fb.fail(f"segment {seg} ({size} bytes at {offset}) runs past the {data_size} bytes of segment data")
        if not size:
            continue
        key, layout = sharers[0]
        out.append((*_typed(fb, key, layout, size, base + offset),))
    ordered = sorted(out, key=lambda e: e[0].offset)
    for prev, cur in zip(ordered, ordered[1:]):
        if cur[0].offset < prev[0].end:
            fb.fail(f"the segments of {prev[0].name!r} and {cur[0].name!r} overlap")
    metadata = {"ptd.version": str(root.scalar(_FT_VERSION, "<I", 0)), "ptd.segments": str(len(segments)),
                "ptd.named_data": str(len(keys))}
    shared = sum(1 for s in users.values() if len(s) > 1)
    if shared:
        metadata["ptd.shared_segments"] = f"{shared} segments named by several keys, patched once each"
    return metadata, out


def _typed(fb: Flatbuffer, key: str, layout, size: int, begin: int):
    """(extent, dtype, shape) of a segment: typed by its layout where that describes its bytes."""
    tname, dtype, shape = "BLOB", None, (size,)
    if layout is not None:
        stype = layout.scalar(_LAYOUT_TYPE, "<b", 0)
        tname, dtype = SCALAR_TYPES.get(stype, (f"TYPE{stype & 0xff}", None))
        start, rank = layout.vector(_LAYOUT_SIZES, 4)
        if rank > MAX_DIMS:
            fb.fail(f"{key!r} has {rank} dimensions (at most {MAX_DIMS})")
        shape = tuple(fb.scalar("<i", start + 4 * d, f"{key!r}'s sizes") for d in range(rank))
        start, n = layout.vector(_LAYOUT_DIM_ORDER, 1)
        order = [fb.scalar("<B", start + d, f"{key!r}'s dim order") for d in range(n)]
        numel = 1
        for d in shape:
            numel = numel * d if d >= 0 else -1
        if (dtype is None or numel < 0 or numel * ITEMSIZE[dtype] != size
                or (order and order != list(range(rank)))):
            dtype = None  # a packed type, a permuted layout or sizes that do not fit: bytes
    if dtype is None:
        dtype, shape = "U8", (size,)
    row = size // shape[0] if shape and shape[0] else size
    return Extent(key, begin, size, row, tname), dtype, shape


class PtdModel(MappedExtentsModel):
    """An ExecuTorch ``.ptd`` file's named segments, zero-copy over a read-only map, and its extents."""

    def __init__(self, path: str) -> None:
        super().__init__("ptd", path, parse)
