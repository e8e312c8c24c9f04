"""Apply-engine benchmark: nnpatch apply against cp on a GPT-2-medium-sized fp32 model.

    python benchmarks/apply_bench.py              # ~1.4 GB model, writes benchmarks/RESULTS-apply.md
    python benchmarks/apply_bench.py --scale 2    # ~2.8 GB model (memory bound check)

Generates (once, cached under bench-out/) a model with GPT-2-medium tensor
shapes and a target where 10 % of the rows (output channels) of every
matrix changed, diffs them, then times in one run, interleaved, best of
--reps: cp, b3sum, nnpatch apply in each verification mode with the C
kernel and with numpy, in-place apply, and verify alone.  Every nnpatch run
is a child process; its apply time is measured inside it (interpreter
start-up excluded, as cp has none), its peak anonymous memory (RssAnon) is
sampled from /proc/PID/status by this process every 2 ms, and its bytes
written to storage are read from /proc/self/io as it exits.  The C scatter
is compared with numpy's on the same decoded rows in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "bench-out")
RESULTS = os.path.join(HERE, "RESULTS-apply.md")
sys.path.insert(0, ROOT)


# --- the child: run one nnpatch command in-process, report time and I/O ----------------------

def child(args: list[str]) -> None:
    from nnpatch.cli import cli

    import resource

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    code = 0
    try:
        rv = cli.main(args=args, prog_name="nnpatch", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except SystemExit as e:
        code = e.code or 0
    except Exception as e:  # noqa: BLE001
        print(f"child failed: {e}", file=sys.stderr)
        code = 1
    dt = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    io = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            io[k] = int(v)
    print("BENCH " + json.dumps({"time": dt, "user": user, "sys": system, "write_bytes": io.get("write_bytes", 0),
                                 "code": code}), flush=True)
    sys.exit(code)


def device_written() -> int:
    """Bytes written to the block device holding bench-out/ (all processes: noisy on a shared machine)."""
    dev = os.stat(OUT).st_dev
    name = None
    try:
        name = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    except OSError:
        pass
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if parts[2] == name:
                return int(parts[9]) * 512
    return 0


def run_child(args: list[str], env_extra: dict | None = None) -> dict:
    env = {**os.environ, **(env_extra or {}), "PYTHONPATH": ROOT}
    dev0 = device_written()
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, "--child", *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        path = f"/proc/{p.pid}/status"
        while p.poll() is None:
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
                            break
            except OSError:
                break
            time.sleep(0.002)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = p.communicate()
    wall = time.perf_counter() - t
    th.join()
    line = next((x for x in out.splitlines() if x.startswith("BENCH ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"nnpatch {' '.join(args)} failed ({p.returncode}): {err.strip()[-2000:]}")
    r = json.loads(line[6:])
    os.sync()
    r["device_bytes"] = device_written() - dev0
    r["wall"] = wall
    r["rss_anon"] = peak[0]
    return r


# --- the model ---------------------------------------------------------------------------------

def gpt2_medium_shapes(scale: int) -> dict[str, tuple[int, ...]]:
    d, vocab, ctx, layers = 1024, 50257, 1024, 24 * scale
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(layers):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,),
        })
    return shapes


def make_model(scale: int, share: float = 0.1) -> tuple[str, str, str]:
    import nnpatch
    from nnpatch.weights import encode_safetensors_header

    os.makedirs(OUT, exist_ok=True)
    tag = f"s{scale}"
    base, target, patch = (os.path.join(OUT, f"{tag}-{n}") for n in ("base.safetensors", "target.safetensors",
                                                                      "update.nnpatch"))
    stamp = os.path.join(OUT, f"{tag}-stamp.json")
    want = {"scale": scale, "share": share, "version": 2}  # 2: the patch at the default level (esort, 1.2)
    if all(map(os.path.exists, (base, target, patch, stamp))):
        with open(stamp) as f:
            if json.load(f) == want:
                return base, target, patch
    shapes = gpt2_medium_shapes(scale)
    sizes = {n: ("F32", s, int(np.prod(s)) * 4) for n, s in shapes.items()}
    head, order = encode_safetensors_header(sizes, {"format": "pt"})
    rng = np.random.default_rng(0)
    print(f"generating {sum(v[2] for v in sizes.values()) / 1e9:.2f} GB model and target ...", flush=True)
    with open(base, "wb") as fb, open(target, "wb") as ft:
        fb.write(head)
        ft.write(head)
        for name in order:
            shape = shapes[name]
            w = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
            fb.write(w.tobytes())
            if len(shape) == 2:
                rows = rng.choice(shape[0], max(1, int(share * shape[0])), replace=False)
                w[rows] += rng.standard_normal((len(rows), shape[1]), dtype=np.float32) * np.float32(1e-3)
            ft.write(w.tobytes())
    print("diffing ...", flush=True)
    t = time.perf_counter()
    nnpatch.diff(base, target, patch)
    print(f"  diff took {time.perf_counter() - t:.1f} s, patch {os.path.getsize(patch) / 1e6:.1f} MB", flush=True)
    with open(stamp, "w") as f:
        json.dump(want, f)
    return base, target, patch


# --- measurements ------------------------------------------------------------------------------

def timed_cmd(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def sync() -> None:
    os.sync()
    time.sleep(0.2)


def scatter_speed(patch: str, base: str) -> tuple[float, float]:
    """Seconds for the scatter step of every rows op, C vs numpy, on the same decoded data."""
    from nnpatch import codecs, kernel
    from nnpatch.applier.decode import decode_index, row_bytes
    from nnpatch.applier.plan import Step, delta_mode
    from nnpatch.patchfile import read_patch
    from nnpatch.weights import SafetensorsFile

    work = []
    with read_patch(patch) as p, SafetensorsFile(base) as b:
        for op in p.ops:
            if op.kind != "rows":
                continue
            info = b.tensors[op.name]
            step = Step(p, op, op.values, delta_mode(op, op.values))
            idx = decode_index(step, info)
            unit = row_bytes(op, info)
            per = codecs.chunk_units(unit // 4)
            sizes = codecs.value_chunk_sizes(op.count, unit, unit // 4)
            chunks = [np.array(c) for c in codecs.decoded_chunks(p.section(op.values), op.values.codec,
                                                                  op.values.size, sizes, where=op.name)]
            work.append((info.nbytes, unit, idx, chunks, per, step.mode, "planes" in op.values.codec))
            if len(work) >= 40:
                break
    dst_bytes = max(w[0] for w in work)
    dst = np.zeros(dst_bytes, np.uint8)
    result = {}
    previous = kernel.backend
    for backend in ("c", "numpy"):
        kernel.select(backend)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for nbytes, unit, idx, chunks, per, mode, planar in work:
                d = dst[:nbytes]
                for i, c in enumerate(chunks):
                    kernel.scatter_rows(d, unit, idx[i * per:(i + 1) * per], c, 4, mode, planar=planar)
            best = min(best, time.perf_counter() - t)
        result[backend] = best
    kernel.select(previous)
    return result["c"], result["numpy"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=1, help="model size in units of GPT-2 medium (1.42 GB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="default mode only (memory check)")
    a = ap.parse_args()
    base, target, patch = make_model(a.scale)
    size = os.path.getsize(base)
    out = os.path.join(OUT, f"s{a.scale}-out.safetensors")
    model = os.path.join(OUT, f"s{a.scale}-inplace.safetensors")
    from nnpatch.hashing import hash_file

    h_target = hash_file(target)
    b3sum = shutil.which("b3sum")
    runs: dict[str, list[dict]] = {}
    modes = ["default"] if a.quick else ["default", "full", "touched"]
    kernels = ["c"] if a.quick else ["c", "numpy"]
    for rep in range(a.reps):
        print(f"round {rep + 1}/{a.reps}", flush=True)
        sync()
        runs.setdefault("cp", []).append({"time": timed_cmd(["cp", base, out])})
        os.unlink(out)
        sync()
        runs.setdefault("cp + sync", []).append({"time": timed_cmd(["sh", "-c", f"cp '{base}' '{out}' && sync"])})
        os.unlink(out)
        if b3sum:
            runs.setdefault("b3sum", []).append({"time": timed_cmd([b3sum, base])})
        for k in kernels:
            for m in modes:
                sync()
                r = run_child(["-q", "apply", base, patch, "-o", out, "--verify", m], {"NNPATCH_KERNEL": k})
                if hash_file(out) != h_target:
                    raise SystemExit(f"apply ({k}, {m}) gave a wrong result")
                runs.setdefault(f"apply --verify={m} ({k})", []).append(r)
                os.unlink(out)
        shutil.copyfile(base, model)
        sync()
        r = run_child(["-q", "apply", "--in-place", model, patch], {"NNPATCH_KERNEL": "c"})
        if hash_file(model) != h_target:
            raise SystemExit("in-place apply gave a wrong result")
        runs.setdefault("apply --in-place (c)", []).append(r)
        os.unlink(model)
        if not a.quick:
            runs.setdefault("verify alone (patch + base)", []).append(run_child(["verify", patch, "--base", base]))
    c_s, np_s = scatter_speed(patch, base)

    def best(name, key="time"):
        return min(r[key] for r in runs[name])

    def peak(name):
        return max(r.get("rss_anon", 0) for r in runs[name])

    cp = best("cp")
    rows = []
    for name in runs:
        t = best(name)
        rss = peak(name)
        wb = max(r.get("write_bytes", 0) for r in runs[name]) if "write_bytes" in runs[name][0] else None
        dv = min(r.get("device_bytes", 0) for r in runs[name]) if "device_bytes" in runs[name][0] else None
        fastest = min(runs[name], key=lambda r: r["time"])
        cpu = f"{fastest['user']:.2f} + {fastest['sys']:.2f}" if "user" in fastest else ""
        rows.append((name, t, statistics.median(r["time"] for r in runs[name]), t / cp, cpu,
                     f"{rss / 2**20:.0f}" if rss else "",
                     f"{wb / 2**20:.0f} ({wb / size:.2f}x)" if wb is not None else "",
                     f"{dv / 2**20:.0f} ({dv / size:.2f}x)" if dv is not None else ""))
    goals = []
    d = best("apply --verify=default (c)")
    goals.append(("apply default mode <= 1.5x cp (aim 1.1x)", d / cp <= 1.5, f"{d / cp:.2f}x"))
    goals.append(("issue 3: apply (decode) of the model >= 1 GB/s", size / d >= 1e9,
                  f"{size / d / 1e9:.2f} GB/s ({size / 1e9:.2f} GB in {d:.2f} s)"))
    goals.append(("C scatter >= 2x numpy", np_s / c_s >= 2, f"{np_s / c_s:.1f}x ({c_s * 1e3:.0f} ms vs "
                                                            f"{np_s * 1e3:.0f} ms)"))
    ip = runs["apply --in-place (c)"]
    wb = max(r["write_bytes"] for r in ip)
    dv = min(r["device_bytes"] for r in ip)
    goals.append(("in place: bytes written to the device <= 0.3x model (journal incl.)", dv <= 0.3 * size,
                  f"{dv / size:.3f}x ({dv / 2**20:.0f} MiB; /proc/PID/io write_bytes says {wb / size:.3f}x, "
                  f"see note)"))
    goals.append(("in place: time <= 1.5x cp", best("apply --in-place (c)") / cp <= 1.5,
                  f"{best('apply --in-place (c)') / cp:.2f}x"))
    worst_rss = max(peak(n) for n in runs if n.startswith("apply") or n.startswith("verify"))
    goals.append((f"peak RssAnon <= 256 MiB ({size / 1e9:.2f} GB model)", worst_rss <= 256 << 20,
                  f"{worst_rss / 2**20:.0f} MiB"))
    table = [f"Model: {size / 1e9:.2f} GB fp32 (GPT-2-medium shapes x{a.scale}), patch "
             f"{os.path.getsize(patch) / 1e6:.1f} MB (10 % of the rows of every matrix changed). "
             f"{os.cpu_count()} CPUs, best of {a.reps} interleaved rounds, warm page cache.",
             "",
             "| step | best s | median s | / cp | CPU s (user + sys) | peak RssAnon MiB | write_bytes MiB (x model) "
             "| device writes MiB (x model) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t, med, ratio, cpu, rss, w, dv in rows:
        table.append(f"| {name} | {t:.2f} | {med:.2f} | {ratio:.2f} | {cpu} | {rss} | {w} | {dv} |")
    cps = best("cp + sync")
    table += ["", f"Against `cp + sync` (same durability as nnpatch's fsync): apply default "
              f"{d / cps:.2f}x, in place {best('apply --in-place (c)') / cps:.2f}x.", "",
              "Note on bytes written: /proc/PID/io write_bytes counts every page-cache folio the process dirties "
              "at its full size; current kernels cache files in large folios (up to 2 MiB), so a 4 KiB row "
              "written with pwrite is counted as its whole folio although ext4 writes back only the dirty "
              "blocks. The device column is the block device's own sectors-written counter around the run "
              "(after a sync; other processes' writes add noise, so the lowest of the rounds is shown).", "",
              f"C scatter of the rows ops: {c_s * 1e3:.0f} ms; numpy: {np_s * 1e3:.0f} ms.", "",
              "| goal | result | |", "|---|---|---|"]
    for g, ok, v in goals:
        table.append(f"| {g} | {v} | {'PASS' if ok else 'FAIL'} |")
    text = "\n".join(table)
    print()
    print(text)
    _write_results(a.scale, text, " ".join(["python benchmarks/apply_bench.py"] + sys.argv[1:]))
    return 0


def _write_results(scale: int, text: str, command: str) -> None:
    sections = {}
    others: dict[str, list[str]] = {}  # sections other benchmarks own (native_bench.py's): kept as they are
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            cur = None
            for line in f:
                if line.startswith("## scale "):
                    cur = sections.setdefault(int(line.split()[2]), [])
                    cur.clear()
                elif line.startswith("## "):
                    cur = others.setdefault(line, [])
                elif cur is not None:
                    cur.append(line)
    sections[scale] = [f"\nReproduce: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n",
                       text + "\n\n"]
    with open(RESULTS, "w") as f:
        f.write("# Apply benchmark\n\nWritten by benchmarks/apply_bench.py; times are in seconds, ratios to `cp` "
                "of the same file measured in the same run. nnpatch times are measured inside the process "
                "(interpreter start-up excluded) and include the final fsync, which cp does not do: "
                "`cp + sync` is the fair comparison for durability. Runs with `--quick` (one round, default "
                "mode only) are memory checks: their times are single samples on a shared machine.\n\n"
                "Where the time goes (default mode): one copy of the model by the kernel (copy_file_range), "
                "BLAKE3 over every base tensor (the base model digest) AND over every touched target tensor "
                "(the 10 %-row update touches every matrix, so that is ~92 % of the model again), plus the "
                "zstd decode and scatter of the changed rows. That is about two b3sum passes and a cp on two "
                "cores, so on this machine the floor is about 2x cp; `touched` saves little here because "
                "nearly every tensor is touched. Getting to ~1.1x needs a BLAKE3 that reuses the base's "
                "1 KiB chunk chaining values for the unchanged chunks of a touched tensor (re-hashing only "
                "changed chunks and the tree above them), which the blake3 Python package does not expose.\n\n")
        for k in sorted(sections):
            f.write(f"## scale {k}\n")
            f.writelines(sections[k])
        for heading, lines in others.items():
            f.write(heading)
            f.writelines(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    sys.exit(main())
