"""LiteRT/TFLite through the ``extents`` target (format 1.4): real files converted by litert-torch
(tests/data/tflite), in both storage modes (inline ``Buffer.data``; ``Buffer.offset/size``), patched
and rebuilt byte for byte, then run by LiteRT's interpreter; crafted flatbuffers refused with one
line before anything is written. The native applier's side is tests/native/test_native_tflite.py."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import blake3
import numpy as np
import pytest
from click.testing import CliRunner

from nnpatch.errors import WeightsError
from nnpatch.patchfile import read_patch
from nnpatch.weights.extents import skeleton_of
from nnpatch.weights.sniff import open_model, sniff

from .tflite_files import PAIRS, fixture, flatbuffer_utils, offset_mode, outputs, schema

from nnpatch.cli import cli as group  # noqa: E402  (after the importorskip in tflite_files)

MODES = ["inline", "offset"]


def b3(path) -> str:
    return blake3.blake3(Path(path).read_bytes()).hexdigest()


def cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(group, list(map(str, args)))
    return r.exit_code, r.output


def files(tmp_path, base: str, target: str, mode: str):
    """The pair's files in ``mode``: the committed (inline) fixtures, or both written by offset."""
    if mode == "inline":
        return fixture(base), fixture(target)
    return (offset_mode(fixture(base), str(tmp_path / f"{base}.off.tflite")),
            offset_mode(fixture(target), str(tmp_path / f"{target}.off.tflite")))


def assert_same_outputs(a, b) -> None:
    for x, y in zip(outputs(str(a)), outputs(str(b)), strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("base,target", PAIRS, ids=[t for _, t in PAIRS])
def test_roundtrip_exact_and_runs(tmp_path, base, target, mode):
    a, b = files(tmp_path, base, target, mode)
    p, out = tmp_path / "p.nnp", tmp_path / "out.tflite"
    code, text = cli("diff", a, b, "-o", p)
    assert code == 0, text
    code, text = cli("apply", a, p, "-o", out)
    assert code == 0, text
    assert b3(out) == b3(b)
    code, text = cli("verify", p, "--base", a, "--target", out)
    assert code == 0, text
    assert_same_outputs(out, b)
    if "channels" in target or "moved" in target:  # the base and target really compute different things
        assert any(x.tobytes() != y.tobytes() for x, y in zip(outputs(str(a)), outputs(str(b))))
    model = tmp_path / "model.tflite"  # in place, over a copy of the base
    model.write_bytes(Path(a).read_bytes())
    code, text = cli("apply", "--in-place", model, p)
    assert code == 0, text
    assert b3(model) == b3(b)


def test_chain_and_requantization(tmp_path):
    """Two patches in one pass (cnn -> channels -> moved), and float32 -> int8 (every weight changes
    dtype, its scales appear in the skeleton): exact, and the output runs as the target."""
    p1, p2, p3 = (tmp_path / f"p{i}.nnp" for i in range(3))
    out = tmp_path / "out.tflite"
    assert cli("diff", fixture("cnn"), fixture("cnn-channels"), "-o", p1)[0] == 0
    assert cli("diff", fixture("cnn-channels"), fixture("cnn-moved"), "-o", p2)[0] == 0
    code, text = cli("apply", fixture("cnn"), p1, p2, "-o", out)
    assert code == 0, text
    assert b3(out) == b3(fixture("cnn-moved"))
    assert cli("diff", fixture("cnn"), fixture("cnn-int8"), "-o", p3)[0] == 0
    assert cli("apply", fixture("cnn"), p3, "-o", out)[0] == 0
    assert b3(out) == b3(fixture("cnn-int8"))
    assert_same_outputs(out, fixture("cnn-int8"))


def test_names_a_patch_cannot_carry_key_by_index(tmp_path):
    """A name past 65,536 bytes, or not UTF-8, or repeated in its subgraph: that tensor keys by index."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(Path(fixture("cnn")).read_bytes()))
    data = [i for i, t in enumerate(model.subgraphs[0].tensors) if model.buffers[t.buffer].data is not None]
    tensors = model.subgraphs[0].tensors
    tensors[data[0]].name = b"x" * 65537
    tensors[data[1]].name = b"\xff\xfe"
    tensors[data[2]].name = tensors[data[3]].name = b"same"
    path = tmp_path / "m.tflite"
    flatbuffer_utils.write_model(model, str(path))
    with open_model(path) as m:
        assert {f"0/#{i}" for i in data[:4]} <= set(m.tensors)
        assert "4 buffers whose tensor has no unique name" in m.metadata["tflite.keys"]


@pytest.mark.parametrize("name", ["cnn", "cnn-int8", "cnn-stripped", "cnn-bias"])
def test_reader_agrees_with_the_schema(tmp_path, name):
    """Every tensor buffer nnpatch finds is the one LiteRT's generated accessors find, in both modes;
    dtypes and shapes are its first tensor's."""
    off = offset_mode(fixture(name), str(tmp_path / "off.tflite"))
    for path in (fixture(name), off):
        assert sniff(path) == "tflite"
        data = Path(path).read_bytes()
        m = schema.Model.GetRootAs(data, 0)
        seen = {}
        for s in range(m.SubgraphsLength()):
            sg = m.Subgraphs(s)
            for i in range(sg.TensorsLength()):
                t = sg.Tensors(i)
                buf = m.Buffers(t.Buffer())
                raw = (data[buf.Offset():buf.Offset() + buf.Size()] if buf.Offset() > 1
                       else buf.DataAsNumpy().tobytes() if buf.DataLength() else b"")
                if raw:
                    seen.setdefault(t.Buffer(), (s, i, t, raw))
        with open_model(path) as model:
            assert len(model.tensors) == len(seen)
            got = {bytes(model.raw(k)) for k in model.tensors}
            assert got == {raw for *_, raw in seen.values()}
            for s, i, t, raw in seen.values():
                key = f"{s}/{t.Name().decode()}" if t.Name() else f"{s}/#{i}"
                info = model.tensors[key]
                assert bytes(model.raw(key)) == raw
                assert info.shape == tuple(t.ShapeAsNumpy()) or info.dtype == "U8"
            assert model.metadata["tflite.storage"] == ("offset" if path == off else "inline")


def test_keys_rows_and_shared_buffers(tmp_path):
    """Conv (OHWI) and fully connected ([out, in]) weights go by rows, one output channel each; the
    depthwise conv ([1, H, W, C]) is one row, so its changed channels go as elements. Stripped names
    key by tensor index, and ``show`` says so."""
    p = tmp_path / "p.nnp"
    assert cli("diff", fixture("cnn"), fixture("cnn-channels"), "-o", p)[0] == 0
    with read_patch(p) as patch:
        kinds = {op.name: (op.kind, op.target.shape) for op in patch.header.ops}
    layer = "0/__main__.Cnn/torch.nn.modules.{}"
    assert kinds[layer.format("conv.Conv2d_c2;")] == ("rows", (32, 3, 3, 16))
    assert kinds[layer.format("linear.Linear_out;1")] == ("rows", (10, 32))
    assert kinds[layer.format("conv.Conv2d_dw;")][0] in ("elements", "whole")
    assert kinds[layer.format("conv.Conv2d_dw;")][1] == (1, 3, 3, 16)
    assert cli("diff", fixture("cnn-stripped"), fixture("cnn-stripped-channels"), "-o", p)[0] == 0
    with read_patch(p) as patch:
        assert all(re.fullmatch(r"0/#[0-9]+", op.name) for op in patch.header.ops)
    code, text = cli("show", p)
    assert code == 0 and "keyed by (subgraph, tensor index)" in text


def test_a_shared_buffer_changed_for_one_tensor_only(tmp_path):
    """Two tensors share a buffer in the base (as the converter shares equal constants: here the
    second conv's bias reads the fully connected layer's, both F32[32]); the target gives the conv
    its own, different bias. The patch writes the target exactly, the model runs as the target, and
    the fully connected layer keeps its bias."""
    data = bytearray(Path(fixture("cnn")).read_bytes())
    base = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    names = {t.name.decode(): i for i, t in enumerate(base.subgraphs[0].tensors)}
    fc = names["__main__.Cnn/torch.nn.modules.linear.Linear_fc;"]
    conv = names["__main__.Cnn/torch.nn.modules.conv.Conv2d_c2;1"]
    tensors = base.subgraphs[0].tensors
    own = tensors[conv].buffer
    tensors[conv].buffer = tensors[fc].buffer
    a, b, p, out = tmp_path / "a.tflite", tmp_path / "b.tflite", tmp_path / "p.nnp", tmp_path / "o.tflite"
    flatbuffer_utils.write_model(base, str(a))
    target = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    target.buffers[target.subgraphs[0].tensors[conv].buffer].data = np.full(128, 7, np.uint8)
    flatbuffer_utils.write_model(target, str(b))
    del own
    with open_model(a) as m:
        assert "1 buffers read by several tensors" in m.metadata["tflite.shared_buffers"]
    assert cli("diff", a, b, "-o", p)[0] == 0
    assert cli("apply", a, p, "-o", out)[0] == 0
    assert b3(out) == b3(b)
    assert_same_outputs(out, b)
    with open_model(a) as ma, open_model(out) as mo:
        key = "0/__main__.Cnn/torch.nn.modules.linear.Linear_fc;"
        assert mo.raw(key).tobytes() == ma.raw(key).tobytes()


def test_quantization_scales_ride_in_the_skeleton(tmp_path):
    """A per-channel int8 fine-tune changes the scales of the changed channels, which are flatbuffer
    vectors: they travel in the skeleton, the int8 rows in the ops, and the file comes out exact."""
    with open_model(fixture("cnn-int8")) as a, open_model(fixture("cnn-int8-channels")) as b:
        assert skeleton_of(a.data(), a.extents) != skeleton_of(b.data(), b.extents)
    m = schema.Model.GetRootAs(Path(fixture("cnn-int8-channels")).read_bytes(), 0)
    scales = [m.Subgraphs(0).Tensors(i).Quantization().ScaleLength() for i in range(m.Subgraphs(0).TensorsLength())
              if m.Subgraphs(0).Tensors(i).Quantization()]
    assert max(scales) > 1  # per channel


def test_hash_textconv_and_show(tmp_path):
    path = tmp_path / "model.bin"  # sniffed by its content, whatever its name
    path.write_bytes(Path(fixture("cnn-stripped")).read_bytes())
    code, text = cli("hash", "--tensors", path)
    assert code == 0 and "0/#" in text
    code, text = cli("textconv", path)
    assert code == 0 and "tflite.keys" in text and "'<subgraph>/#<tensor index>'" in text


@pytest.mark.parametrize("in_place", [False, True])
def test_release_and_update(tmp_path, in_place):
    a, b = fixture("cnn-int8"), fixture("cnn-int8-channels")
    rel, model = tmp_path / "rel", tmp_path / "dev" / "model.tflite"
    model.parent.mkdir()
    model.write_bytes(Path(a).read_bytes())
    code, text = cli("release", a, "--to", b, "-o", rel)
    assert code == 0, text
    code, text = cli("update", model, "--manifest", rel / "manifest.json",
                     "--in-place" if in_place else "--no-in-place")
    assert code == 0, text
    assert b3(model) == b3(b)


# --- crafted flatbuffers --------------------------------------------------------------------------

def _field(table, slot: int) -> int:
    """The file position of field ``slot`` of a generated accessor's table (it must be present)."""
    off = table._tab.Offset(4 + 2 * slot)
    assert off, slot
    return table._tab.Pos + off


def _crafted(tmp_path, case: str) -> bytes:
    off = offset_mode(fixture("cnn-int8"), str(tmp_path / "off.tflite"))
    data = bytearray(Path(off if case in ("offset past the end", "overlapping buffers") else fixture("cnn-int8"))
                     .read_bytes())
    m = schema.Model.GetRootAs(bytes(data), 0)
    if case == "offset past the end":
        b = next(m.Buffers(i) for i in range(m.BuffersLength()) if m.Buffers(i).Offset() > 1)
        struct.pack_into("<Q", data, _field(b, 1), len(data) - b.Size() + 1)
    elif case == "overlapping buffers":
        bs = [m.Buffers(i) for i in range(m.BuffersLength()) if m.Buffers(i).Offset() > 1]
        struct.pack_into("<Q", data, _field(bs[1], 1), bs[0].Offset() + 4)
    elif case == "buffer index past the table":
        sg = m.Subgraphs(0)
        t = next(sg.Tensors(i) for i in range(sg.TensorsLength()) if sg.Tensors(i).Buffer())
        struct.pack_into("<I", data, _field(t, 2), m.BuffersLength() + 7)
    elif case == "root offset past the end":
        struct.pack_into("<I", data, 0, len(data) + 100)
    elif case == "vtable before the file":
        struct.pack_into("<i", data, struct.unpack_from("<I", data, 0)[0], 1 << 30)
    elif case == "vector longer than the file":
        sg = m.Subgraphs(0)
        at = _field(sg, 0)
        struct.pack_into("<I", data, at + struct.unpack_from("<I", data, at)[0], 1 << 31)
    elif case == "truncated":
        del data[len(data) // 3:]
    elif case == "self-referencing tables":  # every subgraph offset points at itself, a loop for a naive reader
        sg = m.Subgraphs(0)
        at = _field(m, 2)
        vec = at + struct.unpack_from("<I", data, at)[0]
        struct.pack_into("<I", data, vec + 4, 0)
    elif case == "external buffer":
        t = m.Subgraphs(0).Tensors(0)
        assert t._tab.Offset(24) == 0  # not written by the converter: give the tensor one in a copy
        model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
        model.subgraphs[0].tensors[0].externalBuffer = 1
        data = flatbuffer_utils.convert_object_to_bytearray(model)
    return bytes(data)


CRAFTED = {"offset past the end": "runs past the end", "overlapping buffers": "overlap",
           "buffer index past the table": "past the 16 of the buffer table",
           "root offset past the end": "outside the file", "vtable before the file": "outside the file",
           "vector longer than the file": "more than the file holds", "truncated": "not a valid TFLite file",
           "self-referencing tables": "not a valid TFLite file", "external buffer": "ExternalBuffer"}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_tflite_refused(tmp_path, case):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(_crafted(tmp_path, case))
    good = fixture("cnn-int8")
    with pytest.raises(WeightsError, match=CRAFTED[case]):
        open_model(bad)
    for args in (("diff", bad, good, "-o", tmp_path / "p"), ("diff", good, bad, "-o", tmp_path / "p"),
                 ("hash", "--tensors", bad)):
        code, text = cli(*args)
        assert code == 3, text
        assert text.count("Error:") == 1 and "Traceback" not in text
        assert not (tmp_path / "p").exists()
    code, text = cli("textconv", bad)  # git diff's textconv summarizes any file, a model or not
    assert code == 0 and "not a model" in text and "not a valid TFLite file" in text
    assert sorted(os.listdir(tmp_path)) == ["bad.tflite", "off.tflite"]


def test_mutated_flatbuffers_parse_or_refuse(tmp_path):
    """Random damage to the flatbuffer structure of real files (bytes and offsets overwritten, the file
    cut short): the reader either reads the file or refuses it with WeightsError, nothing else."""
    import random

    from nnpatch.weights.tflite_file import parse

    sources = [Path(fixture("cnn-int8")).read_bytes(),
               Path(offset_mode(fixture("cnn-stripped"), str(tmp_path / "off.tflite"))).read_bytes()]
    rng = random.Random(25)
    outcomes = {"read": 0, "refused": 0}
    for _ in range(1500):
        d = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(min(len(d), 4000)) if rng.random() < 0.8 else rng.randrange(len(d))
            k = rng.random()
            if k < 0.5:
                d[pos] = rng.randrange(256)
            elif k < 0.85:
                v = rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, len(d), len(d) - 4, rng.randrange(1 << 32)])
                d[pos:pos + 4] = v.to_bytes(4, "little")
            else:
                del d[rng.randrange(len(d)):]
        try:
            parse(memoryview(bytes(d)), "x.tflite")
            outcomes["read"] += 1
        except WeightsError:
            outcomes["refused"] += 1
    assert outcomes["read"] and outcomes["refused"]
