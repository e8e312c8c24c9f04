"""Apply a patch to a model in place, surviving a crash at any moment.

For same-shape, same-dtype updates every offset stays fixed, so only the
changed rows are written (``nnpatch apply --in-place MODEL PATCH``):

1. take an exclusive ``flock`` on the model; a second nnpatch on the same
   file fails at once with a clear message (it does not wait);
2. if an undo journal is beside the model, roll the model back first;
3. check the base (every tensor hashed, as ``apply`` does) while the undo
   journal (the old bytes of every row about to be written, and what
   identifies base and target) is written, fsynced and renamed into place,
   and the directory fsynced;
4. write the new rows through a memory map, flush, fsync;
5. verify the touched tensors (and the target model digest), then remove the
   journal and fsync the directory.

A crash before step 3 ends leaves no journal (or a ``.tmp`` one, discarded)
and an untouched model; a crash after it leaves a journal, and the next
``nnpatch apply --in-place`` or ``nnpatch recover`` rolls back, once the whole journal is
validated (spec/JOURNAL.md, Trust; a journal that fails is kept and nothing is written): the old bytes go back,
are fsynced, checked against the base digests, and the journal is removed.
The model is then exactly OLD; after step 5 it is exactly NEW.

Updates that change the layout (added, removed, retyped or reshaped
tensors, or a different safetensors header) fall back to write-new-then-
rename, which needs room for a second copy and fails cleanly without it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Callable

import blake3
import numpy as np

from .. import codecs, kernel
from ..atomic import fsync_dir
from ..errors import BaseMismatchError, IntegrityError, NnpatchIOError, PatchFormatError, TornJournal, UsageError
from ..hashing import digest_bytes, digests_equal, model_digest_of
from ..patchfile import Patch
from ..sidefile import remove_stale_staging
from ..weights import SafetensorsFile
from ..weights.extents import encode_table, skeleton_of
from ..weights.safetensors_file import TensorInfo
from ..weights.source import open_source
from . import targets
from .decode import decode_index, row_bytes, run_step, undo_esort
from .engine import proven_model, require_target_model, workers
from .journal import EXTENTS_MINOR, MAX_TABLE, VERSION, Entry, Journal, JournalWriter, journal_path, read_journal
from .plan import Item, Plan, plan_forward
from .policy import ApplyResult, ProgressFn, Verify

HookFn = Callable[[str], None]


class SimulatedCrash(BaseException):
    """Raised by a test hook to stop an in-place apply dead, skipping every cleanup."""


@contextlib.contextmanager
def locked(model: str):
    """Exclusive flock on ``model``; fails at once when another process holds it."""
    try:  # a model directory is locked through its directory's descriptor
        fd = os.open(model, os.O_RDONLY if os.path.isdir(model) else os.O_RDWR)
    except OSError as e:
        raise NnpatchIOError(f"{model}: cannot open for writing: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NnpatchIOError(f"{model}: locked: another nnpatch is updating this model; "
                                 "try again when it has finished") from None
        st = os.fstat(fd)
        try:
            now = os.stat(model)
        except OSError:
            now = None
        if now is None or (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
            raise NnpatchIOError(f"{model}: replaced while waiting for the lock; try again")
        yield fd
    finally:
        os.close(fd)  # releases the lock


# --- recovery ---------------------------------------------------------------------------

def recover(model: str | os.PathLike[str]) -> str | None:
    """Roll back an interrupted in-place apply. Returns what was done, or None when nothing was to do."""
    model = os.fspath(model)
    with locked(model) as fd:
        remove_stale_staging(model)  # under the lock no apply of this model runs
        return _recover_locked(model, fd)


def _recover_locked(model: str, fd: int) -> str | None:
    jpath = journal_path(model)
    directory = os.path.dirname(os.path.abspath(model))
    note = None
    if os.path.lexists(jpath + ".tmp"):  # never committed: the model was not written
        _unlink(jpath + ".tmp")
        fsync_dir(directory)
        note = "discarded an uncommitted journal; the model was not modified"
    if not os.path.lexists(jpath):
        return note
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{model}: not a file, so the undo journal {jpath} cannot be its; not touching either")
    try:
        j = read_journal(jpath, model_size=st.st_size)
    except TornJournal as e:
        # A journal reaches its final name only complete and fsynced, and the model is written only
        # after that: a torn one means the storage lost it, and the model was never written through it.
        _unlink(jpath)
        fsync_dir(directory)
        return f"discarded a damaged journal ({e}); the model was not modified through it"
    try:
        # Everything the journal says is checked before the first byte is written (spec/JOURNAL.md, Trust):
        # a journal is only ever trusted to put back bytes inside tensors of the model it names, and only
        # when the result is the base it names.
        j.check_model(model, fd, st.st_size)
        m = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_WRITE) if j.entries else None
        try:
            for e in j.entries:
                d = _rolled_back_digest(m, j, e)
                if not digests_equal(d, e.base_blake3):
                    raise IntegrityError(
                        f"{model}: the undo journal {jpath} does not roll tensor {e.name!r} back to its base "
                        f"(it would be BLAKE3 {d}, the journal expects {e.base_blake3}): the model changed since, "
                        "or the journal is not its; the journal is kept and the model was not written")
            for e in j.entries:
                if e.count == 0:
                    continue
                dst = np.frombuffer(m, np.uint8, e.nbytes, e.offset)
                kernel.scatter_rows(dst, e.unit, j.indices(e), j.data(e), 1, "replace", planar=False)
                del dst
            if m is not None:
                m.flush()
            os.fsync(fd)
            for e in j.entries:  # catches storage that did not keep what was written
                d = digest_bytes(np.frombuffer(m, np.uint8, e.nbytes, e.offset))
                if not digests_equal(d.hex(), e.base_blake3):
                    raise IntegrityError(f"{model}: rollback left tensor {e.name!r} different from the base "
                                         f"(BLAKE3 {d.hex()}, expected {e.base_blake3}); the "
                                         f"journal {jpath} is kept")
        finally:
            if m is not None:
                with contextlib.suppress(BufferError):
                    m.close()
    finally:
        j.close()
    _unlink(jpath)
    fsync_dir(directory)
    return "rolled back an interrupted in-place update; the model is as it was before it"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot remove: {e.strerror or e}") from e


def _rolled_back_digest(m: mmap.mmap, j: Journal, e: Entry) -> str:
    """The digest the tensor would have after the rollback, computed without writing: the model's bytes
    with the journal's units in place of theirs, a slice at a time (at most 16 MiB copied)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if e.nbytes == 0:
        return h.hexdigest()
    src = np.frombuffer(m, np.uint8, e.nbytes, e.offset)
    idx = j.indices(e) if e.count else np.empty(0, "<u8")
    old = j.data(e)
    per = max(1, (16 << 20) // e.unit)  # units per slice
    nunits = e.nbytes // e.unit
    buf = np.empty(min(per, nunits) * e.unit, np.uint8) if per > 1 else None
    for lo in range(0, nunits, per):
        hi = min(lo + per, nunits)
        a, b = np.searchsorted(idx, [lo, hi])
        if buf is None:  # units over 8 MiB (whole tensors): hash each from where it is, copying nothing
            h.update(memoryview(old[a * e.unit : (a + 1) * e.unit] if b > a else src[lo * e.unit : hi * e.unit]))
            continue
        part = buf[: (hi - lo) * e.unit]
        part[:] = src[lo * e.unit : hi * e.unit]
        if b > a:
            kernel.scatter_rows(part, e.unit, idx[a:b] - np.uint64(lo), old[a * e.unit : b * e.unit], 1,
                                "replace", planar=False)
        h.update(memoryview(part))
    return h.hexdigest()


def discard_uncommitted(model: str | os.PathLike[str]) -> bool:
    """Remove the temporary journal (``*.nnpatch-journal.tmp``) of an in-place apply that was killed
    before its journal was committed: the model was never written through it. Only when no other
    process holds the model's lock (a running apply is still writing that journal); True when removed.

    Every command that reads a model as a base calls it (through ``refuse_unfinished``), so a
    model-sized leftover does not wait for ``nnpatch recover``."""
    model = os.fspath(model)
    tmp = journal_path(model) + ".tmp"
    if not os.path.lexists(tmp):
        return False
    try:
        fd = os.open(model, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # another nnpatch is updating this model: its journal is live
        try:
            os.unlink(tmp)
        except OSError:
            return False
        fsync_dir(os.path.dirname(os.path.abspath(model)))
        return True
    finally:
        os.close(fd)  # releases the lock


def recover_if_needed(model: str | os.PathLike[str]) -> str | None:
    model = os.fspath(model)
    jp = journal_path(model)
    if os.path.exists(jp) or os.path.exists(jp + ".tmp"):
        return recover(model)
    return None


# --- in place ------------------------------------------------------------------------------

def _in_place_ok(plan: Plan, st: SafetensorsFile) -> bool:
    """Same safetensors header and size: every tensor keeps its name, dtype, shape and offset."""
    return plan.raw_layout == st.header_bytes and plan.size == st.size


class _Target:
    """The model an in-place apply writes: its tensors (name -> info with ``begin``, ``nbytes``, dtype and
    shape) where they lie in the file, their bytes (``raw``), the journal's ``model`` object that names it,
    the file digest the update must give, and the journal's minor version."""

    def __init__(self, src, ident: dict, file_digest: str, minor: int, tensors: dict | None = None) -> None:
        self.path, self.size, self.raw = src.path, ident["size"], src.raw
        self.tensors = src.tensors if tensors is None else tensors
        self.ident, self.file_digest, self.minor = ident, file_digest, minor


def _extents_in_place(src, p: Patch, plan: Plan) -> _Target | None:
    """An extents model (GGUF) is updated in place when the target keeps the base's extent table (every
    tensor's name, offset, size, row size and type, and the file's size) and its skeleton byte for byte
    (spec FORMAT.md 5.8): then only changed rows are written, behind the journal (1.1). None: a new file."""
    gm = getattr(src, "model", None)  # the GgufModel under the source's safetensors surface
    extents = getattr(gm, "extents", None)
    if extents is None:
        return None
    # a skeleton delta (1.5) is decoded against the model's own skeleton, once its digest is the base's
    target, skeleton = targets.extents_plan([p], {i.info.name: i.info for i in plan.items}, src.path)
    out = p.header.target.outputs[0]
    table = encode_table(out.size, target)
    if out.size != src.size or len(table) > MAX_TABLE or table != encode_table(src.size, extents):
        return None
    if skeleton_of(gm.data(), extents) != skeleton:
        return None
    by_name = {e.name: e for e in extents}
    tensors = {}
    for n, t in src.tensors.items():
        e = by_name[n]
        tensors[n] = TensorInfo(n, t.dtype, tuple(t.shape), e.offset, e.end)
    for item in plan.items:  # the items' offsets are those of the target's safetensors rendering: the file's here
        e = by_name[item.info.name]
        item.info = TensorInfo(item.info.name, item.info.dtype, tuple(item.info.shape), e.offset, e.end)
    ident = {"size": src.size, "extents": table.hex(),
             "skeleton_blake3": blake3.blake3(skeleton, max_threads=blake3.blake3.AUTO).hexdigest()}
    return _Target(src, ident, out.blake3, EXTENTS_MINOR, tensors)


def _entries(plan: Plan, st: SafetensorsFile) -> list[tuple[Entry, Item]]:
    out = []
    for item in plan.items:
        if not item.touched:
            continue
        step = item.fill or item.steps[0]
        op = step.op
        info = item.info
        if op.kind in ("rows", "qrows", "elements") and item.fill is None:  # qrows journals its rows, as the native applier does
            unit, count = row_bytes(op, info), op.count
        else:
            unit, count = info.nbytes, 1 if info.nbytes else 0
        out.append((Entry(info.name, info.begin, info.nbytes, unit, count, op.base.blake3, item.expect), item))
    return out


def update_in_place(model: str, p: Patch, verify: Verify, progress: ProgressFn, hook: HookFn) -> ApplyResult:
    """Apply the open patch ``p`` to ``model`` in place (see the module docstring for the guarantees)."""
    if p.header.target.is_directory != os.path.isdir(model):
        makes = "a model directory" if p.header.target.is_directory else "a single file"
        this = "directory" if os.path.isdir(model) else "file"
        raise UsageError(f"{model}: the patch makes {makes}, so it cannot update this {this} in place; "
                         "write the result with -o")
    with contextlib.ExitStack() as stack:
        fd = stack.enter_context(locked(model))
        hook("locked")
        if p.header.target.format == "safetensors":
            _recover_locked(model, fd)
            st = stack.enter_context(SafetensorsFile(model))
            plan = plan_forward(st, [p])
            if _in_place_ok(plan, st):
                ident = {"size": st.size, "header_len": len(st.header_bytes),
                         "header_blake3": blake3.blake3(st.header_bytes).hexdigest()}
                return _apply_locked(model, fd, _Target(st, ident, plan.output_file, VERSION[1]), p, plan, verify,
                                     progress, hook)
            src = st  # the layout changes: a new file is written beside and renamed over the model
        elif p.header.target.format == "extents":
            _recover_locked(model, fd)
            src = stack.enter_context(open_source(model))
            plan = plan_forward(src, [p])
            target = _extents_in_place(src, p, plan)
            if target is not None:
                return _apply_locked(model, fd, target, p, plan, verify, progress, hook)
        else:
            # a directory is swapped in atomically; PyTorch and ONNX are written back in their own format
            src = stack.enter_context(open_source(model))
            plan = plan_forward(src, [p])
        return targets.build(plan, src, model, verify, progress, p, replace=True)


def _apply_locked(model: str, fd: int, st: _Target, p: Patch, plan: Plan, verify: Verify,
                  progress: ProgressFn, hook: HookFn) -> ApplyResult:
    jpath = journal_path(model)
    hash_all = verify.whole_base
    entries = _entries(plan, st)
    meta = {
        "model": st.ident,
        "base": {"blake3": p.header.base.blake3, "model_blake3": p.header.base.model_blake3},
        "target": {"blake3": p.header.target.blake3, "model_blake3": p.header.target.model_blake3},
        "patch": p.trailer_hash,
        "created_by": "nnpatch",
    }
    hashed = 0
    with cf.ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="nnpatch-inplace") as pool:
        # 1. hash the base while the journal is written
        names = [n for n in st.tensors if hash_all or plan.input_expect.get(n) is not None]
        names.sort(key=lambda n: st.tensors[n].begin)
        futures = {n: pool.submit(lambda n=n: digest_bytes(st.raw(n))) for n in names}
        writer = JournalWriter(jpath, meta, [e for e, _ in entries], st.minor)
        try:
            _write_journal(writer, st, entries)
        except BaseException:
            writer.abort()
            for f in futures.values():
                f.cancel()
            raise
        digests = {}
        try:
            for n, f in futures.items():
                digests[n] = f.result()
                hashed += st.tensors[n].nbytes
            _check_base(st, plan, digests, hash_all)
        except BaseException:
            writer.abort()
            raise
        writer.commit()
        hook("journal")
        # 2. write the new rows, 3. verify them
        m = None
        try:
            m = mmap.mmap(fd, st.size, access=mmap.ACCESS_WRITE)
            finals = {}

            def write_one(item: Item) -> bytes:
                info = item.info
                if item.fill is None and len(item.steps) == 1 and item.steps[0].op.kind == "rows":
                    _write_rows(fd, m, item)
                    return info.name
                dst = np.frombuffer(m, np.uint8, info.nbytes, info.begin)
                if item.fill is not None:
                    run_step(item.fill, info, dst)
                for step in item.steps:
                    run_step(step, info, dst)
                return info.name

            todo = [item for _, item in entries]
            for fut in cf.as_completed([pool.submit(write_one, it) for it in todo]):
                name = fut.result()
                hook("write:" + name)
                progress(st.tensors[name].nbytes)
            m.flush()
            os.fsync(fd)
            hook("synced")
            for item, d in zip(todo, pool.map(lambda it: digest_bytes(
                    np.frombuffer(m, np.uint8, it.info.nbytes, it.info.begin)), todo)):
                finals[item.info.name] = d
                hashed += item.info.nbytes
                if not digests_equal(d.hex(), item.expect):
                    raise IntegrityError(
                        f"tensor {item.info.name!r}: result does not match the patch's target (BLAKE3 "
                        f"{d.hex()}, expected {item.expect})", what=item.info.name,
                        expected=item.expect, actual=d.hex())
            if hash_all:
                require_target_model(plan, finals, digests)
            digest = None  # proven (and reported) only when the file is hashed again
            if verify.rehash_output:
                h = blake3.blake3(max_threads=blake3.blake3.AUTO)
                h.update(m)
                digest = h.hexdigest()
                hashed += st.size
                if not digests_equal(digest, st.file_digest):
                    raise IntegrityError(f"{model}: result does not match the patch's target (BLAKE3 "
                                         f"{digest}, expected {st.file_digest})")
            hook("verified")
        except SimulatedCrash:
            raise
        except BaseException:
            if m is not None:
                with contextlib.suppress(BufferError):
                    m.close()
                m = None
            _recover_locked(model, fd)  # put the old bytes back; the model is OLD again
            raise
        finally:
            if m is not None:
                with contextlib.suppress(BufferError):
                    m.close()
    os.unlink(jpath)
    fsync_dir(os.path.dirname(os.path.abspath(model)))
    hook("done")
    return ApplyResult(model, st.size, digest, plan.ops, verify.mode, hashed, model_blake3=proven_model(plan, verify))


def _write_rows(fd: int, m: mmap.mmap, item: Item) -> None:
    """Write a rows op with pwrite, run by run of adjacent rows.

    Writing through the shared map would dirty (and write back) whole page-cache folios, which are large
    on current kernels (a 4 KiB row in a 2 MiB folio rewrites 2 MiB); pwrite marks only the blocks it
    covers, so storage sees little more than the changed rows.
    """
    step = item.steps[0]
    op, info = step.op, item.info
    width = info.itemsize
    unit = row_bytes(op, info)
    idx = decode_index(step, info)
    src = np.frombuffer(m, np.uint8, info.nbytes, info.begin)
    per = codecs.chunk_units(unit // width)
    sizes = codecs.value_chunk_sizes(op.count, unit, unit // width)
    where = f"{op.name!r}.values"
    planar = "planes" in op.values.codec
    try:
        for i, chunk in enumerate(codecs.decoded_chunks(step.patch.section(op.values), op.values.codec, op.values.size,
                                                 sizes, where=where)):
            sel = idx[i * per : (i + 1) * per]
            rows = kernel.gather_rows(src, unit, sel)
            if "esort" in op.values.codec:
                chunk = undo_esort(chunk, rows, info, planar)
            kernel.combine(rows, chunk, width, step.mode, planar=planar)
            cut = np.flatnonzero(np.diff(sel) != 1) + 1
            starts = [0, *cut.tolist()]
            ends = [*cut.tolist(), len(sel)]
            for a, b in zip(starts, ends):
                data = memoryview(rows)[a * unit : b * unit]
                off = info.begin + int(sel[a]) * unit
                while data:
                    k = os.pwrite(fd, data, off)
                    data, off = data[k:], off + k
    except PatchFormatError as e:
        if e.path is None:
            raise PatchFormatError(str(e), path=step.patch.path) from e
        raise
    except ValueError as e:
        raise PatchFormatError(f"{where}: {e}", path=step.patch.path) from e


def _write_journal(writer: JournalWriter, st: _Target, entries: list[tuple[Entry, Item]]) -> None:
    for e, item in entries:
        info = item.info
        if e.count == 0:
            writer.write(b"")
            writer.write(b"")
            continue
        src = st.raw(info.name)
        if e.unit == info.nbytes and e.count == 1:
            writer.write(np.zeros(1, "<u8"))
            for off in range(0, info.nbytes, 16 << 20):
                writer.write_part(src[off : off + (16 << 20)])
            writer.end_part()
            continue
        idx = decode_index(item.steps[0], info)
        writer.write(idx.astype("<u8", copy=False))
        per = max(1, (16 << 20) // e.unit)
        buf = np.empty(per * e.unit, np.uint8)
        for lo in range(0, e.count, per):
            sel = idx[lo : lo + per]
            try:
                out = kernel.gather_rows(src, e.unit, sel, out=buf[: len(sel) * e.unit])
            except ValueError as err:
                raise PatchFormatError(f"{info.name!r}.index: {err}", path=item.steps[0].patch.path) from err
            writer.write_part(out)
        writer.end_part()


def _check_base(st: _Target, plan: Plan, digests: dict, hash_all: bool) -> None:
    for name, want in plan.input_expect.items():
        if want is not None and not digests_equal(digests[name].hex(), want):
            raise BaseMismatchError(
                f"{st.path}: wrong base: tensor {name!r} differs from the patch's base (BLAKE3 "
                f"{digests[name].hex()}, expected {want})", what=name, expected=want,
                actual=digests[name].hex())
    if hash_all:
        got = model_digest_of(st.tensors, digests).hex()
        if not digests_equal(got, plan.input_model):
            raise BaseMismatchError(
                f"{st.path}: wrong base: tensor contents differ from the patch's base (model BLAKE3 "
                f"{got}, expected {plan.input_model})", what="base", expected=plan.input_model,
                actual=got)


__all__ = ["SimulatedCrash", "locked", "recover", "recover_if_needed", "update_in_place"]
