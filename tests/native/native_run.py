"""Running ``nnpatch-apply`` (and, beside it, the Python ``nnpatch``) for the native suites.

Shared by tests/native/test_native_{vectors,differential,crafted,stream}.py: one way to run a
command under limits and measure it, one way to say what a refusal must look like, and the
translation of the Python command line into the native one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Address space for a plain build (a sanitizer build reserves terabytes of shadow, and qemu
#: its guest space: no --as for them).
AS_LIMIT = 1 << 30
#: Peak resident memory of one native run on the crafted inputs. The spec lets a header be
#: 64 MiB once decompressed, so a refusal of the header bomb may touch that much.
RSS_LIMIT_MB = 160
TIMEOUT_S = 30.0
#: tests/native/conftest.py: a sanitizer finding exits with this code.
SANITIZER_EXIT = 86


@dataclass
class Run:
    rc: int
    out: str
    err: str
    rss_mb: float
    seconds: float
    timed_out: bool

    def __str__(self) -> str:
        return (f"rc={self.rc} rss={self.rss_mb:.0f}MB {self.seconds:.2f}s timed_out={self.timed_out}\n"
                f"stdout: {self.out[-2000:]!r}\nstderr: {self.err[-3000:]!r}")


def run(cmd: list, *, cwd=None, stdin: bytes | None = None, timeout: float = TIMEOUT_S,
        as_limit: int | None = None, env: dict | None = None, chunk: int | None = None) -> Run:
    """``cmd`` under ``prlimit --as`` (when given), its peak RSS measured by /usr/bin/time.

    ``stdin`` is fed through a real pipe by a thread (``chunk`` bytes at a time when given, so
    the reader sees short reads), never as a file the reader could seek in.
    """
    with tempfile.TemporaryDirectory() as t:
        rss_file = os.path.join(t, "rss")
        full = ["/usr/bin/time", "-f", "%M", "-o", rss_file]
        if as_limit:
            full += ["prlimit", f"--as={as_limit}", "--"]
        full += [os.fspath(c) for c in cmd]
        with open(os.path.join(t, "out"), "w+b") as out, open(os.path.join(t, "err"), "w+b") as err:
            start = time.monotonic()
            p = subprocess.Popen(full, cwd=cwd, stdout=out, stderr=err, env=env,
                                 stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                 start_new_session=True)
            feeder = None
            if stdin is not None:
                feeder = threading.Thread(target=_feed, args=(p.stdin, stdin, chunk), daemon=True)
                feeder.start()
            try:
                p.wait(timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
                timed_out = True
            if feeder is not None:
                feeder.join(5)
            seconds = time.monotonic() - start
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
        try:
            with open(rss_file) as f:
                rss_kb = int(f.read().split()[-1])  # after "Command exited with non-zero status N", if any
        except (OSError, ValueError, IndexError):
            rss_kb = 0
        rc = p.returncode
        if rc is not None and rc < 0:
            rc = 128 - rc
        # /usr/bin/time reports a child killed by a signal as "Command terminated by signal N" and exits 1;
        # find it in the file so a crash is never read as exit 1
        try:
            with open(rss_file) as f:
                text = f.read()
            if "terminated by signal" in text:
                rc = 128 + int(text.split("terminated by signal")[1].split()[0])
        except (OSError, ValueError, IndexError):
            pass
        return Run(rc, stdout, stderr, rss_kb / 1024, seconds, timed_out)


def _feed(pipe, data: bytes, chunk: int | None) -> None:
    try:
        if chunk:
            for i in range(0, len(data), chunk):
                pipe.write(data[i:i + chunk])
                pipe.flush()
        else:
            pipe.write(data)
    except (BrokenPipeError, OSError):
        pass  # the reader stopped early (a refusal): what it read is what it judged
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def native(build, *args, cwd=None, stdin: bytes | None = None, timeout: float = TIMEOUT_S,
           limit: bool = True, chunk: int | None = None) -> Run:
    """``nnpatch-apply ARGS`` of ``build`` (a conftest NativeBuild), under the address-space
    limit unless it is a sanitizer or emulated build; a sanitizer report fails the test."""
    as_limit = AS_LIMIT if (limit and not build.sanitized and not build.runner) else None
    slow = 4 if (build.sanitized or build.runner) else 1
    r = run([*build.cmd, *args], cwd=cwd, stdin=stdin, timeout=timeout * slow, as_limit=as_limit,
            env=build.full_env(), chunk=chunk)
    build.check_sanitizer(r.rc, r.err.encode())
    return r


def python(*args, cwd=None, stdin: bytes | None = None, timeout: float = 60.0) -> Run:
    """``python -m nnpatch ARGS`` (the reference)."""
    return run([sys.executable, "-m", "nnpatch", *args], cwd=cwd, stdin=stdin, timeout=timeout,
               env=dict(os.environ, PYTHONPATH=ROOT))


def assert_no_crash(r: Run) -> None:
    """An answer, not a crash: no timeout, no signal, no sanitizer report (exit 99)."""
    assert not r.timed_out, f"ran past its time limit: {r}"
    assert r.rc < 128 or r.rc == 130, f"killed by signal {r.rc - 128}: {r}"
    assert r.rc != SANITIZER_EXIT, f"sanitizer report: {r}"
    assert "AddressSanitizer" not in r.err and "runtime error:" not in r.err, f"sanitizer report: {r}"


def assert_refused(r: Run, codes) -> None:
    """Exit in ``codes`` with exactly one ``Error: ...`` line on stderr (a usage error, exit 2, may show
    the usage first)."""
    codes = (codes,) if isinstance(codes, int) else tuple(codes)
    assert_no_crash(r)
    assert r.rc in codes, f"expected exit {codes}: {r}"
    lines = r.err.strip("\n").splitlines()
    if r.rc == 2:  # a usage error may show the usage before its Error line
        assert lines and lines[-1].startswith("Error: "), f"stderr does not end in an Error: line: {r}"
    else:
        assert len(lines) == 1 and lines[0].startswith("Error: "), f"stderr is not one Error: line: {r}"


def assert_ok(r: Run) -> None:
    assert_no_crash(r)
    assert r.rc == 0, f"expected success: {r}"


def leftovers(directory, *keep) -> list[str]:
    """Entries of ``directory`` other than ``keep``: temporary files a failed run left behind."""
    return sorted(set(os.listdir(directory)) - set(keep))


# --- the Python command line, as nnpatch-apply spells it ---------------------------------------------

class NotNative(Exception):
    """A Python command with no nnpatch-apply counterpart (show, update, --json, ...)."""


def translate(args) -> list[str]:
    """``nnpatch [global] apply|recover ...`` -> the nnpatch-apply arguments that mean the same."""
    args = [str(a) for a in args]
    quiet = False
    while args and args[0] in ("--quiet", "-q", "--debug"):
        quiet = quiet or args[0] != "--debug"
        args = args[1:]
    if not args:
        raise NotNative("no command")
    cmd, rest = args[0], args[1:]
    if cmd == "recover":
        if len(rest) != 1:
            raise NotNative("recover with options")
        return ["--recover", rest[0]]
    if cmd != "apply":
        raise NotNative(cmd)
    positional, opts, in_place, i = [], [], False, 0
    while i < len(rest):
        a = rest[i]
        if a == "--in-place":
            in_place = True
        elif a in ("-o", "--output", "--key", "--verify"):
            opts += ["-o" if a == "--output" else a, rest[i + 1]]
            i += 1
        elif a.startswith("--verify="):
            opts += ["--verify", a.split("=", 1)[1]]
        elif a in ("--quiet", "-q"):
            quiet = True
        elif a.startswith("-") and a != "-":
            raise NotNative(a)
        else:
            positional.append(a)
        i += 1
    if in_place:
        if "-o" in opts or "--verify" in opts:
            raise NotNative("--in-place with -o or --verify")
        return ["--in-place", *positional, *opts]
    return [*positional, *opts] + (["--quiet"] if quiet else [])
