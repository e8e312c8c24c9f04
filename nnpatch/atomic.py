"""Crash-safe file replacement: write a temporary file beside the target,
fsync it, rename it over the target, fsync the directory.

Readers see the old file or the new one, never a mix, and a failure at any
point leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from .errors import NnpatchIOError
from .sidefile import open_beside, remove_stale_staging, same_file, staging_prefix

#: The errors that mean "the file system is full" (EDQUOT: the user's quota is).
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


#: fsync of a directory failing with these means the file system cannot sync directories at all
#: (its entries are as durable as it makes them): nothing to report
_DIR_SYNC_UNSUPPORTED = {errno.EINVAL, errno.EBADF, getattr(errno, "ENOTSUP", errno.EINVAL),
                         getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


def fsync_dir(path: str, *, strict: bool = False) -> None:
    """Make the entries of directory ``path`` durable (a rename into it, an unlink).  Best effort, unless
    ``strict``: then a failure other than a file system that cannot sync directories is raised (an
    ``OSError``), for a commit point that later writes rely on."""
    try:
        fd = os.open(path or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some file systems cannot open directories; nothing to sync then
    try:
        os.fsync(fd)
    except OSError as e:
        if strict and e.errno not in _DIR_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _temporary_beside(path: str, suffix: str) -> tuple[int, str]:
    """A new, empty temporary file in ``path``'s directory, named after it and this process (hidden,
    so tools skip it), open as the returned descriptor (``mkstemp``: O_EXCL, so never through a
    planted symlink). The leftovers of killed runs for the same ``path`` are removed first: each is
    as large as what it staged, and nothing else would ever remove it."""
    remove_stale_staging(path)
    return tempfile.mkstemp(prefix=staging_prefix(path), suffix=suffix,
                            dir=os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def _atomic(path: str, suffix: str, mode: int | None, *, by_name: bool) -> Iterator[tuple[int, str]]:
    """(descriptor, name) of a temporary file beside ``path``; on clean exit fsynced and renamed
    over ``path``, on any failure removed. ``by_name``: the caller's writer opens the name itself
    (``torch.save`` may replace the file), so the file renamed is whatever regular file of this
    user with one link the name holds then, opened again without following a link."""
    fd, tmp = _temporary_beside(path, suffix)
    try:
        yield fd, tmp
        if by_name:
            os.close(fd)
            fd = -1
            again = open_beside(tmp, write=False, create=False, refuse=NnpatchIOError, what="temporary file")
            if again is None:
                raise NnpatchIOError(f"{tmp}: the temporary file vanished; nothing was committed at {path}")
            fd = again
        # the name must still be the file written: one swapped in by another user of the folder
        # (a symlink, another file) is never renamed over ``path``
        if not same_file(tmp, fd):
            raise NnpatchIOError(f"{tmp}: the temporary file was replaced while nnpatch wrote it; nothing was "
                                 f"committed at {path}")
        os.fsync(fd)
        if mode is not None:
            os.fchmod(fd, mode & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if os.path.islink(tmp) or (fd >= 0 and same_file(tmp, fd)):
                os.unlink(tmp)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = ".tmp", mode: int | None = 0o644) -> Iterator[str]:
    """Yield the name of a temporary file beside ``path`` for a writer that
    takes a path (``torch.save``, a staging file); on clean exit it is fsynced
    and renamed over ``path``, on any failure removed. ``mode=None`` keeps the
    temporary file's own mode (0600)."""
    with _atomic(os.fspath(path), suffix, mode, by_name=True) as (_, tmp):
        yield tmp


@contextlib.contextmanager
def temporary_path(near: str | os.PathLike[str], *, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary file name beside ``near`` that is always removed on exit
    (staging files that are read back and never committed)."""
    fd, tmp = _temporary_beside(os.fspath(near), suffix)
    os.close(fd)
    try:
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file object; on clean exit it replaces ``path`` atomically."""
    with _atomic(os.fspath(path), ".tmp", mode, by_name=False) as (fd, _), os.fdopen(os.dup(fd), "r+b") as f:
        yield f  # written through the descriptor made with O_EXCL, never through the name again
        f.flush()


def free_space(path: str) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding ``path`` (or its
    nearest existing parent); None where that cannot be told."""
    path = os.path.abspath(path)
    while True:
        try:
            st = os.statvfs(path)
            return st.f_bavail * st.f_frsize
        except OSError:
            parent = os.path.dirname(path)
            if parent == path:
                return None
            path = parent


def amount(n: int) -> str:
    """Bytes for a message: exact, and in MiB or GiB once that reads better."""
    if n >= 1 << 30:
        return f"{n} bytes ({n / (1 << 30):.1f} GiB)"
    if n >= 1 << 20:
        return f"{n} bytes ({n / (1 << 20):.1f} MiB)"
    return f"{n} bytes"


def write_error(path: str, e: OSError, *, what: str, needed: int | None = None) -> NnpatchIOError:
    """The one-line error for ``e``, raised while writing ``what`` at ``path``. On a full disk it
    says what was being written, about how much it needs and how much is free (README, "Disk space")."""
    if e.errno not in _FULL:
        return NnpatchIOError(f"{path}: cannot write: {e.strerror or e}")
    free = free_space(os.path.dirname(os.path.abspath(path)))
    need = f"it needs about {amount(needed)}, " if needed is not None else ""
    have = f"{amount(free)} free there" if free is not None else "the free space is unknown"
    return NnpatchIOError(f"{path}: {e.strerror or os.strerror(e.errno)} writing {what}: {need}{have}")


def umask() -> int:
    """The process's umask (read without changing it for longer than a moment)."""
    current = os.umask(0)
    os.umask(current)
    return current
