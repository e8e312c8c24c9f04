"""safetensors files as raw, memory-mapped bytes.

nnpatch needs what the safetensors package does not expose: each tensor's
exact byte range (to copy, hash and scatter without conversion), and every
dtype including bf16 and fp8, which numpy cannot represent. So the header is
parsed here, strictly, by the rules of the safetensors format: an 8-byte
little-endian header length, a JSON object, tensors that cover the data
buffer exactly with no holes or overlaps. The safetensors package itself is
used by tests as the reference reader and writer.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from .. import dtypes
from ..errors import NnpatchIOError, WeightsError
from .._json import EVERY_KEY, MAX_JSON_STRING, WHOLE, Pieces, json_shape, loads_strict
from ..atomic import atomic_write
from ..hashing import name_key
from .model import Model, ModelFile, ModelTensor, read_only

#: The safetensors reference implementation refuses headers above 100 MB.
MAX_HEADER_SIZE = 100_000_000
#: Most dimensions a tensor may have here (the patch format's limit too): a
#: hostile header of rank 200,000 must not cost time that grows with its rank.
MAX_RANK = 64
METADATA_KEY = "__metadata__"
#: Nesting and values of a safetensors header nnpatch parses, as native/src/safetensors.c counts them
#: (spec/FORMAT.md section 12): a header needs 3 levels and about 7 values a tensor.
MAX_JSON_DEPTH = 64
MAX_JSON_VALUES = 1 << 22
#: Bytes of a header's tensor names together (FORMAT.md section 12; a reader keeps every name).
MAX_NAMES_BYTES = 1 << 24
#: A header longer than 1 MiB keeps ``__metadata__`` whose JSON is at most this long.
MAX_METADATA_JSON = 1 << 20
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True, slots=True)  # a layout may describe 262,144 tensors and more
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return dtypes.ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)



def parse_safetensors_header(raw: bytes, *, file_size: int | None = None, path: str = "<bytes>"):
    """Parse and validate a header (the 8 length bytes plus the JSON).

    Returns ``(metadata, tensors)`` where tensors maps name -> TensorInfo in
    file order. ``file_size``, when given, must equal header plus data exactly.
    """
    if len(raw) < 8:
        raise WeightsError(f"not a safetensors file: {len(raw)} bytes, need at least 8", path=path)
    (n,) = struct.unpack_from("<Q", raw, 0)
    if n > MAX_HEADER_SIZE:
        raise WeightsError(f"safetensors header of {n} bytes exceeds the {MAX_HEADER_SIZE} limit", path=path)
    if len(raw) < 8 + n:
        raise WeightsError(f"safetensors header truncated: declares {n} bytes, {len(raw) - 8} present", path=path)
    view = memoryview(raw)[8 : 8 + n]
    if bytes(view[:1]) != b"{":
        raise WeightsError("not a safetensors file: header does not start with '{'", path=path)
    try:
        # strings, nesting and values in one pass before any copy of a header that may be 100 MB
        doc = Pieces(view) if n > WHOLE else None
        depth, values = (doc.depth, doc.values) if doc is not None else json_shape(view, max_string=MAX_JSON_STRING)
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nesting deeper than {MAX_JSON_DEPTH} levels")
        if values > MAX_JSON_VALUES:
            raise ValueError(f"more than {MAX_JSON_VALUES} values")
        if doc is not None:
            doc.check()
            members = doc.members(*doc.top(), keep=EVERY_KEY, checked=True) if view[0] == 123 else None
        else:
            header = loads_strict(bytes(view), max_string=None)
            members = ((k, v, 0) for k, v in header.items()) if isinstance(header, dict) else None
    except ValueError as e:
        raise WeightsError(f"invalid safetensors header: {e}", path=path) from e
    if members is None:
        raise WeightsError("invalid safetensors header: not a JSON object", path=path)
    data_start = 8 + n
    infos, metadata, bad_metadata, names, first_error = [], None, False, 0, None
    for name, entry, size in members:
        if name == METADATA_KEY:
            metadata, bad_metadata = _metadata(doc, entry, size)
            continue
        names += len(name.encode("utf-8", "surrogatepass"))
        if first_error is None:
            if isinstance(entry, tuple):  # a long entry: the keys it needs, the rest read and dropped
                entry = doc.value(*entry, keep=_ENTRY_KEYS, checked=True)
            try:
                infos.append(_tensor_info(name, entry, data_start, path))
            except WeightsError as e:
                first_error, infos = e, []  # raised after the rules on the whole header, as a short one is
    if bad_metadata:
        raise WeightsError("invalid safetensors header: __metadata__ must map strings to strings", path=path)
    if names > MAX_NAMES_BYTES:
        raise WeightsError(f"invalid safetensors header: the tensor names total more than {MAX_NAMES_BYTES} bytes "
                           "of UTF-8", path=path)
    if first_error is not None:
        raise first_error
    infos.sort(key=lambda t: (t.begin, t.end))
    cursor = data_start
    for info in infos:
        if info.begin != cursor:
            what = "overlaps the previous tensor" if info.begin < cursor else "leaves a hole before it"
            raise WeightsError(f"data offsets are not contiguous: tensor {info.name!r} {what}", path=path)
        cursor = info.end
    if file_size is not None and cursor != file_size:
        raise WeightsError(
            f"file is {file_size} bytes but the header describes {cursor}"
            + (" (truncated)" if file_size < cursor else " (trailing bytes)"),
            path=path,
        )
    return metadata, {t.name: t for t in infos}


def _metadata(doc, value, size: int) -> tuple[dict | None, bool]:
    """(``__metadata__`` as kept, whether it breaks the rule: strings to strings). A long header's
    (``doc``) metadata is kept while its JSON holds at most MAX_METADATA_JSON bytes, else checked
    member by member and dropped (it is informational; a layout in a patch is written as it is)."""
    if not isinstance(value, tuple):
        ok = value is None or (isinstance(value, dict) and all(isinstance(v, str) for v in value.values()))
        return (value if ok else None), not ok
    a, b = doc._strip(*value)
    if doc.raw[a] != 123:
        return None, True
    kept: dict | None = {} if size <= MAX_METADATA_JSON else None
    for _, v, _ in doc.members(a, b, checked=True):
        if not isinstance(v, str):
            return None, True
    if kept is not None:
        kept = {k: v for k, v, _ in doc.members(a, b, checked=True)}
    return kept, False


def _tensor_info(name: str, entry, data_start: int, path: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise WeightsError("entry is not an object", path=path, tensor=name)
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype not in dtypes.ITEMSIZE:
        raise WeightsError(f"unknown dtype {dtype!r}", path=path, tensor=name)
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise WeightsError(f"invalid shape (a list of at most {MAX_RANK} dimensions)", path=path, tensor=name)
    if not all(type(d) is int and 0 <= d < 1 << 62 for d in shape):
        raise WeightsError(f"invalid shape {shape!r}", path=path, tensor=name)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise WeightsError(f"invalid data_offsets {offsets!r}", path=path, tensor=name)
    expected = math.prod(shape) * dtypes.ITEMSIZE[dtype]
    if expected >= 1 << 62:  # also keeps the number printable below
        raise WeightsError(f"shape {shape!r} holds more than 2^62 bytes", path=path, tensor=name)
    if offsets[1] - offsets[0] != expected:
        raise WeightsError(
            f"data_offsets span {offsets[1] - offsets[0]} bytes, dtype and shape need {expected}",
            path=path, tensor=name,
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


class SafetensorsFile:
    """A read-only, memory-mapped safetensors file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise NnpatchIOError(f"{self.path}: cannot open: {e.strerror or e}") from e
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            head = self._file.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= MAX_HEADER_SIZE:
                    head += self._file.read(n)
            self.metadata, self.tensors = parse_safetensors_header(head, file_size=self.size, path=self.path)
            self.header_bytes = head
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        except BaseException:
            self._file.close()
            raise
        self.data_start = len(self.header_bytes)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array backed by the file map."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.begin)

    def bits(self, name: str) -> np.ndarray:
        """The tensor's bit patterns as unsigned words of the dtype's width, shaped."""
        info = self.tensors[name]
        return self.raw(name).view(dtypes.uint_of_width(info.itemsize)).reshape(info.shape)

    def fileno(self) -> int:
        """The open file's descriptor, for ``copy_file_range`` of tensor byte ranges."""
        return self._file.fileno()

    @property
    def buffer(self) -> mmap.mmap | None:
        """The read-only map of the whole file (None for an empty file, which cannot be mapped)."""
        return self._map

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # numpy views still alive; the map is freed with them
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_safetensors(path: str | os.PathLike[str]) -> SafetensorsFile:
    return SafetensorsFile(path)


def encode_safetensors_header(tensors: dict[str, tuple[str, tuple[int, ...], int]],
                              metadata: dict[str, str] | None = None) -> tuple[bytes, list[str]]:
    """Build a header the way the safetensors reference writer does.

    ``tensors`` maps name -> (dtype, shape, nbytes). Tensors are laid out by
    descending dtype rank (see dtypes.WRITE_RANK), then name; the JSON is padded with spaces to a
    multiple of 8. Returns the header bytes and the data order.
    """
    order = sorted(tensors, key=lambda k: (-dtypes.WRITE_RANK[tensors[k][0]], k))
    header: dict = {}
    if metadata is not None:  # the reference writer keeps an empty {} too
        header[METADATA_KEY] = metadata
    offset = 0
    for name in order:
        dtype, shape, nbytes = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def write_safetensors(path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write raw tensors (name -> (dtype, shape, bytes)) atomically."""
    sizes = {k: (d, tuple(s), len(b)) for k, (d, s, b) in tensors.items()}
    for name, (dtype, shape, nbytes) in sizes.items():
        if math.prod(shape) * dtypes.ITEMSIZE[dtype] != nbytes:
            raise WeightsError(f"{nbytes} bytes do not fit dtype {dtype} and shape {list(shape)}", tensor=name)
    head, order = encode_safetensors_header(sizes, metadata)
    with atomic_write(path) as f:
        f.write(head)
        for name in order:
            f.write(tensors[name][2])


class SafetensorsModel(Model):
    def __init__(self, path: str) -> None:
        self._f = SafetensorsFile(path)
        tensors = {
            n: ModelTensor(n, t.dtype, t.shape, t.nbytes, os.path.basename(path), t.begin, t.end)
            for n, t in sorted(self._f.tensors.items(), key=lambda kv: name_key(kv[0]))
        }
        files = [ModelFile(os.path.basename(path), self._f.size, True, tuple(tensors))]
        super().__init__("safetensors", path, tensors, self._f.metadata, files)

    @property
    def safetensors(self) -> SafetensorsFile:
        return self._f

    def raw(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise KeyError(name)
        return read_only(self._f.raw(name))

    def close(self) -> None:
        self._f.close()
