"""spec/vectors/journal against the native applier: ``nnpatch-apply --recover`` on a copy of each case
gives journal.json's exit code (one ``Error:`` line when refused), leaves the model byte for byte as the
case says and the journals it says; through libnnpatch.so (ctypes, nnp_recover) the error class is the
one journal.json names; ``--in-place`` recovers first, then updates or refuses the same way; the
aarch64 build (under qemu) gives the same verdicts.
tests/test_journal_vectors.py runs the same cases through Python."""

from __future__ import annotations

import os

import pytest

from ..test_journal_vectors import CASES, HERE, INDEX, check_after, lay_out
from .native_run import assert_ok, assert_refused
from .native_run import native as run_native
from .test_native_vectors import lib  # noqa: F401 (libnnpatch.so through ctypes, nnp_recover included)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_recover(native_impl, case, tmp_path):
    model = lay_out(case, tmp_path)
    r = run_native(native_impl, "--recover", model)
    if case["exit"]:
        assert_refused(r, case["exit"])
    else:
        assert_ok(r)
        said = "rolled back" if case["outcome"] == "recovered" else "nothing to recover"
        assert said in r.out, r
    check_after(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_apply_in_place_recovers_first(native_impl, case, tmp_path):
    """--in-place recovers first: then makes the new model, or refuses as --recover does, writing nothing."""
    model = lay_out(case, tmp_path)
    r = run_native(native_impl, "--in-place", model, os.path.join(HERE, case.get("patch", INDEX["patch"])))
    if case["exit"]:
        assert_refused(r, case["exit"])
        check_after(case, tmp_path)
    else:
        assert_ok(r)
        with open(model, "rb") as f, open(os.path.join(HERE, case.get("model_updated", INDEX["model_updated"])), "rb") as g:
            assert f.read() == g.read()
        assert os.listdir(tmp_path) == [case["model"]]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_recover_aarch64(aarch64, case, tmp_path):
    """The aarch64 build under qemu, as a phone or a board runs it: the same verdicts."""
    model = lay_out(case, tmp_path)
    r = aarch64.run("--recover", model)
    err = r.stderr.decode("utf-8", "replace").strip("\n").splitlines()
    assert r.returncode == case["exit"], r
    if case["exit"]:
        assert len(err) == 1 and err[0].startswith("Error: "), err
    check_after(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_library_recover(lib, case, tmp_path):
    status, recovered, name = lib.recover(lay_out(case, tmp_path))
    if case["exit"]:
        assert (status, name) == (case["exit"], case["error"])
    else:
        assert (status, recovered) == (0, int(case["outcome"] == "recovered")), name
    check_after(case, tmp_path)
