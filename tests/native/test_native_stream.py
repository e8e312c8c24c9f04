"""Patches read from a stream (issue 13): ``cat patch | nnpatch-apply OLD - -o NEW``, through a
real pipe, in chunks of every size down to single bytes; truncated, corrupted and over-long
streams refused (exit 3) with nothing at -o; signatures (--key) on a stream; a stream as one
link of a chain; and the library's read callback (nnp_apply_streams) through ctypes, with a
failing stream (exit 5) and a cancel from the progress callback (130).
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time

import numpy as np
import pytest

import nnpatch
from nnpatch.signing import generate_keypair
from nnpatch.weights import write_safetensors

from .native_run import assert_no_crash, assert_ok, assert_refused, leftovers
from .native_run import native as run_native
from .native_run import python as run_python

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VECTORS = os.path.join(ROOT, "spec", "vectors")
with open(os.path.join(VECTORS, "vectors.json"), encoding="utf-8") as _f:
    MANIFEST = json.load(_f)
SAFETENSORS = [v for v in MANIFEST["valid"] if v["target"].endswith(".safetensors")]


def vpath(rel: str) -> str:
    return os.path.join(VECTORS, rel)


def read(p) -> bytes:
    with open(p, "rb") as f:
        return f.read()


ALL_OPS = next(v for v in SAFETENSORS if v["name"] == "all-ops")


def stream_apply(build, base, patch: bytes, out, *extra, chunk=None):
    return run_native(build, base, "-", "-o", out, "--quiet", *extra, stdin=patch, chunk=chunk)


@pytest.mark.parametrize("vec", SAFETENSORS, ids=lambda v: v["name"])
def test_every_vector_through_a_pipe(native_impl, vec, tmp_path):
    out = tmp_path / "out.safetensors"
    r = stream_apply(native_impl, vpath(vec["base"]), read(vpath(vec["patch"])), out, chunk=4096)
    assert_ok(r)
    assert read(out) == read(vpath(vec["target"]))
    assert leftovers(tmp_path, "out.safetensors") == []


@pytest.mark.parametrize("chunk", [1, 7, 64, 65536, None])
def test_chunk_sizes(native, chunk, tmp_path):
    """Short reads everywhere: the preamble, the header and the sections arrive in pieces."""
    out = tmp_path / "out.safetensors"
    r = stream_apply(native, vpath(ALL_OPS["base"]), read(vpath(ALL_OPS["patch"])), out, chunk=chunk)
    assert_ok(r)
    assert read(out) == read(vpath(ALL_OPS["target"]))


def cut_points(patch: bytes) -> dict[str, int]:
    (hlen,) = np.frombuffer(patch[16:24], "<u8")
    body = 24 + int(hlen)
    return {"empty": 0, "one-byte": 1, "in-the-magic": 5, "preamble-only": 24, "in-the-header": 24 + int(hlen) // 2,
            "header-only": body, "in-the-sections": (body + len(patch) - 32) // 2,
            "no-trailer": len(patch) - 32, "trailer-less-one": len(patch) - 1}


CUTS = ["empty", "one-byte", "in-the-magic", "preamble-only", "in-the-header", "header-only", "in-the-sections",
        "no-trailer", "trailer-less-one"]


@pytest.mark.parametrize("where", CUTS)
def test_truncated_stream_writes_nothing(native_impl, where, tmp_path):
    patch = read(vpath(ALL_OPS["patch"]))
    cut = cut_points(patch)[where]
    out = tmp_path / "out.safetensors"
    r = stream_apply(native_impl, vpath(ALL_OPS["base"]), patch[:cut], out)
    assert_refused(r, 3)
    assert leftovers(tmp_path) == [], "a truncated stream left a file behind"


@pytest.mark.parametrize("where", ["in-the-header", "in-the-sections", "in-the-trailer"])
def test_corrupted_stream_writes_nothing(native, where, tmp_path):
    patch = bytearray(read(vpath(ALL_OPS["patch"])))
    cuts = cut_points(bytes(patch))
    pos = {"in-the-header": cuts["in-the-header"], "in-the-sections": cuts["in-the-sections"],
           "in-the-trailer": len(patch) - 5}[where]
    patch[pos] ^= 0x10
    out = tmp_path / "out.safetensors"
    r = stream_apply(native, vpath(ALL_OPS["base"]), bytes(patch), out)
    assert_refused(r, 3)
    assert leftovers(tmp_path) == []


def test_trailing_garbage_after_the_trailer(native, tmp_path):
    """Bytes after the trailer: refused, with the exit code the Python stream reader gives."""
    patch = read(vpath(ALL_OPS["patch"])) + b"\0garbage"
    out = tmp_path / "c" / "out.safetensors"
    out.parent.mkdir()
    py = run_python("apply", vpath(ALL_OPS["base"]), "-", "-o", tmp_path / "py.safetensors", stdin=patch)
    r = stream_apply(native, vpath(ALL_OPS["base"]), patch, out)
    assert py.rc != 0
    assert_refused(r, py.rc)
    assert leftovers(out.parent) == []


def test_wrong_base_on_a_stream(native, tmp_path):
    out = tmp_path / "out.safetensors"
    r = stream_apply(native, vpath(ALL_OPS["target"]), read(vpath(ALL_OPS["patch"])), out)
    assert_refused(r, 4)
    assert leftovers(tmp_path) == []


# --- signatures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A signed patch (release key), one signed by another key, and the release public key."""
    d = tmp_path_factory.mktemp("signed")
    for name in ("release", "other"):
        generate_keypair(str(d / f"{name}.pem"), str(d / f"{name}.pub.pem"))
    for name in ("release", "other"):
        nnpatch.diff(vpath(ALL_OPS["base"]), vpath(ALL_OPS["target"]), d / f"{name}.nnpatch",
                     sign_key=str(d / f"{name}.pem"))
    return d


@pytest.mark.parametrize("signer, want", [("release", 0), ("other", 4), ("unsigned", 4)])
def test_stream_with_key(native_impl, signed, signer, want, tmp_path):
    patch = read(vpath(ALL_OPS["patch"])) if signer == "unsigned" else read(signed / f"{signer}.nnpatch")
    out = tmp_path / "out.safetensors"
    r = stream_apply(native_impl, vpath(ALL_OPS["base"]), patch, out, "--key", signed / "release.pub.pem",
                     chunk=1000)
    if want == 0:
        assert_ok(r)
        assert read(out) == read(vpath(ALL_OPS["target"]))
    else:
        assert_refused(r, want)
        assert leftovers(tmp_path) == []


@pytest.mark.parametrize("cut", [1, 50, 96, 97])
def test_signed_stream_cut_in_its_signature(native, signed, cut, tmp_path):
    """The signature block is the last 96 bytes: a stream cut inside it gets Python's exit code."""
    patch = read(signed / "release.nnpatch")[:-cut]
    out = tmp_path / "c" / "out.safetensors"
    out.parent.mkdir()
    key = signed / "release.pub.pem"
    py = run_python("apply", vpath(ALL_OPS["base"]), "-", "-o", tmp_path / "py.safetensors", "--key", key,
                    stdin=patch)
    r = stream_apply(native, vpath(ALL_OPS["base"]), patch, out, "--key", key)
    assert py.rc in (3, 4)
    assert_refused(r, py.rc)
    assert leftovers(out.parent) == []


# --- chains ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """m0 -> m1 -> m2 and the two patches."""
    d = tmp_path_factory.mktemp("chain")
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 32)) * 0.05).astype("<f4")
    models = []
    for i in range(3):
        w = w.copy()
        w[rng.choice(64, 6, replace=False)] += np.float32(0.01)
        models.append({"w": ("F32", (64, 32), w.tobytes()), "step": ("I64", (), np.int64(i).tobytes())})
    for i, m in enumerate(models):
        write_safetensors(d / f"m{i}.safetensors", m)
    for i in range(2):
        nnpatch.diff(d / f"m{i}.safetensors", d / f"m{i + 1}.safetensors", d / f"p{i}.nnpatch")
    return d


@pytest.mark.parametrize("which", [0, 1])
def test_stream_as_one_link_of_a_chain(native, chain, which, tmp_path):
    patches = [str(chain / "p0.nnpatch"), str(chain / "p1.nnpatch")]
    stdin = read(patches[which])
    patches[which] = "-"
    out = tmp_path / "out.safetensors"
    r = run_native(native, chain / "m0.safetensors", *patches, "-o", out, "--quiet", stdin=stdin, chunk=333)
    assert_ok(r)
    assert read(out) == read(chain / "m2.safetensors")


def test_standard_input_twice(native, chain, tmp_path):
    """`-` twice: one stream cannot be two patches; the Python command's exit code, nothing written."""
    stdin = read(chain / "p0.nnpatch")
    py = run_python("apply", chain / "m0.safetensors", "-", "-", "-o", tmp_path / "py.safetensors", stdin=stdin)
    out = tmp_path / "c" / "out.safetensors"
    out.parent.mkdir()
    r = run_native(native, chain / "m0.safetensors", "-", "-", "-o", out, stdin=stdin)
    assert py.rc != 0
    assert_refused(r, py.rc)
    assert leftovers(out.parent) == []


# --- memory: a stream larger than the applier's memory ------------------------------------------------

def peak_rss_anon(build, args, stdin: bytes) -> tuple[int, int]:
    """(exit code, peak RssAnon in bytes sampled every ms) of nnpatch-apply ARGS fed ``stdin``."""
    import subprocess

    p = subprocess.Popen([*build.cmd, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=build.full_env())
    peak = [0]

    def sample():
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                break
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        for i in range(0, len(stdin), 1 << 16):
            p.stdin.write(stdin[i:i + (1 << 16)])
        p.stdin.close()
    except BrokenPipeError:
        pass
    err = p.stderr.read()
    p.stderr.close()
    p.wait()
    t.join()
    build.check_sanitizer(p.returncode, err)
    return p.returncode, peak[0]


def test_a_large_stream_in_bounded_anonymous_memory(native, tmp_path):
    """A 24 MiB incompressible patch arrives on stdin: RssAnon stays within the issue's 16 MiB."""
    rng = np.random.default_rng(1)
    n = 6 << 20
    base = {"big": ("F32", (n // 1024, 1024), rng.integers(0, 256, 4 * n, dtype=np.uint8).tobytes())}
    target = {"big": ("F32", (n // 1024, 1024), rng.integers(0, 256, 4 * n, dtype=np.uint8).tobytes())}
    write_safetensors(tmp_path / "base.safetensors", base)
    write_safetensors(tmp_path / "target.safetensors", target)
    nnpatch.diff(tmp_path / "base.safetensors", tmp_path / "target.safetensors", tmp_path / "p.nnpatch", level=1)
    patch = read(tmp_path / "p.nnpatch")
    assert len(patch) > 20 << 20
    rc, anon = peak_rss_anon(native, [tmp_path / "base.safetensors", "-", "-o", tmp_path / "out.safetensors",
                                      "--quiet"], patch)
    assert rc == 0
    assert read(tmp_path / "out.safetensors") == read(tmp_path / "target.safetensors")
    assert anon <= 16 << 20, f"peak RssAnon {anon / 2**20:.1f} MiB streaming a {len(patch) / 2**20:.0f} MiB patch"


# --- the library: nnp_apply_streams with a read callback ------------------------------------------------

READ_FN = ctypes.CFUNCTYPE(ctypes.c_longlong, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t)
PROGRESS_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)


class Source(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("read", READ_FN), ("user", ctypes.c_void_p), ("name", ctypes.c_char_p)]


@pytest.fixture(scope="module")
def lib(native):
    lib = ctypes.CDLL(str(native.lib_so))
    lib.nnp_ctx_new.restype = ctypes.c_void_p
    lib.nnp_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nnp_apply_streams.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(Source), ctypes.c_size_t,
                                      ctypes.c_char_p]
    lib.nnp_apply_streams.restype = ctypes.c_int
    lib.nnp_set_progress.argtypes = [ctypes.c_void_p, PROGRESS_FN, ctypes.c_void_p]
    lib.nnp_set_progress.restype = None
    lib.nnp_message.argtypes = [ctypes.c_void_p]
    lib.nnp_message.restype = ctypes.c_char_p
    return lib


def lib_stream_apply(lib, base, data: bytes, out, *, sizes=(1, 10, 100, 4097), fail_at=None, cancel=False,
                     size_short=0):
    """nnp_apply_streams over ``data`` handed out in pieces of the given sizes in turn; the read
    callback returns -1 once ``fail_at`` bytes are out, the progress callback asks to stop;
    ``size_short`` makes the struct's size field that much smaller than the struct."""
    pos = [0]
    calls = [0]
    progress_calls = [0]

    def read_cb(user, buf, length):
        if fail_at is not None and pos[0] >= fail_at:
            return -1
        n = min(length, sizes[calls[0] % len(sizes)], len(data) - pos[0])
        calls[0] += 1
        ctypes.memmove(buf, data[pos[0]:pos[0] + n], n)
        pos[0] += n
        return n

    def progress_cb(user, done, total):
        progress_calls[0] += 1
        return 1 if cancel else 0

    read_fn, progress_fn = READ_FN(read_cb), PROGRESS_FN(progress_cb)
    ctx = lib.nnp_ctx_new()
    try:
        lib.nnp_set_progress(ctx, progress_fn, None)
        src = Source(ctypes.sizeof(Source) - size_short, read_fn, None, b"stream")
        status = lib.nnp_apply_streams(ctx, os.fsencode(base), ctypes.byref(src), 1, os.fsencode(out))
        return status, (lib.nnp_message(ctx) or b"").decode("utf-8", "replace"), progress_calls[0]
    finally:
        lib.nnp_ctx_free(ctx)


def test_library_read_callback(lib, tmp_path):
    out = tmp_path / "out.safetensors"
    status, message, _ = lib_stream_apply(lib, vpath(ALL_OPS["base"]), read(vpath(ALL_OPS["patch"])), out)
    assert status == 0, message
    assert read(out) == read(vpath(ALL_OPS["target"]))


def test_library_source_size_is_checked(lib, tmp_path):
    """A struct whose size field is not the library's nnp_source is refused, never read past."""
    out = tmp_path / "out.safetensors"
    status, message, _ = lib_stream_apply(lib, vpath(ALL_OPS["base"]), read(vpath(ALL_OPS["patch"])), out,
                                          size_short=8)
    assert status == 2, message
    assert "nnp_source.size" in message and "NNP_SOURCE_INIT" in message, message
    assert not out.exists()


def test_library_failing_stream_is_an_io_error(lib, tmp_path):
    out = tmp_path / "out.safetensors"
    status, message, _ = lib_stream_apply(lib, vpath(ALL_OPS["base"]), read(vpath(ALL_OPS["patch"])), out,
                                          fail_at=500)
    assert status == 5, message
    assert message
    assert leftovers(tmp_path) == []


def test_library_cancel_from_progress(lib, tmp_path):
    out = tmp_path / "out.safetensors"
    status, message, calls = lib_stream_apply(lib, vpath(ALL_OPS["base"]), read(vpath(ALL_OPS["patch"])), out,
                                               cancel=True)
    assert calls > 0, "the progress callback was never called"
    assert status == 130, message
    assert leftovers(tmp_path) == []


def test_version(native):
    r = run_native(native, "--version")
    assert_no_crash(r)
    assert r.rc == 0 and r.out.strip(), str(r)
