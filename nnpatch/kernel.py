"""Hot loops of ``apply``: byte planes, element-wise combine, row scatter.

Two interchangeable backends give bit-identical results:

* ``"c"``: the optional extension :mod:`nnpatch._kernel` (fused byte-plane
  decode + combine + scatter, GIL released);
* ``"numpy"``: a pure-numpy fallback, used when the extension was not built.

``backend`` names the active one.  :func:`select` switches; at import the
environment variable ``NNPATCH_KERNEL`` (``auto`` | ``c`` | ``numpy``,
default ``auto`` = ``c`` when built) picks it.

Data model: a tensor is a flat little-endian byte buffer of words of
``width`` bytes (1, 2, 4 or 8).  A *row* is ``row_nbytes`` consecutive bytes
(a multiple of ``width``).  Values may be stored *byte-planar*: byte ``k`` of
every word first grouped in plane ``k`` (:func:`planes`), which compresses
better; the planar flag un-planes them on the fly.

Combine modes, on unsigned ``8*width``-bit words ``d`` (dst) and ``v``::

    replace  d = v
    xor      d = d ^ v
    add      d = d + v             (mod 2**(8*width))
    sub      d = d - v
    zadd     d = d + unzigzag(v)   unzigzag(z) = (z >> 1) ^ -(z & 1)
    zsub     d = d - unzigzag(v)

Every function takes any buffer-protocol object (bytes, bytearray,
memoryview, numpy array, mmap) that is C-contiguous; destinations must be
writable.  Bad arguments raise ``ValueError`` (``TypeError`` for a read-only
destination or a non-buffer); nothing is written when validation fails.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

try:
    from nnpatch import _kernel as _ext
except ImportError:  # built without a compiler: the numpy fallback serves
    _ext = None

__all__ = [
    "MODES",
    "backend",
    "combine",
    "encode_delta",
    "gather_elements",
    "gather_rows",
    "planes",
    "scatter_elements",
    "scatter_rows",
    "select",
    "unplanes",
    "unsort",
    "sort_keys",
]

MODES = ("replace", "xor", "add", "sub", "zadd", "zsub")
_MODE_ID = {name: i for i, name in enumerate(MODES)}
_WIDTHS = (1, 2, 4, 8)

backend: str = "numpy"
_use_c = False


def select(name: str) -> None:
    """Activate a backend: ``"auto"`` (C when built), ``"c"`` or ``"numpy"``.

    ``"c"`` raises :class:`RuntimeError` when the extension is not built.
    """
    global backend, _use_c
    if name == "auto":
        name = "c" if _ext is not None else "numpy"
    if name == "c":
        if _ext is None:
            raise RuntimeError(
                "the C kernel nnpatch._kernel is not built (reinstall with a C compiler); "
                "use the 'numpy' backend")
    elif name != "numpy":
        raise ValueError(f"unknown kernel backend {name!r}; expected 'auto', 'c' or 'numpy'")
    backend = name
    _use_c = name == "c"


# ---------------------------------------------------------------- argument checks

def _buf(obj: Any, name: str, *, writable: bool = False) -> memoryview:
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(f"{name} must be a buffer (bytes-like object), "
                        f"got {type(obj).__name__}") from None
    if writable and mv.readonly:
        raise TypeError(f"{name} is read-only; a writable buffer is required")
    if not mv.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return mv


def _u8(mv: memoryview) -> np.ndarray:
    """Flat uint8 view (writable iff the buffer is) of a contiguous buffer."""
    return np.frombuffer(mv, dtype=np.uint8)


def _check_width(width: Any) -> int:
    if isinstance(width, (int, np.integer)) and not isinstance(width, bool) and width in _WIDTHS:
        return int(width)
    raise ValueError(f"width must be 1, 2, 4 or 8, got {width!r}")


def _row_nbytes(row_nbytes: Any, width: int) -> int:
    if isinstance(row_nbytes, (int, np.integer)) and not isinstance(row_nbytes, bool) \
            and row_nbytes > 0 and row_nbytes % width == 0:
        return int(row_nbytes)
    raise ValueError(f"row_nbytes must be a positive multiple of width {width}, got {row_nbytes!r}")


def _mode_id(mode: str) -> int:
    try:
        return _MODE_ID[mode]
    except (KeyError, TypeError):
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}") from None


def _indices(indices: Any, nrows: int) -> np.ndarray:
    """Indices as a contiguous native uint64 array (range/order checked later)."""
    a = np.asarray(indices)
    if a.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {a.shape}")
    if a.size == 0:
        return np.empty(0, dtype=np.uint64)
    if a.dtype.kind == "i":
        neg = a < 0
        if neg.any():
            i = int(np.argmax(neg))
            raise ValueError(f"index {int(a[i])} at position {i} is out of range for {nrows} rows")
    elif a.dtype.kind != "u":
        raise ValueError(f"indices must be integers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.uint64)


def _check_indices(idx: np.ndarray, nrows: int) -> None:
    """Same checks and messages as the C kernel: < nrows and strictly increasing."""
    if idx.size == 0:
        return
    bad_range = idx >= nrows
    bad_order = np.zeros(idx.size, dtype=bool)
    bad_order[1:] = idx[1:] <= idx[:-1]
    bad = bad_range | bad_order
    if bad.any():
        i = int(np.argmax(bad))
        if bad_range[i]:
            raise ValueError(f"index {int(idx[i])} at position {i} is out of range for {nrows} rows")
        raise ValueError(f"indices must be strictly increasing: position {i} has "
                         f"{int(idx[i])} after {int(idx[i - 1])}")


def _check_no_overlap(a: np.ndarray, an: str, b: np.ndarray, bn: str) -> None:
    if a.size and b.size and np.may_share_memory(a, b):
        raise ValueError(f"{an} and {bn} must not overlap in memory")


def _out(out: Any, nbytes: int) -> tuple[np.ndarray, memoryview]:
    if out is None:
        arr = np.empty(nbytes, dtype=np.uint8)
        return arr, memoryview(arr)
    mv = _buf(out, "out", writable=True)
    if mv.nbytes != nbytes:
        raise ValueError(f"out size {mv.nbytes} != expected size {nbytes}")
    if isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 1:
        return out, mv
    return _u8(mv), mv


def _tensor_rows(nbytes: int, name: str, row_nbytes: int) -> int:
    if nbytes % row_nbytes:
        raise ValueError(f"{name} size {nbytes} is not a multiple of row_nbytes {row_nbytes}")
    return nbytes // row_nbytes


def _check_values(nbytes: int, name: str, n: int, row_nbytes: int) -> None:
    if nbytes != n * row_nbytes:
        raise ValueError(f"{name} size {nbytes} does not match {n} indices x {row_nbytes} row bytes")


# ---------------------------------------------------------------- numpy backend

def _np_planes(s: np.ndarray, o: np.ndarray, width: int) -> None:
    n = s.size // width
    o.reshape(width, n)[...] = s.reshape(n, width).T


def _np_unplanes(s: np.ndarray, o: np.ndarray, width: int) -> None:
    n = s.size // width
    o.reshape(n, width)[...] = s.reshape(width, n).T


def _word(width: int) -> np.dtype:
    return np.dtype(f"<u{width}")


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return (z >> 1) ^ np.negative(z & 1)


def _zigzag(x: np.ndarray, width: int) -> np.ndarray:
    """Inverse of _unzigzag on unsigned words: (x << 1) ^ (signed(x) >> (bits-1))."""
    sign = (x.view(f"<i{width}") >> (8 * width - 1)).view(x.dtype)
    return (x << 1) ^ sign


def _np_apply(d: np.ndarray, sel: Any, v: np.ndarray, width: int, mode: int,
              planar: bool, row_words: int) -> None:
    """d[sel] = op(d[sel], v) on words; d viewed as (rows, row_words)."""
    if planar:
        plain = np.empty_like(v)
        _np_unplanes(v, plain, width)
        v = plain
    dt = _word(width)
    dw = d.view(dt).reshape(-1, row_words)
    vw = v.view(dt).reshape(-1, row_words)
    if mode == 0:
        dw[sel] = vw
    elif mode == 1:
        dw[sel] ^= vw
    elif mode == 2:
        dw[sel] += vw
    elif mode == 3:
        dw[sel] -= vw
    elif mode == 4:
        dw[sel] += _unzigzag(vw)
    else:
        dw[sel] -= _unzigzag(vw)


# ---------------------------------------------------------------- public API

def planes(src: Any, width: int, out: Any = None) -> np.ndarray:
    """Byte-plane split of n little-endian words: ``out[k*n + j] = src[j*width + k]``.

    Returns a uint8 array of ``len(src)`` bytes (``out`` itself, or a view of
    it, when given).
    """
    return _planes(src, width, out, inverse=False)


def unplanes(src: Any, width: int, out: Any = None) -> np.ndarray:
    """Inverse of :func:`planes`: ``out[j*width + k] = src[k*n + j]``."""
    return _planes(src, width, out, inverse=True)


def _planes(src: Any, width: int, out: Any, *, inverse: bool) -> np.ndarray:
    width = _check_width(width)
    smv = _buf(src, "src")
    if smv.nbytes % width:
        raise ValueError(f"src size {smv.nbytes} is not a multiple of width {width}")
    result, omv = _out(out, smv.nbytes)
    if _use_c:
        (_ext.unplanes if inverse else _ext.planes)(smv, omv, width)
        return result
    s = _u8(smv)
    o = _u8(omv)
    _check_no_overlap(s, "src", o, "out")
    (_np_unplanes if inverse else _np_planes)(s, o, width)
    return result


def combine(dst: Any, values: Any, width: int, mode: str, *, planar: bool) -> None:
    """In place: ``dst = op(dst, values)`` on little-endian words of ``width`` bytes.

    ``dst`` and ``values`` have the same size, a multiple of ``width``.
    ``planar=True``: ``values`` is byte-planed (as from :func:`planes`).
    """
    width = _check_width(width)
    m = _mode_id(mode)
    dmv = _buf(dst, "dst", writable=True)
    vmv = _buf(values, "values")
    if dmv.nbytes != vmv.nbytes:
        raise ValueError(f"dst size {dmv.nbytes} != values size {vmv.nbytes}")
    if dmv.nbytes % width:
        raise ValueError(f"size {dmv.nbytes} is not a multiple of width {width}")
    if _use_c:
        _ext.combine(dmv, vmv, width, m, bool(planar))
        return
    d = _u8(dmv)
    v = _u8(vmv)
    _check_no_overlap(d, "dst", v, "values")
    if d.size:
        _np_apply(d, Ellipsis, v, width, m, bool(planar), d.size // width)


def scatter_rows(dst: Any, row_nbytes: int, indices: Any, values: Any, width: int,
                 mode: str, *, planar: bool) -> None:
    """For each i: combine row ``indices[i]`` of ``dst`` with row i of ``values``.

    ``dst`` holds ``nrows * row_nbytes`` bytes (``row_nbytes`` a positive
    multiple of ``width``); ``indices`` are integers, strictly increasing,
    each ``< nrows``; ``values`` is the selected rows concatenated
    (``len(indices) * row_nbytes`` bytes), byte-planed as ONE stream of
    ``len(values) // width`` words when ``planar``.
    """
    width = _check_width(width)
    m = _mode_id(mode)
    row_nbytes = _row_nbytes(row_nbytes, width)
    dmv = _buf(dst, "dst", writable=True)
    vmv = _buf(values, "values")
    nrows = _tensor_rows(dmv.nbytes, "dst", row_nbytes)
    idx = _indices(indices, nrows)
    _check_values(vmv.nbytes, "values", idx.size, row_nbytes)
    if _use_c:
        _ext.scatter(dmv, row_nbytes, idx, vmv, width, m, bool(planar))
        return
    d = _u8(dmv)
    v = _u8(vmv)
    _check_no_overlap(d, "dst", v, "values")
    _check_no_overlap(d, "dst", idx, "indices")
    _check_indices(idx, nrows)
    if idx.size:
        _np_apply(d, idx.astype(np.intp), v, width, m, bool(planar), row_nbytes // width)


def scatter_elements(dst: Any, indices: Any, values: Any, width: int, mode: str, *,
                     planar: bool) -> None:
    """:func:`scatter_rows` with one word per row: flat element indices into ``dst``."""
    width = _check_width(width)
    scatter_rows(dst, width, indices, values, width, mode, planar=planar)


def gather_rows(src: Any, row_nbytes: int, indices: Any, out: Any = None) -> np.ndarray:
    """Encoder helper: rows ``indices`` (strictly increasing) of ``src`` concatenated.

    Returns a uint8 array of ``len(indices) * row_nbytes`` bytes (``out``
    itself, or a view of it, when given).
    """
    row_nbytes = _row_nbytes(row_nbytes, 1)
    smv = _buf(src, "src")
    nrows = _tensor_rows(smv.nbytes, "src", row_nbytes)
    idx = _indices(indices, nrows)
    result, omv = _out(out, idx.size * row_nbytes)
    if _use_c:
        _ext.gather(smv, row_nbytes, idx, omv)
        return result
    s = _u8(smv)
    o = _u8(omv)
    _check_no_overlap(s, "src", o, "out")
    _check_no_overlap(idx, "indices", o, "out")
    _check_indices(idx, nrows)
    if idx.size:
        np.take(s.reshape(nrows, row_nbytes), idx.astype(np.intp), axis=0,
                out=o.reshape(idx.size, row_nbytes))
    return result


def gather_elements(src: Any, width: int, indices: Any, out: Any = None) -> np.ndarray:
    """Encoder helper: words ``indices`` (strictly increasing) of ``src`` concatenated."""
    width = _check_width(width)
    return gather_rows(src, width, indices, out)


def encode_delta(base: Any, target: Any, width: int, mode: str) -> np.ndarray:
    """Values ``v`` (plain layout) such that ``combine(copy_of_base, v, width, mode)``
    yields ``target`` exactly.  Returns a new uint8 array of ``len(target)`` bytes.
    """
    width = _check_width(width)
    m = _mode_id(mode)
    b = _u8(_buf(base, "base"))
    t = _u8(_buf(target, "target"))
    if b.size != t.size:
        raise ValueError(f"base size {b.size} != target size {t.size}")
    if t.size % width:
        raise ValueError(f"size {t.size} is not a multiple of width {width}")
    if m == 0:
        return t.copy()
    if m == 1:
        return np.bitwise_xor(b, t)
    dt = _word(width)
    bw = b.view(dt)
    tw = t.view(dt)
    if m == 2:
        w = tw - bw
    elif m == 3:
        w = bw - tw
    elif m == 4:
        w = _zigzag(tw - bw, width)
    else:
        w = _zigzag(bw - tw, width)
    return w.astype(dt, copy=False).view(np.uint8)


def _init_from_env() -> None:
    name = os.environ.get("NNPATCH_KERNEL", "auto").strip().lower() or "auto"
    if name not in ("auto", "c", "numpy"):
        raise ValueError(f"NNPATCH_KERNEL={name!r} is not one of auto, c, numpy")
    select(name)


_init_from_env()


def sort_keys(old: Any, width: int, shift: int, mask: int) -> np.ndarray:
    """The ``esort`` key of each old word: ``(top >> shift) & mask``, where
    ``top`` is the word's two high bytes as a little-endian uint16 (its only
    byte when ``width`` is 1)."""
    o = _u8(_buf(old, "old")).reshape(-1, width)
    top = o[:, width - 1].astype(np.uint16)
    if width > 1:
        top = (top << 8) | o[:, width - 2]
    return (top >> shift) & mask


def unsort(old: Any, values: Any, width: int, *, shift: int, mask: int, planar: bool,
           out: Any = None) -> np.ndarray:
    """Undo ``esort``: ``values`` holds n words in stable order of the keys of
    the n ``old`` words (:func:`sort_keys`); returns them in position order,
    in the same layout (byte-planar when ``planar``)."""
    width = _check_width(width)
    omv = _buf(old, "old")
    vmv = _buf(values, "values")
    if omv.nbytes != vmv.nbytes or vmv.nbytes % width:
        raise ValueError(f"old ({omv.nbytes} bytes) and values ({vmv.nbytes} bytes) must be the same whole "
                         f"number of {width}-byte words")
    if not (0 <= shift <= 15 and 0 <= mask <= 0xFFFF):
        raise ValueError(f"bad key field: shift {shift}, mask {mask}")
    result, rmv = _out(out, vmv.nbytes)
    if _use_c:
        _ext.unsort(omv, vmv, rmv, width, bool(planar), shift, mask)
        return result
    v = _u8(vmv)
    r = _u8(rmv)
    _check_no_overlap(v, "values", r, "out")
    order = np.argsort(sort_keys(omv, width, shift, mask), kind="stable")
    if planar:
        r.reshape(width, -1)[:, order] = v.reshape(width, -1)
    else:
        r.reshape(-1, width)[order] = v.reshape(-1, width)
    return result
