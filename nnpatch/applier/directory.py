"""Model directories as targets (format 1.1): build every file of the new
directory beside the destination, then commit it with one rename.

A directory cannot be replaced by ``rename`` the way a file can, so:

* a new destination (or an empty directory) is replaced by ``rename(2)``,
  which is atomic: readers see no directory or the whole new one;
* an existing model directory (``apply --in-place``) is swapped with the new
  one by ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+; atomic: readers see
  the old directory or the new one, never a mix), and the old one, now under
  the temporary name, is deleted. Where the exchange is not available the
  old directory is first renamed aside (``.NAME.*.nnpatch-old``), so a crash
  in between leaves the old model under that name, never a half-written one.

The temporary directory is ``.NAME.*.nnpatch-tmp`` beside the destination; a
crash before the commit leaves it behind (it is safe to delete). ``.git``
and ``.cache`` inside a model directory updated in place are not part of
the model: they are moved into the new directory.

Unchanged files (copies) are copied by the kernel (``copy_file_range``:
reflinks on copy-on-write file systems), not hard-linked: a hard link would
tie the two versions together, so that an in-place update of one changed
the other.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile

import blake3

from .. import codecs
from ..atomic import fsync_dir, umask, write_error
from ..errors import BaseMismatchError, IntegrityError, NnpatchError, NnpatchIOError, UsageError
from ..hashing import digests_equal, hash_file
from ..weights.model import SKIPPED_DIRS
from ..hashing import directory_digest
from .engine import execute, proven_model
from .oscopy import allocate
from .plan import OutFile, Plan
from .policy import ApplyResult, ProgressFn, Verify

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_BLOB_PIECE = 8 << 20


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def exchange(a: str, b: str) -> bool:
    """Atomically swap the names ``a`` and ``b``; False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: no exchange on this file system
        return False
    raise OSError(err, os.strerror(err), a)


def check_destination(output: str, *, replace: bool) -> None:
    """A directory target goes to a new path, an empty directory, or (in place) a model directory."""
    if not os.path.lexists(output):
        return
    if os.path.islink(output) or not os.path.isdir(output):
        raise UsageError(f"{output}: exists and is not a directory (this patch's target is a model directory)")
    if not replace and os.listdir(output):
        raise UsageError(f"{output}: directory exists and is not empty; give a new path, or update a model "
                         "directory with `nnpatch apply --in-place`")


def build_directory(plan: Plan, inp, output: str, verify: Verify, progress: ProgressFn, *,
                    replace: bool = False) -> ApplyResult:
    """Build the directory ``plan`` describes into a temporary directory, prove it, and commit it at ``output``."""
    output = os.fspath(output)
    check_destination(output, replace=replace)
    parent = os.path.dirname(os.path.abspath(output))
    try:
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(output)) + ".", suffix=".nnpatch-tmp",
                               dir=parent)
    except OSError as e:
        raise NnpatchIOError(f"{output}: cannot write: {e.strerror or e}") from e
    fds: list[int] = []
    maps: list = []
    try:
        try:
            os.chmod(tmp, (os.stat(output).st_mode & 0o7777) if replace and os.path.isdir(output)
                     else 0o777 & ~umask())
            outs = []
            for f in plan.files:
                full = os.path.join(tmp, *f.path.split("/"))
                os.makedirs(os.path.dirname(full), exist_ok=True)
                fd = os.open(full, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
                fds.append(fd)
                if f.kind == "safetensors":
                    m = allocate(fd, f.size)
                    if m is not None:
                        maps.append(m)
                    outs.append((fd, m))
                else:
                    outs.append(None)
            digest, hashed, rehashed = execute(plan, inp, outs, verify, progress, "wrong base")
            digests = {}
            for i, (f, fd) in enumerate(zip(plan.files, fds)):
                if f.kind == "blob":
                    digests[i] = _write_blob(f, fd)
                elif f.kind == "copy":
                    digests[i] = _write_copy(f, fd, check=verify.whole_base)
                    hashed += f.size if verify.whole_base else 0
                progress(f.size if f.kind != "safetensors" else 0)
            if verify.rehash_output:
                digests.update(rehashed)
                got = directory_digest((f.path, digests[i]) for i, f in enumerate(plan.files))
                if not digests_equal(got, plan.output_file):
                    raise IntegrityError(f"{output}: the directory written does not match the patch's target "
                                         f"(directory BLAKE3 {got}, expected {plan.output_file})", what="target",
                                         expected=plan.output_file, actual=got)
                digest = got
            for m in maps:
                m.flush()
            for fd in fds:
                os.fsync(fd)
        finally:
            for m in maps:
                with contextlib.suppress(BufferError):
                    m.close()
            for fd in fds:
                os.close(fd)
        _fsync_tree(tmp)
        old = _commit(tmp, output, replace)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, NnpatchError):
            raise write_error(output, e, what="the new model directory (built beside it, then renamed into place)",
                              needed=sum(f.size for f in plan.files)) from e
        raise
    if old is not None:  # committed: the old model directory is now under a temporary name
        _carry_over(old, output)
        shutil.rmtree(old, ignore_errors=True)
    return ApplyResult(output, plan.size, digest, plan.ops, verify.mode, hashed, plan.links,
                       proven_model(plan, verify))


def _write_blob(f: OutFile, fd: int) -> str:
    """Decode a file carried whole; its digest must be the one the patch gives."""
    s = f.content
    h = blake3.blake3()
    for chunk in codecs.decoded_chunks(f.patch.section(s), s.codec, s.size, codecs.piece_sizes(s.size, _BLOB_PIECE),
                                       where=f"file {f.path!r}"):
        h.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
    got = h.hexdigest()
    if not digests_equal(got, f.blake3):
        raise IntegrityError(f"{f.patch.path}: file {f.path!r} carried by the patch does not match its digest "
                             f"(BLAKE3 {got}, expected {f.blake3})", what=f.path, expected=f.blake3, actual=got)
    return got


def _write_copy(f: OutFile, fd: int, *, check: bool) -> str:
    """Copy an unchanged file from the base directory, which must hold the bytes the patch names."""
    if check:
        got = hash_file(f.source)
        if not digests_equal(got, f.blake3):
            raise BaseMismatchError(f"{f.source}: wrong base: file differs from the patch's base (BLAKE3 {got}, "
                                    f"expected {f.blake3})", what=f.path, expected=f.blake3, actual=got)
    with open(f.source, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        if size != f.size:
            raise BaseMismatchError(f"{f.source}: wrong base: file is {size} bytes, the patch's base has {f.size}")
        done = 0
        with contextlib.suppress(OSError):
            while done < size:
                n = os.copy_file_range(src.fileno(), fd, size - done, done, done)
                if n <= 0:
                    break
                done += n
        src.seek(done)
        os.lseek(fd, done, os.SEEK_SET)
        while done < size:
            buf = src.read(min(_BLOB_PIECE, size - done))
            if not buf:
                raise NnpatchIOError(f"{f.source}: file shrank while it was being copied")
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view):]
            done += len(buf)
    return f.blake3


def _fsync_tree(root: str) -> None:
    for dirpath, _, _ in os.walk(root, topdown=False):
        fsync_dir(dirpath)


def _commit(tmp: str, output: str, replace: bool) -> str | None:
    """Put ``tmp`` at ``output``; returns where the replaced directory went (None: nothing replaced).

    Raises with ``output`` as it was: the caller may then delete ``tmp``."""
    parent = os.path.dirname(os.path.abspath(output))
    if not (replace and os.path.isdir(output) and os.listdir(output)):
        os.rename(tmp, output)  # a missing or empty destination: atomic on POSIX
        fsync_dir(parent)
        return None
    if exchange(tmp, output):
        fsync_dir(parent)
        return tmp
    old = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(output)) + ".", suffix=".nnpatch-old",
                           dir=parent)
    os.rmdir(old)
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        raise
    fsync_dir(parent)
    return old


def _carry_over(old: str, new: str) -> None:
    """Move what is not part of the model (``.git``, ``.cache``) from the replaced directory to the new one."""
    for name in sorted(SKIPPED_DIRS):
        src = os.path.join(old, name)
        if os.path.isdir(src) and not os.path.lexists(os.path.join(new, name)):
            os.rename(src, os.path.join(new, name))
    fsync_dir(new)
