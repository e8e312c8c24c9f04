"""libnnpatch's updater API through ctypes (nnpatch.h: nnp_update with a fetch callback,
nnp_hash_file, nnp_patch_digests_of): the contract an app's own HTTP stack meets. The callback
here serves a release from memory and misbehaves on purpose: a range ignored (pieces from byte
0), bytes past the limit, a failure worth another try, one that is not, a restart."""

from __future__ import annotations

import base64
import ctypes
import os

import blake3
import pytest

pytest.importorskip("cryptography")

from nnpatch.patchfile import read_patch  # noqa: E402

from ..test_update_net import World  # noqa: E402

OK, RETRY, FAIL, RESTART = 0, 1, 2, 3
SINK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t)
FETCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64, SINK,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)  # err: a buffer to write into


class Options(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("manifest", ctypes.c_char_p), ("fetch", FETCH),
                ("fetch_user", ctypes.c_void_p), ("in_place", ctypes.c_int), ("dry_run", ctypes.c_int),
                ("prefer", ctypes.c_int), ("retries", ctypes.c_uint), ("backoff_ms", ctypes.c_uint),
                ("now", ctypes.c_longlong)]


class Result(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("status", ctypes.c_int), ("from_blake3", ctypes.c_char * 65),
                ("to_blake3", ctypes.c_char * 65), ("from_name", ctypes.c_char * 96), ("to_name", ctypes.c_char * 96),
                ("has_release", ctypes.c_int), ("release", ctypes.c_uint64), ("expires", ctypes.c_char * 24),
                ("is_signed", ctypes.c_int), ("key_id", ctypes.c_char * 17), ("npatches", ctypes.c_size_t),
                ("patches", (ctypes.c_char * 201) * 32), ("patch_bytes", ctypes.c_uint64),
                ("downloaded_bytes", ctypes.c_uint64), ("resumed_bytes", ctypes.c_uint64),
                ("in_place", ctypes.c_int), ("recovered", ctypes.c_int), ("in_place_for_room", ctypes.c_int)]


class Digests(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("base_blake3", ctypes.c_uint8 * 32), ("base_size", ctypes.c_uint64),
                ("target_blake3", ctypes.c_uint8 * 32), ("target_size", ctypes.c_uint64),
                ("trailer_blake3", ctypes.c_uint8 * 32), ("is_signed", ctypes.c_int)]


def load(native) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(native.lib_so))
    lib.nnp_ctx_new.restype = ctypes.c_void_p
    lib.nnp_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nnp_message.restype = ctypes.c_char_p
    lib.nnp_message.argtypes = [ctypes.c_void_p]
    lib.nnp_set_trusted_key_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nnp_set_trusted_key_pem.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.nnp_update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(Options), ctypes.POINTER(Result)]
    lib.nnp_hash_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint8 * 32]
    lib.nnp_patch_digests_of.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(Digests)]
    return lib


@pytest.fixture
def release(tmp_path):
    w = World(tmp_path)
    w.manifest = w.publish([w.versions[0]], w.versions[2], "--version", "5", "--expires", "1d",
                           "--base-url", "https://updates.invalid/model/")
    w.files_served = {f"https://updates.invalid/model/{n}": (w.dist / n).read_bytes() for n in os.listdir(w.dist)}
    w.install(w.versions[0])
    return w


def run_update(native, w, behave, *, retries=2, pem_text=False):
    """nnp_update of w's model from its manifest in the 'dist' folder, patches fetched by a callback whose
    behaviour for the n-th call is behave(n, data, offset, limit) -> list of (at, bytes) pieces and a result."""
    lib = load(native)
    ctx = lib.nnp_ctx_new()
    if pem_text:  # the key as an app ships it: PEM text in memory, not a file
        pem = w.pub.read_bytes()
        assert lib.nnp_set_trusted_key_pem(ctx, pem, len(pem)) == 0, lib.nnp_message(ctx)
    else:
        assert lib.nnp_set_trusted_key_file(ctx, str(w.pub).encode()) == 0
    calls = []

    @FETCH
    def fetch(user, url, offset, limit, sink, sink_ctx, err, errlen):
        data = w.files_served[url.decode()]
        pieces, result = behave(len(calls), data, offset, limit)
        calls.append((url.decode(), offset, limit))
        for at, piece in pieces:
            buf = (ctypes.c_uint8 * max(1, len(piece))).from_buffer_copy(piece or b"\0")
            if sink(sink_ctx, at, buf, len(piece)):
                break
        if result != OK:
            ctypes.memmove(err, b"test: refused\0", 14)
        return result

    opt = Options(ctypes.sizeof(Options), str(w.dist / "manifest.json").encode(), fetch, None, 0, 0, 0, retries, 1, 0)
    res = Result()
    res.size = ctypes.sizeof(Result)
    st = lib.nnp_update(ctx, str(w.model).encode(), ctypes.byref(opt), ctypes.byref(res))
    msg = lib.nnp_message(ctx).decode()
    lib.nnp_ctx_free(ctx)
    return st, msg, res, calls


def whole(n, data, offset, limit):
    return [(offset, data[offset:])], OK


def test_the_key_as_pem_text(native, release):
    st, msg, res, _ = run_update(native, release, whole, pem_text=True)
    assert st == 0, msg
    assert blake3.blake3(release.model.read_bytes()).digest() == blake3.blake3(release.versions[2].read_bytes()).digest()
    raw = base64.b64decode("".join(release.pub.read_text().splitlines()[1:-1]))[-32:]
    assert res.key_id.decode() == blake3.blake3(raw).hexdigest()[:16]  # the key the text names was the one used
    lib = load(native)
    ctx = lib.nnp_ctx_new()
    private = release.key.read_bytes()
    assert lib.nnp_set_trusted_key_pem(ctx, private, len(private)) == 2
    assert b"this is a private key" in lib.nnp_message(ctx)
    for bad in (b"", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", release.pub.read_bytes()[:40]):
        assert lib.nnp_set_trusted_key_pem(ctx, bad, len(bad)) == 3, bad
        assert lib.nnp_message(ctx) == b"the key: not a PEM Ed25519 public key"
    # len counts, not a NUL: the text cut one byte short of its END line is refused
    pem = release.pub.read_bytes()
    assert lib.nnp_set_trusted_key_pem(ctx, pem, len(pem.rstrip()) - 1) == 3
    assert lib.nnp_set_trusted_key_pem(ctx, None, 0) == 2
    lib.nnp_ctx_free(ctx)


def test_update_through_a_callback(native, release):
    st, msg, res, calls = run_update(native, release, whole)
    assert st == 0, msg
    assert release.model.read_bytes() == release.versions[2].read_bytes()
    assert res.status == 0 and res.release == 5 and res.key_id and res.downloaded_bytes == res.patch_bytes
    assert [c[1] for c in calls] == [0]


def test_a_range_ignored_and_bytes_past_the_limit(native, release):
    def behave(n, data, offset, limit):
        if n == 0:  # half, then the connection drops
            return [(0, data[: len(data) // 2])], RETRY
        return [(0, data[:100]), (100, data[100:] + b"garbage past the end")], OK  # from 0, and too long

    st, msg, res, calls = run_update(native, release, behave)
    assert st == 0, msg
    assert release.model.read_bytes() == release.versions[2].read_bytes()
    size = release.manifest["bases"][0]["patch_size"]
    assert calls[1][1] == size // 2 and calls[1][2] == size - size // 2  # resumed, and the limit says the rest


def test_a_refusal_is_not_retried_and_a_restart_starts_over(native, release):
    st, msg, res, calls = run_update(native, release, lambda n, d, o, lim: ([], FAIL))
    assert st == 5 and "test: refused" in msg and len(calls) == 1
    assert release.model.read_bytes() == release.versions[0].read_bytes()

    def behave(n, data, offset, limit):
        if n == 0:
            return [(0, data[:50])], RETRY
        if n == 1:
            return [], RESTART  # the server's file changed under the resume
        return [(offset, data[offset:])], OK

    st, msg, res, calls = run_update(native, release, behave)
    assert st == 0, msg
    assert [c[1] for c in calls] == [0, 50, 0]


def test_retries_run_out_as_an_io_error(native, release):
    st, msg, res, calls = run_update(native, release, lambda n, d, o, lim: ([], RETRY), retries=3)
    assert st == 5 and "gave up after 4 tries" in msg and len(calls) == 4


def test_hash_file_and_patch_digests(native, release):
    lib = load(native)
    ctx = lib.nnp_ctx_new()
    out = (ctypes.c_uint8 * 32)()
    assert lib.nnp_hash_file(ctx, str(release.model).encode(), out) == 0
    assert bytes(out).hex() == blake3.blake3(release.model.read_bytes()).hexdigest()
    patch = release.dist / release.manifest["bases"][0]["patch"]
    d = Digests()
    d.size = ctypes.sizeof(Digests)
    assert lib.nnp_patch_digests_of(ctx, str(patch).encode(), ctypes.byref(d)) == 0
    with read_patch(str(patch)) as p:
        assert bytes(d.base_blake3).hex() == p.header.base.blake3
        assert bytes(d.target_blake3).hex() == p.header.target.blake3
        assert bytes(d.trailer_blake3).hex() == p.trailer_hash
    assert d.is_signed == 1
    assert bytes(d.trailer_blake3).hex() == release.manifest["bases"][0]["patch_trailer_blake3"]
    lib.nnp_ctx_free(ctx)


class OptionsFull(ctypes.Structure):  # this release's nnp_update_options: fallback_full at its end
    _fields_ = Options._fields_ + [("fallback_full", ctypes.c_int)]


class ResultFull(ctypes.Structure):  # and nnp_update_result: full at its end
    _fields_ = Result._fields_ + [("full", ctypes.c_int)]


def test_full_fallback_through_a_callback_and_older_structs(native, tmp_path):
    """fallback_full with this release's structs downloads the whole target through the callback; a
    program built with the previous header (shorter options and result) gets exactly what it did."""
    w = World(tmp_path)
    w.manifest = w.publish([w.versions[0]], w.versions[2], "--version", "5", "--full",
                           "--base-url", "https://updates.invalid/model/")
    w.files_served = {f"https://updates.invalid/model/{n}": (w.dist / n).read_bytes() for n in os.listdir(w.dist)}
    data = bytearray(w.versions[0].read_bytes())
    data[-1] ^= 0x40
    w.model.write_bytes(bytes(data))
    lib = load(native)
    lib.nnp_update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]
    ctx = lib.nnp_ctx_new()
    assert lib.nnp_set_trusted_key_file(ctx, str(w.pub).encode()) == 0
    urls = []

    @FETCH
    def fetch(user, url, offset, limit, sink, sink_ctx, err, errlen):
        urls.append(url.decode())
        piece = w.files_served[url.decode()][offset:]
        buf = (ctypes.c_uint8 * max(1, len(piece))).from_buffer_copy(piece or b"\0")
        sink(sink_ctx, offset, buf, len(piece))
        return OK

    manifest = str(w.dist / "manifest.json").encode()
    old = Options(ctypes.sizeof(Options), manifest, fetch, None, 0, 0, 0, 0, 1, 0)
    res = ResultFull()
    res.size = ctypes.sizeof(ResultFull)
    assert lib.nnp_update(ctx, str(w.model).encode(), ctypes.byref(old), ctypes.byref(res)) == 7  # NNP_ENOPATH
    assert "--fallback full downloads it" in lib.nnp_message(ctx).decode()
    opt = OptionsFull(ctypes.sizeof(OptionsFull), manifest, fetch, None, 0, 0, 0, 0, 1, 0, 1)
    older = Result()
    older.size = ctypes.sizeof(Result)
    assert lib.nnp_update(ctx, str(w.model).encode(), ctypes.byref(opt), ctypes.byref(older)) == 0, \
        lib.nnp_message(ctx).decode()
    assert older.size == ctypes.sizeof(Result) and older.status == 0 and older.patches[0].value == b"v3.safetensors"
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    assert urls[-1] == "https://updates.invalid/model/v3.safetensors"
    w.model.write_bytes(bytes(data))
    assert lib.nnp_update(ctx, str(w.model).encode(), ctypes.byref(opt), ctypes.byref(res)) == 0
    assert res.full == 1 and res.npatches == 1 and res.patch_bytes == w.versions[2].stat().st_size
    assert res.downloaded_bytes == res.patch_bytes and w.model.read_bytes() == w.versions[2].read_bytes()
    lib.nnp_ctx_free(ctx)
