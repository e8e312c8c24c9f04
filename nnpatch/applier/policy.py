"""What an apply promises: the verification policy and the result it reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UsageError

ProgressFn = Callable[[int], None]


VERIFY_MODES = ("default", "full", "touched")


@dataclass
class ApplyResult:
    """What apply wrote. ``blake3`` is the output's file digest: re-hashed and
    checked with ``verify="full"``; in the other modes it is the patch's
    target digest, which the checked layout and tensor digests imply for a
    well-formed patch (spec/FORMAT.md, section 9, step 8)."""

    output: str
    size: int
    blake3: str
    ops: int
    verify: str = "default"
    #: base bytes that were hashed, and output bytes hashed again
    hashed: int = 0
    links: int = 1


def _check_verify(verify: str) -> str:
    if verify not in VERIFY_MODES:
        raise UsageError(f"--verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    return verify
