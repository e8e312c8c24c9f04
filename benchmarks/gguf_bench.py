"""GGUF pairs: patch size against the file, `zstd -19 --long=27 --patch-from` and XOR + zstd; apply
time (Python, nnpatch-apply) against `cp`.

    python benchmarks/gguf_bench.py [--layers 8] [--out DIR]

The pair is written by gguf-py (Q4_0, Q8_0 and F16 matrices, F32 norms, a 32k-token vocabulary in
the metadata): ``rows`` changes 10 % of each matrix's output rows, ``dense`` moves every weight by
0.01 (N(0, 1) weights) and re-quantizes. Needs the gguf extra, zstd, and `make native` for the native
figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import zstandard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nnpatch  # noqa: E402


def write(path, weights):
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("bench")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(32000)])
    for n, (a, t) in weights.items():
        if t == Q.F32:
            w.add_tensor(n, a)
        elif t == Q.F16:
            w.add_tensor(n, a.astype(np.float16))
        else:
            w.add_tensor(n, quants.quantize(a, t), raw_shape=quants.quant_shape_to_byte_shape(a.shape, t),
                         raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def pair(d: str, layers: int, kind: str) -> tuple[str, str]:
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(0)
    base = {}
    for i in range(layers):
        base[f"blk.{i}.attn_q.weight"] = (rng.standard_normal((1024, 1024), dtype=np.float32), Q.Q4_0)
        base[f"blk.{i}.ffn_up.weight"] = (rng.standard_normal((2048, 1024), dtype=np.float32), Q.Q8_0)
        base[f"blk.{i}.attn_k.weight"] = (rng.standard_normal((256, 1024), dtype=np.float32), Q.F16)
        base[f"blk.{i}.norm.weight"] = (rng.standard_normal(1024, dtype=np.float32), Q.F32)
    new = {}
    for n, (a, t) in base.items():
        a = a.copy()
        if a.ndim == 2 and kind == "rows":
            pick = rng.choice(a.shape[0], a.shape[0] // 10, replace=False)
            a[pick] += rng.standard_normal((len(pick), a.shape[1]), dtype=np.float32) * 0.1
        elif a.ndim == 2:
            a += rng.standard_normal(a.shape, dtype=np.float32) * 0.01
        new[n] = (a, t)
    a, b = os.path.join(d, "v1.gguf"), os.path.join(d, f"v2-{kind}.gguf")
    write(a, base)
    write(b, new)
    return a, b


def timed(cmd) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out")
    args = ap.parse_args()
    d = args.out or tempfile.mkdtemp(prefix="gguf-bench-")
    native = os.path.join(ROOT, "build", "native", "nnpatch-apply")
    print("| pair | file | nnpatch | zstd-pf-19 | XOR+zstd-19 | diff s | apply py s | apply native s | cp s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("rows", "dense"):
        a, b = pair(d, args.layers, kind)
        p = os.path.join(d, f"{kind}.nnpatch")
        t0 = time.perf_counter()
        nnpatch.diff(a, b, p)
        t_diff = time.perf_counter() - t0
        zpf = os.path.join(d, f"{kind}.zst")
        subprocess.run(["zstd", "-q", "-f", "-19", "--long=27", f"--patch-from={a}", b, "-o", zpf], check=True,
                       stderr=subprocess.DEVNULL)
        x = np.fromfile(a, np.uint8) ^ np.fromfile(b, np.uint8)  # same size: the pairs keep every offset
        xor = len(zstandard.ZstdCompressor(level=19).compress(x.tobytes()))
        out = os.path.join(d, "out.gguf")
        t_py = timed([sys.executable, "-m", "nnpatch", "apply", a, p, "-o", out])
        t_n = timed([native, a, p, "-o", out, "--quiet"]) if os.path.exists(native) else float("nan")
        t_cp = timed(["cp", a, out])
        print(f"| {kind} | {os.path.getsize(b)} | {os.path.getsize(p)} | {os.path.getsize(zpf)} | {xor} | "
              f"{t_diff:.2f} | {t_py:.2f} | {t_n:.2f} | {t_cp:.2f} |")
    if not args.out:
        shutil.rmtree(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
