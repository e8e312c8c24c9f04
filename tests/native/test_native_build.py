"""The native build itself: warnings, exports, size, the command's --version, and the
shared library used from Python through ctypes (one context per thread, in parallel)."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import threading

import pytest

from .conftest import ROOT, VECTORS

HEADER = ROOT / "native" / "include" / "nnpatch.h"
CFLAGS = ["-std=c99", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-O2", "-ffp-contract=off", "-fvisibility=hidden",
          "-fPIC", f"-I{ROOT / 'native' / 'include'}", f"-I{ROOT / 'native' / 'src'}"]
# the stripped command, libzstd and libsodium aside (they are shared libraries here)
SIZE_LIMIT = 512 * 1024


def header_version() -> str:
    """MAJOR.MINOR.RELEASE from nnpatch.h (NNP_VERSION_STRING is derived from them there)."""
    text = HEADER.read_text()
    return ".".join(re.search(rf"#define NNP_VERSION_{k}\s+(\d+)", text).group(1) for k in ("MAJOR", "MINOR", "RELEASE"))


def header_functions() -> set[str]:
    return set(re.findall(r"\b(nnp_[a-z_0-9]+)\s*\(", HEADER.read_text())) - {"nnp_progress_fn", "nnp_read_fn"}


def test_outputs_exist(native):
    for p in (native.apply, native.lib_a, native.lib_so):
        assert p.is_file(), f"{p} was not built"


@pytest.mark.parametrize("part", ["src", "cli", "jni"])
def test_no_warnings(part, tmp_path):
    """Every source compiles without a warning under the project's flags (-Werror here)."""
    srcs = sorted((ROOT / "native" / part).glob("*.c"))
    if not srcs:
        pytest.fail(f"no sources in native/{part}/")
    extra = []
    if part == "jni":
        javac = shutil.which("javac")
        if javac is None:
            pytest.skip("no JDK")
        from pathlib import Path
        home = Path(javac).resolve().parents[1]
        extra = [f"-I{home / 'include'}", f"-I{home / 'include' / 'linux'}"]
    failures = []
    for src in srcs:
        r = subprocess.run(["gcc", *CFLAGS, *extra, "-Werror", "-c", str(src), "-o", str(tmp_path / "x.o")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"{src.relative_to(ROOT)}:\n{r.stderr}")
    assert not failures, "\n".join(failures)


def test_header_standalone(tmp_path):
    """nnpatch.h compiles on its own as strict C99 and as C++ (an app's Swift or JNI glue includes it)."""
    src = tmp_path / "h.c"
    src.write_text('#include "nnpatch.h"\nint main(void) { return nnp_version() == 0; }\n')
    r = subprocess.run(["gcc", "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", f"-I{HEADER.parent}",
                        "-fsyntax-only", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("g++"):
        r = subprocess.run(["g++", "-x", "c++", "-Wall", "-Wextra", "-Werror", f"-I{HEADER.parent}",
                            "-fsyntax-only", str(src)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_version(native):
    r = native.run("--version")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert header_version() in out, out
    assert out.count("\n") == 1, "one line"


def test_format_version_known_to_python():
    """The newest format the native library reads is one the Python implementation knows (the
    native applier may lag behind a newer minor version whose features it refuses by name)."""
    from nnpatch.patchfile.header import FORMAT_VERSION
    text = HEADER.read_text()
    major = int(re.search(r"#define NNP_FORMAT_MAJOR (\d+)", text).group(1))
    minor = int(re.search(r"#define NNP_FORMAT_MINOR (\d+)", text).group(1))
    assert major == FORMAT_VERSION[0] and minor <= FORMAT_VERSION[1]


def test_exports_only_api(native):
    """libnnpatch.so exports the functions nnpatch.h declares and nothing else."""
    r = subprocess.run(["nm", "-D", "--defined-only", str(native.lib_so)], capture_output=True, text=True, check=True)
    exported = {line.split()[-1].split("@")[0] for line in r.stdout.splitlines() if line.split()[-2] in "TDBRW"}
    stray = sorted(s for s in exported if not s.startswith("nnp_"))
    assert not stray, f"symbols outside nnp_*: {stray}"
    missing = sorted(header_functions() - exported)
    assert not missing, f"declared in nnpatch.h but not exported: {missing}"


def test_command_links(native):
    """nnpatch-apply carries libnnpatch inside; libzstd and libsodium are shared."""
    r = subprocess.run(["ldd", str(native.apply)], capture_output=True, text=True, check=True)
    assert "libnnpatch" not in r.stdout
    assert "libzstd" in r.stdout and "libsodium" in r.stdout, r.stdout


def test_stripped_size(native, tmp_path, record_property):
    out = tmp_path / "nnpatch-apply"
    subprocess.run(["strip", "-o", str(out), str(native.apply)], check=True)
    size = out.stat().st_size
    record_property("stripped_size", size)
    (native.dir / "nnpatch-apply.size").write_text(f"{size}\n")
    print(f"stripped nnpatch-apply: {size} bytes ({size / 1024:.1f} KiB)")
    assert size <= SIZE_LIMIT, f"stripped nnpatch-apply is {size} bytes"


# ctypes ---------------------------------------------------------------------------------

def load(native) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(native.lib_so))
    lib.nnp_version.restype = ctypes.c_char_p
    lib.nnp_ctx_new.restype = ctypes.c_void_p
    lib.nnp_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nnp_message.restype = ctypes.c_char_p
    lib.nnp_message.argtypes = [ctypes.c_void_p]
    lib.nnp_error.argtypes = [ctypes.c_void_p]
    lib.nnp_error_name.restype = ctypes.c_char_p
    lib.nnp_error_name.argtypes = [ctypes.c_int]
    lib.nnp_apply.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t,
                              ctypes.c_char_p]
    lib.nnp_check.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    return lib


def apply(lib, ctx, old, patches, out) -> int:
    arr = (ctypes.c_char_p * len(patches))(*[str(p).encode() for p in patches])
    return lib.nnp_apply(ctx, str(old).encode(), arr, len(patches), str(out).encode())


def test_ctypes_version(native):
    lib = load(native)
    assert lib.nnp_version().decode() == header_version()
    major, minor, release = map(int, header_version().split("."))
    lib.nnp_version_number.restype = ctypes.c_uint
    assert lib.nnp_version_number() == major * 100 * 100 + minor * 100 + release


def test_header_version_macros(tmp_path):
    """NNP_VERSION_NUMBER and NNP_VERSION_STRING follow from MAJOR, MINOR and RELEASE."""
    src = tmp_path / "v.c"
    src.write_text('#include <stdio.h>\n#include "nnpatch.h"\n'
                   'int main(void) { printf("%d %s\\n", NNP_VERSION_NUMBER, NNP_VERSION_STRING); return 0; }\n')
    exe = tmp_path / "v"
    subprocess.run(["gcc", "-std=c99", f"-I{HEADER.parent}", str(src), "-o", str(exe)], check=True)
    number, string = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    major, minor, release = map(int, header_version().split("."))
    assert int(number) == major * 10000 + minor * 100 + release
    assert string == header_version()


def test_ctypes_verify_from_name(native):
    """The one parser of the --verify names: the three names, and NNP_EUSAGE (2) for anything else."""
    lib = load(native)
    lib.nnp_verify_from_name.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    mode = ctypes.c_int(-1)
    for name, want in ((b"default", 0), (b"full", 1), (b"touched", 2)):
        assert lib.nnp_verify_from_name(name, ctypes.byref(mode)) == 0
        assert mode.value == want
    for bad in (b"Full", b"", b"full ", None):
        mode.value = 7
        assert lib.nnp_verify_from_name(bad, ctypes.byref(mode)) == 2
        assert mode.value == 7, "untouched on failure"


def test_ctypes_error(native, tmp_path):
    """A missing base: NNP_EIO, an NnpatchIOError kind and a message naming the file."""
    lib = load(native)
    ctx = lib.nnp_ctx_new()
    assert ctx
    try:
        missing = tmp_path / "no-such-base.safetensors"
        st = apply(lib, ctx, missing, [VECTORS / "valid" / "rows-f32" / "patch.nnpatch"], tmp_path / "out")
        assert st == 5, lib.nnp_message(ctx)
        assert lib.nnp_error_name(lib.nnp_error(ctx)) == b"NnpatchIOError"
        assert b"no-such-base" in lib.nnp_message(ctx)
        assert not (tmp_path / "out").exists()
    finally:
        lib.nnp_ctx_free(ctx)


def test_ctypes_threads(native, tmp_path):
    """Two threads, one context each, applying different vectors at the same time (ctypes
    drops the GIL during the calls): every result is its target, byte for byte."""
    lib = load(native)
    jobs = [VECTORS / "valid" / name for name in ("all-ops", "every-dtype")]
    errors: list[str] = []

    def work(k: int, vec):
        ctx = lib.nnp_ctx_new()
        try:
            for i in range(6):
                out = tmp_path / f"t{k}-{i}.safetensors"
                st = apply(lib, ctx, vec / "base.safetensors", [vec / "patch.nnpatch"], out)
                if st != 0:
                    errors.append(f"{vec.name}: status {st}: {lib.nnp_message(ctx).decode()}")
                    return
                if out.read_bytes() != (vec / "target.safetensors").read_bytes():
                    errors.append(f"{vec.name}: round {i}: wrong bytes")
                    return
                out.unlink()
        finally:
            lib.nnp_ctx_free(ctx)

    threads = [threading.Thread(target=work, args=(k, v)) for k, v in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
