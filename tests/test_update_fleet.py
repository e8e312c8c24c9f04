"""What a fleet operator needs from release and update (issue 27): a full-model fallback the
signed manifest lists, updates that fit a small disk, and a release folder that holds exactly one
release. Against a real HTTP server on 127.0.0.1 (tests/feedserver.py)."""

from __future__ import annotations

import json
import os
import shutil
import types

import pytest

pytest.importorskip("urllib3")
pytest.importorskip("cryptography")

from nnpatch.errors import EXIT_NO_PATCH  # noqa: E402
from nnpatch.hashing import hash_file  # noqa: E402

from .conftest import read  # noqa: E402
from .feedserver import FeedServer  # noqa: E402
from .test_json_schemas import check  # noqa: E402
from .test_update_net import World, _fast_fetch, refused, run  # noqa: E402,F401 (the autouse fixture too)


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def _unknown_version(w: World) -> bytes:
    """A model no patch leads from: v1 with one byte of a value changed (same size)."""
    data = bytearray(read(w.versions[0]))
    data[-1] ^= 0x40
    w.model.write_bytes(bytes(data))
    return bytes(data)


# --- 1. the full model as a signed fallback ------------------------------------------------------

def test_full_fallback_from_a_version_no_patch_leads_from(world):
    w = world
    m = w.publish([w.versions[0], w.versions[1]], w.versions[2], "--version", "3", "--full")
    target = str(w.versions[2])
    assert m["full"] == {"url": "v3.safetensors", "size": os.path.getsize(target), "blake3": hash_file(target)}
    assert read(w.dist / "v3.safetensors") == read(target)
    with FeedServer(w.dist) as srv:
        before = _unknown_version(w)
        r = w.update(srv.url("manifest.json"))
        refused(w, r, EXIT_NO_PATCH, before, "--fallback full downloads it")
        r = w.update(srv.url("manifest.json"), "--fallback", "full", "--dry-run")
        assert r.exit_code == 0, r.output
        obj = check("update", r.stdout)
        assert obj["status"] == "would-update" and obj["mode"] == "full" and read(w.model) == before
        r = w.update(srv.url("manifest.json"), "--fallback", "full")
        assert r.exit_code == 0, r.output
        obj = check("update", r.stdout)
        assert obj["updated"] and obj["mode"] == "full" and obj["downloaded_bytes"] == os.path.getsize(target)
        assert read(w.model) == read(target) and hash_file(str(w.model)) == hash_file(target)
        assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]
        r = w.update(srv.url("manifest.json"), "--fallback", "full")
        assert r.exit_code == 0 and check("update", r.stdout)["status"] == "current"


def test_full_fallback_at_another_url_and_a_wrong_copy_refused(world, tmp_path):
    """--full-url lists a copy hosted elsewhere; a copy whose bytes are not the target's is refused
    (exit 4), the model untouched and no partial file left."""
    w = world
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copyfile(w.versions[2], mirror / "model-v3.safetensors")
    with FeedServer(mirror) as cdn:
        m = w.publish([w.versions[0]], w.versions[2], "--version", "3", "--full-url", cdn.url("model-v3.safetensors"))
        assert m["full"]["url"] == cdn.url("model-v3.safetensors")
        assert sorted(os.listdir(w.dist)) == ["manifest.json", "v1-to-v3.nnpatch"]
        with FeedServer(w.dist) as srv:
            before = _unknown_version(w)
            wrong = bytearray(read(w.versions[2]))
            wrong[100] ^= 1
            (mirror / "model-v3.safetensors").write_bytes(bytes(wrong))
            refused(w, w.update(srv.url("manifest.json"), "--fallback", "full"), 4, before, "BLAKE3")
            assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]
            shutil.copyfile(w.versions[2], mirror / "model-v3.safetensors")
            r = w.update(srv.url("manifest.json"), "--fallback", "full")
            assert r.exit_code == 0, r.output
            assert read(w.model) == read(w.versions[2])


def test_fallback_without_a_full_entry_says_so(world):
    w = world
    w.publish([w.versions[0]], w.versions[2], "--version", "3")
    with FeedServer(w.dist) as srv:
        before = _unknown_version(w)
        refused(w, w.update(srv.url("manifest.json"), "--fallback", "full"), EXIT_NO_PATCH, before,
                "the manifest lists no full model")


def test_a_full_entry_that_is_not_the_target_is_invalid(world):
    from nnpatch.delivery.manifest import encode_manifest
    from nnpatch.errors import PatchFormatError

    w = world
    m = w.publish([w.versions[0]], w.versions[2], "--version", "3", "--full")
    for bad in ({"size": m["full"]["size"] + 1}, {"blake3": "0" * 64}, {"url": "../x"}, {"url": "ftp://h/x"}):
        with pytest.raises(PatchFormatError):
            encode_manifest({**m, "full": {**m["full"], **bad}})
    r = run("release", w.versions[0], "--to", w.versions[2], "-o", w.tmp / "d2", "--full", "--full-url",
            "https://cdn.example/m")
    assert r.exit_code == 2


# --- 2. small disks ------------------------------------------------------------------------------

def _free(monkeypatch, nbytes: int) -> None:
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_bavail=nbytes // 512, f_frsize=512))


def test_in_place_chosen_when_only_it_fits(world, monkeypatch):
    """Room for the patch but not for a second copy: update goes in place by itself and says so;
    --no-in-place refuses and names --in-place; the dry run says which mode fits."""
    w = world
    m = w.publish([w.versions[0]], w.versions[1], "--version", "2")
    patch, size = m["bases"][0]["patch_size"], m["target"]["size"]
    assert patch + 4096 < size
    with FeedServer(w.dist) as srv:
        w.install(w.versions[0])
        before = read(w.model)
        _free(monkeypatch, patch + 4096)
        refused(w, w.update(srv.url("manifest.json"), "--no-in-place"), 5, before, "(--in-place) needs only about")
        r = w.update(srv.url("manifest.json"), "--dry-run")
        obj = check("update", r.stdout)
        assert obj["mode"] == "in-place" and obj["in_place_for_room"] and read(w.model) == before
        r = run("update", w.model, "--manifest", srv.url("manifest.json"), "--key", w.pub)
        assert r.exit_code == 0, r.output
        assert "in place (no room beside the model for a second copy)" in r.stdout
        assert read(w.model) == read(w.versions[1])


def test_no_room_at_all_is_refused_by_the_dry_run_too(world, monkeypatch):
    w = world
    w.publish([w.versions[0]], w.versions[1], "--version", "2")
    with FeedServer(w.dist) as srv:
        w.install(w.versions[0])
        before = read(w.model)
        _free(monkeypatch, 0)
        for extra in (["--dry-run"], []):
            refused(w, w.update(srv.url("manifest.json"), *extra), 5, before, "0 bytes were free")
        assert not any(e.path.endswith(".nnpatch") for e in srv.log)


# --- 4. a release folder holds one release -------------------------------------------------------

def test_release_into_a_folder_holding_an_earlier_release(world):
    w = world
    r = run("release", w.versions[0], w.versions[1], "--to", w.versions[2], "-o", w.dist, "--chain", "always")
    assert r.exit_code == 0, r.output
    assert "wrote 3 patches and" in r.stdout, r.stdout  # v1-to-v3, v2-to-v3 and the chain's v1-to-v2
    first = sorted(os.listdir(w.dist))
    assert len(first) == 4
    manifest_before = read(w.dist / "manifest.json")
    r = run("release", w.versions[1], "--to", w.versions[2], "-o", w.dist)
    assert r.exit_code == 2 and "--force" in r.output, r.output
    assert sorted(os.listdir(w.dist)) == first and read(w.dist / "manifest.json") == manifest_before
    r = run("release", w.versions[1], "--to", w.versions[2], "-o", w.dist, "--force")
    assert r.exit_code == 0, r.output
    assert "wrote 1 patch and" in r.stdout, r.stdout
    assert sorted(os.listdir(w.dist)) == ["manifest.json", "v2-to-v3.nnpatch"]
    m = json.loads(read(w.dist / "manifest.json"))
    assert [b["patch"] for b in m["bases"]] == ["v2-to-v3.nnpatch"]


def test_force_never_removes_the_release_inputs(world, tmp_path):
    """`release OLD --to NEW -o . --force` beside the models keeps the models."""
    w = world
    here = tmp_path / "here"
    here.mkdir()
    old, new = here / "v1.safetensors", here / "v2.safetensors"
    shutil.copyfile(w.versions[0], old)
    shutil.copyfile(w.versions[1], new)
    (here / "stale.nnpatch").write_bytes(b"old release")
    r = run("release", old, "--to", new, "-o", here, "--force")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(here)) == ["manifest.json", "v1-to-v2.nnpatch", "v1.safetensors", "v2.safetensors"]
    assert read(old) == read(w.versions[0]) and read(new) == read(w.versions[1])


def test_update_refuses_a_private_key(world):
    """`update --key release.pem` (the private key): exit 2, as apply does (it was accepted silently)."""
    w = world
    w.publish([w.versions[0]], w.versions[1], "--version", "2")
    w.install(w.versions[0])
    r = run("update", w.model, "--manifest", w.dist / "manifest.json", "--key", w.key)
    assert r.exit_code == 2 and "is a private key" in r.output, r.output
    assert read(w.model) == read(w.versions[0])


# --- issue 23: the network options of update -------------------------------------------------------

def test_headers_reach_the_feed_and_never_another_host(world):
    """--header goes with every request to the feed's origin; a redirect to another host gets none."""
    from .feedserver import Fault

    w = world
    w.publish([w.versions[0]], w.versions[1], "--version", "2")
    elsewhere = w.tmp / "elsewhere"
    shutil.copytree(w.dist, elsewhere)
    with FeedServer(elsewhere) as other, FeedServer(w.dist) as srv:
        srv.set_faults(lambda path, rng: Fault("redirect", location=other.url(path)) if path.endswith(".nnpatch")
                       else None)
        w.install(w.versions[0])
        r = w.update(srv.url("manifest.json"), "--header", "Authorization: Bearer s3cret", "--timeout", "5",
                     "--retries", "1")
        assert r.exit_code == 0, r.output
        assert read(w.model) == read(w.versions[1])
        assert [e.authorization for e in srv.log] == ["Bearer s3cret"] * len(srv.log) and srv.log
        assert other.log and all(e.authorization is None for e in other.log)


@pytest.mark.parametrize("bad", ["no colon", "Bad Name: x", ": empty"])
def test_a_malformed_header_is_a_usage_error(world, bad):
    w = world
    r = run("update", w.model, "--manifest", w.dist / "manifest.json", "--header", bad)
    assert r.exit_code == 2, r.output


def test_retries_bound_the_tries(world):
    """--retries 0: one try of a file that keeps failing (503), then exit 5 naming the count."""
    from .feedserver import Fault

    w = world
    w.publish([w.versions[0]], w.versions[1], "--version", "2")
    with FeedServer(w.dist) as srv:
        srv.set_faults(lambda path, rng: Fault("status", status=503))
        w.install(w.versions[0])
        before = read(w.model)
        refused(w, w.update(srv.url("manifest.json"), "--retries", "0"), 5, before, "gave up after 1 tries")
        assert len(srv.log) == 1


def test_full_fallback_never_writes_through_a_planted_link(world, tmp_path):
    """The full model's partial file is opened as every file beside the model is (issue 28 item 1):
    a symlink planted under its name is replaced, and the file it points to is left alone."""
    from nnpatch.delivery.updater import partial_path

    w = world
    m = w.publish([w.versions[0]], w.versions[2], "--version", "3", "--full")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not yours")
    _unknown_version(w)
    os.symlink(outside, partial_path(w.model, m["full"]["blake3"]))
    r = w.update(w.dist / "manifest.json", "--fallback", "full")
    assert r.exit_code == 0, r.output
    assert read(w.model) == read(w.versions[2]) and outside.read_bytes() == b"not yours"
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]
