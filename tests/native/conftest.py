"""Fixtures for the native applier's tests (native/, issue 13).

The native build is made here, once per session, with the top-level Makefile
(`make native`, `make native-asan`, `make native-aarch64`), so `make test` never
depends on it: a broken native build fails the tests that need it, one by one,
with the compiler's output in the failure.

Fixtures:
  native       the host build (build/native/): a NativeBuild with .apply (the
               nnpatch-apply path), .lib_so, .lib_a, .prim_driver, .jni_so, .dir
  native_test  the host build with the test hooks (-DNNPATCH_TEST: build/native-test/), e.g.
               NNPATCH_TEST_PAUSE_AFTER_JOURNAL; the shipped build (native) has none
  asan         the AddressSanitizer + UndefinedBehaviorSanitizer build (build/native-asan/)
  aarch64      the aarch64 cross build (build/native-aarch64/), run under qemu-aarch64
  native_impl  parametrised over both host builds ("native" and "asan"): use it to
               run a whole suite against the normal and the sanitizer binary:

      def test_rows(native_impl, tmp_path):
          r = native_impl.run("OLD", "PATCH", "-o", str(tmp_path / "new"))
          assert r.returncode == 0, r.stderr

  native_impl.run(*args, input=None, timeout=120, check_sanitizer=True) runs
  nnpatch-apply (str() of each argument) and returns a CompletedProcess with
  bytes stdout/stderr; a sanitizer report fails the test at once with the
  report. native_impl.cmd is the argv prefix (for Popen, e.g. SIGKILL tests),
  native_impl.env the environment it needs.

NNPATCH_NATIVE_IMPLS=native (or asan) restricts native_impl to one build.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build"

# A sanitizer finding exits with this code (never one of nnpatch's: 0-5, 130).
SANITIZER_EXIT = 86
SANITIZER_ENV = {
    "ASAN_OPTIONS": f"exitcode={SANITIZER_EXIT}:abort_on_error=0:detect_leaks=1:"
                    "strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1",
    "UBSAN_OPTIONS": f"halt_on_error=1:exitcode={SANITIZER_EXIT}:print_stacktrace=1",
}
SANITIZER_MARKS = (b"ERROR: AddressSanitizer", b"ERROR: LeakSanitizer", b"runtime error:",
                   b"SUMMARY: UndefinedBehaviorSanitizer")

_results: dict[str, tuple[bool, str]] = {}


def make(target: str, timeout: int = 1200) -> tuple[bool, str]:
    """Run `make TARGET` at the repository root once per session (under a lock, so
    two test runs in one checkout never build the same objects at once)."""
    if target not in _results:
        BUILD.mkdir(exist_ok=True)
        with open(BUILD / ".native-build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                # a clean environment for make: `make test`'s own MAKEFLAGS (a jobserver) must not leak in
                env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
                r = subprocess.run(["make", "--no-print-directory", "-j2", target], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=timeout)
                _results[target] = (r.returncode == 0, r.stdout + r.stderr)
            except (OSError, subprocess.TimeoutExpired) as e:
                _results[target] = (False, f"{type(e).__name__}: {e}")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return _results[target]


def require_tool(name: str) -> str:
    """The tool's path; a skip when it is missing and `make setup` could not install it
    (not root), a failure when it should have been installed."""
    path = shutil.which(name)
    if path is None:
        if os.geteuid() != 0:
            pytest.skip(f"{name} is not installed and this is not root (make setup installs it as root)")
        pytest.fail(f"{name} is missing: run `make setup` (native/scripts/install-deps.sh)")
    return path


@dataclass
class NativeBuild:
    name: str
    dir: Path
    log: str = ""
    runner: list[str] = field(default_factory=list)  # e.g. qemu-aarch64 -L ...
    env: dict[str, str] = field(default_factory=dict)
    sanitized: bool = False

    @property
    def apply(self) -> Path:
        return self.dir / "nnpatch-apply"

    @property
    def update(self) -> Path:
        """nnpatch-update (host builds only: the cross build has none, see native/Makefile)."""
        return self.dir / "nnpatch-update"

    @property
    def update_cmd(self) -> list[str]:
        return [*self.runner, str(self.update)]

    def run_update(self, *args, timeout: float = 120, env: dict | None = None,
                   check_sanitizer: bool = True) -> subprocess.CompletedProcess:
        """nnpatch-update with these arguments, as run() runs nnpatch-apply."""
        r = subprocess.run([*self.update_cmd, *map(str, args)], capture_output=True, timeout=timeout,
                           env=self.full_env(env))
        if check_sanitizer:
            self.check_sanitizer(r.returncode, r.stderr)
        return r

    @property
    def lib_so(self) -> Path:
        return self.dir / "libnnpatch.so"

    @property
    def lib_a(self) -> Path:
        return self.dir / "libnnpatch.a"

    @property
    def jni_so(self) -> Path:
        return self.dir / "libnnpatch_jni.so"

    @property
    def prim_driver(self) -> Path | None:
        p = self.dir / "prim_driver"
        return p if p.exists() else None

    @property
    def cmd(self) -> list[str]:
        return [*self.runner, str(self.apply)]

    def full_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        if extra:
            env.update(extra)
        return env

    def run(self, *args, input: bytes | None = None, timeout: float = 120, env: dict | None = None,
            check_sanitizer: bool = True, cwd=None) -> subprocess.CompletedProcess:
        r = subprocess.run([*self.cmd, *map(str, args)], input=input, capture_output=True,
                           timeout=timeout, env=self.full_env(env), cwd=cwd)
        if check_sanitizer:
            self.check_sanitizer(r.returncode, r.stderr)
        return r

    def check_sanitizer(self, returncode: int, stderr: bytes) -> None:
        """Fail the test on a sanitizer report (call it after a Popen of .cmd too)."""
        if self.sanitized and (returncode == SANITIZER_EXIT or any(m in stderr for m in SANITIZER_MARKS)):
            pytest.fail(f"sanitizer finding in {self.name} build:\n{stderr.decode(errors='replace')[-6000:]}")


def _build(target: str, name: str, subdir: str, **kw) -> NativeBuild:
    ok, log = make(target)
    if not ok:
        pytest.fail(f"`make {target}` failed:\n{log[-6000:]}", pytrace=False)
    return NativeBuild(name=name, dir=BUILD / subdir, log=log, **kw)


@pytest.fixture(scope="session")
def native() -> NativeBuild:
    return _build("native", "native", "native")


@pytest.fixture(scope="session")
def native_test() -> NativeBuild:
    return _build("native-test", "native-test", "native-test")


@pytest.fixture(scope="session")
def asan() -> NativeBuild:
    return _build("native-asan", "asan", "native-asan", env=SANITIZER_ENV, sanitized=True)


@pytest.fixture(scope="session")
def aarch64() -> NativeBuild:
    require_tool("aarch64-linux-gnu-gcc")
    qemu = require_tool("qemu-aarch64")
    return _build("native-aarch64", "aarch64", "native-aarch64",
                  runner=[qemu, "-L", "/usr/aarch64-linux-gnu"])


def _impls() -> list[str]:
    wanted = os.environ.get("NNPATCH_NATIVE_IMPLS", "native,asan")
    return [n for n in ("native", "asan") if n in wanted.split(",")]


@pytest.fixture(params=_impls())
def native_impl(request) -> NativeBuild:
    """The host build and the sanitizer build in turn (see the module docstring)."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def hooked_impl(native_impl, request) -> NativeBuild:
    """native_impl with the test hooks: the native-test build in place of the host build (the
    sanitizer build has them compiled in)."""
    return request.getfixturevalue("native_test") if native_impl.name == "native" else native_impl


VECTORS = ROOT / "spec" / "vectors"
