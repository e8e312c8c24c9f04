"""Native in-place updates and recovery (issue 13; spec/JOURNAL.md), against the Python implementation.

* in-place results byte-identical to Python's in-place and to the target (every verify mode, chains,
  the new-file fallback for a layout change), a wrong base refused with nothing written;
* the journal the native applier commits is byte-identical to the one Python commits for the same
  model and patch;
* crossed journals: left by Python (a crash at each step of its in-place apply) and recovered by
  ``nnpatch-apply --recover`` or the next native ``--in-place``; left by a SIGKILLed
  ``nnpatch-apply --in-place`` and recovered by Python; the model exactly OLD or NEW every time;
* SIGKILL at random moments (benchmarks/native_crash_test.py, bounded here);
* hostile journals (tests/test_crafted.py's crafted cases, and random edits of writer-made journals
  as tests/test_journal.py makes them) get the same verdict from both implementations: rolled back to
  exactly OLD, or refused with the same exit code, the model unwritten and the journal kept;
* the Trust rules' file checks: FIFO (no blocking), oversize, torn (deleted), .tmp (deleted), lock.

``NNPATCH_TEST_PAUSE_AFTER_JOURNAL`` (native/src/inplace.h; compiled into test builds only:
``native_test``, ``hooked_impl``) makes the native applier sleep after its journal's commit point
and after its writes, so a kill lands where a journal exists.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import blake3
import numpy as np
import pytest

import nnpatch
from nnpatch.applier import apply_in_place, recover
from nnpatch.applier import journal as jmod
from nnpatch.applier.inplace import SimulatedCrash
from nnpatch.applier.journal import journal_path, max_journal_size
from nnpatch.errors import NnpatchError
from nnpatch.weights import write_safetensors

from .. import craft, test_inplace
from ..test_crafted import JOURNAL_CASES, _journal, tensors_base, tensors_target

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAUSE_ENV = "NNPATCH_TEST_PAUSE_AFTER_JOURNAL"
LOCKED = b"locked: another nnpatch is updating this model; try again when it has finished"
PRE = jmod.PREAMBLE


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def save(path, tensors: dict, metadata=None) -> str:
    write_safetensors(path, tensors, metadata)
    return os.fspath(path)


# OLD, NEW (rows, elements and a whole tensor changed; same layout), the patch, and MODEL = OLD
same_layout = test_inplace.same_layout


def state(model, old, new) -> str:
    data = read(model)
    return "OLD" if data == read(old) else "NEW" if data == read(new) else "MIXED"


def no_journal(model) -> bool:
    return not os.path.lexists(journal_path(model)) and not os.path.lexists(journal_path(model) + ".tmp")


def py_crash_at(step: str, model, patch) -> None:
    """Python's in-place apply, stopped dead (no cleanup) at ``step``."""
    def hook(s):
        if s == step:
            raise SimulatedCrash(s)
    with pytest.raises(SimulatedCrash):
        apply_in_place(model, patch, hook=hook)


def py_verdict(model) -> int:
    """Python's recover: 0, or the exit code of its refusal."""
    try:
        recover(model)
    except NnpatchError as e:
        return e.exit_code
    return 0


def kill_native_after_journal(impl, model, patch, *, new: bytes | None = None, timeout: float = 60) -> None:
    """Start ``--in-place`` slowed at its commit points and SIGKILL it once the committed journal is
    there (and, with ``new``, once the model holds those bytes: written, journal still there)."""
    env = impl.full_env({PAUSE_ENV: "20000"})
    proc = subprocess.Popen([*impl.cmd, "--in-place", str(model), str(patch)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    jp = journal_path(model)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end and proc.poll() is None:
            if os.path.exists(jp) and (new is None or read(model) == new):
                break
            time.sleep(0.002)
        assert proc.poll() is None, f"nnpatch-apply ended early: {proc.stderr.read()!r}"
        assert os.path.exists(jp)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


# --- in place: results ------------------------------------------------------------------------------

def lib_in_place(build, model, patches, verify: str) -> tuple[int, str]:
    """nnp_apply_in_place through libnnpatch.so (the command has no --verify for --in-place); the
    host build only (a sanitizer build's library cannot be loaded into this interpreter)."""
    lib = ctypes.CDLL(str(build.lib_so))
    lib.nnp_ctx_new.restype = ctypes.c_void_p
    lib.nnp_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nnp_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.nnp_message.argtypes = [ctypes.c_void_p]
    lib.nnp_message.restype = ctypes.c_char_p
    lib.nnp_apply_in_place.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p),
                                       ctypes.c_size_t]
    ctx = lib.nnp_ctx_new()
    try:
        assert lib.nnp_set_verify(ctx, {"default": 0, "full": 1, "touched": 2}[verify]) == 0
        arr = (ctypes.c_char_p * len(patches))(*[os.fsencode(p) for p in patches])
        rc = lib.nnp_apply_in_place(ctx, os.fsencode(model), arr, len(patches))
        return rc, lib.nnp_message(ctx).decode()
    finally:
        lib.nnp_ctx_free(ctx)


def test_in_place_matches_python_and_the_target(native_impl, same_layout, tmp_path):
    old, new, patch, model = same_layout
    r = native_impl.run("--in-place", model, patch)
    assert r.returncode == 0, r.stderr
    assert read(model) == read(new)
    assert no_journal(model)
    twin = str(tmp_path / "py.safetensors")
    shutil.copyfile(old, twin)
    apply_in_place(twin, patch)
    assert read(twin) == read(model)


@pytest.mark.parametrize("verify", ["default", "full", "touched"])
def test_in_place_verify_modes_through_the_library(native, same_layout, tmp_path, verify):
    old, new, patch, model = same_layout
    rc, msg = lib_in_place(native, model, [patch], verify)
    assert rc == 0, msg
    assert read(model) == read(new) and no_journal(model)
    twin = str(tmp_path / "py.safetensors")
    shutil.copyfile(old, twin)
    apply_in_place(twin, patch, verify=verify)
    assert read(twin) == read(model)
    # a wrong base outside the touched tensors: refused by default and full before anything is
    # written; touched copies it unchecked, then the output's file digest (proven in every mode,
    # issue 28 item 5) refuses the result and the model is rolled back
    shutil.copyfile(old, model)
    data = bytearray(read(model))
    data[-1] ^= 0xFF  # tensor d, untouched by the patch
    with open(model, "wb") as f:
        f.write(data)
    rc, msg = lib_in_place(native, model, [patch], verify)
    if verify == "touched":
        assert rc == 4 and "result does not match the patch's target (BLAKE3" in msg, msg
    else:
        assert rc == 4 and "wrong base" in msg, msg
    assert read(model) == bytes(data)
    assert no_journal(model)
    # a wrong touched tensor: refused in every mode, nothing written
    shutil.copyfile(old, model)
    data = bytearray(read(model))
    data[-40] ^= 0xFF  # inside c (whole)
    with open(model, "wb") as f:
        f.write(data)
    rc, msg = lib_in_place(native, model, [patch], verify)
    assert rc == 4 and "wrong base" in msg, msg
    assert read(model) == bytes(data) and no_journal(model)


@pytest.mark.parametrize("verify", ["default", "full", "touched"])
def test_in_place_target_blake3_lie_rolls_back(native, same_layout, tmp_path, verify):
    """A patch whose header claims a wrong target.blake3, everything else true (issue 28 item 5):
    --in-place refuses it in every verify mode as full does (exit 4, IntegrityError), after the
    journal's commit point, so the model is rolled back to exactly the base and no journal is left."""
    old, new, patch, model = same_layout
    h = craft.decode_patch(read(patch))
    h["target"]["blake3"] = "ab" * 32
    lie = str(tmp_path / "lie.nnpatch")
    with open(lie, "wb") as f:
        f.write(craft.encode_patch(h))
    rc, msg = lib_in_place(native, model, [lie], verify)
    assert rc == 4 and "result does not match the patch's target (BLAKE3" in msg, msg
    assert read(model) == read(old) and no_journal(model)


def test_in_place_chain(native_impl, tmp_path):
    rng = np.random.default_rng(3)
    v = [rng.standard_normal((64, 32)).astype("<f4")]
    for k in range(2):
        nxt = v[-1].copy()
        nxt[rng.choice(64, 5, replace=False)] += np.float32(0.5)
        nxt[0, k] = np.float32(7)
        v.append(nxt)
    files = [save(tmp_path / f"v{k}.safetensors", {"w": ("F32", (64, 32), x.tobytes()),
                                                    "z": ("U8", (0,), b"")}) for k, x in enumerate(v)]
    p1, p2 = str(tmp_path / "p1.nnpatch"), str(tmp_path / "p2.nnpatch")
    nnpatch.diff(files[0], files[1], p1)
    nnpatch.diff(files[1], files[2], p2)
    model = str(tmp_path / "m.safetensors")
    shutil.copyfile(files[0], model)
    r = native_impl.run("--in-place", model, p1, p2)
    assert r.returncode == 0, r.stderr
    assert read(model) == read(files[2]) and no_journal(model)


def test_wrong_base_is_refused_and_nothing_written(native_impl, same_layout):
    old, new, patch, model = same_layout
    data = bytearray(read(model))
    data[-1] ^= 0xFF  # tensor d: untouched by the patch, but part of the base's model digest
    with open(model, "wb") as f:
        f.write(data)
    r = native_impl.run("--in-place", model, patch)
    assert r.returncode == 4, r.stderr
    assert b"wrong base" in r.stderr
    assert read(model) == bytes(data) and no_journal(model)
    # a touched tensor
    shutil.copyfile(old, model)
    data = bytearray(read(model))
    data[-40] ^= 0xFF  # inside c (whole)
    with open(model, "wb") as f:
        f.write(data)
    r = native_impl.run("--in-place", model, patch)
    assert r.returncode == 4, r.stderr
    assert read(model) == bytes(data) and no_journal(model)


def test_layout_change_falls_back_to_a_new_file(native_impl, tmp_path):
    base = tensors_base()
    target = tensors_target(base)  # adds a tensor and changes metadata: a new layout
    o = save(tmp_path / "o.safetensors", base, {"v": "1"})
    n = save(tmp_path / "n.safetensors", target, {"v": "2"})
    p = str(tmp_path / "p.nnpatch")
    nnpatch.diff(o, n, p)
    model = str(tmp_path / "m.safetensors")
    shutil.copyfile(o, model)
    os.chmod(model, 0o640)
    r = native_impl.run("--in-place", model, p)
    assert r.returncode == 0, r.stderr
    assert read(model) == read(n) and no_journal(model)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "n.safetensors", "o.safetensors", "p.nnpatch"]


def test_second_updater_fails_at_once(native_impl, same_layout):
    old, new, patch, model = same_layout
    fd = os.open(model, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for args in (("--in-place", model, patch), ("--recover", model)):
            t = time.monotonic()
            r = native_impl.run(*args, timeout=30)
            assert r.returncode == 5, r.stderr
            assert LOCKED in r.stderr and r.stderr.startswith(b"Error: ")
            assert time.monotonic() - t < 20
    finally:
        os.close(fd)
    assert read(model) == read(old) and no_journal(model)


def test_sigint_rolls_back(native_test, same_layout):
    """SIGINT while the journal is committed: exit 130, everything rolled back, no journal left."""
    old, new, patch, model = same_layout
    proc = subprocess.Popen([*native_test.cmd, "--in-place", model, patch],
                            env=native_test.full_env({PAUSE_ENV: "1500"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    jp = journal_path(model)
    end = time.monotonic() + 30
    while proc.poll() is None and not os.path.exists(jp) and time.monotonic() < end:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert read(model) == read(old) and no_journal(model)


# --- the journal: byte for byte, and crossed ----------------------------------------------------------

def test_native_journal_is_byte_identical_to_pythons(native_test, same_layout, tmp_path):
    old, new, patch, model = same_layout
    kill_native_after_journal(native_test, model, patch)
    native_journal = read(journal_path(model))
    assert read(model) == read(old)  # killed after the commit point, before the writes
    twin_dir = tmp_path / "twin"
    twin_dir.mkdir()
    twin = str(twin_dir / "model.safetensors")
    shutil.copyfile(old, twin)
    py_crash_at("journal", twin, patch)
    assert read(journal_path(twin)) == native_journal


@pytest.mark.parametrize("after", ["journal", "writes"])
def test_native_journal_recovered_by_python(hooked_impl, same_layout, after):
    old, new, patch, model = same_layout
    kill_native_after_journal(hooked_impl, model, patch, new=read(new) if after == "writes" else None)
    assert state(model, old, new) == ("OLD" if after == "journal" else "NEW")
    assert recover(model) is not None
    assert state(model, old, new) == "OLD" and no_journal(model)


@pytest.mark.parametrize("step", ["journal", "write:a", "write:c", "synced", "verified"])
@pytest.mark.parametrize("how", ["recover", "in-place"])
def test_python_journal_recovered_by_native(native_impl, same_layout, step, how):
    old, new, patch, model = same_layout
    py_crash_at(step, model, patch)
    assert os.path.exists(journal_path(model))
    if how == "recover":
        r = native_impl.run("--recover", model)
        assert r.returncode == 0, r.stderr
        assert state(model, old, new) == "OLD"
    else:
        r = native_impl.run("--in-place", model, patch)
        assert r.returncode == 0, r.stderr
        assert state(model, old, new) == "NEW"
    assert no_journal(model)


def test_sigkilled_python_recovered_by_native(native_impl, tmp_path):
    """A real SIGKILL of `nnpatch apply --in-place` at random moments (a few tries), then the native
    recover: exactly OLD or NEW."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from crash_test import make_models
    old, new, patch = make_models(str(tmp_path), 4)
    b_old, b_new = read(old), read(new)
    model = str(tmp_path / "model.safetensors")
    jp = journal_path(model)
    rnd = random.Random(11)
    seen = {"OLD": 0, "NEW": 0, "journal": 0}
    for i in range(4):
        shutil.copyfile(old, model)
        proc = subprocess.Popen([sys.executable, "-m", "nnpatch", "-q", "apply", "--in-place", model, patch],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not os.path.exists(jp):
            time.sleep(0.0005)
        time.sleep(rnd.uniform(0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen["journal"] += os.path.exists(jp)
        r = native_impl.run("--recover", model)
        assert r.returncode == 0, r.stderr
        data = read(model)
        assert data in (b_old, b_new) and no_journal(model)
        seen["OLD" if data == b_old else "NEW"] += 1
    assert seen["OLD"] + seen["NEW"] == 4


def test_sigkill_at_random_moments(native_test):
    """~20 SIGKILLs of `nnpatch-apply --in-place`, recovered natively, by Python and by the next apply."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import native_crash_test
    c = native_crash_test.run(native_test.cmd, trials=21, mb=4, seed=5, env=native_test.full_env(), verbose=True)
    assert c["bad"] == 0 and c["old"] + c["new"] == c["trials"], c
    assert c["killed"] >= 10 and c["journal_left"] >= 5, c


# --- hostile journals: the same verdict from both -----------------------------------------------------

@pytest.fixture
def crafted_model(tmp_path):
    """tests/test_crafted.py's target model (tensors w, b, e, n), as the model beside the journals."""
    m = save(tmp_path / "model.safetensors", tensors_target(tensors_base()), {"v": "2"})
    data = read(m)
    (n,) = struct.unpack_from("<Q", data, 0)
    head = json.loads(data[8:8 + n])
    head.pop("__metadata__", None)
    ranges = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in head.items()}
    return m, data, ranges


@pytest.mark.parametrize("case", JOURNAL_CASES)
def test_crafted_journal_same_verdict(native_impl, crafted_model, case):
    model, data, ranges = crafted_model
    journal = _journal(case, data, ranges)
    with open(journal_path(model), "wb") as f:
        f.write(journal)
    r = native_impl.run("--recover", model)
    assert r.returncode in (3, 4), r.stderr
    assert read(model) == data and read(journal_path(model)) == journal
    assert r.stderr.startswith(b"Error: ") and r.stderr.count(b"\n") == 1
    assert py_verdict(model) == r.returncode
    assert read(model) == data and read(journal_path(model)) == journal


@pytest.mark.parametrize("case", ["writes-the-safetensors-header", "header-len-0-skips-identity", "unit-7"])
def test_in_place_recovers_only_a_valid_journal(native_impl, crafted_model, tmp_path, case):
    model, data, ranges = crafted_model
    journal = _journal(case, data, ranges)
    with open(journal_path(model), "wb") as f:
        f.write(journal)
    back = tmp_path / "back.nnpatch"
    back.write_bytes(craft.encode_patch(craft.file_patch(data, craft_base_bytes(tmp_path))))
    r = native_impl.run("--in-place", model, back)
    assert r.returncode in (3, 4), r.stderr
    assert read(model) == data and read(journal_path(model)) == journal


def craft_base_bytes(tmp_path) -> bytes:
    return read(save(tmp_path / "crafted-base.safetensors", tensors_base(), {"v": "1"}))


def test_crafted_control_journal_rolls_back(native_impl, crafted_model):
    model, data, ranges = crafted_model
    start, end = ranges["w"]
    old = bytearray(data)
    old[start + 32:start + 48] = b"\x11" * 16
    old = bytes(old)
    e = craft.journal_entry("w", start, end - start, 16, [2], old[start + 32:start + 48],
                            base_blake3=craft.digest(old[start:end]), target_blake3=craft.digest(data[start:end]))
    with open(journal_path(model), "wb") as f:
        f.write(craft.encode_journal(craft.journal_meta(data), [e]))
    r = native_impl.run("--recover", model)
    assert r.returncode == 0, r.stderr
    assert read(model) == old and no_journal(model)


def _split(journal: bytes):
    fields = PRE.unpack_from(journal, 0)
    hlen = fields[-1]
    return fields, json.loads(journal[PRE.size:PRE.size + hlen]), journal[PRE.size + hlen:-jmod.TRAILER]


def _join(fields, header: bytes, body: bytes) -> bytes | None:
    hlen = fields[-1]
    if len(header) > hlen:
        return None
    out = PRE.pack(*fields[:-1], hlen) + header + b" " * (hlen - len(header)) + body
    return out + blake3.blake3(out).digest()


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@pytest.fixture
def crashed(same_layout):
    """A model half-written by Python (crash after tensor a) and the journal it left."""
    old, new, patch, model = same_layout
    py_crash_at("write:a", model, patch)
    return model, read(old), read(model), read(journal_path(model))


def _plant(model, mix: bytes, journal: bytes) -> None:
    with open(model, "wb") as f:
        f.write(mix)
    with open(journal_path(model), "wb") as f:
        f.write(journal)


def _native_outcome(impl, model, old, mix, journal) -> int:
    _plant(model, mix, journal)
    r = impl.run("--recover", model)
    if r.returncode:
        assert read(model) == mix, f"refused ({r.stderr!r}) but the model was written"
        assert read(journal_path(model)) == journal, "refused but the journal is gone or changed"
        assert r.stderr.count(b"\n") == 1
    else:
        assert read(model) == old and no_journal(model)
    return r.returncode


def _python_outcome(model, old, mix, journal) -> int:
    _plant(model, mix, journal)
    return py_verdict(model)


_VALUES = [-(2**64), -1, 0, 1, 7, 16, 64, 2**63, 2**70, True, False, None, 1.5, 16.0, "", "x", [], {},
           "a" * 64, "0" * 63, "A" * 64, "e", "ghost"]


def _paths(node, prefix=()):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out = []
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


def test_edited_writer_journals_same_verdict(native_impl, crashed):
    """Random edits of a real journal's JSON fields and data bytes (trailer recomputed), as
    tests/test_journal.py makes them: both implementations roll back to exactly OLD, or both refuse
    with the same exit code, the model unwritten and the journal kept."""
    model, old, mix, journal = crashed
    rnd = random.Random(13)
    tried = recovered = 0
    verdicts = {}
    for _ in range(60):
        fields, header, body = _split(journal)
        for _ in range(rnd.randint(1, 3)):
            paths = _paths(header)
            if not paths:
                break
            path = rnd.choice(paths)
            where = header
            for k in path[:-1]:
                where = where[k]
            how = rnd.choice(["set", "nudge", "delete", "add"])
            if how == "delete" and isinstance(where, dict):
                del where[path[-1]]
            elif how == "add" and isinstance(where, dict):
                where[rnd.choice(["x", "name", "unit", "z9"])] = rnd.choice(_VALUES)
            elif how == "nudge" and type(where[path[-1]]) is int:
                where[path[-1]] += rnd.choice([-64, -16, -8, -4, -1, 1, 4, 8, 16, 64])
            else:
                where[path[-1]] = rnd.choice(_VALUES)
        body = bytearray(body)
        if rnd.random() < 0.3:
            body[rnd.randrange(len(body))] ^= rnd.randint(1, 255)
        j = _join(fields, _canonical(header), bytes(body))
        if j is None:
            continue
        tried += 1
        want = _python_outcome(model, old, mix, j)
        got = _native_outcome(native_impl, model, old, mix, j)
        assert got == want, (header, native_impl.run("--recover", model).stderr)
        recovered += got == 0
        verdicts[got] = verdicts.get(got, 0) + 1
    assert tried >= 40 and len(verdicts) >= 2, verdicts


def test_writer_journal_edits_of_each_rule(native_impl, crashed):
    model, old, mix, journal = crashed
    fields, header, body = _split(journal)
    # a later minor version and unknown top-level keys: accepted
    h = dict(header, **{"x-later-minor": {"note": [1, 2]}})
    j = _join((fields[0], 1, 7, *fields[3:]), _canonical(h), body)
    assert _native_outcome(native_impl, model, old, mix, j) == 0
    # flags: refused (3)
    j = _join((*fields[:3], 1, fields[4]), _canonical(header), body)
    assert _native_outcome(native_impl, model, old, mix, j) == 3 == _python_outcome(model, old, mix, j)
    # major version 2: refused (4), kept
    j = _join((fields[0], 2, *fields[2:]), _canonical(header), body)
    assert _native_outcome(native_impl, model, old, mix, j) == 4 == _python_outcome(model, old, mix, j)
    # old bytes off by one bit at either end of the data: the rolled-back digest differs (4), nothing written
    e = header["entries"][0]
    start = e["data_at"] - PRE.size - fields[-1]
    for at in (start, start + e["unit"] * e["count"] - 1):
        b = bytearray(body)
        b[at] ^= 1
        j = _join(fields, _canonical(header), bytes(b))
        assert _native_outcome(native_impl, model, old, mix, j) == 4
    # header_len is the real one: 0, 8 or one short name no model
    for n in (0, 8, header["model"]["header_len"] - 1):
        h = json.loads(json.dumps(header))
        h["model"].update(header_len=n, header_blake3=blake3.blake3(mix[:n]).hexdigest())
        j = _join(fields, _canonical(h), body)
        assert _native_outcome(native_impl, model, old, mix, j) == 4 == _python_outcome(model, old, mix, j)
    # the writer's own journal still rolls back
    assert _native_outcome(native_impl, model, old, mix, journal) == 0


def test_torn_journals_are_deleted(native_impl, crashed):
    model, old, mix, journal = crashed
    for torn in (journal[:-1], journal[:40], b"", b"\x00" * 100 + journal[100:],
                 journal[:-32] + bytes(32)):
        _plant(model, mix, torn)
        r = native_impl.run("--recover", model)
        assert r.returncode == 0, r.stderr
        assert read(model) == mix and no_journal(model)


def test_uncommitted_journal_is_deleted(native_impl, same_layout):
    old, new, patch, model = same_layout
    with open(journal_path(model) + ".tmp", "wb") as f:
        f.write(b"half a journal")
    r = native_impl.run("--recover", model)
    assert r.returncode == 0, r.stderr
    assert read(model) == read(old) and no_journal(model)


def test_uncommitted_journal_that_is_a_directory_fails_cleanly(native_impl, same_layout):
    old, new, patch, model = same_layout
    os.mkdir(journal_path(model) + ".tmp")
    r = native_impl.run("--recover", model)
    assert r.returncode == 5 and b"cannot remove" in r.stderr, r.stderr
    assert read(model) == read(old)


def test_fifo_journal_is_refused_without_blocking(native_impl, same_layout):
    old, new, patch, model = same_layout
    os.mkfifo(journal_path(model))
    r = native_impl.run("--recover", model, timeout=20)
    assert r.returncode == 3 and b"not a regular file" in r.stderr, r.stderr
    assert read(model) == read(old) and os.path.exists(journal_path(model))


def test_oversize_journal_is_refused_unhashed(native_impl, same_layout):
    old, new, patch, model = same_layout
    with open(journal_path(model), "wb") as f:  # sparse: hashing it would take minutes
        f.truncate(max_journal_size(os.path.getsize(model)) + 1 + (1 << 40))
    r = native_impl.run("--recover", model, timeout=20)
    assert r.returncode == 3 and b"more than any journal" in r.stderr, r.stderr
    assert read(model) == read(old) and os.path.exists(journal_path(model))


def test_journal_beside_a_directory_is_refused(native_impl, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (tmp_path / "model.nnpatch-journal").write_bytes(b"x" * 100)
    r = native_impl.run("--recover", d)
    assert r.returncode == 2 and b"not a file" in r.stderr, r.stderr
    assert (tmp_path / "model.nnpatch-journal").exists()


def test_nothing_to_recover(native_impl, same_layout):
    old, new, patch, model = same_layout
    r = native_impl.run("--recover", model)
    assert r.returncode == 0, r.stderr
    assert read(model) == read(old)


def test_large_tensors_roll_back(native_impl, tmp_path):
    """Tensors over 16 MiB and a whole tensor over 8 MiB (Python's slicing limits): a Python journal
    recovered natively."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((4500, 1024)).astype("<f4")
    whole = rng.standard_normal(9 << 18).astype("<f4")
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
    py_crash_at("synced", m, p)
    assert read(m) == read(n)
    r = native_impl.run("--recover", m)
    assert r.returncode == 0, r.stderr
    assert read(m) == read(o) and no_journal(m)


def test_in_place_from_standard_input(native_impl, same_layout):
    old, new, patch, model = same_layout
    before = sorted(os.listdir(os.path.dirname(model)))
    r = native_impl.run("--in-place", model, "-", input=read(patch))
    assert r.returncode == 0, r.stderr
    assert read(model) == read(new) and no_journal(model)
    assert sorted(os.listdir(os.path.dirname(model))) == before


def test_directory_models_are_refused(native_impl, tmp_path, same_layout):
    """A patch that makes a model directory: the native applier's refusal (3); a single-file patch on a
    directory: Python's usage error (2). Neither writes anything."""
    old, new, patch, model = same_layout
    base = tensors_base()
    for name, t in (("v1", base), ("v2", tensors_target(base))):
        (tmp_path / name).mkdir()
        save(tmp_path / name / "model.safetensors", t, {"format": "pt"})
        (tmp_path / name / "config.json").write_bytes(b'{"v": 1}\n' if name == "v1" else b'{"v": 2}\n')
    pdir = str(tmp_path / "p-dir.nnpatch")
    nnpatch.diff(str(tmp_path / "v1"), str(tmp_path / "v2"), pdir)
    before = read(tmp_path / "v1" / "model.safetensors")
    r = native_impl.run("--in-place", tmp_path / "v1", pdir)
    assert r.returncode == 3 and b"model directory" in r.stderr, r.stderr
    r = native_impl.run("--in-place", tmp_path / "v1", patch)
    assert r.returncode == 2 and b"single file" in r.stderr, r.stderr
    assert read(tmp_path / "v1" / "model.safetensors") == before
    assert sorted(os.listdir(tmp_path / "v1")) == ["config.json", "model.safetensors"]


# --- the journal's commit point: the fsync of its folder -------------------------------------------

DIR_FSYNC_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/stat.h>
int fsync(int fd)
{
    static int (*real)(int);
    const char *e = getenv("NNP_TEST_DIR_FSYNC_ERRNO");
    struct stat st;
    if (e && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        errno = atoi(e);
        return -1;
    }
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}
"""


@pytest.fixture(scope="module")
def dir_fsync_shim(tmp_path_factory):
    """An LD_PRELOAD library whose fsync fails on directories with the errno NNP_TEST_DIR_FSYNC_ERRNO names."""
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(DIR_FSYNC_SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(d / "shim.so"), str(d / "shim.c"), "-ldl"],
                   check=True)
    return d / "shim.so"


@pytest.mark.parametrize("err, stops", [(5, True), (22, False)])  # EIO; EINVAL: cannot sync directories
def test_a_journal_that_cannot_be_made_durable_stops_before_the_model_is_written(native, same_layout, tmp_path,
                                                                                 dir_fsync_shim, err, stops):
    """As Python (tests/test_inplace.py): when the fsync of the journal's folder fails, the model is not
    written and no journal is left; a file system that cannot sync directories is no failure."""
    old, new, patch, model = same_layout
    env = dict(os.environ, LD_PRELOAD=str(dir_fsync_shim), NNP_TEST_DIR_FSYNC_ERRNO=str(err))
    r = subprocess.run([str(native.apply), "--in-place", model, patch], env=env, capture_output=True, text=True)
    if not stops:
        assert r.returncode == 0, r.stderr
        assert read(model) == read(new) and no_journal(model)
        return
    assert r.returncode == 5, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "cannot make the journal durable" in line and "the model was not written" in line
    assert read(model) == read(old)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "new.safetensors", "old.safetensors", "p.nnpatch"]
