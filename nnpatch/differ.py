"""Make a patch: compare two models tensor by tensor, pick the cheapest op
for each changed tensor and the smallest codec for each section.

Ops (spec/FORMAT.md, "Ops"): ``rows`` (changed output channels along dim 0),
``elements`` (single changed values), ``whole`` (the tensor re-sent, relative
to the old one when dtype and shape allow), ``add`` and ``remove``.
Everything is compared as bit patterns, never as numbers, so NaN payloads
and -0.0 survive.

``qrows`` (format 1.3, exact quantized deltas) is written only for the
tensors a caller names in ``quantized``, with the rows, scales and codes that
made the target (:class:`nnpatch.quantdelta.QuantDelta`): recovering them from
two arbitrary tensors is not attempted. The differ checks that they rebuild
the target exactly before it writes them.
"""

from __future__ import annotations

import contextvars
import io
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from . import codecs, dtypes, quantdelta, skeldelta
from ._version import __version__
from .errors import NnpatchIOError, UsageError, WeightsError
from .hashing import ModelHasher, canonical_order, digest_bytes, directory_digest, hash_file
from .patchfile import ModelRef, Op, OutputFile, PatchHeader, PatchWriter, Section, TargetFile, TensorRef
from .signing import signer_from_file
from .quantdelta import QuantDelta
from .weights import SafetensorsFile, write_safetensors
from .weights.extents import encode_table, skeleton_of
from .weights.model import EXTENTS_KINDS
from .weights.onnx_file import rebuild_external, rebuild_onnx
from .weights.source import ModelSource, open_source

#: Sections up to this size try every codec; larger ones choose on a sample.
_TRY_ALL_BYTES = 256 << 10
#: An extents skeleton up to this size is compressed at SMALL_SECTION_LEVEL, a larger one at _SKELETON_LEVEL.
_SKELETON_TOP_LEVEL_BYTES = 64 << 10
_SKELETON_LEVEL = 15
_SAMPLE_ELEMENTS = 1 << 16
#: Tensors up to this size try every op; larger ones choose by estimate.
_TRY_ALL_OPS_BYTES = 256 << 10
#: Cost model for larger tensors, in bytes per value: a changed value costs
#: about its width, an unchanged one sent alongside it (a zero after the
#: delta) almost nothing, an element index about 1.5 bytes as varint gaps.
_ZERO_COST = 0.02
_INDEX_COST = 1.5
#: Rows compared per step when scanning a tensor for changes.
_SCAN_ELEMENTS = 1 << 22

RELATIVE_CODECS = (["zadd", "planes", "zstd"], ["zadd", "esort", "planes", "zstd"], ["xor", "planes", "zstd"],
                   ["planes", "zstd"], ["zstd"], [])
#: "whole" rewrites every byte of a tensor on apply (and in place); it must
#: beat rows/elements by this factor to be chosen.
_WHOLE_PENALTY = 1.02
ABSOLUTE_CODECS = (["planes", "zstd"], ["zstd"], [])
#: Reversible patches need a delta stage on rows and elements (their old
#: values are not stored otherwise).
#: ``esort`` takes its order from the old values, which revert does not have.
DELTA_CODECS = tuple(c for c in RELATIVE_CODECS if codecs.delta_stage(c) and "esort" not in c) + (["xor"],)
REVERSIBLE_WHOLE_CODECS = tuple(c for c in RELATIVE_CODECS if "esort" not in c)

ProgressFn = Callable[[int], None]


class _TensorProgress:
    """Progress inside one tensor: the final encoding of its values reports each chunk as it is
    compressed (at a high --level one large tensor takes seconds), and whatever is left of the
    tensor's bytes is reported when it is done; the total is the tensor's bytes either way."""

    def __init__(self, progress: ProgressFn, nbytes: int) -> None:
        self.progress, self.nbytes, self.done = progress, nbytes, 0

    def part(self, fraction: float) -> None:
        n = min(self.nbytes - self.done, int(self.nbytes * fraction))
        if n > 0:
            self.done += n
            self.progress(n)

    def finish(self) -> None:
        if self.done < self.nbytes:
            self.progress(self.nbytes - self.done)
        self.done = self.nbytes


#: The tensor being encoded, for ``_write_stream`` to report into (None outside a diff).
_TENSOR: contextvars.ContextVar[_TensorProgress | None] = contextvars.ContextVar("nnpatch_diff_tensor", default=None)


def _reporting(chunks, stream_size: int):
    """``chunks`` of a value stream, reporting each one's share of the tensor once it is encoded."""
    tensor = _TENSOR.get()
    for new, old in chunks:
        yield new, old
        if tensor is not None and stream_size:
            tensor.part(len(new) / stream_size)


@dataclass
class TensorChange:
    """What diff found for one tensor (the rows of ``nnpatch diff --stat``)."""

    name: str
    op: str
    dtype: str
    shape: tuple[int, ...]
    rows_changed: int = 0
    rows_total: int = 0
    elements_changed: int = 0
    elements_total: int = 0
    patch_bytes: int = 0
    codec: list[str] = field(default_factory=list)


@dataclass
class DiffResult:
    path: str
    patch_size: int
    base_size: int
    target_size: int
    tensors_total: int
    changes: list[TensorChange]
    trailer_hash: str = ""

    @property
    def ratio(self) -> float:
        return self.patch_size / self.target_size if self.target_size else 0.0


def diff(base: str | os.PathLike[str], target: str | os.PathLike[str], output: str | os.PathLike[str], *,
         level: int = codecs.DEFAULT_LEVEL, reversible: bool = False, sign_key: str | None = None,
         progress: ProgressFn | None = None,
         quantized: Mapping[str, QuantDelta] | str | os.PathLike[str] | None = None,
         aligned: bool = False) -> DiffResult:
    """Write a patch that turns ``base`` into ``target``, byte for byte.

    With ``reversible`` the patch also carries what it takes to go back
    (the base's layout, and the old bytes of removed or retyped tensors), so
    ``nnpatch revert`` can rebuild the base from the target. ``sign_key``
    (an Ed25519 private key, PEM) signs the patch.

    ``quantized`` maps tensor names to the quantized update that made them
    (or names a file of them, :func:`save_quant_deltas`): those tensors get a
    ``qrows`` op (format 1.3), after a check that the update rebuilds the
    target's bytes exactly. Such a patch cannot be reversible.

    Sections are packed end to end (format 1.5) where that saves bytes;
    ``aligned`` starts each on a 64-byte boundary instead, as readers of
    format 1.4 and before need.
    """
    signer = None
    if sign_key is not None:
        signer = signer_from_file(os.fspath(sign_key))
    if not codecs.MIN_LEVEL <= level <= codecs.MAX_LEVEL:
        raise UsageError(f"--level must be between {codecs.MIN_LEVEL} and {codecs.MAX_LEVEL}, got {level}")
    with open_source(base) as b, open_source(target) as t:
        if reversible and not isinstance(b, SafetensorsFile):
            raise UsageError("--reversible needs a safetensors base (revert writes the base back byte for byte)")
        if reversible and _kind(t) != "safetensors":
            raise UsageError("--reversible needs a safetensors target file (revert reads it back)")
        if isinstance(quantized, (str, os.PathLike)):
            quantized = load_quant_deltas(quantized)
        quantized = dict(quantized or {})
        if quantized and reversible:
            raise UsageError("quantized deltas (op 'qrows') cannot be reverted: drop --reversible or the deltas")
        for name in canonical_order(quantized):
            _check_quantized(b, t, name, quantized[name])
        return _diff_open(b, t, os.fspath(output), level, reversible, signer, progress or (lambda n: None),
                          quantized, aligned)


def _diff_open(b: SafetensorsFile, t: SafetensorsFile, output: str, level: int, reversible: bool, signer,
               progress: ProgressFn, quantized: dict[str, QuantDelta] | None = None,
               aligned: bool = False) -> DiffResult:
    writer = PatchWriter(output, packed=not aligned)
    try:
        base_model, target_model = ModelHasher(), ModelHasher()
        base_extents = _encode_layout(writer, _extent_table(b), level) if _kind(b) in EXTENTS_KINDS else None
        base_layout = _encode_layout(writer, b.header_bytes, level) if reversible else None
        directory = _is_directory(t)
        target_extents = _encode_layout(writer, _extent_table(t), level) if _kind(t) in EXTENTS_KINDS else None
        if directory:
            layout, files = None, _encode_files(writer, b, t, level)
        else:
            layout, files = _encode_layout(writer, t.header_bytes, level), None
        extents = _extents_target(writer, b, t, target_extents, level) if target_extents else None
        onnx = _onnx_target(writer, t, level) if _kind(t) == "onnx" else None
        ops: list[Op] = []
        changes: list[TensorChange] = []
        names = canonical_order(set(b.tensors) | set(t.tensors))
        for name in names:
            bi, ti = b.tensors.get(name), t.tensors.get(name)
            bd = digest_bytes(b.raw(name)) if bi else None
            td = digest_bytes(t.raw(name)) if ti else None
            if bi:
                base_model.add(name, bi.dtype, bi.shape, bd)
            if ti:
                target_model.add(name, ti.dtype, ti.shape, td)
            if bi and ti and bi.dtype == ti.dtype and bi.shape == ti.shape and bd == td:
                progress(ti.nbytes)
                continue
            bref = TensorRef(bi.dtype, bi.shape, bd.hex()) if bi else None
            tref = TensorRef(ti.dtype, ti.shape, td.hex()) if ti else None
            start = writer.stream.tell()
            tensor = _TensorProgress(progress, ti.nbytes if ti else 0)
            token = _TENSOR.set(tensor)
            try:
                if ti is None:
                    op, change = Op(name, "remove", base=bref), TensorChange(name, "remove", bi.dtype, bi.shape)
                elif bi is None or bref.dtype != tref.dtype or bref.shape != tref.shape:
                    op, change = _encode_absolute(writer, t, name, bref, tref, level)
                elif quantized and name in quantized:
                    op, change = _encode_quantized(writer, b, t, name, bref, tref, quantized[name], level)
                else:
                    op, change = _encode_changed(writer, b, t, name, bref, tref, level, reversible)
            finally:
                _TENSOR.reset(token)
            if reversible and op.needs_base_values:
                old = _Stream(b.bits(name).reshape(-1, 1), None, None, 1, dtypes.ITEMSIZE[bi.dtype])
                op.base_values = _write_stream(writer, old, False, level)
            change.patch_bytes = writer.stream.tell() - start
            ops.append(op)
            changes.append(change)
            tensor.finish()
        header = PatchHeader(
            base=ModelRef(_format(b), b.size, _file_digest(b), base_model.digest().hex(), len(b.tensors),
                          layout=base_layout, extents=base_extents),
            target=_target_ref(t, files, target_model.digest().hex(), layout, onnx or extents),
            ops=ops,
            created_by=f"nnpatch {__version__}",
        )
        size = writer.finish(header, signer)
    except BaseException:
        writer.abort()
        raise
    return DiffResult(output, size, b.size, t.size, len(t.tensors), changes, writer.trailer_hash)


def _is_directory(m) -> bool:
    return isinstance(m, ModelSource) and m.kind == "safetensors-dir"


def _target_ref(t, files: list[TargetFile] | None, model_blake3: str, layout: Section | None,
                onnx: tuple[Section, list[OutputFile]] | None) -> ModelRef:
    if files is not None:
        return ModelRef("safetensors-dir", sum(f.size for f in files),
                        directory_digest((f.path, f.blake3) for f in files), model_blake3, len(t.tensors),
                        files=files)
    # a target in another format is described by its tensors as a safetensors file in the canonical layout,
    # which apply builds first and then writes back in the target's format
    kind = _format(t) if _kind(t) in ("pytorch", "onnx", *EXTENTS_KINDS) else "safetensors"
    ref = ModelRef(kind, _target_size(t), _target_digest(t), model_blake3, len(t.tensors), layout=layout)
    if onnx is not None:
        ref.skeleton, ref.outputs = onnx[:2]
        ref.extents = onnx[2] if len(onnx) > 2 else None
    return ref


def _format(m) -> str:
    """The model's format in a patch: a file that nnpatch reads as tensor extents (GGUF, TFLite) is
    an ``extents`` model, which an applier rebuilds without knowing the file's own format."""
    return "extents" if _kind(m) in EXTENTS_KINDS else _kind(m)


def _extent_table(m: ModelSource) -> bytes:
    return encode_table(m.model.size, m.model.extents)


def _extents_target(writer: PatchWriter, b, t: ModelSource, table: Section, level: int):
    """An extents target's skeleton (every byte outside the tensors) and its one output.

    The skeleton goes whole (zstd when smaller) or, from an extents base, as a ``zstd-base``
    delta against the base's skeleton (format 1.5), whichever is smaller: a TFLite skeleton
    (flatbuffer, names, quantization scales) is 1-5 KB zstd'd, nearly all of it the base's."""
    m = t.model
    data = skeleton_of(m.data(), m.extents)
    # a vocabulary makes a skeleton of megabytes: level 19 takes seconds over it (0.6 s for 500 KB) to
    # save a few KB over level 15 (12.8 against 17.7 KB for 32k tokens); metadata alone keeps 19
    lvl = codecs.SMALL_SECTION_LEVEL if len(data) <= _SKELETON_TOP_LEVEL_BYTES else max(level, _SKELETON_LEVEL)
    codec, payload = codecs.zstd_if_smaller(data, lvl)
    if writer.packed and _kind(b) in EXTENTS_KINDS and data:  # --aligned: patches 1.4 readers take
        base = skeleton_of(b.model.data(), b.model.extents)
        delta = skeldelta.encode(data, base, level) if base else None
        if delta is not None and len(delta) < len(payload):
            codec, payload = [skeldelta.ZSTD_BASE], delta
    skeleton = writer.add_bytes(payload, len(data), codec)
    return skeleton, [OutputFile(os.path.basename(t.path), m.size, hash_file(t.path))], table


def _onnx_target(writer: PatchWriter, t: ModelSource, level: int) -> tuple[Section, list[OutputFile]]:
    """An ONNX target's skeleton, and the digests of the files apply will write from it: the
    rebuild is deterministic, and byte-identical to the target for every protobuf-serialized file."""
    m = t.model
    skeleton = _encode_layout(writer, m.skeleton, level)
    model_bytes = rebuild_onnx(m.skeleton, m.initializers)
    outputs = [OutputFile(os.path.basename(t.path), len(model_bytes), digest_bytes(model_bytes).hex())]
    for location, blob in sorted(rebuild_external(m.skeleton, m.initializers).items()):
        outputs.append(OutputFile(location, len(blob), digest_bytes(blob).hex()))
    return skeleton, outputs


def _encode_files(writer: PatchWriter, b, t: ModelSource, level: int) -> list[TargetFile]:
    """The files of a directory target: each shard by its header (its tensors
    come from the ops and the base), every other file copied from the base
    directory when the base has one with the same bytes, else carried whole."""
    same_path = b.file_digests() if _is_directory(b) else {}  # path -> digest (hashed once, cached)
    by_digest: dict[str, str] = {}  # digest -> a base path holding those bytes
    for path, digest in same_path.items():
        by_digest.setdefault(digest, path)
    digests = t.file_digests()
    out = []
    for f in t.model.files:
        digest = digests[f.path]
        shard = t.model.shards.get(f.path)
        if shard is not None:
            out.append(TargetFile(f.path, "safetensors", f.size, digest,
                                  layout=_encode_layout(writer, shard.header_bytes, level)))
        elif digest in by_digest:
            source = f.path if same_path.get(f.path) == digest else by_digest[digest]
            out.append(TargetFile(f.path, "copy", f.size, digest, source=source))
        else:
            content = _encode_blob(writer, os.path.join(t.path, *f.path.split("/")), f.size, level)
            out.append(TargetFile(f.path, "blob", f.size, digest, content=content))
    return out


def _kind(m) -> str:
    return m.kind if isinstance(m, ModelSource) else "safetensors"


def _file_digest(m) -> str:
    return m.file_digest() if isinstance(m, ModelSource) else hash_file(m.path)


def _target_size(m) -> int:
    return m.canonical_size if isinstance(m, ModelSource) else m.size


def _target_digest(m) -> str:
    return m.canonical_digest() if isinstance(m, ModelSource) else hash_file(m.path)


def _encode_layout(writer: PatchWriter, header_bytes: bytes, level: int) -> Section:
    codec, payload = codecs.zstd_if_smaller(header_bytes, max(level, codecs.SMALL_SECTION_LEVEL))
    return writer.add_bytes(payload, len(header_bytes), codec)


def _encode_blob(writer: PatchWriter, path: str, size: int, level: int) -> Section:
    """A whole file as one section, streamed (a directory may hold big files
    that are not weights): zstd when that is smaller, else raw."""
    import shutil

    start = writer.begin_section()
    z = codecs.zstd_compressor(codecs.file_level(level, size))
    spool = writer.stream
    with open(path, "rb") as fh:
        _, written = z.copy_stream(fh, spool, size=size)
        if written < size:
            return Section(start, written, size, ["zstd"])
        spool.seek(start)
        spool.truncate()
        fh.seek(0)
        shutil.copyfileobj(fh, spool, 8 << 20)
    if spool.tell() - start != size:
        raise NnpatchIOError(f"{path}: file changed size while it was being read")
    return Section(start, size, size, [])


# --- the value streams ---------------------------------------------------------

class _Stream:
    """The values one op stores, as (new, old) uint8 chunks in planes-chunk units."""

    def __init__(self, new_units: np.ndarray, old_units: np.ndarray | None, index: np.ndarray | None,
                 unit_elements: int, width: int, dtype: str | None = None) -> None:
        # new_units / old_units: uint words shaped (units, unit_elements)
        self.new, self.old, self.index = new_units, old_units, index
        self.unit_elements, self.width, self.dtype = unit_elements, width, dtype
        self.units = len(index) if index is not None else new_units.shape[0]

    @property
    def size(self) -> int:
        return self.units * self.unit_elements * self.width

    def chunks(self, limit_elements: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        per = codecs.chunk_units(self.unit_elements)
        end = self.units
        if limit_elements is not None:
            end = min(end, max(1, limit_elements // max(1, self.unit_elements)))
        for lo in range(0, end, per):
            hi = min(lo + per, end)
            sel = self.index[lo:hi] if self.index is not None else slice(lo, hi)
            new = np.ascontiguousarray(self.new[sel]).reshape(-1).view(np.uint8)
            old = np.ascontiguousarray(self.old[sel]).reshape(-1).view(np.uint8) if self.old is not None else None
            yield new, old


def _choose_codec(stream: _Stream, candidates, level: int) -> tuple[list[str], bytes | None]:
    """The smallest candidate codec, with its encoding when that was made in full (small
    sections try every codec on all their values), so that it is written as is, not made twice."""
    if stream.width == 1:  # planes is the identity on 1-byte words: the same codecs without it
        candidates = tuple(dict.fromkeys(tuple(s for s in c if s != "planes") for c in candidates))
        candidates = tuple(list(c) for c in candidates)
    if stream.old is None or stream.dtype not in codecs.EXPONENT_FIELDS:
        candidates = tuple(c for c in candidates if "esort" not in c)
    if stream.size <= _TRY_ALL_BYTES:
        return min(((c, _encode(stream, c, level, None)) for c in candidates), key=lambda e: (len(e[1]), len(e[0])))
    sample_level = min(level, 3)
    return min(candidates, key=lambda c: (len(_encode(stream, c, sample_level, _SAMPLE_ELEMENTS)), len(c))), None


def _encode(stream: _Stream, codec: list[str], level: int, limit: int | None) -> bytes:
    """``stream`` (its first ``limit`` elements' worth of units, when given) encoded with ``codec``."""
    buf = io.BytesIO()
    chunks = list(stream.chunks(limit))
    size = sum(len(n) for n, _ in chunks)
    codecs.encode_value_stream(buf, iter(chunks), codec=codec, width=stream.width, size=size, level=level,
                               dtype=stream.dtype)
    return buf.getvalue()


def _write_stream(writer: PatchWriter, stream: _Stream, relative: bool | tuple, level: int) -> Section:
    """Encode ``stream`` with the smallest of the candidate codecs: relative
    ones (True), absolute ones (False), or the given tuple."""
    candidates = relative if isinstance(relative, tuple) else RELATIVE_CODECS if relative else ABSOLUTE_CODECS
    codec, encoded = _choose_codec(stream, candidates, level)
    start = writer.begin_section()
    out = writer.stream
    if encoded is not None:
        out.write(encoded)
        length = len(encoded)
    else:
        length = codecs.encode_value_stream(out, _reporting(stream.chunks(), stream.size), codec=codec,
                                            width=stream.width, size=stream.size, level=level, dtype=stream.dtype)
    if codec and codec[-1] == "zstd" and length > stream.size:  # compression lost: store raw instead
        out.seek(start)
        out.truncate()
        codec = [codecs.delta_stage(codec)] if codecs.delta_stage(codec) and candidates is DELTA_CODECS else []
        length = codecs.encode_value_stream(out, stream.chunks(), codec=codec, width=stream.width,
                                            size=stream.size, level=level)
    return Section(start, length, stream.size, codec)


def _units(bits: np.ndarray, unit_elements: int) -> np.ndarray:
    return bits.reshape(-1, unit_elements) if unit_elements else bits.reshape(0, 0)


def _encode_absolute(writer, t: SafetensorsFile, name: str, bref, tref, level):
    width = dtypes.ITEMSIZE[tref.dtype]
    flat = t.bits(name).reshape(-1, 1)
    op = Op(name, "whole" if bref else "add", base=bref, target=tref)
    op.values = _write_stream(writer, _Stream(flat, None, None, 1, width), False, level)
    numel = math.prod(tref.shape)
    change = TensorChange(name, op.kind, tref.dtype, tref.shape, elements_changed=numel, elements_total=numel,
                          codec=op.values.codec)
    return op, change


def _scan(b_units: np.ndarray, t_units: np.ndarray, want_elements: bool):
    """Changed rows and (when few enough to matter) changed flat element indices."""
    nrows, row = t_units.shape
    step = max(1, _SCAN_ELEMENTS // max(1, row))
    rows_changed = []
    elems = []
    n_elems = 0
    limit = (nrows * row) // 4
    for lo in range(0, nrows, step):
        neq = b_units[lo : lo + step] != t_units[lo : lo + step]
        any_row = neq.any(axis=1)
        rows_changed.append(np.flatnonzero(any_row) + lo)
        k = int(np.count_nonzero(neq))
        n_elems += k
        if want_elements and n_elems <= limit:
            elems.append(np.flatnonzero(neq).astype(np.uint64) + np.uint64(lo * row))
        else:
            want_elements = False
    rows = np.concatenate(rows_changed).astype(np.uint64) if rows_changed else np.empty(0, np.uint64)
    el = np.concatenate(elems) if (want_elements and elems) else (np.empty(0, np.uint64) if want_elements else None)
    return rows, el, n_elems


def _encode_changed(writer: PatchWriter, b: SafetensorsFile, t: SafetensorsFile, name: str, bref, tref, level,
                    reversible: bool = False):
    width = dtypes.ITEMSIZE[tref.dtype]
    shape = tref.shape
    numel = math.prod(shape)
    nrows = shape[0] if shape else 1
    row = numel // nrows if nrows else 0
    bu = _units(b.bits(name), row)
    tu = _units(t.bits(name), row)
    rows, elems, n_elems = _scan(bu, tu, want_elements=True)

    candidates: list[tuple[str, Callable[[PatchWriter], Op]]] = []

    def whole(w: PatchWriter) -> Op:
        op = Op(name, "whole", base=bref, target=tref)
        op.values = _write_stream(w, _Stream(tu.reshape(-1, 1), bu.reshape(-1, 1), None, 1, width, tref.dtype),
                                  REVERSIBLE_WHOLE_CODECS if reversible else True, level)
        return op

    def by_rows(w: PatchWriter) -> Op:
        op = Op(name, "rows", base=bref, target=tref, count=len(rows))
        op.index = _write_index(w, rows, nrows, level)
        op.values = _write_stream(w, _Stream(tu, bu, rows, row, width, tref.dtype),
                                  DELTA_CODECS if reversible else True, level)
        return op

    def by_elements(w: PatchWriter) -> Op:
        op = Op(name, "elements", base=bref, target=tref, count=len(elems))
        op.index = _write_index(w, elems, numel, level)
        flat_t, flat_b = tu.reshape(-1, 1), bu.reshape(-1, 1)
        op.values = _write_stream(w, _Stream(flat_t, flat_b, elems, 1, width, tref.dtype),
                                  DELTA_CODECS if reversible else True, level)
        return op

    changed_bytes = n_elems * width
    estimates = {"whole": (changed_bytes + (numel - n_elems) * width * _ZERO_COST) * _WHOLE_PENALTY}
    candidates.append(("whole", whole))
    if len(shape) >= 2 and row > 1 and len(rows) < nrows:
        candidates.append(("rows", by_rows))
        estimates["rows"] = changed_bytes + (len(rows) * row - n_elems) * width * _ZERO_COST + len(rows)
    if elems is not None and len(elems) and 2 * len(elems) <= numel:  # the spec's bound on `elements`
        candidates.append(("elements", by_elements))
        estimates["elements"] = changed_bytes + n_elems * _INDEX_COST

    if len(candidates) == 1:
        chosen = candidates[0][1](writer)
    elif numel * width <= _TRY_ALL_OPS_BYTES:  # small: cheap enough to encode every op and compare
        chosen = _smallest(writer, candidates)
    else:
        kind = min(estimates, key=estimates.get)
        chosen = dict(candidates)[kind](writer)
    change = TensorChange(name, chosen.kind, tref.dtype, shape, rows_changed=len(rows), rows_total=nrows,
                          elements_changed=n_elems, elements_total=numel, codec=chosen.values.codec)
    return chosen, change


def _smallest(writer: PatchWriter, candidates) -> Op:
    """Encode each candidate into memory and copy the smallest into the patch."""
    best = None
    for kind, make in candidates:
        scratch = _ScratchWriter()
        op = make(scratch)
        cost = scratch.size() * (_WHOLE_PENALTY if kind == "whole" else 1.0)
        if best is None or cost < best[0]:
            best = (cost, op, scratch)
    _, op, scratch = best
    for s in op.sections():
        data = scratch.payload(s)
        placed = writer.add_bytes(data, s.size, s.codec)
        s.offset = placed.offset
    return op


class _ScratchWriter:
    """A PatchWriter stand-in that keeps sections in memory."""

    def __init__(self) -> None:
        self.stream = io.BytesIO()

    def begin_section(self) -> int:
        return self.stream.tell()

    def add_bytes(self, payload: bytes, size: int, codec: list[str]) -> Section:
        start = self.stream.tell()
        self.stream.write(payload)
        return Section(start, len(payload), size, list(codec))

    def size(self) -> int:
        return self.stream.tell()

    def payload(self, s: Section) -> bytes:
        return self.stream.getbuffer()[s.offset : s.offset + s.length].tobytes()


def _write_index(writer, indices: np.ndarray, bound: int, level: int) -> Section:
    codec, payload, size = codecs.best_index_encoding(indices, bound, level)
    return writer.add_bytes(payload, size, codec)



# --- quantized deltas (qrows, format 1.3) -----------------------------------------------------

def _check_quantized(b, t, name: str, qd: QuantDelta) -> None:
    """``qd`` applied to the base's tensor ``name`` gives the target's, bit for bit."""
    bi, ti = b.tensors.get(name), t.tensors.get(name)
    if bi is None or ti is None:
        raise UsageError(f"quantized delta for {name!r}: the {'base' if bi is None else 'target'} has no such "
                         "tensor")
    if bi.dtype != ti.dtype or bi.shape != ti.shape:
        raise UsageError(f"quantized delta for {name!r}: base and target differ in dtype or shape")
    if ti.dtype not in quantdelta.DTYPES or not ti.shape:
        raise UsageError(f"quantized delta for {name!r}: op 'qrows' changes tensors of rank 1 or more of "
                         f"{', '.join(quantdelta.DTYPES)}, not {ti.dtype}{list(ti.shape)}")
    nrows = ti.shape[0]
    row = math.prod(ti.shape) // nrows if nrows else 0
    if qd.codes.shape[1] != row or (len(qd.rows) and int(qd.rows[-1]) >= nrows):
        raise UsageError(f"quantized delta for {name!r}: codes {list(qd.codes.shape)} and rows up to "
                         f"{int(qd.rows[-1]) if len(qd.rows) else '-'} do not fit {nrows} rows of {row} elements")
    made = qd.apply(_units(b.bits(name), row), ti.dtype)
    want = _units(t.bits(name), row)
    bad = np.flatnonzero((made != want).any(axis=1)) if made.size else np.empty(0, np.intp)
    if len(bad):
        raise UsageError(f"quantized delta for {name!r}: it does not rebuild the target (row {int(bad[0])} "
                         "differs); the target must be made with nnpatch.quantdelta's arithmetic")


def _encode_quantized(writer, b: SafetensorsFile, t: SafetensorsFile, name: str, bref, tref, qd: QuantDelta,
                      level: int):
    shape = tref.shape
    nrows = shape[0]
    row = math.prod(shape) // nrows if nrows else 0
    op = Op(name, "qrows", base=bref, target=tref, count=len(qd.rows), bits=qd.bits)
    op.index = _write_index(writer, qd.rows, nrows, level)
    op.scales = _write_packed(writer, qd.scales.astype("<f4").tobytes(), level)
    op.values = _write_packed(writer, quantdelta.pack_codes(qd.codes, qd.bits).tobytes(), level)
    sel = qd.rows.astype(np.intp)
    n_elems = int(np.count_nonzero(_units(b.bits(name), row)[sel] != _units(t.bits(name), row)[sel]))
    change = TensorChange(name, "qrows", tref.dtype, shape, rows_changed=len(qd.rows), rows_total=nrows,
                          elements_changed=n_elems, elements_total=math.prod(shape), codec=op.values.codec)
    return op, change


def _write_packed(writer, data: bytes, level: int) -> Section:
    """Bytes stored as zstd where that is smaller, else raw (the codecs a ``qrows`` op allows)."""
    codec, payload = codecs.zstd_if_smaller(data, level)
    return writer.add_bytes(payload, len(data), codec)


#: Parts of a quantized delta in a deltas file: tensor ``NAME.PART`` for each.
_DELTA_PARTS = {"rows": "U64", "scales": "F32", "codes": "I8", "bits": "U8"}


def save_quant_deltas(path: str | os.PathLike[str], deltas: Mapping[str, QuantDelta]) -> None:
    """Write quantized deltas as a safetensors file (what ``diff(quantized=PATH)`` reads): for each tensor
    NAME, ``NAME.rows`` (U64), ``NAME.scales`` (F32), ``NAME.codes`` (I8, rows x row elements) and
    ``NAME.bits`` (U8 scalar)."""
    out = {}
    for name, qd in deltas.items():
        out[f"{name}.rows"] = ("U64", (len(qd.rows),), qd.rows.astype("<u8").tobytes())
        out[f"{name}.scales"] = ("F32", (len(qd.scales),), qd.scales.astype("<f4").tobytes())
        out[f"{name}.codes"] = ("I8", tuple(qd.codes.shape), qd.codes.astype(np.int8).tobytes())
        out[f"{name}.bits"] = ("U8", (), bytes([qd.bits]))
    write_safetensors(path, out, {"format": "nnpatch-quant-deltas-1"})


def load_quant_deltas(path: str | os.PathLike[str]) -> dict[str, QuantDelta]:
    """Read a file written by :func:`save_quant_deltas`."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    with SafetensorsFile(path) as f:
        for key, info in f.tensors.items():
            name, _, part = key.rpartition(".")
            if part not in _DELTA_PARTS or info.dtype != _DELTA_PARTS[part] or not name:
                raise WeightsError(f"{f.path}: tensor {key!r} is not part of a quantized delta")
            parts.setdefault(name, {})[part] = np.array(f.raw(key), dtype=np.uint8).reshape(
                info.shape if part == "codes" else -1)
    out = {}
    for name, p in parts.items():
        if set(p) != set(_DELTA_PARTS):
            raise WeightsError(f"{os.fspath(path)}: quantized delta {name!r} lacks "
                               f"{sorted(set(_DELTA_PARTS) - set(p))[0]!r}")
        if p["bits"].size != 1:
            raise WeightsError(f"{os.fspath(path)}: quantized delta {name!r}: 'bits' holds {p['bits'].size} "
                               "values, expected 1")
        try:
            out[name] = QuantDelta(p["rows"].view("<u8"), p["scales"].view("<f4"), p["codes"].view(np.int8),
                                   int(p["bits"][0]))
        except ValueError as e:
            raise WeightsError(f"{os.fspath(path)}: quantized delta {name!r}: {e}") from e
    return out
