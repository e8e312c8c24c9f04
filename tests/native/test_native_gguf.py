"""GGUF (an extents target, format 1.4) through the native applier: Python's diff makes the patch,
``nnpatch-apply`` rebuilds the target byte for byte (new file, stdin, in place), for real files
written by gguf-py; crafted extent tables are refused with one line and nothing written, as the
Python applier refuses them. The C side reads no GGUF: only the patch's extent tables
(native/src/extents.c)."""

from __future__ import annotations

import filecmp
import os

import pytest

import nnpatch
from tests import craft
from tests.gguf_pairs import Q, make_model, variant, write
from tests.test_gguf_target import _edit_table
from nnpatch.weights.extents import Extent

from .native_run import assert_ok, assert_refused, leftovers
from .native_run import native as run_native


def _pair(tmp_path, kind: str, alignment=None):
    a, b, p = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "p.nnpatch"
    w = make_model(a, alignment=alignment)
    if kind == "kv":
        write(b, w, kv={"general.description": "tuned"}, alignment=alignment)
    elif kind == "retyped":
        write(b, w, types={"blk.0.attn_q.weight": Q.Q8_0}, alignment=alignment)
    else:
        write(b, variant(w, kind), alignment=alignment)
    nnpatch.diff(a, b, p)
    return a, b, p


@pytest.mark.parametrize("alignment", [None, 128])
@pytest.mark.parametrize("kind", ["rows", "dense", "added", "removed", "kv", "retyped"])
def test_native_rebuilds_the_target(native_impl, tmp_path, kind, alignment):
    a, b, p = _pair(tmp_path, kind, alignment)
    out = tmp_path / "out" / "n.gguf"
    out.parent.mkdir()
    assert_ok(run_native(native_impl, a, p, "-o", out, "--quiet"))
    assert filecmp.cmp(out, b, shallow=False)
    assert leftovers(out.parent, "n.gguf") == []
    out.unlink()
    assert_ok(run_native(native_impl, a, "-", "-o", out, "--quiet", stdin=p.read_bytes()))
    assert filecmp.cmp(out, b, shallow=False)
    # in place: behind the undo journal where the table and skeleton stay (rows, dense), the same
    # file; else a new file renamed over the model
    model = tmp_path / "out" / "m.gguf"
    model.write_bytes(a.read_bytes())
    inode = os.stat(model).st_ino
    assert_ok(run_native(native_impl, "--in-place", model, p))
    assert filecmp.cmp(model, b, shallow=False)
    assert (os.stat(model).st_ino == inode) == (kind in ("rows", "dense"))
    assert_ok(run_native(native_impl, "--check", p, "--base", a))


def test_native_refuses_a_wrong_base(native_impl, tmp_path):
    a, b, p = _pair(tmp_path, "rows")
    out = tmp_path / "n.gguf"
    assert_refused(run_native(native_impl, b, p, "-o", out), 4)
    assert not out.exists()


@pytest.mark.parametrize("case", ["overlap", "past-end", "skeleton-lies", "wrong-size", "missing", "base-overlap"])
def test_native_refuses_crafted_extents_before_writing(native_impl, tmp_path, case):
    a, b, p = _pair(tmp_path, "rows")
    h = craft.decode_patch(p.read_bytes())
    version = tuple(h.pop("_version"))

    def shift(ex, i, by):
        e = ex[i]
        return ex[:i] + [Extent(e.name, e.offset + by, e.size, e.row_bytes, e.type)] + ex[i + 1:]
    if case == "overlap":
        _edit_table(h, lambda s, ex: (s, shift(ex, 1, ex[0].end - ex[1].offset - 32)))
    elif case == "past-end":
        _edit_table(h, lambda s, ex: (s, shift(ex, len(ex) - 1, s - ex[-1].offset)))
    elif case == "skeleton-lies":
        _edit_table(h, lambda s, ex: (s + 32, ex))
        h["target"]["outputs"][0]["size"] += 32
    elif case == "wrong-size":
        _edit_table(h, lambda s, ex: (s, [Extent(ex[0].name, ex[0].offset, ex[0].size - ex[0].row_bytes,
                                                 ex[0].row_bytes, ex[0].type)] + ex[1:]))
    elif case == "missing":
        _edit_table(h, lambda s, ex: (s, ex[1:]))
    else:
        raw = craft.section_bytes(h["base"]["extents"])
        from nnpatch.weights.extents import decode_table, encode_table
        size, ex = decode_table(raw)
        h["base"]["extents"].update(craft.section(encode_table(size, shift(ex, 1, ex[0].end - ex[1].offset - 32))))
    p.write_bytes(craft.encode_patch(h, version=version))
    out = tmp_path / "o" / "n.gguf"
    out.parent.mkdir()
    r = run_native(native_impl, a, p, "-o", out)
    assert_refused(r, 3)
    assert leftovers(out.parent) == []
    with pytest.raises(nnpatch.errors.PatchFormatError) as info:  # the Python applier agrees, word for word
        nnpatch.apply(a, p, out)
    assert r.err.strip() == f"Error: {info.value}"
    assert_refused(run_native(native_impl, "--check", p), 3)


def test_native_chain_and_other_kinds(native_impl, tmp_path):
    """A chain of GGUF patches in one call; a GGUF base to a safetensors target; a safetensors base
    to a GGUF target is refused (3) with one line, nothing written (`nnpatch apply` makes it)."""
    from nnpatch.weights import write_safetensors
    from nnpatch.weights.sniff import open_model

    c0, c1, c2 = (tmp_path / f"c{i}.gguf" for i in range(3))
    w0 = make_model(c0)
    w1 = variant(w0, "rows", 1)
    write(c1, w1)
    write(c2, variant(w1, "rows", 2), kv={"general.description": "v2"})
    l1, l2 = tmp_path / "l1.nnpatch", tmp_path / "l2.nnpatch"
    nnpatch.diff(c0, c1, l1)
    nnpatch.diff(c1, c2, l2)
    out = tmp_path / "o" / "c2.gguf"
    out.parent.mkdir()
    assert_ok(run_native(native_impl, c0, l1, l2, "-o", out, "--quiet"))
    assert filecmp.cmp(out, c2, shallow=False)
    st = tmp_path / "c1.safetensors"
    with open_model(c1) as m:
        write_safetensors(st, {n: (t.dtype, t.shape, m.raw(n).tobytes()) for n, t in m.tensors.items()})
    to_st, from_st = tmp_path / "to.nnpatch", tmp_path / "from.nnpatch"
    nnpatch.diff(c0, st, to_st)
    nnpatch.diff(st, c2, from_st)
    o2 = tmp_path / "o" / "c1.safetensors"
    assert_ok(run_native(native_impl, c0, to_st, "-o", o2, "--quiet"))
    assert filecmp.cmp(o2, st, shallow=False)
    o3 = tmp_path / "o" / "x.gguf"
    assert_refused(run_native(native_impl, st, from_st, "-o", o3), 3)
    assert leftovers(out.parent, "c2.gguf", "c1.safetensors") == []
