"""nnpatch against general-purpose binary delta tools, on model pairs from models.py.

Run from the repo root:

    .venv/bin/python benchmarks/compare.py                       # dense, dense-bf16, channel, tensor
    .venv/bin/python benchmarks/compare.py --quick               # smaller models, seconds
    .venv/bin/python benchmarks/compare.py --pairs large --large --timeout 600 --tool-timeout bsdiff=300
    .venv/bin/python benchmarks/compare.py --markdown bench-out/compare.md --json bench-out/compare.json

Every tool runs as a child process; wall seconds and peak RSS (GNU
``/usr/bin/time -f %M`` when installed, else ru_maxrss from os.wait4, which is
floored by this process's own RSS) are measured per step, a step that passes
``--timeout`` seconds is killed and reported as "timeout", and every child
runs under an address-space limit (``--mem-limit-gb``; bsdiff on 1.4 GB would
otherwise need more RAM than the machine has) so that it fails as "error"
instead of taking the machine down.  Each rebuilt file is checked against the
target's BLAKE3.  Tools not installed are skipped.

Rows: nnpatch at its default level and at --level 19; bsdiff/bspatch;
xdelta3 -e -9 -B <base size> -s; zstd --patch-from --long=31 at -3 and -19;
and a reference row, zstd -19 --long=31 of the target alone (a full download).
"x zstd-pf-19" is each patch's size divided by zstd --patch-from -19's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import models  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
NNPATCH = os.path.join(os.path.dirname(sys.executable), "nnpatch")
REF_TOOL = "zstd --patch-from -19"
GNU_TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None


# --- running children ---------------------------------------------------------

def _mem_total_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


def run_child(cmd: list[str], timeout: float, mem_limit: int, log: str) -> dict:
    """Run cmd; return {status, secs, peak_mb, rc}. status: ok | timeout | error."""

    def limit() -> None:
        if mem_limit:
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

    # Peak RSS comes from GNU time when installed: a child forked from this
    # process inherits its RSS high-water mark across exec, so the parent's
    # own footprint would be the floor of ru_maxrss from os.wait4.
    rss_file = log + ".rss"
    if os.path.exists(rss_file):
        os.remove(rss_file)
    full = ([GNU_TIME, "-f", "%M", "-o", rss_file] if GNU_TIME else []) + cmd
    with open(log, "ab") as err:
        err.write(("$ " + " ".join(cmd) + "\n").encode())
        err.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=err, stderr=err, preexec_fn=limit,
                             start_new_session=True)
        timed_out = False
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                os.killpg(p.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.01)
        secs = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    rc = p.returncode
    state = "timeout" if timed_out else ("ok" if rc == 0 else "error")
    peak_kb = ru.ru_maxrss
    if GNU_TIME and not timed_out:
        try:
            with open(rss_file) as f:
                peak_kb = int(f.read().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            pass
    return dict(status=state, secs=secs, peak_mb=peak_kb / 1024, rc=rc)


def blake3_file(path: str) -> str:
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(path)
    return h.hexdigest()


# --- the tools --------------------------------------------------------------------

def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def tools(old: str, new: str, work: str) -> list[dict]:
    """Each tool: name, make cmd, apply cmd, patch path, output path."""
    out: list[dict] = []

    def add(name, make, apply, patch, rebuilt, needs):
        if all(shutil.which(n) or os.path.exists(n) for n in needs):
            out.append(dict(name=name, make=make, apply=apply, patch=patch, out=rebuilt))

    base_size = os.path.getsize(old)
    slug = lambda s: "".join(c if c.isalnum() else "-" for c in s).strip("-")  # noqa: E731
    for name, extra in (("nnpatch (default level)", []), ("nnpatch --level 19", ["--level", "19"])):
        p, o = os.path.join(work, slug(name) + ".nnpatch"), os.path.join(work, slug(name) + ".out")
        add(name, [NNPATCH, "-q", "diff", old, new, "-o", p, "--no-stat", *extra],
            [NNPATCH, "-q", "apply", old, p, "-o", o], p, o, [NNPATCH])
    p, o = os.path.join(work, "bsdiff.patch"), os.path.join(work, "bsdiff.out")
    add("bsdiff", ["bsdiff", old, new, p], ["bspatch", old, o, p], p, o, ["bsdiff", "bspatch"])
    # xdelta3: source window = whole base (rounded up to 1 MiB), capped at 2 GiB
    b = str(min(max(_round_up(base_size, 1 << 20), 1 << 24), 1 << 31))
    p, o = os.path.join(work, "xdelta3.vcdiff"), os.path.join(work, "xdelta3.out")
    add("xdelta3 -9", ["xdelta3", "-e", "-9", "-f", "-B", b, "-s", old, new, p],
        ["xdelta3", "-d", "-f", "-B", b, "-s", old, p, o], p, o, ["xdelta3"])
    mem = ["--memory=2048MB"]
    for lvl in ("3", "19"):
        p, o = os.path.join(work, f"zstd-pf-{lvl}.zst"), os.path.join(work, f"zstd-pf-{lvl}.out")
        add(f"zstd --patch-from -{lvl}",
            ["zstd", "-q", "-f", f"-{lvl}", "--long=31", f"--patch-from={old}", new, "-o", p],
            ["zstd", "-q", "-f", "-d", "--long=31", *mem, f"--patch-from={old}", p, "-o", o], p, o, ["zstd"])
    p, o = os.path.join(work, "zstd-target-19.zst"), os.path.join(work, "zstd-target-19.out")
    add("zstd -19 --long=31 (target only)", ["zstd", "-q", "-f", "-19", "--long=31", new, "-o", p],
        ["zstd", "-q", "-f", "-d", "--long=31", *mem, p, "-o", o], p, o, ["zstd"])
    return out


# --- one pair ----------------------------------------------------------------------

def run_pair(pair: str, old: str, new: str, args) -> dict:
    work = os.path.join(args.out, "compare", pair + ("-quick" if args.quick and pair != "large" else ""))
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "tools.log")
    target_size = os.path.getsize(new)
    want = blake3_file(new)
    info = models.describe(old, new)
    rows = []
    for t in tools(old, new, work):
        if args.tools and not any(s in t["name"] for s in args.tools):
            continue
        timeout = args.timeout
        for key, val in args.tool_timeout.items():
            if key in t["name"]:
                timeout = val
        for f in (t["patch"], t["out"]):
            if os.path.exists(f):
                os.remove(f)
        print(f"  [{pair}] {t['name']}: make ...", file=sys.stderr, flush=True)
        mk = run_child(t["make"], timeout, args.mem_limit, log)
        row = dict(tool=t["name"], make=mk, apply=None, patch_bytes=None, verified=None, timeout=timeout)
        if mk["status"] == "ok" and os.path.exists(t["patch"]):
            row["patch_bytes"] = os.path.getsize(t["patch"])
            print(f"  [{pair}] {t['name']}: {row['patch_bytes']} B in {mk['secs']:.2f} s; apply ...",
                  file=sys.stderr, flush=True)
            ap = run_child(t["apply"], timeout, args.mem_limit, log)
            row["apply"] = ap
            if ap["status"] == "ok" and os.path.exists(t["out"]):
                row["verified"] = blake3_file(t["out"]) == want
            else:
                row["verified"] = False
        if os.path.exists(t["out"]):
            os.remove(t["out"])
        if not args.keep_patches and os.path.exists(t["patch"]) and not t["name"].startswith("nnpatch"):
            os.remove(t["patch"])
        rows.append(row)
    ref = next((r for r in rows if r["tool"] == REF_TOOL and r["patch_bytes"]), None)
    for r in rows:
        r["pct_target"] = 100.0 * r["patch_bytes"] / target_size if r["patch_bytes"] else None
        r["x_ref"] = r["patch_bytes"] / ref["patch_bytes"] if (ref and r["patch_bytes"]) else None
    return dict(pair=pair, old=old, new=new, target_size=target_size, info=info, rows=rows)


# --- goals ---------------------------------------------------------------------------

def _row(res: dict, tool: str):
    return next((r for r in res["rows"] if r["tool"] == tool), None)


def goals(results: dict[str, dict]) -> list[dict]:
    """PASS/FAIL per goal; a goal whose inputs are missing is "n/a" (or FAIL when nnpatch itself failed)."""
    out = []
    nn = "nnpatch (default level)"

    def size_goal(pair, limit, label):
        res = results.get(pair)
        if res is None:
            return
        r, ref = _row(res, nn), _row(res, REF_TOOL)
        if not r or not r["patch_bytes"] or not r["verified"]:
            out.append(dict(goal=label, status="FAIL", measured="nnpatch failed"))
        elif not ref or not ref["patch_bytes"]:
            st = ref["make"]["status"] if ref else "not run"
            out.append(dict(goal=label, status="n/a", measured=f"{REF_TOOL} {st}"))
        else:
            x = r["patch_bytes"] / ref["patch_bytes"]
            out.append(dict(goal=label, status="PASS" if x <= limit else "FAIL",
                            measured=f"{x:.3f}x ({r['patch_bytes']:,} B vs {ref['patch_bytes']:,} B)"))

    size_goal("dense", 0.65, "dense fine-tune fp32: nnpatch <= 0.65x zstd --patch-from -19")
    size_goal("dense-bf16", 0.5, "dense fine-tune bf16: nnpatch <= 0.5x zstd --patch-from -19")
    def bsdiff_goals(pair, label):
        if pair not in results:
            return
        res = results[pair]
        r, bs = _row(res, nn), _row(res, "bsdiff")
        if not bs or not bs["patch_bytes"] or not r or not r["patch_bytes"]:
            st = bs["make"]["status"] if bs else "not run"
            out.append(dict(goal=f"{label}: smaller than bsdiff", status="n/a", measured=f"bsdiff {st}"))
            out.append(dict(goal=f"{label}: diff in < 3% of bsdiff's time", status="n/a", measured=f"bsdiff {st}"))
        else:
            out.append(dict(goal=f"{label}: smaller than bsdiff",
                            status="PASS" if r["patch_bytes"] < bs["patch_bytes"] else "FAIL",
                            measured=f"{r['patch_bytes']:,} B vs bsdiff {bs['patch_bytes']:,} B "
                                     f"({r['patch_bytes'] / bs['patch_bytes']:.3f}x)"))
            frac = r["make"]["secs"] / bs["make"]["secs"]
            out.append(dict(goal=f"{label}: diff in < 3% of bsdiff's time",
                            status="PASS" if frac < 0.03 else "FAIL",
                            measured=f"{100 * frac:.1f}% ({r['make']['secs']:.2f} s vs bsdiff "
                                     f"{bs['make']['secs']:.2f} s)"))

    size_goal("channel", 0.7, "channel-sparse 10%: nnpatch <= 0.7x zstd --patch-from -19")
    bsdiff_goals("channel", "channel-sparse 10%")
    size_goal("tensor", 0.7, "tensor-sparse: nnpatch <= 0.7x zstd --patch-from -19")
    size_goal("real", 0.65, "real fine-tune fp32 (MiniLM, 200 AdamW steps): nnpatch <= 0.65x zstd --patch-from -19")
    size_goal("real-bf16", 0.5, "real fine-tune, bf16: nnpatch <= 0.5x zstd --patch-from -19")
    size_goal("real-channel", 0.7, "real fine-tune, 10% of channels: nnpatch <= 0.7x zstd --patch-from -19")
    bsdiff_goals("real-channel", "real fine-tune, 10% of channels")
    size_goal("real-tensor", 0.7, "real fine-tune, last layer only: nnpatch <= 0.7x zstd --patch-from -19")
    if "large" in results:
        res = results["large"]
        r = _row(res, nn)
        ts = res["target_size"]
        if not r or not r["patch_bytes"] or not r["verified"]:
            out.append(dict(goal="1.4 GB channel-sparse: diff >= 100 MB/s", status="FAIL", measured="nnpatch failed"))
            out.append(dict(goal="1.4 GB channel-sparse: apply >= 1 GB/s", status="FAIL", measured="nnpatch failed"))
        else:
            d = ts / r["make"]["secs"] / 1e6
            a = ts / r["apply"]["secs"] / 1e9
            out.append(dict(goal="1.4 GB channel-sparse: diff >= 100 MB/s", status="PASS" if d >= 100 else "FAIL",
                            measured=f"{d:.0f} MB/s ({ts / 1e9:.2f} GB in {r['make']['secs']:.1f} s)"))
            out.append(dict(goal="1.4 GB channel-sparse: apply >= 1 GB/s", status="PASS" if a >= 1 else "FAIL",
                            measured=f"{a:.2f} GB/s ({ts / 1e9:.2f} GB in {r['apply']['secs']:.1f} s)"))
            size_goal("large", 0.7, "1.4 GB channel-sparse (not an issue goal; same bar as channel): "
                                    "nnpatch <= 0.7x zstd --patch-from -19")
    return out


# --- output -------------------------------------------------------------------

HEAD = ["tool", "patch bytes", "% of target", "x zstd-pf-19", "make s", "apply s", "peak MB make", "peak MB apply",
        "exact"]


def _cells(r: dict) -> list[str]:
    mk, ap = r["make"], r["apply"]
    if r["patch_bytes"] is None:
        what = f"{mk['status']} ({mk['secs']:.0f} s)" if mk["status"] == "timeout" else f"{mk['status']} rc={mk['rc']}"
        peak = f"{mk['peak_mb']:.0f}" if mk["status"] != "timeout" else ""  # a killed child's peak is unknown
        return [r["tool"], what, "", "", f"{mk['secs']:.2f}", "", peak, "", ""]
    apply_s = f"{ap['secs']:.2f}" if ap and ap["status"] == "ok" else (ap["status"] if ap else "")
    return [r["tool"], f"{r['patch_bytes']:,}", f"{r['pct_target']:.2f}",
            f"{r['x_ref']:.3f}" if r["x_ref"] else "n/a", f"{mk['secs']:.2f}", apply_s, f"{mk['peak_mb']:.0f}",
            f"{ap['peak_mb']:.0f}" if ap else "", "yes" if r["verified"] else "NO"]


def _title(res: dict) -> str:
    i = res["info"]
    return (f"{res['pair']}: {os.path.basename(res['old'])} -> {os.path.basename(res['new'])}, target "
            f"{res['target_size']:,} B, {i['tensors_changed']}/{i['tensors']} tensors changed, "
            f"{i['changed_value_bytes']:,} B of changed values "
            f"({100 * i['changed_value_bytes'] / res['target_size']:.1f}%)")


def text_table(res: dict) -> str:
    rows = [HEAD] + [_cells(r) for r in res["rows"]]
    w = [max(len(r[c]) for r in rows) for c in range(len(HEAD))]
    lines = [_title(res)]
    for k, r in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(w[j]) if j == 0 else c.rjust(w[j]) for j, c in enumerate(r)))
        if k == 0:
            lines.append("  " + "  ".join("-" * x for x in w))
    return "\n".join(lines)


def md_table(res: dict) -> str:
    lines = [f"**{_title(res)}**", "", "| " + " | ".join(HEAD) + " |", "|" + "|".join(["---"] + ["---:"] * 8) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in res["rows"]]
    return "\n".join(lines)


def md_goals(gs: list[dict]) -> str:
    lines = ["| goal | result | measured |", "|---|---|---|"]
    lines += [f"| {g['goal']} | **{g['status']}** | {g['measured']} |" for g in gs]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=None, help=f"comma list of {','.join(models.ALL_PAIRS)} "
                                                  "(default: the standard four, plus large with --large)")
    ap.add_argument("--quick", action="store_true", help="smaller models (not for the large pair)")
    ap.add_argument("--large", action="store_true", help="allow/include the ~1.4 GB pair")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per make/apply step (default 600)")
    ap.add_argument("--tool-timeout", action="append", default=[], metavar="SUBSTR=SECS",
                    help="per-tool timeout, e.g. bsdiff=300 (matches tool names by substring)")
    ap.add_argument("--tools", default=None, help="comma list of substrings: only tools whose name matches")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="address-space limit per child (default 75%% of RAM; 0 = none)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench-out"))
    ap.add_argument("--keep-patches", action="store_true", help="keep the other tools' patches too")
    ap.add_argument("--markdown", default=None, help="write the tables and goals as markdown to this file")
    ap.add_argument("--json", default=None, help="write raw results as JSON to this file")
    args = ap.parse_args(argv)

    names = args.pairs.split(",") if args.pairs else list(models.STANDARD_PAIRS) + (["large"] if args.large else [])
    if "large" in names and not args.large:
        ap.error("the large pair needs --large (about 3 GB of disk and several minutes per tool)")
    args.tools = args.tools.split(",") if args.tools else None
    args.tool_timeout = {k: float(v) for k, v in (s.split("=", 1) for s in args.tool_timeout)}
    gb = args.mem_limit_gb if args.mem_limit_gb is not None else 0.75 * _mem_total_bytes() / (1 << 30)
    args.mem_limit = int(gb * (1 << 30))

    results = {}
    for n in names:
        old, new = models.get_pair(n, args.out, args.quick)
        print(f"== {n}", file=sys.stderr, flush=True)
        results[n] = run_pair(n, old, new, args)
        print(text_table(results[n]) + "\n", flush=True)
    gs = goals(results)
    print("Goals:")
    for g in gs:
        print(f"  {g['status']:4}  {g['goal']}: {g['measured']}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n\n".join(md_table(r) for r in results.values()) + "\n\n" + md_goals(gs) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, goals=gs, argv=sys.argv), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
