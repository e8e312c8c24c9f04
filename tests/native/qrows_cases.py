"""Model pairs changed by quantized deltas (the qrows op, format 1.3), for the differential tests of
the native applier (test_native_qrows.py, and a sample under qemu-aarch64 in test_aarch64.py).

Old tensors of F32, BF16 and F16 hold the values the arithmetic of FORMAT.md section 7.5 must keep
or round exactly: NaNs with payloads (quiet and signalling, both signs), infinities, signed zeros,
subnormals, the smallest normals, values next to the largest finite one. Scales are typical, zero,
negative, subnormal binary32, tiny (results in the dtype's subnormal range) or huge (results that
overflow to infinity); codes cover the whole 8- or 4-bit range with many zeros. The target is
nnpatch.quantdelta's arithmetic (numpy, the reference) applied to the old words; nnpatch.diff checks
that the deltas rebuild it before writing the qrows ops.
"""

from __future__ import annotations

import numpy as np

from nnpatch.quantdelta import QuantDelta, code_range, from_f32
from nnpatch.weights import SafetensorsFile, write_safetensors

#: (exponent bits, mantissa bits, word dtype) of each dtype qrows changes
FORMATS = {"F32": (8, 23, np.uint32), "BF16": (8, 7, np.uint16), "F16": (5, 10, np.uint16)}
#: scales whose products overflow the dtype, and scales whose results fall in its subnormal range
HUGE = {"F32": (1e36, 3e38), "BF16": (1e36, 3e38), "F16": (200.0, 6e4)}
TINY = {"F32": (1e-45, 1e-38), "BF16": (1e-45, 1e-38), "F16": (1e-9, 6e-8)}


def special_words(rng: np.random.Generator, dtype: str, size: int) -> np.ndarray:
    """``size`` old words of ``dtype``: about 40 % special values, the rest ordinary weights."""
    e_bits, m_bits, word = FORMATS[dtype]
    top = e_bits + m_bits
    emax = (1 << e_bits) - 1
    mmask = (1 << m_bits) - 1
    bias = emax >> 1
    sign = rng.integers(0, 2, size, dtype=np.uint64) << np.uint64(top)
    mant = rng.integers(0, 1 << m_bits, size, dtype=np.uint64)
    # ordinary weights: |x| in about [2^-12, 2)
    exp = rng.integers(bias - 12, bias + 1, size, dtype=np.uint64)
    kind = rng.integers(0, 20, size)
    exp = np.where(kind == 0, np.uint64(0), exp)                                  # +-0 or subnormal
    mant = np.where((kind == 0) & (rng.integers(0, 3, size) == 0), np.uint64(0), mant)
    exp = np.where(kind == 1, np.uint64(emax), exp)                               # +-inf
    mant = np.where(kind == 1, np.uint64(0), mant)
    exp = np.where(kind == 2, np.uint64(emax), exp)                               # NaN, any payload
    mant = np.where((kind == 2) & (mant == 0), np.uint64(1), mant)
    exp = np.where(kind == 3, np.uint64(emax - 1), exp)                           # next to the largest
    mant = np.where(kind == 3, np.uint64(mmask) - (mant & np.uint64(3)), mant)
    exp = np.where(kind == 4, np.uint64(1), exp)                                  # smallest normals
    exp = np.where(kind == 5, np.uint64(0), exp)                                  # subnormals
    mant = np.where((kind == 5) & (mant == 0), np.uint64(1), mant)
    bits = sign | (exp << np.uint64(m_bits)) | mant
    return bits.astype(word)


def random_scales(rng: np.random.Generator, dtype: str, k: int) -> np.ndarray:
    kind = rng.integers(0, 10, k)
    mag = 10.0 ** rng.uniform(-5, -1, k)
    lo, hi = HUGE[dtype]
    mag = np.where(kind == 0, 0.0, mag)
    mag = np.where(kind == 1, rng.uniform(lo, hi, k), mag)
    tlo, thi = TINY[dtype]
    mag = np.where(kind == 2, np.exp(rng.uniform(np.log(tlo), np.log(thi), k)), mag)
    s = (mag * np.where(rng.integers(0, 2, k) == 1, -1.0, 1.0)).astype(np.float32)
    sub = rng.integers(1, 1 << 23, k, dtype=np.uint32).view(np.float32)  # subnormal binary32 scales
    return np.where(kind == 3, sub, s).astype(np.float32)


def random_codes(rng: np.random.Generator, bits: int, shape) -> np.ndarray:
    lo, hi = code_range(bits)
    codes = rng.integers(lo, hi + 1, shape)
    codes = np.where(rng.integers(0, 3, shape) == 0, 0, codes)
    if len(shape) and shape[0] > 1:
        codes[0] = np.where(rng.integers(0, 2, shape[1:]) == 1, lo, hi)  # a row of extreme codes
    return codes.astype(np.int8)


def quant_delta(rng: np.random.Generator, dtype: str, bits: int, rows: int, row_elements: int,
                *, count: int | None = None, single: bool = False) -> QuantDelta:
    count = count if count is not None else int(rng.integers(1, rows + 1))
    sel = np.sort(rng.choice(rows, count, replace=False)).astype(np.uint64)
    scales = random_scales(rng, dtype, 1 if single else count)
    return QuantDelta(sel, scales, random_codes(rng, bits, (count, row_elements)), bits)


def cancel(words: np.ndarray, qd: QuantDelta, dtype: str) -> None:
    """Every 4th element of the first changed row made -RN(scale * code) (as the dtype rounds it), so
    that old + t is exactly zero (F32) or nearly (the sign of a zero sum, tiny results)."""
    r0 = int(qd.rows[0])
    with np.errstate(all="ignore"):  # a huge scale: t is infinite, and so is the word
        t = np.multiply(np.float32(qd.scales[0]), qd.codes[0].astype(np.float32), dtype=np.float32)
        words[r0, ::4] = from_f32(np.ascontiguousarray(-t), dtype)[::4]


def make_pair(seed: int, directory, *, big: bool = False):
    """(old path, new path, {name: QuantDelta}) for ``seed``: one tensor per dtype and code width
    (2-D and 3-D rows, odd row lengths for 4 bits, one scale or one per row), an F32 tensor changed
    by an ordinary diff, and with ``big`` rows wider than the applier's 64 KiB piece and a tensor of
    3000 changed rows."""
    rng = np.random.default_rng(seed)
    old, new, deltas = {}, {}, {}
    i = 0
    for dtype in FORMATS:
        for bits in (8, 4):
            shape = [(int(rng.integers(1, 9)), int(rng.integers(1, 20))),
                     (int(rng.integers(1, 6)), 3, int(rng.integers(1, 6))),
                     (int(rng.integers(2, 12)), 2 * int(rng.integers(0, 8)) + 1)][(seed + i) % 3]
            rows, n = shape[0], int(np.prod(shape[1:]))
            words = special_words(rng, dtype, rows * n).reshape(rows, n)
            qd = quant_delta(rng, dtype, bits, rows, n, single=bool(rng.integers(0, 3) == 0))
            cancel(words, qd, dtype)
            name = f"q{i}.{dtype.lower()}.b{bits}"
            old[name] = (dtype, shape, words.tobytes())
            new[name] = (dtype, shape, qd.apply(words, dtype).tobytes())
            deltas[name] = qd
            i += 1
    # an ordinary tensor next to them: a rows or elements op
    a = rng.standard_normal((6, 5)).astype(np.float32)
    b = a.copy()
    b[int(rng.integers(0, 6))] *= np.float32(1.5)
    old["plain"] = ("F32", a.shape, a.tobytes())
    new["plain"] = ("F32", b.shape, b.tobytes())
    if big:
        for dtype, bits, n in (("BF16", 8, 150_001), ("F16", 4, 300_001), ("F32", 4, 140_001)):
            words = special_words(rng, dtype, 3 * n).reshape(3, n)
            qd = quant_delta(rng, dtype, bits, 3, n, count=2)
            name = f"wide.{dtype.lower()}.b{bits}"
            old[name] = (dtype, (3, n), words.tobytes())
            new[name] = (dtype, (3, n), qd.apply(words, dtype).tobytes())
            deltas[name] = qd
        words = special_words(rng, "F32", 3000 * 3).reshape(3000, 3)
        qd = quant_delta(rng, "F32", 8, 3000, 3, count=3000)
        old["many"] = ("F32", (3000, 3), words.tobytes())
        new["many"] = ("F32", (3000, 3), qd.apply(words, "F32").tobytes())
        deltas["many"] = qd
    o, n_ = directory / f"old{seed}.safetensors", directory / f"new{seed}.safetensors"
    write_safetensors(o, old)
    write_safetensors(n_, new)
    return o, n_, deltas


def second_link(seed: int, mid, directory):
    """(new2, deltas): further quantized deltas on every qrows tensor (``q*``) of ``mid``, the rest kept."""
    rng = np.random.default_rng(1000 + seed)
    out, deltas = {}, {}
    with SafetensorsFile(mid) as m:
        for name, info in m.tensors.items():
            words = np.frombuffer(m.bits(name), FORMATS.get(info.dtype, (0, 0, np.uint8))[2]).copy()
            if name.startswith("q") and info.shape[0]:
                rows = info.shape[0]
                words = words.reshape(rows, -1)
                qd = quant_delta(rng, info.dtype, int(rng.choice([8, 4])), rows, words.shape[1])
                deltas[name] = qd
                words = qd.apply(words, info.dtype)
            out[name] = (info.dtype, tuple(info.shape), words.tobytes())
    new2 = directory / f"new2-{seed}.safetensors"
    write_safetensors(new2, out)
    return new2, deltas
