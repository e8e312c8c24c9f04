"""The native recover sweeps the staging files a killed Python run left (tests/test_staging_leftovers.py
for the Python side; test_native_gguf_killed for the native names)."""

from __future__ import annotations

import os
import subprocess

from nnpatch.sidefile import staging_prefix

from ..conftest import make_pair, read


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_the_native_recover_removes_a_python_leftover(native, tmp_path):
    """Both implementations sweep the same names: what a killed Python run left, nnpatch-apply
    --recover removes (and the native names are covered by test_native_gguf_killed)."""
    base, _ = make_pair(tmp_path)
    dead = _dead_pid()
    python_name = staging_prefix(base).replace(f"-{os.getpid()}.", f"-{dead}.") + "k3j4h5.safetensors.tmp"
    nested = "." + python_name + f".nnpatch-staged-{dead}.ab12.tmp"  # a staging file's staging file
    kept = [f".{os.path.basename(base)}.nnpatch-staged-0{dead}.ab12.tmp", f"x{python_name}"]
    for name in [python_name, nested, *kept]:
        (tmp_path / name).write_bytes(b"staged bytes")
    before = read(base)
    r = subprocess.run([*native.cmd, "--recover", str(base)], capture_output=True, env=native.full_env())
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / python_name).exists() and not (tmp_path / nested).exists()
    assert all((tmp_path / name).exists() for name in kept)
    assert read(base) == before

