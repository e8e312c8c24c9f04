"""Signed release feeds over HTTP: `nnpatch release --sign-key` served by a web server on
127.0.0.1 (tests/feedserver.py), followed by `nnpatch update --manifest URL --key`.

Every refusal leaves the model exactly as it was; every fault ends with the model exactly OLD
or exactly NEW, one error line, and no file beside it but the state file and (for a download
to resume) the partial file named by the patch's digest."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import time

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("urllib3")
pytest.importorskip("cryptography")

from nnpatch.delivery import fetch, manifest, state, trust  # noqa: E402
from nnpatch.cli import cli  # noqa: E402
from nnpatch.errors import EXIT_NO_PATCH  # noqa: E402
from nnpatch.delivery.updater import partial_path, update  # noqa: E402
from nnpatch.release import make_release  # noqa: E402
from nnpatch.signing import generate_keypair  # noqa: E402
from nnpatch.weights import write_safetensors  # noqa: E402

from .feedserver import Fault, FeedServer  # noqa: E402
from .test_json_schemas import check  # noqa: E402

FAST = fetch.FetchOptions(connect_timeout=2.0, read_timeout=0.2, retries=3, backoff=0.0)


@pytest.fixture(autouse=True)
def _fast_fetch(monkeypatch):
    monkeypatch.setattr(fetch, "DEFAULT_OPTIONS", FAST)


def _models(root, n=3, shape=(256, 64), seed=0):
    """root/v1/model.safetensors ... root/vn/model.safetensors (the CI layout): each version
    changes an eighth of the rows of the one before."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    b = rng.standard_normal(shape[1]).astype(np.float32)
    paths = []
    for v in range(1, n + 1):
        if v > 1:
            rows = rng.choice(shape[0], shape[0] // 8, replace=False)
            w[rows] += rng.standard_normal((len(rows), shape[1])).astype(np.float32)
        d = root / f"v{v}"
        d.mkdir(parents=True)
        write_safetensors(d / "model.safetensors", {"w": ("F32", shape, w.tobytes()), "b": ("F32", (shape[1],),
                                                                                               b.tobytes())})
        paths.append(d / "model.safetensors")
    return paths


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r


class World:
    def __init__(self, tmp):
        self.tmp = tmp
        self.versions = _models(tmp / "src")
        self.key = tmp / "keys" / "release.pem"
        self.pub = tmp / "keys" / "release.pub.pem"
        self.key.parent.mkdir()
        generate_keypair(str(self.key), str(self.pub))
        self.dist = tmp / "dist"
        self.dev = tmp / "device"
        self.dev.mkdir()
        self.model = self.dev / "model.safetensors"

    def publish(self, olds, new, *extra, dist=None):
        dist = dist or self.dist
        r = run("release", *olds, "--to", new, "-o", dist, "--sign-key", self.key, *extra, "--json")
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    def install(self, version_path):
        shutil.copyfile(version_path, self.model)

    def files(self):
        return sorted(os.listdir(self.dev))

    def update(self, url, *extra, key=True):
        args = ["update", self.model, "--manifest", url, "--json", *extra]
        if key:
            args += ["--key", self.pub]
        return run(*args)


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


@pytest.fixture
def served(world):
    """Release 5: v1 and v2 to v3, signed, expiring in a day, served over HTTP."""
    m = world.publish([world.versions[0], world.versions[1]], world.versions[2], "--version", "5", "--expires", "1d")
    with FeedServer(world.dist) as srv:
        world.srv = srv
        world.manifest = m
        yield world


def refused(world, r, code, before, match):
    assert r.exit_code == code, r.output
    obj = json.loads(r.stdout)
    assert set(obj) == {"ok", "error"} and set(obj["error"]) == {"code", "kind", "message"}
    assert obj["ok"] is False and obj["error"]["code"] == code
    assert match in obj["error"]["message"], obj["error"]["message"]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ")
    assert world.model.read_bytes() == before


# --- the happy path -----------------------------------------------------------------------------------

def test_signed_feed_over_http_end_to_end(served):
    w = served
    m = w.manifest
    assert m["release"] == 5 and m["target"]["name"] == "v3" and [b["name"] for b in m["bases"]] == ["v1", "v2"]
    check("release-manifest", json.dumps(m))
    envelope = json.loads((w.dist / "manifest.json").read_bytes())
    check("release-envelope", json.dumps(envelope))
    assert envelope["payloadType"] == trust.PAYLOAD_TYPE
    assert json.loads(base64.b64decode(envelope["payload"])) == m
    w.install(w.versions[0])
    r = w.update(w.srv.url("manifest.json"))
    assert r.exit_code == 0, r.output
    out = check("update", r.stdout)
    assert out["status"] == "updated" and out["release"] == 5 and out["signed"] and out["key_id"]
    assert out["from_name"] == "v1" and out["to_name"] == "v3" and out["patches"] == ["v1-to-v3.nnpatch"]
    assert out["downloaded_bytes"] == out["patch_bytes"] == m["bases"][0]["patch_size"]
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]
    accepted = state.read_state(w.model)
    assert accepted.release == 5 and accepted.target_blake3 == m["target"]["blake3"]
    again = w.update(w.srv.url("manifest.json"))
    assert again.exit_code == 0 and json.loads(again.stdout)["status"] == "current"
    human = run("update", w.model, "--manifest", w.srv.url("manifest.json"), "--key", w.pub)
    assert "already release 5 (v3): nothing to do" in human.stdout


def test_every_patch_is_signed_and_listed_as_signed(served):
    from nnpatch.patchfile import read_patch

    for b in served.manifest["bases"]:
        with read_patch(served.dist / b["patch"]) as p:
            assert p.signature is not None
        assert os.path.getsize(served.dist / b["patch"]) == b["patch_size"]


def test_dry_run_downloads_nothing_and_writes_nothing(served):
    w = served
    w.install(w.versions[1])
    r = w.update(w.srv.url("manifest.json"), "--dry-run")
    assert r.exit_code == 0, r.output
    out = check("update", r.stdout)
    assert out["status"] == "would-update" and out["patches"] == ["v2-to-v3.nnpatch"] and out["dry_run"]
    assert out["patch_bytes"] == w.manifest["bases"][1]["patch_size"] and out["to_name"] == "v3"
    assert [e.path for e in w.srv.log] == ["manifest.json"]
    assert w.files() == ["model.safetensors"]
    human = run("update", w.model, "--manifest", w.srv.url("manifest.json"), "--key", w.pub, "--dry-run")
    assert "would fetch v2-to-v3.nnpatch" in human.stdout and "release 5 (v3)" in human.stdout


@pytest.mark.parametrize("prefer", ["chain", "smallest"])
def test_chains_download_every_link(world, prefer):
    world.publish([world.versions[0], world.versions[1]], world.versions[2], "--version", "1", "--chain", "always")
    with FeedServer(world.dist) as srv:
        world.install(world.versions[0])
        r = world.update(srv.url("manifest.json"), "--prefer", prefer)
        assert r.exit_code == 0, r.output
        assert world.model.read_bytes() == world.versions[2].read_bytes()
        if prefer == "chain":
            assert json.loads(r.stdout)["patches"] == ["v1-to-v2.nnpatch", "v2-to-v3.nnpatch"]
        assert world.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]


def test_in_place_over_http(served):
    w = served
    w.install(w.versions[0])
    r = w.update(w.srv.url("manifest.json"), "--in-place")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["in_place"] is True
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]


def test_base_url_points_a_local_manifest_at_the_server(world):
    """The manifest is local (or on another host); --base-url says where the patches are."""
    world.dist.mkdir()
    with FeedServer(world.dist) as srv:
        meta = world.tmp / "meta"
        world.publish([world.versions[0]], world.versions[2], "--version", "2", "--base-url", srv.base.rstrip("/"),
                      dist=meta)
        shutil.move(meta / "v1-to-v3.nnpatch", world.dist / "v1-to-v3.nnpatch")
        world.install(world.versions[0])
        r = world.update(meta / "manifest.json")
        assert r.exit_code == 0, r.output
        assert [e.path for e in srv.log] == ["v1-to-v3.nnpatch"]
        assert world.model.read_bytes() == world.versions[2].read_bytes()


def test_unsigned_feed_for_trusted_networks(world):
    r = run("release", world.versions[0], "--to", world.versions[2], "-o", world.dist)
    assert r.exit_code == 0 and "unsigned (for trusted networks only)" in r.stdout
    with FeedServer(world.dist) as srv:
        world.install(world.versions[0])
        r = world.update(srv.url("manifest.json"), key=False)
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["signed"] is False and out["key_id"] is None and out["release"] is None
        assert world.files() == ["model.safetensors"]  # no state without a key


def test_no_patch_leads_from_this_version_exits_7(served):
    w = served
    write_safetensors(w.model, {"x": ("F32", (2,), b"\0" * 8)})
    before = w.model.read_bytes()
    r = w.update(w.srv.url("manifest.json"))
    refused(w, r, EXIT_NO_PATCH, before, "a full download is needed")
    assert json.loads(r.stdout)["error"]["kind"] == "NoUpdatePathError"


# --- resume -------------------------------------------------------------------------------------------

def _patch_faults(*faults):
    """The given faults for the first requests of a patch, then none."""
    queue = list(faults)

    def decide(path, rng):
        if path.endswith(".nnpatch") and queue:
            return queue.pop(0)
        return None

    return decide


def test_a_cut_connection_resumes_with_a_range_request(served):
    w = served
    size = w.manifest["bases"][0]["patch_size"]
    w.install(w.versions[0])
    w.srv.set_faults(_patch_faults(Fault("cut", at=size // 3), Fault("stall", at=size // 2, seconds=0.5)))
    r = w.update(w.srv.url("manifest.json"))
    assert r.exit_code == 0, r.output
    patch_log = [e for e in w.srv.log if e.path.endswith(".nnpatch")]
    assert [e.range for e in patch_log] == [None, f"bytes={size // 3}-", f"bytes={size // 3 + size // 2}-"]
    assert sum(e.sent for e in patch_log) == size  # nothing fetched twice
    assert json.loads(r.stdout)["downloaded_bytes"] == size
    assert w.model.read_bytes() == w.versions[2].read_bytes()


def test_a_download_resumes_in_the_next_run(served, monkeypatch):
    w = served
    monkeypatch.setattr(fetch, "DEFAULT_OPTIONS", fetch.FetchOptions(read_timeout=0.2, retries=0, backoff=0.0))
    entry = w.manifest["bases"][0]
    size = entry["patch_size"]
    w.install(w.versions[0])
    before = w.model.read_bytes()
    w.srv.set_faults(_patch_faults(Fault("cut", at=size - 100)))
    r = w.update(w.srv.url("manifest.json"))
    refused(w, r, 5, before, "connection")
    part = partial_path(w.model, entry["patch_blake3"])
    assert os.path.getsize(part) == size - 100
    assert w.files() == sorted(["model.safetensors", "model.safetensors.nnpatch-state", os.path.basename(part)])
    w.srv.clear_log()
    r = w.update(w.srv.url("manifest.json"))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["resumed_bytes"] == size - 100 and out["downloaded_bytes"] == 100
    assert [e.range for e in w.srv.log if e.path.endswith(".nnpatch")] == [f"bytes={size - 100}-"]
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]


def test_server_errors_are_retried_and_a_server_without_ranges_restarts(served):
    w = served
    size = w.manifest["bases"][0]["patch_size"]
    w.install(w.versions[0])
    w.srv.set_faults(_patch_faults(Fault("status", status=503), Fault("cut", at=size // 2), Fault("no_range")))
    r = w.update(w.srv.url("manifest.json"))
    assert r.exit_code == 0, r.output
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    assert [e.status for e in w.srv.log if e.path.endswith(".nnpatch")] == [503, 200, 200]


def test_a_flipped_byte_is_fetched_again_from_the_start(served):
    w = served
    size = w.manifest["bases"][0]["patch_size"]
    w.install(w.versions[0])
    w.srv.set_faults(_patch_faults(Fault("cut", at=size // 2), Fault("flip", at=10)))
    r = w.update(w.srv.url("manifest.json"))
    assert r.exit_code == 0, r.output
    log = [e for e in w.srv.log if e.path.endswith(".nnpatch")]
    assert [e.range for e in log] == [None, f"bytes={size // 2}-", None]
    assert w.model.read_bytes() == w.versions[2].read_bytes()


def test_network_errors_exit_5(served):
    w = served
    w.install(w.versions[0])
    before = w.model.read_bytes()
    w.srv.set_faults(lambda path, rng: Fault("status", status=404) if path.endswith(".nnpatch") else None)
    refused(w, w.update(w.srv.url("manifest.json")), 5, before, "HTTP 404")
    refused(w, w.update(w.srv.url("missing.json")), 5, before, "HTTP 404")
    w.srv.set_faults(lambda path, rng: Fault("status", status=503))
    refused(w, w.update(w.srv.url("manifest.json")), 5, before, "gave up after 4 tries")
    refused(w, w.update("http://127.0.0.1:9/manifest.json"), 5, before, "connection refused")


# --- refusals ----------------------------------------------------------------------------------------

def _envelope(w):
    return json.loads((w.dist / "manifest.json").read_bytes())


def _write_envelope(w, env):
    (w.dist / "manifest.json").write_text(json.dumps(env))


def _resign(w, manifest, key=None):
    raw, _ = trust.sign_manifest(json.dumps(manifest).encode(), key or w.key)
    (w.dist / "manifest.json").write_bytes(raw)


def test_refusals_leave_the_model_untouched(served):
    w = served
    w.install(w.versions[0])
    before = w.model.read_bytes()
    url = w.srv.url("manifest.json")
    good = (w.dist / "manifest.json").read_bytes()
    m = w.manifest

    def reset():
        (w.dist / "manifest.json").write_bytes(good)

    # tampered manifest: the payload changed, the signature not
    env = _envelope(w)
    env["payload"] = base64.b64encode(json.dumps(dict(m, release=99)).encode()).decode()
    _write_envelope(w, env)
    refused(w, w.update(url), 4, before, "no signature verifies")
    # a signature with a flipped bit
    reset()
    env = _envelope(w)
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[5] ^= 1
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    _write_envelope(w, env)
    refused(w, w.update(url), 4, before, "no signature verifies")
    # another key
    reset()
    other, other_pub = w.tmp / "keys" / "other.pem", w.tmp / "keys" / "other.pub.pem"
    generate_keypair(str(other), str(other_pub))
    _resign(w, m, other)
    refused(w, w.update(url), 4, before, "signed by key")
    reset()
    refused(w, run("update", w.model, "--manifest", url, "--key", other_pub, "--json"), 4, before, "signed by key")
    # unsigned under --key
    (w.dist / "manifest.json").write_text(json.dumps(m))
    refused(w, w.update(url), 4, before, "not signed")
    # expired
    _resign(w, dict(m, expires=manifest.format_time(time.time() - 60)))
    refused(w, w.update(url), 4, before, "expired")
    # a signed manifest without a release number
    _resign(w, {k: v for k, v in m.items() if k != "release"})
    refused(w, w.update(url), 4, before, "must carry a release number")
    assert w.files() == ["model.safetensors"]  # nothing accepted, so no state
    # a patch whose bytes do not match the manifest (persistently)
    reset()
    patch = w.dist / m["bases"][0]["patch"]
    good_patch = patch.read_bytes()
    bad = bytearray(good_patch)
    bad[len(bad) // 2] ^= 1
    patch.write_bytes(bytes(bad))
    refused(w, w.update(url), 4, before, "does not match the manifest")
    patch.write_bytes(good_patch)
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]  # the partial file is gone


def test_mix_and_match_is_refused(served):
    """A patch of another (validly signed) release served under this release's patch name."""
    w = served
    other = w.tmp / "other"
    w.publish([w.versions[0]], w.versions[1], "--version", "6", dist=other)
    w.install(w.versions[0])
    before = w.model.read_bytes()
    shutil.copyfile(other / "v1-to-v2.nnpatch", w.dist / "v1-to-v3.nnpatch")
    refused(w, w.update(w.srv.url("manifest.json")), 4, before, "bytes, the manifest says")
    # the same size, other bytes: refused by the digest
    data = bytearray((other / "v1-to-v2.nnpatch").read_bytes())
    want = w.manifest["bases"][0]["patch_size"]
    data = (bytes(data) * (want // len(data) + 1))[:want]
    (w.dist / "v1-to-v3.nnpatch").write_bytes(data)
    refused(w, w.update(w.srv.url("manifest.json")), 4, before, "does not match the manifest")
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]


def test_an_older_release_replayed_is_refused(served):
    """The device accepted release 5 (its download then failed); a replayed, validly signed
    release 4 that would move it to v2 is refused."""
    w = served
    older = w.tmp / "older"
    w.publish([w.versions[0]], w.versions[1], "--version", "4", "--expires", "1d", dist=older)
    w.install(w.versions[0])
    before = w.model.read_bytes()
    w.srv.set_faults(lambda path, rng: Fault("status", status=404) if path.endswith(".nnpatch") else None)
    refused(w, w.update(w.srv.url("manifest.json")), 5, before, "404")
    assert state.read_state(w.model).release == 5
    w.srv.set_faults(None)
    shutil.copyfile(older / "manifest.json", w.dist / "manifest.json")
    shutil.copyfile(older / "v1-to-v2.nnpatch", w.dist / "v1-to-v2.nnpatch")
    refused(w, w.update(w.srv.url("manifest.json")), 4, before, "older than release 5")
    # the same release number naming another target
    _resign(w, dict(json.loads(base64.b64decode(_envelope(w)["payload"])), release=5))
    refused(w, w.update(w.srv.url("manifest.json")), 4, before, "names another target")
    # and without --key the device refuses to leave the signed feed
    r = w.update(w.srv.url("manifest.json"), key=False)
    refused(w, r, 4, before, "follows a signed feed")
    assert state.read_state(w.model).release == 5


def test_a_damaged_state_file_is_refused(served):
    w = served
    w.install(w.versions[0])
    before = w.model.read_bytes()
    (w.dev / "model.safetensors.nnpatch-state").write_text('{"release": "lots"}')
    refused(w, w.update(w.srv.url("manifest.json")), 3, before, "not an nnpatch update state")


def test_release_needs_a_version_to_sign(world):
    r = run("release", world.versions[0], "--to", world.versions[1], "-o", world.dist, "--sign-key", world.key)
    assert r.exit_code == 2 and "needs --version" in r.output
    r = run("release", world.versions[0], "--to", world.versions[1], "-o", world.dist, "--expires", "soon")
    assert r.exit_code == 2 and "duration" in r.output
    r = run("release", world.versions[0], "--to", world.versions[1], "-o", world.dist, "--base-url", "ftp://x/")
    assert r.exit_code == 2 and "base-url" in r.output
    r = run("release", world.versions[0], "--to", world.versions[1], "-o", world.dist, "--sign-key", world.key,
            "--version", "1")
    assert r.exit_code == 0 and "no --expires" in r.stderr


# --- units ------------------------------------------------------------------------------------------------

def test_durations_and_times():
    assert [manifest.parse_duration(s) for s in ("90d", "12h", "30s", "5m", "2w")] == [
        90 * 86400, 12 * 3600, 30, 300, 14 * 86400]
    for bad in ("", "0d", "-1d", "1y", "1.5h", "d"):
        with pytest.raises(Exception, match="duration"):
            manifest.parse_duration(bad)
    assert manifest.parse_time("1970-01-01T00:00:00Z") == 0
    assert manifest.format_time(1700000000) == "2023-11-14T22:13:20Z"
    for bad in ("2025-02-30T00:00:00Z", "2025-01-01 00:00:00Z", "2025-01-01T00:00:00+00:00", 7, None):
        assert manifest.parse_time(bad) is None


def test_pae_is_dsse_v1():
    # the encoding of github.com/secure-systems-lab/dsse (protocol.md)
    assert trust.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")


def test_manifest_fields_are_validated(world):
    from nnpatch.errors import PatchFormatError
    from nnpatch.delivery.manifest import parse_manifest

    m = make_release([world.versions[0]], world.versions[1], world.dist, release=3, expires=60,
                     base_url="https://cdn.example/m")
    assert m["base_url"] == "https://cdn.example/m/" and m["release"] == 3
    assert manifest.parse_time(m["expires"]) - manifest.parse_time(m["created"]) == 60
    for bad, match in [(dict(m, release=-1), "release"), (dict(m, release=True), "release"),
                       (dict(m, release=2**53), "release"), (dict(m, expires="tomorrow"), "expires"),
                       (dict(m, base_url="file:///etc/"), "base_url")]:
        with pytest.raises(PatchFormatError, match=match):
            parse_manifest(json.dumps(bad).encode())


def test_library_update_takes_a_clock(world):
    m = make_release([world.versions[0]], world.versions[1], world.dist, sign_key=world.key, release=1,
                     expires=3600)
    world.install(world.versions[0])
    from nnpatch.errors import IntegrityError

    with pytest.raises(IntegrityError, match="expired"):
        update(world.model, world.dist / "manifest.json", key=world.pub, now=manifest.parse_time(m["expires"]) + 1)
    r = update(world.model, world.dist / "manifest.json", key=world.pub)
    assert r.updated and r.release == 1


# --- faults ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_faulted_updates_end_old_or_new(served, capsys, monkeypatch):
    """At least 200 updates through random faults: cuts and stalls at random byte offsets, 5xx,
    flipped bytes, ranges ignored. Each ends with the model exactly OLD or exactly NEW, at most one
    error line, and no file but the state and the one partial download to resume."""
    w = served
    # one retry within a run: some runs give up (exit 5) and the next one resumes their download
    monkeypatch.setattr(fetch, "DEFAULT_OPTIONS", fetch.FetchOptions(read_timeout=0.15, retries=1, backoff=0.0))
    rng = random.Random(14)
    entry = w.manifest["bases"][0]
    size = entry["patch_size"]
    old, new = w.versions[0].read_bytes(), w.versions[2].read_bytes()
    part = os.path.basename(partial_path(w.model, entry["patch_blake3"]))
    counts = {"faults": 0}

    def decide(path, rng_header):
        if rng.random() < 0.45:
            return None
        counts["faults"] += 1
        kind = rng.choices(["cut", "stall", "status", "flip", "no_range"], [8, 1, 3, 2, 1])[0]
        counts[kind] = counts.get(kind, 0) + 1
        return Fault(kind, at=rng.randrange(0, size), status=rng.choice([500, 502, 503]), seconds=0.3)

    w.srv.set_faults(decide)
    w.install(w.versions[0])
    outcomes = {"OLD": 0, "NEW": 0}
    codes: dict[int, int] = {}
    resumed = downloaded = 0
    attempts = 200
    for _ in range(attempts):
        r = w.update(w.srv.url("manifest.json"))
        codes[r.exit_code] = codes.get(r.exit_code, 0) + 1
        assert r.exit_code in (0, 3, 4, 5), r.output  # 3: a byte flipped twice in the manifest
        data = w.model.read_bytes()
        assert data in (old, new)
        files = set(w.files())
        assert files <= {"model.safetensors", "model.safetensors.nnpatch-state", part}, files
        if r.exit_code:
            assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), r.stderr
            assert data == old
            outcomes["OLD"] += 1
        else:
            assert data == new and part not in files
            out = json.loads(r.stdout)
            resumed += out["resumed_bytes"]
            downloaded += out["downloaded_bytes"]
            outcomes["NEW"] += 1
            w.install(w.versions[0])  # back to OLD for the next attempt
    sent = sum(e.sent for e in w.srv.log if e.path.endswith(".nnpatch"))
    needed = outcomes["NEW"] * size
    with capsys.disabled():
        print(f"\nfaulted updates: {attempts} attempts, {outcomes['OLD']} ended OLD, {outcomes['NEW']} ended NEW; "
              f"exit codes {dict(sorted(codes.items()))}; faults {counts}; patch {size} B; "
              f"patch bytes sent {sent}, needed {needed} (re-fetched {sent - needed}); "
              f"resumed across runs {resumed} B")
    assert outcomes["NEW"] >= attempts // 4 and outcomes["OLD"] >= 1
    # a flip, an ignored range or a mismatch costs at most a whole patch; a cut or stall nothing sent twice
    assert sent - needed <= (counts.get("flip", 0) + counts.get("no_range", 0) + 2) * size


def test_model_directories_over_http(tmp_path):
    from .test_directory_target import contents
    from .test_release import _dir_versions

    v1, v2, v3 = _dir_versions(tmp_path)
    key, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    generate_keypair(str(key), str(pub))
    r = run("release", v1, v2, "--to", v3, "-o", tmp_path / "dist", "--sign-key", key, "--version", "1")
    assert r.exit_code == 0, r.output
    local = tmp_path / "device" / "model"
    shutil.copytree(v1, local)
    with FeedServer(tmp_path / "dist") as srv:
        r = run("update", local, "--manifest", srv.url("manifest.json"), "--key", pub, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["from_name"] == "v1"
    assert contents(local) == contents(v3)
    assert sorted(os.listdir(local.parent)) == ["model", "model.nnpatch-state"]


def test_no_room_for_the_download_is_refused_first(served, monkeypatch):
    import types

    w = served
    w.install(w.versions[0])
    before = w.model.read_bytes()
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_bavail=1, f_frsize=4096))
    refused(w, w.update(w.srv.url("manifest.json")), 5, before, "more bytes beside the model")
    assert not any(e.path.endswith(".nnpatch") for e in w.srv.log)


# --- review fixes: leftovers, redirects, headers, ranges ---------------------------------------------

def test_a_refused_download_leaves_no_partial_file(served):
    """A patch the server does not have (404) or has at another size leaves nothing to resume: no
    empty or refused partial file stays beside the model."""
    w = served
    w.install(w.versions[0])
    before = w.model.read_bytes()
    w.srv.set_faults(lambda path, rng: Fault("status", status=404) if path.endswith(".nnpatch") else None)
    refused(w, w.update(w.srv.url("manifest.json")), 5, before, "HTTP 404")
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]
    w.srv.set_faults(None)
    entry = w.manifest["bases"][0]
    (w.dist / entry["patch"]).write_bytes(b"x" * (entry["patch_size"] + 1))  # the server's file is another
    refused(w, w.update(w.srv.url("manifest.json")), 4, before, "the manifest says")
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]


def test_a_resume_answered_with_the_wrong_range_starts_over(served, monkeypatch):
    """206 with bytes other than those asked for: the partial file is not continued with them, the
    download starts again from byte 0."""
    w = served
    monkeypatch.setattr(fetch, "DEFAULT_OPTIONS", fetch.FetchOptions(read_timeout=0.2, retries=2, backoff=0.0))
    size = w.manifest["bases"][0]["patch_size"]
    w.install(w.versions[0])
    w.srv.set_faults(_patch_faults(Fault("cut", at=size // 2), Fault("bad_range")))
    r = w.update(w.srv.url("manifest.json"))
    assert r.exit_code == 0, r.output
    assert [(e.range, e.status) for e in w.srv.log if e.path.endswith(".nnpatch")] == [
        (None, 200), (f"bytes={size // 2}-", 206), (None, 200)]
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]


def test_redirects_are_followed_within_http_and_refused_elsewhere(served):
    w = served
    w.install(w.versions[0])
    before = w.model.read_bytes()
    name = w.manifest["bases"][0]["patch"]
    (w.dist / "moved").mkdir()
    shutil.copyfile(w.dist / name, w.dist / "moved" / name)
    w.srv.set_faults(lambda path, rng: Fault("redirect", location=f"/moved/{name}") if path == name else None)
    r = w.update(w.srv.url("manifest.json"))
    assert r.exit_code == 0, r.output
    assert [e.path for e in w.srv.log if e.path.endswith(".nnpatch")] == [name, f"moved/{name}"]
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    shutil.copyfile(before_path := w.versions[0], w.model)
    for location in ("file:///etc/passwd", "ftp://127.0.0.1/x.nnpatch"):
        w.srv.clear_log()
        w.srv.set_faults(lambda path, rng, loc=location: Fault("redirect", location=loc) if path == name else None)
        refused(w, w.update(w.srv.url("manifest.json")), 5, before_path.read_bytes(), "refused")
        assert len([e for e in w.srv.log if e.path == name]) == 1  # not retried: it will not change
        assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]
    w.srv.set_faults(lambda path, rng: Fault("redirect", location=f"/{path}"))  # a loop
    refused(w, w.update(w.srv.url("manifest.json")), 5, before, "more than 5 redirects")


def test_redirect_policy_never_leaves_https():
    assert fetch.redirect_allowed("https://a/m.json", "https://b/m.json")
    assert fetch.redirect_allowed("http://a/m.json", "https://b/m.json")
    assert fetch.redirect_allowed("http://a/m.json", "http://b/m.json")
    assert not fetch.redirect_allowed("https://a/m.json", "http://a/m.json")
    assert not fetch.redirect_allowed("https://a/m.json", "file:///etc/passwd")
    assert not fetch.redirect_allowed("http://a/m.json", "ftp://a/m.json")


def test_requests_carry_the_updaters_own_headers(served):
    """Headers given for one request (Range) are added to the pool's, not put in their place."""
    w = served
    size = w.manifest["bases"][0]["patch_size"]
    w.install(w.versions[0])
    w.srv.set_faults(_patch_faults(Fault("cut", at=size // 2)))
    r = w.update(w.srv.url("manifest.json"))
    assert r.exit_code == 0, r.output
    assert [e.range for e in w.srv.log if e.path.endswith(".nnpatch")] == [None, f"bytes={size // 2}-"]
    assert {e.agent for e in w.srv.log} == {"nnpatch-update"}


def test_a_full_disk_while_downloading_is_not_retried(served, monkeypatch):
    import errno

    w = served
    w.install(w.versions[0])
    before = w.model.read_bytes()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch, "_write_all", full)
    refused(w, w.update(w.srv.url("manifest.json")), 5, before, "No space left on device")
    assert len([e for e in w.srv.log if e.path.endswith(".nnpatch")]) == 1
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]


def test_a_download_resumes_with_a_relative_model_path(served, monkeypatch):
    """The partial file of this update is kept whatever the model's path looks like (a relative
    path once made the stale-partials sweep remove it before the resume), and only this model's
    partial files are swept: not those of a model whose name starts with this one's."""
    w = served
    monkeypatch.setattr(fetch, "DEFAULT_OPTIONS", fetch.FetchOptions(read_timeout=0.2, retries=0, backoff=0.0))
    monkeypatch.chdir(w.dev)
    entry = w.manifest["bases"][0]
    size = entry["patch_size"]
    w.install(w.versions[0])
    other = w.dev / f"model.safetensors.v2.{'0' * 32}{'.nnpatch-part'}"
    other.write_bytes(b"another model's download")
    stale = w.dev / f"model.safetensors.{'1' * 32}.nnpatch-part"
    stale.write_bytes(b"an old download of this model")
    w.srv.set_faults(_patch_faults(Fault("cut", at=size - 100)))
    args = ["update", "model.safetensors", "--manifest", w.srv.url("manifest.json"), "--key", w.pub, "--json"]
    assert run(*args).exit_code == 5
    assert os.path.getsize(partial_path(w.model, entry["patch_blake3"])) == size - 100
    r = run(*args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["resumed_bytes"] == size - 100 and out["downloaded_bytes"] == 100
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    assert w.files() == sorted(["model.safetensors", "model.safetensors.nnpatch-state", other.name])
