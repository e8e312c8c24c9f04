"""The exception tree of nnpatch and the exit code each failure maps to.

The library raises, the CLI prints: every error a user can cause is an
``NnpatchError`` whose ``exit_code`` is the documented process exit status.
Messages are one line: where, what, and expected versus found.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2
EXIT_INVALID = 3
EXIT_INTEGRITY = 4
EXIT_IO = 5
#: ``train-sparse``: the code named by ``--model`` or ``--data`` raised, or broke its contract
EXIT_USER_CODE = 6
#: ``update``: no patch in the release leads from the model's version (a full download is needed)
EXIT_NO_PATCH = 7
EXIT_INTERRUPTED = 130


class NnpatchError(Exception):
    """Root of every error nnpatch raises on purpose."""

    exit_code: ClassVar[int] = EXIT_INVALID

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PatchFormatError(NnpatchError, ValueError):
    """A patch file breaks a rule of spec/FORMAT.md (truncated, corrupt, malformed)."""

    exit_code = EXIT_INVALID

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None) -> None:
        prefix = ""
        if path is not None:
            prefix = f"{path}: "
        if offset is not None:
            prefix += f"byte {offset}: "
        super().__init__(prefix + message)
        self.path = path
        self.offset = offset


class UnsupportedVersionError(PatchFormatError):
    """The patch uses a major version, feature or codec this nnpatch does not know."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None,
                 found: object = None, supported: object = None) -> None:
        super().__init__(message, path=path, offset=offset)
        self.found = found
        self.supported = supported


class WeightsError(NnpatchError, ValueError):
    """A model file cannot be read, or its tensors do not fit what was asked."""

    exit_code = EXIT_INVALID

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None) -> None:
        prefix = f"{path}: " if path is not None else ""
        if tensor is not None:
            prefix += f"tensor {tensor!r}: "
        super().__init__(prefix + message)
        self.path = path
        self.tensor = tensor


class IntegrityError(NnpatchError):
    """A digest did not match: the data is not what it claims to be."""

    exit_code = EXIT_INTEGRITY

    def __init__(self, message: str, *, what: str | None = None,
                 expected: str | None = None, actual: str | None = None) -> None:
        super().__init__(message)
        self.what = what
        self.expected = expected
        self.actual = actual


class BaseMismatchError(IntegrityError):
    """The patch was made for another base model."""


class TornJournal(IntegrityError):
    """An undo journal is incomplete or damaged (its trailer hash does not match)."""


class InvalidJournal(NnpatchError):
    """A committed journal (its trailer hash matches) breaks spec/JOURNAL.md: it was crafted, or written by a
    broken program. It is kept (it may be the only way back) and nothing is written."""

    exit_code = EXIT_INVALID

    def __init__(self, message: str) -> None:
        super().__init__(message + "; the journal is kept and the model was not written (remove the journal "
                         "only if you know the model is intact)")


class NoPatchError(WeightsError):
    """A release manifest has no patch for the local model's version."""


class NoUpdatePathError(NoPatchError):
    """``nnpatch update``: no patch in the release leads from this model's version, so only a
    full download brings it to the release (exit 7, apart from a broken feed's 3)."""

    exit_code = EXIT_NO_PATCH


class TrainingError(NnpatchError):
    """A training run ended in an outcome its caller asked to refuse (a sparse
    update over its channel limit or size budget, frozen channels that moved,
    ranks that disagree): the run worked, its result does not qualify."""

    exit_code = EXIT_MISMATCH


class BudgetMissedError(TrainingError):
    """``train-sparse --budget``: the patch written is larger than the budget.  The update and the
    patch were written (the run's ``report`` is attached); the result does not qualify."""

    def __init__(self, message: str, *, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


class UserCodeError(NnpatchError):
    """Code the user named (``train-sparse --model/--data SPEC``) raised, or gave something other
    than the contract asks.  The message names the SPEC and the exception; ``--debug`` shows the
    traceback (the original exception is the ``__cause__``)."""

    exit_code = EXIT_USER_CODE


class MissingDependencyError(NnpatchError):
    """An optional dependency is needed for this operation (e.g. torch)."""

    exit_code = EXIT_INVALID


class NnpatchIOError(NnpatchError, OSError):
    """Reading or writing a file failed at the operating-system level."""

    exit_code = EXIT_IO


class UsageError(NnpatchError):
    """The call itself is wrong (conflicting options, missing argument)."""

    exit_code = EXIT_USAGE


__all__ = [
    "EXIT_OK", "EXIT_MISMATCH", "EXIT_USAGE", "EXIT_INVALID", "EXIT_INTEGRITY", "EXIT_IO", "EXIT_NO_PATCH",
    "EXIT_USER_CODE", "EXIT_INTERRUPTED", "NnpatchError", "PatchFormatError", "UnsupportedVersionError",
    "WeightsError", "IntegrityError", "BaseMismatchError", "TornJournal", "InvalidJournal", "NoPatchError", "NoUpdatePathError",
    "TrainingError",
    "BudgetMissedError", "UserCodeError", "MissingDependencyError",
    "NnpatchIOError", "UsageError",
]
