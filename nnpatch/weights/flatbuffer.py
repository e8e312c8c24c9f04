"""Bounds-checked reads of flatbuffer tables, for the formats built on flatbuffers (TFLite, ExecuTorch).

A flatbuffer is a root offset, then tables reached by unsigned forward
offsets; a table starts with a signed offset to its vtable, which lists its
fields' positions. flatbuffers' own Python runtime and generated accessors
check none of this (a crafted signed offset makes ``struct.unpack_from`` read
from the other end of the file; a string past the end is cut short), so a
crafted file would be misread rather than refused. Here every position and
length is checked against the file's end, and a reader walks a fixed path of
fields (it never recurses), so a file cannot drive it deep or in circles.
"""

from __future__ import annotations

import struct

from ..errors import WeightsError


class Flatbuffer:
    """Checked reads of flatbuffer tables: every position and length is tested against the file's
    end, so a crafted file gives one WeightsError, never a read from elsewhere."""

    def __init__(self, buf, path: str, format_name: str) -> None:
        self.buf, self.path, self.size, self.format_name = buf, path, len(buf), format_name

    def fail(self, why: str):
        raise WeightsError(f"not a valid {self.format_name} file: {why}", path=self.path)

    def u32(self, pos: int, what: str) -> int:
        if pos < 0 or pos + 4 > self.size:
            self.fail(f"{what} at byte {pos} lies outside the file")
        return struct.unpack_from("<I", self.buf, pos)[0]

    def scalar(self, fmt: str, pos: int, what: str):
        n = struct.calcsize(fmt)
        if pos < 0 or pos + n > self.size:
            self.fail(f"{what} at byte {pos} lies outside the file")
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def table(self, pos: int, what: str) -> "Table":
        soffset = self.scalar("<i", pos, what)
        vtable = pos - soffset
        vsize = self.scalar("<H", vtable, f"{what}'s vtable")
        tsize = self.scalar("<H", vtable + 2, f"{what}'s vtable")
        if vsize < 4 or vsize % 2 or vtable + vsize > self.size or pos + tsize > self.size or tsize < 4:
            self.fail(f"{what}'s vtable at byte {vtable} is malformed")
        return Table(self, pos, vtable, vsize, tsize, what)

    def deref(self, pos: int, what: str) -> int:
        """The position an offset field at ``pos`` points at (always forward in a flatbuffer)."""
        return pos + self.u32(pos, what)

    def vector(self, pos: int, what: str, item: int) -> tuple[int, int]:
        """(start of the data, count) of the vector whose offset field is at ``pos``."""
        at = self.deref(pos, what)
        n = self.u32(at, f"{what}'s length")
        if n > (self.size - at - 4) // item:
            self.fail(f"{what} claims {n} items, more than the file holds")
        return at + 4, n


class Table:
    __slots__ = ("fb", "pos", "vtable", "vsize", "tsize", "what")

    def __init__(self, fb: Flatbuffer, pos: int, vtable: int, vsize: int, tsize: int, what: str) -> None:
        self.fb, self.pos, self.vtable, self.vsize, self.tsize, self.what = fb, pos, vtable, vsize, tsize, what

    def field(self, slot: int, width: int) -> int | None:
        """The position of field ``slot``, or None when it is absent (default)."""
        at = 4 + 2 * slot
        if at + 2 > self.vsize:
            return None
        off = struct.unpack_from("<H", self.fb.buf, self.vtable + at)[0]
        if not off:
            return None
        if off + width > self.tsize:
            self.fb.fail(f"{self.what}: field {slot} lies outside its table")
        return self.pos + off

    def scalar(self, slot: int, fmt: str, default):
        at = self.field(slot, struct.calcsize(fmt))
        return default if at is None else self.fb.scalar(fmt, at, f"{self.what} field {slot}")

    def string(self, slot: int) -> bytes | None:
        at = self.field(slot, 4)
        if at is None:
            return None
        start, n = self.fb.vector(at, f"{self.what}'s string", 1)
        return bytes(self.fb.buf[start:start + n])

    def vector(self, slot: int, item: int) -> tuple[int, int]:
        at = self.field(slot, 4)
        return (0, 0) if at is None else self.fb.vector(at, f"{self.what} field {slot}", item)

    def table(self, slot: int, what: str) -> Table | None:
        """The table field ``slot`` points at, or None when it is absent."""
        at = self.field(slot, 4)
        return None if at is None else self.fb.table(self.fb.deref(at, what), what)

    def tables(self, slot: int, what: str) -> list[Table]:
        start, n = self.vector(slot, 4)
        return [self.fb.table(self.fb.deref(start + 4 * i, f"{what} {i}"), f"{what} {i}") for i in range(n)]
