"""Write a patch: sections spooled as the differ encodes them, then the header
laid out, the container written atomically and its trailer hash computed."""

from __future__ import annotations

import os
import tempfile

import blake3

from ..atomic import atomic_write
from ..codecs import SMALL_SECTION_LEVEL, zstd_compressor
from ..errors import NnpatchIOError, PatchFormatError
from .header import (FLAG_HEADER_ZSTD, HEADER_EXPANSION_SLACK, MAX_HEADER_EXPANSION, FLAG_SIGNED, MAGIC, MAX_HEADER_SIZE, PREAMBLE, PREAMBLE_SIZE,
                     PACKED_SECTIONS, SIGNATURE_BLOCK_SIZE, TRAILER_SIZE, PatchHeader, Section, align,
                     encode_header, header_text, place)


def _pad_zero(data: bytes) -> bytes:
    return data + b"\x00" * (align(PREAMBLE_SIZE + len(data)) - PREAMBLE_SIZE - len(data))


def _layout_header(header: PatchHeader, compress: bool) -> bytes:
    """The header bytes, with section offsets that account for their own length.

    Offsets change the header's length and the length moves the offsets, so
    the space is grown until the header written with it fits; spaces (plain)
    or zeros (zstd) pad it out, which keeps each form canonical.
    """
    header.flags &= ~FLAG_HEADER_ZSTD
    reserve = 0
    for _ in range(64):
        text = header_text(header.to_json(base=PREAMBLE_SIZE + reserve))
        plain = encode_header(header.to_json(base=PREAMBLE_SIZE + reserve))
        body, zipped = plain, False
        if compress:
            packed = _pad_zero(zstd_compressor(SMALL_SECTION_LEVEL).compress(text))
            if len(packed) < len(plain) and len(text) <= MAX_HEADER_EXPANSION * len(packed) + HEADER_EXPANSION_SLACK:
                body, zipped = packed, True
        if len(body) <= reserve:
            body += (b"\x00" if zipped else b" ") * (reserve - len(body))  # pad to the reserved length
            if zipped:
                header.flags |= FLAG_HEADER_ZSTD
            return body
        reserve = len(body)
    raise AssertionError("header layout did not converge")  # pragma: no cover


# --- writing ----------------------------------------------------------------

class PatchWriter:
    """Collects sections in a spool file, then writes the patch atomically.

    Sections must be added in the order the header lists them (layout, then
    each op's index and values, ops sorted by name).

    ``packed``: sections follow each other with no padding (format 1.5, the
    ``packed-sections`` feature), unless that saves nothing (every section
    already falls on a 64-byte boundary): then the patch is written aligned,
    as readers of 1.4 and before take it. ``packed=False`` always aligns.
    """

    def __init__(self, path: str | os.PathLike[str], *, packed: bool = True) -> None:
        self.path = os.fspath(path)
        self.packed = packed
        self._aligned_anyway = True  # every section so far starts on a 64-byte boundary
        directory = os.path.dirname(os.path.abspath(self.path))
        self.trailer_hash = ""  # set by finish()
        try:
            self._spool = tempfile.TemporaryFile(dir=directory)
        except OSError as e:
            raise NnpatchIOError(f"{self.path}: cannot write: {e.strerror or e}") from e

    @property
    def stream(self):
        return self._spool

    def begin_section(self) -> int:
        pos = self._spool.tell()
        if self.packed:
            self._aligned_anyway &= pos == align(pos)
            return pos
        pad = align(pos) - pos
        if pad:
            self._spool.write(b"\x00" * pad)
        return self._spool.tell()

    def add_bytes(self, payload: bytes, size: int, codec: list[str]) -> Section:
        start = self.begin_section()
        self._spool.write(payload)
        return Section(start, len(payload), size, list(codec))

    def finish(self, header: PatchHeader, signer=None, *, compress_header: bool = True) -> int:
        """Write the patch; returns its size in bytes.

        ``signer(trailer_digest) -> (public_key, signature)``, when given,
        makes a signed patch (nnpatch.signing.signer_from_file builds one).
        The header is stored as zstd when that is smaller (per-op digests and
        keys make up most of a small model's patch otherwise).
        """
        if signer is not None:
            header.flags |= FLAG_SIGNED
        data_len = self._spool.tell()
        packed = self.packed and not (self._aligned_anyway and data_len == align(data_len))
        features = set(header.required_features) - {PACKED_SECTIONS}
        header.required_features = sorted(features | {PACKED_SECTIONS} if packed else features)
        head = _layout_header(header, compress_header)
        data_start = PREAMBLE_SIZE + len(head)
        if len(head) > MAX_HEADER_SIZE:
            raise PatchFormatError(f"header of {len(head)} bytes exceeds the {MAX_HEADER_SIZE} limit", path=self.path)
        trailer_at = data_start + place(data_len, packed)
        h = blake3.blake3()
        try:
            with atomic_write(self.path) as f:
                version = header.version or header.min_version
                pre = PREAMBLE.pack(MAGIC, version[0], version[1], header.flags, len(head))
                for chunk in (pre, head):
                    f.write(chunk)
                    h.update(chunk)
                self._spool.seek(0)
                while True:
                    buf = self._spool.read(8 << 20)
                    if not buf:
                        break
                    f.write(buf)
                    h.update(buf)
                pad = b"\x00" * (place(data_len, packed) - data_len)
                f.write(pad)
                h.update(pad)
                digest = h.digest()
                self.trailer_hash = digest.hex()
                f.write(digest)
                if signer is not None:
                    public_key, signature = signer(digest)
                    f.write(public_key + signature)
        except OSError as e:
            raise NnpatchIOError(f"{self.path}: cannot write: {e.strerror or e}") from e
        finally:
            self._spool.close()
        return trailer_at + TRAILER_SIZE + (SIGNATURE_BLOCK_SIZE if signer is not None else 0)

    def abort(self) -> None:
        self._spool.close()
