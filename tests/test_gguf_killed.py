"""SIGKILL during `apply --in-place` on a GGUF file, then `recover`: the model is exactly the old or
the new version, in both implementations (issue 24). The pair keeps the extent table and skeleton,
so the update is made in the file behind the undo journal (spec/JOURNAL.md 1.1), which recover rolls
back; tests/test_gguf_inplace.py stops it at each step deterministically. A killed run's model-sized
staging file (MODEL.nnpatch-staged-PID natively, .MODEL.nnpatch-staged-PID.*.tmp in both) is removed
by the next recover or in-place apply: its name says which process wrote it."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from .conftest import read
from .gguf_pairs import make_model, variant, write

ENV = {**os.environ, "NNPATCH_KERNEL": "numpy"}


@pytest.fixture
def gguf_update(tmp_path):
    old, new = tmp_path / "old.gguf", tmp_path / "new.gguf"
    write(new, variant(make_model(old), "rows"))
    patch = tmp_path / "p.nnpatch"
    subprocess.run([sys.executable, "-m", "nnpatch", "diff", str(old), str(new), "-o", str(patch), "-q"], check=True,
                   env=ENV)
    device = tmp_path / "device"
    device.mkdir()
    return old, new, patch, device / "model.gguf"


def _killed_then_recovered(apply_cmd, recover_cmd, old, new, model, rng, whole):
    shutil.copyfile(old, model)
    proc = subprocess.Popen(apply_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    time.sleep(rng.uniform(0.0, whole))
    proc.kill()
    proc.wait(timeout=30)
    r = subprocess.run(recover_cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert read(model) in (read(old), read(new))
    assert [n for n in os.listdir(model.parent) if "nnpatch-staged" in n] == [], os.listdir(model.parent)


def test_python_in_place_killed_at_random_moments(gguf_update):
    old, new, patch, model = gguf_update
    apply_cmd = [sys.executable, "-m", "nnpatch", "apply", "--in-place", str(model), str(patch)]
    shutil.copyfile(old, model)
    start = time.monotonic()
    assert subprocess.run(apply_cmd, env=ENV).returncode == 0 and read(model) == read(new)
    whole = time.monotonic() - start
    rng = random.Random(11)
    for _ in range(6):
        _killed_then_recovered(apply_cmd, [sys.executable, "-m", "nnpatch", "recover", str(model)], old, new, model,
                               rng, whole)
