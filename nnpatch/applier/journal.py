"""The undo journal of an in-place apply (spec/JOURNAL.md is normative).

    Magic (8) | Version_Major (u16) | Version_Minor (u16) | Flags (u32)
    | Header_Length (u64) | Header (UTF-8 JSON, space-padded to 64)
    | per entry: indices (u64 LE x count), old bytes (unit x count), each 64-aligned, zero-padded
    | Trailer_Hash (32, BLAKE3 of all before)

The journal is written to ``MODEL.nnpatch-journal.tmp``, fsynced, renamed to
``MODEL.nnpatch-journal`` and the directory fsynced, all before the first
byte of the model is written; so a journal under the final name is complete
unless storage corrupted it, which the trailer hash detects.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import blake3
import numpy as np

from ..atomic import fsync_dir
from ..errors import IntegrityError, NnpatchIOError, TornJournal

MAGIC = b"\x89NNJ\r\n\x1a\n"
VERSION = (1, 0)
PREAMBLE = struct.Struct("<8sHHIQ")
ALIGN = 64
TRAILER = 32
SUFFIX = ".nnpatch-journal"


def journal_path(model: str | os.PathLike[str]) -> str:
    return os.fspath(model) + SUFFIX


def _pad(n: int) -> int:
    return -n % ALIGN


@dataclass
class Entry:
    """Old bytes of one tensor: ``count`` units of ``unit`` bytes at ``indices``."""

    name: str
    offset: int  # absolute file offset of the tensor's first byte
    nbytes: int  # the tensor's size
    unit: int  # bytes per unit (a row, an element, or the whole tensor)
    count: int
    base_blake3: str  # the tensor's digest before (what rollback must give)
    target_blake3: str  # and after
    index_at: int = 0  # offsets inside the journal, filled when written
    data_at: int = 0

    def to_json(self) -> dict:
        return {"name": self.name, "offset": self.offset, "nbytes": self.nbytes, "unit": self.unit,
                "count": self.count, "base_blake3": self.base_blake3, "target_blake3": self.target_blake3,
                "index_at": self.index_at, "data_at": self.data_at}


def _layout(entries: list[Entry], header_len: int) -> int:
    pos = PREAMBLE.size + header_len
    for e in entries:
        e.index_at = pos
        pos += 8 * e.count
        pos += _pad(pos)
        e.data_at = pos
        pos += e.unit * e.count
        pos += _pad(pos)
    return pos


def encode_header(meta: dict, entries: list[Entry]) -> bytes:
    """The JSON header, its length fixed point found with the data offsets in it."""
    text = b""
    for _ in range(8):
        _layout(entries, len(text))
        obj = dict(meta, entries=[e.to_json() for e in entries])
        new = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        new += b" " * _pad(PREAMBLE.size + len(new))
        if len(new) == len(text):
            return new
        text = new
    _layout(entries, len(text))
    return text


class JournalWriter:
    """Streams a journal to ``path + '.tmp'``; ``commit`` makes it durable under ``path``."""

    def __init__(self, path: str, meta: dict, entries: list[Entry]) -> None:
        self.path = path
        self.tmp = path + ".tmp"
        self.entries = entries
        header = encode_header(meta, entries)
        self.h = blake3.blake3()
        try:
            self.f = open(self.tmp, "wb")
        except OSError as e:
            raise NnpatchIOError(f"{self.tmp}: cannot write the journal: {e.strerror or e}") from e
        self.pos = 0
        self._write(PREAMBLE.pack(MAGIC, VERSION[0], VERSION[1], 0, len(header)) + header)
        self.bytes = 0

    def _write(self, data) -> None:
        mv = memoryview(data).cast("B")
        self.f.write(mv)
        self.h.update(mv)
        self.pos += len(mv)

    def write(self, data) -> None:
        self._write(data)
        self._align()

    def write_part(self, data) -> None:
        self._write(data)

    def end_part(self) -> None:
        self._align()

    def _align(self) -> None:
        pad = _pad(self.pos)
        if pad:
            self._write(b"\x00" * pad)

    def commit(self) -> None:

        try:
            self.f.write(self.h.digest())
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise NnpatchIOError(f"{self.path}: cannot write the journal: {e.strerror or e}") from e
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


@dataclass
class Journal:
    path: str
    meta: dict
    entries: list[Entry]
    buf: mmap.mmap | None

    def indices(self, e: Entry) -> np.ndarray:
        return np.frombuffer(self.buf, dtype="<u8", count=e.count, offset=e.index_at)

    def data(self, e: Entry) -> np.ndarray:
        return np.frombuffer(self.buf, dtype=np.uint8, count=e.unit * e.count, offset=e.data_at)

    def close(self) -> None:
        if self.buf is not None:
            try:
                self.buf.close()
            except BufferError:
                pass


def read_journal(path: str) -> Journal:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot read the journal: {e.strerror or e}") from e
    data = buf if buf is not None else b""
    if size < PREAMBLE.size + TRAILER:
        raise TornJournal(f"{path}: journal is torn ({size} bytes)")
    magic, major, _minor, _flags, hlen = PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise TornJournal(f"{path}: not an nnpatch journal (bad magic)")
    if major != VERSION[0]:
        raise IntegrityError(f"{path}: journal version {major} is not supported by this nnpatch")
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update(memoryview(data)[: size - TRAILER])
    if h.digest() != bytes(data[size - TRAILER :]):
        raise TornJournal(f"{path}: journal is torn or damaged (trailer hash mismatch)")
    try:
        meta = json.loads(bytes(data[PREAMBLE.size : PREAMBLE.size + hlen]).decode())
        entries = [Entry(**e) for e in meta.pop("entries")]
    except (ValueError, TypeError, KeyError) as e:
        raise TornJournal(f"{path}: journal header is invalid: {e}") from e
    for e in entries:
        if e.index_at + 8 * e.count > size or e.data_at + e.unit * e.count > size - TRAILER:
            raise TornJournal(f"{path}: journal entry {e.name!r} runs past the end")
    return Journal(path, meta, entries, buf)
