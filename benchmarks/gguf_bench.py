"""GGUF pairs: patch size against the file, `zstd -19 --long=27 --patch-from`, XOR + zstd and
`xdelta3 -9`; diff throughput against `cp` and BLAKE3 of the same file; apply time (Python,
nnpatch-apply) against `cp`; what `nnpatch-apply --in-place` writes (strace) against the changed rows.

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


def changed_rows_bytes(a: str, p: str, d: str) -> int:
    """The bytes of the units an in-place apply of ``p`` to ``a`` changes, from the journal an apply
    stopped at its commit point leaves (both implementations write the same one)."""
    from nnpatch.applier import apply_in_place, recover
    from nnpatch.applier.inplace import SimulatedCrash
    from nnpatch.applier.journal import journal_path, read_journal

    m = os.path.join(d, "inplace.gguf")
    shutil.copyfile(a, m)

    def stop(step):
        if step == "journal":
            raise SimulatedCrash(step)
    try:
        apply_in_place(m, p, hook=stop)
    except SimulatedCrash:
        pass
    j = read_journal(journal_path(m), model_size=os.path.getsize(m))
    rows = sum(e.count * e.unit for e in j.entries)
    j.close()
    recover(m)
    os.unlink(m)
    return rows


def native_in_place_writes(native: str, a: str, p: str, d: str) -> tuple[int, int] | None:
    """(bytes nnpatch-apply --in-place writes to the model, to its journal), counted by strace from the
    write and pwrite64 calls, or None without strace or the native build."""
    strace = shutil.which("strace")
    if not strace or not os.path.exists(native):
        return None
    m, log = os.path.join(d, "inplace.gguf"), os.path.join(d, "strace.txt")
    shutil.copyfile(a, m)
    subprocess.run([strace, "-f", "-qq", "-e", "trace=openat,write,pwrite64", "-o", log, native, "--in-place", m, p],
                   check=True, stdout=subprocess.DEVNULL)
    fds, model, journal = {}, 0, 0
    for line in open(log):
        call = line.split(None, 1)[1] if line[0].isdigit() else line
        if call.startswith("openat(") and "= " in call and not call.rstrip().endswith("-1"):
            path = call.split('"')[1]
            fds[int(call.rsplit("= ", 1)[1].split()[0])] = path
        elif call.startswith(("write(", "pwrite64(")) and "= " in call:
            fd, n = int(call.split("(", 1)[1].split(",", 1)[0]), int(call.rsplit("= ", 1)[1].split()[0])
            if fds.get(fd) == m:
                model += n
            elif fds.get(fd, "").startswith(m + ".nnpatch-journal"):
                journal += n
    os.unlink(m)
    return model, journal


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
    b3sum = shutil.which("b3sum")
    xdelta = shutil.which("xdelta3")
    print("| pair | file | nnpatch | zstd-pf-19 | XOR+zstd-19 | xdelta3-9 | diff MB/s | cp MB/s | BLAKE3 MB/s "
          "| apply py s | apply native s | native in place: written / changed rows, journal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for kind in ("rows", "dense"):
        a, b = pair(d, args.layers, kind)
        mb = os.path.getsize(b) / 1e6
        p = os.path.join(d, f"{kind}.nnpatch")
        t0 = time.perf_counter()
        nnpatch.diff(a, b, p)
        t_diff = time.perf_counter() - t0
        zpf = os.path.join(d, f"{kind}.zst")
        subprocess.run(["zstd", "-q", "-f", "-19", "--long=27", f"--patch-from={a}", b, "-o", zpf], check=True,
                       stderr=subprocess.DEVNULL)
        x = np.fromfile(a, np.uint8) ^ np.fromfile(b, np.uint8)  # same size: the pairs keep every offset
        xor = len(zstandard.ZstdCompressor(level=19).compress(x.tobytes()))
        if xdelta:
            xd = os.path.join(d, f"{kind}.xd3")
            subprocess.run([xdelta, "-9", "-e", "-f", "-s", a, b, xd], check=True)
            xd_size = str(os.path.getsize(xd))
        else:
            xd_size = "n/a (xdelta3 not installed)"
        out = os.path.join(d, "out.gguf")
        t_cp = timed(["cp", b, out])
        t_b3 = timed([b3sum, b]) if b3sum else timed([sys.executable, "-c", "import blake3,sys; "
                                                       "blake3.blake3(open(sys.argv[1],'rb').read()).digest()", b])
        t_py = timed([sys.executable, "-m", "nnpatch", "apply", a, p, "-o", out])
        t_n = timed([native, a, p, "-o", out, "--quiet"]) if os.path.exists(native) else float("nan")
        rows = changed_rows_bytes(a, p, d)
        w = native_in_place_writes(native, a, p, d)
        inplace = "n/a (no strace or native build)" if w is None else \
            f"{w[0]} / {rows} ({w[0] / max(rows, 1):.2f}x), {w[1]}"
        print(f"| {kind} | {os.path.getsize(b)} | {os.path.getsize(p)} | {os.path.getsize(zpf)} | {xor} | {xd_size} | "
              f"{mb / t_diff:.0f} | {mb / t_cp:.0f} | {mb / t_b3:.0f} | {t_py:.2f} | {t_n:.2f} | "
              f"{inplace} |")
    if not args.out:
        shutil.rmtree(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
