"""Model formats behind one interface: safetensors files and directories (sharded or
not), PyTorch checkpoints and ONNX, recognised by content, read exactly and
rebuilt exactly (byte for byte, or by model digest where the format is not
byte-stable)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from nnpatch.errors import MissingDependencyError, WeightsError
from nnpatch.hashing import model_digest
from nnpatch.weights import SafetensorsFile, write_safetensors
from nnpatch.weights import sharded as sharded_mod
from nnpatch.weights.model import ModelFile
from nnpatch.weights.sharded import INDEX_NAME, index_json_bytes, shard_name, write_sharded
from nnpatch.weights.sniff import open_model, sniff

from .conftest import float_like


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    spec = {
        "emb.weight": ("F32", (50, 8)),
        "layer.0.w": ("BF16", (8, 8)),
        "layer.0.b": ("F16", (8,)),
        "layer.1.w": ("F32", (8, 8)),
        "layer.1.mask": ("BOOL", (8,)),
        "pos_ids": ("I64", (1, 16)),
        "scalar": ("F32", ()),
        "empty": ("F32", (0, 4)),
    }
    return {k: (d, s, float_like(rng, d, s)) for k, (d, s) in spec.items()}


def _split(tensors, n):
    names = sorted(tensors)
    return {shard_name(i + 1, n): {k: tensors[k] for k in names[i::n]} for i in range(n)}


def _digest_of(path):
    with open_model(path) as m:
        return model_digest(m)[0]


# --- recognition by content ------------------------------------------------------------

def test_sniffs_by_content_not_suffix(tmp_path):
    write_safetensors(tmp_path / "weights.bin", _tensors())
    assert sniff(tmp_path / "weights.bin") == "safetensors"
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not a model")
    with pytest.raises(WeightsError, match="not a model nnpatch can read"):
        open_model(tmp_path / "junk.safetensors")
    with zipfile.ZipFile(tmp_path / "a.pt", "w") as z:
        z.writestr("x.txt", "no data.pkl")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        open_model(tmp_path / "a.pt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="neither"):
        open_model(tmp_path / "d")


def test_single_safetensors_model(tmp_path):
    t = _tensors()
    write_safetensors(tmp_path / "m.safetensors", t, {"format": "pt"})
    with open_model(tmp_path / "m.safetensors") as m, SafetensorsFile(tmp_path / "m.safetensors") as f:
        assert m.kind == "safetensors" and m.metadata == {"format": "pt"}
        assert list(m.tensors) == sorted(t)
        for name, (dtype, shape, data) in t.items():
            assert (m.tensors[name].dtype, m.tensors[name].shape, m.tensors[name].nbytes) == (dtype, shape, len(data))
            assert m.raw(name).tobytes() == data
            assert not m.raw(name).flags.writeable
        assert model_digest(m)[0] == model_digest(f)[0] == m.digest()
        assert m.files == [ModelFile("m.safetensors", f.size, True, tuple(sorted(t)))]


# --- sharded safetensors ------------------------------------------------------------------

def test_index_json_matches_transformers_layout():
    text = index_json_bytes({"b.w": "model-00002-of-00002.safetensors", "a.w": "model-00001-of-00002.safetensors"},
                            {"total_size": 12})
    assert text == (
        b'{\n  "metadata": {\n    "total_size": 12\n  },\n  "weight_map": {\n'
        b'    "a.w": "model-00001-of-00002.safetensors",\n'
        b'    "b.w": "model-00002-of-00002.safetensors"\n  }\n}\n'
    )
    assert shard_name(1, 3) == "model-00001-of-00003.safetensors"


def test_sharded_directory_reads_like_the_single_file(tmp_path):
    t = _tensors()
    write_safetensors(tmp_path / "one.safetensors", t)
    d = tmp_path / "sharded"
    write_sharded(d, _split(t, 3), shard_metadata={"format": "pt"})
    (d / "config.json").write_text('{"hidden_size": 8}\n')
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref")
    index = json.loads((d / INDEX_NAME).read_text())
    assert index["metadata"] == {"total_size": sum(len(v[2]) for v in t.values())}
    assert index["weight_map"] == {k: shard_name(sorted(t).index(k) % 3 + 1, 3) for k in t}
    with open_model(d) as m:
        assert m.kind == "safetensors-dir" and m.sharded
        assert model_digest(m)[0] == _digest_of(tmp_path / "one.safetensors")
        assert m.metadata == index["metadata"]
        paths = [f.path for f in m.files]
        assert paths == sorted(["config.json", INDEX_NAME] + [shard_name(i, 3) for i in (1, 2, 3)])
        shards = {f.path: f for f in m.files if f.shard}
        assert len(shards) == 3 and sum(len(f.tensors) for f in shards.values()) == len(t)
        for name in t:
            assert name in shards[m.tensors[name].file].tensors
            assert m.raw(name).tobytes() == t[name][2]


def test_tensors_moving_between_shards_keep_the_digest(tmp_path):
    t = _tensors()
    write_sharded(tmp_path / "a", _split(t, 2))
    write_sharded(tmp_path / "b", _split(t, 3))
    assert _digest_of(tmp_path / "a") == _digest_of(tmp_path / "b")


def test_hugging_face_layout_with_one_model_file(tmp_path):
    t = _tensors()
    write_safetensors(tmp_path / "model.safetensors", t)
    for name in ("config.json", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text("x")
    with open_model(tmp_path) as m:
        assert m.kind == "safetensors-dir" and not m.sharded
        assert [f.path for f in m.files] == ["1_Pooling/config.json", "config.json", "model.safetensors",
                                            "tokenizer.json", "vocab.txt"]
        assert [f.path for f in m.files if f.shard] == ["model.safetensors"]
        assert model_digest(m)[0] == _digest_of(tmp_path / "model.safetensors")


def _index(d, weight_map, metadata=None):
    (d / INDEX_NAME).write_bytes(index_json_bytes(weight_map, metadata))


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "a/../../x.safetensors", "a\\b",
                                 "./model.safetensors", ""])
def test_shard_names_must_stay_inside(tmp_path, bad):
    d = tmp_path / "m"
    d.mkdir()
    write_safetensors(tmp_path / "outside.safetensors", {"x": ("F32", (1,), b"\0" * 4)})
    _index(d, {"x": bad})
    with pytest.raises(WeightsError, match="plain relative path|outside"):
        open_model(d)


def test_shard_symlink_escaping_is_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    write_safetensors(tmp_path / "outside.safetensors", {"x": ("F32", (1,), b"\0" * 4)})
    os.symlink(tmp_path / "outside.safetensors", d / "model-00001-of-00001.safetensors")
    _index(d, {"x": "model-00001-of-00001.safetensors"})
    with pytest.raises(WeightsError, match="outside"):
        open_model(d)
    # and a symlink out of a plain Hugging Face directory is refused when listing files
    d2 = tmp_path / "hf"
    d2.mkdir()
    write_safetensors(d2 / "model.safetensors", {"x": ("F32", (1,), b"\0" * 4)})
    os.symlink("/etc/hostname", d2 / "config.json")
    with pytest.raises(WeightsError, match="outside"):
        open_model(d2)


@pytest.mark.parametrize("case", ["missing_shard", "missing_tensor", "unlisted_tensor", "wrong_shard",
                                  "not_object", "bad_map", "duplicate_key", "bad_metadata", "empty", "too_big"])
def test_index_validation(tmp_path, monkeypatch, case):
    d = tmp_path / "m"
    t = _tensors()
    write_sharded(d, _split(t, 2))
    a, b = shard_name(1, 2), shard_name(2, 2)
    wm = json.loads((d / INDEX_NAME).read_text())["weight_map"]
    if case == "missing_shard":
        os.unlink(d / b)
    elif case == "missing_tensor":
        _index(d, dict(wm, ghost=a))
    elif case == "unlisted_tensor":
        wm.pop(sorted(wm)[0])
        _index(d, wm)
    elif case == "wrong_shard":
        name = next(k for k, v in wm.items() if v == a)
        _index(d, dict(wm, **{name: b}))
    elif case == "not_object":
        (d / INDEX_NAME).write_text("[]")
    elif case == "bad_map":
        (d / INDEX_NAME).write_text('{"weight_map": {"x": 3}}')
    elif case == "duplicate_key":
        (d / INDEX_NAME).write_text('{"weight_map": {"x": "a", "x": "a"}}')
    elif case == "bad_metadata":
        (d / INDEX_NAME).write_text('{"metadata": 1, "weight_map": {}}')
    elif case == "empty":
        _index(d, {})
    elif case == "too_big":
        monkeypatch.setattr(sharded_mod, "MAX_INDEX_SIZE", 100)
    with pytest.raises(WeightsError):
        open_model(d)


def test_duplicate_names_across_shards_are_refused(tmp_path):
    x = ("F32", (1,), b"\0" * 4)
    with pytest.raises(WeightsError, match="both"):
        write_sharded(tmp_path / "w", {"a.safetensors": {"x": x}, "b.safetensors": {"x": x}})
    d = tmp_path / "m"
    d.mkdir()
    write_safetensors(d / "a.safetensors", {"x": x})
    write_safetensors(d / "b.safetensors", {"x": x, "y": x})
    _index(d, {"x": "a.safetensors", "y": "b.safetensors"})
    with pytest.raises(WeightsError, match="assigns to 'a.safetensors'"):
        open_model(d)


# --- PyTorch --------------------------------------------------------------------------------

torch_only = pytest.mark.torch


def _torch_state(torch):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    state = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i8": torch.tensor([-3, 5], dtype=torch.int8),
        "i64": torch.arange(7),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "f8b": torch.randn(4, generator=g).to(torch.float8_e5m2),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "tied_a": base,
        "tied_b": base,  # shared storage
        "transposed": base.t(),  # non-contiguous view of it
        "row": base[2],  # view at a storage offset
    }
    if hasattr(torch, "uint16"):
        state["u16"] = torch.tensor([1, 65535], dtype=torch.uint16)
    return state


@torch_only
def test_torch_checkpoint_reads_every_dtype_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    from nnpatch.weights.torch_file import load_torch, tensor_bytes

    state = _torch_state(torch)
    torch.save(state, tmp_path / "m.safetensors")  # suffix means nothing
    with open_model(tmp_path / "m.safetensors") as m:
        assert m.kind == "pytorch"
        assert m.tensors["bf16"].dtype == "BF16" and m.tensors["c64"].dtype == "C64"
        assert m.tensors["transposed"].shape == (4, 6)
        for name, t in state.items():
            want = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert m.raw(name).tobytes() == want, name
            assert not m.raw(name).flags.writeable
        assert m.raw("tied_a").tobytes() == m.raw("tied_b").tobytes()
    assert load_torch(tmp_path / "m.safetensors").legacy is False
    with pytest.raises(WeightsError, match="not a tensor"):
        tensor_bytes([1, 2], "x")


@torch_only
def test_torch_round_trip_keeps_the_model_digest(tmp_path):
    torch = pytest.importorskip("torch")
    from nnpatch.weights.torch_file import load_torch, save_torch_state

    torch.save({"state_dict": _torch_state(torch)}, tmp_path / "a.pt")
    with open_model(tmp_path / "a.pt") as m:
        d1 = model_digest(m)
        raw = {n: (t.dtype, t.shape, m.raw(n).tobytes()) for n, t in m.tensors.items()}
        save_torch_state(tmp_path / "b.pt", raw, like=m.checkpoint)
    assert load_torch(tmp_path / "b.pt").wrapper == "state_dict"
    with open_model(tmp_path / "b.pt") as m2:
        assert model_digest(m2) == d1
        assert {n: m2.raw(n).tobytes() for n in m2.tensors} == {n: v[2] for n, v in raw.items()}
    # the same weights as safetensors (where numpy-free dtypes allow) have the same digest
    write_safetensors(tmp_path / "c.safetensors", raw)
    assert _digest_of(tmp_path / "c.safetensors") == d1[0]
    # and torch.Tensor values are accepted too; no temporary file is left behind
    save_torch_state(tmp_path / "d.pt", _torch_state(torch))
    assert _digest_of(tmp_path / "d.pt") == d1[0]
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt", "c.safetensors", "d.pt"]


@torch_only
def test_torch_legacy_format_and_module_metadata(tmp_path):
    torch = pytest.importorskip("torch")
    from nnpatch.weights.torch_file import load_torch, save_torch_state

    sd = torch.nn.Linear(3, 2).state_dict()
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert sniff(tmp_path / "old.pth") == "pytorch"
    ck = load_torch(tmp_path / "old.pth")
    assert ck.legacy and ck.module_metadata is not None
    with open_model(tmp_path / "old.pth") as m:
        d = model_digest(m)[0]
        save_torch_state(tmp_path / "new.pth", {n: (t.dtype, t.shape, m.raw(n).tobytes())
                                                 for n, t in m.tensors.items()}, like=tmp_path / "old.pth")
    ck2 = load_torch(tmp_path / "new.pth")
    assert ck2.legacy and ck2.module_metadata == ck.module_metadata
    assert _digest_of(tmp_path / "new.pth") == d


class _Evil:
    def __reduce__(self):
        return (os.getpid, ())


@torch_only
@pytest.mark.parametrize("case", ["code", "non_tensor", "not_dict", "int_key", "extra_entries"])
def test_torch_refuses_what_is_not_a_state_dict(tmp_path, case):
    torch = pytest.importorskip("torch")
    obj = {
        "code": {"w": torch.zeros(2), "evil": _Evil()},
        "non_tensor": {"w": torch.zeros(2), "epoch": 3},
        "not_dict": [torch.zeros(2)],
        "int_key": {1: torch.zeros(2)},
        "extra_entries": {"model": {"w": torch.zeros(2)}, "optimizer": {"lr": 0.1}},
    }[case]
    torch.save(obj, tmp_path / "x.pt")
    match = {"code": "weights_only", "non_tensor": "'epoch'", "not_dict": "list", "int_key": "strings",
             "extra_entries": "'optimizer'"}[case]
    with pytest.raises(WeightsError, match=match):
        open_model(tmp_path / "x.pt")


def test_torch_missing_is_a_clear_error(tmp_path, monkeypatch):
    from nnpatch.weights import torch_file

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'nnpatch\[torch\]'"):
        torch_file.load_torch(tmp_path / "x.pt")


# --- ONNX ---------------------------------------------------------------------------------------

def _onnx_mlp(onnx, *, external=False):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "fc1.weight"),  # raw_data
        helper.make_tensor("fc1.bias", TensorProto.FLOAT, [16],
                           rng.standard_normal(16).astype(np.float32).tolist()),  # float_data
        numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "fc2.weight"),
        helper.make_tensor("fc2.bias", TensorProto.FLOAT, [4], [0.5, -0.0, float("nan"), 1e-30]),
        helper.make_tensor("shape", TensorProto.INT64, [2], [1, -1]),  # int64_data
        helper.make_tensor("half", TensorProto.FLOAT16, [3],
                           np.array([1, -2, 0.5], np.float16).view(np.uint16).tolist()),  # int32_data
        helper.make_tensor("dbl", TensorProto.DOUBLE, [2], [0.1, -3.0]),  # double_data
        helper.make_tensor("small", TensorProto.INT8, [3], [-128, 0, 127]),
        helper.make_tensor("names", TensorProto.STRING, [1], [b"kept in the skeleton"]),
        numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "conv.weight"),
    ]
    then = helper.make_graph([helper.make_node("Identity", ["sub_w"], ["o"])], "then", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])],
                             [numpy_helper.from_array(np.array([1, 2], np.float32), "sub_w")])
    other = helper.make_graph([helper.make_node("Identity", ["sub_v"], ["o2"])], "else", [],
                              [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.array([3, 4], np.float32), "sub_v")])
    nodes = [
        helper.make_node("Reshape", ["X", "shape"], ["Xr"]),
        helper.make_node("Gemm", ["Xr", "fc1.weight", "fc1.bias"], ["H"], transB=1),
        helper.make_node("Relu", ["H"], ["Hr"]),
        helper.make_node("Gemm", ["Hr", "fc2.weight", "fc2.bias"], ["Y"], transB=1),
        helper.make_node("Conv", ["img", "conv.weight"], ["Z"]),
        helper.make_node("If", ["cond"], ["S"], then_branch=then, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 1, 5, 5]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("Z", TensorProto.FLOAT, [1, 2, 3, 3]),
         helper.make_tensor_value_info("S", TensorProto.FLOAT, [2])],
        inits,
    )
    model = helper.make_model(graph, producer_name="nnpatch-test", opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_onnx_rebuild_is_byte_identical(tmp_path):
    onnx = pytest.importorskip("onnx")
    from nnpatch.weights.onnx_file import load_onnx, rebuild_external, rebuild_onnx

    onnx.save(_onnx_mlp(onnx), tmp_path / "m.onnx")
    original = (tmp_path / "m.onnx").read_bytes()
    skeleton, tensors = load_onnx(tmp_path / "m.onnx")
    storage = {n: t.storage for n, t in tensors.items()}
    assert storage == {"fc1.weight": "raw_data", "fc1.bias": "float_data", "fc2.weight": "raw_data",
                       "fc2.bias": "float_data", "shape": "int64_data", "half": "int32_data",
                       "dbl": "double_data", "small": "int32_data", "conv.weight": "raw_data",
                       "sub_w": "raw_data", "sub_v": "raw_data"}
    assert "names" not in tensors  # strings stay in the skeleton
    assert tensors["fc1.weight"].data not in skeleton and tensors["conv.weight"].data not in skeleton
    # NaN and -0.0 in float_data come out as their exact bits
    assert tensors["fc2.bias"].data == np.array([0.5, -0.0, np.nan, 1e-30], np.float32).tobytes()
    assert tensors["small"].data == np.array([-128, 0, 127], np.int8).tobytes()
    assert rebuild_onnx(skeleton, tensors) == original
    assert rebuild_onnx(skeleton, {n: tuple(t) for n, t in tensors.items()}) == original
    assert rebuild_external(skeleton, tensors) == {}
    with open_model(tmp_path / "m.onnx") as m:
        assert m.kind == "onnx" and m.canonical and m.metadata["producer_name"] == "nnpatch-test"
        assert m.raw("fc1.weight").tobytes() == tensors["fc1.weight"].data
        assert model_digest(m)[0] == model_digest(m)[0]


def test_onnx_changed_weights_rebuild_to_a_valid_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from nnpatch.weights.onnx_file import load_onnx, rebuild_onnx

    onnx.save(_onnx_mlp(onnx), tmp_path / "m.onnx")
    skeleton, tensors = load_onnx(tmp_path / "m.onnx")
    new = {n: tuple(t) for n, t in tensors.items()}
    w = np.frombuffer(tensors["fc1.weight"].data, np.float32) + 1
    new["fc1.weight"] = ("F32", (16, 8), w.tobytes())
    new["fc1.bias"] = ("F32", (16,), np.arange(16, dtype=np.float32).tobytes())
    new["shape"] = ("I64", (2,), np.array([-1, 8], np.int64).tobytes())
    model = onnx.load_from_string(rebuild_onnx(skeleton, new))
    onnx.checker.check_model(model)
    got = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.array_equal(got["fc1.weight"].reshape(-1), w)
    assert np.array_equal(got["fc1.bias"], np.arange(16, dtype=np.float32))
    assert list(got["shape"]) == [-1, 8]
    assert len(model.graph.initializer[1].float_data) == 16  # stored as before: float_data
    with pytest.raises(WeightsError, match="do not fit|declares"):
        rebuild_onnx(skeleton, dict(new, shape=("I64", (3,), b"\0" * 24)))
    with pytest.raises(WeightsError, match="missing"):
        rebuild_onnx(skeleton, {k: v for k, v in new.items() if k != "shape"})


def test_onnx_external_data_rebuilds_both_files(tmp_path):
    onnx = pytest.importorskip("onnx")
    from nnpatch.weights.onnx_file import load_onnx, rebuild_external, rebuild_onnx, write_onnx

    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(_onnx_mlp(onnx), src / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=64)
    skeleton, tensors = load_onnx(src / "m.onnx")
    assert tensors["fc1.weight"].storage == "external" and tensors["fc1.weight"].location == "m.onnx.data"
    assert tensors["shape"].storage == "int64_data"
    assert rebuild_onnx(skeleton, tensors) == (src / "m.onnx").read_bytes()
    assert rebuild_external(skeleton, tensors) == {"m.onnx.data": (src / "m.onnx.data").read_bytes()}
    out = tmp_path / "out"
    out.mkdir()
    write_onnx(out / "m.onnx", skeleton, tensors)
    assert sorted(os.listdir(out)) == ["m.onnx", "m.onnx.data"]
    for name in ("m.onnx", "m.onnx.data"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    with open_model(src / "m.onnx") as m:
        assert [f.path for f in m.files] == ["m.onnx", "m.onnx.data"]
        assert m.tensors["fc1.weight"].file == "m.onnx.data"
        inline = model_digest(m)[0]
    onnx.save(_onnx_mlp(onnx), tmp_path / "inline.onnx")
    assert _digest_of(tmp_path / "inline.onnx") == inline  # where the weights live does not matter


def test_onnx_external_gaps_are_kept(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from nnpatch.weights.onnx_file import load_onnx, rebuild_external

    t = helper.make_tensor("w", TensorProto.FLOAT, [2], [0.0, 0.0])
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "w.bin"), ("offset", "4"), ("length", "8")):
        t.external_data.add(key=k, value=v)
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [t])
    onnx.save(helper.make_model(g), tmp_path / "m.onnx")
    (tmp_path / "w.bin").write_bytes(b"HEAD" + np.array([1, 2], np.float32).tobytes() + b"\0\0TAIL")
    skeleton, tensors = load_onnx(tmp_path / "m.onnx")
    assert tensors["w"].data == np.array([1, 2], np.float32).tobytes()
    assert rebuild_external(skeleton, tensors)["w.bin"] == (tmp_path / "w.bin").read_bytes()


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x"])
def test_onnx_external_location_must_stay_inside(tmp_path, location):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    t = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [t])
    d = tmp_path / "m"
    d.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4)
    onnx.save(helper.make_model(g), d / "m.onnx")
    with pytest.raises(WeightsError, match="external data location"):
        open_model(d / "m.onnx")


def test_onnx_missing_is_a_clear_error(tmp_path, monkeypatch):
    from nnpatch.weights import onnx_file

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingDependencyError, match=r"nnpatch\[onnx\]"):
        onnx_file.load_onnx(tmp_path / "m.onnx")


# --- git textconv ---------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_diff_uses_textconv(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_SYSTEM=os.devnull, GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", HOME=str(tmp_path))

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "diff.nnpatch.textconv", f"{sys.executable} -m nnpatch textconv")
    (repo / ".gitattributes").write_text("*.safetensors diff=nnpatch\n")
    t = _tensors()
    write_safetensors(repo / "model.safetensors", t)
    git("add", ".")
    git("commit", "-qm", "v1")
    rng = np.random.default_rng(9)
    t["layer.1.w"] = ("F32", (8, 8), float_like(rng, "F32", (8, 8)))
    write_safetensors(repo / "model.safetensors", t)
    out = git("diff")
    assert "Binary files" not in out
    changed = [line for line in out.splitlines() if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))]
    assert any(line.startswith("-layer.1.w  F32  8x8") for line in changed)
    assert any(line.startswith("+layer.1.w  F32  8x8") for line in changed)
    assert any(line.startswith("-model blake3:") for line in changed)
    assert not any("layer.0.w" in line for line in changed)
