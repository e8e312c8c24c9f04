"""Crash test of the native ``nnpatch-apply --in-place``: SIGKILL at random moments, recover, check.

Each trial starts ``nnpatch-apply --in-place MODEL PATCH`` and kills it with
SIGKILL after a random delay. Trials rotate over three kinds of moment:

* uniform over the time an uninterrupted apply takes;
* uniform over a window around the journal's commit point and the writes: the
  run is slowed there with the test-only ``NNPATCH_TEST_PAUSE_AFTER_JOURNAL`` (a test build: `make native-test`)
  (milliseconds slept after the journal commit and after the writes' fsync);
* right after the committed journal appears, the model being OLD or, a moment
  later, part or all NEW.

Then the model is recovered, in turn by the native ``nnpatch-apply --recover``,
by the Python ``nnpatch.applier.recover`` (crossed journals: one implementation
killed, the other recovering) and by the next native ``--in-place`` (which
recovers first, then applies: NEW). The model's bytes must be exactly OLD or
exactly NEW every time, and no journal may be left.

    python benchmarks/native_crash_test.py --trials 200            # the long run
    python benchmarks/native_crash_test.py --trials 20 --mb 4      # quick
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from crash_test import make_models  # noqa: E402

from nnpatch.applier import recover as py_recover  # noqa: E402
from nnpatch.applier.journal import journal_path  # noqa: E402

PAUSE_ENV = "NNPATCH_TEST_PAUSE_AFTER_JOURNAL"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def run(apply_cmd: list[str], trials: int, mb: int, seed: int = 1, directory: str | None = None,
        env: dict | None = None, verbose: bool = True) -> dict:
    """``apply_cmd``: the argv prefix of nnpatch-apply (a runner such as qemu included)."""
    rnd = random.Random(seed)
    own = directory is None
    directory = directory or tempfile.mkdtemp(prefix="nnpatch-native-crash-")
    env = dict(os.environ if env is None else env)
    env.pop(PAUSE_ENV, None)
    try:
        old, new, patch = make_models(directory, mb, seed)
        b_old, b_new = _read(old), _read(new)
        model = os.path.join(directory, "model.safetensors")
        jp = journal_path(model)
        inplace = [*apply_cmd, "--in-place", model, patch]
        recover = [*apply_cmd, "--recover", model]
        # calibrate: how long an uninterrupted apply takes
        shutil.copyfile(old, model)
        t = time.perf_counter()
        subprocess.run(inplace, env=env, check=True, stdout=subprocess.DEVNULL)
        span = time.perf_counter() - t
        assert _read(model) == b_new, "an uninterrupted native apply did not give NEW"
        counts = {"trials": trials, "killed": 0, "journal_left": 0, "old": 0, "new": 0, "bad": 0,
                  "mixed_before": 0, "new_before": 0, "by_native": 0, "by_python": 0, "by_next_apply": 0, "span_s": round(span, 4)}
        pause_ms = 40
        for i in range(trials):
            if _read(model) != b_old:
                shutil.copyfile(old, model)
            kind = i % 3
            run_env = dict(env)
            if kind:
                run_env[PAUSE_ENV] = str(pause_ms)
            proc = subprocess.Popen(inplace, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if kind == 0:
                time.sleep(rnd.uniform(0, span * 1.1))
            elif kind == 1:
                time.sleep(rnd.uniform(0, span + 2.2 * pause_ms / 1000))
            else:
                while proc.poll() is None and not os.path.exists(jp):
                    time.sleep(0.0005)
                time.sleep(rnd.uniform(0, 2.2 * pause_ms / 1000))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                counts["killed"] += 1
            proc.wait()
            if os.path.exists(jp):
                counts["journal_left"] += 1
            before = _read(model)
            counts["mixed_before"] += before not in (b_old, b_new)  # killed mid-write: recovery has work to do
            counts["new_before"] += before == b_new
            how = (i // 3) % 3
            if how == 0:
                r = subprocess.run(recover, env=env, capture_output=True)
                ok = r.returncode == 0
                counts["by_native"] += 1
            elif how == 1:
                py_recover(model)
                ok = True
                counts["by_python"] += 1
            else:
                r = subprocess.run(inplace, env=env, capture_output=True)
                # it had completed before the kill: the second apply refuses (wrong base), the model stays NEW
                ok = r.returncode == 0 or (r.returncode == 4 and _read(model) == b_new)
                counts["by_next_apply"] += 1
            data = _read(model)
            state = "old" if data == b_old else "new" if data == b_new else "bad"
            if not ok or os.path.exists(jp) or os.path.exists(jp + ".tmp"):
                state = "bad"
            counts[state] += 1
            if state == "bad" and verbose:
                print(f"trial {i}: FAILED (kind {kind}, recovered by {['native', 'python', 'next apply'][how]}, "
                      f"journal left: {os.path.exists(jp)})", flush=True)
        return counts
    finally:
        if own:
            shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=120)
    ap.add_argument("--mb", type=int, default=16, help="model size in MiB")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--apply", default=os.path.join(ROOT, "build", "native-test", "nnpatch-apply"),
                    help="the nnpatch-apply binary")
    a = ap.parse_args()
    c = run([a.apply], a.trials, a.mb, a.seed)
    print(f"native crash test: {c['trials']} trials, {c['killed']} killed mid-apply ({c['journal_left']} left a "
          f"journal; {c['mixed_before']} left the model neither OLD nor NEW, {c['new_before']} left it NEW), "
          f"recovered by nnpatch-apply --recover {c['by_native']}, by Python {c['by_python']}, by the next "
          f"--in-place {c['by_next_apply']}; after recovery: {c['old']} OLD, {c['new']} NEW, {c['bad']} other; one "
          f"apply takes {c['span_s']} s")
    ok = c["bad"] == 0 and c["old"] + c["new"] == c["trials"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
