"""Edit the header of an existing patch and recompute its trailer: for the
vector generator and for tests that craft patches nnpatch would never write.

Kept out of the package: production code never rewrites a patch's header.
"""

from __future__ import annotations

import json

import blake3

from nnpatch.patchfile import (FLAG_HEADER_ZSTD, FLAG_SIGNED, PREAMBLE, PREAMBLE_SIZE, SIGNATURE_BLOCK_SIZE,
                               TRAILER_SIZE, align, header_text, unpack_header)


def header_json(buf) -> dict:
    """The header object of a patch in ``buf`` (plain or zstd), without validating it."""
    _, _, _, flags, n = PREAMBLE.unpack_from(buf, 0)
    raw = bytes(buf[PREAMBLE_SIZE : PREAMBLE_SIZE + n])
    return json.loads(unpack_header(raw, "<patch>") if flags & FLAG_HEADER_ZSTD else raw)


def with_header(buf: bytes, obj: dict, *, shift: bool = True) -> bytes:
    """``buf`` with its header replaced by ``obj`` in the plain form, the trailer recomputed (unsigned).

    With ``shift``, section offsets in ``obj`` move by however much the
    header's length changed, so a well-formed patch stays well formed; for
    tools and tests that edit headers.
    """
    magic, major, minor, flags, n = PREAMBLE.unpack_from(buf, 0)
    sig = SIGNATURE_BLOCK_SIZE if flags & FLAG_SIGNED else 0
    old_start = PREAMBLE_SIZE + n
    length = n
    for _ in range(16):  # the offsets' digits change the length: iterate to a fixed point
        delta = PREAMBLE_SIZE + length - old_start
        text = header_text(shift_offsets(obj, delta) if shift and delta else obj)
        want = n if len(text) <= n else align(PREAMBLE_SIZE + len(text)) - PREAMBLE_SIZE
        if want == length:
            break
        length = want
    text += b" " * (length - len(text))
    flags &= ~(FLAG_HEADER_ZSTD | FLAG_SIGNED)
    body = PREAMBLE.pack(magic, major, minor, flags, len(text)) + text + bytes(
        buf[old_start : len(buf) - sig - TRAILER_SIZE])
    return body + blake3.blake3(body).digest()


def shift_offsets(obj, delta: int):
    """A copy of a header object with every section offset moved by ``delta``."""
    obj = json.loads(json.dumps(obj))

    def move(section):
        if isinstance(section, dict) and type(section.get("offset")) is int:
            section["offset"] += delta

    for role in ("base", "target"):
        if isinstance(obj.get(role), dict):
            move(obj[role].get("layout"))
            move(obj[role].get("skeleton"))
            move(obj[role].get("extents"))
            files = obj[role].get("files")
            for f in files if isinstance(files, list) else []:
                if isinstance(f, dict):
                    move(f.get("layout"))
                    move(f.get("content"))
    for op in obj.get("ops", []) if isinstance(obj.get("ops"), list) else []:
        if isinstance(op, dict):
            for key in ("index", "scales", "values", "base_values"):
                move(op.get(key))
    return obj
