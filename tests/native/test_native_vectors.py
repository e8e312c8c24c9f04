"""spec/vectors against the native applier (issue 13): every valid safetensors vector rebuilds its
target byte for byte in each verify mode; every invalid vector fails with the exit code of the
Python implementation and one ``Error:`` line, leaving nothing at -o; through libnnpatch.so
(ctypes) the error class is the one vectors.json names.

Directory and ONNX vectors are refused with exit 3 by an applier that does not implement those
kinds; one that does must rebuild them exactly (the GGUF vector, an extents target: it does). The
vectors marked ``since`` (FORMAT.md section 13: "1.3", the qrows op; "1.4", extents models; "1.5",
packed sections) are no exception: the native applier reads 1.5 (NNP_FORMAT_MINOR 5), so each valid
one is rebuilt exactly and each invalid one fails with Python's class and message.
"""

from __future__ import annotations

import ctypes
import filecmp
import json
import os

import blake3
import pytest

import nnpatch.errors

from .native_run import assert_no_crash, assert_ok, assert_refused, leftovers
from .native_run import native as run_native

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VECTORS = os.path.join(ROOT, "spec", "vectors")
with open(os.path.join(VECTORS, "vectors.json"), encoding="utf-8") as _f:
    MANIFEST = json.load(_f)

VERIFY = ("default", "full", "touched")


def vpath(rel: str) -> str:
    return os.path.join(VECTORS, rel)


def kind(vec) -> str:
    """safetensors, directory, onnx or gguf: what the vector's target is."""
    target = vpath(vec["target"]) if "target" in vec else None
    base = vpath(vec["base"])
    if (target and os.path.isdir(target)) or os.path.isdir(base):
        return "directory"
    if (target or base).endswith(".onnx"):
        return "onnx"
    if (target or base).endswith(".gguf"):
        return "gguf"
    return "safetensors"


def file_digest(p) -> str:
    with open(p, "rb") as f:
        return blake3.blake3(f.read()).hexdigest()


def tree(p) -> dict:
    """Every file under ``p`` (or ``p`` itself) by relative path, with its bytes."""
    if not os.path.isdir(p):
        with open(p, "rb") as f:
            return {"": f.read()}
    out = {}
    for d, _, files in os.walk(p):
        for name in files:
            full = os.path.join(d, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, p)] = f.read()
    return out


SAFETENSORS = [v for v in MANIFEST["valid"] if kind(v) == "safetensors"]


SINCE = [v for v in MANIFEST["valid"] + MANIFEST["invalid"] if v.get("since")]
OTHER_KINDS = [v for v in MANIFEST["valid"] if kind(v) != "safetensors"]


def test_the_vectors_cover_what_the_native_applier_must_do():
    """A guard against a shrinking vector set: every op and the esort stage are in the safetensors ones."""
    names = {v["name"] for v in SAFETENSORS}
    assert {"rows-f32", "elements-bf16", "every-dtype", "all-ops", "all-ops-reversible", "identical",
            "esort"} <= names
    assert len(MANIFEST["invalid"]) >= 15
    # format 1.3: the qrows op on each dtype it is defined for, and one vector per rule it adds
    assert {"qrows-f32", "qrows-bf16", "qrows-f16"} <= names
    assert {v["name"] for v in SINCE if v in MANIFEST["invalid"]} >= {
        "qrows-bad-bits", "qrows-bad-dtype", "qrows-codes-size", "qrows-nan-scale", "qrows-padding-nibble",
        "qrows-planes", "qrows-scales-size"}
    # format 1.5: packed sections, applied and broken
    assert "packed-all-ops" in names
    assert {v["name"] for v in SINCE if v in MANIFEST["invalid"]} >= {"packed-without-feature", "packed-padding"}


def test_the_native_applier_reads_format_1_5(native):
    """--version names the newest format it reads: 1.5, the one that added packed sections."""
    r = run_native(native, "--version")
    assert_ok(r)
    assert "(format 1.5)" in r.out, r


@pytest.mark.parametrize("verify", VERIFY)
@pytest.mark.parametrize("vec", SAFETENSORS, ids=lambda v: v["name"])
def test_valid_vector_rebuilds_the_target(native_impl, vec, verify, tmp_path):
    assert file_digest(vpath(vec["patch"])) == vec["patch_blake3"]
    out = tmp_path / "out.safetensors"
    r = run_native(native_impl, vpath(vec["base"]), vpath(vec["patch"]), "-o", out, "--verify", verify, "--quiet")
    assert_ok(r)
    assert r.err == "", f"--quiet printed on stderr: {r}"
    assert filecmp.cmp(out, vpath(vec["target"]), shallow=False), f"{vec['name']}: output differs from the target"
    assert file_digest(out) == vec["target_blake3"]
    assert leftovers(tmp_path, "out.safetensors") == []


@pytest.mark.parametrize("vec", SAFETENSORS, ids=lambda v: v["name"])
def test_valid_vector_checks(native, vec):
    """--check PATCH, and --check PATCH --base OLD: exit 0 for every valid vector."""
    for r in (run_native(native, "--check", vpath(vec["patch"])),
              run_native(native, "--check", vpath(vec["patch"]), "--base", vpath(vec["base"]))):
        assert_ok(r)


def test_valid_vector_without_quiet_says_something(native, tmp_path):
    vec = SAFETENSORS[0]
    r = run_native(native, vpath(vec["base"]), vpath(vec["patch"]), "-o", tmp_path / "out.safetensors")
    assert_ok(r)
    assert filecmp.cmp(tmp_path / "out.safetensors", vpath(vec["target"]), shallow=False)


@pytest.mark.parametrize("vec", OTHER_KINDS, ids=lambda v: v["name"])
def test_other_target_kinds_are_exact_or_refused(native_impl, vec, tmp_path):
    out = tmp_path / {"onnx": "out.onnx", "gguf": "out.gguf"}.get(kind(vec), "out")
    r = run_native(native_impl, vpath(vec["base"]), vpath(vec["patch"]), "-o", out, "--quiet")
    if r.rc == 0:
        assert tree(out) == tree(vpath(vec["target"])), f"{vec['name']}: output differs from the target"
        return
    assert_refused(r, 3)
    assert leftovers(tmp_path) == [], "a refused kind left something behind"


def expected_exit(vec) -> int:
    return getattr(nnpatch.errors, vec["error"]).exit_code


def is_directory_vector(vec) -> bool:
    return os.path.isdir(vpath(vec["base"]))


@pytest.mark.parametrize("vec", MANIFEST["invalid"], ids=lambda v: v["name"])
def test_invalid_vector_fails_with_the_python_exit_code(native_impl, vec, tmp_path):
    out = tmp_path / "out.safetensors"
    base_before = tree(vpath(vec["base"]))
    args = [vpath(vec["base"]), vpath(vec["patch"]), "-o", out]
    if "verify" in vec["apply_options"]:
        args += ["--verify", vec["apply_options"]["verify"]]
    r = run_native(native_impl, *args)
    # a directory base: the Python class's exit code, or 3 from an applier that refuses the kind
    codes = {expected_exit(vec), 3} if is_directory_vector(vec) else {expected_exit(vec)}
    assert_refused(r, codes)
    assert not out.exists()
    assert leftovers(tmp_path) == [], "a temporary file was left behind"
    assert tree(vpath(vec["base"])) == base_before


def python_check(*args) -> int:
    """The exit code of ``nnpatch verify ARGS``, the Python counterpart of ``nnpatch-apply --check``."""
    from click.testing import CliRunner

    from nnpatch.cli import cli

    return CliRunner().invoke(cli, ["--quiet", "verify", *args]).exit_code


@pytest.mark.parametrize("vec", [v for v in MANIFEST["invalid"] if not is_directory_vector(v)],
                         ids=lambda v: v["name"])
def test_invalid_vector_check_agrees_with_python_verify(native, vec):
    """--check PATCH --base OLD: the exit code of `nnpatch verify PATCH --base OLD` (1 for a base that
    is not the patch's; 0 for the target-digest lie, which only writing the output can find)."""
    want = python_check(vpath(vec["patch"]), "--base", vpath(vec["base"]))
    r = run_native(native, "--check", vpath(vec["patch"]), "--base", vpath(vec["base"]))
    if want == 0:
        assert_ok(r)
    elif want == 1:  # a check that ran and found a mismatch: a report, not necessarily an Error line
        assert_no_crash(r)
        assert r.rc == 1, str(r)
    else:
        assert_refused(r, want)


# --- the library through ctypes: the error class ------------------------------------------------

class Lib:
    """libnnpatch.so's public functions (native/include/nnpatch.h) with their C types."""

    def __init__(self, path) -> None:
        lib = ctypes.CDLL(str(path))
        lib.nnp_ctx_new.restype = ctypes.c_void_p
        lib.nnp_ctx_new.argtypes = []
        lib.nnp_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nnp_ctx_free.restype = None
        lib.nnp_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.nnp_set_verify.restype = ctypes.c_int
        lib.nnp_apply.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t,
                                  ctypes.c_char_p]
        lib.nnp_apply.restype = ctypes.c_int
        lib.nnp_error.argtypes = [ctypes.c_void_p]
        lib.nnp_error.restype = ctypes.c_int
        lib.nnp_error_name.argtypes = [ctypes.c_int]
        lib.nnp_error_name.restype = ctypes.c_char_p
        lib.nnp_message.argtypes = [ctypes.c_void_p]
        lib.nnp_message.restype = ctypes.c_char_p
        lib.nnp_recover.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
        lib.nnp_recover.restype = ctypes.c_int
        self.lib = lib

    def apply(self, base, patches, out, verify: str = "default") -> tuple[int, str, str]:
        """(status, error class name, message) of nnp_apply on a fresh context."""
        lib = self.lib
        ctx = lib.nnp_ctx_new()
        assert ctx, "nnp_ctx_new returned NULL"
        try:
            assert lib.nnp_set_verify(ctx, VERIFY.index(verify)) == 0
            arr = (ctypes.c_char_p * len(patches))(*[os.fsencode(p) for p in patches])
            status = lib.nnp_apply(ctx, os.fsencode(base), arr, len(patches), os.fsencode(out))
            name = lib.nnp_error_name(lib.nnp_error(ctx))
            message = lib.nnp_message(ctx)
            return status, (name or b"").decode(), (message or b"").decode("utf-8", "replace")
        finally:
            lib.nnp_ctx_free(ctx)

    def recover(self, model) -> tuple[int, int, str]:
        """(status, recovered flag, error class name)."""
        lib = self.lib
        ctx = lib.nnp_ctx_new()
        assert ctx, "nnp_ctx_new returned NULL"
        try:
            recovered = ctypes.c_int(-1)
            status = lib.nnp_recover(ctx, os.fsencode(model), ctypes.byref(recovered))
            return status, recovered.value, (lib.nnp_error_name(lib.nnp_error(ctx)) or b"").decode()
        finally:
            lib.nnp_ctx_free(ctx)


@pytest.fixture(scope="module")
def lib(native):
    if not native.lib_so.exists():
        pytest.fail(f"{native.lib_so} was not built")
    return Lib(native.lib_so)


@pytest.mark.parametrize("vec", SAFETENSORS, ids=lambda v: v["name"])
def test_library_applies_valid_vectors(lib, vec, tmp_path):
    out = tmp_path / "out.safetensors"
    status, name, message = lib.apply(vpath(vec["base"]), [vpath(vec["patch"])], out)
    assert status == 0, f"{name}: {message}"
    assert message == "" and name in ("", "None", "NONE", "ok"), (name, message)
    assert file_digest(out) == vec["target_blake3"]


@pytest.mark.parametrize("vec", MANIFEST["invalid"], ids=lambda v: v["name"])
def test_library_reports_the_error_class(lib, vec, tmp_path):
    out = tmp_path / "out.safetensors"
    status, name, message = lib.apply(vpath(vec["base"]), [vpath(vec["patch"])], out,
                                      vec["apply_options"].get("verify", "default"))
    if is_directory_vector(vec) and status == 3 and name in ("PatchFormatError", "UnsupportedVersionError"):
        return  # the kind is refused
    assert (status, name) == (expected_exit(vec), vec["error"]), f"message: {message}"
    if vec.get("since"):  # the qrows rules: Python's message, word for word
        assert message == vec["message"].format(patch=vpath(vec["patch"])), message
    assert message and "\n" not in message
    assert not out.exists()
    assert leftovers(tmp_path) == []
