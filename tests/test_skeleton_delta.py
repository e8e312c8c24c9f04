"""An extents target's skeleton as a 'zstd-base' delta against the base's (format 1.5, spec 5.8):
the writer picks it where it is smaller, apply rebuilds the target exactly (one patch, chains,
in place), a base whose skeleton differs is refused as a wrong base, and crafted frames give one
Error line, exit 3, nothing written."""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import nnpatch
from nnpatch.cli import cli
from nnpatch.skeldelta import ZSTD_BASE
from tests.tflite_files import fixture

VECTORS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spec", "vectors")
GGUF = os.path.join(VECTORS, "valid", "packed-gguf")


def _codec(path) -> list[str]:
    with nnpatch.read_patch(path) as p:
        return p.header.target.skeleton.codec


def _version(path) -> tuple[int, int]:
    with nnpatch.read_patch(path) as p:
        return p.header.version


def test_bias_pair_uses_the_delta_and_is_exact(tmp_path):
    a, b = fixture("cnn-int8"), fixture("cnn-int8-bias")
    p, whole = tmp_path / "p.nnpatch", tmp_path / "whole.nnpatch"
    nnpatch.diff(a, b, p)
    nnpatch.diff(a, b, whole, aligned=True)  # for 1.4 readers: the skeleton whole
    assert _codec(p) == [ZSTD_BASE] and _version(p) == (1, 5)
    assert _codec(whole) == ["zstd"] and _version(whole) == (1, 4)
    assert os.path.getsize(p) < os.path.getsize(whole) - 1000
    out = tmp_path / "out.tflite"
    nnpatch.apply(a, p, out)
    assert filecmp.cmp(out, b, shallow=False)
    r = CliRunner().invoke(cli, ["show", str(p)])
    assert r.exit_code == 0 and "zstd-base: a delta against the base's skeleton" in r.output


def test_in_place(tmp_path):
    model = tmp_path / "m.tflite"
    shutil.copyfile(fixture("cnn-int8"), model)
    p = tmp_path / "p.nnpatch"
    nnpatch.diff(fixture("cnn-int8"), fixture("cnn-int8-bias"), p)
    r = CliRunner().invoke(cli, ["apply", "--in-place", str(model), str(p)])
    assert r.exit_code == 0, r.output
    assert filecmp.cmp(model, fixture("cnn-int8-bias"), shallow=False)


def test_chain_of_deltas(tmp_path):
    """A -> B -> C, both skeletons deltas: the second one's dictionary is B's skeleton, which only
    the first patch holds."""
    a, b, c = fixture("cnn-int8"), fixture("cnn-int8-channels"), fixture("cnn-int8-bias")
    p1, p2 = tmp_path / "1.nnpatch", tmp_path / "2.nnpatch"
    nnpatch.diff(a, b, p1)
    nnpatch.diff(b, c, p2)
    assert _codec(p1) == _codec(p2) == [ZSTD_BASE]
    out = tmp_path / "out.tflite"
    nnpatch.apply_chain(a, [p1, p2], out)
    assert filecmp.cmp(out, c, shallow=False)


def _other_skeleton(tmp_path) -> str:
    """The packed-gguf base with its KV string 'v1' made 'v9': the same size and tensors, another skeleton."""
    data = Path(GGUF, "base.gguf").read_bytes()
    assert data.count(b"v1") == 1
    path = tmp_path / "base.gguf"
    path.write_bytes(data.replace(b"v1", b"v9"))
    return str(path)


def test_a_base_with_another_skeleton_is_a_wrong_base(tmp_path):
    base = _other_skeleton(tmp_path)
    out = tmp_path / "out.gguf"
    r = CliRunner().invoke(cli, ["apply", base, os.path.join(GGUF, "patch.nnpatch"), "-o", str(out)])
    assert r.exit_code == 4, r.output
    assert "skeleton is a delta against base file" in r.output and "Traceback" not in r.output
    assert not out.exists() and os.listdir(tmp_path) == ["base.gguf"]


@pytest.mark.parametrize("name", ["skeleton-delta-size-lie", "skeleton-delta-dict-id",
                                  "skeleton-delta-non-extents-base"])
def test_crafted_frames_one_line_exit_3(tmp_path, name):
    patch = os.path.join(VECTORS, "invalid", f"{name}.nnpatch")
    base = (os.path.join(VECTORS, "invalid", "skeleton-base.safetensors") if name.endswith("base")
            else os.path.join(GGUF, "base.gguf"))
    out = tmp_path / "out.gguf"
    r = CliRunner().invoke(cli, ["apply", base, patch, "-o", str(out)])
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 3 and len(lines) == 1 and lines[0].startswith("Error:"), r.output
    assert os.listdir(tmp_path) == []
    r = CliRunner().invoke(cli, ["verify", patch])  # no base: the frame rules and the header's
    assert r.exit_code == 3 and r.output.startswith("Error:"), r.output


def test_the_stage_elsewhere_is_an_unknown_encoding(tmp_path):
    """Only target.skeleton takes it: on an op's values it is an unknown stage (exit 3)."""
    import sys
    sys.path.insert(0, os.path.dirname(VECTORS))
    from crafting import header_json, with_header
    from generate_vectors import _edit_header

    data = Path(VECTORS, "valid", "skeleton-tflite", "patch.nnpatch").read_bytes()
    data = with_header(data, header_json(data))

    def edit(h):
        op = next(o for o in h["ops"] if "values" in o)
        op["values"]["codec"] = ["zstd-base"]
    bad = tmp_path / "bad.nnpatch"
    bad.write_bytes(_edit_header(data, edit))
    with pytest.raises(nnpatch.UnsupportedVersionError, match="unknown encoding 'zstd-base'"):
        nnpatch.read_patch(bad).close()


def test_verify_with_a_base_decodes_the_delta(tmp_path):
    """verify --base checks what apply would: the base file proven, the frame decoded against it."""
    patch = os.path.join(GGUF, "patch.nnpatch")
    r = CliRunner().invoke(cli, ["verify", patch, "--base", os.path.join(GGUF, "base.gguf")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["verify", patch, "--base", _other_skeleton(tmp_path)])
    assert r.exit_code == 1 and "skeleton is a delta against base file" in r.output, r.output
