"""GGUF in place behind the undo journal (issue 24; spec/JOURNAL.md 1.1): when the target keeps the
base's extent table and skeleton, only the changed rows are written, in the same file, and a crash at
any step recovers to the old version exactly; when either changes, a new file is renamed over it."""

from __future__ import annotations

import json
import os
import shutil

import blake3
import pytest

from nnpatch import differ
from nnpatch.applier import apply_in_place, recover
from nnpatch.applier.inplace import SimulatedCrash
from nnpatch.applier.journal import PREAMBLE, Entry, encode_header, journal_path, read_journal
from nnpatch.errors import NnpatchError

from .conftest import read
from .gguf_pairs import Q, make_model, variant, write


@pytest.fixture
def gguf_pair(tmp_path):
    def make(kind: str):
        old, new = tmp_path / "old.gguf", tmp_path / f"new-{kind}.gguf"
        w = make_model(old)
        if kind == "kv":
            write(new, w, kv={"general.description": "tuned"})
        elif kind == "retyped":
            write(new, w, types={"blk.0.attn_q.weight": Q.Q8_0})
        else:
            write(new, variant(w, kind))
        patch = tmp_path / f"{kind}.nnpatch"
        differ.diff(str(old), str(new), str(patch))
        model = tmp_path / "device" / "model.gguf"
        model.parent.mkdir(exist_ok=True)
        shutil.copyfile(old, model)
        return old, new, patch, model
    return make


def crash_at(step: str, model, patch) -> None:
    def hook(s):
        if s == step:
            raise SimulatedCrash(s)
    with pytest.raises(SimulatedCrash):
        apply_in_place(str(model), str(patch), hook=hook)


@pytest.mark.parametrize("kind", ["rows", "dense"])
def test_same_table_is_updated_in_place_behind_the_journal(gguf_pair, kind):
    old, new, patch, model = gguf_pair(kind)
    inode = os.stat(model).st_ino
    steps = []
    apply_in_place(str(model), str(patch), hook=steps.append)
    assert "journal" in steps and "synced" in steps
    assert read(model) == read(new) and os.stat(model).st_ino == inode
    assert not os.path.lexists(journal_path(str(model)))


@pytest.mark.parametrize("kind", ["kv", "retyped", "added", "removed"])
def test_a_changed_table_or_skeleton_writes_a_new_file(gguf_pair, kind):
    old, new, patch, model = gguf_pair(kind)
    steps = []
    apply_in_place(str(model), str(patch), hook=steps.append)
    assert "journal" not in steps
    assert read(model) == read(new)


@pytest.mark.parametrize("step", ["journal", "write:blk.0.attn_q.weight", "synced", "verified"])
def test_a_crash_at_any_step_recovers_the_old_file(gguf_pair, step):
    old, new, patch, model = gguf_pair("rows")
    crash_at(step, model, patch)
    jp = journal_path(str(model))
    raw = read(jp)
    magic, major, minor, _, hlen = PREAMBLE.unpack_from(raw, 0)
    assert (major, minor) == (1, 1)
    ident = json.loads(raw[PREAMBLE.size:PREAMBLE.size + hlen])["model"]
    assert sorted(ident) == ["extents", "size", "skeleton_blake3"] and ident["size"] == os.path.getsize(old)
    assert "rolled back" in recover(str(model))
    assert read(model) == read(old) and not os.path.lexists(jp)


def test_the_journal_holds_only_the_changed_rows(gguf_pair):
    old, new, patch, model = gguf_pair("rows")
    crash_at("journal", model, patch)
    j = read_journal(journal_path(str(model)), model_size=os.path.getsize(model))
    try:
        changed = sum(e.count * e.unit for e in j.entries)
        assert all(e.unit < e.nbytes for e in j.entries)  # rows, not whole tensors
        assert changed < 0.2 * os.path.getsize(old)
    finally:
        j.close()
    recover(str(model))


def _replant(model, edit) -> None:
    """The committed journal beside ``model`` re-encoded with ``edit(meta, entries)`` applied, re-trailed."""
    jp = journal_path(str(model))
    raw = read(jp)
    magic, major, minor, flags, hlen = PREAMBLE.unpack_from(raw, 0)
    meta = json.loads(raw[PREAMBLE.size:PREAMBLE.size + hlen])
    entries = meta.pop("entries")
    parts = [(raw[e["index_at"]:e["index_at"] + 8 * e["count"]], raw[e["data_at"]:e["data_at"] + e["unit"] * e["count"]])
             for e in entries]
    objs = [Entry(e["name"], e["offset"], e["nbytes"], e["unit"], e["count"], e["base_blake3"], e["target_blake3"])
            for e in entries]
    edit(meta, objs)
    header = encode_header(meta, objs)
    body = bytearray(PREAMBLE.pack(magic, major, minor, flags, len(header)) + header)
    for part in (x for pair in parts for x in pair):
        body += part + b"\0" * (-len(part) % 64)
    with open(jp, "wb") as f:
        f.write(bytes(body) + blake3.blake3(bytes(body)).digest())


def test_a_journal_naming_another_skeleton_is_refused_and_kept(gguf_pair):
    old, new, patch, model = gguf_pair("rows")
    crash_at("synced", model, patch)
    _replant(model, lambda meta, _: meta["model"].update(skeleton_blake3="0" * 64))
    before = read(journal_path(str(model)))
    with pytest.raises(NnpatchError) as info:
        recover(str(model))
    assert info.value.exit_code == 4 and "belongs to another file" in str(info.value)
    assert read(journal_path(str(model))) == before and read(model) == read(new)


def test_a_journal_whose_table_lies_is_refused(gguf_pair):
    """An extent table that does not decode (here: cut short) is refused at Trust step 2 (exit 3)."""
    old, new, patch, model = gguf_pair("rows")
    crash_at("journal", model, patch)
    _replant(model, lambda meta, _: meta["model"].update(extents=meta["model"]["extents"][:-2]))
    with pytest.raises(NnpatchError) as info:
        recover(str(model))
    assert info.value.exit_code == 3 and "extents" in str(info.value)
    assert read(model) == read(old)


def test_an_entry_outside_its_extent_is_refused(gguf_pair):
    old, new, patch, model = gguf_pair("rows")
    crash_at("journal", model, patch)
    def shift(_, entries):
        entries[0].offset -= 32
    _replant(model, shift)
    with pytest.raises(NnpatchError) as info:
        recover(str(model))
    assert info.value.exit_code == 3 and "are not the tensor's" in str(info.value)
    assert read(model) == read(old)


def test_a_wrong_base_is_refused_before_anything_is_written(gguf_pair, tmp_path):
    """Same extent table and skeleton, other tensors: the base check fails before the journal's commit."""
    old, new, patch, model = gguf_pair("rows")
    other = tmp_path / "other.gguf"
    write(other, variant(make_model(tmp_path / "unused.gguf"), "dense"))
    shutil.copyfile(other, model)
    with pytest.raises(NnpatchError) as info:
        apply_in_place(str(model), str(patch))
    assert info.value.exit_code == 4 and "wrong base" in str(info.value)
    assert read(model) == read(other) and os.listdir(model.parent) == ["model.gguf"]
