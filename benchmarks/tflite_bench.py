"""TFLite pairs: patch size against `zstd -19 --long=27 --patch-from`, per pair and storage mode.

The pairs are the converter files of tests/data/tflite (a 43k-weight CNN, float32 and int8 with
per-channel scales; see its generate.py), or, with ``--dir``, the same pairs written wider by
``generate.py --width N --out DIR`` (litert-torch's own venv, see there). Each pair runs in both
storage modes: inline (``Buffer.data``, as converted) and by offset (``Buffer.offset/size``, both
files written again by tests/tflite_files.offset_mode). Every patch is applied and checked byte for
byte before its size is printed. Needs the dev extra (ai-edge-litert) and zstd.

    PYTHONPATH=. python benchmarks/tflite_bench.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nnpatch  # noqa: E402
from tests.tflite_files import DATA, PAIRS, offset_mode  # noqa: E402

#: the issue's goals, by the target's change
GOALS = {"channels": 0.70, "moved": 0.65}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=DATA, help="folder of the pairs' .tflite files (default: the fixtures)")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="tflite-bench-")
    print("| pair | mode | file | nnpatch | zstd-pf-19 | ratio | goal |")
    print("|---|---|---:|---:|---:|---:|---|")
    try:
        for base, target in PAIRS:
            for mode in ("inline", "offset"):
                a, b = (os.path.join(args.dir, f"{n}.tflite") for n in (base, target))
                if mode == "offset":
                    a = offset_mode(a, os.path.join(d, "a.tflite"))
                    b = offset_mode(b, os.path.join(d, "b.tflite"))
                p, out, z = (os.path.join(d, n) for n in ("p.nnpatch", "out.tflite", "p.zst"))
                nnpatch.diff(a, b, p)
                nnpatch.apply(a, p, out)
                assert filecmp.cmp(out, b, shallow=False), (target, mode)
                subprocess.run(["zstd", "-q", "-f", "-19", "--long=27", f"--patch-from={a}", b, "-o", z],
                               check=True, stderr=subprocess.DEVNULL)
                n, zs = os.path.getsize(p), os.path.getsize(z)
                kind = next((k for k in GOALS if target.endswith(k)), None)
                goal = "" if kind is None else f"<= {GOALS[kind]:.2f}x: " + \
                    ("PASS" if n / zs <= GOALS[kind] else "FAIL")
                print(f"| {target} | {mode} | {os.path.getsize(b)} | {n} | {zs} | {n / zs:.3f}x | {goal} |")
    finally:
        shutil.rmtree(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
