"""Hostile and broken patches: every one fails with exit 3 or 4, one line, nothing written, base intact.

Runs the real CLI (click's runner) on a small real patch: truncated at every
byte, one bit flipped at every byte, and header fields mutated by hypothesis
with the trailer recomputed so the parser itself is exercised.
"""

from __future__ import annotations

import json
import os
import struct

import blake3
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import nnpatch
from nnpatch.cli import cli
from crafting import header_json, with_header
from nnpatch.patchfile import PREAMBLE_SIZE, TRAILER_SIZE

from .conftest import read, save

_RUNNER = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A small real patch with one op of each kind, so every byte can be tried."""
    d = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((8, 6)) * 0.05).astype("<f4")
    w2 = w.copy()
    w2[[1, 6]] += np.float32(1e-3)
    e = rng.integers(0, 2**16, 40, dtype="<u2")
    e2 = e.copy()
    e2[[3, 30]] ^= 1
    base = save(d / "base.safetensors", {"w": ("F32", w.shape, w.tobytes()), "e": ("BF16", (40,), e.tobytes()),
                                          "gone": ("U8", (3,), b"abc"), "r": ("I32", (2, 2), bytes(range(16)))})
    save(d / "target.safetensors", {"w": ("F32", w.shape, w2.tobytes()), "e": ("BF16", (40,), e2.tobytes()),
                                    "new": ("F8_E4M3", (4,), b"wxyz"), "r": ("I32", (4,), bytes(range(16)))},
         {"v": "2"})
    patch = d / "p.nnpatch"
    nnpatch.diff(base, d / "target.safetensors", patch)
    with nnpatch.read_patch(patch) as p:
        assert {op.kind for op in p.ops} >= {"rows", "elements", "add", "remove", "whole"}
    return d, base, read(patch)


@pytest.fixture(scope="module")
def plain_workspace(workspace):
    """The same patch with a plain JSON header, for the header mutations."""
    d, base, good = workspace
    return d, base, with_header(good, header_json(good))


def _apply(d, base, data: bytes, base_digest: str) -> None:
    bad = d / "bad.nnpatch"
    bad.write_bytes(data)
    out = d / "out.safetensors"
    r = _RUNNER.invoke(cli, ["apply", str(base), str(bad), "-o", str(out)])
    assert r.exit_code in (3, 4), (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert not out.exists()
    assert [p for p in os.listdir(d) if p.endswith(".tmp")] == []
    assert nnpatch.hash_file(base) == base_digest


def test_truncation_at_every_byte(workspace):
    d, base, good = workspace
    digest = nnpatch.hash_file(base)
    for cut in range(len(good)):
        _apply(d, base, good[:cut], digest)


def test_bit_flip_at_every_byte(workspace):
    d, base, good = workspace
    digest = nnpatch.hash_file(base)
    for pos in range(len(good)):
        data = bytearray(good)
        data[pos] ^= 1 << (pos % 8)
        _apply(d, base, bytes(data), digest)


def _header(data: bytes) -> tuple[dict, int]:
    (n,) = struct.unpack_from("<Q", data, 16)
    return json.loads(data[PREAMBLE_SIZE : PREAMBLE_SIZE + n]), n


def _rebuild(data: bytes, text: bytes) -> bytes:
    """Put a new header in, keeping the sections where they were when it fits (else it will not)."""
    _, n = _header(data)
    if len(text) <= n:
        text += b" " * (n - len(text))
        body = data[:16] + struct.pack("<Q", n) + text + data[PREAMBLE_SIZE + n : -TRAILER_SIZE]
    else:
        pad = -(PREAMBLE_SIZE + len(text)) % 64
        text += b" " * pad
        body = data[:16] + struct.pack("<Q", len(text)) + text + data[PREAMBLE_SIZE + n : -TRAILER_SIZE]
    return body + blake3.blake3(body).digest()


_WEIRD = st.one_of(
    st.integers(-(2**70), 2**70), st.just(2**63), st.just(-1), st.floats(allow_nan=False), st.text(max_size=5),
    st.none(), st.booleans(), st.lists(st.integers(-3, 3), max_size=3), st.just({}), st.just([]),
)


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


@given(st.data())
def test_header_mutations(plain_workspace, data):
    d, base, good = plain_workspace
    obj, _ = _header(good)
    paths = list(_paths(obj))
    path = data.draw(st.sampled_from(paths))
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "big", "duplicate", "nan"]))
    raw = None
    if action == "delete":
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    elif action == "big" and isinstance(parent[path[-1]], int):
        parent[path[-1]] = data.draw(st.sampled_from([2**62, 2**63 - 1, 2**64, -(2**63), 10**30]))
    elif action == "duplicate" and isinstance(parent, dict):
        key = path[-1]
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
        needle = json.dumps(key) + ":"
        raw = text.replace(needle, needle + "0," + needle, 1).encode()
    elif action == "nan":
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
        raw = text.replace(json.dumps(path[-1]) + ":", json.dumps(path[-1]) + ":NaN,\"x-\":", 1).encode() \
            if isinstance(path[-1], str) else text.encode()
    else:
        parent[path[-1]] = data.draw(_WEIRD)
    if raw is None:
        raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    mutated = _rebuild(good, raw)
    if mutated == good:
        return
    # A mutation may leave an equivalent valid patch (e.g. created_by changed): then apply must be exact.
    out = d / "maybe.safetensors"
    bad = d / "mut.nnpatch"
    bad.write_bytes(mutated)
    digest = nnpatch.hash_file(base)
    r = _RUNNER.invoke(cli, ["apply", str(base), str(bad), "-o", str(out)])
    if r.exit_code == 0:
        assert read(out) == read(d / "target.safetensors")
        out.unlink()
        return
    assert r.exit_code in (3, 4), (r.exit_code, r.output, r.exception, path, action)
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert nnpatch.hash_file(base) == digest


def test_a_tiny_patch_cannot_demand_huge_work(plain_workspace, tmp_path):
    """A patch claiming a 2^40-byte tensor from a few bytes of zstd is refused before any work."""
    d, base, good = plain_workspace
    obj, _ = _header(good)
    op = next(o for o in obj["ops"] if o["op"] == "add")
    op["target"]["shape"] = [2**38]
    op["values"]["size"] = 2**38 * 1
    data = _rebuild(good, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
    _apply(d, base, data, nnpatch.hash_file(base))
