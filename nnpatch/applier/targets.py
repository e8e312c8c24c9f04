"""The one place that decides how a target is written, by its kind:

* ``safetensors``: the engine builds the file beside the destination and
  renames it there (:func:`~nnpatch.applier.engine.build_file`);
* ``safetensors-dir``: a model directory built beside the destination and
  committed by one rename or an atomic exchange (:mod:`.directory`);
* ``pytorch``: the tensors staged as safetensors, written back with
  ``torch.save`` and proven by the model digest;
* ``onnx``: the tensors put back into the patch's skeleton, every file proven
  by its digest before it is written;
* ``extents`` (GGUF, TFLite): the tensors put back at their extents between the
  skeleton's bytes, the file proven by its digest before it is renamed in.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

from .. import codecs
from ..atomic import atomic_path, atomic_write, temporary_path, umask, write_error
from ..errors import IntegrityError, NnpatchError, NnpatchIOError, PatchFormatError, WeightsError
from ..hashing import canonical_order, digest_bytes, digests_equal, hash_file
from ..patchfile import Patch
from ..weights import SafetensorsFile
from ..patchfile.reader import check_relative_path
from ..weights.onnx_file import (GAP_ALLOWANCE, MAX_ONNX_SIZE, Skeleton, check_skeleton_fits,
                                  read_skeleton, rebuild_external, rebuild_onnx)
from ..weights.extents import check_fits, decode_table, join, skeleton_size
from ..weights.sniff import open_model
from ..weights.torch_file import save_torch_state
from .directory import build_directory
from .engine import build_file
from .plan import Plan
from .policy import ApplyResult, ProgressFn, Verify
from .skeleton import check_skeleton_frame, target_skeleton


def build(plan: Plan, src, output: str, verify: Verify, progress: ProgressFn, patch: Patch, *,
          replace: bool = False, links: list[Patch] | None = None) -> ApplyResult:
    """Write the target of ``plan`` (made by ``patch``, the chain's last link) at ``output``.

    ``replace``: ``output`` is an existing model directory that the new one
    replaces (``apply --in-place``, ``update``); files are always replaced
    atomically.
    """
    kind = patch.header.target.format
    if kind == "safetensors-dir":
        return build_directory(plan, src, output, verify, progress, replace=replace)
    if kind == "pytorch":
        return _build_torch(plan, src, output, verify, progress, patch.header.target.model_blake3)
    if kind == "onnx":
        return _build_onnx(plan, src, output, verify, progress, patch, replace=replace)
    if kind == "extents":
        return _build_extents(plan, src, output, verify, progress, links or [patch], replace=replace)
    mode = _mode_of(output) if replace else None
    return build_file(plan, src, output, verify, progress, mode=mode)


def _mode_of(path: str) -> int | None:
    """The permissions a replaced file hands on to its successor (None: there is none)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _staged(plan: Plan, b, output: str, verify: Verify, progress: ProgressFn):
    """Build the target's tensors as a safetensors file beside ``output`` (proven as
    any apply is); yields (ApplyResult, open SafetensorsFile); the file is removed after."""
    with temporary_path(output, suffix=".safetensors.tmp") as staging:
        r = build_file(plan, b, staging, verify, progress)
        with SafetensorsFile(staging) as st:
            yield r, st


def _build_torch(plan: Plan, b, output: str, verify: Verify, progress: ProgressFn,
                 model_blake3: str) -> ApplyResult:
    """A PyTorch target: build the tensors as safetensors, then write them back with
    ``torch.save``, proven by the model digest (torch's files are not byte-stable)."""
    with atomic_path(output, mode=None) as tmp:
        with _staged(plan, b, output, verify, progress) as (r, st):
            save_torch_state(tmp, {n: (st.tensors[n].dtype, st.tensors[n].shape, st.raw(n))
                                   for n in canonical_order(st.tensors)})
        with open_model(tmp) as m:
            got = m.digest().hex()
        if not digests_equal(got, model_blake3):
            raise IntegrityError(f"{output}: the PyTorch file written does not hold the patch's target tensors "
                                 f"(model BLAKE3 {got}, expected {model_blake3})", what="target",
                                 expected=model_blake3, actual=got)
    return ApplyResult(output, os.path.getsize(output), hash_file(output), r.ops, verify.mode, r.hashed, r.links,
                       model_blake3)


@contextlib.contextmanager
def _skeleton_errors(patch: Patch):
    """Whatever a malformed skeleton makes the ONNX code raise is the patch's fault: one line, exit 3."""
    try:
        yield
    except NnpatchError as e:
        if not isinstance(e, WeightsError):
            raise
        raise PatchFormatError(f"target skeleton: {e}", path=patch.path) from e
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as e:
        raise PatchFormatError(f"target skeleton: {type(e).__name__}: {e}", path=patch.path) from e


def _onnx_skeleton(patch: Patch) -> Skeleton:
    """The target's skeleton, its sizes bounded by the header before anything is decoded and its
    contents checked against the header's ``outputs``, ``size`` and ``tensors`` before anything is built."""
    t = patch.header.target
    s = t.skeleton
    model_size = t.outputs[0].size
    external = sum(o.size for o in t.outputs[1:])

    def refuse(why: str):
        raise PatchFormatError(f"target: {why}", path=patch.path)

    if model_size > MAX_ONNX_SIZE:
        refuse(f"the ONNX model file is {model_size} bytes, over protobuf's 2 GiB limit")
    # each external file is tensors of the target (at most target.size bytes) and gaps (at most as much again)
    if external > 2 * t.size + GAP_ALLOWANCE:
        refuse(f"the external data files add up to {external} bytes, more than twice the target's {t.size} "
               f"plus {GAP_ALLOWANCE}")
    # the stripped graph is smaller than the model file, and its JSON header names the model's tensors
    # and carries the external files' gaps (base64): anything larger is not a skeleton of these outputs
    limit = 12 + 8 * model_size + 2 * external + GAP_ALLOWANCE
    if s.size > limit:
        refuse(f"the skeleton is {s.size} bytes, more than {limit} for outputs of these sizes")
    if s.codec not in ([], ["zstd"]):
        refuse(f"the skeleton's codec must be raw or zstd, not {s.codec}")
    raw = b"".join(codecs.decoded_chunks(patch.section(s), s.codec, s.size, [s.size], where="target.skeleton"))
    with _skeleton_errors(patch):
        sk = read_skeleton(raw)
        check_skeleton_fits(sk, {o.path: o.size for o in t.outputs[1:]}, t.size)
    if len(sk.stored) != t.tensors:
        refuse(f"the skeleton stores {len(sk.stored)} tensors, the target has {t.tensors}")
    return sk


def _referenced_locations(model_path: str) -> set[str]:
    """The external data locations the ONNX model now at ``model_path`` names (empty if there is
    none, or it cannot be read as one): the files a re-apply over it may replace."""
    import onnx

    try:
        st = os.stat(model_path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_ONNX_SIZE:
            return set()
        with open(model_path, "rb") as f:
            model = onnx.ModelProto()
            model.ParseFromString(f.read())
    except Exception:  # an unreadable or foreign file owns nothing
        return set()
    found: set[str] = set()

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from tensors(g)

    for t in tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in t.external_data if e.key == "location")
    return found


def check_onnx_patch(patch: Patch) -> Skeleton:
    """The rules of spec 5.7 that the patch alone decides (skeleton, external path names), which
    ``apply`` checks before writing anything and ``verify`` checks without an output."""
    t = patch.header.target
    sk = _onnx_skeleton(patch)
    _check_external_names([o.path for o in t.outputs[1:]], t.outputs[0].path, patch)
    return sk


def refuse_external_over_base(patch: Patch, src) -> None:
    """``verify --base``: an external data path that, resolved beside the base (where ``update`` and
    ``apply --in-place`` write the target), is the base or one of its files. ``apply`` checks this
    against the output's real directory (:func:`_check_external_paths`)."""
    t = patch.header.target
    if t.format != "onnx":
        return
    base_file = src.path if not os.path.isdir(src.path) else os.path.join(src.path, t.outputs[0].path)
    directory = os.path.dirname(os.path.abspath(base_file))
    # the base file itself: an ONNX base's own external data may be rewritten by an update in place
    protected = _protected(src, True)
    for o in t.outputs[1:]:
        full = os.path.join(directory, *o.path.split("/"))
        try:
            st = os.lstat(full)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in protected or os.path.abspath(full) == os.path.abspath(src.path):
            raise PatchFormatError(f"target: external data file {o.path!r} is the base model (written beside it)",
                                   path=patch.path)


def _check_external_names(paths: list[str], model_name: str, patch: Patch) -> None:
    """Each external path is relative and normalised, none of it ``.git``, no component over 255 bytes
    (check_relative_path), and no two outputs (the model file included) the same case-insensitively."""
    taken = {model_name.casefold()}
    for path in paths:
        why = check_relative_path(path)
        if why:
            raise PatchFormatError(f"target: external data file {path!r} {why}", path=patch.path)
        if path.casefold() in taken:
            raise PatchFormatError(f"target: external data file {path!r} collides with the model file or another "
                                   "output (names compared case-insensitively)", path=patch.path)
        taken.add(path.casefold())


def _protected(src, replace: bool) -> set[tuple[int, int]]:
    """(device, inode) of the base file, and unless the base is being replaced, of every file of the base model."""
    paths = [src.path]
    model = getattr(src, "model", None)
    if model is not None and not replace:
        root = src.path if os.path.isdir(src.path) else os.path.dirname(os.path.abspath(src.path))
        paths += [os.path.join(root, *f.path.split("/")) for f in model.files]
    ids = set()
    for p in paths:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            ids.add((st.st_dev, st.st_ino))
    return ids


def _check_external_paths(paths: list[str], output: str, src, replace: bool, patch: Patch) -> dict[str, int | None]:
    """Check where each external data file would go, before anything is written; returns
    path -> the mode of the file it replaces (None: a new file).

    A path is relative and normalised, none of it ``.git`` (check_relative_path), every component
    short enough; it stays in the output's directory, through directories that already exist and are not symlinks (nnpatch
    creates no directory a patch names); it is neither the output nor, case-folded, another output;
    and it is new, or a regular file, not the base, that the model now at the output names as its
    own external data (re-applying over an earlier version).
    """
    directory = os.path.dirname(os.path.abspath(output))
    protected = _protected(src, replace)
    owned: set[str] | None = None
    modes: dict[str, int | None] = {}

    def refuse(path: str, why: str):
        raise PatchFormatError(f"target: external data file {path!r} {why}", path=patch.path)

    _check_external_names(paths, os.path.basename(output), patch)
    for path in paths:
        parts = path.split("/")
        here = directory
        for p in parts[:-1]:
            here = os.path.join(here, p)
            try:
                st = os.lstat(here)
            except FileNotFoundError:
                refuse(path, f"needs directory {os.path.relpath(here, directory)!r}, which does not exist "
                             "(nnpatch creates no directories a patch names)")
            except OSError as e:
                refuse(path, f"cannot be checked: {e.strerror or e}")
            if stat.S_ISLNK(st.st_mode):
                refuse(path, f"goes through the symlink {os.path.relpath(here, directory)!r}")
            if not stat.S_ISDIR(st.st_mode):
                refuse(path, f"goes through {os.path.relpath(here, directory)!r}, which is not a directory")
        full = os.path.join(directory, *parts)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            modes[path] = None
            continue
        except OSError as e:
            refuse(path, f"cannot be checked: {e.strerror or e}")
        if not stat.S_ISREG(st.st_mode):
            refuse(path, "exists and is not a regular file")
        if (st.st_dev, st.st_ino) in protected or os.path.abspath(full) == os.path.abspath(src.path):
            refuse(path, "is the base model")
        if owned is None:
            owned = _referenced_locations(output)
        if path not in owned:
            refuse(path, f"already exists and is not external data of {output}")
        modes[path] = st.st_mode & 0o7777
    return modes


def _write_external(directory: str, path: str, data: bytes, mode: int | None) -> None:
    """Write ``data`` at ``path`` under ``directory`` atomically, every directory opened with
    O_NOFOLLOW relative to its parent, so a symlink swapped in after the checks is not followed."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
    parts = path.split("/")
    fd = os.open(directory, flags)
    try:
        for p in parts[:-1]:
            nfd = os.open(p, flags | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        tmp = f".nnpatch-{secrets.token_hex(8)}.tmp"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                      0o600, dir_fd=fd)
        try:
            with os.fdopen(out, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), mode if mode is not None else 0o644 & ~umask())
            os.replace(tmp, parts[-1], src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=fd)
            raise
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _build_onnx(plan: Plan, b, output: str, verify: Verify, progress: ProgressFn, patch: Patch, *,
                replace: bool = False) -> ApplyResult:
    """An ONNX target: check the skeleton and every place a file will go, build the tensors as
    safetensors, put them back into the skeleton, and check every file against the digest the patch
    gives it before writing any (external data files first, the model file last, each atomically)."""
    t = patch.header.target
    sk = check_onnx_patch(patch)
    directory = os.path.dirname(os.path.abspath(output))
    try:
        modes = _check_external_paths([o.path for o in t.outputs[1:]], output, b, replace, patch)
        with _staged(plan, b, output, verify, progress) as (r, st):
            tensors = {n: (i.dtype, i.shape, st.raw(n).tobytes()) for n, i in st.tensors.items()}
        with _skeleton_errors(patch):
            files = {t.outputs[0].path: rebuild_onnx(sk, tensors)}
            files.update(rebuild_external(sk, tensors))
        del tensors
        for o in t.outputs:
            got = digest_bytes(files[o.path]).hex()
            if len(files[o.path]) != o.size or not digests_equal(got, o.blake3):
                raise IntegrityError(f"{o.path}: the ONNX file rebuilt does not match the patch's target (BLAKE3 "
                                     f"{got}, expected {o.blake3})", what=o.path, expected=o.blake3, actual=got)
        for o in t.outputs[1:]:  # external data first, the model that points at it last
            _write_external(directory, o.path, files.pop(o.path), modes[o.path])
        with atomic_write(output) as f:
            f.write(files[t.outputs[0].path])
    except OSError as e:
        if isinstance(e, NnpatchError):
            raise
        raise write_error(output, e, what="the ONNX model and its external data",
                          needed=sum(o.size for o in t.outputs)) from e
    # every file written was hashed above and matched its digest: the model file's is proven
    return ApplyResult(output, t.outputs[0].size, t.outputs[0].blake3, r.ops, verify.mode, r.hashed, r.links,
                       r.model_blake3)


def _section_bytes(patch: Patch, s, where: str) -> bytes:
    if s.codec not in ([], ["zstd"]):
        raise PatchFormatError(f"{where}: the codec must be raw or zstd, not {s.codec}", path=patch.path)
    return b"".join(codecs.decoded_chunks(patch.section(s), s.codec, s.size, [s.size], where=where))


def extents_of(patch: Patch, role: str = "target"):
    """(file size, extents) of an extents model of ``patch``, the table checked (spec 5.8)."""
    ref = getattr(patch.header, role)
    try:
        return decode_table(_section_bytes(patch, ref.extents, f"{role}.extents"))
    except ValueError as e:
        raise PatchFormatError(f"{role}.extents: {e}", path=patch.path) from e


def check_extents(patch: Patch, tensors: dict) -> None:
    """What apply checks of an extents patch before it reads the base (``verify`` too): the tables
    (spec 5.8) and the target's against its layout's ``tensors``, output and skeleton sizes."""
    if patch.header.base.extents is not None:
        extents_of(patch, "base")  # its rules hold even where this applier reads the base file itself
    if patch.header.target.format == "extents":
        _target_extents(patch, tensors)
        check_skeleton_frame(patch)


def _target_extents(patch: Patch, tensors: dict):
    t = patch.header.target
    size, extents = extents_of(patch)
    out = t.outputs[0]
    if size != out.size:
        raise PatchFormatError(f"target.extents: the table describes a {size}-byte file, the output is {out.size}",
                               path=patch.path)
    if t.skeleton.size != skeleton_size(size, extents):
        raise PatchFormatError(f"target.skeleton: {t.skeleton.size} bytes, but the file leaves "
                               f"{skeleton_size(size, extents)} outside its extents", path=patch.path)
    try:
        check_fits(extents, tensors, size, t.skeleton.size)
    except WeightsError as e:
        raise PatchFormatError(f"target.extents: {e}", path=patch.path) from e
    return size, extents


def extents_plan(links: list[Patch], tensors: dict, base_path: str):
    """The target's extents and skeleton, checked against each other, the header's output and the
    layout's tensors before anything is decoded or written (a skeleton delta is decoded once the
    base file is proven, applier/skeleton.py)."""
    patch = links[-1]
    if patch.header.base.extents is not None:
        extents_of(patch, "base")
    _, extents = _target_extents(patch, tensors)
    return extents, target_skeleton(links, base_path)


def _build_extents(plan: Plan, b, output: str, verify: Verify, progress: ProgressFn, links: list[Patch], *,
                   replace: bool = False) -> ApplyResult:
    """An extents target (GGUF, TFLite): build the tensors as safetensors (proven as any apply is), then write
    the file as the skeleton's bytes with each tensor at its extent, hashed as it is written, and
    rename it in only when its digest is the patch's."""
    import blake3

    patch = links[-1]
    out = patch.header.target.outputs[0]
    mode = _mode_of(output) if replace else None
    extents, skeleton = extents_plan(links, {i.info.name: i.info for i in plan.items}, b.path)
    try:
        with _staged(plan, b, output, verify, progress) as (r, st):
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            with atomic_path(output, mode=0o644 if mode is None else mode) as tmp, open(tmp, "r+b") as f:
                def write(data) -> None:
                    h.update(data)
                    f.write(data)

                join(write, memoryview(skeleton), extents, st.raw)
                got = h.hexdigest()
                if not digests_equal(got, out.blake3):
                    raise IntegrityError(f"{output}: the file rebuilt does not match the patch's target (BLAKE3 "
                                         f"{got}, expected {out.blake3})", what="target", expected=out.blake3,
                                         actual=got)
    except OSError as e:
        if isinstance(e, NnpatchError):
            raise
        raise write_error(output, e, what="the target file", needed=out.size) from e
    return ApplyResult(output, out.size, out.blake3, r.ops, verify.mode, r.hashed, r.links, r.model_blake3)
