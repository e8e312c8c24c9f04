"""GGUF in place behind the undo journal, native (issue 24; spec/JOURNAL.md 1.1): the journal
nnpatch-apply writes is byte for byte Python's, each implementation recovers the other's, and a
journal that names another skeleton or a table that lies is refused and kept (the Python half is
tests/test_gguf_inplace.py)."""

from __future__ import annotations

import os

import pytest

from nnpatch.applier import recover
from nnpatch.applier.journal import journal_path

from ..conftest import read
from ..test_gguf_inplace import _replant, crash_at, gguf_pair  # noqa: F401 (the fixture)
from .test_native_inplace import kill_native_after_journal


def test_native_journal_is_byte_identical_to_pythons(native_test, gguf_pair, tmp_path):
    old, new, patch, model = gguf_pair("rows")
    kill_native_after_journal(native_test, model, patch)
    assert read(model) == read(old)
    native_journal = read(journal_path(str(model)))
    twin = tmp_path / "twin" / "model.gguf"
    twin.parent.mkdir()
    twin.write_bytes(read(old))
    crash_at("journal", twin, patch)
    assert read(journal_path(str(twin))) == native_journal


def test_native_journal_after_the_writes_recovered_by_python(hooked_impl, gguf_pair):
    old, new, patch, model = gguf_pair("dense")
    kill_native_after_journal(hooked_impl, model, patch, new=read(new))
    assert "rolled back" in recover(str(model))
    assert read(model) == read(old) and not os.path.lexists(journal_path(str(model)))


@pytest.mark.parametrize("how", ["--recover", "--in-place"])
def test_python_journal_recovered_by_native(native_impl, gguf_pair, how):
    old, new, patch, model = gguf_pair("rows")
    inode = os.stat(model).st_ino
    crash_at("synced", model, patch)
    assert read(model) == read(new)
    r = native_impl.run(*((how, model) if how == "--recover" else (how, model, patch)))
    assert r.returncode == 0, r.stderr
    assert read(model) == read(old if how == "--recover" else new)
    assert os.stat(model).st_ino == inode and not os.path.lexists(journal_path(str(model)))


def _shift(_, entries):
    entries[0].offset -= 32


@pytest.mark.parametrize("edit,code", [
    (lambda meta, _: meta["model"].update(skeleton_blake3="0" * 64), 4),
    (lambda meta, _: meta["model"].update(extents=meta["model"]["extents"][:-2]), 3),
    (lambda meta, _: meta["model"].update(extents=meta["model"]["extents"].upper()), 3),
    (_shift, 3),
])
def test_native_refuses_a_lying_journal_and_keeps_it(native_impl, gguf_pair, edit, code):
    old, new, patch, model = gguf_pair("rows")
    crash_at("synced", model, patch)
    _replant(model, edit)
    before = read(journal_path(str(model)))
    r = native_impl.run("--recover", model)
    assert r.returncode == code, r.stderr
    assert read(journal_path(str(model))) == before and read(model) == read(new)


def test_native_refuses_a_wrong_base_before_anything_is_written(native_impl, gguf_pair, tmp_path):
    old, new, patch, model = gguf_pair("rows")
    from ..gguf_pairs import make_model, variant, write
    other = tmp_path / "other.gguf"
    write(other, variant(make_model(tmp_path / "unused.gguf"), "dense"))
    model.write_bytes(read(other))
    r = native_impl.run("--in-place", model, patch)
    assert r.returncode == 4 and b"wrong base" in r.stderr, r.stderr
    assert read(model) == read(other) and os.listdir(model.parent) == ["model.gguf"]
