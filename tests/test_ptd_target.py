"""ExecuTorch ``.ptd`` (named data) through the ``extents`` target (format 1.4): files written to the
documented FlatTensor layout (tests/ptd_files.py), patched by name and rebuilt byte for byte by
both appliers; crafted files refused with one line before anything is written."""

from __future__ import annotations

import struct
from pathlib import Path

import blake3
import numpy as np
import pytest
from click.testing import CliRunner

from nnpatch.errors import WeightsError
from nnpatch.patchfile import read_patch
from nnpatch.weights.sniff import open_model, sniff

from .ptd_files import HEADER, weights, write_ptd

from nnpatch.cli import cli as group  # noqa: E402


def cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(group, list(map(str, args)))
    return r.exit_code, r.output


def b3(path) -> str:
    return blake3.blake3(Path(path).read_bytes()).hexdigest()


def _named(w: dict) -> dict:
    return {**w, "blob": b"opaque backend bytes " * 7}


def _pair(tmp_path, kind: str):
    w = weights(0)
    a, b = tmp_path / "a.ptd", tmp_path / "b.ptd"
    write_ptd(a, _named(w))
    v = {k: x.copy() for k, x in w.items()}
    rng = np.random.default_rng(1)
    if kind == "rows":  # 10 % of the output channels of every weight
        for k in ("conv.weight", "linear.weight", "q.weight"):
            rows = rng.choice(v[k].shape[0], max(1, v[k].shape[0] // 10), replace=False)
            v[k][rows] = (v[k][rows] + 1).astype(v[k].dtype)
    elif kind == "dense":
        for k in ("conv.weight", "linear.weight", "emb.weight"):
            v[k] = (v[k] + rng.standard_normal(v[k].shape) * 1e-3).astype(v[k].dtype)
    elif kind == "added":
        v["extra.bias"] = rng.standard_normal(8, dtype=np.float32)
    write_ptd(b, _named(v))
    return a, b


@pytest.mark.parametrize("kind", ["rows", "dense", "added"])
def test_roundtrip_exact(tmp_path, kind):
    a, b = _pair(tmp_path, kind)
    assert sniff(a) == "ptd"
    p, out = tmp_path / "p.nnp", tmp_path / "out.ptd"
    code, text = cli("diff", a, b, "-o", p)
    assert code == 0, text
    code, text = cli("apply", a, p, "-o", out)
    assert code == 0, text
    assert b3(out) == b3(b)
    assert cli("verify", p, "--base", a, "--target", out)[0] == 0
    model = tmp_path / "m.ptd"
    model.write_bytes(a.read_bytes())
    assert cli("apply", "--in-place", model, p)[0] == 0
    assert b3(model) == b3(b)
    if kind == "rows":
        with read_patch(p) as patch:
            assert {op.name: op.kind for op in patch.header.ops}["linear.weight"] == "rows"


REAL = Path(__file__).parent / "data" / "ptd"


def test_real_executorch_pair(tmp_path):
    """Files exported by ExecuTorch 1.5.1 (tests/data/ptd/generate.py: the .pte stays the same, one
    conv channel and a bias change): read by name with the layout's dtypes, rebuilt byte for byte."""
    a, b = REAL / "v1.ptd", REAL / "v2.ptd"
    with open_model(a) as m:
        assert {k: (t.dtype, t.shape) for k, t in m.tensors.items()} == {
            "c.weight": ("F32", (8, 3, 3, 3)), "c.bias": ("F32", (8,)), "l.weight": ("F32", (4, 8)),
            "l.bias": ("F32", (4,))}
    p, out = tmp_path / "p.nnp", tmp_path / "out.ptd"
    assert cli("diff", a, b, "-o", p)[0] == 0
    with read_patch(p) as patch:
        ops = {op.name: (op.kind, op.count) for op in patch.header.ops}
    assert ops["c.weight"] == ("rows", 1) and set(ops) == {"c.weight", "l.bias"}
    assert cli("apply", a, p, "-o", out)[0] == 0
    assert b3(out) == b3(b)


def test_keys_types_and_shared_segments(tmp_path):
    w = weights(0)
    path = tmp_path / "m.ptd"
    write_ptd(path, {**_named(w), "tied.weight": None}, share={"tied.weight": "linear.weight"})
    with open_model(path) as m:
        assert set(m.tensors) == set(w) | {"blob"}  # the shared segment once, by its first key
        assert m.tensors["blob"].dtype == "U8"
        assert m.tensors["emb.weight"].dtype == "F16" and m.tensors["emb.weight"].shape == (32, 48)
        assert "1 segments named by several keys" in m.metadata["ptd.shared_segments"]
        for k, x in w.items():
            assert m.raw(k).tobytes() == x.tobytes()


def _crafted(tmp_path, case: str) -> bytes:
    data = bytearray(write_ptd(tmp_path / "good.ptd", _named(weights(0))))
    magic, length, fo, fs, base, size = HEADER.unpack_from(data, 8)
    if case == "segments past the end":
        HEADER.pack_into(data, 8, magic, length, fo, fs, base, len(data))
    elif case == "no extended header":
        data[8:12] = b"XX01"
    elif case == "segment past its data":
        HEADER.pack_into(data, 8, magic, length, fo, fs, base, 16)
    elif case == "truncated":
        del data[len(data) // 4:]
    elif case == "root offset past the end":
        struct.pack_into("<I", data, 0, len(data))
    return bytes(data)


CRAFTED = {"segments past the end": "run past the end", "no extended header": "FH01",
           "segment past its data": "runs past the 16 bytes", "truncated": "not a valid ExecuTorch .ptd file",
           "root offset past the end": "outside the file"}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_ptd_refused(tmp_path, case):
    bad = tmp_path / "bad.ptd"
    bad.write_bytes(_crafted(tmp_path, case))
    with pytest.raises(WeightsError, match=CRAFTED[case]):
        open_model(bad)
    code, text = cli("diff", bad, tmp_path / "good.ptd", "-o", tmp_path / "p")
    assert code == 3 and text.count("Error:") == 1 and "Traceback" not in text
    assert not (tmp_path / "p").exists()
