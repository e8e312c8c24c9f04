"""Apply a patch: rebuild the target model byte for byte from the base.

Order of work (spec/FORMAT.md, "Applying"): the patch is validated whole
(structure and trailer hash) before the base is opened; the base's tensor set
is checked against the patch; the output is built in a temporary file beside
the destination, where each touched base tensor is checked against its digest
before it is used and every other base tensor is hashed as it is copied; the
output is committed by rename only when the base model digest and the target
file digest both match. The base is only ever read.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import numpy as np

from . import codecs, dtypes, kernel
from .atomic import fsync_dir
from .errors import BaseMismatchError, IntegrityError, NnpatchIOError, PatchFormatError, WeightsError
from .hashing import ModelHasher, digest_bytes, digests_equal
from .patchfile import Op, Patch, read_patch
from .weights import SafetensorsFile, TensorInfo, parse_safetensors_header

ProgressFn = Callable[[int], None]

_MODE_OF_STAGE = {"xor": "xor", "add": "add", "zadd": "zadd", None: "replace"}


@dataclass
class ApplyResult:
    output: str
    size: int
    blake3: str
    ops: int


def target_layout(patch: Patch) -> tuple[bytes, dict | None, dict[str, TensorInfo]]:
    """The target's safetensors header carried by the patch, decoded and validated."""
    s = patch.header.target.layout
    raw = b"".join(codecs.decoded_chunks(patch.section(s), s.codec, s.size, [s.size], where="target.layout"))
    try:
        metadata, tensors = parse_safetensors_header(raw, file_size=patch.header.target.size,
                                                     path=f"{patch.path}: target layout")
    except WeightsError as e:
        raise PatchFormatError(str(e)) from e
    if len(raw) != 8 + int.from_bytes(raw[:8], "little"):
        raise PatchFormatError("target layout carries bytes beyond the safetensors header", path=patch.path)
    return raw, metadata, tensors


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
        op = ops.get(name)
        if op is None:
            src = base.tensors.get(name)
            if src is None:
                raise BaseMismatchError(f"{base.path}: wrong base: tensor {name!r} is missing")
            if src.dtype != info.dtype or src.shape != info.shape:
                raise BaseMismatchError(
                    f"{base.path}: wrong base: tensor {name!r} is {src.dtype}{list(src.shape)}, "
                    f"the patch expects {info.dtype}{list(info.shape)}")
        elif op.target is None:
            raise PatchFormatError(f"tensor {name!r} is removed by the patch but present in the target layout",
                                   path=patch.path)
        elif op.target.dtype != info.dtype or op.target.shape != info.shape:
            raise PatchFormatError(f"tensor {name!r}: op and target layout disagree on dtype or shape",
                                   path=patch.path)
    for name, op in ops.items():
        if op.target is not None and name not in layout:
            raise PatchFormatError(f"tensor {name!r} is written by an op but missing from the target layout",
                                   path=patch.path)
    if len(base.tensors) != hb.tensors:
        raise BaseMismatchError(
            f"{base.path}: wrong base: {len(base.tensors)} tensors, the patch's base has {hb.tensors}")


def apply(base: str | os.PathLike[str], patch: str | os.PathLike[str], output: str | os.PathLike[str], *,
          progress: ProgressFn | None = None) -> ApplyResult:
    """Rebuild the target of ``patch`` from ``base`` into ``output`` (atomically)."""
    output = os.fspath(output)
    with read_patch(patch) as p, SafetensorsFile(base) as b:
        raw_layout, _, layout = target_layout(p)
        check_base(p, b, layout)
        return _build(p, b, raw_layout, layout, output, progress or (lambda n: None))


def _build(p: Patch, b: SafetensorsFile, raw_layout: bytes, layout: dict[str, TensorInfo], output: str,
           progress: ProgressFn) -> ApplyResult:
    size = p.header.target.size
    directory = os.path.dirname(os.path.abspath(output))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(output) + ".", suffix=".tmp", dir=directory)
    except OSError as e:
        raise NnpatchIOError(f"{output}: cannot write: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "r+b") as f:
            try:
                os.ftruncate(f.fileno(), size)
                out = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_WRITE) if size else None
            except OSError as e:
                raise NnpatchIOError(f"{output}: cannot write: {e.strerror or e}") from e
            try:
                _fill(p, b, raw_layout, layout, out, progress)
                if out is not None:
                    out.flush()
                digest = _hash_map(out)
            finally:
                if out is not None:
                    with contextlib.suppress(BufferError):
                        out.close()
            if not digests_equal(digest, p.header.target.blake3):
                raise IntegrityError(
                    f"{output}: result does not match the patch's target (BLAKE3 {digest[:16]}..., "
                    f"expected {p.header.target.blake3[:16]}...)", what="target", expected=p.header.target.blake3,
                    actual=digest)
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return ApplyResult(output, size, digest, len(p.ops))


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _hash_map(out) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if out is not None:
        h.update(out)
    return h.hexdigest()


def _fill(p: Patch, b: SafetensorsFile, raw_layout: bytes, layout: dict[str, TensorInfo], out,
          progress: ProgressFn) -> None:
    ops = {op.name: op for op in p.ops}
    model = ModelHasher()
    if out is not None:
        out[: len(raw_layout)] = raw_layout
    for name, info in layout.items():
        dst = np.frombuffer(out, dtype=np.uint8, count=info.nbytes, offset=info.begin) if info.nbytes else None
        op = ops.get(name)
        if op is None or op.kind != "add":
            src = b.raw(name)
            d = digest_bytes(src)
            model.add(name, b.tensors[name].dtype, b.tensors[name].shape, d)
            if op is not None:
                _require_base_tensor(b, op, d)
        if op is None:
            if dst is not None:
                dst[:] = src
        else:
            if op.kind in ("rows", "elements") or codecs.delta_stage(op.values.codec):
                if dst is not None:
                    dst[:] = src
            _decode_into(p, op, info, dst)
        progress(info.nbytes)
    for op in p.ops:
        if op.kind == "remove":
            src = b.raw(op.name)
            d = digest_bytes(src)
            _require_base_tensor(b, op, d)
            model.add(op.name, op.base.dtype, op.base.shape, d)
    got = model.digest().hex()
    if not digests_equal(got, p.header.base.model_blake3):
        raise BaseMismatchError(
            f"{b.path}: wrong base: tensor contents differ from the patch's base (model BLAKE3 {got[:16]}..., "
            f"expected {p.header.base.model_blake3[:16]}...)", what="base", expected=p.header.base.model_blake3,
            actual=got)


def _require_base_tensor(b: SafetensorsFile, op: Op, digest: bytes) -> None:
    if not digests_equal(digest.hex(), op.base.blake3):
        raise BaseMismatchError(
            f"{b.path}: wrong base: tensor {op.name!r} differs from the patch's base "
            f"(BLAKE3 {digest.hex()[:16]}..., expected {op.base.blake3[:16]}...)",
            what=op.name, expected=op.base.blake3, actual=digest.hex())


def _decode_into(p: Patch, op: Op, info: TensorInfo, dst: np.ndarray | None) -> None:
    width = dtypes.ITEMSIZE[info.dtype]
    where = f"{op.name!r}.values"
    s = op.values
    mode = _MODE_OF_STAGE[codecs.delta_stage(s.codec)]
    planar = "planes" in s.codec
    if op.kind in ("rows", "elements"):
        if op.kind == "rows":
            bound = info.shape[0]
            row_bytes = info.nbytes // bound
        else:
            bound = info.numel
            row_bytes = width
        idx = codecs.decode_indices(p.section(op.index), op.index.codec, count=op.count, bound=bound,
                                    size=op.index.size, where=f"{op.name!r}.index")
        unit_elements = row_bytes // width
        per = codecs.chunk_units(unit_elements)
        sizes = codecs.value_chunk_sizes(op.count, row_bytes, unit_elements)
        for i, chunk in enumerate(codecs.decoded_chunks(p.section(s), s.codec, s.size, sizes, where=where)):
            sel = idx[i * per : (i + 1) * per]
            if op.kind == "rows":
                kernel.scatter_rows(dst, row_bytes, sel, chunk, width, mode, planar=planar)
            else:
                kernel.scatter_elements(dst, sel, chunk, width, mode, planar=planar)
        return
    sizes = codecs.value_chunk_sizes(info.numel, width, 1)
    pos = 0
    for chunk in codecs.decoded_chunks(p.section(s), s.codec, s.size, sizes, where=where):
        part = dst[pos : pos + len(chunk)]
        if mode == "replace":
            if planar:
                kernel.unplanes(chunk, width, out=part)
            else:
                part[:] = chunk
        else:
            kernel.combine(part, chunk, width, mode, planar=planar)
        pos += len(chunk)
