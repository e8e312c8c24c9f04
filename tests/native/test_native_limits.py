"""Memory and resources of nnpatch-apply on hostile inputs inside the format's limits, and on bad
command lines (issue 28, items 8 and 11).

* Every usage error of nnpatch-apply leaked its argument array (LeakSanitizer: definitely lost):
  the sanitizer build runs them here with detect_leaks=1.
* A JSON string is at most 1 MiB (1,048,576 bytes) of decoded UTF-8 in every header the library
  reads (FORMAT.md section 12, JOURNAL.md "Trust" step 2): a huge string under an `x-` key of a
  patch header, millions of escaped quotes, a 95 MiB `__metadata__` string in a safetensors
  header and a 50 MiB string in a journal header are refused by name, each in a peak resident
  size far below what the text would cost expanded (measured in a child of a fresh interpreter,
  so no earlier child of the test process counts).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import blake3
import pytest

from tests import craft

from .conftest import VECTORS

PEAK_LIMIT = 300 << 20  # bytes of peak RSS any of these cases may cost
MIB = 1 << 20


@pytest.mark.parametrize("argv", [
    ["OLD", "-", "-", "-o", "OUT"],
    ["--bogus"],
    ["OLD", "P", "-o", "A", "-o", "B"],
    ["OLD", "P", "-o", "OUT", "--verify=sometimes"],
    ["--check", "P", "-o", "OUT"],
    ["--recover", "M", "--key", "K"],
    ["--in-place", "--check", "M"],
    ["OLD", "P", "--key"],
    ["--recover"],
], ids=lambda a: " ".join(a))
def test_usage_errors_leak_nothing(asan, argv, tmp_path):
    r = asan.run(*argv, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(b"Error: ") and r.stderr.count(b"\n") == 1, r.stderr


def peak_rss(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, int]:
    """Run cmd as the only child of a fresh interpreter; its result and peak resident bytes."""
    probe = ("import resource, subprocess, sys\n"
             "r = subprocess.run(sys.argv[1:], capture_output=True)\n"
             "sys.stderr.buffer.write(r.stderr)\n"
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, env=env, timeout=300)
    rc, kib = map(int, r.stdout.split())
    return subprocess.CompletedProcess(cmd, rc, b"", r.stderr), kib * 1024


def check_bounded(native, *args) -> bytes:
    r, peak = peak_rss([*native.cmd, *map(str, args)], native.full_env())
    assert r.returncode in (3, 4), r.stderr
    assert b"a string longer than 1048576 bytes" in r.stderr, r.stderr
    assert r.stderr.count(b"\n") == 1, r.stderr
    assert peak < PEAK_LIMIT, f"peak RSS {peak >> 20} MiB"
    print(f"peak RSS {peak >> 20} MiB")
    return r.stderr


def test_string_of_one_mib_is_read(native, tmp_path):
    """The cap itself: a string of exactly 1 MiB is fine (the header then fails on its own
    merits), one byte more is refused by name."""
    for n, refused in ((MIB, False), (MIB + 1, True)):
        path = tmp_path / f"p{n}.nnpatch"
        path.write_bytes(craft.with_raw_header(json.dumps({"x-big": "a" * n}).encode(), zstd_header=False))
        r = native.run("--check", path)
        assert r.returncode == 3, r.stderr
        assert (b"a string longer than 1048576 bytes" in r.stderr) == refused, r.stderr


def test_huge_x_key_in_a_patch_header(native, tmp_path):
    path = tmp_path / "p.nnpatch"
    path.write_bytes(craft.with_raw_header(b'{"x-big":"' + b"a" * (60 * MIB) + b'"}', zstd_header=False))
    check_bounded(native, "--check", path)


def test_millions_of_escaped_quotes(native, tmp_path):
    """Each \\" decodes to one byte: 30 million of them are refused after the first MiB."""
    path = tmp_path / "p.nnpatch"
    path.write_bytes(craft.with_raw_header(b'{"x-q":"' + b'\\"' * (30_000_000) + b'"}', zstd_header=False))
    check_bounded(native, "--check", path)


def test_huge_string_in_a_zstd_header(native, tmp_path):
    """The same in a compressed header (64 MiB at most once expanded; hex digits, so the frame
    stays within the 64x expansion rule)."""
    path = tmp_path / "p.nnpatch"
    text = b'{"x-big":"' + os.urandom(30 * MIB).hex().encode() + b'"}'
    path.write_bytes(craft.with_raw_header(text, zstd_header=True))
    check_bounded(native, "--check", path)


def test_huge_metadata_string_in_a_safetensors_base(native, tmp_path):
    """A 95 MiB __metadata__ string in the base's header (100 MB is the safetensors limit)."""
    case = next(v for v in json.loads((VECTORS / "vectors.json").read_text())["valid"] if v["name"] == "all-ops")
    patch = VECTORS / case["patch"]
    data = b"\x00" * 16
    header = craft.safetensors_header([("t", "F32", [4], 0, 16)], {"k": "a" * (95 * MIB)})
    base = tmp_path / "base.safetensors"
    base.write_bytes(header + data)
    check_bounded(native, base, patch, "-o", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_huge_string_in_a_journal_header(native, tmp_path):
    """A committed journal (valid trailer) whose header holds a 50 MiB string: refused and kept."""
    model = tmp_path / "m.safetensors"
    model.write_bytes(craft.safetensors_header([("t", "F32", [4], 0, 16)]) + b"\x00" * 16)
    text = b'{"created_by":"' + b"a" * (50 * MIB) + b'"}'
    hlen = -(-(24 + len(text)) // 64) * 64 - 24
    body = b"\x89NNJ\r\n\x1a\n" + struct.pack("<HHIQ", 1, 0, 0, hlen) + text + b" " * (hlen - len(text))
    journal = tmp_path / "m.safetensors.nnpatch-journal"
    journal.write_bytes(body + blake3.blake3(body).digest())
    check_bounded(native, "--recover", model)
    assert journal.exists(), "a committed journal that breaks the spec is kept"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_peak_rss_probe_measures_the_child(native, tmp_path):
    """The probe itself: a child that touches 64 MiB shows at least that much."""
    r, peak = peak_rss([sys.executable, "-c", "b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096])"],
                       dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert peak >= 64 << 20


@pytest.mark.parametrize("zstd_header", [False, True], ids=["raw", "zstd"])
def test_with_a_key_the_signature_comes_before_the_big_header(native, tmp_path, zstd_header):
    """With --key, an unsigned patch holding a 60 MiB string is refused for its signature (4)
    before its header is expanded or parsed: no JSON verdict, and little memory."""
    pytest.importorskip("cryptography")
    _, pem = craft.new_key()
    key = tmp_path / "release.pub.pem"
    key.write_bytes(pem)
    text = b'{"x-big":"' + (os.urandom(30 * MIB).hex().encode() if zstd_header else b"a" * (60 * MIB)) + b'"}'
    path = tmp_path / "p.nnpatch"
    path.write_bytes(craft.with_raw_header(text, zstd_header=zstd_header))
    r, peak = peak_rss([*native.cmd, "--check", str(path), "--key", str(key)], native.full_env())
    assert r.returncode == 4, r.stderr
    assert b"string longer" not in r.stderr and b"signature" in r.stderr.lower(), r.stderr
    assert peak < PEAK_LIMIT, f"peak RSS {peak >> 20} MiB"


def test_names_past_16_mib_together_are_refused_as_python_refuses_them(native, tmp_path):
    """FORMAT.md section 12: op names and file paths total at most 16,777,216 bytes; the same line as
    the Python reader (tests/test_crafted_r3.py has the case with its memory)."""
    from nnpatch.errors import PatchFormatError
    from nnpatch.patchfile import parse_patch

    ref = {"blake3": "0" * 64, "dtype": "U8", "shape": []}
    model = {"format": "safetensors", "size": 8, "blake3": "1" * 64, "model_blake3": "2" * 64, "tensors": 0}
    target = dict(model, layout={"offset": 0, "length": 0, "size": 0, "codec": []})
    for count, refused in ((256, False), (257, True)):
        ops = [{"base": ref, "name": f"n{i:04d}" + "a" * (65_536 - 5), "op": "remove"} for i in range(count)]
        data = craft.with_raw_header(craft.canonical({"required_features": [], "base": model, "target": target,
                                                      "ops": ops}), zstd_header=False)
        path = tmp_path / f"names{count}.nnpatch"
        path.write_bytes(data)
        r = native.run("--check", path)
        try:
            parse_patch(data, path=str(path))
            python = ""
        except PatchFormatError as e:
            python = str(e)
        line = "ops[256].name: the header's names and paths total more than 16777216 bytes of UTF-8"
        assert (line in r.stderr.decode()) == refused, r.stderr
        assert (line in python) == refused, python


def test_manifest_past_524288_values_is_refused_as_python_refuses_it(native, tmp_path):
    """MANIFEST.md, Limits: a manifest (as every JSON document np_load_object reads) holds at most 524,288
    values; the same refusal as Python's load_object."""
    from nnpatch._json import load_object

    raw = b'{"format":"nnpatch-release","x-many":[' + b"0," * 524_288 + b"0]}"
    with pytest.raises(ValueError, match="more than 524288 values"):
        load_object(raw, limit=16 << 20, what="manifest")
    path = tmp_path / "manifest.json"
    path.write_bytes(raw)
    model = tmp_path / "model.safetensors"
    model.write_bytes(struct.pack("<Q", 2) + b"{}")
    r = native.run_update(model, "--manifest", path)
    assert r.returncode == 3, r.stderr
    assert b"invalid manifest JSON: more than 524288 values" in r.stderr, r.stderr
