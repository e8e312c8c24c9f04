"""Native applier benchmark (issue 13): `nnpatch-apply` beside `cp` and the Python `nnpatch apply`.

    python benchmarks/native_bench.py                    # the 1.42 GB channel-sparse pair of apply_bench.py
    python benchmarks/native_bench.py --size 300M        # a smaller pair made the same way
    python benchmarks/native_bench.py --size 300M --write   # and record the table in RESULTS-apply.md

The pair: GPT-2-medium tensor shapes in fp32, a target where 10 % of the rows (output channels)
of every matrix changed, diffed by `nnpatch.diff` at the default level. The full size is
apply_bench.py's own pair (bench-out/s1-*); a smaller --size keeps the embedding and as many
transformer layers as fit (the embedding's vocabulary shrinks below ~260 MB), cached under
bench-out/native-<MB>-*.

In one run, interleaved, best (and median) of --reps: `cp`, `cp` + `sync`, the Python
`nnpatch apply` (default verify), `nnpatch-apply --verify default` and `--verify full`. Every
time is the wall time of the whole command (start-up included: the native command has none to
speak of, Python's is part of what a user waits for), started after a `sync` so that no step
pays for the write-back of the one before. Peak VmRSS and RssAnon are sampled from
/proc/PID/status every 2 ms by a thread of this process. Every output is checked against the
target (BLAKE3) after it is timed. Then: the stripped size of nnpatch-apply (shared libzstd and
libsodium aside) and the start-up time of `nnpatch-apply --version` against `nnpatch --version`
(mean of --startup-runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "bench-out")
RESULTS = os.path.join(HERE, "RESULTS-apply.md")
BINARY = os.path.join(ROOT, "build", "native", "nnpatch-apply")
NNPATCH = os.path.join(os.path.dirname(sys.executable), "nnpatch")
SECTION = "## native applier (benchmarks/native_bench.py)"
FULL_SIZE = 1_420_000_000
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def parse_size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    t = text.strip().upper().rstrip("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


# --- the pair ------------------------------------------------------------------------------------

def shapes_for(size: int) -> dict[str, tuple[int, ...]]:
    """GPT-2-medium shapes (apply_bench.gpt2_medium_shapes) cut down to about ``size`` bytes of fp32."""
    from apply_bench import gpt2_medium_shapes

    full = gpt2_medium_shapes(1)
    d, per_layer = 1024, 12 * 1024 * 1024 * 4 + 13 * 1024 * 4  # 4 matrices + biases/norms of one layer
    emb = (50257 + 1024) * d * 4
    layers = max(1, min(24, round((size - emb) / per_layer)))
    vocab = 50257
    if size < emb + per_layer:  # below ~260 MB: one layer, a smaller vocabulary
        vocab = max(1024, (size - per_layer - 1024 * d * 4) // (d * 4))
    shapes = {k: v for k, v in full.items() if not k.startswith("h.") or int(k.split(".")[1]) < layers}
    shapes["wte.weight"] = (vocab, d)
    return shapes


def make_pair(size: int) -> tuple[str, str, str]:
    """(base, target, patch): apply_bench.py's 1.42 GB pair, or one made the same way at ``size``."""
    if size >= FULL_SIZE:
        from apply_bench import make_model

        return make_model(1)
    import nnpatch
    from nnpatch.weights import encode_safetensors_header

    os.makedirs(OUT, exist_ok=True)
    tag = f"native-{size // 10**6}M"
    base, target, patch = (os.path.join(OUT, f"{tag}-{n}") for n in ("base.safetensors", "target.safetensors",
                                                                      "update.nnpatch"))
    stamp = os.path.join(OUT, f"{tag}-stamp.json")
    want = {"size": size, "share": 0.1, "version": 1}
    if all(map(os.path.exists, (base, target, patch, stamp))):
        with open(stamp) as f:
            if json.load(f) == want:
                return base, target, patch
    shapes = shapes_for(size)
    sizes = {n: ("F32", s, int(np.prod(s)) * 4) for n, s in shapes.items()}
    head, order = encode_safetensors_header(sizes, {"format": "pt"})
    rng = np.random.default_rng(0)
    print(f"generating a {sum(v[2] for v in sizes.values()) / 1e9:.2f} GB model and target ...", flush=True)
    with open(base, "wb") as fb, open(target, "wb") as ft:
        fb.write(head)
        ft.write(head)
        for name in order:
            shape = shapes[name]
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            fb.write(w.tobytes())
            if len(shape) == 2:
                rows = rng.choice(shape[0], max(1, int(0.1 * shape[0])), replace=False)
                w[rows] += rng.standard_normal((len(rows), shape[1]), dtype=np.float32) * np.float32(1e-3)
            ft.write(w.tobytes())
    print("diffing ...", flush=True)
    t = time.perf_counter()
    nnpatch.diff(base, target, patch)
    print(f"  diff took {time.perf_counter() - t:.1f} s, patch {os.path.getsize(patch) / 1e6:.1f} MB", flush=True)
    with open(stamp, "w") as f:
        json.dump(want, f)
    return base, target, patch


# --- measuring ----------------------------------------------------------------------------------

def measure(cmd: list[str]) -> dict:
    """Wall time, exit code, and peak VmRSS / RssAnon (bytes) of ``cmd``."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"VmRSS": 0, "RssAnon": 0}

    def sample():
        path = f"/proc/{p.pid}/status"
        while p.poll() is None:
            try:
                with open(path) as f:
                    for line in f:
                        key = line.split(":", 1)[0]
                        if key in peak:
                            peak[key] = max(peak[key], int(line.split()[1]) * 1024)
            except (OSError, ValueError, IndexError):
                break
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = p.communicate()
    wall = time.perf_counter() - t
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {err.decode(errors='replace')[-2000:]}")
    return {"time": wall, "rss": peak["VmRSS"], "anon": peak["RssAnon"]}


def digest(path: str) -> str:
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(path)
    return h.hexdigest()


def stripped_size(binary: str) -> int:
    with tempfile.TemporaryDirectory() as t:
        out = os.path.join(t, "stripped")
        subprocess.run(["strip", "-o", out, binary], check=True)
        return os.path.getsize(out)


def shared_libs(binary: str) -> list[str]:
    r = subprocess.run(["ldd", binary], capture_output=True, text=True)
    return sorted({line.split()[0] for line in r.stdout.splitlines()
                   if "=>" in line and not line.split()[0].startswith(("linux-vdso", "libc.so", "ld-linux"))})


def startup(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.mean(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=FULL_SIZE,
                    help="model size (e.g. 300M; default: apply_bench.py's 1.42 GB pair)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--startup-runs", type=int, default=20)
    ap.add_argument("--binary", default=BINARY)
    ap.add_argument("--write", action="store_true", help=f"record the table in {os.path.relpath(RESULTS, ROOT)}")
    a = ap.parse_args()
    if not os.path.exists(a.binary):
        subprocess.run(["make", "--no-print-directory", "native"], cwd=ROOT, check=True)
    base, target, patch = make_pair(a.size)
    want = digest(target)
    out = os.path.join(OUT, "native-bench-out.safetensors")
    steps = {
        "cp": (["cp", base, out], None),
        "cp + sync": (["sh", "-c", f"cp '{base}' '{out}' && sync '{out}'"], None),
        "nnpatch apply (Python)": ([NNPATCH, "--quiet", "apply", base, patch, "-o", out], want),
        "nnpatch-apply --verify default": ([a.binary, base, patch, "-o", out, "--quiet"], want),
        "nnpatch-apply --verify full": ([a.binary, base, patch, "-o", out, "--verify", "full", "--quiet"], want),
    }
    runs: dict[str, list[dict]] = {k: [] for k in steps}
    for rep in range(a.reps):
        for name, (cmd, check) in steps.items():
            if os.path.exists(out):
                os.unlink(out)
            os.sync()  # every step starts with no write-back pending from the one before
            r = measure(cmd)
            if check is not None and digest(out) != check:
                raise SystemExit(f"{name}: the output is not the target")
            runs[name].append(r)
        print(f"round {rep + 1}/{a.reps} done", flush=True)
    if os.path.exists(out):
        os.unlink(out)
    size = os.path.getsize(base)
    cp = min(r["time"] for r in runs["cp"])
    lines = [f"Model: {size / 1e9:.2f} GB fp32 (GPT-2-medium shapes, 10 % of the rows of every matrix changed), "
             f"patch {os.path.getsize(patch) / 1e6:.1f} MB; {os.cpu_count()} CPUs, best of {a.reps} interleaved "
             f"rounds, warm page cache, `sync` before each step; wall time of the whole command (start-up "
             f"included).",
             "",
             "| step | best s | median s | / cp | peak VmRSS MiB | peak RssAnon MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in steps:
        times = [r["time"] for r in runs[name]]
        rss = max(r["rss"] for r in runs[name]) / 2**20
        anon = max(r["anon"] for r in runs[name]) / 2**20
        lines.append(f"| {name} | {min(times):.2f} | {statistics.median(times):.2f} | {min(times) / cp:.2f} | "
                     f"{rss:.0f} | {anon:.1f} |")
    native_start = startup([a.binary, "--version"], a.startup_runs)
    python_start = startup([NNPATCH, "--version"], a.startup_runs)
    libs = ", ".join(shared_libs(a.binary)) or "none"
    lines += ["",
              f"Stripped `nnpatch-apply`: {stripped_size(a.binary) / 1024:.0f} KiB (shared libraries: {libs}).",
              f"Start-up, mean of {a.startup_runs}: `nnpatch-apply --version` {native_start * 1000:.1f} ms, "
              f"`nnpatch --version` {python_start * 1000:.0f} ms ({python_start / native_start:.0f}x)."]
    text = "\n".join(lines)
    print()
    print(text)
    if a.write:
        write_results(text, " ".join(["python benchmarks/native_bench.py"] + sys.argv[1:]))
    return 0


def write_results(text: str, command: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS-apply.md, leaving the rest as it is."""
    with open(RESULTS) as f:
        content = f.read()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = f"{SECTION}\n\nReproduce: `{command}` ({stamp})\n\n{text}\n"
    if SECTION in content:
        start = content.index(SECTION)
        nxt = content.find("\n## ", start + len(SECTION))
        content = content[:start] + block + ("\n" + content[nxt + 1:] if nxt >= 0 else "")
    else:
        content = content.rstrip("\n") + "\n\n" + block
    with open(RESULTS, "w") as f:
        f.write(content)


if __name__ == "__main__":
    sys.exit(main())
