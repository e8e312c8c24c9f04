"""Strict JSON for every parser of untrusted JSON in nnpatch (safetensors headers, indexes, manifests)."""

from __future__ import annotations

import json
import os

from .errors import NnpatchIOError


def reject_duplicates(pairs):
    """``object_pairs_hook`` that refuses duplicate keys (json.loads keeps the last one silently)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def loads_strict(raw: bytes):
    """UTF-8 JSON without duplicate keys; every failure is a ValueError for the caller to name."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicates)
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(str(e) or type(e).__name__) from e
    if b"\\u" in raw:  # only an escape can smuggle in a lone surrogate, which no UTF-8 text holds
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError("a string holds a lone surrogate (\\uD800-\\uDFFF escape), which is not "
                             "Unicode text") from e
    return obj


def read_bounded(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a file, so a caller can refuse one that is too large without reading it."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot read: {e.strerror or e}") from e
