"""ExecuTorch ``.ptd`` files for the tests, written to the documented layout (executorch's
docs/source/ptd-file-format.md, extension/flat_tensor/serialize/flat_tensor.fbs and serialize.py),
with the flatbuffers runtime's builder: executorch itself is too heavy an install for ``make test``.

``write_ptd`` lays a file out as ExecuTorch's FlatTensorSerializer does: the FlatTensor flatbuffer
(identifier FT01) with the 40-byte FH01 extended header inserted at byte 8 (padded to 48, the root
offset moved past it), the flatbuffer padded to 16, then the segments, each 16-byte aligned from the
segment base.
"""

from __future__ import annotations

import struct

import numpy as np

flatbuffers = __import__("pytest").importorskip("flatbuffers")

ALIGN = 16
HEADER = struct.Struct("<4sIQQQQ")
#: numpy dtype -> executorch ScalarType
SCALAR = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
          np.dtype(np.int64): 4, np.dtype(np.float16): 5, np.dtype(np.float32): 6, np.dtype(np.float64): 7}


def _align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def write_ptd(path, named: dict[str, np.ndarray | bytes], *, share: dict[str, str] | None = None) -> bytes:
    """A ``.ptd`` of ``named`` (key -> array, or bytes for an opaque blob); ``share`` maps a key to
    another key whose segment it names too. Returns the file's bytes."""
    share = share or {}
    segs: list[bytes] = []
    index: dict[str, int] = {}
    for key, value in named.items():
        if key in share:
            continue
        index[key] = len(segs)
        segs.append(value if isinstance(value, bytes) else np.ascontiguousarray(value).tobytes())
    for key, other in share.items():
        index[key] = index[other]
    offsets, pos = [], 0
    for s in segs:
        pos = _align(pos)
        offsets.append(pos)
        pos += len(s)
    data_size = pos

    b = flatbuffers.Builder(1024)
    named_offsets = []
    for key in list(named):
        value = named[share.get(key, key)]
        layout = None
        if not isinstance(value, bytes):
            b.StartVector(4, value.ndim, 4)
            for d in reversed(value.shape):
                b.PrependInt32(d)
            sizes = b.EndVector()
            b.StartVector(1, value.ndim, 1)
            for d in reversed(range(value.ndim)):
                b.PrependUint8(d)
            order = b.EndVector()
            b.StartObject(3)
            b.PrependInt8Slot(0, SCALAR[value.dtype], 0)
            b.PrependUOffsetTRelativeSlot(1, sizes, 0)
            b.PrependUOffsetTRelativeSlot(2, order, 0)
            layout = b.EndObject()
        k = b.CreateString(key)
        b.StartObject(3)
        b.PrependUOffsetTRelativeSlot(0, k, 0)
        b.PrependUint32Slot(1, index[key], 0)
        if layout is not None:
            b.PrependUOffsetTRelativeSlot(2, layout, 0)
        named_offsets.append(b.EndObject())
    seg_offsets = []
    for off, s in zip(offsets, segs):
        b.StartObject(2)
        b.PrependUint64Slot(0, off, 0)
        b.PrependUint64Slot(1, len(s), 0)
        seg_offsets.append(b.EndObject())
    vectors = []
    for items in (seg_offsets, named_offsets):
        b.StartVector(4, len(items), 4)
        for o in reversed(items):
            b.PrependUOffsetTRelative(o)
        vectors.append(b.EndVector())
    b.StartObject(3)
    b.PrependUint32Slot(0, 0, 0)
    b.PrependUOffsetTRelativeSlot(1, vectors[0], 0)
    b.PrependUOffsetTRelativeSlot(2, vectors[1], 0)
    b.Finish(b.EndObject(), file_identifier=b"FT01")
    fbuf = bytes(b.Output())

    head_len = _align(HEADER.size)
    padded = _align(len(fbuf))
    base = _align(padded + head_len)
    header = HEADER.pack(b"FH01", HEADER.size, head_len, len(fbuf), base, data_size).ljust(head_len, b"\0")
    root = struct.unpack_from("<I", fbuf, 0)[0] + head_len
    out = bytearray(struct.pack("<I", root) + fbuf[4:8] + header + fbuf[8:])
    out += bytes(base - len(out))
    for off, s in zip(offsets, segs):
        out += bytes(base + off - len(out)) + s
    with open(path, "wb") as f:
        f.write(out)
    return bytes(out)


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((16, 3, 3, 3), dtype=np.float32),
        "conv.bias": rng.standard_normal(16, dtype=np.float32),
        "linear.weight": rng.standard_normal((64, 128), dtype=np.float32),
        "emb.weight": rng.standard_normal((32, 48)).astype(np.float16),
        "q.weight": rng.integers(-128, 127, (40, 64), dtype=np.int8),
    }
