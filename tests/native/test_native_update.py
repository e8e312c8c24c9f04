"""nnpatch-update and libnnpatch's nnp_update (issue 23): the release-feed updater without Python.

- spec/vectors/manifest: every case through nnpatch-update gives the exit code, error class, model and
  state file the index gives (tests/test_manifest_vectors.py runs the same index through `nnpatch
  update`, with the same verdicts);
- a signed feed over HTTP (tests/feedserver.py, 127.0.0.1): updated, resumed after a cut (within a run
  by a Range request, across runs from the partial file), a wrong digest refused with the model as it
  was, a redirect out of http(s) refused, a batch of randomly faulted updates (each ends exactly OLD
  or exactly NEW, one Error: line);
- interop: a state file written by either updater is honoured by the other (a replay refused);
- kill -9 of `nnpatch-update --in-place` at random moments, then the same command: the new version.

Every test runs against the host build and the ASan/UBSan build (native_impl).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner

pytest.importorskip("cryptography")
pytest.importorskip("urllib3")

from nnpatch.cli import cli  # noqa: E402
from nnpatch.delivery import state as pystate  # noqa: E402

from ..feedserver import Fault, FeedServer  # noqa: E402
from ..test_manifest_vectors import CASES, HERE, STATE, check_after, lay_out  # noqa: E402
from ..test_json_schemas import check as check_schema  # noqa: E402
from ..test_update_net import World, _models  # noqa: E402

# native runs are quick to give up on a broken network: whole seconds are the CLI's unit
FAST = ["--timeout", "2", "--retries", "2"]


# --- the build ------------------------------------------------------------------------------------

def test_only_the_command_links_libcurl(native, tmp_path, capsys):
    lib = subprocess.run(["ldd", str(native.lib_so)], capture_output=True, text=True, check=True).stdout
    cmd = subprocess.run(["ldd", str(native.update)], capture_output=True, text=True, check=True).stdout
    assert "libcurl" not in lib and "libcurl" in cmd and "libnnpatch" not in cmd, (lib, cmd)
    out = tmp_path / "nnpatch-update"
    subprocess.run(["strip", "-o", str(out), str(native.update)], check=True)
    size = out.stat().st_size
    with capsys.disabled():
        print(f"\nstripped nnpatch-update: {size} bytes ({size / 1024:.1f} KiB; libcurl, libzstd, libsodium shared)")
    assert size <= 512 * 1024


# --- the shared vectors ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_manifest_vectors(native_impl, case, tmp_path):
    model, manifest = lay_out(case, tmp_path)
    args = [model, "--manifest", manifest, "--json"]
    if case["key"] is not None:
        args += ["--key", os.path.join(HERE, case["key"])]
    r = native_impl.run_update(*args)
    out = check_schema("error" if case["exit"] else "update", r.stdout.decode())  # `nnpatch update --json`'s
    assert r.returncode == case["exit"], r.stderr
    if case["exit"]:
        lines = r.stderr.decode().strip("\n").splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
        assert out["ok"] is False and out["error"]["code"] == case["exit"]
        assert out["error"]["kind"] == case["error"], out
    else:
        assert out["ok"] is True and out["status"] in ("updated", "current"), out
        assert out["status"] == case["verdict"], out
    check_after(case, tmp_path)


def test_a_private_key_is_a_usage_error(native_impl, tmp_path):
    case = next(c for c in CASES if c["name"] == "signed")
    model, manifest = lay_out(case, tmp_path)
    r = native_impl.run_update(model, "--manifest", manifest, "--key", os.path.join(HERE, "TEST-ONLY-release-key.pem"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.decode().count("\n") == 1 and r.stderr.startswith(b"Error: ")
    assert b"private key" in r.stderr


@pytest.mark.parametrize("args", [[], ["M"], ["M", "--manifest"], ["M", "N", "--manifest", "x"],
                                  ["M", "--manifest", "x", "--prefer", "fast"], ["M", "--manifest", "x", "--bogus"],
                                  ["M", "--manifest", "x", "--timeout", "0"],
                                  ["M", "--manifest", "x", "--header", "no colon"]])
def test_usage_errors_exit_2(native_impl, args):
    r = native_impl.run_update(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.decode().count("\n") == 1 and r.stderr.startswith(b"Error: ")


# --- over HTTP --------------------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path):
    """Release 5: v1 and v2 to v3, signed, expiring in a day, served on 127.0.0.1."""
    w = World(tmp_path)
    w.manifest = w.publish([w.versions[0], w.versions[1]], w.versions[2], "--version", "5", "--expires", "1d")
    with FeedServer(w.dist) as srv:
        w.srv = srv
        yield w


def native_update(impl, w, *extra, key=True, url=None):
    args = [w.model, "--manifest", url or w.srv.url("manifest.json"), "--json", *FAST, *extra]
    if key:
        args += ["--key", w.pub]
    return impl.run_update(*args)


def one_error_line(r):
    text = r.stderr.decode()
    assert text.count("\n") == 1 and text.startswith("Error: "), text


def test_signed_feed_over_http(native_impl, served):
    w = served
    w.install(w.versions[0])
    r = native_update(native_impl, w)
    assert r.returncode == 0, r.stderr
    out = check_schema("update", r.stdout.decode())
    assert out["status"] == "updated" and out["release"] == 5 and out["signed"] and out["key_id"]
    assert out["downloaded_bytes"] == w.manifest["bases"][0]["patch_size"]
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]
    assert all(e.agent.startswith("nnpatch-update/") for e in w.srv.log)
    r = native_update(native_impl, w)
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "current", r.stderr


def test_dry_run_downloads_nothing_and_writes_nothing(native_impl, served):
    w = served
    w.install(w.versions[1])
    r = native_update(native_impl, w, "--dry-run")
    assert r.returncode == 0, r.stderr
    out = check_schema("update", r.stdout.decode())
    assert out["status"] == "would-update" and out["patches"] == ["v2-to-v3.nnpatch"] and out["dry_run"]
    assert out["patch_bytes"] == w.manifest["bases"][1]["patch_size"] and out["to_name"] == "v3"
    assert [e.path for e in w.srv.log] == ["manifest.json"]
    assert w.files() == ["model.safetensors"]
    human = native_impl.run_update(w.model, "--manifest", w.srv.url("manifest.json"), "--key", w.pub, "--dry-run")
    assert b"would fetch v2-to-v3.nnpatch" in human.stdout and b"release 5 (v3)" in human.stdout, human.stdout


@pytest.mark.parametrize("prefer", ["chain", "smallest", "direct"])
def test_chains_download_every_link(native_impl, tmp_path, prefer):
    w = World(tmp_path)
    w.publish([w.versions[0], w.versions[1]], w.versions[2], "--version", "1", "--chain", "always")
    with FeedServer(w.dist) as srv:
        w.install(w.versions[0])
        r = native_impl.run_update(w.model, "--manifest", srv.url("manifest.json"), "--key", w.pub, "--json",
                                   "--prefer", prefer)
        assert r.returncode == 0, r.stderr
        assert w.model.read_bytes() == w.versions[2].read_bytes()
        patches = json.loads(r.stdout)["patches"]
        if prefer == "chain":
            assert patches == ["v1-to-v2.nnpatch", "v2-to-v3.nnpatch"]
        elif prefer == "direct":
            assert patches == ["v1-to-v3.nnpatch"]
        assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]


def test_in_place_and_headers_over_http(native_impl, served):
    w = served
    w.install(w.versions[1])
    r = native_update(native_impl, w, "--in-place", "--header", "X-Token: abc")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mode"] == "in-place"
    assert w.model.read_bytes() == w.versions[2].read_bytes()


def test_a_cut_resumes_with_a_range_request(native_impl, served):
    w = served
    size = w.manifest["bases"][0]["patch_size"]
    cuts = []

    def faults(path, rng):
        if path.endswith(".nnpatch") and not cuts:
            cuts.append(path)
            return Fault("cut", at=size // 2)
        return None

    w.srv.set_faults(faults)
    w.install(w.versions[0])
    r = native_update(native_impl, w)
    assert r.returncode == 0, r.stderr
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    patch_requests = [e for e in w.srv.log if e.path.endswith(".nnpatch")]
    assert patch_requests[0].range is None and patch_requests[1].range == f"bytes={size // 2}-", patch_requests


def test_a_download_resumes_in_the_next_run(native_impl, served):
    w = served
    size = w.manifest["bases"][0]["patch_size"]
    w.srv.set_faults(lambda path, rng: Fault("cut", at=size // 3) if path.endswith(".nnpatch") else None)
    w.install(w.versions[0])
    r = native_update(native_impl, w, "--retries", "0")
    assert r.returncode == 5, r.stderr
    one_error_line(r)
    assert w.model.read_bytes() == w.versions[0].read_bytes()
    assert len([f for f in w.files() if f.endswith(".nnpatch-part")]) == 1
    w.srv.set_faults(None)
    r = native_update(native_impl, w)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["resumed_bytes"] == size // 3 and out["downloaded_bytes"] == size - size // 3
    assert w.model.read_bytes() == w.versions[2].read_bytes()
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]


def test_a_wrong_digest_is_refused_leaving_the_model(native_impl, served):
    w = served
    w.srv.set_faults(lambda path, rng: Fault("flip", at=100) if path.endswith(".nnpatch") else None)
    w.install(w.versions[0])
    r = native_update(native_impl, w)
    assert r.returncode == 4, r.stderr
    one_error_line(r)
    assert b"does not match the manifest" in r.stderr
    assert json.loads(r.stdout)["error"]["kind"] == "IntegrityError"
    assert w.model.read_bytes() == w.versions[0].read_bytes()
    assert w.files() == ["model.safetensors", "model.safetensors.nnpatch-state"]  # no partial file left


@pytest.mark.parametrize("where,code", [("ftp://127.0.0.1/x", 5), ("file:///etc/passwd", 5)])
def test_redirects_out_of_http_are_refused(native_impl, served, where, code):
    w = served
    w.srv.set_faults(lambda path, rng: Fault("redirect", location=where) if path.endswith(".nnpatch") else None)
    w.install(w.versions[0])
    r = native_update(native_impl, w)
    assert r.returncode == code, r.stderr
    one_error_line(r)
    assert b"refused" in r.stderr
    assert w.model.read_bytes() == w.versions[0].read_bytes()


def test_endless_redirects_are_bounded(native_impl, served):
    w = served
    w.srv.set_faults(lambda path, rng: Fault("redirect", location=w.srv.url("manifest.json")))
    w.install(w.versions[0])
    r = native_update(native_impl, w)
    assert r.returncode == 5 and b"more than 5 redirects" in r.stderr, r.stderr
    one_error_line(r)


def test_a_missing_server_is_an_io_error(native_impl, served):
    w = served
    w.install(w.versions[0])
    with socket_free_port() as port:
        r = native_update(native_impl, w, "--retries", "1", url=f"http://127.0.0.1:{port}/manifest.json")
    assert r.returncode == 5, r.stderr
    one_error_line(r)
    assert w.model.read_bytes() == w.versions[0].read_bytes()


class socket_free_port:
    def __enter__(self):
        import socket
        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        return self.s.getsockname()[1]  # bound, never listening: connections are refused

    def __exit__(self, *exc):
        self.s.close()


def faulted_batch(impl, w, attempts, seed):
    """attempts updates through random faults; (outcomes, exit codes, fault counts)."""
    rng = random.Random(seed)
    size = w.manifest["bases"][0]["patch_size"]
    old, new = w.versions[0].read_bytes(), w.versions[2].read_bytes()
    counts = {"faults": 0}

    def decide(path, rng_header):
        if rng.random() < 0.45:
            return None
        counts["faults"] += 1
        kind = rng.choices(["cut", "stall", "status", "flip", "no_range", "bad_range"], [8, 1, 3, 2, 1, 1])[0]
        counts[kind] = counts.get(kind, 0) + 1
        return Fault(kind, at=rng.randrange(0, size), status=rng.choice([500, 502, 503, 404]), seconds=0.3)

    w.srv.set_faults(decide)
    w.install(w.versions[0])
    outcomes = {"OLD": 0, "NEW": 0}
    codes: dict[int, int] = {}
    for _ in range(attempts):
        r = native_update(impl, w, "--retries", "1")
        codes[r.returncode] = codes.get(r.returncode, 0) + 1
        assert r.returncode in (0, 3, 4, 5), r.stderr  # 3: a byte flipped twice in the manifest
        data = w.model.read_bytes()
        assert data in (old, new)
        files = set(w.files())
        assert all(f in ("model.safetensors", "model.safetensors.nnpatch-state") or f.endswith(".nnpatch-part")
                   for f in files), files
        if r.returncode:
            one_error_line(r)
            assert data == old
            outcomes["OLD"] += 1
        else:
            assert data == new and not any(f.endswith(".nnpatch-part") for f in files)
            outcomes["NEW"] += 1
            w.install(w.versions[0])
    return outcomes, codes, counts


def test_faulted_updates_end_old_or_new(native_impl, served, capsys):
    """200 updates (60 under ASan, slower) through random cuts, stalls, 5xx/404, flipped bytes,
    ignored and wrong ranges: each ends exactly OLD or exactly NEW, with one Error: line."""
    attempts = 200 if native_impl.name == "native" else 60
    outcomes, codes, counts = faulted_batch(native_impl, served, attempts, seed=23)
    with capsys.disabled():
        print(f"\nnative faulted updates ({native_impl.name}): {attempts} attempts, {outcomes['OLD']} ended OLD, "
              f"{outcomes['NEW']} ended NEW; exit codes {dict(sorted(codes.items()))}; faults {counts}")
    assert outcomes["NEW"] >= attempts // 4 and outcomes["OLD"] >= 1


# --- interop: one state file, two updaters ----------------------------------------------------------

def py_update(w, url):
    return CliRunner().invoke(cli, ["update", str(w.model), "--manifest", url, "--key", str(w.pub)])


@pytest.fixture
def two_releases(tmp_path):
    """Release 1 (v1 to v2) in dist1 and release 2 (v1, v2 to v3) in dist2, both served."""
    w = World(tmp_path)
    w.publish([w.versions[0]], w.versions[1], "--version", "1", "--expires", "1d", dist=tmp_path / "feed" / "r1")
    w.publish([w.versions[0], w.versions[1]], w.versions[2], "--version", "2", "--expires", "1d",
              dist=tmp_path / "feed" / "r2")
    with FeedServer(tmp_path / "feed") as srv:
        w.srv = srv
        yield w


def test_python_state_is_honoured_natively(native_impl, two_releases):
    w = two_releases
    w.install(w.versions[0])
    r = py_update(w, w.srv.url("r2/manifest.json"))
    assert r.exit_code == 0, r.output
    w.install(w.versions[0])  # an attacker replays release 1 to a device back at v1
    r = native_update(native_impl, w, url=w.srv.url("r1/manifest.json"))
    assert r.returncode == 4 and b"older than release 2" in r.stderr, r.stderr
    one_error_line(r)
    assert w.model.read_bytes() == w.versions[0].read_bytes()
    r = native_update(native_impl, w, url=w.srv.url("r2/manifest.json"))
    assert r.returncode == 0, r.stderr


def test_native_state_is_honoured_by_python(native_impl, two_releases):
    w = two_releases
    w.install(w.versions[0])
    r = native_update(native_impl, w, url=w.srv.url("r2/manifest.json"))
    assert r.returncode == 0, r.stderr
    st = pystate.read_state(w.model)
    assert st is not None and st.release == 2
    # byte for byte the file state.py writes
    raw = (w.dev / "model.safetensors.nnpatch-state").read_bytes()
    assert raw == (json.dumps(st.to_json(), indent=2, sort_keys=True) + "\n").encode()
    w.install(w.versions[0])
    r = py_update(w, w.srv.url("r1/manifest.json"))
    assert r.exit_code == 4 and "older than release 2" in r.output, r.output


# --- kill -9 and run again ----------------------------------------------------------------------------

@pytest.fixture
def big_served(tmp_path):
    """served, with models of 4 MiB: a run long enough for kills to land in every phase."""
    w = World(tmp_path)
    w.versions = _models(tmp_path / "big", shape=(2048, 512), seed=3)
    w.manifest = w.publish([w.versions[0]], w.versions[2], "--version", "5", "--expires", "1d")
    with FeedServer(w.dist) as srv:
        w.srv = srv
        yield w


def test_kill_9_of_in_place_update_then_rerun(native_impl, big_served, capsys):
    """nnpatch-update --in-place killed at random moments (download, journal, apply, commit); the
    same command again ends at NEW, with no journal or partial file left."""
    w = big_served
    new = w.versions[2].read_bytes()
    rng = random.Random(9)
    args = [*native_impl.update_cmd, str(w.model), "--manifest", w.srv.url("manifest.json"), "--key", str(w.pub),
            "--in-place", *FAST]
    env = native_impl.full_env()
    w.install(w.versions[0])
    t0 = time.monotonic()
    subprocess.run(args, capture_output=True, env=env, timeout=120, check=True)
    took = time.monotonic() - t0
    kills = killed_mid_run = recovered = 0
    rounds = 30 if native_impl.name == "native" else 10
    for _ in range(rounds):
        w.install(w.versions[0])
        for f in w.files():
            if f.endswith(".nnpatch-part"):
                os.unlink(w.dev / f)
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(0, took))
        if p.poll() is None:
            killed_mid_run += 1
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        r = subprocess.run([*args, "--json"], capture_output=True, env=env, timeout=120)
        native_impl.check_sanitizer(r.returncode, r.stderr)
        assert r.returncode == 0, r.stderr
        recovered += json.loads(r.stdout)["recovered"]
        assert w.model.read_bytes() == new
        assert not any(f.endswith(("nnpatch-journal", ".nnpatch-part")) for f in w.files()), w.files()
    with capsys.disabled():
        print(f"\nnative kill -9 ({native_impl.name}): {kills} kills ({killed_mid_run} while running, "
              f"{recovered} reruns rolled a journal back first; a run took {took:.2f} s), every rerun ended at NEW")
    assert killed_mid_run >= rounds // 2


def test_no_room_for_a_second_copy_applies_in_place(native_impl, big_served, tmp_path):
    """As `nnpatch update` without --in-place: on a file system with room for the patch but not
    for a second copy of the model, the update goes in place and says so (a tmpfs of that size;
    mounting one needs root)."""
    w = big_served
    model_size = w.versions[0].stat().st_size
    patch_size = w.manifest["bases"][0]["patch_size"]
    small = tmp_path / "small"
    small.mkdir()
    size = (model_size + patch_size + model_size // 2) // 4096 * 4096
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        model = small / "model.safetensors"
        model.write_bytes(w.versions[0].read_bytes())
        args = [model, "--manifest", w.srv.url("manifest.json"), "--key", w.pub, *FAST]
        r = native_impl.run_update(*args, "--dry-run", "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["mode"] == "in-place" and out["in_place_for_room"] is True, out
        r = native_impl.run_update(*args)
        assert r.returncode == 0, r.stderr
        assert b"in place (no room beside the model for a second copy)" in r.stdout, r.stdout
        assert model.read_bytes() == w.versions[2].read_bytes()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_sigterm_exits_143_leaving_the_model(native_impl, served):
    w = served
    w.srv.set_faults(lambda path, rng: Fault("stall", at=10, seconds=5.0) if path.endswith(".nnpatch") else None)
    w.install(w.versions[0])
    p = subprocess.Popen([*native_impl.update_cmd, str(w.model), "--manifest", w.srv.url("manifest.json"), "--key",
                          str(w.pub), "--timeout", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=native_impl.full_env())
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    native_impl.check_sanitizer(p.returncode, err)
    assert p.returncode == 143, err
    assert err.decode().count("\n") == 1 and err.startswith(b"Error: ")
    assert w.model.read_bytes() == w.versions[0].read_bytes()


# --- the aarch64 cross build (static, no libcurl: local feeds only), under qemu -----------------------

@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_manifest_vectors_aarch64(aarch64, case, tmp_path):
    model, manifest = lay_out(case, tmp_path)
    args = [model, "--manifest", manifest, "--json"]
    if case["key"] is not None:
        args += ["--key", os.path.join(HERE, case["key"])]
    r = aarch64.run_update(*args)
    assert r.returncode == case["exit"], r.stderr
    out = json.loads(r.stdout)
    if case["exit"]:
        assert out["error"]["kind"] == case["error"] and r.stderr.decode().count("\n") == 1, r.stderr
    check_after(case, tmp_path)


def test_the_cross_build_refuses_urls(aarch64, tmp_path):
    case = next(c for c in CASES if c["name"] == "signed")
    model, _ = lay_out(case, tmp_path)
    r = aarch64.run_update(model, "--manifest", "http://127.0.0.1:9/manifest.json", "--key",
                           os.path.join(HERE, case["key"]))
    assert r.returncode == 2 and b"no HTTP client" in r.stderr, r.stderr
    assert r.stderr.decode().count("\n") == 1
