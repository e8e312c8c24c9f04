"""The ``zstd-base`` codec of an extents target's skeleton (format 1.5, spec/FORMAT.md 5.8).

A device model's skeleton (GGUF metadata, a TFLite flatbuffer with its quantization scales and
names) changes little between two versions, but carried whole it costs 1-5 KB of every patch,
which decides small patches. ``zstd-base`` is one zstd frame compressed with the base's skeleton
as a raw-content dictionary (a prefix), so an unchanged run of the skeleton costs a few bytes.
Native twin: native/src/skeldelta.c.
"""

from __future__ import annotations

import zstandard

from .codecs import SMALL_SECTION_LEVEL, check_zstd_frame
from .errors import PatchFormatError

#: The stage name (a section's codec is exactly ``["zstd-base"]``).
ZSTD_BASE = "zstd-base"


def _dictionary(base_skeleton: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(bytes(base_skeleton), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def encode(skeleton: bytes, base_skeleton: bytes, level: int) -> bytes:
    """One frame of ``skeleton`` against ``base_skeleton``: its content size declared, no
    dictionary ID (a raw-content dictionary has none), no checksum."""
    z = zstandard.ZstdCompressor(level=max(level, SMALL_SECTION_LEVEL), dict_data=_dictionary(base_skeleton),
                                 write_content_size=True, write_checksum=False, write_dict_id=False)
    return z.compress(skeleton)


def check_frame(frame, size: int, *, where: str) -> None:
    """The frame rules, which need no base (``verify`` without one): section 7.3's, and no dictionary ID."""
    check_zstd_frame(frame, size, where)
    if memoryview(frame)[4] & 0x03:
        raise PatchFormatError(f"{where}: a 'zstd-base' frame must not name a dictionary ID")


def decode(frame, size: int, base_skeleton: bytes, *, where: str) -> bytes:
    """The skeleton ``frame`` holds: exactly ``size`` bytes (the frame's declared content size),
    or PatchFormatError."""
    if not base_skeleton:
        raise PatchFormatError(f"{where}: a 'zstd-base' skeleton needs a base with a non-empty skeleton")
    check_frame(frame, size, where=where)
    try:
        out = zstandard.ZstdDecompressor(dict_data=_dictionary(base_skeleton)).decompress(
            bytes(frame), max_output_size=size)
    except zstandard.ZstdError as e:
        raise PatchFormatError(f"{where}: corrupt zstd data: {e}") from e
    if len(out) != size:
        raise PatchFormatError(f"{where}: zstd data decodes to {len(out)} bytes, expected {size}")
    return out
