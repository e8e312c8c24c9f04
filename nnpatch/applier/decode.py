"""Decode a patch's sections into a tensor's bytes: index arrays, value
chunks, the ``esort`` order, the kernel's scatter and combine, and the
arithmetic of quantized rows (``qrows``, :mod:`nnpatch.quantdelta`)."""

from __future__ import annotations

import math

import numpy as np

from .. import codecs, dtypes, kernel, quantdelta
from ..errors import PatchFormatError
from ..patchfile import Op, Patch
from ..weights import TensorInfo
from .plan import Step


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
    bound = info.shape[0] if op.kind in ("rows", "qrows") else info.numel
    try:
        return codecs.decode_indices(step.patch.section(op.index), op.index.codec, count=op.count, bound=bound,
                                     size=op.index.size, where=f"{op.name!r}.index")
    except PatchFormatError as e:
        if e.path is None:
            raise PatchFormatError(str(e), path=step.patch.path) from e
        raise


def row_bytes(op: Op, info: TensorInfo) -> int:
    return info.nbytes // info.shape[0] if op.kind in ("rows", "qrows") else info.itemsize


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
    if op.kind == "qrows" and s is op.values:
        _run_qrows(step, info, dst, indices)
        return
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


def decode_scales(step: Step) -> np.ndarray:
    return _scales(step.patch, step.op)


def _scales(patch: Patch, op: Op) -> np.ndarray:
    s = op.scales
    where = f"{op.name!r}.scales"
    raw = next(iter(codecs.decoded_chunks(patch.section(s), s.codec, s.size, [s.size], where=where)))
    return quantdelta.decode_scales(raw, where=where)


def check_qrows(patch: Patch, op: Op) -> None:
    """What a ``qrows`` op's sections must hold, checked without a base: finite scales, zero padding
    nibbles (``nnpatch verify``)."""
    try:
        _scales(patch, op)
        n = math.prod(op.target.shape) // op.target.shape[0]
        code_bytes = quantdelta.row_code_bytes(n, op.bits)
        if not code_bytes:
            return
        per = codecs.chunk_units(n)
        s = op.values
        where = f"{op.name!r}.values"
        sizes = codecs.value_chunk_sizes(op.count, code_bytes, n)
        for i, chunk in enumerate(codecs.decoded_chunks(patch.section(s), s.codec, s.size, sizes, where=where)):
            quantdelta.unpack_codes(chunk, min(per, op.count - i * per), n, op.bits, where=where)
    except PatchFormatError as e:
        if e.path is None:
            raise PatchFormatError(str(e), path=patch.path) from e
        raise


def _run_qrows(step: Step, info: TensorInfo, dst: np.ndarray, indices: np.ndarray | None) -> None:
    """Rebuild the changed rows from their old values, scales and codes (spec section 7.5), a chunk of
    rows at a time."""
    op = step.op
    unit = row_bytes(op, info)
    n = unit // info.itemsize
    code_bytes = quantdelta.row_code_bytes(n, op.bits)
    idx = decode_index(step, info) if indices is None else indices
    scales = decode_scales(step)
    if n == 0:  # rows without elements: nothing to change
        return
    per = codecs.chunk_units(n)
    sizes = codecs.value_chunk_sizes(op.count, code_bytes, n)
    words = quantdelta.word_dtype(info.dtype)
    where = f"{op.name!r}.values"
    s = op.values
    for i, chunk in enumerate(codecs.decoded_chunks(step.patch.section(s), s.codec, s.size, sizes, where=where)):
        sel = idx[i * per : (i + 1) * per]
        codes = quantdelta.unpack_codes(chunk, len(sel), n, op.bits, where=where)
        old = kernel.gather_rows(dst, unit, sel).view(words).reshape(len(sel), n)
        scale = scales if len(scales) == 1 else scales[i * per : (i + 1) * per]
        new = quantdelta.apply_codes(old, scale, codes, info.dtype)
        kernel.scatter_rows(dst, unit, sel, np.ascontiguousarray(new).view(np.uint8).reshape(-1), info.itemsize,
                            "replace", planar=False)
