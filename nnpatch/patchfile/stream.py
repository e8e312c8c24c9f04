"""Read a patch from a stream (``nnpatch apply base.safetensors - -o out``).

The stream is checked as it arrives: the preamble and JSON header are
validated as soon as they are in (a wrong or corrupt stream fails before
the rest is downloaded), every byte goes through one BLAKE3 hasher, and at
the end the trailer must match.  Only then is the patch applied, so a
cut-off or corrupted stream leaves no output (exit 3).

Why the sections are spooled to a temporary file (beside the output)
rather than applied straight from the pipe:

* the output is written in the target's tensor order (by dtype alignment,
  then name), the sections arrive in op order (by name); applying from the
  pipe would mean holding arbitrarily large sections (an ``add`` of a
  200 MB embedding) on the heap, breaking the bounded-memory promise;
* the output could not be committed before the trailer arrives anyway, so
  writing while reading saves at most the apply time of a patch that is
  usually ~10 % of the model, while the spool costs one sequential write of
  the patch (the page cache usually absorbs it) and no second hash: the
  trailer is checked on the fly and the spooled file is not re-hashed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import BinaryIO

import blake3

from ..errors import NnpatchIOError, PatchFormatError
from .reader import Authenticator, Patch, parse_header
from .header import (
    FLAG_SIGNED,
    MAGIC,
    MAX_HEADER_SIZE,
    PREAMBLE,
    PREAMBLE_SIZE,
    SIGNATURE_BLOCK_SIZE,
    TRAILER_SIZE,
)

#: Bytes held back from the running hash: the trailer and a signature block.
_HELD = TRAILER_SIZE + SIGNATURE_BLOCK_SIZE

STDIN_NAME = "<stdin>"
_READ = 1 << 20


def _early_check(head: bytes) -> None:
    """Validate the preamble and header JSON as soon as they have arrived."""
    if head[:8] != MAGIC[: len(head[:8])]:
        raise PatchFormatError("not an nnpatch file (bad magic)", path=STDIN_NAME, offset=0)
    if len(head) < PREAMBLE_SIZE:
        return
    _, _, _, _, header_len = PREAMBLE.unpack_from(head, 0)
    if header_len > MAX_HEADER_SIZE:
        raise PatchFormatError(f"header length {header_len} exceeds the {MAX_HEADER_SIZE} limit",
                               path=STDIN_NAME, offset=16)


def read_patch_stream(src: BinaryIO | None = None, *, directory: str | None = None,
                      authenticate: Authenticator | None = None) -> Patch:
    """Spool a patch from ``src`` (default: standard input) and return it opened.

    Raises :class:`PatchFormatError` when the stream is cut off or corrupt.
    With ``authenticate`` (a key), nothing of the header is parsed before the
    trailer has arrived and the signature checks out: the early header check
    is skipped.
    """
    if src is None:
        src = sys.stdin.buffer
    try:
        fd, tmp = tempfile.mkstemp(prefix=".nnpatch-stdin.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise NnpatchIOError(f"{directory or tempfile.gettempdir()}: cannot spool the patch: {e.strerror or e}") from e
    try:
        h = blake3.blake3()
        tail = b""  # the last _HELD bytes seen, not yet hashed
        pre = b""
        head = b""
        header_checked = authenticate is not None
        total = 0
        spooled = os.fstat(fd)
        with os.fdopen(fd, "wb") as f:
            while True:
                try:
                    chunk = src.read(_READ)
                except OSError as e:
                    raise NnpatchIOError(f"{STDIN_NAME}: cannot read: {e.strerror or e}") from e
                if not chunk:
                    break
                total += len(chunk)
                f.write(chunk)
                if not header_checked:
                    head += chunk
                    _early_check(head[:PREAMBLE_SIZE])
                    if len(head) >= PREAMBLE_SIZE:
                        header_len = PREAMBLE.unpack_from(head, 0)[4]
                        if len(head) >= PREAMBLE_SIZE + header_len:
                            # structure of the header alone (no sections yet): fail early on junk
                            _check_header_json(head[: PREAMBLE_SIZE + header_len])
                            header_checked = True
                            head = b""
                if len(pre) < PREAMBLE_SIZE:
                    pre += chunk[: PREAMBLE_SIZE - len(pre)]
                # the trailer (and a signature block after it) are the last bytes: hold back enough
                data = tail + chunk
                if len(data) > _HELD:
                    h.update(data[: len(data) - _HELD])
                    tail = data[len(data) - _HELD :]
                else:
                    tail = data
            f.flush()
        signed = len(pre) == PREAMBLE_SIZE and PREAMBLE.unpack_from(pre, 0)[3] & FLAG_SIGNED
        end = TRAILER_SIZE + (SIGNATURE_BLOCK_SIZE if signed else 0)
        if total < PREAMBLE_SIZE + end:
            raise PatchFormatError(f"stream cut off after {total} bytes", path=STDIN_NAME)
        h.update(tail[: len(tail) - end])
        if h.digest() != tail[len(tail) - end : len(tail) - end + TRAILER_SIZE]:
            raise PatchFormatError(f"stream cut off or corrupt after {total} bytes: trailer hash mismatch",
                                   path=STDIN_NAME)
        return Patch(tmp, check_trailer=False, authenticate=authenticate, name=STDIN_NAME, same_as=spooled)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # an open Patch keeps its map; nothing is left on disk


def _check_header_json(head: bytes) -> None:
    """Parse the header (not the sections, which have not arrived)."""
    parse_header(head[PREAMBLE_SIZE:], PREAMBLE.unpack_from(head, 0)[3], path=STDIN_NAME)


__all__ = ["read_patch_stream", "STDIN_NAME"]
