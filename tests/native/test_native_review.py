"""Regression tests for defects found by a security review of the native applier (native/).

* np_quote (native/src/ctx.c) kept a valid UTF-8 sequence raw, the C1 controls included: a patch
  naming U+009B (a terminal's CSI) put an escape sequence on the user's terminal through "Error: ...".
  They are escaped now as Python's repr escapes them ('\\x9b').
* nnpatch-apply --in-place MODEL - spooled standard input ignoring SIGINT/SIGTERM (EINTR retried):
  an interrupted spool hung until the writer closed the pipe. It stops now (130) and leaves no spool.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests import craft


def _raw_patch(tmp_path, header: dict) -> str:
    path = tmp_path / "p.nnpatch"
    path.write_bytes(craft.with_raw_header(json.dumps(header).encode(), zstd_header=False))
    return str(path)


def test_c1_control_in_a_message_is_escaped(native_impl, tmp_path):
    """An untrusted string holding U+009B (CSI), U+0085 and U+00AD is quoted, never written raw."""
    patch = _raw_patch(tmp_path, {"required_features": ["\u009b31m\u0085x\u00ad\u00e9"]})
    r = native_impl.run("--check", patch)
    assert r.returncode == 3, r.stderr
    err = r.stderr
    for raw in ("\u009b", "\u0085", "\u00ad"):
        assert raw.encode() not in err, err
    # Python's repr of the same string, and a printable non-ASCII letter kept as it is
    assert "'\\x9b31m\\x85x\\xad\u00e9'".encode() in err, err


def test_c1_escape_does_not_overrun_the_quote_buffer(native_impl, tmp_path):
    """A long run of C1 controls: cut with '...' inside the buffer (the sanitizer build checks it)."""
    patch = _raw_patch(tmp_path, {"required_features": ["\u009b" * 5000]})
    r = native_impl.run("--check", patch)
    assert r.returncode == 3, r.stderr
    assert "\u009b".encode() not in r.stderr
    assert b"\\x9b\\x9b" in r.stderr and b"...'" in r.stderr, r.stderr


@pytest.mark.parametrize("sig, code, words", [(signal.SIGINT, 130, b"Error: interrupted"),
                                              (signal.SIGTERM, 143, b"Error: terminated (SIGTERM)")])
def test_in_place_stdin_spool_stops_on_sigint(native_impl, tmp_path, sig, code, words):
    """SIGINT (SIGTERM) while --in-place spools '-' (the writer keeps the pipe open): exit 130 (143,
    as `nnpatch` answers it) at once, no .nnpatch-stdin.* file left beside the model."""
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    p = subprocess.Popen([*native_impl.cmd, "--in-place", str(model), "-"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=native_impl.full_env())
    try:
        deadline = time.monotonic() + 30
        while not any(n.startswith(".nnpatch-stdin.") for n in os.listdir(tmp_path)):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the spool file never appeared"
            time.sleep(0.02)
        p.stdin.write(b"\x89NNP")  # some bytes arrive, then the writer stalls
        p.stdin.flush()
        time.sleep(0.3)
        p.send_signal(sig)
        try:
            p.wait(timeout=15)  # stdin stays open: only the signal can end the spool
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            raise AssertionError(f"still spooling 15 s after SIGINT: {err!r}")
        _, err = p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    native_impl.check_sanitizer(p.returncode, err)
    assert p.returncode == code, err
    assert err.strip() == words, err
    left = [n for n in os.listdir(tmp_path) if n != "model.safetensors"]
    assert left == [], left


@pytest.mark.parametrize("argv", [["PATCH", "OLD", "-o", "NEW"], ["OLD", "OLD", "-o", "NEW"],
                                  ["--in-place", "PATCH", "PATCH"], ["--check", "OLD"],
                                  ["--check", "PATCH", "--base", "PATCH"]])
def test_swapped_arguments_are_a_usage_error(native_impl, tmp_path, argv):
    """A patch where a model goes, or a model where a patch goes: exit 2 and one line naming the
    order, as `nnpatch` answers (it was exit 3 natively); nothing written."""
    import numpy as np

    from nnpatch import diff
    from nnpatch.weights import write_safetensors

    w = np.arange(64, dtype="<f4")
    write_safetensors(tmp_path / "old.safetensors", {"w": ("F32", (8, 8), w.tobytes())})
    w[3] += 1
    write_safetensors(tmp_path / "new.safetensors", {"w": ("F32", (8, 8), w.tobytes())})
    diff(str(tmp_path / "old.safetensors"), str(tmp_path / "new.safetensors"), str(tmp_path / "p.nnpatch"))
    names = {"OLD": tmp_path / "old.safetensors", "PATCH": tmp_path / "p.nnpatch", "NEW": tmp_path / "out"}
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    r = native_impl.run(*[names.get(a, a) for a in argv])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and "; the order is: nnpatch-apply" in lines[0], r.stderr
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
