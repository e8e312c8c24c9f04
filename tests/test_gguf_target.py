"""GGUF through the ``extents`` target (format 1.4): real files written by gguf-py, patched and
rebuilt byte for byte; crafted GGUF files and crafted extent tables refused with one line before
anything is written."""

from __future__ import annotations

import os
import struct

import blake3
import pytest
from click.testing import CliRunner

from nnpatch.errors import WeightsError
from nnpatch.weights.extents import Extent, decode_table, encode_table
from nnpatch.weights.sniff import open_model, sniff

from . import craft
from .gguf_pairs import Q, gguf, make_model, variant, write

from nnpatch.cli import cli as group  # noqa: E402  (after the importorskip in gguf_pairs)


def b3(path) -> str:
    with open(path, "rb") as f:
        return blake3.blake3(f.read()).hexdigest()


def cli(_, *args) -> tuple[int, str]:
    """(exit code, output) of the nnpatch command with ``args``."""
    r = CliRunner().invoke(group, list(map(str, args)))
    return r.exit_code, r.output


@pytest.fixture
def pair(tmp_path):
    def make(kind: str, **kw):
        a, b = tmp_path / f"a-{kind}.gguf", tmp_path / f"b-{kind}.gguf"
        w = make_model(a, **kw)
        if kind == "kv":
            write(b, w, kv={"general.description": "tuned"}, **kw)
        elif kind == "retyped":  # re-quantized from Q4_0 to Q8_0: its extent moves, a new file is written
            write(b, w, types={"blk.0.attn_q.weight": Q.Q8_0}, **kw)
        else:
            write(b, variant(w, kind), **kw)
        return a, b
    return make


@pytest.mark.parametrize("kind", ["rows", "dense", "added", "removed", "kv", "retyped"])
@pytest.mark.parametrize("alignment", [None, 64])
def test_roundtrip_exact(pair, tmp_path, kind, alignment):
    a, b = pair(kind, alignment=alignment)
    p, out = tmp_path / "p.nnp", tmp_path / "out.gguf"
    code, text = cli(None, "diff", a, b, "-o", p)
    assert code == 0, text
    code, text = cli(None, "apply", a, p, "-o", out)
    assert code == 0, text
    assert out.read_bytes() == b.read_bytes()
    assert b3(out) == b3(b)
    code, text = cli(None, "verify", p, "--base", a, "--target", out)
    assert code == 0, text
    # a GGUF consumer reads the patched file as the target
    r_out, r_b = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(b))
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in r_out.tensors] == \
           [(t.name, t.tensor_type, t.data.tobytes()) for t in r_b.tensors]


def test_reader_agrees_with_gguf_py(tmp_path):
    path = tmp_path / "m.gguf"
    make_model(path, alignment=128)
    assert sniff(path) == "gguf"
    r = gguf.GGUFReader(str(path))
    with open_model(path) as m:
        assert {e.name: (e.offset, e.size, e.type) for e in m.extents} == \
               {t.name: (t.data_offset, t.n_bytes, t.tensor_type.name) for t in r.tensors}
        for t in r.tensors:
            assert m.raw(t.name).tobytes() == t.data.tobytes()
        q = m.tensors["blk.0.attn_q.weight"]  # Q4_0 [48, 64]: a row is 64 / 32 blocks of 18 bytes
        assert (q.dtype, q.shape) == ("U8", (48, 36))
        assert m.tensors["blk.0.attn_k.weight"].shape == (40, 64)


def test_patch_size_rows(pair, tmp_path):
    a, b = pair("rows")
    p = tmp_path / "p.nnp"
    assert cli(None, "diff", a, b, "-o", p)[0] == 0
    assert os.path.getsize(p) < 0.35 * os.path.getsize(b)


def test_patch_is_1_4_and_an_older_reader_refuses_it(pair, tmp_path):
    a, b = pair("rows")
    p = tmp_path / "p.nnp"
    assert cli(None, "diff", a, b, "-o", p, "--aligned")[0] == 0  # packed, it would be 1.5
    h = craft.decode_patch(p.read_bytes())
    assert h["_version"] == [1, 4]
    assert h["base"]["format"] == h["target"]["format"] == "extents"


# --- crafted GGUF files -----------------------------------------------------------------------------

def _gguf_bytes(tensors, *, kv=b"", n_kv=0, version=3, alignment=32, data=b""):
    """A GGUF file from parts: ``tensors`` as (name, ne, type, offset)."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), n_kv), kv]
    for name, ne, t, off in tensors:
        n = name.encode()
        out += [struct.pack("<Q", len(n)), n, struct.pack("<I", len(ne)), struct.pack(f"<{len(ne)}Q", *ne),
                struct.pack("<IQ", t, off)]
    head = b"".join(out)
    head += b"\0" * (-len(head) % alignment)
    return head + data


CRAFTED = {
    "offset past the end": (_gguf_bytes([("w", [4, 4], 0, 0)], data=b"\0" * 32), "runs past the end"),
    "overlapping tensors": (_gguf_bytes([("w", [4, 4], 0, 0), ("v", [4, 4], 0, 32)], data=b"\0" * 96), "overlap"),
    "unaligned offset": (_gguf_bytes([("w", [4], 0, 4)], data=b"\0" * 64), "not a multiple of the alignment"),
    "absurd tensor count": (b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 0) + b"\0" * 64, "cannot fit"),
    "absurd KV count": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 62) + b"\0" * 64, "cannot fit"),
    "absurd string": (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1 << 63) + b"\0" * 64, "runs past the end"),
    "absurd array": (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1) + b"k" + struct.pack("<IIQ", 9, 4, 1 << 60)
                     + b"\0" * 64, "more than the rest of the file"),
    "unknown type": (_gguf_bytes([("w", [4], 99, 0)], data=b"\0" * 64), "unknown GGML type"),
    "dims not whole blocks": (_gguf_bytes([("w", [33, 2], 8, 0)], data=b"\0" * 256), "blocks"),
    "duplicate name": (_gguf_bytes([("w", [4], 0, 0), ("w", [4], 0, 32)], data=b"\0" * 64), "twice"),
    "too many dims": (_gguf_bytes([("w", [1, 1, 1, 1, 1], 0, 0)], data=b"\0" * 32), "dimensions"),
    "version 1": (_gguf_bytes([], version=1), "version 1"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_gguf_refused(tmp_path, case):
    data, why = CRAFTED[case]
    bad, good = tmp_path / "bad.gguf", tmp_path / "good.gguf"
    bad.write_bytes(data)
    make_model(good)
    with pytest.raises(WeightsError, match=why):
        open_model(bad)
    for args in (("diff", bad, good, "-o", tmp_path / "p"), ("diff", good, bad, "-o", tmp_path / "p")):
        code, text = cli(None, *args)
        assert code == 3, text
        assert text.count("Error:") == 1 and "Traceback" not in text
        assert not (tmp_path / "p").exists()


# --- crafted extent tables ----------------------------------------------------------------------

def test_table_roundtrip_and_rules():
    ex = [Extent("a", 64, 32, 8, "F32"), Extent("b", 96, 18, 18, "Q8_0")]
    size, got = decode_table(encode_table(200, ex))
    assert (size, got) == (200, ex)
    for bad, why in [([Extent("a", 64, 32, 8, "F32"), Extent("b", 90, 18, 18, "Q8_0")], "overlaps"),
                     ([Extent("a", 190, 32, 8, "F32")], "past the end"),
                     ([Extent("a", 0, 30, 8, "F32")], "whole rows"),
                     ([Extent("a", 0, 8, 8, "F32"), Extent("a", 8, 8, 8, "F32")], "twice"),
                     ([Extent("a", 0, 8, 8, "F 32")], "type")]:
        with pytest.raises(ValueError, match=why):
            decode_table(encode_table(200, bad))
    with pytest.raises(ValueError, match="claims"):
        decode_table(b"NNPEXT1\x00" + struct.pack("<QQ", 10, 1 << 40))


def _edit_table(h: dict, edit) -> None:
    raw = craft.section_bytes(h["target"]["extents"])
    size, ex = decode_table(raw)
    size, ex = edit(size, ex)
    raw = encode_table(size, ex)
    h["target"]["extents"].update(craft.section(raw))


@pytest.mark.parametrize("case", ["overlap", "past-end", "skeleton-lies", "wrong-size", "missing"])
def test_crafted_extents_refused_before_writing(pair, tmp_path, case):
    a, b = pair("rows")
    p, out = tmp_path / "p.nnp", tmp_path / "out.gguf"
    assert cli(None, "diff", a, b, "-o", p)[0] == 0
    h = craft.decode_patch(p.read_bytes())
    version = tuple(h.pop("_version"))
    if case == "overlap":
        _edit_table(h, lambda s, ex: (s, [ex[0], Extent(ex[1].name, ex[0].offset + 32, ex[1].size, ex[1].row_bytes,
                                                       ex[1].type)] + ex[2:]))
    elif case == "past-end":
        _edit_table(h, lambda s, ex: (s, ex[:-1] + [Extent(ex[-1].name, s, ex[-1].size, ex[-1].row_bytes,
                                                           ex[-1].type)]))
    elif case == "skeleton-lies":
        _edit_table(h, lambda s, ex: (s + 32, ex))
        h["target"]["outputs"][0]["size"] += 32
    elif case == "wrong-size":
        _edit_table(h, lambda s, ex: (s, [Extent(ex[0].name, ex[0].offset, ex[0].size - ex[0].row_bytes,
                                                 ex[0].row_bytes, ex[0].type)] + ex[1:]))
    else:
        _edit_table(h, lambda s, ex: (s, ex[1:]))
    p.write_bytes(craft.encode_patch(h, version=version))
    code, text = cli(None, "apply", a, p, "-o", out)
    assert code == 3, text
    assert text.count("Error:") == 1 and "Traceback" not in text
    assert not out.exists()
    assert [f for f in os.listdir(tmp_path) if f.startswith(".") or f.endswith(".tmp")] == []


@pytest.mark.parametrize("in_place", [False, True])
def test_release_and_update(pair, tmp_path, in_place):
    """A release feed of GGUF versions: the manifest names the GGUF file's digest, which the patch
    writes (its outputs[0]), and update brings a device's model to it byte for byte."""
    a, b = pair("rows")
    rel, model = tmp_path / "rel", tmp_path / "dev" / "model.gguf"
    model.parent.mkdir()
    model.write_bytes(a.read_bytes())
    code, text = cli(None, "release", a, "--to", b, "-o", rel)
    assert code == 0, text
    code, text = cli(None, "update", model, "--manifest", rel / "manifest.json",
                     "--in-place" if in_place else "--no-in-place")
    assert code == 0, text
    assert model.read_bytes() == b.read_bytes()
