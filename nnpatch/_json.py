"""Strict JSON helpers shared by every parser of untrusted JSON in nnpatch."""

from __future__ import annotations


def reject_duplicates(pairs):
    """``object_pairs_hook`` that refuses duplicate keys (json.loads keeps the last one silently)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj
