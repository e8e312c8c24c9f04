"""`nnpatch update --in-place` killed part-way, then the same command again: the model ends at
the new version, exactly (issue 23: the rerun answered exit 7 "a full download is needed" on the
half-written model, or "already current", and a later `recover` rolled it back)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nnpatch.hashing import hash_file
from nnpatch.release import make_release
from nnpatch.sidefile import journal_path
from nnpatch.weights import write_safetensors

from .conftest import read

ENV = {**os.environ, "NNPATCH_KERNEL": "numpy"}

#: nnpatch, with a pause after the first changed rows are written into the model (the journal is
#: committed by then): the moment a kill leaves a half-written model behind
_PAUSE_IN_ROWS = """
import sys, time
from nnpatch.applier import inplace
real = inplace._write_rows
def paused(*a, **kw):
    real(*a, **kw)
    sys.stderr.write("rows written\\n"); sys.stderr.flush()
    time.sleep(60)
inplace._write_rows = paused
from nnpatch.cli import main
sys.argv = ["nnpatch", *sys.argv[1:]]
main()
"""


@pytest.fixture
def feed(tmp_path):
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((1024, 256)).astype("<f4") for _ in range(2))
    v1 = tmp_path / "v1.safetensors"
    write_safetensors(v1, {"a": ("F32", a.shape, a.tobytes()), "b": ("F32", b.shape, b.tobytes())})
    for t in (a, b):  # both tensors change: a kill between them leaves neither version
        t[rng.choice(1024, 100, replace=False)] += 1
    v2 = tmp_path / "v2.safetensors"
    write_safetensors(v2, {"a": ("F32", a.shape, a.tobytes()), "b": ("F32", b.shape, b.tobytes())})
    make_release([v1], v2, tmp_path / "dist")
    model = tmp_path / "device" / "model.safetensors"
    model.parent.mkdir()
    return v1, v2, tmp_path / "dist" / "manifest.json", model


def _update(model, manifest, *extra):
    return subprocess.run([sys.executable, "-m", "nnpatch", "update", str(model), "--manifest", str(manifest),
                           "--in-place", *extra], capture_output=True, text=True, env=ENV, timeout=120)


def test_killed_mid_write_then_the_same_command_finishes(feed):
    v1, v2, manifest, model = feed
    shutil.copyfile(v1, model)
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE_IN_ROWS, "update", str(model), "--manifest", str(manifest),
                             "--in-place"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=ENV, text=True)
    try:
        assert proc.stderr.readline() == "rows written\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stderr.close()
    assert os.path.exists(journal_path(model))
    # written through the journal: part of v2 (the other tensor's thread may have finished too, which
    # is the state that answered "already current" before)
    assert read(model) != read(v1)
    dry = _update(model, manifest, "--dry-run")
    assert dry.returncode == 4 and "interrupted" in dry.stderr, dry.stderr
    r = _update(model, manifest, "--json")
    assert r.returncode == 0, r.stderr
    assert '"recovered": true' in r.stdout
    assert read(model) == read(v2) and hash_file(str(model)) == hash_file(str(v2))
    assert sorted(os.listdir(model.parent)) == ["model.safetensors"]


def test_killed_at_random_moments(feed):
    """SIGKILL at a random moment of each run, then the same command: exactly v2 every time."""
    v1, v2, manifest, model = feed
    shutil.copyfile(v1, model)
    start = time.monotonic()
    assert _update(model, manifest).returncode == 0
    whole = time.monotonic() - start
    rng = random.Random(7)
    for _ in range(6):
        shutil.copyfile(v1, model)
        proc = subprocess.Popen([sys.executable, "-m", "nnpatch", "update", str(model), "--manifest", str(manifest),
                                 "--in-place"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        time.sleep(rng.uniform(0.0, whole))
        proc.kill()
        proc.wait(timeout=30)
        r = _update(model, manifest)
        assert r.returncode == 0, r.stderr
        assert read(model) == read(v2)
        assert sorted(os.listdir(model.parent)) == ["model.safetensors"]


def test_hash_warns_about_a_half_written_model(feed, tmp_path):
    v1, _, _, model = feed
    shutil.copyfile(v1, model)
    open(journal_path(model), "wb").close()
    r = subprocess.run([sys.executable, "-m", "nnpatch", "hash", str(model)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stdout.startswith(hash_file(str(v1)))
    assert "interrupted" in r.stderr and "nnpatch recover" in r.stderr
