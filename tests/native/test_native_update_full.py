"""nnpatch-update --fallback full (issue 23, issue 27 item 1): no patch leads from the model's
version, and the signed manifest lists the whole target (`nnpatch release --full`): it is downloaded
into its partial file beside the model, resumed, proven by size and BLAKE3 and renamed over the
model, as `nnpatch update --fallback full` does (tests/test_update_fleet.py). Against a real HTTP
server on 127.0.0.1 (tests/feedserver.py), on the host build and the ASan/UBSan build (native_impl).
"""

from __future__ import annotations

import json
import os
import stat

import pytest

pytest.importorskip("cryptography")
pytest.importorskip("urllib3")

from nnpatch.delivery.updater import partial_path  # noqa: E402
from nnpatch.hashing import hash_file  # noqa: E402

from ..feedserver import Fault, FeedServer  # noqa: E402
from ..test_json_schemas import check as check_schema  # noqa: E402
from ..test_update_net import World  # noqa: E402
from .test_native_update import FAST, one_error_line  # noqa: E402

STATE = "model.safetensors.nnpatch-state"


def _unknown_version(w: World) -> bytes:
    """A model no patch leads from: v1 with one byte of a value changed (same size)."""
    data = bytearray(w.versions[0].read_bytes())
    data[-1] ^= 0x40
    w.model.write_bytes(bytes(data))
    return bytes(data)


@pytest.fixture
def full_feed(tmp_path):
    """Release 3: v1 and v2 to v3 with the whole of v3 listed as `full`, signed, served."""
    w = World(tmp_path)
    w.manifest = w.publish([w.versions[0], w.versions[1]], w.versions[2], "--version", "3", "--full")
    assert w.manifest["full"]["url"] == "v3.safetensors"
    with FeedServer(w.dist) as srv:
        w.srv = srv
        yield w


def update(impl, w, *extra):
    return impl.run_update(w.model, "--manifest", w.srv.url("manifest.json"), "--key", w.pub, "--json", *FAST,
                           *extra)


def refused(r, code, w, before, words):
    assert r.returncode == code, r.stderr
    one_error_line(r)
    assert words in r.stderr.decode(), r.stderr
    assert check_schema("error", r.stdout.decode())["error"]["code"] == code
    assert w.model.read_bytes() == before
    assert not [f for f in w.files() if f.endswith(".nnpatch-part")], w.files()


def test_an_unknown_version_is_brought_to_the_target(native_impl, full_feed):
    w = full_feed
    target = w.versions[2]
    before = _unknown_version(w)
    os.chmod(w.model, 0o640)
    refused(update(native_impl, w), 7, w, before, "a full download is needed; --fallback full downloads it")
    r = update(native_impl, w, "--fallback", "full", "--dry-run")
    assert r.returncode == 0, r.stderr
    out = check_schema("update", r.stdout.decode())
    assert out["status"] == "would-update" and out["mode"] == "full" and out["patches"] == ["v3.safetensors"]
    assert out["patch_bytes"] == target.stat().st_size and w.model.read_bytes() == before
    assert [e.path for e in w.srv.log if e.path != "manifest.json"] == []
    human = native_impl.run_update(w.model, "--manifest", w.srv.url("manifest.json"), "--key", w.pub,
                                   "--fallback", "full", "--dry-run")
    assert b"would fetch v3.safetensors" in human.stdout and b"by downloading the full model" in human.stdout
    r = update(native_impl, w, "--fallback", "full")
    assert r.returncode == 0, r.stderr
    out = check_schema("update", r.stdout.decode())
    assert out["updated"] and out["status"] == "updated" and out["mode"] == "full" and not out["in_place"]
    assert out["downloaded_bytes"] == target.stat().st_size and out["to_blake3"] == hash_file(str(target))
    assert w.model.read_bytes() == target.read_bytes()
    assert stat.S_IMODE(w.model.stat().st_mode) == 0o640  # the model's mode, not the partial file's 0600
    assert w.files() == ["model.safetensors", STATE]
    r = update(native_impl, w, "--fallback", "full")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "current", r.stderr


def test_a_known_version_still_takes_its_patch(native_impl, full_feed):
    w = full_feed
    w.install(w.versions[1])
    r = update(native_impl, w, "--fallback", "full")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mode"] == "new-file" and out["patches"] == ["v2-to-v3.nnpatch"]
    assert w.model.read_bytes() == w.versions[2].read_bytes()


def test_a_wrong_copy_is_refused_leaving_the_model(native_impl, full_feed):
    w = full_feed
    before = _unknown_version(w)
    wrong = bytearray(w.versions[2].read_bytes())
    wrong[100] ^= 1
    (w.dist / "v3.safetensors").write_bytes(bytes(wrong))
    r = update(native_impl, w, "--fallback", "full")
    refused(r, 4, w, before, "does not match the manifest")
    assert json.loads(r.stdout)["error"]["kind"] == "IntegrityError"
    assert w.files() == ["model.safetensors", STATE]
    (w.dist / "v3.safetensors").write_bytes(w.versions[2].read_bytes())
    r = update(native_impl, w, "--fallback", "full")
    assert r.returncode == 0, r.stderr
    assert w.model.read_bytes() == w.versions[2].read_bytes()


def test_a_longer_copy_is_never_kept_past_the_size(native_impl, full_feed):
    """The server's file runs on past the manifest's size: only `size` bytes are taken (and proven)."""
    w = full_feed
    _unknown_version(w)
    size = w.manifest["full"]["size"]
    (w.dist / "v3.safetensors").write_bytes(w.versions[2].read_bytes() + b"\0" * 4096)
    r = update(native_impl, w, "--fallback", "full")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["downloaded_bytes"] == size
    assert w.model.read_bytes() == w.versions[2].read_bytes()


def test_without_a_full_entry_the_message_says_so(native_impl, tmp_path):
    w = World(tmp_path)
    w.publish([w.versions[0]], w.versions[2], "--version", "3")
    with FeedServer(w.dist) as srv:
        w.srv = srv
        before = _unknown_version(w)
        refused(update(native_impl, w, "--fallback", "full"), 7, w, before,
                "a full download is needed and the manifest lists no full model")
        r = update(native_impl, w)
        refused(r, 7, w, before, "a full download is needed")
        assert b"--fallback full" not in r.stderr


def test_a_model_directory_is_no_update_path(native_impl, full_feed):
    w = full_feed
    w.model.mkdir()
    r = update(native_impl, w, "--fallback", "full")
    assert r.returncode == 7, r.stderr
    one_error_line(r)
    assert b"a full download replaces a model file only" in r.stderr


def test_a_planted_symlink_is_not_written_through(native_impl, full_feed, tmp_path):
    w = full_feed
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not yours")
    _unknown_version(w)
    os.symlink(outside, partial_path(w.model, w.manifest["full"]["blake3"]))
    r = update(native_impl, w, "--fallback", "full")
    assert r.returncode == 0, r.stderr
    assert w.model.read_bytes() == w.versions[2].read_bytes() and outside.read_bytes() == b"not yours"
    assert w.files() == ["model.safetensors", STATE]


def test_a_planted_hard_link_is_not_written_through(native_impl, full_feed, tmp_path):
    w = full_feed
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not yours")
    _unknown_version(w)
    os.link(outside, partial_path(w.model, w.manifest["full"]["blake3"]))
    r = update(native_impl, w, "--fallback", "full")
    assert r.returncode == 0, r.stderr
    assert w.model.read_bytes() == w.versions[2].read_bytes() and outside.read_bytes() == b"not yours"


def test_a_cut_download_resumes_in_the_next_run(native_impl, full_feed):
    w = full_feed
    size = w.manifest["full"]["size"]
    w.srv.set_faults(lambda path, rng: Fault("cut", at=size // 3) if path.endswith(".safetensors") else None)
    before = _unknown_version(w)
    r = update(native_impl, w, "--fallback", "full", "--retries", "0")
    assert r.returncode == 5, r.stderr
    one_error_line(r)
    assert w.model.read_bytes() == before
    part = partial_path(w.model, w.manifest["full"]["blake3"])
    assert os.path.getsize(part) == size // 3
    w.srv.set_faults(None)
    r = update(native_impl, w, "--fallback", "full")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mode"] == "full"
    assert out["resumed_bytes"] == size // 3 and out["downloaded_bytes"] == size - size // 3
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    assert w.files() == ["model.safetensors", STATE]
    ranged = [e for e in w.srv.log if e.path.endswith(".safetensors")]
    assert ranged[-1].range == f"bytes={size // 3}-", ranged


def test_a_local_feed_copies_the_full_model(native_impl, tmp_path):
    w = World(tmp_path)
    w.manifest = w.publish([w.versions[0]], w.versions[2], "--version", "3", "--full")
    _unknown_version(w)
    r = native_impl.run_update(w.model, "--manifest", w.dist / "manifest.json", "--key", w.pub, "--json",
                               "--fallback", "full")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mode"] == "full"
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    assert w.files() == ["model.safetensors", STATE]


@pytest.mark.parametrize("value", ["", "patch", "FULL"])
def test_fallback_takes_none_or_full(native_impl, value):
    r = native_impl.run_update("M", "--manifest", "x", "--fallback", value)
    assert r.returncode == 2, r.stderr
    one_error_line(r)
