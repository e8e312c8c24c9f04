"""The undo journal of an in-place apply (spec/JOURNAL.md is normative).

    Magic (8) | Version_Major (u16) | Version_Minor (u16) | Flags (u32)
    | Header_Length (u64) | Header (UTF-8 JSON, space-padded to 64)
    | per entry: indices (u64 LE x count), old bytes (unit x count), each 64-aligned, zero-padded
    | Trailer_Hash (32, BLAKE3 of all before)

The journal is written to ``MODEL.nnpatch-journal.tmp``, fsynced, renamed to
``MODEL.nnpatch-journal`` and the directory fsynced, all before the first
byte of the model is written; so a journal under the final name is complete
unless storage corrupted it, which the trailer hash detects. Anyone who can write
beside the model can also plant one with a valid trailer, so the reader checks
everything else too (spec/JOURNAL.md, "Trust") before recover writes a byte.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass

import blake3
import numpy as np

from .._json import WHOLE, LazyArray, Pieces, json_shape, loads_strict, utf8_error
from ..atomic import fsync_dir, write_error
from ..errors import IntegrityError, InvalidJournal, NnpatchIOError, TornJournal, UsageError, WeightsError
from ..hashing import digests_equal
from ..sidefile import JOURNAL_SUFFIX, journal_path, open_beside
from ..weights import parse_safetensors_header
from ..weights.extents import decode_table
from ..weights.safetensors_file import MAX_HEADER_SIZE as MAX_ST_HEADER

MAGIC = b"\x89NNJ\r\n\x1a\n"
VERSION = (1, 0)
#: A journal of an extents model (GGUF) is 1.1: a 1.0 reader refuses its ``model`` and keeps it.
EXTENTS_MINOR = 1
#: The extent table rides in the header as hex, a JSON string of at most 1 MiB (Trust step 2).
MAX_TABLE = 1 << 19
PREAMBLE = struct.Struct("<8sHHIQ")
ALIGN = 64
TRAILER = 32
SUFFIX = JOURNAL_SUFFIX  # the name rule lives in nnpatch.sidefile, for commands that must not load numpy


def _pad(n: int) -> int:
    return -n % ALIGN


@dataclass(slots=True)  # a journal of a large model has an entry per changed tensor
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

    def __init__(self, path: str, meta: dict, entries: list[Entry], minor: int = VERSION[1]) -> None:
        self.path = path
        self.tmp = path + ".tmp"
        self.entries = entries
        header = encode_header(meta, entries)
        if len(header) > MAX_HEADER_LEN:  # a reader would refuse it: never make a journal that cannot roll back
            raise UsageError(f"{path}: the update touches too many tensors to journal ({len(header)}-byte journal "
                             f"header, limit {MAX_HEADER_LEN}); write the result with -o instead of --in-place")
        self.h = blake3.blake3()
        #: about the size the journal will have: the old bytes of every entry, plus the header
        self.expected = PREAMBLE.size + len(header) + sum(e.count * e.unit for e in entries) + 64 * len(entries) + 32
        # whatever another user planted under the temporary name is discarded, never written through
        fd = open_beside(self.tmp, write=True, create=True, what="journal's temporary file")
        try:
            os.ftruncate(fd, 0)
            self.f = os.fdopen(fd, "wb")
        except OSError as e:
            os.close(fd)
            raise NnpatchIOError(f"{self.tmp}: cannot write the journal: {e.strerror or e}") from e
        self.pos = 0
        self._write(PREAMBLE.pack(MAGIC, VERSION[0], minor, 0, len(header)) + header)
        self.bytes = 0

    def _write(self, data) -> None:
        mv = memoryview(data).cast("B")
        try:
            self.f.write(mv)
        except OSError as e:
            raise self._error(e) from e
        self.h.update(mv)
        self.pos += len(mv)

    def _error(self, e: OSError) -> NnpatchIOError:
        if isinstance(e, NnpatchIOError) or e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return NnpatchIOError(f"{self.path}: cannot write the journal: {e.strerror or e}")
        return write_error(self.path, e, what="the undo journal (the old bytes of every row the update changes)",
                           needed=self.expected)

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
            if isinstance(e, NnpatchIOError):
                raise
            raise self._error(e) from e
        try:  # the commit point of the journal: the model is written only once its entry is durable
            fsync_dir(os.path.dirname(os.path.abspath(self.path)), strict=True)
        except OSError as e:
            with contextlib.suppress(OSError):  # not durable: as if never committed (the model is untouched)
                os.unlink(self.path)
            raise NnpatchIOError(f"{self.path}: cannot make the journal durable (fsync of its folder: "
                                 f"{e.strerror or e}); the model was not written") from e

    def abort(self) -> None:
        try:
            with contextlib.suppress(OSError):  # buffered bytes a full disk refuses again
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
    extents: list | None = None  # an extents model's table (1.1), else None

    def indices(self, e: Entry) -> np.ndarray:
        return np.frombuffer(self.buf, dtype="<u8", count=e.count, offset=e.index_at)

    def data(self, e: Entry) -> np.ndarray:
        return np.frombuffer(self.buf, dtype=np.uint8, count=e.unit * e.count, offset=e.data_at)

    def check_model(self, model: str, fd: int, size: int) -> None:
        """Trust steps 3 and 4 of spec/JOURNAL.md: the journal names this model (open as ``fd``, ``size``
        bytes), and every entry lies on one tensor of it: for a safetensors model one its header names, for
        an extents model one extent of the journal's table, whose skeleton is the model's.

        Raises IntegrityError (another file) or InvalidJournal; never writes."""
        if "extents" in self.meta["model"]:
            tensors = self._extents_model(model, fd, size)
        else:
            tensors = self._safetensors_model(model, model_header(fd, size), size)
        for e in self.entries:
            where = f"{self.path}: entry {e.name!r}"
            t = tensors.get(e.name)
            if t is None:
                raise InvalidJournal(f"{where}: the model has no such tensor")
            begin, nbytes, units = t
            if (e.offset, e.nbytes) != (begin, nbytes):
                raise InvalidJournal(f"{where}: bytes {e.offset}..{e.offset + e.nbytes} are not the tensor's "
                                     f"{begin}..{begin + nbytes}")
            if e.unit not in units or (e.unit and nbytes % e.unit):
                raise InvalidJournal(f"{where}: unit {e.unit} is not a row, an element or the whole of the "
                                     f"tensor (one of {sorted(units)})")
            if e.count:
                _check_indices(self.indices(e), e.nbytes // e.unit, where)

    def _safetensors_model(self, model: str, head: bytes, size: int) -> dict:
        """name -> (begin, nbytes, units) of the safetensors model whose real header is ``head``."""
        ident = self.meta["model"]
        if ident["size"] != size or ident["header_len"] != len(head) or not digests_equal(
                blake3.blake3(head).hexdigest(), ident["header_blake3"]):
            raise IntegrityError(f"{model}: the undo journal {self.path} belongs to another file (it names a file "
                                 f"of {ident['size']} bytes with a {ident['header_len']}-byte safetensors header; "
                                 f"this one is {size} bytes with a {len(head)}-byte header, or its header differs); "
                                 "not touching either")
        try:
            _, tensors = parse_safetensors_header(head, file_size=size, path=model)
        except WeightsError as e:
            raise InvalidJournal(f"{self.path}: the model it names is not a valid safetensors file ({e})") from e
        # a row (op rows), an element (op elements) or the whole tensor: what _entries in inplace.py writes
        return {n: (t.begin, t.nbytes, {t.nbytes, t.itemsize} | ({t.nbytes // t.shape[0]} if t.shape and t.shape[0]
                                                                 else set())) for n, t in tensors.items()}

    def _extents_model(self, model: str, fd: int, size: int) -> dict:
        """name -> (begin, nbytes, units) of the journal's extent table, once the model's size and skeleton
        (every byte outside those extents) are the ones it names. A unit is a row, the extent, or an item of
        1, 2, 4 or 8 bytes that divides a row: the table carries a format's type name, not a dtype."""
        ident = self.meta["model"]
        same = ident["size"] == size
        if same:
            h = blake3.blake3()
            pos = 0
            for x in self.extents:
                _hash_range(h, fd, pos, x.offset)
                pos = x.end
            _hash_range(h, fd, pos, size)
            same = digests_equal(h.hexdigest(), ident["skeleton_blake3"])
        if not same:
            raise IntegrityError(f"{model}: the undo journal {self.path} belongs to another file (it names a file "
                                 f"of {ident['size']} bytes and the skeleton of its extent table; this one is "
                                 f"{size} bytes, or its bytes outside those extents differ); not touching either")
        return {x.name: (x.offset, x.size, {x.size, x.row_bytes} | {k for k in (1, 2, 4, 8) if x.row_bytes % k == 0})
                for x in self.extents}

    def close(self) -> None:
        if self.buf is not None:
            try:
                self.buf.close()
            except BufferError:
                pass


def model_header(fd: int, size: int) -> bytes:
    """The model's real safetensors header (8 + the u64 at offset 0 bytes), what the journal must name;
    b"" or a short read when the file cannot hold one, which then matches no journal."""
    first = os.pread(fd, 8, 0)
    if len(first) < 8:
        return first
    (n,) = struct.unpack("<Q", first)
    if n > min(MAX_ST_HEADER, size - 8):
        return first
    return first + os.pread(fd, n, 8)


def _hash_range(h, fd: int, lo: int, hi: int) -> None:
    while lo < hi:
        chunk = os.pread(fd, min(hi - lo, 1 << 20), lo)
        if not chunk:
            raise NnpatchIOError(f"cannot read bytes {lo}..{hi} of the model: it ends early")
        h.update(chunk)
        lo += len(chunk)


def _check_indices(idx: np.ndarray, bound: int, where: str) -> None:
    # in slices, so that a journal with millions of units costs a few MB of temporaries, not GBs
    step = 1 << 20
    prev = None
    for lo in range(0, len(idx), step):
        part = idx[lo : lo + step]
        if prev is not None and not part[0] > prev:
            raise InvalidJournal(f"{where}: unit indices are not strictly increasing")
        if int(part.max()) >= bound:
            raise InvalidJournal(f"{where}: a unit index is >= {bound}, the tensor's number of units")
        if len(part) > 1 and not bool(np.all(part[1:] > part[:-1])):
            raise InvalidJournal(f"{where}: unit indices are not strictly increasing")
        prev = part[-1]


# --- trust (spec/JOURNAL.md, "Trust") ------------------------------------------------------------------

MAX_HEADER_LEN = 64 << 20  # like a patch header (FORMAT.md): the writer refuses to write more
MAX_JSON_DEPTH = 8  # a valid header nests 3 deep
MAX_NAMES_BYTES = 1 << 24  # entry names together, as a patch's op names (FORMAT.md section 12)
MAX_INT = (1 << 63) - 1
_HEX = re.compile(r"[0-9a-f]{64}")
_TOP_KEYS = ("created_by", "model", "base", "target", "patch", "entries")
_MODEL_KEYS = {"size", "header_len", "header_blake3"}
_EXTENTS_MODEL_KEYS = {"size", "extents", "skeleton_blake3"}  # 1.1: an extents model (GGUF)
_HEX_BYTES = re.compile(r"(?:[0-9a-f]{2})+")
_REF_KEYS = {"blake3", "model_blake3"}
_ENTRY_KEYS = {"name", "offset", "nbytes", "unit", "count", "base_blake3", "target_blake3", "index_at", "data_at"}


def max_journal_size(model_size: int) -> int:
    """No journal the writer makes for a model of ``model_size`` bytes is larger: old bytes <= the model,
    indices <= 8 bytes per byte (one-byte elements), and the header and padding within 2 x MAX_HEADER_LEN."""
    return 10 * model_size + 4 * MAX_HEADER_LEN


def _int(obj: dict, key: str, where: str) -> int:
    v = obj[key]
    if type(v) is not int or not 0 <= v <= MAX_INT:  # type(): neither bool nor float passes
        raise InvalidJournal(f"{where}: {key} must be an integer in 0..2^63-1, not {v!r:.40}")
    return v


def _hex(obj: dict, key: str, where: str) -> str:
    v = obj[key]
    if type(v) is not str or not _HEX.fullmatch(v):
        raise InvalidJournal(f"{where}: {key} must be a 64-digit lowercase hex digest, not {v!r:.80}")
    return v


def _object(v, keys: set[str], where: str) -> dict:
    if type(v) is not dict:
        raise InvalidJournal(f"{where}: must be a JSON object")
    if set(v) != keys:
        missing, extra = sorted(keys - set(v)), sorted(set(v) - keys)
        raise InvalidJournal(f"{where}: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {extra!r:.200}"] if extra else [])))
    return v


def _load_meta(path: str, text: bytes):
    """The header's JSON under loads_strict's rules. One longer than WHOLE (a journal of a model with
    many tensors, or a planted one) is checked whole a piece at a time, then built with only the keys
    _parse_header reads, ``entries`` one at a time (a LazyArray): a header of 64 MiB costs its own
    bytes and its entries, never a Python object for each of its values."""
    if len(text) <= WHOLE:
        text = bytes(text)
    try:
        if len(text) <= WHOLE:
            depth = json_shape(text)[0]
        else:
            bad = utf8_error(text)
            if bad is not None:
                raise ValueError(str(bad))
            doc = Pieces(text)
            depth = doc.depth
    except ValueError as e:
        raise InvalidJournal(f"{path}: journal header is not valid JSON: {e}") from e
    if depth > MAX_JSON_DEPTH:
        raise InvalidJournal(f"{path}: journal header nests deeper than {MAX_JSON_DEPTH}")
    try:
        if len(text) <= WHOLE:
            return loads_strict(text)
        doc.check()
        lo, hi = doc.top()
        if text[lo] != 123:
            return []  # not an object: refused as such
        meta = {}
        for key, v, _ in doc.members(lo, hi, keep=frozenset(_TOP_KEYS), checked=True):
            if key in _TOP_KEYS:
                if not isinstance(v, tuple):
                    meta[key] = v
                elif key == "entries":
                    meta[key] = doc.lazy(*v, keep=_ENTRY_KEYS)
                else:
                    meta[key] = doc.value(*v, keep=_MODEL_KEYS | _EXTENTS_MODEL_KEYS | _REF_KEYS, checked=True)
        return meta
    except ValueError as e:
        raise InvalidJournal(f"{path}: journal header is not valid JSON: {e}") from e


def _parse_header(path: str, text: bytes) -> tuple[dict, list[Entry], list | None]:
    """Steps 2 of Trust: strict JSON, every field typed and range-checked. Unknown top-level keys are
    allowed (a later minor version may add some) and ignored; ``model`` and entries, which direct the
    writes, must have exactly their keys."""
    meta = _load_meta(path, text)
    if type(meta) is not dict:
        raise InvalidJournal(f"{path}: journal header is not a JSON object")
    missing = [k for k in _TOP_KEYS if k not in meta]
    if missing:
        raise InvalidJournal(f"{path}: journal header lacks {', '.join(missing)}")
    if type(meta["created_by"]) is not str:
        raise InvalidJournal(f"{path}: created_by must be a string")
    extents = None
    if type(meta["model"]) is dict and "extents" in meta["model"]:
        extents = _extents_identity(path, meta)
    else:
        model = _object(meta["model"], _MODEL_KEYS, f"{path}: model")
        _int(model, "size", f"{path}: model")
        _int(model, "header_len", f"{path}: model")
        _hex(model, "header_blake3", f"{path}: model")
    for side in ("base", "target"):
        _hex(_object(meta[side], _REF_KEYS, f"{path}: {side}"), "blake3", f"{path}: {side}")
        _hex(meta[side], "model_blake3", f"{path}: {side}")
    _hex(meta, "patch", path)
    raw = meta.pop("entries")
    if type(raw) not in (list, LazyArray):
        raise InvalidJournal(f"{path}: entries must be a JSON array")
    entries, names, name_bytes = [], set(), 0
    for i, o in enumerate(raw):
        where = f"{path}: entry {i}"
        o = _object(o, _ENTRY_KEYS, where)
        if type(o["name"]) is not str:
            raise InvalidJournal(f"{where}: name must be a string")
        where = f"{path}: entry {o['name']!r:.300}"
        if o["name"] in names:
            raise InvalidJournal(f"{where}: a second entry for the same tensor")
        names.add(o["name"])
        name_bytes += len(o["name"].encode("utf-8", "surrogatepass"))
        if name_bytes > MAX_NAMES_BYTES:  # every name is kept: this bounds what that costs (JOURNAL.md Trust 2)
            raise InvalidJournal(f"{where}: the entries' names total more than {MAX_NAMES_BYTES} bytes of UTF-8")
        e = Entry(o["name"], *(_int(o, k, where) for k in ("offset", "nbytes", "unit", "count")),
                  _hex(o, "base_blake3", where), _hex(o, "target_blake3", where),
                  _int(o, "index_at", where), _int(o, "data_at", where))
        if e.count and (not e.unit or e.count * e.unit > e.nbytes):
            raise InvalidJournal(f"{where}: count {e.count} x unit {e.unit} bytes does not fit in nbytes {e.nbytes}")
        entries.append(e)
    return meta, entries, extents


def _extents_identity(path: str, meta: dict) -> list:
    """An extents model's ``model`` (1.1): its size, the BLAKE3 of its skeleton and its extent table (spec
    FORMAT.md 5.8, as lowercase hex), the table checked by every rule of 5.8 and naming a file of that size."""
    where = f"{path}: model"
    model = _object(meta["model"], _EXTENTS_MODEL_KEYS, where)
    size = _int(model, "size", where)
    _hex(model, "skeleton_blake3", where)
    text = model["extents"]
    if type(text) is not str or not _HEX_BYTES.fullmatch(text):
        raise InvalidJournal(f"{where}: extents must be the extent table as lowercase hex, not {text!r:.80}")
    try:
        file_size, extents = decode_table(bytes.fromhex(text))
    except ValueError as e:
        raise InvalidJournal(f"{where}: extents: {e}") from None
    if file_size != size:
        raise InvalidJournal(f"{where}: the extent table describes a {file_size}-byte file, the model is {size}")
    return extents


def _check_layout(path: str, entries: list[Entry], header_len: int, size: int) -> None:
    """Step 2 of Trust, continued: the entry data lies exactly where the writer puts it (_layout), and
    ends at the trailer, so every index and old byte read is inside the file and in no other entry."""
    pos = PREAMBLE.size + header_len
    for e in entries:
        if e.index_at != pos:
            raise InvalidJournal(f"{path}: entry {e.name!r:.300}: index_at is {e.index_at}, its indices are at {pos}")
        pos += 8 * e.count
        pos += _pad(pos)
        if e.data_at != pos:
            raise InvalidJournal(f"{path}: entry {e.name!r:.300}: data_at is {e.data_at}, its old bytes are at {pos}")
        pos += e.unit * e.count
        pos += _pad(pos)
        if pos > size - TRAILER:
            raise InvalidJournal(f"{path}: entry {e.name!r:.300} runs past the end of the journal")
    if pos != size - TRAILER:
        raise InvalidJournal(f"{path}: {size - TRAILER - pos} bytes between the last entry and the trailer")


def read_journal(path: str, *, model_size: int | None = None) -> Journal:
    """A committed journal, checked by steps 1 and 2 of Trust (spec/JOURNAL.md) and nothing else:
    ``Journal.check_model`` does the steps that need the model.

    TornJournal: bad magic or trailer (discard it); IntegrityError: an unknown major version;
    InvalidJournal: anything else; NnpatchIOError: unreadable."""
    # a symlink is not followed, a FIFO not waited on, a hard link or another user's file not trusted:
    # each is refused and kept (sidefile)
    fd = open_beside(path, write=False, create=False, refuse=InvalidJournal, what="journal")
    if fd is None:
        raise NnpatchIOError(f"{path}: cannot read the journal: it does not exist")
    try:
        st = os.fstat(fd)
        size = st.st_size
        if model_size is not None and size > max_journal_size(model_size):
            raise InvalidJournal(f"{path}: the journal is {size} bytes, more than any journal of a "
                                 f"{model_size}-byte model ({max_journal_size(model_size)})")
        buf = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot read the journal: {e.strerror or e}") from e
    finally:
        os.close(fd)
    try:
        return _read(path, buf, size)
    except BaseException:
        if buf is not None:
            try:
                buf.close()
            except BufferError:  # the error's traceback still holds a view of the header: unmapped when it goes
                pass
        raise


def _read(path: str, buf: mmap.mmap | None, size: int) -> Journal:
    data = buf if buf is not None else b""
    if size < PREAMBLE.size + TRAILER:
        raise TornJournal(f"{path}: journal is torn ({size} bytes)")
    magic, major, _minor, flags, hlen = PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise TornJournal(f"{path}: not an nnpatch journal (bad magic)")
    if major != VERSION[0]:
        raise IntegrityError(f"{path}: journal version {major} is not supported by this nnpatch; the journal "
                             "is kept and the model was not written")
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update(memoryview(data)[: size - TRAILER])
    if h.digest() != bytes(data[size - TRAILER :]):
        raise TornJournal(f"{path}: journal is torn or damaged (trailer hash mismatch)")
    # committed and whole from here on: whatever is wrong now was written so, and is refused, not discarded
    if flags:
        raise InvalidJournal(f"{path}: unknown journal flags {flags:#x}")
    if hlen > MAX_HEADER_LEN:
        raise InvalidJournal(f"{path}: journal header of {hlen} bytes exceeds the {MAX_HEADER_LEN} limit")
    if PREAMBLE.size + hlen > size - TRAILER or (PREAMBLE.size + hlen) % ALIGN:
        raise InvalidJournal(f"{path}: journal header length {hlen} does not fit the journal or is not padded "
                             f"to {ALIGN}")
    # a view of the mapped journal, not a copy: a 64 MiB header is read where it lies
    meta, entries, extents = _parse_header(path, memoryview(data)[PREAMBLE.size : PREAMBLE.size + hlen])
    _check_layout(path, entries, hlen, size)
    return Journal(path, meta, entries, buf, extents)
