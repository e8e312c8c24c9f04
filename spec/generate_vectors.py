"""Generate the test vectors in spec/vectors/ (see FORMAT.md, section 13).

    python spec/generate_vectors.py            # check: regenerate in memory, report differences
    python spec/generate_vectors.py --update   # rewrite the files; review the diff

Inputs come from numpy's PCG64 generator with the seeds below; every vector is
described in words in vectors.json's _comment and its own "description".
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile

import blake3
import numpy as np
import zstandard

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import nnpatch  # noqa: E402
from nnpatch import differ, dtypes, quantdelta, skeldelta  # noqa: E402
import nnpatch.weights.source  # noqa: E402
from nnpatch.differ import save_quant_deltas  # noqa: E402
from crafting import header_json, with_header  # noqa: E402
from vectorfiles import remove, report, stale  # noqa: E402
from nnpatch.patchfile import PREAMBLE_SIZE, TRAILER_SIZE  # noqa: E402
from nnpatch.weights import write_safetensors  # noqa: E402

# created_by names the writer's version: pinned, so that the vectors do not change with each release
differ.__version__ = "vectors"

VECTORS = os.path.join(HERE, "vectors")
#: The LiteRT/TFLite files of the skeleton-tflite vector (real converter output, tests/data/tflite/generate.py).
TFLITE = os.path.join(os.path.dirname(HERE), "tests", "data", "tflite")
LEVEL = 9
#: The vectors made before format 1.5 keep the layout they were made with (64-byte aligned
#: sections, which every 1.x reader takes); the packed-* vectors have the writer's default.
ALIGNED = {"aligned": True}

COMMENT = (
    "nnpatch test vectors. Each valid vector has base.safetensors, target.safetensors and patch.nnpatch "
    "(made with nnpatch diff at zstd level 9, the options listed); the 'directory' vector has base/ and target/ "
    "model directories instead, and its digests are directory digests (FORMAT.md section 8); the 'onnx' vector has "
    "base.onnx and target.onnx and 'requires' the onnx package; the 'gguf' vector (format 1.4, an extents "
    "target) has base.gguf and target.gguf, written by gguf-py, and 'requires' the gguf package. Tensor bytes "
    "come from "
    "numpy.random.default_rng(seed).integers(0, 256, n, dtype=uint8) for integer and fp8 dtypes and "
    "from default_rng(seed).standard_normal(n) * 0.05 cast to the dtype for floats (bf16: the high 16 bits "
    "of the float32). Invalid vectors are the 'rows-f32' patch with one rule broken (and the trailer "
    "recomputed unless the rule is the trailer itself); apply each to the named base and expect the error "
    "class and message given. The qrows-* vectors (format 1.3, 'since': '1.3') test the qrows op of "
    "FORMAT.md section 7.5: options.quantized names the file of rows, scales and codes (spec/vectors-relative) "
    "that made the target; special rows put NaN, infinities, -0, subnormals, rounding ties, overflow and an "
    "FMA-sensitive product in the arithmetic (listed in generate_vectors.QROWS_SPECIAL); the invalid qrows-* "
    "vectors break one qrows rule of the qrows-f32 patch. The skeleton-* vectors (format 1.5) carry an extents "
    "target's skeleton as a 'zstd-base' delta (FORMAT.md 5.8): packed-gguf (its KV string changes) and "
    "skeleton-tflite (two LiteRT files from tests/data/tflite, copied), and invalid ones that break one of its "
    "rules. Byte-identical regeneration of patches depends on the zstd library version "
    "recorded in zstd_version."
)


def _floats(rng, dtype, n):
    x = rng.standard_normal(n) * 0.05
    if dtype == "BF16":
        return (x.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return x.astype(dtypes.NUMPY_OF[dtype].newbyteorder("<")).tobytes()


def _tensor(rng, dtype, shape):
    n = int(np.prod(shape))
    if dtype in ("F16", "BF16", "F32", "F64"):
        return (dtype, shape, _floats(rng, dtype, n))
    return (dtype, shape, rng.integers(0, 256, n * dtypes.ITEMSIZE[dtype], dtype=np.uint8).tobytes())


def _mutate_rows(data: bytes, shape, rows, dtype, delta=1e-3):
    width = dtypes.ITEMSIZE[dtype]
    arr = np.frombuffer(data, dtype=f"<u{width}").reshape(shape[0], -1).copy()
    arr[rows] ^= np.array(0x35, dtype=arr.dtype)  # low mantissa bits: a small update
    return arr.tobytes()


def vector_inputs():
    """name -> (description, base tensors, target tensors, options)."""
    out = {}
    rng = np.random.default_rng(1)
    w = _tensor(rng, "F32", (8, 4, 3, 3))
    b = _tensor(rng, "F32", (8,))
    base = {"conv.weight": w, "conv.bias": b}
    target = {"conv.weight": ("F32", w[1], _mutate_rows(w[2], w[1], [2, 5], "F32")), "conv.bias": b}
    out["rows-f32"] = ("2 of 8 output channels of a float32 conv weight changed in their low bits",
                       base, target, {})

    rng = np.random.default_rng(2)
    e = _tensor(rng, "BF16", (16, 8))
    arr = np.frombuffer(e[2], "<u2").copy()
    arr[[3, 64, 127]] ^= 0x0003
    out["elements-bf16"] = ("3 scattered elements of a bfloat16 matrix changed",
                            {"emb": e}, {"emb": ("BF16", e[1], arr.tobytes())}, {})

    rng = np.random.default_rng(3)
    base, target = {}, {}
    for i, dtype in enumerate(sorted(dtypes.ITEMSIZE)):
        t = _tensor(rng, dtype, (4, 3))
        base[f"t{i:02d}.{dtype}"] = t
        raw = bytearray(t[2])
        raw[dtypes.ITEMSIZE[dtype] * 5] ^= 1  # element 5, lowest byte
        target[f"t{i:02d}.{dtype}"] = (dtype, t[1], bytes(raw))
    out["every-dtype"] = ("one element changed (lowest bit) in a 4x3 tensor of each of the 17 dtypes",
                          base, target, {})

    rng = np.random.default_rng(4)
    w = _tensor(rng, "F32", (16, 8))
    base = {
        "rows": w,
        "elems": _tensor(rng, "F16", (32, 4)),
        "dense": _tensor(rng, "F32", (6, 5)),
        "reshaped": _tensor(rng, "I32", (2, 6)),
        "removed": _tensor(rng, "U8", (5,)),
        "same": _tensor(rng, "F64", (2, 2)),
        "scalar": _tensor(rng, "I64", ()),
        "empty": ("F32", (0, 3), b""),
    }
    target = dict(base)
    target["rows"] = ("F32", w[1], _mutate_rows(w[2], w[1], [0, 7, 15], "F32"))
    el = np.frombuffer(base["elems"][2], "<u2").copy()
    el[[1, 100]] ^= 0x8000  # sign flips
    target["elems"] = ("F16", (32, 4), el.tobytes())
    target["dense"] = _tensor(rng, "F32", (6, 5))
    target["reshaped"] = ("I32", (3, 4), base["reshaped"][2])
    del target["removed"]
    target["added"] = _tensor(rng, "F8_E5M2", (3, 3))
    target["scalar"] = ("I64", (), (7).to_bytes(8, "little"))
    out["all-ops"] = ("rows, elements, whole (relative and reshaped), add, remove, unchanged, a scalar and an "
                      "empty tensor; target metadata differs", base, target, {})
    out["all-ops-reversible"] = ("the all-ops pair, diffed with reversible=True", base, target,
                                 {"reversible": True})
    out["identical"] = ("base and target identical: a patch with no ops", base, dict(base), {})

    rng = np.random.default_rng(5)
    base, target = {}, {}
    for name, shape in (("proj.weight", (48, 32)), ("head.weight", (32, 48))):
        w = (rng.standard_normal(shape) * np.exp(rng.uniform(-6, 0, shape))).astype("<f4")
        v = w + (rng.standard_normal(shape) * 1e-3).astype("<f4")
        if name == "head.weight":  # stored as bf16: the high 16 bits of the float32
            w, v = ((x.view("<u4") >> 16).astype("<u2") for x in (w, v))
        dtype = "F32" if name == "proj.weight" else "BF16"
        base[name], target[name] = (dtype, shape, w.tobytes()), (dtype, shape, v.tobytes())
    out["esort"] = ("every value of a float32 and a bfloat16 matrix moved by N(0, 1e-3) from weights of "
                    "magnitudes exp(U(-6, 0)) * N(0, 1): the values are stored in exponent order (esort, 1.2)",
                    base, target, {})
    return out


# --- qrows (format 1.3) ------------------------------------------------------------------

def _b(bits: int) -> tuple[str, int]:
    return ("bits", bits)


#: Rows of 9 elements whose old values, codes and scale exercise the arithmetic of FORMAT.md 7.5, per
#: dtype: (scale, [(old, code), ...]); old is a float (exact in the dtype) or ("bits", word). The comment
#: gives the result the spec demands.
QROWS_SPECIAL = {
    "F32": [
        (2.0 ** -24, [(_b(0x7FC12345), 5),     # NaN with a payload: kept
                      (_b(0x7F800001), -3),    # signalling NaN: kept
                      (float("inf"), 7), (float("-inf"), -128),  # kept
                      (-0.0, 0),               # code 0: -0 kept
                      (-0.0, 1),               # 2^-24
                      (1.0, 1),                # 1 + 2^-24, a tie: 1.0 (even)
                      (_b(0x3F800001), 1),     # a tie: 0x3F800002 (even)
                      (0.5, -1)]),             # 0.5 - 2^-24, exact
        (2.0 ** -149, [(3 * 2.0 ** -149, -1),  # subnormal result 2^-148
                       (2.0 ** -126, -1),      # largest subnormal
                       (5 * 2.0 ** -149, -5),  # exactly zero: +0
                       (-2 * 2.0 ** -149, 2),  # exactly zero from a negative: +0
                       (2.0 ** -149, 127), (-(2.0 ** -149), -128),
                       (1.0, 100),             # too small to move 1.0
                       (0.0, -1), (-0.0, -1)]),  # -2^-149
        (2.0 ** 104, [(_b(0x7F7FFFFF), 1),     # max + 2^104 = 2^128: overflow to +inf
                      (_b(0xFF7FFFFF), -1),    # -inf
                      (_b(0x7F7FFFFF), -1),    # 2^128 - 2^105, exact
                      (1.0, 127), (0.0, -128), (2.0 ** 127, 127), (2.0 ** 127, -128),
                      (_b(0x7F7FFFFF), 0), (-1.0, 1)]),
        (1 + 2.0 ** -23, [(-127.0, 127),       # t = RN(127 + 127 * 2^-23) = 127 + 2^-16; y = 2^-16 (a fused
                                               # multiply-add would give 127 * 2^-23)
                          (-1.0, 1),           # 2^-23
                          (3.0, -3), (-0.0, 1), (0.25, 2), (100.0, -100), (7.0, -7), (1e-3, 1), (-5.0, 5)]),
    ],
    "BF16": [
        (2.0 ** -8, [(_b(0x7FC1), 3), (_b(0x7F81), 1),  # NaNs: kept
                     (float("inf"), -8), (float("-inf"), 2),  # kept
                     (-0.0, 0),                # kept
                     (1.0, 1),                 # 1 + 2^-8, a tie in bf16: 1.0
                     (_b(0x3F81), 1),          # a tie: 0x3F82
                     (-0.0, 1),                # 2^-8
                     (0.5, -1)]),              # 0.5 - 2^-8, exact
        (2.0 ** -8 + 2.0 ** -30, [(1.0, 1),    # y = RN32(1 + 2^-8 + 2^-30) = 1 + 2^-8, then a tie: 1.0 (one
                                               # rounding of the exact sum would give 1 + 2^-7)
                                  (1.0, -1),   # 1 - 2^-8
                                  (2.0, 1), (0.75, -1), (-1.0, 1), (3.0, 2), (-0.0, 1), (0.0, 0), (0.125, 5)]),
        (2.0 ** 119, [(_b(0x7F7F), 1),         # 2^128 - 2^119: a tie at the top, rounds to +inf
                      (_b(0xFF7F), -1),        # -inf
                      (_b(0x7F7F), -1),        # 2^128 - 2^120 - 2^119, a tie: 0x7F7E (even)
                      (1.0, 1), (0.0, -1), (2.0 ** 126, 64), (-(2.0 ** 126), -64), (_b(0x7F7F), 0), (1.0, 0)]),
        (2.0 ** -134, [(0.0, 1),               # 2^-134: half the least subnormal, a tie: +0
                       (2.0 ** -133, 1),       # 1.5 * 2^-133: a tie: 2 * 2^-133
                       (-0.0, 1),              # +0
                       (-(2.0 ** -133), -1),   # -2 * 2^-133
                       (3 * 2.0 ** -133, -2),  # 2^-132
                       (2.0 ** -126, -2),      # largest subnormal
                       (-(2.0 ** -133), 2),    # exactly zero: +0
                       (0.0, -1),              # -2^-134, a tie: -0
                       (2.0 ** -133, 0)]),
    ],
    "F16": [
        (2.0 ** -11, [(_b(0x7E01), 3), (_b(0x7C01), 1),  # NaNs: kept
                      (float("inf"), -1), (float("-inf"), 1),  # kept
                      (-0.0, 0),               # kept
                      (1.0, 1),                # 1 + 2^-11, a tie: 1.0
                      (1 + 2.0 ** -10, 1),     # a tie: 1 + 2^-9
                      (-0.0, 1),               # 2^-11
                      (0.5, -1)]),             # 0.5 - 2^-11, exact
        (2.0 ** -11 + 2.0 ** -35, [(1.0, 1),   # y = RN32(...) = 1 + 2^-11, then a tie: 1.0
                                   (1.0, -1), (2.0, 1), (-1.0, 1), (0.0, 0), (-0.0, 2), (3.0, 3), (0.25, -4),
                                   (10.0, 100)]),
        (16.0, [(65504.0, 1),                  # 65520: overflow to +inf
                (-65504.0, -1),                # -inf
                (65504.0, -1),                 # 65488, a tie: 65472 (even)
                (60000.0, 127), (0.0, 127), (0.0, -128), (1.0, 1), (65504.0, 0), (-2.0, -2)]),
        (2.0 ** -25, [(3 * 2.0 ** -24, 1),     # 3.5 * 2^-24, a tie: 4 * 2^-24
                      (2.0 ** -24, -2),        # exactly zero: +0
                      (-(2.0 ** -24), 2),      # +0
                      (0.0, 1),                # 2^-25, a tie: +0
                      (-0.0, -1),              # -2^-25, a tie: -0
                      (2.0 ** -14, -1),        # 2^-14 - 2^-25, a tie: 2^-14 (even)
                      (0.0, 3),                # 1.5 * 2^-24, a tie: 2 * 2^-24
                      (1.0, 5), (-(2.0 ** -14), 1)]),
    ],
}


def _word(dtype: str, v) -> int:
    if isinstance(v, tuple):
        return v[1]
    if dtype == "F32":
        return int(np.array(v, "<f4").view("<u4"))
    if dtype == "BF16":
        bits = int(np.array(v, "<f4").view("<u4"))
        assert bits & 0xFFFF == 0, v
        return bits >> 16
    h = np.array(v, "<f2")
    assert float(h) == v or v != v, v
    return int(h.view("<u2"))


def qrows_inputs():
    """name -> (description, base tensors, target tensors, {tensor: QuantDelta}) for the qrows vectors.

    Per dtype: "w8" (16 x 9, 8-bit codes, a scale per row) changes its four special rows (QROWS_SPECIAL)
    and four random ones; "w4" (8 x 3 x 3, 4-bit codes, one scale) changes three rows whose old values
    include NaN, infinities, -0 and subnormals; "bias" does not change."""
    out = {}
    for seed, dtype in ((11, "F32"), (12, "BF16"), (13, "F16")):
        rng = np.random.default_rng(seed)
        word = quantdelta.word_dtype(dtype)
        w8 = np.frombuffer(_tensor(rng, dtype, (16, 9))[2], word).reshape(16, 9).copy()
        special = QROWS_SPECIAL[dtype]
        rows8 = [1, 4, 6, 9, 10, 12, 13, 15]
        codes8 = rng.integers(-128, 128, (8, 9)).astype(np.int8)
        scales8 = (rng.uniform(0.5, 2.0, 8) * 1e-3).astype(np.float32)
        for k, (scale, items) in zip((1, 3, 4, 7), special):
            scales8[k] = scale
            for j, (old, code) in enumerate(items):
                w8[rows8[k], j] = _word(dtype, old)
                codes8[k, j] = code
        q8 = quantdelta.QuantDelta(np.array(rows8), scales8, codes8, 8)
        w4 = np.frombuffer(_tensor(rng, dtype, (8, 3, 3))[2], word).reshape(8, 9).copy()
        rows4 = [0, 5, 7]
        codes4 = rng.integers(-8, 8, (3, 9)).astype(np.int8)
        olds = [float("nan"), float("inf"), float("-inf"), -0.0, -0.0, 0.0]
        tiny = {"F32": 2.0 ** -149, "BF16": 2.0 ** -133, "F16": 2.0 ** -24}[dtype]
        for j, old in enumerate(olds + [tiny, -tiny, 3 * tiny]):
            w4[5, j] = _word(dtype, old) if old == old else {"F32": 0x7FC00000, "BF16": 0x7FC0, "F16": 0x7E00}[dtype]
        codes4[1, :6] = [3, -8, 7, 0, 2, -1]
        q4 = quantdelta.QuantDelta(np.array(rows4), np.array([2.0 ** -7], np.float32), codes4, 4)
        bias = _tensor(rng, dtype, (16,))
        base = {"w8": (dtype, (16, 9), w8.tobytes()), "w4": (dtype, (8, 3, 3), w4.tobytes()), "bias": bias}
        target = {"w8": (dtype, (16, 9), q8.apply(w8, dtype).tobytes()),
                  "w4": (dtype, (8, 3, 3), q4.apply(w4, dtype).reshape(8, 9).tobytes()), "bias": bias}
        name = f"qrows-{dtype.lower()}"
        desc = (f"qrows (format 1.3) on {dtype}: 8 of 16 rows of w8 (8-bit codes, a scale per row; 4 special rows "
                "with NaN, infinities, -0, subnormal results, ties, overflow and an FMA-sensitive product) and 3 "
                "of 8 rows of w4 (4-bit codes, one scale, rows of 9 codes: a padding nibble; old NaN, infinities, "
                "-0 and subnormals)")
        out[name] = (desc, base, target, {"w4": q4, "w8": q8})
    return out


def invalid_qrows_patches(good: bytes):
    """name -> (description, patch bytes), from the qrows-f32 patch (plain header)."""
    h = header_json(good)
    ops = {op["name"]: i for i, op in enumerate(h["ops"])}
    i4, i8 = ops["w4"], ops["w8"]
    assert h["ops"][i8]["scales"]["codec"] == [] and h["ops"][i4]["values"]["codec"] == []

    def patch_byte(data: bytes, pos: int, value: int) -> bytes:
        b = bytearray(data)
        b[pos] = value
        return _reseal(bytes(b))

    s8 = h["ops"][i8]["scales"]["offset"]
    v4 = h["ops"][i4]["values"]["offset"]
    nan_scale = _reseal(good[:s8] + struct.pack("<I", 0x7FC00000) + good[s8 + 4:])
    return {
        "qrows-bad-bits": ("a qrows op with bits 5",
                           _edit_header(good, lambda h: h["ops"][i8].update(bits=5))),
        "qrows-codes-size": ("a qrows op whose values size is one byte short of count x row code bytes",
                             _edit_header(good, lambda h: h["ops"][i8]["values"].update(
                                 size=h["ops"][i8]["values"]["size"] - 1))),
        "qrows-scales-size": ("a qrows op whose scales size is 8 bytes: neither one scale nor one per row",
                              _edit_header(good, lambda h: h["ops"][i8]["scales"].update(size=8))),
        "qrows-bad-dtype": ("a qrows op on an I32 tensor",
                            _edit_header(good, lambda h: (h["ops"][i8]["base"].update(dtype="I32"),
                                                          h["ops"][i8]["target"].update(dtype="I32")))),
        "qrows-planes": ("a qrows op whose codes are stored with the planes stage",
                         _edit_header(good, lambda h: h["ops"][i8]["values"].update(codec=["planes"]))),
        "qrows-nan-scale": ("the first scale of a qrows op replaced by a NaN", nan_scale),
        "qrows-padding-nibble": ("the padding nibble after the first row's 9th 4-bit code set",
                                 patch_byte(good, v4 + 4, good[v4 + 4] | 0x10)),
    }


def _reseal(data: bytes) -> bytes:
    return data[:-TRAILER_SIZE] + blake3.blake3(data[:-TRAILER_SIZE]).digest()


def _edit_header(data: bytes, edit) -> bytes:
    (n,) = struct.unpack_from("<Q", data, 16)
    obj = json.loads(data[PREAMBLE_SIZE : PREAMBLE_SIZE + n])
    obj["created_by"] = ""
    edit(obj)
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n
    return _reseal(data[:PREAMBLE_SIZE] + text + b" " * (n - len(text)) + data[PREAMBLE_SIZE + n :])


def invalid_patches(good: bytes):
    """name -> (description, patch bytes)."""
    def flip(data, pos, mask):
        b = bytearray(data)
        b[pos] ^= mask
        return bytes(b)

    out = {
        "bad-magic": ("first byte changed", flip(good, 0, 0x01)),
        "version-2": ("Version_Major 2", good[:8] + struct.pack("<H", 2) + good[10:]),
        "reserved-flag": ("Flags bit 2 set", _reseal(good[:12] + struct.pack("<I", 4) + good[16:])),
        "zstd-flag-on-plain-header": ("Flags bit 1 (zstd header) set on a plain JSON header",
                                      _reseal(good[:12] + struct.pack("<I", 2) + good[16:])),
        "signed-flag-without-block": ("Flags bit 0 (signed) set, no signature block",
                                      _reseal(good[:12] + struct.pack("<I", 1) + good[16:])),
        "trailer-mismatch": ("one header byte changed, trailer not recomputed", flip(good, 30, 0x01)),
        "truncated": ("the last 100 bytes cut off", good[:-100]),
        "unknown-feature": ("required_features lists 'sparse-v9'",
                            _edit_header(good, lambda h: h.update(required_features=["sparse-v9"]))),
        "unknown-codec": ("a values codec stage 'lz4'",
                          _edit_header(good, lambda h: h["ops"][0]["values"].update(codec=["lz4"]))),
        "esort-without-delta": ("a values codec ['esort', 'zstd']: esort needs a delta stage before it",
                                _edit_header(good, lambda h: h["ops"][0]["values"].update(codec=["esort", "zstd"]))),
        "count-too-large": ("rows count 9 for a tensor of 8 rows",
                            _edit_header(good, lambda h: h["ops"][0].update(count=9))),
        "section-moved": ("target layout offset moved by 64",
                          _edit_header(good, lambda h: h["target"]["layout"].update(
                              offset=h["target"]["layout"]["offset"] + 64))),
        "trailing-bytes": ("64 zero bytes inserted before the trailer",
                           _reseal(good[:-TRAILER_SIZE] + bytes(64) + good[-TRAILER_SIZE:])),
        # Found by atheris (tests/regressions): every rule holds, but the target file digest is false.
        # Applying with verify=full must refuse it; the default mode proves tensors and layout only.
        "target-digest-lie": ("target.blake3 with its last two hex digits swapped; apply with verify=full",
                              _edit_header(good, lambda h: h["target"].update(
                                  blake3=h["target"]["blake3"][:-2] + h["target"]["blake3"][-1]
                                  + h["target"]["blake3"][-2]))),
    }
    return out


def directory_vector(d: str) -> tuple[str, dict, str, str]:
    options = dict(ALIGNED)
    """A Hugging Face model directory updated to another (format 1.1): tensors
    move from 2 shards to 3, one changes 2 rows, config.json changes (a blob),
    tokenizer.json does not (a copy)."""
    from nnpatch.weights.sharded import shard_name, write_sharded

    rng = np.random.default_rng(5)
    names = [f"layer{i}.weight" for i in range(6)]
    tensors = {n: _tensor(rng, "F32", (8, 16)) for n in names}
    new = dict(tensors)
    w = tensors["layer3.weight"]
    new["layer3.weight"] = ("F32", w[1], _mutate_rows(w[2], w[1], [1, 6], "F32"))
    base, target = os.path.join(d, "base"), os.path.join(d, "target")
    write_sharded(base, {shard_name(i + 1, 2): {n: tensors[n] for n in names[i * 3:(i + 1) * 3]} for i in range(2)},
                  shard_metadata={"format": "pt"})
    write_sharded(target, {shard_name(i + 1, 3): {n: new[n] for n in names[i * 2:(i + 1) * 2]} for i in range(3)},
                  shard_metadata={"format": "pt"})
    tokenizer = json.dumps({"vocab": {f"tok{i}": i for i in range(64)}}, indent=2).encode() + b"\n"
    for root, config in ((base, b'{"hidden_size": 16, "version": 1}\n'),
                         (target, b'{"hidden_size": 16, "version": 2}\n')):
        with open(os.path.join(root, "config.json"), "wb") as f:
            f.write(config)
        with open(os.path.join(root, "tokenizer.json"), "wb") as f:
            f.write(tokenizer)
    patch = os.path.join(d, "patch.nnpatch")
    nnpatch.diff(base, target, patch, level=LEVEL, **ALIGNED)
    desc = ("a model directory (format 1.1): 6 tensors move from 2 shards to 3, 2 rows of one change, "
            "config.json changes, tokenizer.json is copied")
    return desc, options, base, target


def onnx_vector(d: str) -> tuple[str, dict, str, str]:
    options = dict(ALIGNED)
    """An ONNX model updated in 2 output channels of one Gemm weight (format 1.1): the target is
    written back as ONNX, byte for byte.  Made with the onnx package (the `onnx` extra)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    w1 = rng.standard_normal((16, 8)).astype("<f4") * np.float32(0.1)
    b1 = (rng.standard_normal(16) * 0.1).astype("<f4")
    w2 = rng.standard_normal((4, 16)).astype("<f4") * np.float32(0.1)

    def model(fc1):
        inits = [numpy_helper.from_array(fc1, "fc1.weight"),  # raw_data
                 helper.make_tensor("fc1.bias", TensorProto.FLOAT, [16], b1.tolist()),  # float_data
                 numpy_helper.from_array(w2, "fc2.weight")]
        nodes = [helper.make_node("Gemm", ["X", "fc1.weight", "fc1.bias"], ["H"], transB=1),
                 helper.make_node("Relu", ["H"], ["Hr"]),
                 helper.make_node("Gemm", ["Hr", "fc2.weight"], ["Y"], transB=1)]
        graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], inits)
        return helper.make_model(graph, producer_name="nnpatch-vectors", opset_imports=[helper.make_opsetid("", 13)],
                                 ir_version=8)

    fc1 = w1.copy()
    fc1[[3, 9]] += np.float32(0.01)
    os.makedirs(d, exist_ok=True)
    base, target = os.path.join(d, "base.onnx"), os.path.join(d, "target.onnx")
    for path, m in ((base, model(w1)), (target, model(fc1))):
        onnx.checker.check_model(m)
        with open(path, "wb") as f:
            f.write(m.SerializeToString())
    nnpatch.diff(base, target, os.path.join(d, "patch.nnpatch"), level=LEVEL, **options)
    desc = ("an ONNX model (format 1.1; a 2-layer MLP, ir_version 8, opset 13): rows 3 and 9 of the fc1 Gemm "
            "weight moved by 0.01; apply writes the target .onnx back byte for byte (needs the onnx extra)")
    return desc, options, base, target


def gguf_vector(d: str, options: dict | None = None) -> tuple[str, dict, str, str]:
    """A GGUF model (format 1.4, an ``extents`` target) with F32, F16, Q8_0 and Q4_0 tensors at
    alignment 64: 2 rows of the Q8_0 tensor and 1 of the F16 one change, and a KV string. Written by
    gguf-py's GGUFWriter (the `gguf` extra); the patch rebuilds the target byte for byte."""
    options = dict(ALIGNED) if options is None else options
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    rng = np.random.default_rng(7)
    q8 = rng.standard_normal((6, 64)).astype("<f4")
    q4 = rng.standard_normal((4, 64)).astype("<f4")
    f16 = rng.standard_normal((5, 8)).astype("<f2")
    norm = rng.standard_normal(8).astype("<f4")

    def write(path, q8, f16, note):
        w = gguf.GGUFWriter(path, "llama")
        w.add_custom_alignment(64)
        w.add_name("nnpatch-vector")
        w.add_string("general.description", note)
        w.add_array("t.ints", [1, 2, 3])
        w.add_tensor("blk.0.ffn.weight", quants.quantize(q8, Q.Q8_0), raw_shape=quants.quant_shape_to_byte_shape(
            q8.shape, Q.Q8_0), raw_dtype=Q.Q8_0)
        w.add_tensor("blk.0.attn.weight", quants.quantize(q4, Q.Q4_0), raw_shape=quants.quant_shape_to_byte_shape(
            q4.shape, Q.Q4_0), raw_dtype=Q.Q4_0)
        w.add_tensor("blk.0.k.weight", f16)
        w.add_tensor("blk.0.norm.weight", norm)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    q8t, f16t = q8.copy(), f16.copy()
    q8t[[1, 4]] += np.float32(0.5)
    f16t[2] += np.float16(0.25)
    os.makedirs(d, exist_ok=True)
    base, target = os.path.join(d, "base.gguf"), os.path.join(d, "target.gguf")
    write(base, q8, f16, "v1")
    write(target, q8t, f16t, "v2")
    nnpatch.diff(base, target, os.path.join(d, "patch.nnpatch"), level=LEVEL, **options)
    desc = ("a GGUF model (format 1.4, an extents target; alignment 64, tensors F32, F16, Q8_0 and Q4_0): rows 1 "
            "and 4 of the Q8_0 tensor (a row: 2 blocks of 34 bytes), row 2 of the F16 one and the KV "
            "general.description change; apply writes the target .gguf back byte for byte (nnpatch reads the "
            "base with the gguf extra; the native applier needs only the patch's extent tables)")
    return desc, options, base, target


def _digest(path: str) -> str:
    if os.path.isdir(path):
        from nnpatch.weights.source import open_source

        with open_source(path) as s:
            return s.file_digest()
    return nnpatch.hash_file(path)


def invalid_directory_patches(good: bytes):
    """name -> (description, patch bytes), from the 'directory' patch (files: config.json blob,
    three shards, the index blob, tokenizer.json copy)."""
    def file(h, path):
        return next(f for f in h["target"]["files"] if f["path"] == path)

    def lie(h):
        f = file(h, "config.json")
        f["blake3"] = f["blake3"][:-2] + f["blake3"][-1] + f["blake3"][-2]
    return {
        "dir-copy-escapes": ("a copy whose 'from' is '../base/tokenizer.json'",
                             _edit_header(good, lambda h: file(h, "tokenizer.json").update(
                                 **{"from": "../base/tokenizer.json"}))),
        "dir-unknown-kind": ("a file of kind 'symlink'",
                             _edit_header(good, lambda h: file(h, "tokenizer.json").update(kind="symlink"))),
        "dir-copy-missing": ("a copy from 'vocab.txt', which the base directory lacks",
                             _edit_header(good, lambda h: file(h, "tokenizer.json").update(**{"from": "vocab.txt"}))),
        "dir-blob-digest-lie": ("config.json's blake3 with its last two hex digits swapped (the directory "
                                "digest is left as it was)", _edit_header(good, lie)),
        "dir-files-unsorted": ("the first two files swapped",
                               _edit_header(good, lambda h: h["target"]["files"].insert(
                                   0, h["target"]["files"].pop(1)))),
    }


def _invalid(directory: str, manifest: dict, name: str, desc: str, data: bytes, base: str, out: str, *,
             apply_options: dict | None = None, base_in_message: bool = False, **extra) -> None:
    """Write the broken patch ``name`` under invalid/, check that applying it to ``base`` fails, and record
    the error class and message it gives (``extra``: the entry's ``since``/``requires``)."""
    path = os.path.join(directory, "invalid", f"{name}.nnpatch")
    with open(path, "wb") as f:
        f.write(data)
    options = apply_options or {}
    try:
        nnpatch.apply(base, path, out, **options)
        raise SystemExit(f"invalid vector {name} was accepted")
    except nnpatch.NnpatchError as e:
        message = str(e).replace(path, "{patch}")
        if base_in_message:
            message = message.replace(base, "{base}")
        manifest["invalid"].append({"name": name, "description": desc, "patch": os.path.relpath(path, directory),
                                    "base": os.path.relpath(base, directory), "apply_options": options, **extra,
                                    "error": type(e).__name__, "message": message})


def _packed_vectors(directory: str, manifest: dict) -> None:
    """Format 1.5: the writer's default layout (sections packed end to end), valid and broken."""
    desc, base, target, _ = vector_inputs()["all-ops"]
    d = os.path.join(directory, "valid", "packed-all-ops")
    os.makedirs(d, exist_ok=True)
    bp, tp, pp = (os.path.join(d, f) for f in ("base.safetensors", "target.safetensors", "patch.nnpatch"))
    write_safetensors(bp, base, {"version": "1"})
    write_safetensors(tp, target, {"version": "2"})
    nnpatch.diff(bp, tp, pp, level=LEVEL)
    gd = os.path.join(directory, "valid", "packed-gguf")
    gdesc, goptions, gbp, gtp = gguf_vector(gd, {})
    gpp = os.path.join(gd, "patch.nnpatch")
    for name, vdesc, b, t, p, extra in (("packed-all-ops", "the all-ops inputs, sections packed (format 1.5): "
                                         + desc, bp, tp, pp, {}),
                                        ("packed-gguf", "the gguf inputs, sections packed and the skeleton a 'zstd-base' delta "
                                         "against the base's (format 1.5): " + gdesc,
                                         gbp, gtp, gpp, {"requires": "gguf"})):
        with nnpatch.read_patch(p) as patch:
            if patch.header.version != (1, 5) or not patch.header.packed:
                raise SystemExit(f"the {name} vector is not packed")
        manifest["valid"].append({
            "name": name, "description": vdesc, "options": {}, "since": "1.5", **extra,
            "base": os.path.relpath(b, directory), "target": os.path.relpath(t, directory),
            "patch": os.path.relpath(p, directory),
            "base_blake3": _digest(b), "target_blake3": _digest(t), "patch_blake3": nnpatch.hash_file(p),
        })
    with open(pp, "rb") as f:
        written = f.read()
    good = with_header(written, header_json(written))

    def unpack(h):
        h["required_features"] = []
    broken = {
        "packed-without-feature": ("the packed-all-ops patch without 'packed-sections' in required_features: "
                                   "its second section is not on a 64-byte boundary", _edit_header(good, unpack)),
        "packed-padding": ("the packed-all-ops patch with 64 zero bytes before its trailer",
                           _reseal(good[:-TRAILER_SIZE] + bytes(64) + good[-TRAILER_SIZE:])),
    }
    os.makedirs(os.path.join(directory, "invalid"), exist_ok=True)
    for name, (vdesc, data) in broken.items():
        _invalid(directory, manifest, name, vdesc, data, bp, os.path.join(tempfile.gettempdir(), "nnpatch-vector-out"),
                 since="1.5")


def _uses_delta(path: str) -> bool:
    with nnpatch.read_patch(path) as patch:
        return patch.header.target.skeleton.codec == [skeldelta.ZSTD_BASE]


def _frame_with_dict_id(frame: bytes) -> bytes:
    """The frame with Dictionary_ID_flag 1 and a 1-byte dictionary ID (7) in its header."""
    fhd = frame[4]
    at = 5 + (0 if fhd & 0x20 else 1)  # after the window descriptor (absent in a single-segment frame)
    return frame[:4] + bytes([(fhd & ~3) | 1]) + frame[5:at] + b"\x07" + frame[at:]


def _crafted_delta(base: str, target: str, out: str, craft) -> None:
    """A patch whose skeleton frame is ``craft(data, base skeleton, level)`` instead of the writer's."""
    real = skeldelta.encode
    skeldelta.encode = craft(real)
    try:
        nnpatch.diff(base, target, out, level=LEVEL)
    finally:
        skeldelta.encode = real


def _skeleton_vectors(directory: str, manifest: dict) -> None:
    """Format 1.5: an extents target's skeleton as a 'zstd-base' delta, valid and broken."""
    import shutil

    d = os.path.join(directory, "valid", "skeleton-tflite")
    os.makedirs(d, exist_ok=True)
    bp, tp, pp = (os.path.join(d, f) for f in ("base.tflite", "target.tflite", "patch.nnpatch"))
    shutil.copyfile(os.path.join(TFLITE, "cnn-int8.tflite"), bp)
    shutil.copyfile(os.path.join(TFLITE, "cnn-int8-bias.tflite"), tp)
    nnpatch.diff(bp, tp, pp, level=LEVEL)
    for p in (pp, os.path.join(directory, "valid", "packed-gguf", "patch.nnpatch")):
        if not _uses_delta(p):
            raise SystemExit(f"{p} does not carry its skeleton as a delta")
    manifest["valid"].append({
        "name": "skeleton-tflite", "since": "1.5", "options": {},
        "description": ("a LiteRT/TFLite CNN quantized to int8 (tests/data/tflite/cnn-int8.tflite) and the same "
                        "with a bias added to its second convolution (cnn-int8-bias.tflite): the flatbuffer "
                        "changes (a new tensor, its buffer and quantization), so the skeleton goes as a "
                        "'zstd-base' delta against the base's (format 1.5)"),
        "base": os.path.relpath(bp, directory), "target": os.path.relpath(tp, directory),
        "patch": os.path.relpath(pp, directory),
        "base_blake3": _digest(bp), "target_blake3": _digest(tp), "patch_blake3": nnpatch.hash_file(pp),
    })
    gd = os.path.join(directory, "valid", "packed-gguf")
    gbase, gtarget = os.path.join(gd, "base.gguf"), os.path.join(gd, "target.gguf")
    tmp = tempfile.mkdtemp()
    lie, named = os.path.join(tmp, "lie.nnpatch"), os.path.join(tmp, "named.nnpatch")
    _crafted_delta(gbase, gtarget, lie, lambda real: lambda data, b, level: real(data + b"\x00", b, level))
    _crafted_delta(gbase, gtarget, named, lambda real: lambda data, b, level: _frame_with_dict_id(
        real(data, b, level)))
    # the same target from a safetensors base holding the GGUF base's tensors as bytes
    st, plain = os.path.join(tmp, "base.safetensors"), os.path.join(tmp, "plain.nnpatch")
    with nnpatch.weights.source.open_source(gbase) as src:
        write_safetensors(st, {n: ("U8", [len(bytes(src.raw(n)))], bytes(src.raw(n))) for n in src.tensors}, {})
    nnpatch.diff(st, gtarget, plain, level=LEVEL)

    def to_delta(h):
        h["target"]["skeleton"]["codec"] = ["zstd-base"]

    def read(path):
        with open(path, "rb") as f:
            return f.read()
    broken = {
        "skeleton-delta-size-lie": (
            "the packed-gguf inputs, the skeleton's 'zstd-base' frame made of the skeleton and one byte more: it "
            "declares one byte more than the section's size", read(lie), gbase),
        "skeleton-delta-dict-id": (
            "the packed-gguf inputs, the skeleton's 'zstd-base' frame with a dictionary ID (7) in its header",
            read(named), gbase),
        "skeleton-delta-non-extents-base": (
            "a safetensors base (the packed-gguf base's tensors as U8) to the packed-gguf target, its "
            "target.skeleton's codec changed from ['zstd'] to ['zstd-base']: a base that is not an extents model "
            "has no skeleton", _edit_header(with_header(read(plain), header_json(read(plain))), to_delta), st),
    }
    shutil.copyfile(st, os.path.join(directory, "invalid", "skeleton-base.safetensors"))
    for name, (vdesc, data, base) in broken.items():
        base = os.path.join(directory, "invalid", "skeleton-base.safetensors") if base == st else base
        _invalid(directory, manifest, name, vdesc, data, base, os.path.join(tmp, "out.gguf"), since="1.5",
                 requires="gguf")
    shutil.rmtree(tmp)


def build(directory: str) -> dict:
    manifest = {"_comment": COMMENT, "zstd_version": zstandard.ZSTD_VERSION, "level": LEVEL,
                "valid": [], "invalid": []}
    for name, (desc, base, target, options) in vector_inputs().items():
        options = {**ALIGNED, **options}
        d = os.path.join(directory, "valid", name)
        os.makedirs(d, exist_ok=True)
        bp, tp, pp = (os.path.join(d, f) for f in ("base.safetensors", "target.safetensors", "patch.nnpatch"))
        write_safetensors(bp, base, {"version": "1"})
        write_safetensors(tp, target, {"version": "2"})
        nnpatch.diff(bp, tp, pp, level=LEVEL, **options)
        if name == "esort":
            with nnpatch.read_patch(pp) as p:
                if not all("esort" in op.values.codec for op in p.ops):
                    raise SystemExit("the esort vector does not use esort")
        manifest["valid"].append({
            "name": name, "description": desc, "options": options,
            "base": os.path.relpath(bp, directory), "target": os.path.relpath(tp, directory),
            "patch": os.path.relpath(pp, directory),
            "base_blake3": nnpatch.hash_file(bp), "target_blake3": nnpatch.hash_file(tp),
            "patch_blake3": nnpatch.hash_file(pp),
        })
    for name, (desc, base, target, deltas) in qrows_inputs().items():
        d = os.path.join(directory, "valid", name)
        os.makedirs(d, exist_ok=True)
        bp, tp, pp, qp = (os.path.join(d, f) for f in ("base.safetensors", "target.safetensors", "patch.nnpatch",
                                                       "deltas.safetensors"))
        write_safetensors(bp, base, {"version": "1"})
        write_safetensors(tp, target, {"version": "2"})
        save_quant_deltas(qp, deltas)
        nnpatch.diff(bp, tp, pp, level=LEVEL, quantized=qp, **ALIGNED)
        with nnpatch.read_patch(pp) as p:
            if sorted(op.kind for op in p.ops) != ["qrows", "qrows"] or p.header.version != (1, 3):
                raise SystemExit(f"the {name} vector does not use qrows")
        manifest["valid"].append({
            "name": name, "description": desc, "options": {"quantized": os.path.relpath(qp, directory), **ALIGNED},
            "since": "1.3",
            "base": os.path.relpath(bp, directory), "target": os.path.relpath(tp, directory),
            "patch": os.path.relpath(pp, directory),
            "base_blake3": nnpatch.hash_file(bp), "target_blake3": nnpatch.hash_file(tp),
            "patch_blake3": nnpatch.hash_file(pp),
        })
    d = os.path.join(directory, "valid", "directory")
    desc, options, bp, tp = directory_vector(d)
    pp = os.path.join(d, "patch.nnpatch")
    manifest["valid"].append({
        "name": "directory", "description": desc, "options": options,
        "base": os.path.relpath(bp, directory), "target": os.path.relpath(tp, directory),
        "patch": os.path.relpath(pp, directory),
        "base_blake3": _digest(bp), "target_blake3": _digest(tp), "patch_blake3": nnpatch.hash_file(pp),
    })
    d = os.path.join(directory, "valid", "onnx")
    desc, options, bp, tp = onnx_vector(d)
    pp = os.path.join(d, "patch.nnpatch")
    manifest["valid"].append({
        "name": "onnx", "description": desc, "options": options, "requires": "onnx",
        "base": os.path.relpath(bp, directory), "target": os.path.relpath(tp, directory),
        "patch": os.path.relpath(pp, directory),
        "base_blake3": _digest(bp), "target_blake3": _digest(tp), "patch_blake3": nnpatch.hash_file(pp),
    })
    d = os.path.join(directory, "valid", "gguf")
    desc, options, bp, tp = gguf_vector(d)
    pp = os.path.join(d, "patch.nnpatch")
    manifest["valid"].append({
        "name": "gguf", "description": desc, "options": options, "requires": "gguf", "since": "1.4",
        "base": os.path.relpath(bp, directory), "target": os.path.relpath(tp, directory),
        "patch": os.path.relpath(pp, directory),
        "base_blake3": _digest(bp), "target_blake3": _digest(tp), "patch_blake3": nnpatch.hash_file(pp),
    })
    _packed_vectors(directory, manifest)
    good_path = os.path.join(directory, "valid", "rows-f32", "patch.nnpatch")
    with open(good_path, "rb") as f:
        written = f.read()
    # invalid vectors edit the header text: start from the same patch with a plain header
    good = with_header(written, header_json(written))
    os.makedirs(os.path.join(directory, "invalid"), exist_ok=True)
    out = os.path.join(tempfile.gettempdir(), "nnpatch-vector-out")
    for name, (desc, data) in invalid_patches(good).items():
        _invalid(directory, manifest, name, desc, data, os.path.join(directory, "valid", "rows-f32", "base.safetensors"),
                 out, apply_options={"verify": "full"} if name == "target-digest-lie" else {})
    wrong = {"name": "wrong-base", "description": "the valid rows-f32 patch applied to the all-ops base",
             "apply_options": {},
             "patch": "valid/rows-f32/patch.nnpatch", "base": "valid/all-ops/base.safetensors"}
    try:
        nnpatch.apply(os.path.join(directory, wrong["base"]), os.path.join(directory, wrong["patch"]),
                      os.path.join(tempfile.gettempdir(), "nnpatch-vector-out"))
        raise SystemExit("wrong-base vector was accepted")
    except nnpatch.NnpatchError as e:
        wrong.update(error=type(e).__name__,
                     message=str(e).replace(os.path.join(directory, wrong["base"]), "{base}"))
    manifest["invalid"].append(wrong)
    qbase = os.path.join(directory, "valid", "qrows-f32", "base.safetensors")
    with open(os.path.join(directory, "valid", "qrows-f32", "patch.nnpatch"), "rb") as f:
        written = f.read()
    for name, (desc, data) in invalid_qrows_patches(with_header(written, header_json(written))).items():
        _invalid(directory, manifest, name, desc, data, qbase, out, since="1.3")
    gguf_base = os.path.join(directory, "valid", "gguf", "base.gguf")
    with open(os.path.join(directory, "valid", "gguf", "patch.nnpatch"), "rb") as f:
        written = f.read()
    ggood = with_header(written, header_json(written))

    def grow(h):
        h["target"]["outputs"][0]["size"] += 64
    for name, (desc, data) in {
        "extents-size-lie": ("the gguf patch with target.outputs[0].size 64 bytes larger than its extent table's "
                             "file size", _edit_header(ggood, grow)),
        "extents-no-table": ("the gguf patch without target.extents",
                             _edit_header(ggood, lambda h: h["target"].pop("extents"))),
    }.items():
        _invalid(directory, manifest, name, desc, data, gguf_base, out + ".gguf", since="1.4", requires="gguf")
    dir_base = os.path.join(directory, "valid", "directory", "base")
    with open(os.path.join(directory, "valid", "directory", "patch.nnpatch"), "rb") as f:
        written = f.read()
    dgood = with_header(written, header_json(written))
    for name, (desc, data) in invalid_directory_patches(dgood).items():
        _invalid(directory, manifest, name, desc, data, dir_base,
                 os.path.join(tempfile.gettempdir(), "nnpatch-vector-dir-out"), base_in_message=True)
    _skeleton_vectors(directory, manifest)
    with open(os.path.join(directory, "vectors.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true", help="rewrite spec/vectors/")
    args = ap.parse_args()
    if args.update:
        # only this generator's files: spec/vectors/journal and manifest have generators of their own
        remove(VECTORS, ("valid", "invalid"))
        build(VECTORS)
        print(f"wrote {VECTORS}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp)
        return report(stale(tmp, VECTORS))


if __name__ == "__main__":
    raise SystemExit(main())
