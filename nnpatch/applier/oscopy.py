"""Operating-system helpers of the engine: kernel-side copies between files
(``copy_file_range``), early write-back (``sync_file_range``) and output
files reserved and mapped before they are filled."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np

from ..errors import NnpatchIOError


#: Whether copy_file_range is usable here (cleared after the first refusal).
_use_copy_file_range = hasattr(os, "copy_file_range")


# --- copying ------------------------------------------------------------------------------

_CFR_FALLBACK = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM,
                 errno.ETXTBSY, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, n: int, src_map, dst_map) -> None:
    """Copy ``n`` bytes between files: copy_file_range, else numpy between the maps."""
    global _use_copy_file_range
    while n > 0 and _use_copy_file_range:
        try:
            k = os.copy_file_range(src_fd, dst_fd, n, src_off, dst_off)
        except OSError as e:
            if e.errno in _CFR_FALLBACK:
                _use_copy_file_range = False
                break
            raise
        if k <= 0:
            raise NnpatchIOError("base file shrank while it was being read")
        src_off += k
        dst_off += k
        n -= k
    while n > 0:
        step = min(n, 16 << 20)
        np.copyto(np.frombuffer(dst_map, np.uint8, step, dst_off), np.frombuffer(src_map, np.uint8, step, src_off))
        src_off += step
        dst_off += step
        n -= step


def _load_sync_file_range():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range() if os.environ.get("NNPATCH_WRITEBEHIND", "1") != "0" else None


def start_writeback(fd: int, off: int, n: int) -> None:
    """Ask the kernel to start writing a finished range now (overlaps the final fsync with work)."""
    if _sync_file_range is not None and n >= 1 << 20:
        _sync_file_range(fd, off, n, 2)  # SYNC_FILE_RANGE_WRITE; errors are harmless here


def allocate(fd: int, size: int):
    """Reserve ``size`` bytes for an output file (ENOSPC now, not SIGBUS later) and map it."""
    if not size:
        return None
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)
    return mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
