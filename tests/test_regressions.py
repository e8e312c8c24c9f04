"""Inputs found by fuzzing, kept as regressions (tests/regressions/, described in each test)."""

from __future__ import annotations

import os

import blake3
import pytest

import nnpatch

HERE = os.path.dirname(__file__)
VECTORS = os.path.join(HERE, os.pardir, "spec", "vectors")


def test_patch_whose_target_digest_lies(tmp_path):
    """atheris: a header whose target.blake3 was shuffled (trailer recomputed). The layout and tensors are
    right, but every verify mode re-hashes the output file and refuses the patch for its false claim
    (issue 28, item 5: the default mode used to write it and exit 0)."""
    with open(os.path.join(HERE, "regressions", "target-digest-lie.nnpatch.raw"), "rb") as f:
        raw = f.read()
    patch = tmp_path / "lie.nnpatch"
    patch.write_bytes(raw[:-32] + blake3.blake3(raw[:-32]).digest())
    base = os.path.join(VECTORS, "valid", "every-dtype", "base.safetensors")
    with pytest.raises(nnpatch.IntegrityError, match="result does not match the patch's target"):
        nnpatch.apply(base, patch, tmp_path / "full.safetensors", verify="full")
    assert not (tmp_path / "full.safetensors").exists()
    for mode in ("default", "touched"):
        with pytest.raises(nnpatch.IntegrityError, match="result does not match the patch's target"):
            nnpatch.apply(base, patch, tmp_path / "out.safetensors", verify=mode)
        assert not (tmp_path / "out.safetensors").exists()
    target = os.path.join(VECTORS, "valid", "every-dtype", "target.safetensors")
    report = nnpatch.verify(patch, target=target)
    assert not report.ok  # verify exposes the false claim
