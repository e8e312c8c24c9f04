"""Files nnpatch keeps beside a model (partial downloads, the update state, the undo journal and
its temporary file), opened so that what another user planted under their names is never
followed.

A model's folder may be shared (a board's storage, an app folder another process can write).
Whoever can write there can put a symbolic link, a hard link to another file, or a FIFO where
nnpatch will look for one of its own files. Every such file is opened here with ``O_NOFOLLOW``
(a symlink is refused by the kernel, not after a check that could race) and ``O_NONBLOCK`` (a
FIFO opens at once instead of waiting for a writer), and is used only when it is a regular file
with one link, owned by the user nnpatch runs as (SECURITY.md, "Files beside the model").
Anything else is discarded and created afresh where it holds nothing worth keeping (a partial
download, a temporary file), and refused with one line where discarding would lose something
(the state, a journal).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from .errors import NnpatchError, NnpatchIOError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: The undo journal beside ``MODEL``: ``MODEL.nnpatch-journal`` (and ``.tmp`` while it is written).
JOURNAL_SUFFIX = ".nnpatch-journal"


def journal_path(model: str | os.PathLike[str]) -> str:
    return os.fspath(model) + JOURNAL_SUFFIX


def interrupted(model: str | os.PathLike[str]) -> bool:
    """Whether a committed undo journal lies beside ``model``: an in-place update of it was
    interrupted, and its bytes are neither the old version nor the new one until it is recovered.
    (Standard library only, so that ``hash`` can ask without loading the applier.)"""
    return os.path.lexists(journal_path(model))


def why_not_own(st: os.stat_result) -> str | None:
    """Why a file with status ``st`` is not one nnpatch may reuse, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} links (a hard link to another file)"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"belongs to another user (uid {st.st_uid})"
    return None


def open_beside(path: str, *, write: bool, create: bool, refuse: type[NnpatchError] | None = None,
                what: str = "file") -> int | None:
    """Open ``path``, a file nnpatch keeps beside a model; returns a file descriptor (blocking mode,
    close-on-exec), or None when it does not exist and ``create`` is false.

    A file that is not nnpatch's own (see :func:`why_not_own`, or a symbolic link) is replaced by a
    new empty file when ``refuse`` is None (``create`` must then be true), else refused: ``refuse``
    is raised with one line naming ``path`` and the reason, and the file is left as it is.
    """
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
    for _ in range(3):  # a file that appears or vanishes between the calls: look again
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            if not create:
                return None
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o600)
            except FileExistsError:
                continue
            except OSError as e:
                raise NnpatchIOError(f"{path}: cannot create the {what}: {e.strerror or e}") from e
            return fd
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EACCES, errno.EPERM):
                raise NnpatchIOError(f"{path}: cannot open the {what}: {e.strerror or e}") from e
            why = {errno.ELOOP: "is a symbolic link", errno.ENXIO: "is not a regular file",
                   errno.EISDIR: "is a directory"}.get(e.errno, f"cannot be opened ({e.strerror})")
            _discard(path, why, refuse, what)
            continue
        try:
            why = why_not_own(os.fstat(fd))
        except OSError as e:
            os.close(fd)
            raise NnpatchIOError(f"{path}: cannot read the {what}: {e.strerror or e}") from e
        if why is None:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return fd
        os.close(fd)
        _discard(path, why, refuse, what)
    raise NnpatchIOError(f"{path}: the {what} keeps changing under nnpatch; is another process writing it?")


def _discard(path: str, why: str, refuse: type[NnpatchError] | None, what: str) -> None:
    if refuse is not None:
        raise refuse(f"{path}: the {what} {why}; nnpatch neither follows nor reuses it (see SECURITY.md, "
                     "\"Files beside the model\")")
    try:
        os.unlink(path)  # the name only: a link's target, or a hard link's other name, is left alone
    except FileNotFoundError:
        pass
    except OSError as e:
        raise NnpatchIOError(f"{path}: the {what} {why}, and it cannot be removed: {e.strerror or e}") from e


def same_file(path: str, fd: int) -> bool:
    """Whether ``path`` still names the regular file open as ``fd`` (not something swapped in since)."""
    with contextlib.suppress(OSError):
        a, b = os.lstat(path), os.fstat(fd)
        return stat.S_ISREG(a.st_mode) and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    return False


#: The tag in the names of staging files: ``.NAME.nnpatch-staged-PID.XXXXXXXX.tmp`` (atomic writes,
#: Python and the native engine) and ``NAME.nnpatch-staged-PID`` (the native extents apply).
STAGED_TAG = ".nnpatch-staged-"


def staging_prefix(path: str) -> str:
    """The prefix of a new staging file for ``path``: hidden, named after it and after this process,
    so a later run (either implementation) can tell a killed run's leftover from a live one."""
    return "." + os.path.basename(path) + STAGED_TAG + str(os.getpid()) + "."


def _stale_staging(name: str, base: str) -> bool:
    # a hidden name may carry more than one leading dot: the staging file of a staging file
    # (a target built as safetensors beside the output, then written atomically) names its parent
    lead, tag, rest = name.partition(base + STAGED_TAG)
    if not tag or lead.strip("."):
        return False
    hidden = bool(lead)
    pid, dot, tail = rest.partition(".")
    if not pid.isascii() or not pid.isdigit() or int(pid) <= 0 or pid != str(int(pid)):
        return False
    if hidden != bool(dot) or (hidden and (len(tail) <= 4 or not tail.endswith(".tmp"))):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True  # its process is gone
    except (OSError, OverflowError):
        return False  # EPERM: another user's live process
    return False


def remove_stale_staging(path: str | os.PathLike[str]) -> int:
    """Remove the staging files of ``path`` left by runs that were killed (their process no longer
    exists): a model-sized leftover each. Best effort (a folder that cannot be listed keeps its
    files); the same rule as the native ``remove_stale_staging`` (native/src/recover.c), so either
    implementation sweeps the other's. Returns how many were removed."""
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if STAGED_TAG in name and _stale_staging(name, base):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
                removed += 1
    return removed


__all__ = ["STAGED_TAG", "open_beside", "remove_stale_staging", "same_file", "staging_prefix", "why_not_own"]
