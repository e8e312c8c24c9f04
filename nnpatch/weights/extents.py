"""The ``extents`` target kind (format 1.4): a file seen as a skeleton plus tensor extents.

Device formats (GGUF, LiteRT/TFLite, ExecuTorch .ptd) are all a skeleton (header, metadata,
tensor table, padding) with each tensor's bytes at an offset. A patch
describes such a file without knowing its format: the extent table (spec
section 5.8) names every tensor's offset, size, row size and type, and the
skeleton is every byte of the file outside the extents, concatenated in file
order. Only the diff side reads the format (``gguf_file``, ``tflite_file``, ``ptd_file``);
the applier, in Python here and in C (native/src/extents.c), joins skeleton
and tensor bytes back into the file.

This module is the reference implementation of the table's bytes and of the
join.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ..errors import WeightsError

TABLE_MAGIC = b"NNPEXT1\x00"
#: Names follow the ops' rule (1 to 65,536 UTF-8 bytes); a type name is a short ASCII word.
MAX_NAME = 65536
MAX_TYPE = 32
#: The table is refused past this many extents (the ops limit: every tensor may have one).
MAX_EXTENTS = 262144
_FIXED = struct.Struct("<QQQ")  # offset, size, row_bytes
_TYPE = re.compile(rb"[A-Za-z0-9_]{1,32}")


@dataclass(frozen=True)
class Extent:
    """One tensor's bytes in the file: ``row_bytes`` is one output channel in the file's
    encoding (for a block-quantized GGUF tensor, ne0 / block_size × type_size)."""

    name: str
    offset: int
    size: int
    row_bytes: int
    type: str

    @property
    def end(self) -> int:
        return self.offset + self.size


def encode_table(file_size: int, extents: list[Extent]) -> bytes:
    """The extent table's bytes (spec 5.8): magic, u64 file size, u64 count, then per extent in
    increasing offset: u64 offset, u64 size, u64 row_bytes, u8 type length, type, u32 name length, name."""
    out = [TABLE_MAGIC, struct.pack("<QQ", file_size, len(extents))]
    for e in sorted(extents, key=lambda e: e.offset):
        t, n = e.type.encode("ascii"), e.name.encode("utf-8", "surrogatepass")
        out += [_FIXED.pack(e.offset, e.size, e.row_bytes), struct.pack("<B", len(t)), t,
                struct.pack("<I", len(n)), n]
    return b"".join(out)


def decode_table(raw: bytes) -> tuple[int, list[Extent]]:
    """(file size, extents) from a table, every rule of spec 5.8 checked; ValueError names the first broken."""
    if raw[:8] != TABLE_MAGIC:
        raise ValueError("the extent table does not start with NNPEXT1")
    if len(raw) < 24:
        raise ValueError("the extent table is truncated")
    file_size, count = struct.unpack_from("<QQ", raw, 8)
    # an entry takes at least 8 × 3 + 1 + 1 + 4 + 1 = 31 bytes: a count the bytes cannot hold is refused first
    if count > MAX_EXTENTS or count * 31 > len(raw) - 24:
        raise ValueError(f"the extent table claims {count} extents, more than its {len(raw)} bytes hold "
                         f"or the limit of {MAX_EXTENTS}")
    if file_size >= 1 << 62:
        raise ValueError(f"the file size {file_size} is not below 2^62")
    pos, end_prev, out, names = 24, 0, [], set()
    for i in range(count):
        if pos + _FIXED.size + 1 > len(raw):
            raise ValueError(f"extent {i} is truncated")
        offset, size, row = _FIXED.unpack_from(raw, pos)
        tlen = raw[pos + 24]
        pos += 25
        t = raw[pos:pos + tlen]
        pos += tlen
        if len(t) != tlen or not _TYPE.fullmatch(t):
            raise ValueError(f"extent {i}: the type must be 1 to {MAX_TYPE} ASCII letters, digits or '_'")
        if pos + 4 > len(raw):
            raise ValueError(f"extent {i} is truncated")
        (nlen,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        n = raw[pos:pos + nlen]
        pos += nlen
        if len(n) != nlen or not 1 <= nlen <= MAX_NAME:
            raise ValueError(f"extent {i}: the name must be 1 to {MAX_NAME} bytes")
        try:
            name = n.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"extent {i}: the name is not UTF-8") from None
        if name in names:
            raise ValueError(f"extent {name!r} appears twice")
        names.add(name)
        if offset < end_prev:
            raise ValueError(f"extent {name!r} at {offset} overlaps the one before it or is out of order")
        if size > file_size or offset > file_size - size:
            raise ValueError(f"extent {name!r} ({offset} + {size}) runs past the end of the {file_size}-byte file")
        if size and (row == 0 or size % row):
            raise ValueError(f"extent {name!r}: its {size} bytes are not whole rows of {row} bytes")
        end_prev = offset + size
        out.append(Extent(name, offset, size, row, t.decode("ascii")))
    if pos != len(raw):
        raise ValueError(f"{len(raw) - pos} bytes follow the extent table")
    return file_size, out


def skeleton_of(data, extents: list[Extent]) -> bytes:
    """Every byte of ``data`` (the whole file) outside the extents, in file order."""
    out, pos = [], 0
    for e in sorted(extents, key=lambda e: e.offset):
        out.append(bytes(data[pos:e.offset]))
        pos = e.end
    out.append(bytes(data[pos:]))
    return b"".join(out)


def skeleton_size(file_size: int, extents: list[Extent]) -> int:
    return file_size - sum(e.size for e in extents)


def join(write, skeleton, extents: list[Extent], tensor_bytes) -> None:
    """Write the file: skeleton bytes and, at each extent, ``tensor_bytes(name)``, in file order,
    through ``write`` (so a caller hashes while it writes). Sizes are the caller's to have checked."""
    pos = 0  # in the skeleton
    at = 0  # in the file
    for e in extents:
        gap = e.offset - at
        write(skeleton[pos:pos + gap])
        pos += gap
        data = tensor_bytes(e.name)
        write(data)
        at = e.end
    write(skeleton[pos:])


def check_fits(extents: list[Extent], tensors: dict, file_size: int, skeleton_len: int) -> None:
    """The extents describe exactly ``tensors`` (name -> info with ``nbytes`` and ``shape``) and the
    skeleton fills the rest of a ``file_size``-byte file: WeightsError naming the first mismatch."""
    names = {e.name for e in extents}
    if names != set(tensors):
        extra = sorted(names - set(tensors))[:1] or sorted(set(tensors) - names)[:1]
        raise WeightsError(f"the extent table and the tensors differ (first: {extra[0]!r})")
    for e in extents:
        info = tensors[e.name]
        nbytes = info.nbytes
        if nbytes != e.size:
            raise WeightsError(f"extent {e.name!r} is {e.size} bytes, its tensor {nbytes}")
        rows = info.shape[0] if len(info.shape) >= 1 else 1
        if e.size and rows * e.row_bytes != e.size:
            raise WeightsError(f"extent {e.name!r}: {rows} rows of {e.row_bytes} bytes are not its {e.size} bytes")
    if skeleton_size(file_size, extents) != skeleton_len:
        raise WeightsError(f"the skeleton is {skeleton_len} bytes, the file leaves "
                           f"{skeleton_size(file_size, extents)} outside its extents")
