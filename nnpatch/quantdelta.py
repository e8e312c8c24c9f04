"""Exact quantized deltas: the arithmetic of the ``qrows`` op (format 1.3,
spec/FORMAT.md section 7.5), shared by the applier, the differ and the trainer.

A changed row is stored as a scale (binary32) and one small signed integer
code per element (8 or 4 bits). Every element is rebuilt as

    code = 0 or old is NaN/inf:   new = old, bit for bit
    otherwise:                    t = RN32(scale * code)
                                  y = RN32(binary32(old) + t)
                                  new = RN_dtype(y)

in IEEE-754 binary32 with round-to-nearest-even, gradual underflow (no flush
to zero), overflow to infinity, and no fused multiply-add: numpy rounds each
ufunc's result, so one multiply and one add are two roundings. ``y`` is never
NaN (a scale MUST be finite and ``old`` is finite here), so NaN payloads, which
x86 and ARM propagate differently, never arise.

bfloat16 is rounded by integer arithmetic on the binary32 bits; float16 by
numpy's float32 -> float16 conversion, which rounds to nearest even (software
and F16C alike) with subnormal results and overflow to infinity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PatchFormatError

#: The code widths the format defines, and the dtypes ``qrows`` may change.
BITS = (8, 4)
DTYPES = ("F32", "BF16", "F16")
#: Bytes of one scale (little-endian binary32).
SCALE_BYTES = 4

_WORD = {"F32": np.dtype("<u4"), "BF16": np.dtype("<u2"), "F16": np.dtype("<u2")}


def code_range(bits: int) -> tuple[int, int]:
    """The codes a ``bits``-bit two's complement field holds: [-2^(b-1), 2^(b-1) - 1]."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def row_code_bytes(row_elements: int, bits: int) -> int:
    """Bytes of one row's codes: ``ceil(row_elements * bits / 8)`` (a 4-bit row of odd length ends in a
    byte whose high nibble is zero)."""
    return (row_elements * bits + 7) // 8


def word_dtype(dtype: str) -> np.dtype:
    return _WORD[dtype]


# --- dtype <-> binary32 -------------------------------------------------------------------

def to_f32(words: np.ndarray, dtype: str) -> np.ndarray:
    """The binary32 value of each word (exact: every F16 and BF16 value, subnormals included, is one)."""
    if dtype == "F32":
        return words.view("<f4")
    if dtype == "BF16":
        return (words.astype(np.uint32) << np.uint32(16)).view("<f4")
    return words.view("<f2").astype(np.float32)


def from_f32(y: np.ndarray, dtype: str) -> np.ndarray:
    """Words of ``dtype`` holding ``y`` (never NaN) rounded to nearest, ties to even."""
    if dtype == "F32":
        return y.view("<u4")
    if dtype == "BF16":
        u = y.view("<u4")
        # add just under half an ulp of bf16, plus one when the kept part is odd: ties go to even; a carry
        # out of the mantissa moves the exponent up, and past the largest finite value gives infinity
        return ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype("<u2")
    return y.astype("<f2").view("<u2")


# --- the arithmetic -----------------------------------------------------------------------

def apply_codes(old: np.ndarray, scales: np.ndarray, codes: np.ndarray, dtype: str) -> np.ndarray:
    """New words from ``old`` words (k, n) of ``dtype``, ``scales`` (k,) or (1,) binary32 and ``codes``
    (k, n) integers: the spec's arithmetic, element by element."""
    x = to_f32(old, dtype)
    s = np.asarray(scales, dtype="<f4").reshape(-1, 1)
    c = codes.astype(np.float32)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        t = np.multiply(s, c, dtype=np.float32)  # RN32(scale * code): rounded before the add, no FMA
        y = np.add(x, t, dtype=np.float32)  # RN32(old + t)
        new = from_f32(y, dtype)
    keep = (codes == 0) | ~np.isfinite(x)
    return np.where(keep, old, new).astype(old.dtype, copy=False)


def quantize(old: np.ndarray, target: np.ndarray, dtype: str, bits: int, *,
             per_row: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Scales and codes that bring ``old`` words (k, n) close to ``target`` (float values, (k, n)).

    The scale of a row is its largest |target - old| over ``2^(bits-1) - 1`` (symmetric codes, so the most
    negative code is never used), rounded to binary32; codes are the deltas over the scale, rounded to
    nearest. Elements whose old value is not finite get code 0 (the arithmetic keeps them anyway)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, not {bits}")
    qmax = code_range(bits)[1]
    x = to_f32(old, dtype).astype(np.float64)
    finite = np.isfinite(x)
    d = np.where(finite, np.asarray(target, np.float64) - np.where(finite, x, 0.0), 0.0)
    d = np.where(np.isfinite(d), d, 0.0)
    if d.size == 0:
        top = np.zeros(d.shape[0] if per_row else 1)
    else:
        top = np.abs(d).max(axis=1) if per_row else np.array([np.abs(d).max()])
    scales = (top / qmax).astype(np.float32)
    scales = np.where(np.isfinite(scales), scales, np.float32(0)).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales.astype(np.float64)).reshape(-1, 1)
    codes = np.clip(np.rint(d / safe), -qmax, qmax)
    codes = np.where(scales.reshape(-1, 1) == 0, 0, codes).astype(np.int8)
    return scales, codes


# --- code packing -------------------------------------------------------------------------

def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(k, n) codes in range -> (k, row_code_bytes(n, bits)) uint8: 8 bits one byte each (two's
    complement); 4 bits two a byte, element 2j in the low nibble and 2j+1 in the high one."""
    lo, hi = code_range(bits)
    codes = np.asarray(codes)
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"codes must lie in [{lo}, {hi}] for {bits} bits")
    u = codes.astype(np.int8).view(np.uint8)
    if bits == 8:
        return np.ascontiguousarray(u)
    k, n = u.shape
    nib = np.zeros((k, n + (n & 1)), np.uint8)
    nib[:, :n] = u & np.uint8(0x0F)
    return np.ascontiguousarray(nib[:, 0::2] | (nib[:, 1::2] << np.uint8(4)))


def unpack_codes(data: np.ndarray, count: int, row_elements: int, bits: int, *, where: str) -> np.ndarray:
    """Bytes of ``count`` rows of codes -> (count, row_elements) int8; a non-zero padding nibble is a
    :class:`PatchFormatError`."""
    rb = row_code_bytes(row_elements, bits)
    data = np.asarray(data, np.uint8).reshape(count, rb)
    if bits == 8:
        return data.view(np.int8)
    out = np.empty((count, 2 * rb), np.int8)
    out[:, 0::2] = ((data & np.uint8(0x0F)) ^ np.uint8(8)).astype(np.int8) - np.int8(8)
    out[:, 1::2] = ((data >> np.uint8(4)) ^ np.uint8(8)).astype(np.int8) - np.int8(8)
    if row_elements & 1 and count and (data[:, -1] >> np.uint8(4)).any():
        raise PatchFormatError(f"{where}: the padding nibble after a row's last 4-bit code is not zero")
    return out[:, :row_elements]


def decode_scales(data: np.ndarray, *, where: str) -> np.ndarray:
    """Little-endian binary32 scales; each MUST be finite."""
    scales = np.asarray(data, np.uint8).view("<f4")
    bad = np.flatnonzero(~np.isfinite(scales))
    if len(bad):
        raise PatchFormatError(f"{where}: scale {int(bad[0])} is not finite ({float(scales[bad[0]])})")
    return scales


# --- a quantized update, as the writer takes it ----------------------------------------------

@dataclass(frozen=True)
class QuantDelta:
    """What a ``qrows`` op stores for one tensor: the changed ``rows`` (strictly increasing), one scale
    per row or one for all (``scales``, binary32), and the ``codes`` ((len(rows), row elements) integers
    of ``bits`` bits)."""

    rows: np.ndarray
    scales: np.ndarray
    codes: np.ndarray
    bits: int

    def __post_init__(self) -> None:
        rows = np.asarray(self.rows, np.uint64).reshape(-1)
        scales = np.asarray(self.scales, "<f4").reshape(-1)
        codes = np.asarray(self.codes)
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, not {self.bits}")
        if codes.ndim != 2 or codes.shape[0] != len(rows):
            raise ValueError(f"codes must be (rows, row elements), found {codes.shape} for {len(rows)} rows")
        if len(scales) not in (1, len(rows)):
            raise ValueError(f"{len(scales)} scales for {len(rows)} rows (one per row, or one)")
        if not np.isfinite(scales).all():
            raise ValueError("scales must be finite")
        if len(rows) > 1 and not np.all(rows[1:] > rows[:-1]):
            raise ValueError("rows must be strictly increasing")
        lo, hi = code_range(self.bits)
        if codes.size and (codes.min() < lo or codes.max() > hi):
            raise ValueError(f"codes must lie in [{lo}, {hi}] for {self.bits} bits")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "codes", codes.astype(np.int8))

    def apply(self, words: np.ndarray, dtype: str) -> np.ndarray:
        """The whole tensor after the update: ``words`` is the old tensor as (rows, row elements) words."""
        if dtype not in DTYPES:
            raise ValueError(f"qrows changes {', '.join(DTYPES)} tensors, not {dtype}")
        out = np.array(words, dtype=_WORD[dtype], copy=True)
        if len(self.rows):
            sel = self.rows.astype(np.intp)
            out[sel] = apply_codes(out[sel], self.scales, self.codes, dtype)
        return out


__all__ = ["BITS", "DTYPES", "SCALE_BYTES", "QuantDelta", "apply_codes", "code_range", "decode_scales",
           "from_f32", "pack_codes", "quantize", "row_code_bytes", "to_f32", "unpack_codes", "word_dtype"]
