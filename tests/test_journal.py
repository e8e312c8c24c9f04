"""The undo journal as untrusted input (spec/JOURNAL.md, Trust): what recover refuses, that a refusal
writes nothing and keeps the journal, and that a journal the writer made still rolls back.

tests/test_crafted.py runs hand-crafted journals through the CLI; these start from journals the real
writer made (a crash in the middle of an in-place apply) and edit them, trailer recomputed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct

import blake3
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnpatch
from nnpatch.applier import apply_in_place, recover
from nnpatch.applier import journal as jmod
from nnpatch.applier.journal import journal_path, max_journal_size
from nnpatch.errors import InvalidJournal
from nnpatch.errors import IntegrityError, NnpatchError, NnpatchIOError, UsageError

from .conftest import read, save
from .test_inplace import crash_at, same_layout  # noqa: F401  (same_layout is a fixture)

PRE = jmod.PREAMBLE


def split(journal: bytes) -> tuple[tuple, dict, bytes]:
    """(preamble fields, header object, entry data) of a journal."""
    fields = PRE.unpack_from(journal, 0)
    hlen = fields[-1]
    return fields, json.loads(journal[PRE.size:PRE.size + hlen]), journal[PRE.size + hlen:-jmod.TRAILER]


def join(fields: tuple, header: bytes, body: bytes) -> bytes | None:
    """A journal with the same layout (header padded to its old length) and a valid trailer; None when the
    header no longer fits, which would move every entry."""
    hlen = fields[-1]
    if len(header) > hlen:
        return None
    out = PRE.pack(*fields[:-1], hlen) + header + b" " * (hlen - len(header)) + body
    return out + blake3.blake3(out).digest()


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@pytest.fixture
def crashed(same_layout):  # noqa: F811
    """A model left half-written (crash after tensor a was written) and the journal the writer left."""
    old, new, patch, model = same_layout
    crash_at("write:a", model, patch)
    return model, read(old), read(model), read(journal_path(model))


def plant(model: str, mix: bytes, journal: bytes) -> None:
    with open(model, "r+b") as f:
        f.write(mix)
    with open(journal_path(model), "wb") as f:
        f.write(journal)


def outcome(model: str, old: bytes, mix: bytes, journal: bytes) -> str:
    """Recover; the only two acceptable ends: rolled back to exactly OLD, or refused with nothing written
    and the journal kept."""
    try:
        recover(model)
    except NnpatchError as e:
        assert read(model) == mix, f"refused ({e}) but the model was written"
        assert read(journal_path(model)) == journal, f"refused ({e}) but the journal is gone or changed"
        assert "\n" not in str(e)
        return type(e).__name__
    assert read(model) == old
    assert not os.path.exists(journal_path(model))
    return "recovered"


def test_writer_journal_recovers(crashed):
    model, old, mix, journal = crashed
    assert mix != old
    plant(model, mix, journal)
    assert outcome(model, old, mix, journal) == "recovered"


def test_minor_version_and_unknown_top_level_keys_are_accepted(crashed):
    model, old, mix, journal = crashed
    fields, header, body = split(journal)
    header["x-later-minor"] = {"note": [1, 2]}
    j = join((fields[0], 1, 7, *fields[3:]), canonical(header), body)
    plant(model, mix, j)
    assert outcome(model, old, mix, j) == "recovered"


def _paths(node, prefix=()) -> list[tuple]:
    """Every key path into the header's objects and arrays (which earlier edits may have reshaped)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out = []
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


VALUES = st.one_of(
    st.integers(-(2**70), 2**70), st.integers(-70, 70), st.booleans(), st.none(),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.just([]), st.just({}),
    st.sampled_from(["a" * 64, "0" * 63, "A" * 64, "a", "e", "d", "ghost"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_edited_writer_journals_recover_exactly_or_write_nothing(crashed, data):
    """Random edits of a real journal's JSON fields (and bytes of its entry data), trailer recomputed:
    recover either gives exactly OLD or refuses with an NnpatchError, the model unwritten, the journal kept."""
    model, old, mix, journal = crashed
    fields, header, body = split(journal)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = _paths(header)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="field")
        where = header
        for k in path[:-1]:
            where = where[k]
        how = data.draw(st.sampled_from(["set", "nudge", "delete", "add"]), label="how")
        if how == "delete" and isinstance(where, dict):
            del where[path[-1]]
        elif how == "add" and isinstance(where, dict):
            where[data.draw(st.text(min_size=1, max_size=4), label="new key")] = data.draw(VALUES)
        elif how == "nudge" and type(where[path[-1]]) is int:
            where[path[-1]] += data.draw(st.sampled_from([-64, -16, -8, -4, -1, 1, 4, 8, 16, 64]), label="by")
        else:
            where[path[-1]] = data.draw(VALUES, label="value")
    body = bytearray(body)
    if data.draw(st.booleans(), label="flip a data byte"):
        i = data.draw(st.integers(0, len(body) - 1), label="at")
        body[i] ^= data.draw(st.integers(1, 255), label="xor")
    j = join(fields, canonical(header), bytes(body))
    if j is None:
        return
    plant(model, mix, j)
    outcome(model, old, mix, j)


def test_flipped_data_bytes_are_refused_before_writing(crashed):
    """A journal whose old bytes are not the base's (an index or a datum off) never writes: the digest
    of the rolled-back tensor is computed before the first byte goes back."""
    model, old, mix, journal = crashed
    fields, header, body = split(journal)
    e = header["entries"][0]
    start = e["data_at"] - PRE.size - fields[-1]
    for at in (start, start + e["unit"] * e["count"] - 1):
        b = bytearray(body)
        b[at] ^= 1
        j = join(fields, canonical(header), bytes(b))
        plant(model, mix, j)
        assert outcome(model, old, mix, j) == "IntegrityError"


def test_journal_of_a_different_model_with_the_same_layout_writes_nothing(same_layout, tmp_path):  # noqa: F811
    """A stale journal beside a model replaced by another checkpoint of the same architecture (same size and
    header): rolling back would give neither OLD nor NEW, so nothing is written and the journal kept."""
    old, new, patch, model = same_layout
    crash_at("journal", model, patch)
    rng = np.random.default_rng(1)
    other = {"a": ("F32", (128, 64), rng.standard_normal((128, 64)).astype("<f4").tobytes()),
             "b": ("F16", (40, 24), rng.standard_normal((40, 24)).astype("<f2").tobytes()),
             "c": ("F32", (50,), rng.standard_normal(50).astype("<f4").tobytes()),
             "d": ("U8", (33,), bytes(33))}
    save(tmp_path / "other.safetensors", other, {"v": "1"})
    shutil.copyfile(tmp_path / "other.safetensors", model)
    before, journal = read(model), read(journal_path(model))
    with pytest.raises(IntegrityError, match="does not roll tensor"):
        recover(model)
    assert read(model) == before and read(journal_path(model)) == journal
    with pytest.raises(IntegrityError):  # and the next in-place apply refuses the same way
        apply_in_place(model, patch)
    assert read(model) == before


def test_nonzero_flags_are_refused(crashed):
    model, old, mix, journal = crashed
    fields, header, body = split(journal)
    j = join((*fields[:3], 1, fields[4]), canonical(header), body)
    plant(model, mix, j)
    assert outcome(model, old, mix, j) == "InvalidJournal"


def test_a_fifo_journal_is_refused_without_blocking(same_layout):  # noqa: F811
    old, new, patch, model = same_layout
    os.mkfifo(journal_path(model))
    signal.alarm(20)  # a reader that opens it blocking would hang here
    try:
        with pytest.raises(InvalidJournal, match="not a regular file"):
            recover(model)
    finally:
        signal.alarm(0)
    assert read(model) == read(old)


def test_a_journal_larger_than_any_for_the_model_is_refused_unhashed(same_layout):  # noqa: F811
    old, new, patch, model = same_layout
    with open(journal_path(model), "wb") as f:  # sparse: hashing it would take minutes
        f.truncate(max_journal_size(os.path.getsize(model)) + 1 + (1 << 40))
    with pytest.raises(InvalidJournal, match="more than any journal"):
        recover(model)
    assert read(model) == read(old) and os.path.exists(journal_path(model))


def test_writer_refuses_a_header_the_reader_would_refuse(same_layout, monkeypatch):  # noqa: F811
    old, new, patch, model = same_layout
    monkeypatch.setattr(jmod, "MAX_HEADER_LEN", 200)
    with pytest.raises(UsageError, match="too many tensors"):
        apply_in_place(model, patch)
    assert read(model) == read(old)
    assert not os.path.exists(journal_path(model)) and not os.path.exists(journal_path(model) + ".tmp")


def test_journal_beside_a_directory_is_refused(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (tmp_path / "model.nnpatch-journal").write_bytes(b"x" * 100)
    with pytest.raises(UsageError, match="not a file"):
        recover(d)
    assert (tmp_path / "model.nnpatch-journal").exists()


def test_uncommitted_journal_that_is_a_directory_fails_cleanly(same_layout):  # noqa: F811
    old, new, patch, model = same_layout
    os.mkdir(journal_path(model) + ".tmp")
    with pytest.raises(NnpatchIOError, match="cannot remove"):
        recover(model)
    assert read(model) == read(old)


def test_large_tensors_roll_back_slice_by_slice(tmp_path):
    """Tensors over the 16 MiB slice of the pre-write digest: rows across several slices, and a whole
    tensor (one unit over 8 MiB) hashed where it lies."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((4500, 1024)).astype("<f4")  # ~17.6 MiB, 4 KiB rows
    whole = rng.standard_normal(9 << 18).astype("<f4")  # 9 MiB
    rows2 = rows.copy()
    rows2[[0, 1, 2000, 4095, 4096, 4499]] += np.float32(1e-2)
    whole2 = rng.standard_normal(whole.shape).astype("<f4")
    o = save(tmp_path / "old.safetensors", {"r": ("F32", rows.shape, rows.tobytes()),
                                            "w": ("F32", whole.shape, whole.tobytes())})
    n = save(tmp_path / "new.safetensors", {"r": ("F32", rows.shape, rows2.tobytes()),
                                            "w": ("F32", whole.shape, whole2.tobytes())})
    p = str(tmp_path / "p.nnpatch")
    nnpatch.diff(o, n, p)
    m = str(tmp_path / "m.safetensors")
    shutil.copyfile(o, m)
    crash_at("synced", m, p)
    assert read(m) == read(n)
    _, header, _ = split(read(journal_path(m)))
    units = {e["name"]: (e["unit"], e["count"]) for e in header["entries"]}
    assert units == {"r": (4096, 6), "w": (whole.nbytes, 1)}
    assert recover(m) is not None
    assert read(m) == read(o) and not os.path.exists(journal_path(m))


def test_model_header_length_is_the_real_one(crashed):
    """header_len is compared with 8 + the u64 at offset 0 of the model, so a shorter prefix with its own
    digest (0 bytes, or just the 8 length bytes) names no model."""
    model, old, mix, journal = crashed
    fields, header, body = split(journal)
    for n in (0, 8, header["model"]["header_len"] - 1):
        header["model"].update(header_len=n, header_blake3=blake3.blake3(mix[:n]).hexdigest())
        j = join(fields, canonical(header), body)
        plant(model, mix, j)
        assert outcome(model, old, mix, j) == "IntegrityError"
    assert struct.unpack_from("<Q", mix)[0] + 8 == split(journal)[1]["model"]["header_len"]
