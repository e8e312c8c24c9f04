"""What an apply promises: the verification policy and the result it reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UsageError

ProgressFn = Callable[[int], None]

VERIFY_MODES = ("default", "full", "touched")


@dataclass(frozen=True)
class Verify:
    """The verification policy, parsed once where a call enters the applier.

    ``default``
        every base tensor is hashed (base model digest checked), every touched
        base tensor against its own digest, every touched target tensor against
        its digest, and the target model digest recomputed from those.  With
        the trailer-checked layout this proves the output is the target
        without reading it again.
    ``full``
        ``default`` plus a BLAKE3 of every output file, compared with the
        patch's file digests: an end-to-end check independent of the engine's
        bookkeeping (catches bugs, bad RAM, a file system that copied wrongly),
        at the cost of a second read of the output.
    ``touched``
        only the touched tensors are hashed (base and target).  Fastest; the
        unchanged tensors are copied unchecked, so a base that differs only in
        tensors the patch does not touch goes undetected and is carried into
        the output.  Use when the base is known good (e.g. just verified).
    """

    mode: str = "default"

    @classmethod
    def parse(cls, value: str | Verify) -> Verify:
        if isinstance(value, Verify):
            return value
        if value not in VERIFY_MODES:
            raise UsageError(f"--verify must be one of {', '.join(VERIFY_MODES)}, got {value!r}")
        return cls(value)

    @property
    def whole_base(self) -> bool:
        """Every input tensor is hashed and the input and output model digests are checked."""
        return self.mode != "touched"

    @property
    def rehash_output(self) -> bool:
        """Every output file is read again and compared with its file digest."""
        return self.mode == "full"


@dataclass
class ApplyResult:
    """What apply wrote, and what was proven about it.

    ``blake3`` is the output's file digest (a directory's: its directory
    digest) when it was computed from the bytes written: ``verify="full"``,
    ``revert``, PyTorch and ONNX targets. Otherwise it is None: the patch's
    claimed file digest is never reported as the output's, since only
    ``full`` reads the output again to prove it. ``model_blake3`` is the
    output's model digest when the engine proved it (every mode but
    ``touched``), else None.
    """

    output: str
    size: int
    blake3: str | None
    ops: int
    verify: str = "default"
    #: base bytes that were hashed, and output bytes hashed again
    hashed: int = 0
    links: int = 1
    model_blake3: str | None = None
