"""ONNX targets (format 1.1): the patched model is written back as ONNX, byte-identical to the real
target file (and its external data files), checked against the patch before anything is visible."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import nnpatch
from nnpatch.errors import IntegrityError, PatchFormatError
from crafting import header_json, with_header
from nnpatch.patchfile import read_patch

from .conftest import read
from .test_model_formats import _onnx_mlp

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402


def updated(*, rows=(3,), bias=False):
    """The test MLP with some output channels of fc1 changed (and optionally its bias)."""
    m = _onnx_mlp(onnx)
    for i, t in enumerate(m.graph.initializer):
        if t.name == "fc1.weight":
            arr = numpy_helper.to_array(t).copy()
            arr[list(rows)] += 0.25
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, "fc1.weight"))
        if t.name == "fc1.bias" and bias:
            del t.float_data[:]
            t.float_data.extend(np.arange(16, dtype=np.float32).tolist())
    return m


def save(model, d, *, external: bool):
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "m.onnx")
    if external:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="m.onnx.data", size_threshold=64)
    else:
        onnx.save(model, path)
    return path


def files(d) -> dict[str, bytes]:
    return {f: read(os.path.join(d, f)) for f in sorted(os.listdir(d))}


@pytest.mark.parametrize("base_external", [False, True])
@pytest.mark.parametrize("target_external", [False, True])
@pytest.mark.parametrize("verify", ["default", "full"])
def test_onnx_target_is_written_back_byte_for_byte(tmp_path, base_external, target_external, verify):
    base = save(_onnx_mlp(onnx), tmp_path / "a", external=base_external)
    target = save(updated(bias=True), tmp_path / "b", external=target_external)
    nnpatch.diff(base, target, tmp_path / "p.nnpatch")
    with read_patch(tmp_path / "p.nnpatch") as p:
        h = p.header
        # 1.1 for the target format, 1.2 where a section also uses esort: the lowest that has both
        assert h.version == h.min_version == ((1, 2) if any(op.values is not None and "esort" in op.values.codec
                                                            for op in h.ops) else (1, 1))
        assert h.target.format == "onnx"
        assert [o.path for o in h.target.outputs] == ["m.onnx"] + (["m.onnx.data"] if target_external else [])
        assert {op.name for op in h.ops} == {"fc1.weight", "fc1.bias"}  # only the changed initializers
    before = files(tmp_path / "a")
    out = tmp_path / "out"
    out.mkdir()
    r = nnpatch.apply(base, tmp_path / "p.nnpatch", out / "m.onnx", verify=verify)
    assert files(out) == files(tmp_path / "b")
    assert r.blake3 == nnpatch.hash_file(target)
    assert files(tmp_path / "a") == before
    onnx.checker.check_model(onnx.load(str(out / "m.onnx")))
    rep = nnpatch.verify(tmp_path / "p.nnpatch", base=base, target=out / "m.onnx")
    assert rep.ok, [c.detail for c in rep.failures()]


def test_onnx_target_from_a_safetensors_base(tmp_path):
    from nnpatch.weights.onnx_file import load_onnx

    base_onnx = save(_onnx_mlp(onnx), tmp_path / "a", external=False)
    _, tensors = load_onnx(base_onnx)
    st = tmp_path / "a.safetensors"
    nnpatch.weights.write_safetensors(st, {n: tuple(t) for n, t in tensors.items()})
    target = save(updated(rows=(0, 15)), tmp_path / "b", external=False)
    nnpatch.diff(st, target, tmp_path / "p.nnpatch")
    nnpatch.apply(st, tmp_path / "p.nnpatch", tmp_path / "out.onnx")
    assert read(tmp_path / "out.onnx") == read(target)


def test_onnx_in_place_and_cli(tmp_path):
    base = save(_onnx_mlp(onnx), tmp_path / "a", external=True)
    target = save(updated(), tmp_path / "b", external=True)
    run = [sys.executable, "-m", "nnpatch"]
    p = subprocess.run(run + ["diff", base, target, "-o", str(tmp_path / "p.nnpatch")], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(run + ["apply", "--in-place", base, str(tmp_path / "p.nnpatch")], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert files(tmp_path / "a") == files(tmp_path / "b")
    p = subprocess.run(run + ["verify", str(tmp_path / "p.nnpatch"), "--target", base], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_onnx_output_digest_lie_leaves_nothing(tmp_path):
    base = save(_onnx_mlp(onnx), tmp_path / "a", external=True)
    target = save(updated(), tmp_path / "b", external=True)
    nnpatch.diff(base, target, tmp_path / "p.nnpatch")
    data = read(tmp_path / "p.nnpatch")
    obj = header_json(data)
    obj["target"]["outputs"][1]["blake3"] = "0" * 64
    (tmp_path / "bad.nnpatch").write_bytes(with_header(data, obj))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError, match="m.onnx.data"):
        nnpatch.apply(base, tmp_path / "bad.nnpatch", out / "m.onnx")
    assert os.listdir(out) == []


@pytest.mark.parametrize("edit, error", [
    (lambda t: t["outputs"][0].update(path="sub/m.onnx"), "file name"),
    (lambda t: t["outputs"][1].update(path="../m.onnx.data"), "component"),
    (lambda t: t.pop("skeleton"), "skeleton"),
    (lambda t: t["outputs"].append(dict(t["outputs"][1])), "twice"),
])
def test_hostile_onnx_headers_are_refused(tmp_path, edit, error):
    base = save(_onnx_mlp(onnx), tmp_path / "a", external=True)
    target = save(updated(), tmp_path / "b", external=True)
    nnpatch.diff(base, target, tmp_path / "p.nnpatch")
    data = read(tmp_path / "p.nnpatch")
    obj = header_json(data)
    edit(obj["target"])
    (tmp_path / "bad.nnpatch").write_bytes(with_header(data, obj))
    with pytest.raises(PatchFormatError, match=error):
        nnpatch.apply(base, tmp_path / "bad.nnpatch", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
