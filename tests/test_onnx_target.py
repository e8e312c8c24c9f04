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
    nnpatch.diff(base, target, tmp_path / "p.nnpatch", aligned=True)  # the version of the target alone
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


# --- where external data may go (spec 5.7): re-applying, existing files, directories, symlinks ----------

def _ext_patch(tmp_path):
    base = save(_onnx_mlp(onnx), tmp_path / "a", external=True)
    target = save(updated(), tmp_path / "b", external=True)
    nnpatch.diff(base, target, tmp_path / "p.nnpatch")
    return base, target


def test_onnx_reapply_over_its_own_output_replaces_its_external_data(tmp_path):
    base, target = _ext_patch(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    nnpatch.apply(base, tmp_path / "p.nnpatch", out / "m.onnx")
    (out / "m.onnx.data").write_bytes(b"stale")  # the model at -o names it: the patch owns it
    os.chmod(out / "m.onnx.data", 0o600)
    nnpatch.apply(base, tmp_path / "p.nnpatch", out / "m.onnx")
    assert files(out) == files(tmp_path / "b")
    assert os.stat(out / "m.onnx.data").st_mode & 0o777 == 0o600  # a replaced file keeps its permissions


def test_onnx_existing_file_not_named_by_the_output_is_refused(tmp_path):
    base, _ = _ext_patch(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx.data").write_bytes(b"someone else's")
    with pytest.raises(PatchFormatError, match="already exists"):
        nnpatch.apply(base, tmp_path / "p.nnpatch", out / "m.onnx")
    assert files(out) == {"m.onnx.data": b"someone else's"}


def test_onnx_external_data_is_never_the_base(tmp_path):
    """Even where the model at -o names the base's own external data file, a fresh apply leaves it alone."""
    import shutil

    base, _ = _ext_patch(tmp_path)
    shutil.copyfile(base, tmp_path / "a" / "copy.onnx")  # names m.onnx.data, the base's file
    before = files(tmp_path / "a")
    with pytest.raises(PatchFormatError, match="base model"):
        nnpatch.apply(base, tmp_path / "p.nnpatch", tmp_path / "a" / "copy.onnx")
    assert files(tmp_path / "a") == before


def test_onnx_external_data_symlink_is_refused(tmp_path):
    base, _ = _ext_patch(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "victim").write_bytes(b"victim")
    (out / "m.onnx.data").symlink_to(tmp_path / "victim")
    with pytest.raises(PatchFormatError, match="not a regular file"):
        nnpatch.apply(base, tmp_path / "p.nnpatch", out / "m.onnx")
    assert read(tmp_path / "victim") == b"victim" and sorted(os.listdir(out)) == ["m.onnx.data"]


def _subdir_model(d):
    m = updated()
    onnx.save_model(m, os.path.join(d, "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w/m.data", size_threshold=64)


def test_onnx_external_data_goes_only_into_existing_directories(tmp_path):
    base = save(_onnx_mlp(onnx), tmp_path / "a", external=False)
    (tmp_path / "b" / "w").mkdir(parents=True)
    _subdir_model(tmp_path / "b")
    nnpatch.diff(base, tmp_path / "b" / "m.onnx", tmp_path / "p.nnpatch")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PatchFormatError, match="does not exist"):
        nnpatch.apply(base, tmp_path / "p.nnpatch", out / "m.onnx")
    assert os.listdir(out) == []
    (out / "w").symlink_to(tmp_path / "a")
    with pytest.raises(PatchFormatError, match="symlink"):
        nnpatch.apply(base, tmp_path / "p.nnpatch", out / "m.onnx")
    (out / "w").unlink()
    (out / "w").mkdir()
    nnpatch.apply(base, tmp_path / "p.nnpatch", out / "m.onnx")
    assert read(out / "w" / "m.data") == read(tmp_path / "b" / "w" / "m.data")
    assert read(out / "m.onnx") == read(tmp_path / "b" / "m.onnx")


# --- the skeleton itself: every field checked before anything is built ---------------------------------

def _skeleton(tmp_path):
    from nnpatch.weights.onnx_file import load_onnx

    path = save(_onnx_mlp(onnx), tmp_path / "s", external=True)
    return load_onnx(path)


def _reencode(skeleton, edit_header=None, edit_model=None):
    import json
    import struct

    from nnpatch.weights.onnx_file import SKELETON_MAGIC, parse_skeleton

    header, proto = parse_skeleton(skeleton)
    if edit_header:
        edit_header(header)
    if edit_model:
        m = onnx.ModelProto()
        m.ParseFromString(proto)
        edit_model(m)
        proto = m.SerializeToString()
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return SKELETON_MAGIC + struct.pack("<I", len(text)) + text + proto


def _ext_tensor(m, name="fc1.weight"):
    return next(t for t in m.graph.initializer if t.name == name)


def _set_ref(key, value):
    def edit(m):
        t = _ext_tensor(m)
        for e in t.external_data:
            if e.key == key:
                e.value = value
    return edit


def _gaps(value):
    return lambda h: next(iter(h["externals"].values())).update(gaps=value)


@pytest.mark.parametrize("edit_header, edit_model, error", [
    (None, _set_ref("offset", " 64"), "decimal"),
    (None, _set_ref("offset", "1_0"), "decimal"),
    (None, _set_ref("location", "other.bin"), "not in the skeleton's externals"),
    (None, lambda m: _ext_tensor(m).dims.append(1 << 40), "past the end|too large|length"),
    (None, lambda m: setattr(_ext_tensor(m), "raw_data", b"x"), "still holds"),
    (None, lambda m: setattr(_ext_tensor(m), "data_location", 0), "data_location"),
    (_gaps([[0, 3, ""]]), None, "covered twice|neither"),
    (lambda h: next(iter(h["externals"].values())).update(size=10**6), None, "end at"),
    (lambda h: h["externals"].update({"x.bin": {"size": 0, "gaps": []}}), None, "holds no tensor"),
    (lambda h: h["storage"].update({"fc2.bias": "int64_data"}), None, "cannot be stored"),
    (lambda h: h["storage"].update({"fc2.bias": "empty"}), None, "empty"),
    (lambda h: h.update(extra=1), None, "unknown key"),
    (lambda h: h.update(version=True), None, "version"),
])
def test_onnx_malformed_skeletons_are_weights_errors(tmp_path, edit_header, edit_model, error):
    from nnpatch.errors import WeightsError
    from nnpatch.weights.onnx_file import read_skeleton

    skeleton, _ = _skeleton(tmp_path)
    read_skeleton(skeleton)  # the real one passes
    with pytest.raises(WeightsError, match=error):
        read_skeleton(_reencode(skeleton, edit_header, edit_model))


def test_onnx_skeleton_must_fit_the_header(tmp_path):
    from nnpatch.errors import WeightsError
    from nnpatch.weights.onnx_file import check_skeleton_fits, read_skeleton

    skeleton, tensors = _skeleton(tmp_path)
    sk = read_skeleton(skeleton)
    size = sk.externals["m.onnx.data"][0]
    check_skeleton_fits(sk, {"m.onnx.data": size}, sk.tensor_bytes)
    with pytest.raises(WeightsError, match="not both"):
        check_skeleton_fits(sk, {}, sk.tensor_bytes)
    with pytest.raises(WeightsError, match="bytes in the skeleton"):
        check_skeleton_fits(sk, {"m.onnx.data": size + 1}, sk.tensor_bytes)
    with pytest.raises(WeightsError, match="more than the target"):
        check_skeleton_fits(sk, {"m.onnx.data": size}, sk.tensor_bytes - 1)


def test_onnx_writer_refuses_padding_an_applier_would_refuse(tmp_path):
    from onnx import TensorProto, helper

    from nnpatch.errors import WeightsError
    from nnpatch.weights.onnx_file import GAP_ALLOWANCE, load_onnx

    t = helper.make_tensor("w", TensorProto.FLOAT, [2], [0.0, 0.0])
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "w.bin"), ("offset", str(GAP_ALLOWANCE + 64)), ("length", "8")):
        t.external_data.add(key=k, value=v)
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [t])
    onnx.save(helper.make_model(g), tmp_path / "m.onnx")
    (tmp_path / "w.bin").write_bytes(b"\0" * (GAP_ALLOWANCE + 64) + b"\1" * 8)
    with pytest.raises(WeightsError, match="not initializers nnpatch"):
        load_onnx(tmp_path / "m.onnx")


def test_release_and_update_an_onnx_model(tmp_path):
    """The manifest names the ONNX file the patch writes (outputs[0]), not the safetensors rendering
    of its tensors, so update brings a device's model to the release byte for byte."""
    from click.testing import CliRunner

    from nnpatch.cli import cli

    base = save(_onnx_mlp(onnx), tmp_path / "a", external=False)
    target = save(updated(), tmp_path / "b", external=False)
    device = tmp_path / "dev"
    device.mkdir()
    model = device / "m.onnx"
    model.write_bytes(read(base))
    r = CliRunner().invoke(cli, ["release", base, "--to", target, "-o", str(tmp_path / "rel")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["update", str(model), "--manifest", str(tmp_path / "rel" / "manifest.json")])
    assert r.exit_code == 0, r.output
    assert read(model) == read(target)
