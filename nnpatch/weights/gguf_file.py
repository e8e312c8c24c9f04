"""GGUF files (llama.cpp's model format) as a :class:`~nnpatch.weights.model.Model`.

A GGUF file is a header (magic ``GGUF``, version, tensor and KV counts), the
KV metadata, the tensor table (name, dims ``ne``, GGML type, offset), padding
to ``general.alignment``, then the tensor data. nnpatch patches it as an
``extents`` target (:mod:`.extents`): the tensors are its ops' tensors, every
other byte (header, KV in their order, table, padding) is the skeleton, so
the file is rebuilt byte for byte whatever its alignment or padding.

Tensors as nnpatch sees them: a plain type (F32, F16, BF16, F64, I8-I64) keeps
its dtype, with the shape numpy gives it (``ne`` reversed, so dimension 0 is
the outermost and a row one output channel); a block-quantized type (Q4_0,
the K-quants, IQ types...) is ``U8`` of shape ``[rows, row_bytes]`` with
``rows = ne1 × ne2 × ...`` and ``row_bytes = ne0 / block_size × type_size``:
one output channel's blocks, which the ``rows`` op sends whole.

The structure is parsed here, strictly and bounded by the file's size, so a
crafted file is refused with one line before anything is read from its
tensors; the ``gguf`` package (gguf-py, the llama.cpp project's own) gives
the type table (block and type sizes, names), and its reader serves the tests
as the second opinion.
"""

from __future__ import annotations

import struct

from ..errors import WeightsError
from .extents import Extent
from .model import MappedExtentsModel

MAGIC = b"GGUF"
#: GGML_MAX_DIMS: llama.cpp refuses tensors of more dimensions.
MAX_DIMS = 4
#: KV arrays may nest; llama.cpp writes one level, nnpatch reads a few.
MAX_NESTING = 8
#: A metadata value shown by ``show``/``textconv`` is cut to this many characters.
SHOWN = 200

#: GGML types that are plain arrays of one safetensors dtype.
PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
         "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}

# KV value types (GGUFValueType): fixed sizes, 8 = string, 9 = array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _gguf():
    try:
        import gguf
    except ImportError:
        raise WeightsError("reading GGUF needs the gguf package: pip install 'nnpatch[gguf]'") from None
    return gguf


def type_table() -> dict[int, tuple[str, int, int]]:
    """GGML type id -> (name, block size, type size), from gguf-py."""
    gguf = _gguf()
    out = {}
    for t in gguf.GGMLQuantizationType:
        sizes = gguf.GGML_QUANT_SIZES.get(t)
        if sizes:
            out[int(t)] = (t.name, sizes[0], sizes[1])
    return out


class _Cursor:
    """Reads the structure of a mapped file, every read checked against its end."""

    def __init__(self, buf, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, why: str):
        raise WeightsError(f"not a valid GGUF file: {why}", path=self.path)

    def take(self, n: int, what: str):
        if n > len(self.buf) - self.pos:
            self.fail(f"{what} at byte {self.pos} runs past the end of the file")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> bytes:
        n = self.unpack("<Q", f"{what} length")
        return bytes(self.take(n, what))

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            self.fail(f"{what} has the unknown value type {vtype}")
        if depth >= MAX_NESTING:
            self.fail(f"{what} nests arrays deeper than {MAX_NESTING}")
        itype = self.unpack("<I", what)
        n = self.unpack("<Q", what)
        # every item takes at least one byte (a string eight): a count the file cannot hold is refused here
        least = 8 if itype in (_STRING, _ARRAY) else struct.calcsize(_SCALAR.get(itype, "<B"))
        if n > (len(self.buf) - self.pos) // least:
            self.fail(f"{what} claims {n} items, more than the rest of the file holds")
        if itype in _SCALAR and itype != 7:
            size = struct.calcsize(_SCALAR[itype])
            self.take(n * size, what)
            return f"[{n} × {_TYPE_NAMES.get(itype)}]"
        if itype == _STRING and n > 8:  # a vocabulary: 100k strings skipped without a call each
            self._skip_strings(n, what)
            return f"[{n} × string]"
        items = [self.value(itype, f"{what}[{i}]", depth + 1) for i in range(n)]
        return f"[{n} × {_TYPE_NAMES.get(itype)}]" if n > 8 else items


    def _skip_strings(self, n: int, what: str) -> None:
        """``n`` strings passed over, each checked as ``string`` checks it (same messages)."""
        buf, pos, end, u64 = self.buf, self.pos, len(self.buf), _U64.unpack_from
        for i in range(n):
            if end - pos < 8:
                self.pos = pos
                self.fail(f"{what}[{i}] length at byte {pos} runs past the end of the file")
            (k,) = u64(buf, pos)
            pos += 8
            if k > end - pos:
                self.pos = pos
                self.fail(f"{what}[{i}] at byte {pos} runs past the end of the file")
            pos += k
        self.pos = pos


_U64 = struct.Struct("<Q")
_TYPE_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 8: "string",
               9: "array", 10: "u64", 11: "i64", 12: "f64"}


def _shown(v) -> str:
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    elif isinstance(v, list):
        v = "[" + ", ".join(_shown(x) for x in v) + "]"
    s = str(v)
    return s if len(s) <= SHOWN else s[:SHOWN] + "…"


def parse(buf, path: str) -> tuple[int, dict[str, str], list[tuple[Extent, str, tuple[int, ...]]]]:
    """(version, metadata shown as text, [(extent, dtype, shape)] in table order) of the GGUF bytes ``buf``."""
    types = type_table()
    c = _Cursor(buf, path)
    if bytes(c.take(4, "magic")) != MAGIC:
        c.fail("no GGUF magic")
    version = c.unpack("<I", "version")
    if version not in (2, 3):
        c.fail(f"version {version} (nnpatch reads GGUF 2 and 3)")
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "KV count")
    # a KV takes at least 8 + 1 + 4 + 1 bytes and a tensor entry 8 + 1 + 4 + 8 + 4 + 8: absurd counts stop here
    if n_kv > len(buf) // 14 or n_tensors > len(buf) // 33:
        c.fail(f"{n_tensors} tensors and {n_kv} KV pairs cannot fit in {len(buf)} bytes")
    metadata: dict[str, str] = {}
    alignment = 32
    for i in range(n_kv):
        key = c.string(f"KV {i} key")
        vtype = c.unpack("<I", f"KV {i} type")
        value = c.value(vtype, f"KV {key!r}")
        k = key.decode("utf-8", "replace")
        if k in metadata:
            c.fail(f"the key {k!r} appears twice")
        if k == "general.alignment":
            if vtype != 4 or value == 0 or value & (value - 1):
                c.fail("general.alignment must be a u32 power of two")
            alignment = value
        metadata[k] = _shown(value)
    entries = []
    for i in range(n_tensors):
        raw_name = c.string(f"tensor {i} name")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            c.fail(f"tensor {i}'s name is not UTF-8")
        if not 1 <= len(raw_name) <= 65536:
            c.fail(f"tensor {i}'s name must be 1 to 65,536 bytes")
        n_dims = c.unpack("<I", f"tensor {name!r} dims")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        ne = [c.unpack("<Q", f"tensor {name!r} dims") for _ in range(n_dims)]
        gtype = c.unpack("<I", f"tensor {name!r} type")
        offset = c.unpack("<Q", f"tensor {name!r} offset")
        entries.append((name, ne, gtype, offset))
    data_start = -(-c.pos // alignment) * alignment
    if data_start > len(buf):
        c.fail("the tensor data would start past the end of the file")
    out = []
    seen = set()
    for name, ne, gtype, offset in entries:
        if name in seen:
            c.fail(f"the tensor {name!r} appears twice")
        seen.add(name)
        if gtype not in types:
            c.fail(f"tensor {name!r} has the unknown GGML type {gtype}")
        tname, block, tsize = types[gtype]
        if any(d >= 1 << 62 for d in ne) or ne[0] % block:
            c.fail(f"tensor {name!r}: dims {ne} do not fit {tname} blocks of {block}")
        rows = 1
        for d in ne[1:]:
            rows *= d
        row_bytes = ne[0] // block * tsize
        size = rows * row_bytes
        if rows >= 1 << 62 or size >= 1 << 62:
            c.fail(f"tensor {name!r} is too large")
        if offset % alignment:
            c.fail(f"tensor {name!r}'s offset {offset} is not a multiple of the alignment {alignment}")
        begin = data_start + offset
        if begin > len(buf) or size > len(buf) - begin:
            c.fail(f"tensor {name!r} ({size} bytes at {begin}) runs past the end of the file")
        if tname in PLAIN:
            dtype, shape = PLAIN[tname], tuple(reversed(ne))
        else:
            dtype, shape = "U8", (rows, row_bytes)
        # a row is what the rows op sends: a slice along the shape's dimension 0
        out.append((Extent(name, begin, size, size // shape[0] if shape[0] else 0, tname), dtype, shape))
    ordered = sorted(out, key=lambda e: e[0].offset)
    for prev, cur in zip(ordered, ordered[1:]):
        if cur[0].offset < prev[0].end:
            c.fail(f"tensors {prev[0].name!r} and {cur[0].name!r} overlap")
    return version, metadata, out


def _parse_for_model(buf, path: str):
    version, metadata, entries = parse(buf, path)
    return {"gguf.version": str(version), **metadata}, entries


class GgufModel(MappedExtentsModel):
    """A GGUF file's tensors, zero-copy over a read-only map, and its extents for the patch."""

    def __init__(self, path: str) -> None:
        super().__init__("gguf", path, _parse_for_model)
        self.version = int(self.metadata["gguf.version"])
