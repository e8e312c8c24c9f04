"""The qrows op (format 1.3, FORMAT.md sections 5.5 and 7.5) in the native applier, against the
Python reference: pairs made by tests/native/qrows_cases.py (specials in F32, BF16 and F16; 8- and
4-bit codes; one scale or one per row; raw and zstd sections; rows wider than the applier's piece),
diffed by ``nnpatch.diff(..., quantized=...)`` and applied by ``nnpatch-apply``: identical bytes,
through a file, a pipe, a chain of two qrows patches and an in-place update. A qrows op changes
rows, so the native journal saves the old rows as for a ``rows`` op, and journals cross between the
implementations. The vectors are in test_native_vectors.py; the sample under qemu-aarch64 (the
proof that the arithmetic is the same on ARM) in test_aarch64.py.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import nnpatch
from nnpatch.applier import recover
from nnpatch.applier.journal import journal_path, read_journal
from nnpatch.patchfile import read_patch
from nnpatch.quantdelta import QuantDelta
from nnpatch.weights import SafetensorsFile

from .. import craft
from .conftest import VECTORS
from .native_run import assert_ok, assert_refused, leftovers
from .native_run import native as run_native
from .qrows_cases import FORMATS, make_pair, quant_delta, second_link
from .test_native_inplace import kill_native_after_journal, py_crash_at

SEEDS = range(16)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def diffed(seed: int, tmp_path, *, big: bool | None = None):
    o, n, deltas = make_pair(seed, tmp_path, big=seed % 4 == 1 if big is None else big)
    p = tmp_path / f"p{seed}.nnpatch"
    nnpatch.diff(o, n, p, level=3, quantized=deltas)
    return o, n, p, deltas


def test_the_cases_reach_every_rounding_outcome(tmp_path):
    """A guard on the generator: over the seeds, each dtype has changed elements that overflow to
    infinity, land on a subnormal, cancel to zero, and start from a subnormal; NaNs and infinities are
    kept."""
    seen = {}
    for seed in range(8):
        o, n, deltas = make_pair(seed, tmp_path)
        with SafetensorsFile(o) as a, SafetensorsFile(n) as b:
            for name in deltas:
                dt = a.tensors[name].dtype
                e, m, w = FORMATS[dt]
                emax, mmask = (1 << e) - 1, (1 << m) - 1
                ow = np.frombuffer(a.bits(name), w).astype(np.int64)
                nw = np.frombuffer(b.bits(name), w).astype(np.int64)
                ex_o, ex_n = (ow >> m) & emax, (nw >> m) & emax
                ch = ow != nw
                got = seen.setdefault(dt, dict.fromkeys(("inf", "sub", "zero", "from_sub", "special_kept"), 0))
                got["inf"] += int((ch & (ex_n == emax)).sum())
                got["sub"] += int((ch & (ex_n == 0) & ((nw & mmask) != 0)).sum())
                got["zero"] += int((ch & ((nw & ((1 << (e + m)) - 1)) == 0)).sum())
                got["from_sub"] += int((ch & (ex_o == 0)).sum())
                got["special_kept"] += int(((ex_o == emax) & ~ch).sum())
                assert not (ch & (ex_o == emax)).any(), "a NaN or an infinity changed"
    for dt, got in seen.items():
        assert all(got.values()), (dt, got)


@pytest.mark.parametrize("seed", SEEDS)
def test_qrows_differential(native_impl, seed, tmp_path):
    o, n, p, _ = diffed(seed, tmp_path)
    with read_patch(p) as patch:
        assert any(op.kind == "qrows" for op in patch.ops)
    out = tmp_path / "out.safetensors"
    r = run_native(native_impl, o, p, "-o", out, "--verify", "full", "--quiet")
    assert_ok(r)
    assert read(out) == read(n), f"seed {seed}: the native qrows result differs from Python's"
    assert_ok(run_native(native_impl, "--check", p, "--base", o))


@pytest.mark.parametrize("seed", [0, 5])
def test_qrows_through_a_pipe(native_impl, seed, tmp_path):
    o, n, p, _ = diffed(seed, tmp_path, big=True)
    out = tmp_path / "out.safetensors"
    r = run_native(native_impl, o, "-", "-o", out, "--quiet", stdin=read(p), chunk=4096)
    assert_ok(r)
    assert read(out) == read(n)


@pytest.mark.parametrize("seed", [2, 3])
def test_qrows_chain_in_one_pass(native_impl, seed, tmp_path):
    o, n, p1, _ = diffed(seed, tmp_path)
    new2, d2 = second_link(seed, n, tmp_path)
    p2 = tmp_path / "link2.nnpatch"
    nnpatch.diff(n, new2, p2, quantized=d2)
    out = tmp_path / "out.safetensors"
    assert_ok(run_native(native_impl, o, p1, p2, "-o", out, "--verify", "full", "--quiet"))
    assert read(out) == read(new2)
    # the second link from a pipe
    out.unlink()
    assert_ok(run_native(native_impl, o, p1, "-", "-o", out, "--quiet", stdin=read(p2)))
    assert read(out) == read(new2)


@pytest.mark.parametrize("seed", [4, 9])
def test_qrows_in_place(native_impl, seed, tmp_path):
    o, n, p, _ = diffed(seed, tmp_path)
    model = tmp_path / "model.safetensors"
    shutil.copyfile(o, model)
    assert_ok(run_native(native_impl, "--in-place", model, p))
    assert read(model) == read(n)
    assert not os.path.lexists(journal_path(model))


@pytest.mark.parametrize("name", ["qrows-nan-scale", "qrows-padding-nibble"])
def test_bad_qrows_in_place_leaves_the_model_as_it_was(native_impl, name, tmp_path):
    """Rules checked while decoding (a scale, a padding nibble): refused, the model exactly OLD (rolled
    back from the journal if anything was written), no journal left."""
    vec = next(v for v in nnpatch_vectors()["invalid"] if v["name"] == name)
    model = tmp_path / "model.safetensors"
    shutil.copyfile(VECTORS / vec["base"], model)
    r = run_native(native_impl, "--in-place", model, VECTORS / vec["patch"])
    assert_refused(r, 3)
    assert vec["message"].split(": ", 1)[1] in r.err, r
    assert read(model) == read(VECTORS / vec["base"])
    assert not os.path.lexists(journal_path(model)) and leftovers(tmp_path, "model.safetensors") == []


def nnpatch_vectors() -> dict:
    import json

    return json.loads((VECTORS / "vectors.json").read_text())


def test_native_journal_saves_rows_and_python_recovers_it(native_test, tmp_path):
    """Killed after its journal: the native journal holds the old rows of each qrows tensor (unit = a
    row, count = the op's rows), and Python's recover rolls the model back to exactly OLD."""
    o, n, p, deltas = diffed(6, tmp_path, big=False)
    model = tmp_path / "model.safetensors"
    shutil.copyfile(o, model)
    kill_native_after_journal(native_test, model, p)
    j = read_journal(journal_path(model))
    with SafetensorsFile(o) as st:
        units = {e.name: (e.unit, e.count) for e in j.entries}
        for name, qd in deltas.items():
            info = st.tensors[name]
            assert name in units, name
            assert units[name] == (info.nbytes // info.shape[0], len(qd.rows)), name
    assert recover(model) is not None
    assert read(model) == read(o) and not os.path.lexists(journal_path(model))


def test_native_and_python_qrows_journals_are_byte_identical(native_test, tmp_path):
    """Both implementations journal a qrows tensor by its rows (JOURNAL.md: `unit` a row), so the
    journals committed for the same model and patch are the same bytes."""
    o, n, p, _ = diffed(6, tmp_path, big=False)
    model, twin = tmp_path / "model.safetensors", tmp_path / "twin" / "model.safetensors"
    twin.parent.mkdir()
    shutil.copyfile(o, model)
    shutil.copyfile(o, twin)
    kill_native_after_journal(native_test, model, p)
    py_crash_at("journal", str(twin), str(p))
    assert read(journal_path(twin)) == read(journal_path(model))


@pytest.mark.parametrize("step", ["journal", "synced"])
def test_python_qrows_journal_recovered_by_native(native_impl, step, tmp_path):
    o, n, p, _ = diffed(7, tmp_path, big=False)
    model = tmp_path / "model.safetensors"
    shutil.copyfile(o, model)
    py_crash_at(step, str(model), str(p))
    assert_ok(run_native(native_impl, "--recover", model))
    assert read(model) == read(o) and not os.path.lexists(journal_path(model))


def test_quant_delta_shapes_are_the_writers():
    """The generator's deltas are what nnpatch's writer takes (a guard against API drift)."""
    qd = quant_delta(np.random.default_rng(0), "F16", 4, 5, 7)
    assert isinstance(qd, QuantDelta) and qd.codes.shape[1] == 7 and qd.bits == 4


QROWS_VECTORS = [v for v in nnpatch_vectors()["valid"] if v["name"].startswith("qrows-")]


@pytest.mark.parametrize("vec", QROWS_VECTORS, ids=lambda v: v["name"])
def test_corrupt_qrows_sections_same_verdict_as_python(native_impl, vec, tmp_path):
    """Bytes of a qrows vector's sections changed (about 60 positions across index, scales and codes),
    the trailer recomputed: the native applier and Python's both write the same bytes, or both refuse
    with the same exit code (a non-finite scale or a padding nibble: 3; other codes: the target
    digest, 4), and the native one leaves nothing behind."""
    import blake3

    raw = read(VECTORS / vec["patch"])
    with read_patch(VECTORS / vec["patch"]) as p:
        positions = [i for op in p.ops for s in op.sections() for i in range(s.offset, s.offset + s.length)]
    rng = np.random.default_rng(len(raw))
    base = VECTORS / vec["base"]
    verdicts = set()
    for k, pos in enumerate(positions[:: max(1, len(positions) // 60)]):
        bad = bytearray(raw)
        bad[pos] ^= int(rng.integers(1, 256))
        bad[-32:] = blake3.blake3(bytes(bad[:-32])).digest()
        patch = tmp_path / f"bad{k}.nnpatch"
        patch.write_bytes(bytes(bad))
        py_out, c_dir = tmp_path / f"py{k}.safetensors", tmp_path / f"c{k}"
        c_dir.mkdir()
        try:
            nnpatch.apply(base, patch, py_out)
            py_rc = 0
        except nnpatch.NnpatchError as e:
            py_rc = e.exit_code
        r = run_native(native_impl, base, patch, "-o", c_dir / "out.safetensors", "--quiet")
        if py_rc == 0:
            assert_ok(r)
            assert read(c_dir / "out.safetensors") == read(py_out), f"byte {pos}"
        else:
            assert_refused(r, py_rc)
            assert leftovers(c_dir) == [], f"byte {pos}: a refused apply left a file behind"
        verdicts.add(py_rc)
    assert 3 in verdicts and 4 in verdicts, verdicts


def _sec(data: bytes, codec) -> dict:
    return {"codec": list(codec), "size": len(data), "_data": data}


# one rule of FORMAT.md 5.5 / 7.5 broken in the header of qrows-f32's op `op` (0: w4, 1: w8)
HEADER_EDITS = {
    "bits-missing": lambda op: op.pop("bits"),
    "bits-string": lambda op: op.update(bits="8"),
    "bits-0": lambda op: op.update(bits=0),
    "bits-16": lambda op: op.update(bits=16),
    "bits-huge": lambda op: op.update(bits=1 << 63),
    "scales-missing": lambda op: op.pop("scales"),
    "scales-xor": lambda op: op["scales"].update(codec=["xor"]),
    "scales-esort": lambda op: op["scales"].update(codec=["esort"]),
    "scales-planes": lambda op: op["scales"].update(codec=["planes"]),
    "scales-zstd-twice": lambda op: op["scales"].update(codec=["zstd", "zstd"]),
    "scales-unknown": lambda op: op["scales"].update(codec=["lz4"]),
    "scales-empty": lambda op: op.update(scales=_sec(b"", [])),
    "scales-one-too-many": lambda op: op.update(scales=_sec(b"\0" * (4 * op["count"] + 4), [])),
    "scales-zstd": lambda op: op.update(scales=_sec(craft.zstd(craft.section_bytes(op["scales"])), ["zstd"])),
    "values-zadd": lambda op: op["values"].update(codec=["zadd"]),
    "values-esort-zstd": lambda op: op["values"].update(codec=["xor", "esort", "zstd"]),
    "base-values": lambda op: op.update(base_values=_sec(b"\0" * 4, [])),
    "count-0": lambda op: op.update(count=0),
    "count-over": lambda op: op.update(count=op["target"]["shape"][0] + 1),
    "dtype-f64": lambda op: (op["base"].update(dtype="F64"), op["target"].update(dtype="F64")),
    "dtype-i8": lambda op: (op["base"].update(dtype="I8"), op["target"].update(dtype="I8")),
    "shape-differs": lambda op: op["target"].update(shape=[op["target"]["shape"][0] * 2] + op["target"]["shape"][1:]),
    "rank-0": lambda op: (op["base"].update(shape=[]), op["target"].update(shape=[])),
    "op-unknown": lambda op: op.update(op="qrows2"),
}


@pytest.mark.parametrize("which", [0, 1], ids=["w4", "w8"])
@pytest.mark.parametrize("edit", list(HEADER_EDITS))
def test_qrows_header_rules_same_error_as_python(native, edit, which, tmp_path):
    """Each header rule of a qrows op, broken on purpose (sections re-laid out, trailer recomputed):
    the native applier refuses with Python's exit code and, word for word, its message."""
    h = craft.decode_patch(read(VECTORS / "valid/qrows-f32/patch.nnpatch"))
    HEADER_EDITS[edit](h["ops"][which])
    patch = tmp_path / "bad.nnpatch"
    patch.write_bytes(craft.encode_patch(h))
    base = VECTORS / "valid/qrows-f32/base.safetensors"
    try:
        nnpatch.apply(base, patch, tmp_path / "py.safetensors")
        pytest.fail(f"{edit}: Python applied it")
    except nnpatch.NnpatchError as e:
        py_rc, py_msg = e.exit_code, str(e)
    r = run_native(native, base, patch, "-o", tmp_path / "c.safetensors")
    assert_refused(r, py_rc)
    assert r.err.strip() == f"Error: {py_msg}", edit
    assert leftovers(tmp_path, "bad.nnpatch") == []
