"""Apply a patch: rebuild the target model byte for byte from the base.

Order of work (spec/FORMAT.md, "Applying"): the patch is validated whole
(structure and trailer hash) before the base is opened; the base's tensor set
is checked against the patch; the output is built in a temporary file beside
the destination and committed by rename only when every check passed. The
base is only ever read.

The engine makes ONE read pass over the base, on every core:

* unchanged tensors move base -> output with ``os.copy_file_range`` (the
  kernel copies page cache to page cache; falls back to numpy copies between
  memory maps where the file system refuses), merged into runs;
* meanwhile, worker threads hash every base tensor from the page cache
  (BLAKE3 and copy_file_range both release the GIL), for the base model
  digest and the per-tensor digests of the touched tensors;
* touched tensors are copied, the patch's values decoded and scattered into
  the output's memory map by :mod:`nnpatch.kernel`, and the result hashed
  while still hot and compared with the op's target digest.

Verification modes (``verify=``):

``default``
    every base tensor is hashed (base model digest checked), every touched
    base tensor against its own digest, every touched target tensor against
    its digest, and the target model digest recomputed from those.  Together
    with the trailer-checked layout this proves the output is the target
    without reading it again.
``full``
    ``default`` plus a BLAKE3 of the whole output file, compared with the
    patch's target file digest: an end-to-end check independent of the
    engine's bookkeeping (catches bugs, bad RAM, a file system that copied
    wrongly), at the cost of a second read of the output.
``touched``
    only the touched tensors are hashed (base and target).  Fastest; the
    unchanged tensors are copied unchecked, so a base that differs only in
    tensors the patch does not touch goes undetected and is carried into the
    output.  Use when the base is known good (e.g. just verified).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import errno
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import blake3
import numpy as np

from . import codecs, dtypes, kernel
from .atomic import atomic_write, fsync_dir
from .errors import (BaseMismatchError, IntegrityError, NnpatchError, NnpatchIOError, PatchFormatError,
                     UsageError, WeightsError)
from .hashing import digest_bytes, digests_equal, model_digest_of
from .patchfile import Op, Patch, Section, read_patch
from .weights import SafetensorsFile, TensorInfo, parse_safetensors_header
from .weights.source import open_source

ProgressFn = Callable[[int], None]

VERIFY_MODES = ("default", "full", "touched")

_MODE_OF_STAGE = {"xor": "xor", "add": "add", "zadd": "zadd", None: "replace"}
#: The mode that undoes each delta mode (``nnpatch revert``).
INVERSE_MODE = {"xor": "xor", "add": "sub", "zadd": "zsub"}

#: Unchanged runs are copied in pieces of this size, so the workers share them.
_COPY_PIECE = 64 << 20
#: Whether copy_file_range is usable here (cleared after the first refusal).
_use_copy_file_range = hasattr(os, "copy_file_range")


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


# --- layout and base checks ------------------------------------------------------------

def decode_layout(patch: Patch, s: Section, size: int, what: str) -> tuple[bytes, dict[str, TensorInfo]]:
    raw = b"".join(codecs.decoded_chunks(patch.section(s), s.codec, s.size, [s.size], where=f"{what}.layout"))
    try:
        _, tensors = parse_safetensors_header(raw, file_size=size, path=f"{patch.path}: {what} layout")
    except WeightsError as e:
        raise PatchFormatError(str(e)) from e
    if len(raw) != (next(iter(tensors.values())).begin if tensors else size):
        raise PatchFormatError(f"{what} layout carries bytes beyond the safetensors header", path=patch.path)
    return raw, tensors


@dataclass
class OutFile:
    """One file of the output: a safetensors file built from tensors (its
    header ``raw_layout``), a blob decoded from ``content`` of ``patch``, or a
    copy of the input file ``source`` (an absolute path, or None when the
    input is not a directory). ``path`` is relative to the output directory
    ("" for a single-file target)."""

    path: str
    kind: str
    size: int
    blake3: str
    raw_layout: bytes = b""
    patch: Patch | None = None
    content: Section | None = None
    source: str | None = None


@dataclass
class TargetLayout:
    """What a patch says the target is made of: its files and every tensor's place."""

    files: list[OutFile]
    tensors: dict[str, TensorInfo]  # name -> offsets in its file
    file_of: dict[str, int]  # name -> index in files


def target_layout(patch: Patch) -> TargetLayout:
    """The target's file(s) as carried by the patch, decoded and validated.

    A single-file target is one safetensors header; a directory target
    (format 1.1) has a header per shard, and tensor names are unique across
    shards.
    """
    t = patch.header.target
    if not t.is_directory:
        raw, tensors = decode_layout(patch, t.layout, t.size, "target")
        return TargetLayout([OutFile("", "safetensors", t.size, t.blake3, raw_layout=raw)], tensors,
                            dict.fromkeys(tensors, 0))
    files: list[OutFile] = []
    tensors: dict[str, TensorInfo] = {}
    file_of: dict[str, int] = {}
    for i, f in enumerate(t.files):
        out = OutFile(f.path, f.kind, f.size, f.blake3, patch=patch, content=f.content, source=f.source)
        if f.kind == "safetensors":
            out.raw_layout, shard = decode_layout(patch, f.layout, f.size, f"target file {f.path!r}")
            for name, info in shard.items():
                if name in tensors:
                    raise PatchFormatError(f"tensor {name!r} is in both {t.files[file_of[name]].path!r} and "
                                           f"{f.path!r}", path=patch.path)
                tensors[name] = info
                file_of[name] = i
        files.append(out)
    return TargetLayout(files, tensors, file_of)


def check_ops_against_layout(patch: Patch, layout: dict[str, TensorInfo]) -> None:
    ops = {op.name: op for op in patch.ops}
    for name, info in layout.items():
        op = ops.get(name)
        if op is None:
            continue
        if op.target is None:
            raise PatchFormatError(f"tensor {name!r} is removed by the patch but present in the target layout",
                                   path=patch.path)
        if op.target.dtype != info.dtype or op.target.shape != info.shape:
            raise PatchFormatError(f"tensor {name!r}: op and target layout disagree on dtype or shape",
                                   path=patch.path)
    for name, op in ops.items():
        if op.target is not None and name not in layout:
            raise PatchFormatError(f"tensor {name!r} is written by an op but missing from the target layout",
                                   path=patch.path)
    if len(layout) != patch.header.target.tensors:
        raise PatchFormatError(f"target layout has {len(layout)} tensors, the header says "
                               f"{patch.header.target.tensors}", path=patch.path)


def check_base(patch: Patch, base: SafetensorsFile, layout: dict[str, TensorInfo]) -> None:
    """Refuse a base whose tensor set, dtypes or shapes differ from the patch's base."""
    ops = {op.name: op for op in patch.ops}
    hb = patch.header.base
    for name, op in ops.items():
        if op.base is not None:
            info = base.tensors.get(name)
            if info is None:
                raise BaseMismatchError(f"{base.path}: wrong base: tensor {name!r} is missing")
            if info.dtype != op.base.dtype or info.shape != op.base.shape:
                raise BaseMismatchError(
                    f"{base.path}: wrong base: tensor {name!r} is {info.dtype}{list(info.shape)}, "
                    f"the patch expects {op.base.dtype}{list(op.base.shape)}")
        elif name in base.tensors:
            raise BaseMismatchError(f"{base.path}: wrong base: tensor {name!r} already exists, the patch adds it")
    for name, info in layout.items():
        if name not in ops:
            src = base.tensors.get(name)
            if src is None:
                raise BaseMismatchError(f"{base.path}: wrong base: tensor {name!r} is missing")
            if src.dtype != info.dtype or src.shape != info.shape:
                raise BaseMismatchError(
                    f"{base.path}: wrong base: tensor {name!r} is {src.dtype}{list(src.shape)}, "
                    f"the patch expects {info.dtype}{list(info.shape)}")
    check_ops_against_layout(patch, layout)
    if len(base.tensors) != hb.tensors:
        raise BaseMismatchError(
            f"{base.path}: wrong base: {len(base.tensors)} tensors, the patch's base has {hb.tensors}")


def _check_verify(verify: str) -> str:
    if verify not in VERIFY_MODES:
        raise UsageError(f"--verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    return verify


# --- the plan: what each output tensor is made of ---------------------------------------

@dataclass
class Step:
    """One op applied on top of the current bytes of a tensor."""

    patch: Patch
    op: Op
    section: Section
    mode: str  # kernel mode; "replace" for absolute fills


@dataclass
class Item:
    info: TensorInfo  # where it goes in the output (offsets in its file)
    src: TensorInfo | None = None  # input tensor whose bytes it starts from
    fill: Step | None = None  # or: values decoded from a patch (absolute)
    steps: list[Step] = field(default_factory=list)  # relative ops, in order
    expect: str | None = None  # digest of the final bytes (touched tensors)
    file: int = 0  # index of its output file in Plan.files

    @property
    def touched(self) -> bool:
        return self.fill is not None or bool(self.steps)


@dataclass
class Plan:
    files: list[OutFile]
    items: list[Item]
    #: input tensor name -> digest it must have (None: hashed only for the model digest)
    input_expect: dict[str, str | None]
    input_model: str | None  # expected model digest of the input (None: not checked)
    output_model: str | None
    output_file: str  # the output's file digest (a directory's: its directory digest), per the patch
    always_full: bool = False
    ops: int = 0
    links: int = 1
    directory: bool = False  # the output is a model directory (Plan.files are its files)

    @property
    def raw_layout(self) -> bytes:
        """The header of a single-file output."""
        return self.files[0].raw_layout

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _delta_mode(op: Op, section: Section) -> str:
    return _MODE_OF_STAGE[codecs.delta_stage(section.codec)]


def plan_forward(base: SafetensorsFile, patches: Sequence[Patch]) -> Plan:
    """The plan for a chain base -> P1 -> ... -> Pn (one link is a plain apply)."""
    first = patches[0]
    layouts: list[TargetLayout] = []
    for k, p in enumerate(patches):
        tl = target_layout(p)
        layouts.append(tl)
        if k == 0:
            check_base(p, base, tl.tensors)
        else:
            prev = patches[k - 1]
            check_ops_against_layout(p, tl.tensors)
            if not digests_equal(p.header.base.model_blake3, prev.header.target.model_blake3):
                raise BaseMismatchError(
                    f"{p.path}: broken chain: link {k + 1} was made for another base than the target of link {k} "
                    f"({prev.path}) (model BLAKE3 {p.header.base.model_blake3}, expected "
                    f"{prev.header.target.model_blake3})", what="chain",
                    expected=prev.header.target.model_blake3, actual=p.header.base.model_blake3)
    # per tensor: the digest it has after each link, where a header says so
    known: dict[str, str | None] = {}  # name -> digest per the previous link's op (None: as in the base)
    present = set(base.tensors)
    ops_by_link = [{op.name: op for op in p.ops} for p in patches]
    for k, (p, ops) in enumerate(zip(patches, ops_by_link)):
        for name, op in ops.items():
            if op.base is not None:
                if name not in present:
                    raise BaseMismatchError(f"{p.path}: broken chain: tensor {name!r} does not exist before link "
                                            f"{k + 1}")
                if known.get(name) is not None and not digests_equal(known[name], op.base.blake3):
                    raise BaseMismatchError(f"{p.path}: broken chain: tensor {name!r} before link {k + 1} is not "
                                            f"the one its op expects", what=name, expected=op.base.blake3,
                                            actual=known[name])
            elif name in present:
                raise BaseMismatchError(f"{p.path}: broken chain: link {k + 1} adds {name!r}, which exists")
            if op.target is None:
                present.discard(name)
                known.pop(name, None)
            else:
                present.add(name)
                known[name] = op.target.blake3
        if k:
            if present != set(layouts[k].tensors):
                raise BaseMismatchError(f"{p.path}: broken chain: tensor set after link {k + 1} does not match its "
                                        f"target layout")
    final = layouts[-1]
    items: list[Item] = []
    input_expect: dict[str, str | None] = {name: None for name in base.tensors}
    for name, info in final.tensors.items():
        item = Item(info, file=final.file_of[name])
        start = 0
        for k in range(len(patches) - 1, -1, -1):
            op = ops_by_link[k].get(name)
            if op is not None and (op.kind == "add" or (op.kind == "whole" and codecs.delta_stage(op.values.codec)
                                                        is None)):
                item.fill = Step(patches[k], op, op.values, "replace")
                start = k + 1
                break
        else:
            item.src = base.tensors[name]
        for k in range(start, len(patches)):
            op = ops_by_link[k].get(name)
            if op is not None:
                item.steps.append(Step(patches[k], op, op.values, _delta_mode(op, op.values)))
        last = next((ops_by_link[k][name] for k in range(len(patches) - 1, -1, -1) if name in ops_by_link[k]),
                    None)
        if last is not None:
            item.expect = last.target.blake3
        items.append(item)
    # touched input tensors must have the digest the first op on them expects
    for k, ops in enumerate(ops_by_link):
        for name, op in ops.items():
            if op.base is not None and name in input_expect and input_expect[name] is None and all(
                    name not in ops_by_link[j] for j in range(k)):
                input_expect[name] = op.base.blake3
    last = patches[-1]
    return Plan(_resolve_copies(base, patches, layouts), items, input_expect, first.header.base.model_blake3,
                last.header.target.model_blake3, last.header.target.blake3,
                ops=sum(len(p.ops) for p in patches), links=len(patches),
                directory=last.header.target.is_directory)


def _resolve_copies(base, patches: Sequence[Patch], layouts: list[TargetLayout]) -> list[OutFile]:
    """The final link's files, each ``copy`` traced back through the chain to
    a blob of an earlier link or to a file of the base directory."""
    from .weights.sharded import safe_relative_path

    out = []
    for f in layouts[-1].files:
        if f.kind != "copy":
            out.append(f)
            continue
        f = OutFile(f.path, f.kind, f.size, f.blake3, source=f.source)
        src, k = f.source, len(patches) - 1
        while True:
            k -= 1
            if k < 0:
                if not os.path.isdir(base.path):
                    raise BaseMismatchError(f"{base.path}: wrong base: the patch copies {src!r} from its base "
                                            "directory, and this base is not a directory")
                try:
                    full = safe_relative_path(base.path, src, what="copied file")
                except WeightsError as e:
                    raise PatchFormatError(str(e), path=patches[0].path) from e
                if not os.path.isfile(full):
                    raise BaseMismatchError(f"{base.path}: wrong base: file {src!r} is missing")
                f.source = full
                break
            link = patches[k]
            entry = next((e for e in layouts[k].files if e.path == src), None) \
                if link.header.target.is_directory else None
            if entry is None or entry.blake3 != f.blake3:
                raise BaseMismatchError(f"{patches[k + 1].path}: broken chain: link {k + 2} copies {src!r} from its "
                                        f"base, which link {k + 1} ({link.path}) does not make")
            if entry.kind == "blob":
                f.kind, f.patch, f.content, f.source = "blob", entry.patch, entry.content, None
                break
            if entry.kind == "safetensors":
                raise UsageError(f"{patches[k + 1].path}: link {k + 2} copies the weights file {src!r} made by link "
                                 f"{k + 1}; apply these links one at a time")
            src = entry.source
        out.append(f)
    return out


def plan_revert(new: SafetensorsFile, patch: Patch) -> Plan:
    """The plan that takes the patch's target back to its base."""
    h = patch.header
    if not h.reversible:
        raise PatchFormatError("patch is not reversible (it lacks the base layout or old bytes, or orders values by "
                               "the old ones); "
                               "make it with `nnpatch diff --reversible`", path=patch.path)
    if h.target.is_directory:
        raise PatchFormatError("patch is not reversible: its target is a model directory", path=patch.path)
    raw_layout, layout = decode_layout(patch, h.base.layout, h.base.size, "base")
    _, target = decode_layout(patch, h.target.layout, h.target.size, "target")
    check_ops_against_layout(patch, target)
    ops = {op.name: op for op in patch.ops}
    # the input must be the patch's target: same tensor set, dtypes, shapes
    for name, info in target.items():
        got = new.tensors.get(name)
        if got is None or got.dtype != info.dtype or got.shape != info.shape:
            found = "missing" if got is None else f"{got.dtype}{list(got.shape)}"
            raise BaseMismatchError(f"{new.path}: not the patch's target: tensor {name!r} is {found}, the patch "
                                    f"made {info.dtype}{list(info.shape)}")
    if len(new.tensors) != len(target):
        extra = sorted(set(new.tensors) - set(target))[:1]
        raise BaseMismatchError(f"{new.path}: not the patch's target: unexpected tensor {extra[0]!r}")
    if len(layout) != h.base.tensors:
        raise PatchFormatError(f"base layout has {len(layout)} tensors, the header says {h.base.tensors}",
                               path=patch.path)
    items = []
    for name, info in layout.items():
        op = ops.get(name)
        item = Item(info)
        if op is None:
            src = target.get(name)
            if src is None or src.dtype != info.dtype or src.shape != info.shape:
                raise PatchFormatError(f"tensor {name!r}: base layout and target layout disagree, with no op",
                                       path=patch.path)
            item.src = new.tensors[name]
        elif op.base is None or op.base.dtype != info.dtype or op.base.shape != info.shape:
            raise PatchFormatError(f"tensor {name!r}: op and base layout disagree on dtype or shape",
                                   path=patch.path)
        elif op.base_values is not None:
            item.fill = Step(patch, op, op.base_values, "replace")
            item.expect = op.base.blake3
        else:
            mode = _delta_mode(op, op.values)
            if mode == "replace":
                raise PatchFormatError(
                    f"patch cannot be reverted: op {op.name!r} ({op.kind}) stores the new values without a delta "
                    "stage and without the old ones", path=patch.path)
            item.src = new.tensors[name]
            item.steps.append(Step(patch, op, op.values, INVERSE_MODE[mode]))
            item.expect = op.base.blake3
        items.append(item)
    for name, op in ops.items():
        if op.base is not None and name not in layout:
            raise PatchFormatError(f"tensor {name!r} is in the patch's base but missing from its base layout",
                                   path=patch.path)
    input_expect = {name: (ops[name].target.blake3 if name in ops else None) for name in new.tensors}
    files = [OutFile("", "safetensors", h.base.size, h.base.blake3, raw_layout=raw_layout)]
    return Plan(files, items, input_expect, h.target.model_blake3, h.base.model_blake3,
                h.base.blake3, always_full=True, ops=len(patch.ops))


# --- decoding into a tensor -------------------------------------------------------------

def _where(step: Step) -> str:
    return f"{step.op.name!r}.{'base_values' if step.section is step.op.base_values else 'values'}"


def run_step(step: Step, info: TensorInfo, dst: np.ndarray | None, indices: np.ndarray | None = None) -> None:
    """Decode ``step``'s section into ``dst`` (the tensor's bytes), converting kernel errors."""
    try:
        _run_step(step, info, dst, indices)
    except PatchFormatError as e:
        if e.path is None:
            raise PatchFormatError(str(e), path=step.patch.path) from e
        raise
    except ValueError as e:  # the kernel refuses: the patch's data is inconsistent
        raise PatchFormatError(f"{_where(step)}: {e}", path=step.patch.path) from e


def decode_index(step: Step, info: TensorInfo) -> np.ndarray:
    op = step.op
    bound = info.shape[0] if op.kind == "rows" else info.numel
    try:
        return codecs.decode_indices(step.patch.section(op.index), op.index.codec, count=op.count, bound=bound,
                                     size=op.index.size, where=f"{op.name!r}.index")
    except PatchFormatError as e:
        if e.path is None:
            raise PatchFormatError(str(e), path=step.patch.path) from e
        raise


def row_bytes(op: Op, info: TensorInfo) -> int:
    return info.nbytes // info.shape[0] if op.kind == "rows" else info.itemsize


def undo_esort(chunk: np.ndarray, old: np.ndarray, info: TensorInfo, planar: bool) -> np.ndarray:
    """Undo ``esort`` on a decoded chunk: its order is that of the old words' exponents."""
    if len(old) != len(chunk):
        raise ValueError(f"values chunk is {len(chunk)} bytes, its old words {len(old)}")
    shift, mask = codecs.exponent_key(info.dtype)
    return kernel.unsort(old, chunk, info.itemsize, shift=shift, mask=mask, planar=planar)


def _run_step(step: Step, info: TensorInfo, dst: np.ndarray | None, indices: np.ndarray | None) -> None:
    op, s, mode = step.op, step.section, step.mode
    width = dtypes.ITEMSIZE[info.dtype]
    where = _where(step)
    planar = "planes" in s.codec
    esort = "esort" in s.codec
    buf = step.patch.section(s)
    if op.kind in ("rows", "elements") and s is op.values:
        unit = row_bytes(op, info)
        idx = decode_index(step, info) if indices is None else indices
        unit_elements = unit // width
        per = codecs.chunk_units(unit_elements)
        sizes = codecs.value_chunk_sizes(op.count, unit, unit_elements)
        for i, chunk in enumerate(codecs.decoded_chunks(buf, s.codec, s.size, sizes, where=where)):
            sel = idx[i * per : (i + 1) * per]
            if esort:
                chunk = undo_esort(chunk, kernel.gather_rows(dst, unit, sel), info, planar)
            if op.kind == "rows":
                kernel.scatter_rows(dst, unit, sel, chunk, width, mode, planar=planar)
            else:
                kernel.scatter_elements(dst, sel, chunk, width, mode, planar=planar)
        return
    sizes = codecs.value_chunk_sizes(info.numel, width, 1)
    pos = 0
    for chunk in codecs.decoded_chunks(buf, s.codec, s.size, sizes, where=where):
        part = dst[pos : pos + len(chunk)]
        if esort:
            chunk = undo_esort(chunk, part, info, planar)
        if mode == "replace":
            if planar:
                kernel.unplanes(chunk, width, out=part)
            else:
                part[:] = chunk
        else:
            kernel.combine(part, chunk, width, mode, planar=planar)
        pos += len(chunk)


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


# --- the engine ------------------------------------------------------------------------------

def workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(2, min(8, n))


class _Errors:
    """Collects failures from worker threads; the most telling one is raised."""

    def __init__(self) -> None:
        self.items: list[BaseException] = []
        self.lock = threading.Lock()

    def add(self, e: BaseException) -> None:
        with self.lock:
            self.items.append(e)

    def raise_first(self) -> None:
        if not self.items:
            return

        def rank(e):
            if isinstance(e, PatchFormatError):
                return 0
            if isinstance(e, BaseMismatchError):
                return 1
            if isinstance(e, NnpatchError):
                return 2
            return 3
        raise min(self.items, key=rank)


def require_target_model(plan: Plan, finals: dict[str, bytes], digests: dict[str, bytes]) -> None:
    """The target's model digest from the digests at hand: touched tensors as written, the rest as copied."""
    got = model_digest_of({item.info.name: item.info for item in plan.items},
                          {item.info.name: finals[item.info.name] if item.touched else digests[item.src.name]
                           for item in plan.items}).hex()
    if not digests_equal(got, plan.output_model):
        raise IntegrityError(f"result does not match the patch's target model digest (model BLAKE3 "
                             f"{got}, expected {plan.output_model})", what="target",
                             expected=plan.output_model, actual=got)


def _input_locator(inp) -> Callable[[str], tuple[int, object, int]] | None:
    """Where an input tensor's bytes lie in a file, as (fd, map, offset), so
    unchanged tensors move by ``copy_file_range``; None for inputs whose
    tensors are not plain byte ranges of a file (PyTorch, ONNX), which are
    copied through their arrays."""
    if isinstance(inp, SafetensorsFile):
        fd, m = inp._file.fileno(), inp._map
        return lambda name: (fd, m, inp.tensors[name].begin)
    model = getattr(inp, "model", None)
    if getattr(inp, "kind", None) == "safetensors-dir" and model is not None:
        shards = model.shards
        return lambda name: (shards[model.tensors[name].file]._file.fileno(), shards[model.tensors[name].file]._map,
                             model.tensors[name].begin)
    return None


def execute(plan: Plan, inp: SafetensorsFile, outs: Sequence[tuple[int, object] | None], verify: str,
            progress: ProgressFn, label: str) -> tuple[str, int, dict[int, str]]:
    """Fill the output files per ``plan``; ``outs[i]`` is (fd, writable map or None
    when empty) of ``plan.files[i]`` (None for files that hold no tensors).

    Returns (output digest, bytes hashed, {file index: file digest} of the files
    re-hashed, which ``full`` does)."""
    hash_all = verify != "touched"
    locate = _input_locator(inp)
    errors_ = _Errors()
    digests: dict[str, bytes] = {}
    finals: dict[str, bytes] = {}
    hashed = [0]
    lock = threading.Lock()

    for f, out in zip(plan.files, outs):
        if out is not None and out[1] is not None:
            out[1][: len(f.raw_layout)] = f.raw_layout

    def hash_input(names: list[str]) -> None:
        for name in names:
            hash_one(name)

    def hash_one(name: str) -> None:
        d = digest_bytes(inp.raw(name))
        with lock:
            digests[name] = d
            hashed[0] += inp.tensors[name].nbytes
        want = plan.input_expect.get(name)
        if want is not None and not digests_equal(d.hex(), want):
            raise BaseMismatchError(
                f"{inp.path}: {label}: tensor {name!r} differs from the patch's "
                f"{'base' if label == 'wrong base' else 'target'} (BLAKE3 {d.hex()}, "
                f"expected {want})", what=name, expected=want, actual=d.hex())

    def copy_tensor(item: Item) -> None:
        """An input tensor's bytes into the output, by the kernel where both are files."""
        out_fd, out_map = outs[item.file]
        info = item.info
        if not info.nbytes:
            return
        if locate is not None:
            in_fd, in_map, begin = locate(item.src.name)
            copy_range(in_fd, out_fd, begin, info.begin, info.nbytes, in_map, out_map)
        else:
            np.frombuffer(out_map, np.uint8, info.nbytes, info.begin)[:] = inp.raw(item.src.name)

    def copy_run(in_fd: int, in_map, out_fd: int, out_map, src_off: int, dst_off: int, n: int) -> None:
        copy_range(in_fd, out_fd, src_off, dst_off, n, in_map, out_map)
        start_writeback(out_fd, dst_off, n)

    def make(item: Item) -> None:
        info = item.info
        out_fd, out_map = outs[item.file]
        dst = np.frombuffer(out_map, np.uint8, info.nbytes, info.begin) if info.nbytes else np.empty(0, np.uint8)
        if item.src is not None:
            if item.src.name in hashed_by_make:  # checked here, before its bytes are used, while they are hot
                hash_one(item.src.name)
            copy_tensor(item)
        if item.fill is not None:
            run_step(item.fill, info, dst)
        for step in item.steps:
            run_step(step, info, dst)
        d = digest_bytes(dst)
        with lock:
            finals[info.name] = d
            hashed[0] += info.nbytes
        if item.expect is not None and not digests_equal(d.hex(), item.expect):
            raise IntegrityError(
                f"tensor {info.name!r}: result does not match the patch's target (BLAKE3 {d.hex()}, "
                f"expected {item.expect})", what=info.name, expected=item.expect, actual=d.hex())
        start_writeback(out_fd, info.begin, info.nbytes)

    hashed_by_make = {item.src.name for item in plan.items if item.touched and item.src is not None
                      and (hash_all or plan.input_expect.get(item.src.name) is not None)}
    tasks: list[tuple[Callable, tuple, int]] = []
    if locate is not None:
        # unchanged tensors: merge neighbours (same input and output file, contiguous) into runs, cut into pieces
        runs: list[list] = []
        for item in plan.items:
            if item.touched:
                continue
            in_fd, in_map, s_off = locate(item.src.name)
            out_fd, out_map = outs[item.file]
            run = runs[-1] if runs else None
            if run is not None and run[0] == in_fd and run[2] == out_fd and run[4] + run[6] == s_off \
                    and run[5] + run[6] == item.info.begin:
                run[6] += item.info.nbytes
            else:
                runs.append([in_fd, in_map, out_fd, out_map, s_off, item.info.begin, item.info.nbytes])
        for in_fd, in_map, out_fd, out_map, s_off, d_off, n in runs:
            for off in range(0, n, _COPY_PIECE):
                k = min(_COPY_PIECE, n - off)
                tasks.append((copy_run, (in_fd, in_map, out_fd, out_map, s_off + off, d_off + off, k), k))
    else:
        for item in plan.items:
            if not item.touched:
                tasks.append((copy_tensor, (item,), item.info.nbytes))
    # hash tasks, small tensors batched
    to_hash = [n for n in inp.tensors if (hash_all or plan.input_expect.get(n) is not None)
               and n not in hashed_by_make]
    batch: list[str] = []
    batch_bytes = 0
    hash_tasks = []
    for name in sorted(to_hash, key=lambda n: inp.tensors[n].begin):
        nb = inp.tensors[name].nbytes
        if nb >= 4 << 20:
            hash_tasks.append((hash_input, ([name],), 0))
            continue
        batch.append(name)
        batch_bytes += nb
        if batch_bytes >= 4 << 20:
            hash_tasks.append((hash_input, (batch,), 0))
            batch, batch_bytes = [], 0
    if batch:
        hash_tasks.append((hash_input, (batch,), 0))
    make_tasks = [(make, (item,), item.info.nbytes) for item in plan.items if item.touched]
    # interleave so that copies, hashes and touched tensors of the same region run together
    ordered = []
    queues = [make_tasks, tasks, hash_tasks]
    while any(queues):
        for q in queues:
            if q:
                ordered.append(q.pop(0))

    def guarded(fn, args):
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            errors_.add(e)
            raise

    with cf.ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="nnpatch-apply") as pool:
        futures = {pool.submit(guarded, fn, args): n for fn, args, n in ordered}
        try:
            for fut in cf.as_completed(futures):
                if fut.exception() is not None:
                    break
                progress(futures[fut])
        finally:
            for fut in futures:
                fut.cancel()
    if errors_.items:
        errors_.raise_first()
    # the base as a whole
    if hash_all and plan.input_model is not None:
        got = model_digest_of(inp.tensors, digests).hex()
        if not digests_equal(got, plan.input_model):
            raise BaseMismatchError(
                f"{inp.path}: {label}: tensor contents differ from the patch's "
                f"{'base' if label == 'wrong base' else 'target'} (model BLAKE3 {got}, "
                f"expected {plan.input_model})", what="base", expected=plan.input_model, actual=got)
    # the target as a whole, from the digests at hand
    if hash_all and plan.output_model is not None:
        require_target_model(plan, finals, digests)
    rehashed: dict[int, str] = {}
    if verify == "full" or plan.always_full:
        for i, (f, out) in enumerate(zip(plan.files, outs)):
            if out is None:
                continue
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            if out[1] is not None:
                h.update(out[1])
            digest = rehashed[i] = h.hexdigest()
            hashed[0] += f.size
            if not digests_equal(digest, f.blake3):
                where = f"file {f.path!r}" if plan.directory else "result"
                raise IntegrityError(
                    f"{where} does not match the patch's {'target' if not plan.always_full else 'base'} (BLAKE3 "
                    f"{digest}, expected {f.blake3})", what=f.path or "target", expected=f.blake3, actual=digest)
        if not plan.directory:
            return rehashed[0], hashed[0], rehashed
    return plan.output_file, hashed[0], rehashed


def _allocate(fd: int, size: int):
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


def build_file(plan: Plan, inp: SafetensorsFile, output: str, verify: str, progress: ProgressFn,
               label: str = "wrong base") -> ApplyResult:
    """Run ``plan`` into a temporary file beside ``output``; rename it there when every check passed."""
    if plan.directory:
        from .directory import build_directory

        return build_directory(plan, inp, output, verify, progress)
    size = plan.size
    try:
        with atomic_write(output) as f:
            out = None
            try:
                out = _allocate(f.fileno(), size)
                digest, hashed, _ = execute(plan, inp, [(f.fileno(), out)], verify, progress, label)
            finally:
                if out is not None:
                    with contextlib.suppress(BufferError):
                        out.close()
    except OSError as e:
        if isinstance(e, NnpatchError):
            raise
        raise NnpatchIOError(f"{output}: cannot write: {e.strerror or e}") from e
    return ApplyResult(output, size, digest, plan.ops, verify, hashed, plan.links)


# --- public API -------------------------------------------------------------------------------

def _open_patch(patch) -> Patch:
    if isinstance(patch, Patch):
        return patch
    return read_patch(patch)


def refuse_unfinished(model: str | os.PathLike[str]) -> None:
    """An input with an undo journal beside it is mid-way through an in-place update: refuse it.

    (An applier never writes its input; ``nnpatch recover`` or ``nnpatch apply --in-place`` rolls it back.)
    """
    from .journal import journal_path

    if os.path.exists(journal_path(model)):
        raise IntegrityError(f"{os.fspath(model)}: an in-place update of this model was interrupted (undo journal "
                             f"{journal_path(model)}); run `nnpatch recover {os.fspath(model)}` first")


def apply(base: str | os.PathLike[str], patch, output: str | os.PathLike[str], *,
          progress: ProgressFn | None = None, verify: str = "default",
          key: str | os.PathLike[str] | None = None) -> ApplyResult:
    """Rebuild the target of ``patch`` from ``base`` into ``output`` (atomically).

    ``patch`` is a path or an open :class:`~nnpatch.patchfile.Patch`;
    ``verify`` is ``"default"``, ``"full"`` or ``"touched"`` (module docstring);
    ``key`` (an Ed25519 public key, PEM) refuses a patch it did not sign.
    """
    return apply_chain(base, [patch], output, progress=progress, verify=verify, key=key)


def apply_chain(base: str | os.PathLike[str], patches: Sequence, output: str | os.PathLike[str], *,
                progress: ProgressFn | None = None, verify: str = "default",
                key: str | os.PathLike[str] | None = None) -> ApplyResult:
    """Apply P1, P2, ... to ``base`` in one pass, writing only the final model.

    Link k+1 must have been made from the target of link k: the header
    digests are compared before anything is read, and each touched tensor is
    checked against the digest its first op expects. With ``key``, every link
    must be signed by it.
    """
    _check_verify(verify)
    if not patches:
        raise UsageError("apply needs at least one patch")
    output = os.fspath(output)
    refuse_unfinished(base)
    with contextlib.ExitStack() as stack:
        opened = []
        for p in patches:
            q = _open_patch(p)
            if q is not p:
                stack.callback(q.close)
            opened.append(q)
        if key is not None:
            from .signing import verify_signature

            for q in opened:
                verify_signature(q, os.fspath(key))
        b = stack.enter_context(open_source(base))
        plan = plan_forward(b, opened)
        if opened[-1].header.target.format == "pytorch":
            return _build_torch(plan, b, output, verify, progress or (lambda n: None),
                                opened[-1].header.target.model_blake3)
        if opened[-1].header.target.format == "onnx":
            return _build_onnx(plan, b, output, verify, progress or (lambda n: None), opened[-1])
        return build_file(plan, b, output, verify, progress or (lambda n: None))


@contextlib.contextmanager
def _staged(plan: Plan, b, output: str, verify: str, progress: ProgressFn):
    """Build the target's tensors as a safetensors file beside ``output`` (proven as
    any apply is); yields (ApplyResult, open SafetensorsFile); the file is removed after."""
    directory = os.path.dirname(os.path.abspath(output))
    fd, staging = tempfile.mkstemp(prefix="." + os.path.basename(output) + ".", suffix=".safetensors.tmp",
                                   dir=directory)
    os.close(fd)
    try:
        r = build_file(plan, b, staging, verify, progress)
        with SafetensorsFile(staging) as st:
            yield r, st
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staging)


def _build_torch(plan: Plan, b, output: str, verify: str, progress: ProgressFn, model_blake3: str) -> ApplyResult:
    """A PyTorch target: build the tensors as safetensors, then write them back with
    ``torch.save``, proven by the model digest (torch's files are not byte-stable)."""
    from .hashing import hash_file
    from .weights.model import open_model
    from .weights.torch_file import save_torch_state

    directory = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(output) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        with _staged(plan, b, output, verify, progress) as (r, st):
            save_torch_state(tmp, {n: (st.tensors[n].dtype, st.tensors[n].shape, st.raw(n))
                                   for n in sorted(st.tensors, key=lambda k: k.encode("utf-8", "surrogatepass"))})
        with open_model(tmp) as m:
            got = m.digest().hex()
        if not digests_equal(got, model_blake3):
            raise IntegrityError(f"{output}: the PyTorch file written does not hold the patch's target tensors "
                                 f"(model BLAKE3 {got}, expected {model_blake3})", what="target",
                                 expected=model_blake3, actual=got)
        os.replace(tmp, output)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fsync_dir(directory)
    return ApplyResult(output, os.path.getsize(output), hash_file(output), r.ops, verify, r.hashed, r.links)


def _build_onnx(plan: Plan, b, output: str, verify: str, progress: ProgressFn, patch: Patch) -> ApplyResult:
    """An ONNX target: build its tensors as safetensors, put them back into the
    patch's skeleton, and check every file against the digest the patch gives
    it before writing (external data files first, the model file last, each
    atomically)."""
    from .weights.onnx_file import rebuild_external, rebuild_onnx
    from .weights.sharded import safe_relative_path

    t = patch.header.target
    s = t.skeleton
    skeleton = b"".join(codecs.decoded_chunks(patch.section(s), s.codec, s.size, [s.size], where="target.skeleton"))
    directory = os.path.dirname(os.path.abspath(output))
    try:
        with _staged(plan, b, output, verify, progress) as (r, st):
            tensors = {n: (i.dtype, i.shape, st.raw(n).tobytes()) for n, i in st.tensors.items()}
        try:
            files = {t.outputs[0].path: rebuild_onnx(skeleton, tensors)}
            files.update(rebuild_external(skeleton, tensors))
        except WeightsError as e:
            raise PatchFormatError(f"target skeleton: {e}", path=patch.path) from e
        del tensors
        if sorted(files) != sorted(o.path for o in t.outputs):
            raise PatchFormatError("target outputs do not list the files its skeleton makes", path=patch.path)
        for o in t.outputs:
            got = digest_bytes(files[o.path]).hex()
            if len(files[o.path]) != o.size or not digests_equal(got, o.blake3):
                raise IntegrityError(f"{o.path}: the ONNX file rebuilt does not match the patch's target (BLAKE3 "
                                     f"{got}, expected {o.blake3})", what=o.path, expected=o.blake3, actual=got)
        for o in t.outputs[1:]:  # external data first, the model that points at it last
            full = safe_relative_path(directory, o.path, what="external data location", source=patch.path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with atomic_write(full) as f:
                f.write(files[o.path])
        with atomic_write(output) as f:
            f.write(files[t.outputs[0].path])
    except OSError as e:
        if isinstance(e, NnpatchError):
            raise
        raise NnpatchIOError(f"{output}: cannot write: {e.strerror or e}") from e
    return ApplyResult(output, t.outputs[0].size, t.outputs[0].blake3, r.ops, verify, r.hashed, r.links)


def revert(new: str | os.PathLike[str], patch, output: str | os.PathLike[str], *,
           progress: ProgressFn | None = None) -> ApplyResult:
    """Rebuild the base of a reversible ``patch`` from its target ``new`` into ``output``.

    The result is always checked against the base's file digest in the patch.
    """
    output = os.fspath(output)
    refuse_unfinished(new)
    with contextlib.ExitStack() as stack:
        p = _open_patch(patch)
        if p is not patch:
            stack.callback(p.close)
        n = stack.enter_context(SafetensorsFile(new))
        plan = plan_revert(n, p)
        return build_file(plan, n, output, "full", progress or (lambda k: None), label="not the patch's target")
