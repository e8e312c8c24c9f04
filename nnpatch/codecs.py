"""Lossless encodings of a patch's sections (spec/FORMAT.md, "Codecs").

A value section's codec is a pipeline of stages, applied by the writer in
this order and undone by the reader in reverse:

1. an optional *delta* stage relating each new value to the old one at the
   same place, on the bit patterns as unsigned little-endian words of the
   dtype's width: ``xor`` (v = new ^ old), ``add`` (v = new - old mod 2^w),
   ``zadd`` (the same difference, zigzag-mapped so that small negative and
   positive differences both have small codes);
2. an optional ``esort`` stage (format 1.2, floats only, after a delta):
   within each chunk, the delta words in stable order of the base value's
   exponent field, which the reader recomputes from the base it holds; the
   size of a fine-tune's change depends on the weight's magnitude, so this
   groups alike words for the entropy coder;
3. an optional ``planes`` stage: byte k of every word stored together, chunk
   by chunk, so a float's sign/exponent bytes (nearly constant after a delta)
   sit next to each other;
4. an optional ``zstd`` stage: one zstd frame with its content size.

Index sections hold the sorted positions of changed rows or elements as
``u32``, ``u64``, ``delta-varint`` or ``bitmap``, optionally followed by
``zstd``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import zstandard

from . import dtypes
from .errors import PatchFormatError, UnsupportedVersionError
from .kernel import sort_keys

DELTA_STAGES = ("xor", "add", "zadd")
VALUE_STAGES = DELTA_STAGES + ("esort", "planes", "zstd")
#: dtype -> (mantissa bits, exponent bits): where ``esort`` finds the exponent field.
EXPONENT_FIELDS: dict[str, tuple[int, int]] = {
    "F64": (52, 11), "F32": (23, 8), "F16": (10, 5), "BF16": (7, 8), "F8_E4M3": (3, 4), "F8_E5M2": (2, 5),
}
INDEX_FORMATS = ("u32", "u64", "delta-varint", "bitmap")

#: Values are transformed in chunks of whole units (rows, or single elements)
#: holding about this many elements, so that both sides work in bounded memory.
CHUNK_ELEMENTS = 1 << 20

DEFAULT_LEVEL = 5  # see benchmarks/RESULTS.md: as small as level 9 on real fine-tunes, ~as fast as 3
MIN_LEVEL, MAX_LEVEL = 1, 22

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: Metadata (the layout, a compressed header) and whole files up to SMALL_FILE_BYTES are
#: compressed at least at this level: they are small next to the weights, so the best ratio
#: costs little time; a bigger file keeps the caller's level (at 19 one large file takes minutes).
SMALL_SECTION_LEVEL = 19
SMALL_FILE_BYTES = 16 << 20


# --- zstd policy: the one place that makes a zstd frame -----------------------------

def zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    """A compressor of the frames the format wants (spec/FORMAT.md, "zstd"): one frame with its
    content size, which readers check before they allocate, and no checksum (the trailer hash
    covers every byte)."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)


def file_level(level: int, size: int) -> int:
    """The level a whole file stored as one section is compressed at (see SMALL_SECTION_LEVEL)."""
    return max(level, SMALL_SECTION_LEVEL) if size <= SMALL_FILE_BYTES else level


def zstd_if_smaller(data: bytes, level: int) -> tuple[list[str], bytes]:
    """``(["zstd"], frame)`` when the frame is smaller than ``data``, else ``([], data)``: a section
    is stored raw whenever compression does not pay."""
    if data:
        packed = zstd_compressor(level).compress(data)
        if len(packed) < len(data):
            return ["zstd"], packed
    return [], data


def chunk_units(unit_elements: int) -> int:
    """How many units (rows or elements) one planes chunk holds."""
    return max(1, CHUNK_ELEMENTS // max(1, unit_elements))


# --- validation ------------------------------------------------------------

def check_value_codec(codec, *, relative_allowed: bool, where: str, dtype: str | None = None) -> None:
    """Raise unless ``codec`` is a pipeline this reader can undo (for values of ``dtype``)."""
    if not isinstance(codec, list) or not all(isinstance(s, str) for s in codec):
        raise PatchFormatError(f"{where}: codec must be a list of stage names")
    for stage in codec:
        if stage not in VALUE_STAGES:
            raise UnsupportedVersionError(f"{where}: unknown encoding {stage!r}", found=stage, supported=VALUE_STAGES)
    rank = {"xor": 0, "add": 0, "zadd": 0, "esort": 1, "planes": 2, "zstd": 3}
    order = [rank[s] for s in codec]
    if order != sorted(order) or len(set(order)) != len(order):
        raise PatchFormatError(f"{where}: codec stages {codec!r} out of order or repeated")
    if not relative_allowed and codec and codec[0] in DELTA_STAGES:
        raise PatchFormatError(f"{where}: delta stage {codec[0]!r} needs an old tensor of the same dtype and shape")
    if "esort" in codec:
        if delta_stage(codec) is None:
            raise PatchFormatError(f"{where}: stage 'esort' needs a delta stage before it")
        if dtype not in EXPONENT_FIELDS:
            raise PatchFormatError(f"{where}: stage 'esort' needs a floating-point dtype, not {dtype}")


def check_index_codec(codec, *, where: str) -> None:
    if not isinstance(codec, list) or not all(isinstance(s, str) for s in codec) or not codec:
        raise PatchFormatError(f"{where}: index codec must be a non-empty list of stage names")
    if codec[0] not in INDEX_FORMATS:
        raise UnsupportedVersionError(f"{where}: unknown index encoding {codec[0]!r}", found=codec[0],
                                      supported=INDEX_FORMATS)
    rest = codec[1:]
    for stage in rest:
        if stage != "zstd":
            raise UnsupportedVersionError(f"{where}: unknown index encoding {stage!r}", found=stage,
                                          supported=INDEX_FORMATS + ("zstd",))
    if len(rest) > 1:
        raise PatchFormatError(f"{where}: codec stage 'zstd' repeated")


def delta_stage(codec: list[str]) -> str | None:
    return codec[0] if codec and codec[0] in DELTA_STAGES else None


# --- element transforms (encoder side; the decoder uses nnpatch.kernel) ----

def encode_delta(new: np.ndarray, old: np.ndarray, width: int, stage: str) -> np.ndarray:
    """v such that undoing ``stage`` on ``old`` gives ``new`` (uint8 in, uint8 out)."""
    u = dtypes.uint_of_width(width)
    n = new.view(u)
    o = old.view(u)
    if stage == "xor":
        v = n ^ o
    elif stage == "add":
        v = n - o
    elif stage == "zadd":
        d = (n - o).view(u.str.replace("u", "i"))
        bits = 8 * width - 1
        v = ((d << 1) ^ (d >> bits)).view(u)
    else:  # pragma: no cover - guarded by check_value_codec
        raise ValueError(stage)
    return v.view(np.uint8)


def exponent_key(dtype: str) -> tuple[int, int]:
    """(shift, mask) that pick ``dtype``'s exponent field out of a word's two
    high bytes read as a little-endian uint16 (its only byte for 1-byte
    dtypes): the ``esort`` key (see :func:`nnpatch.kernel.sort_keys`)."""
    mant, bits = EXPONENT_FIELDS[dtype]
    width = dtypes.ITEMSIZE[dtype]
    return mant - 8 * max(0, width - 2), (1 << bits) - 1


def sort_words(data: np.ndarray, old: np.ndarray, dtype: str) -> np.ndarray:
    """The writer's side of ``esort``: the words of ``data`` (uint8) in stable
    order of the exponent field of the ``old`` word at the same position."""
    width = dtypes.ITEMSIZE[dtype]
    shift, mask = exponent_key(dtype)
    order = np.argsort(sort_keys(old, width, shift, mask), kind="stable")
    return data.reshape(-1, width)[order].reshape(-1)


def to_planes(data: np.ndarray, width: int) -> np.ndarray:
    if width == 1:
        return data
    return np.ascontiguousarray(data.reshape(-1, width).T).reshape(-1)


def from_planes(data: np.ndarray, width: int) -> np.ndarray:
    if width == 1:
        return data
    return np.ascontiguousarray(data.reshape(width, -1).T).reshape(-1)


# --- zstd framing -----------------------------------------------------------

def zstd_frame_length(buf) -> int:
    """Length in bytes of the single zstd frame at the start of ``buf``.

    python-zstandard silently ignores bytes after a frame; the format forbids
    them (no hidden data in a section), so the frame is walked block by block.
    """
    mv = memoryview(buf)
    if bytes(mv[:4]) != ZSTD_MAGIC:
        raise PatchFormatError("zstd section does not start with a zstd frame")
    try:
        pos = zstandard.frame_header_size(bytes(mv[:18]))
    except zstandard.ZstdError as e:
        raise PatchFormatError(f"invalid zstd frame header: {e}") from e
    descriptor = mv[4]
    while True:
        if pos + 3 > len(mv):
            raise PatchFormatError("zstd frame truncated")
        b = int.from_bytes(mv[pos : pos + 3], "little")
        last, btype, bsize = b & 1, (b >> 1) & 3, b >> 3
        if btype == 3:
            raise PatchFormatError("zstd frame uses a reserved block type")
        pos += 3 + (1 if btype == 1 else bsize)
        if last:
            break
    if descriptor & 0x04:
        pos += 4
    if pos > len(mv):
        raise PatchFormatError("zstd frame truncated")
    return pos


def check_zstd_frame(buf, size: int, where: str) -> None:
    """One frame exactly filling ``buf``, declaring ``size`` bytes (spec 7.3), or PatchFormatError."""
    try:
        length = zstd_frame_length(buf)
    except PatchFormatError as e:
        raise PatchFormatError(f"{where}: {e}") from e
    if length != len(buf):
        raise PatchFormatError(f"{where}: {len(buf) - length} bytes after the zstd frame")
    try:
        content = zstandard.frame_content_size(bytes(memoryview(buf)[:18]))
    except zstandard.ZstdError as e:
        raise PatchFormatError(f"{where}: invalid zstd frame header: {e}") from e
    if content != size:
        raise PatchFormatError(f"{where}: zstd frame declares {content} bytes, section size is {size}")


def decoded_chunks(buf, codec: list[str], size: int, chunk_sizes: Iterable[int], *, where: str) -> Iterator[np.ndarray]:
    """Undo the zstd stage and cut the stream into the given chunk sizes.

    Yields uint8 arrays (still in plane layout when the codec has ``planes``).
    The chunk sizes must add up to ``size``.
    """
    if codec and codec[-1] == "zstd":
        check_zstd_frame(buf, size, where)
        try:
            # decode straight into each chunk: one copy, and memory bounded by the chunk size
            reader = zstandard.ZstdDecompressor().stream_reader(buf, read_size=1 << 20)
            for want in chunk_sizes:
                out = np.empty(want, np.uint8)
                view = memoryview(out)
                n = 0
                while n < want:
                    k = reader.readinto(view[n:])
                    if not k:
                        raise PatchFormatError(f"{where}: zstd data ends early")
                    n += k
                yield out
            if reader.read(1):
                raise PatchFormatError(f"{where}: zstd data longer than expected")
        except zstandard.ZstdError as e:
            raise PatchFormatError(f"{where}: corrupt zstd data: {e}") from e
    else:
        mv = np.frombuffer(buf, dtype=np.uint8) if len(buf) else np.empty(0, np.uint8)
        if len(mv) != size:
            raise PatchFormatError(f"{where}: section is {len(mv)} bytes, expected {size}")
        pos = 0
        for want in chunk_sizes:
            yield mv[pos : pos + want]
            pos += want


def piece_sizes(size: int, piece: int = 8 << 20) -> list[int]:
    """``size`` bytes cut into pieces of ``piece`` bytes (the last one shorter): how sections that
    are not values (blobs, layouts) are decoded in bounded memory."""
    full, rest = divmod(size, piece)
    return [piece] * full + ([rest] if rest else [])


def value_chunk_sizes(count_units: int, unit_bytes: int, unit_elements: int) -> list[int]:
    """Byte sizes of the planes chunks for ``count_units`` units."""
    per = chunk_units(unit_elements)
    full, rest = divmod(count_units, per)
    return [per * unit_bytes] * full + ([rest * unit_bytes] if rest else [])


# --- encoder ------------------------------------------------------------------

class _Sink:
    """Writes a section's bytes, through a zstd stream when the codec ends in zstd."""

    def __init__(self, out, size: int, level: int, use_zstd: bool) -> None:
        self.out = out
        self.start = out.tell()
        self._writer = None
        if use_zstd:
            self._writer = zstd_compressor(level).stream_writer(out, size=size, closefd=False)

    def write(self, data) -> None:
        (self._writer or self.out).write(memoryview(data).cast("B") if not isinstance(data, bytes) else data)

    def end_block(self) -> None:
        """End the current zstd block, so the next bytes get their own entropy tables.

        zstd codes all literals of a block with one Huffman table; a small
        chunk's byte planes would otherwise share one, and planes would gain
        nothing over plain bytes."""
        if self._writer is not None:
            self._writer.flush(zstandard.FLUSH_BLOCK)

    def close(self) -> int:
        if self._writer is not None:
            self._writer.close()  # ends the frame; flush(FLUSH_FRAME) first would start a second one
        return self.out.tell() - self.start


def encode_value_stream(out, chunks: Iterable[tuple[np.ndarray, np.ndarray | None]], *, codec: list[str],
                        width: int, size: int, level: int, dtype: str | None = None) -> int:
    """Encode (new, old) uint8 chunk pairs into ``out``; returns the bytes written.

    Each pair is one planes chunk (see ``value_chunk_sizes``); ``old`` is None
    when the codec has no delta stage.
    """
    delta = delta_stage(codec)
    planar = "planes" in codec
    sink = _Sink(out, size, level, bool(codec) and codec[-1] == "zstd")
    for new, old in chunks:
        data = encode_delta(new, old, width, delta) if delta else new
        if "esort" in codec:
            data = sort_words(data, old, dtype)
        if planar and width > 1:
            data = to_planes(data, width)
            n = len(data) // width
            for k in range(width):
                sink.write(data[k * n : (k + 1) * n])
                sink.end_block()
        else:
            sink.write(data)
    return sink.close()


# --- indices ------------------------------------------------------------------

def _varint_encode(values: np.ndarray) -> bytes:
    values = values.astype(np.uint64, copy=False)
    if len(values) == 0:
        return b""
    nbytes = np.ones(len(values), dtype=np.int64)
    v = values >> np.uint64(7)
    while v.any():
        nbytes += v != 0
        v = v >> np.uint64(7)
    total = int(nbytes.sum())
    out = np.empty(total, dtype=np.uint8)
    starts = np.concatenate(([0], np.cumsum(nbytes)[:-1]))
    rem = values.copy()
    for k in range(int(nbytes.max())):
        live = nbytes > k
        idx = starts[live] + k
        more = nbytes[live] > k + 1
        out[idx] = (rem[live] & np.uint64(0x7F)).astype(np.uint8) | (more.astype(np.uint8) << 7)
        rem[live] >>= np.uint64(7)
    return out.tobytes()


def _varint_decode(buf: np.ndarray, count: int, where: str) -> np.ndarray:
    if count == 0:
        if len(buf):
            raise PatchFormatError(f"{where}: index bytes present for zero indices")
        return np.empty(0, dtype=np.uint64)
    ends = np.flatnonzero(buf < 0x80)
    if len(ends) != count or ends[-1] != len(buf) - 1:
        raise PatchFormatError(f"{where}: varint stream holds {len(ends)} values, expected {count}")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 10 or np.any((lengths == 10) & (buf[ends] > 1)):
        raise PatchFormatError(f"{where}: varint exceeds 64 bits")
    group = np.repeat(np.arange(count), lengths)
    shift = ((np.arange(len(buf)) - starts[group]) * 7).astype(np.uint64)
    contrib = (buf & 0x7F).astype(np.uint64) << shift
    return np.add.reduceat(contrib, starts)


def encode_indices(indices: np.ndarray, bound: int, fmt: str) -> bytes:
    """Sorted, strictly increasing ``indices`` (each < bound) in index format ``fmt``."""
    indices = np.asarray(indices, dtype=np.uint64)
    if fmt == "u32":
        return indices.astype("<u4").tobytes()
    if fmt == "u64":
        return indices.astype("<u8").tobytes()
    if fmt == "delta-varint":
        if len(indices) == 0:
            return b""
        gaps = np.diff(indices, prepend=np.uint64(0)) if len(indices) else indices
        gaps = gaps.copy()
        gaps[1:] -= np.uint64(1)
        return _varint_encode(gaps)
    if fmt == "bitmap":
        bits = np.zeros(bound, dtype=bool)
        bits[indices.astype(np.int64)] = True
        return np.packbits(bits, bitorder="little").tobytes()
    raise ValueError(fmt)


def decode_indices(buf, codec: list[str], *, count: int, bound: int, size: int, where: str) -> np.ndarray:
    """Decode and validate an index section: strictly increasing, all < bound."""
    check_index_codec(codec, where=where)
    if codec[-1] == "zstd" and len(codec) == 2:
        raw = b"".join(decoded_chunks(buf, ["zstd"], size, [size], where=where))
    else:
        raw = bytes(buf)
        if len(raw) != size:
            raise PatchFormatError(f"{where}: section is {len(raw)} bytes, expected {size}")
    data = np.frombuffer(raw, dtype=np.uint8)
    fmt = codec[0]
    if fmt in ("u32", "u64"):
        w = 4 if fmt == "u32" else 8
        if len(data) != count * w:
            raise PatchFormatError(f"{where}: {len(data)} index bytes, {count} {fmt} indices need {count * w}")
        idx = data.view("<u4" if w == 4 else "<u8").astype(np.uint64)
    elif fmt == "delta-varint":
        gaps = _varint_decode(data, count, where)
        if count and (gaps.max() >= bound or float(gaps.sum(dtype=np.float64)) + count > bound + 0.5):
            raise PatchFormatError(f"{where}: index out of range (bound {bound})")
        idx = np.cumsum(gaps, dtype=np.uint64) + np.arange(count, dtype=np.uint64)
    else:  # bitmap
        if len(data) != (bound + 7) // 8:
            raise PatchFormatError(f"{where}: bitmap is {len(data)} bytes, {bound} positions need {(bound + 7) // 8}")
        bits = np.unpackbits(data, bitorder="little")
        if bits[bound:].any():
            raise PatchFormatError(f"{where}: bitmap has bits set past position {bound}")
        idx = np.flatnonzero(bits[:bound]).astype(np.uint64)
        if len(idx) != count:
            raise PatchFormatError(f"{where}: bitmap holds {len(idx)} indices, expected {count}")
    if count and (idx[-1] >= bound or (len(idx) > 1 and not np.all(idx[1:] > idx[:-1]))):
        raise PatchFormatError(f"{where}: indices must be strictly increasing and below {bound}")
    return idx


def best_index_encoding(indices: np.ndarray, bound: int, level: int) -> tuple[list[str], bytes, int]:
    """Try every index format, with and without zstd; return (codec, payload, decoded size)."""
    best = None
    for fmt in INDEX_FORMATS:
        if fmt == "u32" and bound > 1 << 32:
            continue
        if fmt == "bitmap" and bound > 64 * max(1, len(indices)) * 8:
            continue  # a bitmap this sparse cannot win; skip building it
        raw = encode_indices(indices, bound, fmt)
        options = [([fmt], raw)]
        if len(raw) > 64:
            options.append(([fmt, "zstd"], zstd_compressor(level).compress(raw)))
        for codec, payload in options:
            if best is None or len(payload) < len(best[1]):
                best = (codec, payload, len(raw))
    assert best is not None
    return best
