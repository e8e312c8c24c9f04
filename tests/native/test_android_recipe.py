"""The Android CMake recipe in README.md ("Android (JNI)"), built as written with CMake and Debian's
aarch64 cross compiler (the NDK's stand-in: the same ELF linker rules), exports nnpatch's own JNI
functions and nothing else: not libnnpatch's nnp_* (the app reaches them through Java), not the
zstd and libsodium symbols of the prebuilt static libraries (another copy in the app would clash).
Before issue 23 it exported 457 symbols where `make native`'s JNI library exports 4."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from .conftest import ROOT, require_tool

CROSS_LIBS = "/usr/lib/aarch64-linux-gnu"


def recipe() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("**Android (JNI).**"):]
    return re.search(r"```cmake\n(.*?)```", section, re.S).group(1)


def jni_functions() -> set[str]:
    src = (ROOT / "native" / "jni" / "nnpatch_jni.c").read_text(encoding="utf-8")
    return set(re.findall(r"JNICALL\s+(Java_org_nnpatch_\w+)\s*\(", src))


def test_the_android_recipe_exports_only_the_jni_functions(tmp_path, capsys):
    require_tool("cmake")
    gcc = require_tool("aarch64-linux-gnu-gcc")
    for lib in ("libzstd.a", "libsodium.a"):
        if not os.path.isfile(os.path.join(CROSS_LIBS, lib)):
            pytest.fail(f"{CROSS_LIBS}/{lib} is missing: run `make setup` (native/scripts/install-deps.sh)")
    javac = require_tool("javac")
    java_home = os.path.dirname(os.path.dirname(os.path.realpath(javac)))
    src, prebuilt = tmp_path / "src", tmp_path / "prebuilt"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(recipe(), encoding="utf-8")
    (prebuilt / "include").mkdir(parents=True)
    (prebuilt / "arm64-v8a").mkdir()
    for name in ("zstd.h", "sodium.h", "sodium"):
        os.symlink(f"/usr/include/{name}", prebuilt / "include" / name)
    for lib in ("libzstd.a", "libsodium.a"):
        os.symlink(os.path.join(CROSS_LIBS, lib), prebuilt / "arm64-v8a" / lib)
    build = tmp_path / "build"
    r = subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_SYSTEM_NAME=Linux",
                        "-DCMAKE_SYSTEM_PROCESSOR=aarch64", f"-DCMAKE_C_COMPILER={gcc}", f"-DNNPATCH={ROOT}",
                        f"-DPREBUILT={prebuilt}", "-DANDROID_ABI=arm64-v8a",
                        f"-DCMAKE_C_FLAGS=-I{java_home}/include -I{java_home}/include/linux"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    so = build / "libnnpatch_jni.so"
    nm = subprocess.run(["aarch64-linux-gnu-nm", "-D", "--defined-only", str(so)], capture_output=True, text=True,
                        check=True).stdout
    exported = {line.split()[-1] for line in nm.splitlines() if line.strip()}
    with capsys.disabled():
        print(f"\nAndroid CMake recipe: {len(exported)} exported symbols")
    assert exported == jni_functions(), sorted(exported)
    undefined = subprocess.run(["aarch64-linux-gnu-nm", "-D", "--undefined-only", str(so)], capture_output=True,
                               text=True, check=True).stdout
    # everything of nnpatch, zstd and libsodium is inside (zstd's weak tracing hooks may stay unresolved)
    strong = [line.split()[-1] for line in undefined.splitlines() if line.split()[0] == "U"]
    assert not [s for s in strong if re.match(r"(nnp_|np_|npj_|ZSTD_|crypto_|sodium_)", s)], strong
