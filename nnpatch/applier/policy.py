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

    Every mode proves the output's file digest (a directory's: its
    directory digest): the output is hashed once more after it is written,
    from the page cache, and compared with the patch's ``target.blake3``; a
    claim that differs is refused (exit 4) and the output is not left in
    place (spec/FORMAT.md, "Applying").

    ``default``
        every base tensor is hashed (base model digest checked), every touched
        base tensor against its own digest, every touched target tensor against
        its digest, the target model digest recomputed from those, and the
        output's file digest.
    ``full``
        the same work as ``default`` (kept so that scripts naming it keep
        working): before 0.5.0 it was the only mode that hashed the output
        file again.
    ``touched``
        only the touched tensors are hashed (base and target), and the output
        file.  The unchanged tensors are copied unchecked, but a base that
        differs in them gives an output whose file digest differs from the
        target's, so it is refused all the same (as "result does not match",
        not as "wrong base").
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
        """Every output file is read again and compared with its file digest: in every mode, so that
        no mode installs an output whose file digest differs from the patch's claim."""
        return True


@dataclass
class ApplyResult:
    """What apply wrote, and what was proven about it.

    ``blake3`` is the output's file digest (a directory's: its directory
    digest), computed from the bytes written (every mode proves it). It is
    None only where nothing was written to hash; the patch's claimed file
    digest is never reported as the output's. ``model_blake3`` is the
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
