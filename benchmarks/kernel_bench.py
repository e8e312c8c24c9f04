"""Micro-benchmark of nnpatch.kernel: C extension vs numpy fallback.

Run from the repo root:  .venv/bin/python benchmarks/kernel_bench.py [--repeat N] [--quick]

Data is generated in memory.  Each case is timed best-of-N per backend (the
machine may be shared and noisy, so compare the C/numpy ratio, not absolute
times).  GB/s counts the bytes of `values` consumed (for planes/unplanes:
the bytes of src), i.e. patch payload decoded per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nnpatch import kernel  # noqa: E402


def best_of(fn, setup, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cases(quick: bool):
    rng = np.random.default_rng(0)
    scale = 4 if quick else 1

    # planes / unplanes of a 64 MiB fp32 tensor (16 MiB when --quick)
    src = rng.integers(0, 256, (64 << 20) // scale, dtype=np.uint8)
    out = np.empty_like(src)
    yield ("planes w=4 (64 MiB)" if not quick else "planes w=4 (16 MiB)",
           src.nbytes, lambda: kernel.planes(src, 4, out=out), lambda: None)
    yield ("unplanes w=4", src.nbytes, lambda: kernel.unplanes(src, 4, out=out), lambda: None)
    yield ("unplanes w=2", src.nbytes, lambda: kernel.unplanes(src, 2, out=out), lambda: None)

    # scatter_rows: 1024 x 4096 fp32 tensor, 10 % of rows
    nrows, ncols, w = 1024, 4096, 4
    rb = ncols * w
    tensor = rng.integers(0, 256, nrows * rb, dtype=np.uint8)
    rows = np.sort(rng.choice(nrows, nrows // 10, replace=False)).astype(np.uint64)
    vals = rng.integers(0, 256, rows.size * rb, dtype=np.uint8)
    dst = tensor.copy()

    def reset_rows():
        np.copyto(dst, tensor)

    for mode, planar in (("xor", True), ("replace", False), ("xor", False), ("zadd", True)):
        yield (f"scatter_rows {mode}{' planar' if planar else ''} 1024x4096 f32 10%",
               vals.nbytes,
               lambda mode=mode, planar=planar: kernel.scatter_rows(
                   dst, rb, rows, vals, w, mode, planar=planar),
               reset_rows)

    # scatter_elements: 1M elements out of 16M fp32 (4M of 4M... when --quick)
    n_el = (16 << 20) // scale
    k = (1 << 20) // scale
    etensor = rng.integers(0, 256, n_el * 4, dtype=np.uint8)
    eidx = np.sort(rng.choice(n_el, k, replace=False)).astype(np.uint64)
    evals = rng.integers(0, 256, k * 4, dtype=np.uint8)
    edst = etensor.copy()

    def reset_el():
        np.copyto(edst, etensor)

    for mode, planar in (("xor", True), ("replace", False), ("zadd", True)):
        yield (f"scatter_elements {mode}{' planar' if planar else ''} 1M/16M f32"
               if not quick else f"scatter_elements {mode}{' planar' if planar else ''} 256K/4M f32",
               evals.nbytes,
               lambda mode=mode, planar=planar: kernel.scatter_elements(
                   edst, eidx, evals, 4, mode, planar=planar),
               reset_el)

    # encoder side helpers
    gout = np.empty(rows.size * rb, dtype=np.uint8)
    yield ("gather_rows 1024x4096 f32 10%", gout.nbytes,
           lambda: kernel.gather_rows(tensor, rb, rows, out=gout), lambda: None)
    geout = np.empty(k * 4, dtype=np.uint8)
    yield ("gather_elements 1M/16M f32" if not quick else "gather_elements 256K/4M f32",
           geout.nbytes, lambda: kernel.gather_elements(etensor, 4, eidx, out=geout),
           lambda: None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="runs per case; the best counts")
    ap.add_argument("--quick", action="store_true", help="4x smaller data")
    args = ap.parse_args()

    if kernel._ext is None:
        print("C extension not built: nothing to compare (pip install -e . with a C compiler)")
        return 1
    before = kernel.backend
    rows = []
    try:
        for name, nbytes, fn, setup in cases(args.quick):
            t = {}
            for be in ("c", "numpy"):
                kernel.select(be)
                fn()  # warm-up (page faults, caches)
                t[be] = best_of(fn, setup, args.repeat)
            rows.append((name, nbytes, t["c"], t["numpy"]))
    finally:
        kernel.select(before)

    hdr = f"{'case':<44} {'MB':>7} {'C ms':>8} {'np ms':>8} {'C GB/s':>7} {'np GB/s':>7} {'C/np':>6}"
    print(hdr)
    print("-" * len(hdr))
    for name, nbytes, tc, tn in rows:
        print(f"{name:<44} {nbytes / 1e6:7.1f} {tc * 1e3:8.2f} {tn * 1e3:8.2f} "
              f"{nbytes / tc / 1e9:7.2f} {nbytes / tn / 1e9:7.2f} {tn / tc:5.1f}x")
    print(f"(best of {args.repeat}; C/np = numpy time / C time, higher is better)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
