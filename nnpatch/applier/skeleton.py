"""An extents target's skeleton bytes, whole or a ``zstd-base`` delta (spec/FORMAT.md 5.8, 1.5).

A delta is decoded against the base's skeleton: for the first link of a chain, the base file's
bytes outside ``base.extents``, read only after the file's digest is proven to be ``base.blake3``
(a delta binds the patch to its base byte for byte, and a wrong base is named as one rather than
found by the output's digest); for a later link, the skeleton of the link before, whose target
table must be this link's base table. Native twin: native/src/skeldelta.c.
"""

from __future__ import annotations

from .. import codecs, skeldelta
from ..errors import BaseMismatchError, PatchFormatError
from ..hashing import hash_file
from ..patchfile import Patch
from ..weights.extents import decode_table, skeleton_of


def _section(patch: Patch, ref, name: str) -> bytes:
    s = getattr(ref, name)
    where = f"{'target' if ref is patch.header.target else 'base'}.{name}"
    if s.codec not in ([], ["zstd"]):
        raise PatchFormatError(f"{where}: the codec must be raw or zstd, not {s.codec}", path=patch.path)
    return b"".join(codecs.decoded_chunks(patch.section(s), s.codec, s.size, [s.size], where=where))


def _table(raw: bytes, patch: Patch, where: str):
    try:
        return decode_table(raw)
    except ValueError as e:
        raise PatchFormatError(f"{where}: {e}", path=patch.path) from e


def check_skeleton_frame(patch: Patch) -> None:
    """A delta skeleton's frame rules, which ``verify`` checks without the base (its dictionary)."""
    s = patch.header.target.skeleton
    if s.codec == [skeldelta.ZSTD_BASE]:
        try:
            skeldelta.check_frame(patch.section(s), s.size, where="target.skeleton")
        except PatchFormatError as e:
            raise PatchFormatError(str(e), path=patch.path) from e


def target_skeleton(links: list[Patch], base_path: str) -> bytes:
    """The skeleton of the last link's target, its size the header's."""
    patch = links[-1]
    s = patch.header.target.skeleton
    if s.codec != [skeldelta.ZSTD_BASE]:
        return _section(patch, patch.header.target, "skeleton")
    base = _base_skeleton(links, base_path)
    try:
        return skeldelta.decode(patch.section(s), s.size, base, where="target.skeleton")
    except PatchFormatError as e:
        raise PatchFormatError(str(e), path=patch.path) from e


def _base_skeleton(links: list[Patch], base_path: str) -> bytes:
    patch = links[-1]
    base_table = _section(patch, patch.header.base, "extents")
    if len(links) == 1:
        digest = hash_file(base_path)
        if digest != patch.header.base.blake3:
            raise BaseMismatchError(f"{base_path}: wrong base: the patch's skeleton is a delta against base file "
                                    f"{patch.header.base.blake3}, this one is {digest}")
        _, extents = _table(base_table, patch, "base.extents")
        with open(base_path, "rb") as f:
            return skeleton_of(f.read(), extents)
    before = links[-2]
    if before.header.target.format != "extents" or _section(before, before.header.target, "extents") != base_table:
        raise BaseMismatchError(f"{patch.path}: its skeleton is a delta against a base the link before it "
                                "does not make (base.extents differs from that link's target.extents)")
    return target_skeleton(links[:-1], base_path)
