"""The JNI binding (native/jni/): the Java class compiled with the JDK's javac, run by its
java with the native library on java.library.path, -Xcheck:jni on."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import ROOT, VECTORS, require_tool

JNI = ROOT / "native" / "jni"


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    javac = require_tool("javac")
    out = tmp_path_factory.mktemp("jni-classes")
    srcs = sorted(str(p) for p in JNI.rglob("*.java"))
    r = subprocess.run([javac, "-Xlint:all", "-Werror", "-d", str(out), *srcs], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_jni_library_built(native):
    assert native.jni_so.is_file(), "make native builds build/native/libnnpatch_jni.so when a JDK is there"
    r = subprocess.run(["nm", "-D", "--defined-only", str(native.jni_so)], capture_output=True, text=True, check=True)
    names = [line.split()[-1] for line in r.stdout.splitlines() if line.split()[-2] in "TDBRW"]
    assert names and all(n.startswith(("Java_org_nnpatch_NNPatch_", "Java_org_nnpatch_FetchSink_")) for n in names), names


@pytest.mark.parametrize("vector", ["all-ops", "every-dtype"])
def test_jni_apply(native, classes, vector, tmp_path):
    java = require_tool("java")
    r = subprocess.run([java, "-Xcheck:jni", f"-Djava.library.path={native.dir}", "-cp", str(classes),
                        "NNPatchTest", str(VECTORS / "valid" / vector), str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "OK " in r.stdout, out
    assert "WARNING in native method" not in out, out
