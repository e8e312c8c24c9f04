"""An extents target's skeleton as a 'zstd-base' delta (format 1.5, spec 5.8) through the native
applier (native/src/skeldelta.c): the frame decoded with the base's skeleton as its prefix equals
Python's raw-content dictionary decode; chains take the link before's skeleton; a base of the same
size and tensors but another skeleton is a wrong base (exit 4), nothing written. The invalid
skeleton-delta-* vectors run in test_native_vectors."""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import nnpatch
from nnpatch.skeldelta import ZSTD_BASE
from tests.tflite_files import fixture

from .native_run import assert_ok, assert_refused, leftovers
from .native_run import native as run_native

ROOT = Path(__file__).resolve().parents[2]
GGUF = ROOT / "spec" / "vectors" / "valid" / "packed-gguf"


def _delta(a, b, p) -> None:
    nnpatch.diff(a, b, p)
    with nnpatch.read_patch(p) as patch:
        assert patch.header.target.skeleton.codec == [ZSTD_BASE]


def test_one_patch_new_file_stdin_in_place_check(native_impl, tmp_path):
    a, b, p = fixture("cnn-int8"), fixture("cnn-int8-bias"), tmp_path / "p.nnpatch"
    _delta(a, b, p)
    out = tmp_path / "out" / "n.tflite"
    out.parent.mkdir()
    assert_ok(run_native(native_impl, a, p, "-o", out, "--quiet"))
    assert filecmp.cmp(out, b, shallow=False)
    out.unlink()
    assert_ok(run_native(native_impl, a, "-", "-o", out, "--quiet", stdin=p.read_bytes()))
    assert filecmp.cmp(out, b, shallow=False)
    model = tmp_path / "out" / "m.tflite"
    shutil.copyfile(a, model)
    assert_ok(run_native(native_impl, "--in-place", model, p))
    assert filecmp.cmp(model, b, shallow=False)
    assert_ok(run_native(native_impl, "--check", p))
    assert_ok(run_native(native_impl, "--check", p, "--base", a))


def test_chain_of_deltas(native_impl, tmp_path):
    a, b, c = fixture("cnn-int8"), fixture("cnn-int8-channels"), fixture("cnn-int8-bias")
    p1, p2 = tmp_path / "1.nnpatch", tmp_path / "2.nnpatch"
    _delta(a, b, p1)
    _delta(b, c, p2)
    out = tmp_path / "n.tflite"
    assert_ok(run_native(native_impl, a, p1, p2, "-o", out, "--quiet"))
    assert filecmp.cmp(out, c, shallow=False)


def test_a_base_with_another_skeleton_is_a_wrong_base(native_impl, tmp_path):
    data = (GGUF / "base.gguf").read_bytes()
    assert data.count(b"v1") == 1
    base = tmp_path / "base.gguf"
    base.write_bytes(data.replace(b"v1", b"v9"))  # same size and tensors, another skeleton
    out = tmp_path / "out" / "n.gguf"
    out.parent.mkdir()
    r = run_native(native_impl, base, GGUF / "patch.nnpatch", "-o", out)
    assert_refused(r, 4)
    assert "skeleton is a delta against base file" in r.err
    assert leftovers(out.parent) == [] and os.listdir(tmp_path) == ["base.gguf", "out"]


def test_check_with_a_base_decodes_the_delta(native_impl, tmp_path):
    data = (GGUF / "base.gguf").read_bytes()
    base = tmp_path / "base.gguf"
    base.write_bytes(data.replace(b"v1", b"v9"))
    assert_ok(run_native(native_impl, "--check", GGUF / "patch.nnpatch", "--base", GGUF / "base.gguf"))
    r = run_native(native_impl, "--check", GGUF / "patch.nnpatch", "--base", base)
    assert r.rc == 1 and "skeleton is a delta against base file" in r.err, str(r)
