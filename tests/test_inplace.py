"""In-place apply: success, wrong base, crashes at every step, recovery, locking, fallback."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import shutil
import stat

import numpy as np
import pytest
from click.testing import CliRunner

import nnpatch
from nnpatch.cli import cli
from nnpatch.errors import BaseMismatchError, IntegrityError
from nnpatch.hashing import hash_file
from nnpatch.applier import apply_in_place, recover
from nnpatch.applier.inplace import SimulatedCrash
from nnpatch.applier.journal import journal_path

from .conftest import read, save
from conftest import assert_proven

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def same_layout(tmp_path):
    """OLD, NEW (rows, elements and a whole tensor changed; same layout) and the patch."""
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((128, 64)) * 0.05).astype("<f4")
    b = (rng.standard_normal((40, 24)) * 0.05).astype("<f2")
    c = (rng.standard_normal(50) * 0.05).astype("<f4")
    d = rng.integers(0, 256, 33, dtype=np.uint8)
    old = {"a": ("F32", a.shape, a.tobytes()), "b": ("F16", b.shape, b.tobytes()),
           "c": ("F32", c.shape, c.tobytes()), "d": ("U8", d.shape, d.tobytes())}
    a2, b2, c2 = a.copy(), b.copy(), c.copy()
    a2[rng.choice(128, 13, replace=False)] += np.float32(1e-3)
    b2[3, 4] = np.float16(1.5)
    c2[:] = rng.standard_normal(50).astype("<f4")
    new = dict(old, a=("F32", a.shape, a2.tobytes()), b=("F16", b.shape, b2.tobytes()),
               c=("F32", c.shape, c2.tobytes()))
    o = save(tmp_path / "old.safetensors", old, {"v": "1"})
    n = save(tmp_path / "new.safetensors", new, {"v": "1"})
    p = str(tmp_path / "p.nnpatch")
    nnpatch.diff(o, n, p)
    m = str(tmp_path / "model.safetensors")
    shutil.copyfile(o, m)
    return o, n, p, m


def _state(model, old, new) -> str:
    data = read(model)
    return "OLD" if data == read(old) else "NEW" if data == read(new) else "MIX"


@pytest.mark.parametrize("mode", ["default", "full", "touched"])
def test_in_place(same_layout, backend, mode):
    old, new, patch, model = same_layout
    ino = os.stat(model).st_ino
    r = apply_in_place(model, patch, verify=mode)
    assert read(model) == read(new) and hash_file(model) == hash_file(new)
    assert_proven(r, new, mode)
    assert os.stat(model).st_ino == ino  # really in place
    assert not os.path.exists(journal_path(model))


def test_in_place_cli(same_layout):
    old, new, patch, model = same_layout
    r = CliRunner().invoke(cli, ["apply", "--in-place", model, patch])
    assert r.exit_code == 0, r.output
    assert read(model) == read(new)
    r = CliRunner().invoke(cli, ["apply", "--in-place", model, patch, "-o", "x"])
    assert r.exit_code == 2


def test_wrong_base_in_place_leaves_the_file(same_layout, tmp_path):
    old, new, patch, model = same_layout
    shutil.copyfile(new, model)
    r = CliRunner().invoke(cli, ["apply", "--in-place", model, patch])
    assert r.exit_code == 4 and "wrong base" in r.stderr
    assert read(model) == read(new)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "new.safetensors", "old.safetensors", "p.nnpatch"]


@pytest.mark.parametrize("err, stops", [(errno.EIO, True), (errno.EINVAL, False)])
def test_a_journal_that_cannot_be_made_durable_stops_before_the_model_is_written(same_layout, tmp_path,
                                                                                 monkeypatch, err, stops):
    """The journal's commit point is the fsync of its folder: when that fails (EIO), the model must not be
    written, since after a crash it could be half new with no journal to undo it. A file system that cannot
    sync directories at all (EINVAL) is no failure: the update goes on as before."""
    old, new, patch, model = same_layout
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(err, os.strerror(err))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    r = CliRunner().invoke(cli, ["apply", "--in-place", model, patch])
    if not stops:
        assert r.exit_code == 0, r.output
        assert read(model) == read(new) and not os.path.exists(journal_path(model))
        return
    assert r.exit_code == 5, r.output
    line = r.stderr.strip()
    assert "\n" not in line and "cannot make the journal durable" in line and "the model was not written" in line
    assert read(model) == read(old) and hash_file(model) == hash_file(old)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "new.safetensors", "old.safetensors", "p.nnpatch"]


def crash_at(step: str, model, patch) -> None:
    """Run an in-place apply that dies (SimulatedCrash) when it reaches ``step``."""
    def hook(s):
        if s == step:
            raise SimulatedCrash(s)
    with pytest.raises(SimulatedCrash):
        apply_in_place(model, patch, hook=hook)


STEPS = ["locked", "journal", "write:a", "write:c", "synced", "verified", "done"]


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_each_step_then_recover(same_layout, step):
    old, new, patch, model = same_layout
    crash_at(step, model, patch)
    journal = os.path.exists(journal_path(model))
    assert journal == (step not in ("locked", "done"))
    note = recover(model)
    assert (note is not None) == journal
    assert _state(model, old, new) == ("NEW" if step == "done" else "OLD")
    assert not os.path.exists(journal_path(model))


@pytest.mark.parametrize("step", ["journal", "synced"])
def test_next_apply_recovers_first(same_layout, step):
    old, new, patch, model = same_layout
    crash_at(step, model, patch)
    assert os.path.exists(journal_path(model))
    r = CliRunner().invoke(cli, ["apply", "--in-place", model, patch])
    assert r.exit_code == 0, r.output
    assert _state(model, old, new) == "NEW" and not os.path.exists(journal_path(model))


def test_apply_to_new_file_refuses_an_interrupted_base(same_layout, tmp_path):
    old, new, patch, model = same_layout
    crash_at("synced", model, patch)
    before = read(model)
    out = tmp_path / "out.safetensors"
    r = CliRunner().invoke(cli, ["apply", model, patch, "-o", str(out)])
    assert r.exit_code == 4 and "nnpatch recover" in r.stderr
    assert read(model) == before and not out.exists()  # the base is never written by a plain apply
    recover(model)
    nnpatch.apply(model, patch, out)
    assert read(out) == read(new) and _state(model, old, new) == "OLD"


def test_recover_cli(same_layout):
    old, new, patch, model = same_layout
    r = CliRunner().invoke(cli, ["recover", model])
    assert r.exit_code == 0 and "nothing to recover" in r.stdout

    crash_at("write:a", model, patch)
    r = CliRunner().invoke(cli, ["recover", model])
    assert r.exit_code == 0 and "rolled back" in r.stdout
    assert _state(model, old, new) == "OLD"


def test_torn_and_uncommitted_journals_are_discarded(same_layout):
    old, new, patch, model = same_layout
    crash_at("journal", model, patch)
    jp = journal_path(model)
    data = read(jp)
    with open(jp, "wb") as f:
        f.write(data[: len(data) // 2])  # torn: the trailer hash no longer matches
    assert "damaged" in recover(model)
    assert _state(model, old, new) == "OLD" and not os.path.exists(jp)
    with open(jp + ".tmp", "wb") as f:
        f.write(data[:100])
    assert "uncommitted" in recover(model)
    assert not os.path.exists(jp + ".tmp")


def test_journal_of_another_file_is_refused(same_layout, tmp_path):
    old, new, patch, model = same_layout
    crash_at("journal", model, patch)
    other = str(tmp_path / "other.safetensors")
    save(other, {"x": ("F32", (3,), bytes(12))})
    os.rename(journal_path(model), journal_path(other))
    with pytest.raises(IntegrityError, match="belongs to another file"):
        recover(other)
    assert os.path.exists(journal_path(other))


def test_lock_contention(same_layout):
    old, new, patch, model = same_layout
    fd = os.open(model, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = CliRunner().invoke(cli, ["apply", "--in-place", model, patch])
        assert r.exit_code == 5
        assert r.stderr.strip() == (f"Error: {model}: locked: another nnpatch is updating this model; "
                                    "try again when it has finished")
        assert read(model) == read(old)
    finally:
        os.close(fd)


def test_layout_change_falls_back_to_rename(tmp_path, pair, backend):
    base, target = pair()
    patch = tmp_path / "p.nnpatch"
    nnpatch.diff(base, target, patch)
    model = str(tmp_path / "model.safetensors")
    shutil.copyfile(base, model)
    r = apply_in_place(model, patch)
    assert read(model) == read(target)
    assert_proven(r, target)
    assert not os.path.exists(journal_path(model))
    with pytest.raises(BaseMismatchError):
        apply_in_place(model, patch)
    assert read(model) == read(target)


@pytest.mark.slow
def test_sigkill_crash_test_small():
    spec = importlib.util.spec_from_file_location("crash_test", os.path.join(ROOT, "benchmarks", "crash_test.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    counts = mod.run(trials=6, mb=4, verbose=False)
    assert counts["bad"] == 0 and counts["old"] + counts["new"] == 6
