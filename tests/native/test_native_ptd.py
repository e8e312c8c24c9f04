"""ExecuTorch ``.ptd`` (an extents target, format 1.4) through the native applier: Python's diff
makes the patch, ``nnpatch-apply`` rebuilds the file byte for byte (new file, stdin, in place) from
the patch's extent tables, reading no FlatTensor itself."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

import nnpatch
from tests.test_ptd_target import REAL, _pair

from .native_run import assert_ok, leftovers
from .native_run import native as run_native


@pytest.mark.parametrize("kind", ["rows", "dense", "added"])
def test_native_rebuilds_the_ptd(native_impl, tmp_path, kind):
    a, b = _pair(tmp_path, kind)
    p = tmp_path / "p.nnpatch"
    nnpatch.diff(a, b, p)
    out = tmp_path / "out" / "n.ptd"
    out.parent.mkdir()
    assert_ok(run_native(native_impl, a, p, "-o", out, "--quiet"))
    assert filecmp.cmp(out, b, shallow=False)
    out.unlink()
    assert_ok(run_native(native_impl, a, "-", "-o", out, "--quiet", stdin=p.read_bytes()))
    assert filecmp.cmp(out, b, shallow=False)
    model = tmp_path / "out" / "m.ptd"
    model.write_bytes(Path(a).read_bytes())
    assert_ok(run_native(native_impl, "--in-place", model, p))
    assert filecmp.cmp(model, b, shallow=False)
    assert leftovers(out.parent, "n.ptd", "m.ptd") == []


def test_native_real_executorch_pair(native_impl, tmp_path):
    a, b, p = REAL / "v1.ptd", REAL / "v2.ptd", tmp_path / "p.nnpatch"
    nnpatch.diff(a, b, p)
    out = tmp_path / "n.ptd"
    assert_ok(run_native(native_impl, a, p, "-o", out, "--quiet"))
    assert filecmp.cmp(out, b, shallow=False)
