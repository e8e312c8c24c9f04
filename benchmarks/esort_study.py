"""Which order of the delta words packs smallest: the study behind the `esort` stage.

    python benchmarks/esort_study.py OLD.safetensors NEW.safetensors [--level 5]

For every changed float tensor (>= 4096 elements), takes the zigzag integer
difference of the bit patterns (nnpatch's `zadd`), in chunks of 2^20 words as
the format does, reorders each chunk by a key computed from the OLD value,
splits it into byte planes and compresses each plane with zstd.  Prints the
total bytes per key: none (natural order), the exponent field (what `esort`
uses), the exponent plus 1 or 2 mantissa bits, the whole magnitude, and the
exponent without its lowest bit.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import zstandard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nnpatch import codecs  # noqa: E402
from nnpatch.weights import SafetensorsFile  # noqa: E402

CHUNK = 1 << 20


def keys(old: np.ndarray, dtype: str) -> dict[str, np.ndarray | None]:
    mant, bits = codecs.EXPONENT_FIELDS[dtype]
    o = old.astype(np.int64)
    sign_off = (1 << (mant + bits)) - 1
    return {
        "none": None,
        "exponent (esort)": (o >> mant) & ((1 << bits) - 1),
        "exponent + 1 mantissa bit": (o >> (mant - 1)) & ((1 << (bits + 1)) - 1),
        "exponent + 2 mantissa bits": (o >> (mant - 2)) & ((1 << (bits + 2)) - 1),
        "magnitude": o & sign_off,
        "exponent >> 1": (o >> (mant + 1)) & ((1 << (bits - 1)) - 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--level", type=int, default=codecs.DEFAULT_LEVEL)
    args = ap.parse_args(argv)
    z = zstandard.ZstdCompressor(level=args.level)
    totals: dict[str, int] = {}
    raw = 0
    with SafetensorsFile(args.old) as a, SafetensorsFile(args.new) as b:
        for name, info in a.tensors.items():
            if info.dtype not in codecs.EXPONENT_FIELDS or name not in b.tensors or info.numel < 4096:
                continue
            x, y = a.bits(name).reshape(-1), b.bits(name).reshape(-1)
            if x.shape != y.shape or np.array_equal(x, y):
                continue
            width = info.itemsize
            v = np.frombuffer(codecs.encode_delta(y.view(np.uint8), x.view(np.uint8), width, "zadd"), x.dtype)
            raw += v.nbytes
            for label, key in keys(x, info.dtype).items():
                size = 0
                for lo in range(0, len(v), CHUNK):
                    part = v[lo:lo + CHUNK]
                    if key is not None:
                        part = part[np.argsort(key[lo:lo + CHUNK], kind="stable")]
                    for plane in part.view(np.uint8).reshape(-1, width).T:
                        size += len(z.compress(plane.tobytes()))
                totals[label] = totals.get(label, 0) + size
    print(f"changed float values: {raw:,} B (zadd, byte planes, zstd level {args.level} per plane)")
    for label, size in totals.items():
        print(f"  {label:28s} {size:>12,} B  {100 * size / max(1, raw):6.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
