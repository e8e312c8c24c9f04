"""The Java binding's updater (issue 23 item 3): NNPatch.update with the default HttpURLConnection
fetcher against a feed on 127.0.0.1 (tests/feedserver.py) and with a Java Fetcher of the test's own,
the key as PEM text, raw bytes and a file; cancel from another thread mid-download and mid-apply,
Thread.interrupt(), a refused feed, a throwing Fetcher and listener, check(). Each scenario is one
run of native/jni/test/UpdateTest.java under -Xcheck:jni, failed on any JNI warning; every model is
then compared by BLAKE3 with the real target (or with itself before a refused or cancelled update,
and a rerun then reaches the target exactly). Also: every class, method and field name the C glue
looks up is kept by native/jni/proguard-rules.pro."""

from __future__ import annotations

import base64
import os
import re
import subprocess

import blake3
import pytest

pytest.importorskip("cryptography")
pytest.importorskip("urllib3")

from nnpatch.signing import generate_keypair  # noqa: E402

from ..feedserver import Fault, FeedServer  # noqa: E402
from ..test_update_net import World  # noqa: E402
from .conftest import ROOT, SANITIZER_MARKS, require_tool  # noqa: E402
from .test_jni import classes  # noqa: E402,F401  (the compiled binding and tests)

JNI = ROOT / "native" / "jni"


def digest(path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


@pytest.fixture
def feed(tmp_path):
    """Release 5 (v1 and v2 to v3, signed, expiring in a day) on 127.0.0.1; the device holds v1. keys/
    also holds the public key's raw 32 bytes (release.raw) and another key pair (other.*)."""
    w = World(tmp_path)
    w.manifest = w.publish([w.versions[0], w.versions[1]], w.versions[2], "--version", "5", "--expires", "1d")
    der = base64.b64decode("".join(w.pub.read_text().splitlines()[1:-1]))
    (w.key.parent / "release.raw").write_bytes(der[-32:])
    generate_keypair(str(w.key.parent / "other.pem"), str(w.key.parent / "other.pub.pem"))
    w.install(w.versions[0])
    with FeedServer(w.dist) as srv:
        w.srv = srv
        yield w


def java(native, classes, w, scenario, *, manifest=None, arg=None, env=None):  # noqa: F811
    """Run one scenario: (kind, fields) of its RESULT or EXCEPTION line, and its TRACE lines."""
    lib_dir = native if isinstance(native, (str, os.PathLike)) else native.dir
    cmd = [require_tool("java"), "-Xcheck:jni", f"-Djava.library.path={lib_dir}", "-cp", str(classes),
           "UpdateTest", scenario, str(w.model), manifest or w.srv.url("manifest.json"), str(w.key.parent)]
    r = subprocess.run(cmd + ([str(arg)] if arg else []), capture_output=True, text=True, timeout=300,
                       env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "WARNING" not in out and "FATAL" not in out, out  # -Xcheck:jni: refs, pending exceptions, threads
    assert not any(m.decode() in out for m in SANITIZER_MARKS), out
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("RESULT", "EXCEPTION"))]
    assert len(lines) == 1, out
    traces = [ln for ln in r.stdout.splitlines() if ln.startswith("TRACE")]
    if lines[0].startswith("RESULT"):
        return "result", dict(kv.split("=", 1) for kv in lines[0].split()[1:] if "=" in kv), traces
    m = re.match(r"EXCEPTION (\d+) (\S+) (\S+) \| (.*)$", lines[0])
    return "exception", {"status": int(m[1]), "kind": m[2], "cause": m[3], "message": m[4]}, traces


def updated(w, fields):
    assert fields["status"] == "UPDATED", fields
    assert fields["from"] == digest(w.versions[0]) and fields["to"] == digest(w.versions[2]), fields
    assert digest(w.model) == digest(w.versions[2])  # exactly the real target
    assert fields["release"] == "5" and fields["signed"] == "true" and len(fields["key_id"]) == 16


def as_before(w, kind, fields, status, kind_name):
    assert kind == "exception" and fields["status"] == status and fields["kind"] == kind_name, fields
    assert digest(w.model) == digest(w.versions[0])


@pytest.mark.parametrize("scenario", ["http-pem", "http-raw", "http-path"])
def test_update_over_http_with_the_default_fetcher(native, classes, feed, scenario):  # noqa: F811
    kind, fields, _ = java(native, classes, feed, scenario)
    assert kind == "result", fields
    updated(feed, fields)
    assert fields["patches"] == "v1-to-v3.nnpatch" and fields["downloaded"] == fields["patch_bytes"]
    assert fields["to_name"] == "v3" and fields["from_name"] == "v1"
    assert all(e.agent.startswith("nnpatch-jni/") for e in feed.srv.log)
    if scenario == "http-raw":
        assert fields["in_place"] == "true"
        assert {e.authorization for e in feed.srv.log} == {"Bearer t0k"}
    kind, fields, _ = java(native, classes, feed, scenario)  # again: current
    assert kind == "result" and fields["status"] == "CURRENT", fields


def test_update_through_a_java_fetcher_of_the_apps_own(native, classes, feed):  # noqa: F811
    kind, fields, traces = java(native, classes, feed, "custom", arg=feed.dist)
    assert kind == "result", fields
    updated(feed, fields)
    calls = traces[0].split()[2:]
    half = feed.manifest["bases"][0]["patch_size"] // 2
    # the manifest, then the patch cut half-way by the fetcher, then resumed from where it was cut
    assert calls == ["https://feed.invalid/manifest.json@0", "https://feed.invalid/v1-to-v3.nnpatch@0",
                     f"https://feed.invalid/v1-to-v3.nnpatch@{half}"], calls
    assert not feed.srv.log  # the library opened no connection of its own


def test_resume_through_the_default_fetcher_by_range(native, classes, feed):  # noqa: F811
    size = feed.manifest["bases"][0]["patch_size"]
    cut = {"done": False}

    def faults(path, rng):
        if path.endswith(".nnpatch") and not cut["done"]:
            cut["done"] = True
            return Fault("cut", at=size // 3)
        return None

    feed.srv.set_faults(faults)
    kind, fields, _ = java(native, classes, feed, "http-pem")
    assert kind == "result", fields
    updated(feed, fields)
    ranges = [e.range for e in feed.srv.log if e.path.endswith(".nnpatch")]
    assert ranges == [None, f"bytes={size // 3}-"], ranges


FAULTS = {  # what the first requests for the patch meet, in order; then it is served as it is
    "cut": [Fault("cut", at=1000)],
    "stall": [Fault("stall", at=1000, seconds=2.5)],  # past HttpFetcher's 1 s timeout
    "503-then-cut": [Fault("status", status=503), Fault("cut", at=1500)],
    "flip": [Fault("flip", at=777)],  # the BLAKE3 check fails: fetched once more from byte 0
    "range-ignored": [Fault("cut", at=1000), Fault("no_range")],  # 200 with the whole file: skipped to 1000
    "range-mislabelled": [Fault("cut", at=1000), Fault("bad_range")],  # 206 'bytes 0-': placed by its label
    "redirect": [Fault("redirect", location="/v1-to-v3.nnpatch?hop=1")],
    "redirect-loop": [Fault("redirect", location=f"/v1-to-v3.nnpatch?hop={i}") for i in range(6)],
}


@pytest.mark.parametrize("name", FAULTS)
def test_faults_through_the_default_fetcher(native, classes, feed, name):  # noqa: F811
    pending = list(FAULTS[name])

    def faults(path, rng):
        return pending.pop(0) if path.endswith(".nnpatch") and pending else None

    feed.srv.set_faults(faults)
    kind, fields, _ = java(native, classes, feed, "http-faults")
    if name == "redirect-loop":  # 6 redirects: one more than HttpFetcher follows, and not worth a retry
        as_before(feed, kind, fields, 5, "NnpatchIOError")
        assert "more than 5 redirects" in fields["message"], fields
        return
    assert kind == "result", fields
    updated(feed, fields)
    assert not pending


def test_a_redirect_out_of_http_is_refused(native, classes, feed):  # noqa: F811
    feed.srv.set_faults(lambda path, rng: Fault("redirect", location="file:///etc/passwd") if path.endswith(
        ".nnpatch") else None)
    kind, fields, _ = java(native, classes, feed, "http-pem")
    as_before(feed, kind, fields, 5, "NnpatchIOError")
    assert "refused" in fields["message"], fields


def test_a_refused_feed(native, classes, feed):  # noqa: F811
    kind, fields, _ = java(native, classes, feed, "wrong-key")
    as_before(feed, kind, fields, 4, "IntegrityError")
    assert not any(e.path.endswith(".nnpatch") for e in feed.srv.log)  # refused before any patch is fetched
    kind, fields, _ = java(native, classes, feed, "private-key")
    as_before(feed, kind, fields, 2, "UsageError")
    assert "private key" in fields["message"]


def test_dry_run_writes_nothing(native, classes, feed):  # noqa: F811
    kind, fields, _ = java(native, classes, feed, "dry-run")
    assert kind == "result" and fields["status"] == "WOULD_UPDATE", fields
    assert digest(feed.model) == digest(feed.versions[0]) and feed.files() == ["model.safetensors"]


def test_a_throwing_fetcher_is_an_io_failure_not_a_crash(native, classes, feed):  # noqa: F811
    kind, fields, _ = java(native, classes, feed, "throwing-fetcher")
    as_before(feed, kind, fields, 5, "NnpatchIOError")
    assert fields["cause"] == "java.lang.IllegalStateException" and "the app's bug" in fields["message"], fields


def test_a_sink_is_refused_off_its_thread_and_after_its_call(native, classes, feed):  # noqa: F811
    kind, fields, traces = java(native, classes, feed, "misused-sink")
    assert kind == "result", fields
    updated(feed, fields)
    assert "TRACE sink-after-call refused" in traces


def test_a_throwing_listener_stops_the_update(native, classes, feed):  # noqa: F811
    kind, fields, _ = java(native, classes, feed, "throwing-listener")
    as_before(feed, kind, fields, 130, "Interrupted")
    assert fields["cause"] == "java.lang.IllegalArgumentException", fields


def test_cancelled_before_it_starts(native, classes, feed):  # noqa: F811
    kind, fields, _ = java(native, classes, feed, "cancelled-before")
    as_before(feed, kind, fields, 130, "Interrupted")
    assert not feed.srv.log


def rerun_reaches_the_target(native, classes, w):  # noqa: F811
    kind, fields, _ = java(native, classes, w, "custom", arg=w.dist)
    assert kind == "result", fields
    updated(w, fields)


def test_cancel_from_another_thread_mid_download(native, classes, feed):  # noqa: F811
    kind, fields, traces = java(native, classes, feed, "cancel-download", arg=feed.dist)
    as_before(feed, kind, fields, 130, "Interrupted")
    assert any("cancelled-at https://feed.invalid/v1-to-v3.nnpatch" in t for t in traces), traces
    assert any(p.name.endswith(".nnpatch-part") for p in feed.dev.iterdir())  # kept for the next try
    rerun_reaches_the_target(native, classes, feed)


@pytest.mark.parametrize("where", ["in-place", "new-file"])
def test_cancel_from_another_thread_mid_apply(native, classes, feed, where, capsys):  # noqa: F811
    kind, fields, traces = java(native, classes, feed, f"cancel-apply-{where}")
    as_before(feed, kind, fields, 130, "Interrupted")
    done, total = map(int, re.search(r"cancelled-at apply (\d+)/(\d+)", "\n".join(traces)).groups())
    assert done < total, traces  # the apply had begun and not finished
    with capsys.disabled():
        print(f"\nJNI cancel mid-apply ({where}): landed at {done} of {total} bytes; model as before (BLAKE3)")
    assert sorted(p.name for p in feed.dev.iterdir()) in (
        ["model.safetensors", "model.safetensors.nnpatch-state"],
        sorted(["model.safetensors", "model.safetensors.nnpatch-state",
                f"model.safetensors.{feed.manifest['bases'][0]['patch_blake3'][:32]}.nnpatch-part"]))
    rerun_reaches_the_target(native, classes, feed)


def test_thread_interrupt_stops_the_update(native, classes, feed):  # noqa: F811
    kind, fields, traces = java(native, classes, feed, "interrupt", arg=feed.dist)
    as_before(feed, kind, fields, 130, "Interrupted")
    assert "TRACE interrupted-flag-kept true" in traces
    rerun_reaches_the_target(native, classes, feed)


def test_thread_interrupt_during_a_retry_pause(native, classes, feed, capsys):  # noqa: F811
    kind, fields, traces = java(native, classes, feed, "interrupt-pause")
    as_before(feed, kind, fields, 130, "Interrupted")
    ms = int(next(t for t in traces if t.startswith("TRACE stopped-after-ms")).split()[-1])
    with capsys.disabled():
        print(f"\nJNI interrupt during a 30 s retry pause: stopped after {ms} ms")
    assert ms < 10_000, traces  # heard within the 30 s pause (every 50 ms), not after it


def test_check(native, classes, feed):  # noqa: F811
    patch = feed.dist / "v1-to-v3.nnpatch"
    kind, fields, traces = java(native, classes, feed, "check", arg=f"{patch},{feed.versions[1]}")
    assert kind == "result", fields
    assert [t.split(" | ")[0] for t in traces] == ["TRACE refused 4 IntegrityError", "TRACE refused 1 BaseMismatchError"]
    assert "signed by key" in traces[0] and "wrong base" in traces[1], traces
    assert digest(feed.model) == digest(feed.versions[0])  # check writes nothing


# --- under AddressSanitizer and UndefinedBehaviorSanitizer ---------------------------------------------

@pytest.fixture(scope="module")
def jni_asan(asan, tmp_path_factory):
    """libnnpatch_jni.so built from the glue and the ASan/UBSan libnnpatch.a (the Makefile builds the JNI
    library for the host build only), and the environment a JVM needs to load it: the ASan runtime
    preloaded, the JVM's own SEGV handling left to it, no leak report (the JVM never frees its heap)."""
    javac = require_tool("javac")
    java_home = os.path.dirname(os.path.dirname(os.path.realpath(javac)))
    out = tmp_path_factory.mktemp("jni-asan")
    r = subprocess.run(["gcc", "-std=c99", "-D_GNU_SOURCE", "-O1", "-g", "-fPIC", "-shared", "-fvisibility=hidden",
                        "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
                        f"-I{ROOT}/native/include", f"-I{java_home}/include", f"-I{java_home}/include/linux",
                        "-o", str(out / "libnnpatch_jni.so"), str(JNI / "nnpatch_jni.c"), str(asan.lib_a),
                        "-lzstd", "-lsodium"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    runtime = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS="handle_segv=0:detect_leaks=0:abort_on_error=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    return out, env


@pytest.mark.parametrize("scenario", ["http-raw", "custom", "throwing-fetcher", "misused-sink", "cancel-apply-in-place",
                                      "interrupt"])
def test_under_asan(jni_asan, classes, feed, scenario):  # noqa: F811
    lib_dir, env = jni_asan
    arg = feed.dist if scenario in ("custom", "interrupt") else None
    kind, fields, _ = java(lib_dir, classes, feed, scenario, arg=arg, env=env)
    if kind == "result":
        updated(feed, fields)
    else:
        assert fields["status"] in (5, 130) and digest(feed.model) == digest(feed.versions[0]), fields


def test_the_binding_compiles_for_java_8(tmp_path):
    """Android apps build against Java 8's library (plus what desugaring adds): the binding uses
    nothing newer, so an app with an old minSdk takes the sources as they are."""
    javac = require_tool("javac")
    srcs = sorted(str(p) for p in (JNI / "java").rglob("*.java"))
    r = subprocess.run([javac, "--release", "8", "-Xlint:all", "-Werror", "-d", str(tmp_path), *srcs],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- the keep rules ----------------------------------------------------------------------------------

JAVA_TYPES = {"I": "int", "J": "long", "Z": "boolean", "B": "byte", "V": "void", "S": "short", "C": "char",
              "F": "float", "D": "double"}


def java_type(sig: str) -> tuple[str, str]:
    """The first JNI type in sig as ProGuard writes it, and what is left."""
    dims = len(sig) - len(sig.lstrip("["))
    sig = sig[dims:]
    if sig[0] == "L":
        end = sig.index(";")
        name, rest = sig[1:end].replace("/", "."), sig[end + 1:]
    else:
        name, rest = JAVA_TYPES[sig[0]], sig[1:]
    return name + "[]" * dims, rest


def member_rule(name: str, sig: str) -> str:
    """'int fetch(java.lang.String,long,long,long)', '<init>(int,...)' or 'java.lang.String reason'."""
    if not sig.startswith("("):
        return f"{java_type(sig)[0]} {name}"
    params, rest = [], sig[1:sig.index(")")]
    while rest:
        t, rest = java_type(rest)
        params.append(t)
    ret = java_type(sig[sig.index(")") + 1:])[0]
    return ("" if name == "<init>" else ret + " ") + f"{name}({','.join(params)})"


def kept_members() -> dict[str, set[str]]:
    rules = re.sub(r"#.*", "", (JNI / "proguard-rules.pro").read_text())
    kept: dict[str, set[str]] = {}
    for cls, body in re.findall(r"-keep\S*\s+(?:,\S+\s+)?class\s+([\w.*]+)\s*(?:\{(.*?)\})?", rules, re.S):
        kept.setdefault(cls, set()).update(" ".join(m.split()).replace(", ", ",").replace(" (", "(")
                                           for m in body.split(";") if m.strip())
    return kept


def test_every_name_the_glue_looks_up_is_kept():
    src = (JNI / "nnpatch_jni.c").read_text()
    defines = dict(re.findall(r'#define (\w+) "([^"]+)"', src))
    # the C glue names members only through method(), field() and new_object() with the class written out
    raw_lookups = re.findall(r"->(?:GetMethodID|GetFieldID|GetStaticMethodID|GetStaticFieldID)\(", src)
    assert len(raw_lookups) == 3, "look members up through method(), field() and new_object() only"
    looked_up = []
    for fn, cls, rest in re.findall(r"\b(method|field|new_object)\(env, (\w+|\"[^\"]+\"),\s*((?:\"[^\"]*\"[\s,]*)+)", src):
        cls = defines.get(cls, cls.strip('"'))
        strings = re.findall(r'"([^"]*)"', rest)
        name, sig = ("<init>", "".join(strings)) if fn == "new_object" else (strings[0], "".join(strings[1:]))
        looked_up.append((cls, name, sig))
    ours = [(c, n, s) for c, n, s in looked_up if c.startswith("org/nnpatch/")]
    assert {c for c, _, _ in ours} >= {"org/nnpatch/UpdateCall", "org/nnpatch/UpdateResult",
                                       "org/nnpatch/NNPatchException"}, ours
    kept = kept_members()
    missing = [f"{c} {member_rule(n, s)}" for c, n, s in ours if member_rule(n, s) not in kept.get(c.replace("/", "."),
                                                                                                      set())]
    assert not missing, f"not kept by proguard-rules.pro: {missing}"
    # every class with a native method keeps its name and its native methods' names
    natives = {m[0] for m in re.findall(r"JNICALL\s+Java_org_nnpatch_(\w+?)_(\w+)\s*\(", src)}
    assert "org.nnpatch.**" in kept and "native<methods>" in {m.replace(" ", "") for m in kept["org.nnpatch.**"]}
    assert {f"org.nnpatch.{c}" for c in natives} <= set(kept), natives
