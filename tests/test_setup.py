"""What `make demo` and `make test` install, and that set-up says so before it changes the system
(issue 27, item 6)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "native", "scripts", "install-deps.sh")


def _make_n(target: str) -> str:
    p = subprocess.run(["make", "-n", "-W", "pyproject.toml", target], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_demo_installs_only_the_python_side():
    demo, test = _make_n("demo"), _make_n("test")
    assert "install-deps.sh" not in demo and "pip install" in demo
    assert "install-deps.sh" in test and "pip install" in test


def test_install_deps_says_what_and_why_before_installing(tmp_path):
    """With nothing installed (a dpkg-query that finds nothing) it lists every package with its
    reason, and the dry run stops there: no apt-get, no dpkg --add-architecture."""
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls"
    for name, body in {"dpkg-query": "exit 1", "dpkg": 'echo "dpkg $*" >> "$LOG"; [ "$1" = --print-architecture ] '
                       '&& echo amd64; exit 0', "apt-get": 'echo "apt-get $*" >> "$LOG"; exit 0'}.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "LOG": str(log), "NNPATCH_DEPS_DRY_RUN": "1"}
    p = subprocess.run(["sh", SCRIPT], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("native deps: make test needs these Debian packages")
    listed = dict(ln.strip().split(": ", 1) for ln in lines if ln.startswith("  ") and ": " in ln)
    for pkg in ("gcc", "libzstd-dev", "libsodium-dev", "clang", "qemu-user", "b3sum", "libzstd-dev:arm64"):
        assert pkg in listed and listed[pkg], (pkg, p.stdout)
    assert "adds arm64 as a dpkg architecture" in p.stdout
    assert "nothing installed" in lines[-1]
    calls = log.read_text() if log.exists() else ""
    assert "apt-get" not in calls and "--add-architecture" not in calls
