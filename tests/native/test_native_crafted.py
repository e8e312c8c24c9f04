"""The crafted hostile inputs of tests/test_crafted.py (patches and journals with valid trailers,
written from the spec by tests/craft.py) against ``nnpatch-apply`` (issue 13).

The cases are tests/test_crafted.py's own test functions, collected here a second time with its
runner swapped for one that translates each ``nnpatch apply|recover`` command line into the
``nnpatch-apply`` one (``--in-place``, ``--recover``) and runs the native binary under
``prlimit --as`` with its peak RSS measured. Every assertion of the Python suite then holds for
the native applier too: exactly one ``Error:`` line, the expected exit code, the whole tree
(base, other files, a fake ``.git``, a sibling ``outside/``) untouched, nothing at -o.

Where the Python suite accepts several exit codes (journals: 3 or 4), the Python CLI is run on a
copy of the same tree and the native code must be the one Python gave (NNPATCH_CRAFTED_PYTHON=all
compares every case that way). Cases of commands nnpatch-apply does not have (show, update,
--json) are not collected; their apply parts are below.

Every case runs against the normal build; the cases in ASAN_SAMPLE also run under the
AddressSanitizer + UndefinedBehaviorSanitizer build (no address-space limit there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest

import tests.test_crafted as tc
from tests import craft
# the fixtures the cases use (collected here as fixtures of this module)
from tests.test_crafted import big_world, journal_world, many_adds, template, world  # noqa: F401
# the cases, collected again in this module
from tests.test_crafted import (  # noqa: F401
    test_apply_in_place_recovers_only_a_valid_journal, test_directory_target_paths_are_confined,
    test_elements_count_is_bounded_by_the_tensor, test_elements_op_over_every_element, test_fifty_thousand_add_ops,
    test_header_schema_is_enforced, test_key_is_checked_before_anything_else,
    test_onnx_external_location_is_confined, test_onnx_skeleton_encoding_is_checked,
    test_onnx_skeleton_fields_are_checked, test_op_tensor_refs_are_bounded,
    test_recover_control_a_legitimate_journal_rolls_back, test_recover_trusts_a_journal_only_within_the_spec,
    test_signature_control_a_signed_crafted_patch_applies, test_target_layout_is_checked_within_limits,
    test_zstd_header_bomb, test_zstd_header_bomb_with_key_is_refused_before_parsing)

from . import native_run as nr
from .conftest import _impls

COMPARE_ALL = os.environ.get("NNPATCH_CRAFTED_PYTHON") == "all"
ORIGINAL_REFUSED = tc.refused_and_untouched

#: Cases (substrings of the test id) that also run under the sanitizer build.
ASAN_SAMPLE = (
    "test_zstd_header_bomb[", "test_zstd_header_bomb_with_key_is_refused_before_parsing[asan-other-key]",
    "test_key_is_checked_before_anything_else[asan-unsigned-deep-json]",
    "test_key_is_checked_before_anything_else[asan-bad-signature]",
    "test_signature_control_a_signed_crafted_patch_applies", "test_elements_op_over_every_element",
    "test_elements_count_is_bounded_by_the_tensor", "test_target_layout_is_checked_within_limits[asan-rank-65]",
    "test_target_layout_is_checked_within_limits[asan-dim-2e70]",
    "test_target_layout_is_checked_within_limits[asan-deep-json]",
    "test_target_layout_is_checked_within_limits[asan-header-len-2e64]",
    "test_op_tensor_refs_are_bounded[asan-op-rank-300-huge-dims]", "test_header_schema_is_enforced[asan-",
    "test_recover_trusts_a_journal_only_within_the_spec[asan-unit-7]",
    "test_recover_trusts_a_journal_only_within_the_spec[asan-range-spills-into-next-tensor]",
    "test_recover_trusts_a_journal_only_within_the_spec[asan-count-2e40]",
    "test_recover_trusts_a_journal_only_within_the_spec[asan-deep-json-header]",
    "test_recover_trusts_a_journal_only_within_the_spec[asan-data-at-2e64]",
    "test_recover_control_a_legitimate_journal_rolls_back", "test_onnx_skeleton_encoding_is_checked[asan-deep-json]",
    "test_directory_target_paths_are_confined[asan-blob-1000-dirs-deep]", "native_only",
)


@pytest.fixture(autouse=True, params=_impls())
def impl(request, monkeypatch):
    """Run the case against the native build (and, for ASAN_SAMPLE, the sanitizer build)."""
    if request.param == "asan" and not any(s in request.node.name for s in ASAN_SAMPLE):
        pytest.skip("not in the sanitizer sample")
    build = request.getfixturevalue(request.param)

    def run_cli(args, cwd, *, timeout: float = tc.TIMEOUT_S):
        try:
            native_args = nr.translate(args)
        except nr.NotNative as e:
            pytest.skip(f"no nnpatch-apply counterpart: {e}")
        r = nr.native(build, *native_args, cwd=cwd, timeout=timeout)
        nr.assert_no_crash(r)
        return tc.Run(r.rc, r.out, r.err, r.rss_mb, r.seconds, r.timed_out)

    def refused_and_untouched(w, args, codes, *, allow=()):
        codes = (codes,) if isinstance(codes, int) else tuple(codes)
        if len(codes) > 1 or COMPARE_ALL:
            py = python_on_a_copy(w, args)
            assert py in codes, f"Python itself exits {py} here, not one of {codes}"
            codes = (py,)
        return ORIGINAL_REFUSED(w, args, codes, allow=allow)

    monkeypatch.setattr(tc, "run_cli", run_cli)
    monkeypatch.setattr(tc, "refused_and_untouched", refused_and_untouched)
    monkeypatch.setattr(tc, "RSS_LIMIT_MB", nr.RSS_LIMIT_MB if not build.sanitized else 2048)
    return build


def python_on_a_copy(w, args) -> int:
    """The Python CLI's exit code for ``args`` in a copy of the case's tree (so that what it does,
    a journal it deletes, say, does not change what the native run sees). It runs in this process
    (click's CliRunner, in the copy's work directory): the Python suite already holds these inputs
    to bounded memory and time, and an interpreter start per case would cost a second each."""
    from click.testing import CliRunner

    from nnpatch.cli import cli

    with tempfile.TemporaryDirectory() as t:
        root = os.path.join(t, "root")
        shutil.copytree(w.root, root, symlinks=True)
        with contextlib.chdir(os.path.join(root, "work")):
            result = CliRunner().invoke(cli, [str(a) for a in args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code


# --- cases of the Python suite that need their own form here -------------------------------------

def exact_or_refused_kind(w, args, produced: list[tuple[str, str]]):
    """A control for a target kind the native applier may not implement: exact, or exit 3 and
    nothing written."""
    before = w.snapshot()
    r = w.run(*args)
    if r.rc == 0:
        for got, want in produced:
            assert w.read(got) == w.read(want), f"{got} differs from {want}"
        return
    tc.assert_refused(r, 3)
    tc.assert_untouched(before, w.snapshot())


def test_onnx_control_real_external_data_patch_native_only(world):
    pytest.importorskip("onnx")
    (world.work / "fresh").mkdir()
    exact_or_refused_kind(world, ["apply", "base.safetensors", "p-onnx-ext.nnpatch", "-o", "fresh/target.onnx"],
                          [("fresh/target.onnx", "ext/target.onnx"),
                                                ("fresh/target.onnx.data", "ext/target.onnx.data")])


def test_onnx_control_reencoded_patch_native_only(world):
    pytest.importorskip("onnx")
    h = world.patch("p-onnx.nnpatch")
    craft.edit_skeleton(h)
    world.write("same.nnpatch", craft.encode_patch(h))
    exact_or_refused_kind(world, ["apply", "base.safetensors", "same.nnpatch", "-o", "out.onnx"],
                          [("out.onnx", "target.onnx")])


def test_directory_control_reencoded_patch_in_place_native_only(world):
    h = world.patch("p-dir.nnpatch")
    world.write("same.nnpatch", craft.encode_patch(h))
    git = world.read("v1/.git/config")
    exact_or_refused_kind(world, ["apply", "v1", "same.nnpatch", "--in-place"],
                          [("v1/model.safetensors", "v2/model.safetensors")])
    assert world.read("v1/.git/config") == git


@pytest.mark.parametrize("verify", ["default", "full", "touched"])
def test_target_blake3_lie_native_only(world, verify):
    """target.blake3 is wrong, everything else true (issue 28 item 5): refused in every verify mode
    as --verify full refuses it (exit 4, IntegrityError), nothing left at -o; the output's file
    digest is proven from the bytes written, never taken from the header."""
    h = world.patch()
    h["target"]["blake3"] = "ab" * 32
    world.write("lie.nnpatch", craft.encode_patch(h))
    tc.refused_and_untouched(world, ["apply", "base.safetensors", "lie.nnpatch", "-o", "out.safetensors",
                                     f"--verify={verify}"], 4)
    r = world.run("apply", "base.safetensors", "lie.nnpatch", "-o", "out.safetensors", f"--verify={verify}")
    assert "result does not match the patch's target (BLAKE3" in r.err, r


def test_target_blake3_lie_in_place_native_only(world):
    """The same lie through --in-place: exit 4, the model rolled back to exactly the base, no journal."""
    world.write("model.safetensors", world.read("base.safetensors"))
    h = world.patch()
    h["target"]["blake3"] = "ab" * 32
    world.write("lie.nnpatch", craft.encode_patch(h))
    before = world.snapshot()
    r = world.run("apply", "model.safetensors", "lie.nnpatch", "--in-place")
    tc.assert_refused(r, 4)
    tc.assert_untouched(before, world.snapshot())


def test_lone_surrogate_name_native_only(world):
    """A name holding an escaped lone surrogate (not Unicode text): refused with Python's exit code
    (3 since ccfdaaf: the header is not valid JSON text; tests/test_crafted.py allows 3 or 4)."""
    h = tc._named_patch(world, "SURR")
    world.write("s.nnpatch", craft.encode_patch(h, text_filter=lambda t: t.replace(b"SURR", b"\\udc80x")))
    tc.refused_and_untouched(world, ["apply", "base.safetensors", "s.nnpatch", "-o", "out.safetensors"], (3, 4))


@pytest.mark.parametrize("case", ["unsigned", "other-key", "bad-signature"])
def test_check_with_key_refuses_native_only(world, impl, case):
    """--check PATCH --key: the signature is checked like apply checks it (exit 4)."""
    pytest.importorskip("cryptography")
    key, pem = craft.new_key()
    other, _ = craft.new_key()
    world.write("release.pub.pem", pem)
    good = craft.file_patch(world.read("base.safetensors"), world.read("target.safetensors"))
    data = craft.encode_patch(good, sign_with={"unsigned": None, "other-key": other, "bad-signature": key}[case])
    if case == "bad-signature":
        data = data[:-1] + bytes([data[-1] ^ 1])
    world.write("x.nnpatch", data)
    before = world.snapshot()
    r = nr.native(impl, "--check", "x.nnpatch", "--key", "release.pub.pem", cwd=world.work)
    nr.assert_refused(r, 4)
    tc.assert_untouched(before, world.snapshot())
    ok = craft.encode_patch(good, sign_with=key)
    world.write("ok.nnpatch", ok)
    nr.assert_ok(nr.native(impl, "--check", "ok.nnpatch", "--key", "release.pub.pem", "--base", "base.safetensors",
                           cwd=world.work))



# --- --check applies the rules apply applies before it writes (issue 28 item 9) ---------------------

@pytest.mark.parametrize("case", ["external-data-is-the-base", "garbage-skeleton", "deep-json-skeleton"])
def test_check_refuses_the_onnx_patch_apply_refuses_native_only(world, impl, case):
    """An ONNX-target patch apply refuses under spec 5.7 (external data named as the base, a skeleton
    of garbage, 100,000-deep JSON in it): --check, with or without --base, refuses it with apply's
    exit code (3: nnpatch-apply does not write ONNX models, so it vouches for no ONNX skeleton)."""
    pytest.importorskip("onnx")
    h = world.patch("p-onnx.nnpatch")
    if case == "external-data-is-the-base":
        craft.plant_external(h, "base.safetensors", tc.EVIL)
    elif case == "garbage-skeleton":
        h["target"]["skeleton"] = craft.section(b"\xff garbage " * 64, compress=True)
    else:
        obj, proto = craft.decode_skeleton(craft.section_bytes(h["target"]["skeleton"]))
        h["target"]["skeleton"] = craft.section(craft.encode_skeleton(
            None, proto, raw_json=b'{"x-":' + craft.nested_list_json(100_000) + b',' + craft.canonical(obj)[1:]),
            compress=True)
    world.write("bad.nnpatch", craft.encode_patch(h))
    before = world.snapshot()
    applied = nr.native(impl, "base.safetensors", "bad.nnpatch", "-o", "out.onnx", cwd=world.work)
    nr.assert_refused(applied, 3)
    for args in (["--check", "bad.nnpatch", "--base", "base.safetensors"], ["--check", "bad.nnpatch"]):
        r = nr.native(impl, *args, cwd=world.work)
        nr.assert_refused(r, applied.rc)
        assert "target format 'onnx'" in r.err, r
    tc.assert_untouched(before, world.snapshot())


@pytest.mark.parametrize("lie", ["base-model-digest", "op-base-digest"])
def test_check_base_proves_what_apply_proves_native_only(world, impl, lie):
    """The base's file digest is the patch's, but a digest apply checks before writing is false (the
    base model digest, or one op's base tensor digest): apply refuses (exit 4), so --check --base
    reports the mismatch (exit 1, as for any base that is not the patch's) instead of exit 0 on the
    file digest alone."""
    h = world.patch()
    if lie == "base-model-digest":
        h["base"]["model_blake3"] = "ab" * 32
    else:
        op = next(o for o in h["ops"] if o.get("base"))
        op["base"]["blake3"] = "cd" * 32
    world.write("lie.nnpatch", craft.encode_patch(h))
    before = world.snapshot()
    applied = nr.native(impl, "base.safetensors", "lie.nnpatch", "-o", "out.safetensors", cwd=world.work)
    nr.assert_refused(applied, 4)
    r = nr.native(impl, "--check", "lie.nnpatch", "--base", "base.safetensors", cwd=world.work)
    nr.assert_no_crash(r)
    assert r.rc == 1, str(r)
    tc.assert_untouched(before, world.snapshot())
