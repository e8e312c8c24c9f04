"""SIGKILL during `nnpatch-apply --in-place` on a GGUF file, then `--recover`: exactly the old or the
new version, and the killed run's staging file removed (issue 24; the Python half and the rules are in
tests/test_gguf_killed.py)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time

from ..conftest import read
from ..test_gguf_killed import _killed_then_recovered, gguf_update  # noqa: F401 (the fixture)


def test_native_in_place_killed_at_random_moments(native, gguf_update):
    old, new, patch, model = gguf_update
    apply_cmd = [*native.cmd, "--in-place", str(model), str(patch)]
    shutil.copyfile(old, model)
    start = time.monotonic()
    assert subprocess.run(apply_cmd, env=native.full_env()).returncode == 0 and read(model) == read(new)
    whole = time.monotonic() - start
    rng = random.Random(12)
    for _ in range(6):
        _killed_then_recovered(apply_cmd, [*native.cmd, "--recover", str(model)], old, new, model, rng, whole)


def test_a_killed_runs_staging_file_is_removed_by_recover(native, gguf_update):
    """A staging file whose process is gone goes; one of a live process stays."""
    old, _, _, model = gguf_update
    shutil.copyfile(old, model)
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = [f"model.gguf.nnpatch-staged-{dead.pid}", f".model.gguf.nnpatch-staged-{dead.pid}.0123abcd.tmp"]
    alive = f"model.gguf.nnpatch-staged-{os.getpid()}"
    for name in [*gone, alive, "model.gguf.nnpatch-staged-x"]:
        (model.parent / name).write_bytes(b"x")
    r = subprocess.run([*native.cmd, "--recover", str(model)], capture_output=True, env=native.full_env())
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(model.parent)) == sorted(["model.gguf", alive, "model.gguf.nnpatch-staged-x"])
    assert read(model) == read(old)
