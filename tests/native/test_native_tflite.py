"""LiteRT/TFLite (an extents target, format 1.4) through the native applier: Python's diff makes the
patch, ``nnpatch-apply`` rebuilds the target byte for byte (new file, stdin, in place), for the real
converter files of tests/data/tflite in both storage modes, on the host and on aarch64. The C side
reads no flatbuffer: only the patch's extent tables, unchanged for TFLite (native/src/extents.c)."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

import nnpatch
from tests.tflite_files import PAIRS, fixture, offset_mode, outputs

from .native_run import assert_ok, assert_refused, leftovers
from .native_run import native as run_native


def _pair(tmp_path, base: str, target: str, mode: str):
    a, b = fixture(base), fixture(target)
    if mode == "offset":
        a = offset_mode(a, str(tmp_path / "a.tflite"))
        b = offset_mode(b, str(tmp_path / "b.tflite"))
    p = tmp_path / "p.nnpatch"
    nnpatch.diff(a, b, p)
    return a, b, p


@pytest.mark.parametrize("mode", ["inline", "offset"])
@pytest.mark.parametrize("base,target", PAIRS, ids=[t for _, t in PAIRS])
def test_native_rebuilds_the_target(native_impl, tmp_path, base, target, mode):
    a, b, p = _pair(tmp_path, base, target, mode)
    out = tmp_path / "out" / "n.tflite"
    out.parent.mkdir()
    assert_ok(run_native(native_impl, a, p, "-o", out, "--quiet"))
    assert filecmp.cmp(out, b, shallow=False)
    assert leftovers(out.parent, "n.tflite") == []
    out.unlink()
    assert_ok(run_native(native_impl, a, "-", "-o", out, "--quiet", stdin=p.read_bytes()))
    assert filecmp.cmp(out, b, shallow=False)
    model = tmp_path / "out" / "m.tflite"
    model.write_bytes(Path(a).read_bytes())
    assert_ok(run_native(native_impl, "--in-place", model, p))
    assert filecmp.cmp(model, b, shallow=False)
    assert_ok(run_native(native_impl, "--check", p, "--base", a))
    if mode == "offset" and target.endswith("channels"):  # the file the C applier wrote runs as the target
        assert [x.tobytes() for x in outputs(str(model))] == [x.tobytes() for x in outputs(str(b))]


def test_native_refuses_a_wrong_base(native_impl, tmp_path):
    a, b, p = _pair(tmp_path, "cnn-int8", "cnn-int8-channels", "inline")
    out = tmp_path / "n.tflite"
    assert_refused(run_native(native_impl, fixture("cnn-int8-moved"), p, "-o", out), 4)
    assert not out.exists()


def test_aarch64(aarch64, tmp_path):
    """One pair per mode under qemu-aarch64: new file and in place."""
    for mode in ("inline", "offset"):
        a, b, p = _pair(tmp_path, "cnn-int8", "cnn-int8-channels", mode)
        out = tmp_path / f"out-{mode}.tflite"
        r = aarch64.run(a, p, "-o", out, "--quiet")
        assert r.returncode == 0, r.stderr.decode()
        assert filecmp.cmp(out, b, shallow=False)
        model = tmp_path / f"m-{mode}.tflite"
        model.write_bytes(Path(a).read_bytes())
        r = aarch64.run("--in-place", model, p)
        assert r.returncode == 0, r.stderr.decode()
        assert filecmp.cmp(model, b, shallow=False)
