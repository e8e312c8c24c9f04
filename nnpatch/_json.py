"""Strict JSON for every parser of untrusted JSON in nnpatch (safetensors headers, indexes, manifests)."""

from __future__ import annotations

import json
import os
import re

import numpy as np

from .errors import NnpatchIOError


def reject_duplicates(pairs):
    """``object_pairs_hook`` that refuses duplicate keys (json.loads keeps the last one silently)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def reject_constant(name):
    """``parse_constant`` that refuses NaN and Infinity, which RFC 8259 does not define."""
    raise ValueError(f"{name} is not allowed")


def loads_strict(raw: bytes):
    """UTF-8 JSON without duplicate keys; every failure is a ValueError for the caller to name."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(str(e)) from e
    return loads_text(text)


def loads_text(text: str):
    """Decoded JSON text under the rules of loads_strict: no duplicate keys, no NaN or Infinity,
    no lone surrogate (``"\\ud800"``: valid JSON syntax, but not Unicode text)."""
    try:
        obj = json.loads(text, object_pairs_hook=reject_duplicates, parse_constant=reject_constant)
    except RecursionError as e:
        raise ValueError(str(e) or type(e).__name__) from e
    if "\\u" in text:  # only an escape can smuggle in a lone surrogate, which no UTF-8 text holds
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError("a string holds a lone surrogate (\\uD800-\\uDFFF escape), which is not "
                             "Unicode text") from e
    return obj


def load_object(raw: bytes, *, limit: int, what: str) -> dict:
    """``raw`` as one JSON object: at most ``limit`` bytes, strict JSON (:func:`loads_strict`), and
    an object at the top. The one rule for every small JSON document nnpatch reads whole (release
    manifests and their envelopes, the update state, shard indexes). Every failure is a
    ValueError whose message names ``what``, for the caller to raise as its own error."""
    if len(raw) > limit:
        raise ValueError(f"{what} of {len(raw)} bytes exceeds the {limit} limit")
    try:
        obj = loads_strict(raw)
    except ValueError as e:
        raise ValueError(f"invalid {what} JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"invalid {what}: not a JSON object")
    return obj


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_shape(raw: bytes) -> tuple[int, int]:
    """(deepest bracket nesting, number of values) of UTF-8 JSON outside its strings, found
    before parsing so that hostile JSON can exhaust neither the parser's recursion nor memory.
    Values are counted as opening brackets and commas; the scan runs in pieces, so it needs a
    few MB whatever the input's size."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b"", raw), dtype=np.uint8)
    depth = deepest = values = 0
    for at in range(0, len(skeleton), 1 << 20):
        part = skeleton[at : at + (1 << 20)]
        opens = (part == ord("[")) | (part == ord("{"))
        step = opens.astype(np.int32) - ((part == ord("]")) | (part == ord("}")))
        level = np.cumsum(step, dtype=np.int64) + depth
        deepest = max(deepest, int(level.max()))
        depth = int(level[-1])
        values += int(opens.sum()) + int(np.count_nonzero(part == ord(",")))
    return deepest, values


def read_bounded(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a file, so a caller can refuse one that is too large without reading it."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot read: {e.strerror or e}") from e
