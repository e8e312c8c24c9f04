"""Crash test of ``nnpatch apply --in-place``: SIGKILL at random moments, recover, check.

Each trial starts ``nnpatch apply --in-place MODEL PATCH`` in a subprocess,
kills it with SIGKILL after a random delay: odd trials uniform over the time
an uninterrupted apply takes (from the end of the interpreter's start-up),
even trials uniform over the time the undo journal exists (from the moment
its file appears), runs ``nnpatch recover``
(or, every other trial, the next ``nnpatch apply --in-place``, which
recovers first) and checks that the model's BLAKE3 is exactly OLD or exactly
NEW.  Prints the counts; exits 1 on any other outcome.

    python benchmarks/crash_test.py --trials 120           # the full test
    python benchmarks/crash_test.py --trials 10 --mb 4     # quick
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import nnpatch  # noqa: E402
from nnpatch.hashing import hash_file  # noqa: E402
from nnpatch.applier import recover  # noqa: E402
from nnpatch.applier.journal import journal_path  # noqa: E402
from nnpatch.weights import write_safetensors  # noqa: E402


def make_models(directory: str, mb: int, seed: int = 0) -> tuple[str, str, str]:
    """OLD, NEW (10 % of the rows of every matrix changed) and the patch between them."""
    rng = np.random.default_rng(seed)
    cols = 1024
    n_mats = 4
    rows = max(8, (mb << 20) // (4 * cols * n_mats))
    old, new = {}, {}
    for i in range(n_mats):
        w = (rng.standard_normal((rows, cols)) * 0.05).astype("<f4")
        w2 = w.copy()
        sel = rng.choice(rows, max(1, rows // 10), replace=False)
        w2[sel] += (rng.standard_normal((len(sel), cols)) * 1e-3).astype("<f4")
        old[f"layer{i}.weight"] = ("F32", w.shape, w.tobytes())
        new[f"layer{i}.weight"] = ("F32", w.shape, w2.tobytes())
        b = (rng.standard_normal(cols) * 0.05).astype("<f4")
        old[f"layer{i}.bias"] = new[f"layer{i}.bias"] = ("F32", b.shape, b.tobytes())
    a, b_, p = (os.path.join(directory, n) for n in ("old.safetensors", "new.safetensors", "p.nnpatch"))
    write_safetensors(a, old, {"v": "1"})
    write_safetensors(b_, new, {"v": "1"})
    nnpatch.diff(a, b_, p, level=3)
    return a, b_, p


def _wait_journal(proc: subprocess.Popen, jp: str) -> float | None:
    """Poll until the journal (or its .tmp) exists; the time it appeared, or None if the process ended first."""
    while proc.poll() is None:
        if os.path.exists(jp) or os.path.exists(jp + ".tmp"):
            return time.perf_counter()
        time.sleep(0.0005)
    return None


def _cmd(model: str, patch: str) -> list[str]:
    return [sys.executable, "-m", "nnpatch", "-q", "apply", "--in-place", model, patch]


def run(trials: int, mb: int, seed: int = 1, directory: str | None = None, verbose: bool = True) -> dict:
    rnd = random.Random(seed)
    own = directory is None
    directory = directory or tempfile.mkdtemp(prefix="nnpatch-crash-")
    try:
        old, new, patch = make_models(directory, mb)
        h_old, h_new = hash_file(old), hash_file(new)
        model = os.path.join(directory, "model.safetensors")
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        # calibrate: how long an uninterrupted apply takes, process start included
        shutil.copyfile(old, model)
        t = time.perf_counter()
        proc = subprocess.Popen(_cmd(model, patch), env=env)
        seen = _wait_journal(proc, journal_path(model))
        proc.wait()
        end = time.perf_counter()
        span = end - t
        window = max(0.005, end - seen) if seen else span / 4  # how long a journal exists
        t = time.perf_counter()  # process start and imports alone: kills before this hit nothing
        subprocess.run([sys.executable, "-m", "nnpatch", "--version"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        startup = min(time.perf_counter() - t, span * 0.5)
        assert hash_file(model) == h_new
        counts = {"old": 0, "new": 0, "bad": 0, "journal_left": 0, "killed": 0}
        for i in range(trials):
            if hash_file(model) != h_old:
                shutil.copyfile(old, model)
            proc = subprocess.Popen(_cmd(model, patch), env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            if i % 2:  # a random moment of the whole run
                time.sleep(rnd.uniform(startup * 0.9, span * 1.05))
            elif _wait_journal(proc, journal_path(model)):  # a random moment while the journal exists
                time.sleep(rnd.uniform(0, window * 1.1))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                counts["killed"] += 1
            proc.wait()
            jp = journal_path(model)
            if os.path.exists(jp):
                counts["journal_left"] += 1
            if i % 2 == 0:
                recover(model)
            else:  # the next apply recovers first, then applies: must give NEW
                before = hash_file(model) if not os.path.exists(jp) else None
                subprocess.run(_cmd(model, patch), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if before == h_new:  # it had completed: the second apply refuses (wrong base), file stays NEW
                    pass
            h = hash_file(model)
            state = "old" if h == h_old else "new" if h == h_new else "bad"
            counts[state] += 1
            if state == "bad" or os.path.exists(jp):
                counts["bad"] += state != "bad"
                if verbose:
                    print(f"trial {i}: FAILED ({state}, journal left: {os.path.exists(jp)})", flush=True)
        counts["trials"] = trials
        counts["span_s"] = round(span, 3)
        return counts
    finally:
        if own:
            shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=120)
    ap.add_argument("--mb", type=int, default=32, help="model size in MiB")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    c = run(a.trials, a.mb, a.seed)
    print(f"crash test: {c['trials']} trials, {c['killed']} killed mid-apply ({c['journal_left']} left a journal), "
          f"after recovery: {c['old']} OLD, {c['new']} NEW, {c['bad']} other; one apply takes {c['span_s']} s")
    ok = c["bad"] == 0 and c["old"] + c["new"] == c["trials"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
