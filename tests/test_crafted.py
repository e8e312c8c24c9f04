"""Crafted patches, journals and manifests: an attacker who builds inputs that pass every
integrity check (valid trailer, consistent header) must still get nothing but one ``Error:``
line and exit 3 or 4: no file outside the target touched, bounded memory and time, no
traceback, and no output that lies or drives the terminal.

Every input is written by tests/craft.py from the spec (never by nnpatch's writer), and every
case runs the real CLI in a subprocess under ``prlimit --as`` with a wall-clock limit, its peak
RSS measured with ``wait4``. Each test snapshots (BLAKE3) every file of its whole tree (the
working directory with the base, ``other.bin``, a fake ``.git``, and a sibling ``outside/``
directory) before and after, and allows changes only where the case says.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import blake3
import numpy as np
import pytest

from nnpatch.weights import write_safetensors

from . import craft

AS_LIMIT = 2 << 30  # address space: numpy + zstd + threads reserve much more than they touch
RSS_LIMIT_MB = 300  # peak resident memory of one nnpatch run on these inputs (a plain apply: ~50 MB)
TIMEOUT_S = 20.0
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # C0 (except newline), DEL, C1

HAVE_ONNX = importlib.util.find_spec("onnx") is not None


# --- running the CLI ---------------------------------------------------------------------------------

@dataclass
class Run:
    rc: int
    out: str
    err: str
    rss_mb: float
    seconds: float
    timed_out: bool

    def __str__(self) -> str:
        last = (self.err.strip().splitlines() or [""])[-1]
        return (f"rc={self.rc} rss={self.rss_mb:.0f}MB {self.seconds:.1f}s timed_out={self.timed_out} "
                f"stderr[-1]={last[:300]!r}\nstdout: {self.out[-2000:]!r}\nstderr: {self.err[-3000:]!r}")


def run_cli(args, cwd, *, timeout: float = TIMEOUT_S, stdin: str | None = None) -> Run:
    """``python -m nnpatch ARGS`` under prlimit, its peak RSS measured by /usr/bin/time (which forks
    from a small process: a child forked from pytest itself would count pytest's pages); ``stdin``: a
    file under ``cwd`` to read standard input from."""
    with tempfile.TemporaryDirectory() as t:
        rss_file = os.path.join(t, "rss")
        cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file, "prlimit", f"--as={AS_LIMIT}", "--",
               sys.executable, "-m", "nnpatch", *map(str, args)]
        with open(os.path.join(t, "out"), "w+b") as out, open(os.path.join(t, "err"), "w+b") as err, \
                open(os.path.join(cwd, stdin) if stdin is not None else os.devnull, "rb") as inp:
            start = time.monotonic()
            p = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, stdin=inp, start_new_session=True)
            try:
                p.wait(timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
                timed_out = True
            seconds = time.monotonic() - start
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
        rc = p.returncode
        try:
            with open(rss_file) as f:
                lines = f.read().split()
            rss_kb = int(lines[-1])  # after "Command exited with non-zero status N", if any
        except (OSError, ValueError, IndexError):
            rss_kb = 0
        return Run(rc, stdout, stderr, rss_kb / 1024, seconds, timed_out)


def assert_refused(r: Run, codes) -> None:
    """Exit in ``codes``, exactly one ``Error:`` line on stderr, no traceback, within memory and time."""
    codes = (codes,) if isinstance(codes, int) else tuple(codes)
    assert not r.timed_out, f"ran past {TIMEOUT_S}s: {r}"
    assert "Traceback" not in r.err + r.out, f"traceback: {r}"
    assert r.rc in codes, f"expected exit {codes}: {r}"
    lines = r.err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"stderr is not one Error: line: {r}"
    assert r.rss_mb < RSS_LIMIT_MB, f"peak RSS {r.rss_mb:.0f} MB: {r}"


def assert_bounded(r: Run) -> None:
    assert not r.timed_out, f"ran past {TIMEOUT_S}s: {r}"
    assert "Traceback" not in r.err + r.out, f"traceback: {r}"
    assert r.rss_mb < RSS_LIMIT_MB, f"peak RSS {r.rss_mb:.0f} MB: {r}"


# --- the tree every case runs in ---------------------------------------------------------------------

def snapshot(root) -> dict[str, tuple]:
    """Every entry under ``root``: files by BLAKE3, symlinks by target, directories."""
    snap = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(d, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                snap[rel] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                snap[rel] = ("dir",)
            elif not os.path.isfile(full):  # a planted FIFO: never opened here, it would block
                snap[rel] = ("special", os.lstat(full).st_mode)
            else:
                with open(full, "rb") as f:
                    snap[rel] = ("file", blake3.blake3(f.read()).hexdigest())
    return snap


def assert_untouched(before: dict, after: dict, *, allow=()) -> None:
    """No entry changed, appeared or vanished, except the paths in ``allow`` (and anything under them)."""
    def allowed(rel: str) -> bool:
        return any(rel == a or rel.startswith(a.rstrip("/") + "/") for a in allow)

    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and not allowed(k))
    detail = [f"{k}: {before.get(k, 'absent')} -> {after.get(k, 'absent')}" for k in changed[:20]]
    assert not changed, "files touched outside the target:\n" + "\n".join(detail)


def tensors_base(rng_seed: int = 0) -> dict:
    rng = np.random.default_rng(rng_seed)
    return {"w": ("F32", (8, 4), (rng.standard_normal(32) * 0.1).astype("<f4").tobytes()),
            "b": ("U8", (3,), b"abc"),
            "e": ("F32", (16,), (rng.standard_normal(16)).astype("<f4").tobytes())}


def tensors_target(base: dict) -> dict:
    w = np.frombuffer(base["w"][2], "<f4").reshape(8, 4).copy()
    w[2] += 1.0
    return dict(base, w=("F32", (8, 4), w.tobytes()), b=("U8", (3,), b"abd"), n=("I8", (2,), b"xy"))


def _as_arrays(t: dict) -> dict:
    np_dt = {"F32": "<f4", "U8": "u1", "I8": "i1"}
    return {n: np.frombuffer(d, np_dt[dt]).reshape(s) for n, (dt, s, d) in t.items()}


def _save_onnx(path, arrays: dict, *, external: str | None = None) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in sorted(arrays.items())]
    graph = helper.make_graph([helper.make_node("Identity", ["X"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external, size_threshold=0)
    else:
        onnx.save(model, str(path))


def _diff(old, new, out, cwd) -> None:
    r = subprocess.run([sys.executable, "-m", "nnpatch", "diff", str(old), str(new), "-o", str(out), "--no-stat"],
                       cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Models and real patches (made by `nnpatch diff`), copied into each case's own tree."""
    d = tmp_path_factory.mktemp("template")
    base = tensors_base()
    target = tensors_target(base)
    write_safetensors(d / "base.safetensors", base, {"v": "1"})
    write_safetensors(d / "target.safetensors", target, {"v": "2"})
    _diff("base.safetensors", "target.safetensors", "p.nnpatch", d)
    # a model directory: one shard, config and tokenizer; v2 changes a tensor and the config
    for name, t, cfg in (("v1", base, b'{"v": 1}\n'), ("v2", dict(base, w=target["w"]), b'{"v": 2}\n')):
        (d / name).mkdir()
        write_safetensors(d / name / "model.safetensors", t, {"format": "pt"})
        (d / name / "config.json").write_bytes(cfg)
        (d / name / "tokenizer.json").write_bytes(b'{"vocab": {"a": 0}}\n')
    _diff("v1", "v2", "p-dir.nnpatch", d)
    if HAVE_ONNX:
        onnx_base = {k: v for k, v in _as_arrays(base).items()}
        onnx_target = {k: v for k, v in _as_arrays(dict(base, w=target["w"])).items()}
        _save_onnx(d / "base.onnx", onnx_base)
        _save_onnx(d / "target.onnx", onnx_target)
        (d / "ext").mkdir()
        _save_onnx(d / "ext" / "target.onnx", onnx_target, external="target.onnx.data")
        _diff("base.safetensors", "target.onnx", "p-onnx.nnpatch", d)
        _diff("base.onnx", "target.onnx", "p-onnx-from-onnx.nnpatch", d)
        _diff("base.safetensors", "ext/target.onnx", "p-onnx-ext.nnpatch", d)
    return d


class World:
    """A case's tree: ``root/work`` (cwd: models, patches, other.bin, .git) and ``root/outside``."""

    def __init__(self, root, template) -> None:
        self.root = root
        self.work = root / "work"
        shutil.copytree(template, self.work, symlinks=True)
        (self.work / "other.bin").write_bytes(b"unrelated user data\n")
        for where in (self.work, self.work / "v1"):
            (where / ".git").mkdir()
            (where / ".git" / "config").write_bytes(b"[core]\n\trepositoryformatversion = 0\n")
            (where / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")
        (root / "outside").mkdir()
        (root / "outside" / "secret.txt").write_bytes(b"outside the working directory\n")

    def read(self, rel) -> bytes:
        return (self.work / rel).read_bytes()

    def write(self, rel, data: bytes) -> str:
        p = self.work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return str(rel)

    def patch(self, rel="p.nnpatch") -> dict:
        return craft.decode_patch(self.read(rel))

    def snapshot(self) -> dict:
        return snapshot(self.root)

    def run(self, *args, timeout: float = TIMEOUT_S, stdin: str | None = None) -> Run:
        # stdin only when given: tests/native replaces run_cli with one that takes no such argument
        return run_cli(args, self.work, timeout=timeout, **({"stdin": stdin} if stdin is not None else {}))


@pytest.fixture
def world(tmp_path, template):
    return World(tmp_path, template)


def refused_and_untouched(world: World, args, codes, *, allow=(), stdin: str | None = None) -> Run:
    before = world.snapshot()
    r = world.run(*args, stdin=stdin)
    after = world.snapshot()
    assert_untouched(before, after, allow=allow)  # the worst outcome first
    assert_refused(r, codes)
    return r


# --- ONNX targets: external data locations -----------------------------------------------------------

EVIL = b"#!/bin/sh\necho pwned\n"

ONNX_LOCATIONS = [
    pytest.param("base.safetensors", id="ext-overwrites-the-base"),
    pytest.param("other.bin", id="ext-overwrites-an-unrelated-file"),
    pytest.param("sub/dir/planted.sh", id="ext-plants-a-file-in-new-subdirs"),
    pytest.param(".git/config", id="ext-into-dot-git"),
    pytest.param(".git", id="ext-named-dot-git"),
    pytest.param("p.nnpatch", id="ext-overwrites-the-patch"),
    pytest.param("../outside/secret.txt", id="ext-dotdot"),
    pytest.param("ABS/outside/secret.txt", id="ext-absolute"),
    pytest.param("lnk-out/evil.bin", id="ext-through-symlink-leaving-the-dir"),
    pytest.param("lnk-in/evil.bin", id="ext-through-symlink-inside-the-dir"),
    pytest.param("d/" * 1000 + "x.bin", id="ext-1000-dirs-deep"),
    pytest.param("x" * 5000, id="ext-name-too-long"),
]


@pytest.mark.parametrize("location", ONNX_LOCATIONS)
def test_onnx_external_location_is_confined(world, location):
    pytest.importorskip("onnx")
    (world.work / "lnk-out").symlink_to(world.root / "outside")
    (world.work / "lnk-in").symlink_to(".")
    location = location.replace("ABS", str(world.root))
    h = world.patch("p-onnx.nnpatch")
    craft.plant_external(h, location, EVIL)
    world.write("evil.nnpatch", craft.encode_patch(h))
    refused_and_untouched(world, ["apply", "base.safetensors", "evil.nnpatch", "-o", "out.onnx"], 3)


def test_onnx_control_a_real_external_data_patch_applies(world):
    """Control: the unmodified ONNX patch with external data applies into a fresh directory."""
    pytest.importorskip("onnx")
    (world.work / "fresh").mkdir()
    before = world.snapshot()
    r = world.run("apply", "base.safetensors", "p-onnx-ext.nnpatch", "-o", "fresh/target.onnx")
    assert r.rc == 0, str(r)
    assert_untouched(before, world.snapshot(), allow=("work/fresh",))
    assert world.read("fresh/target.onnx") == world.read("ext/target.onnx")
    assert world.read("fresh/target.onnx.data") == world.read("ext/target.onnx.data")


def test_onnx_control_reencoded_patch_applies(world):
    """Control: decoding and re-encoding the ONNX patch with craft.py changes nothing a reader sees."""
    pytest.importorskip("onnx")
    h = world.patch("p-onnx.nnpatch")
    craft.edit_skeleton(h)
    world.write("same.nnpatch", craft.encode_patch(h))
    r = world.run("apply", "base.safetensors", "same.nnpatch", "-o", "out.onnx")
    assert r.rc == 0, str(r)
    assert world.read("out.onnx") == world.read("target.onnx")


def _set(path, value):
    def edit(obj):
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = value
    return edit


def _first_ext(obj):
    return next(iter(obj["externals"].values()))


SKELETON_EDITS = [
    pytest.param(lambda o: o.update(externals={"big.bin": {"size": 2 * 10**9, "gaps": []}}),
                 id="externals-size-2e9"),
    pytest.param(lambda o: o.update(externals={"big.bin": {"size": 2**70, "gaps": []}}), id="externals-size-2e70"),
    pytest.param(lambda o: o.update(externals={"neg.bin": {"size": -5, "gaps": []}}), id="externals-size-negative"),
    pytest.param(lambda o: o.update(externals={"s.bin": {"size": "12", "gaps": []}}), id="externals-size-string"),
    pytest.param(lambda o: o.update(externals={"s.bin": {"size": 1.5, "gaps": []}}), id="externals-size-float"),
    pytest.param(lambda o: o.update(externals=[["s.bin", 3]]), id="externals-a-list"),
    pytest.param(lambda o: o.update(externals={"s.bin": None}), id="externals-entry-null"),
    pytest.param(lambda o: o.update(externals={"s.bin": {"size": 4}}), id="externals-gaps-missing"),
    pytest.param(lambda o: o.update(externals={"s.bin": {"size": 4, "gaps": [[-2, 4, "QUFBQQ=="]]}}),
                 id="externals-gap-negative-offset"),
    pytest.param(lambda o: o.update(externals={"s.bin": {"size": 4, "gaps": [[2, 8, "QUFBQUFBQUE="]]}}),
                 id="externals-gap-past-the-end"),
    pytest.param(lambda o: o.update(externals={"s.bin": {"size": 4, "gaps": [[0, 4, "!!not base64"]]}}),
                 id="externals-gap-bad-base64"),
    pytest.param(lambda o: o.update(externals={"s.bin": {"size": 4, "gaps": [[0, 4, "QUE="]]}}),
                 id="externals-gap-length-lies"),
    pytest.param(lambda o: o.update(externals={"s.bin": {"size": 4, "gaps": [0, 4]}}), id="externals-gap-not-a-list"),
    pytest.param(lambda o: o.update(storage=[]), id="storage-a-list"),
    pytest.param(lambda o: o.update(storage={"w": 7}), id="storage-form-a-number"),
    pytest.param(lambda o: o.update(storage={"w": "pickle"}), id="storage-form-unknown"),
    pytest.param(lambda o: o.update(storage=dict(o["storage"], ghost="raw_data")), id="storage-names-a-ghost"),
    pytest.param(lambda o: o.update(version="1"), id="version-a-string"),
]


@pytest.mark.parametrize("edit", SKELETON_EDITS)
def test_onnx_skeleton_fields_are_checked(world, edit):
    pytest.importorskip("onnx")
    h = world.patch("p-onnx.nnpatch")
    craft.edit_skeleton(h, edit)
    world.write("bad.nnpatch", craft.encode_patch(h))
    refused_and_untouched(world, ["apply", "base.safetensors", "bad.nnpatch", "-o", "out.onnx"], 3)


@pytest.mark.parametrize("kind", ["deep-json", "json-not-object", "bad-utf8", "length-past-end", "proto-garbage"])
def test_onnx_skeleton_encoding_is_checked(world, kind):
    pytest.importorskip("onnx")
    h = world.patch("p-onnx.nnpatch")
    obj, proto = craft.decode_skeleton(craft.section_bytes(h["target"]["skeleton"]))
    if kind == "deep-json":
        data = craft.encode_skeleton(None, proto, raw_json=b'{"x-":' + craft.nested_list_json(100_000) + b',' +
                                     craft.canonical(obj)[1:])
    elif kind == "json-not-object":
        data = craft.encode_skeleton(None, proto, raw_json=b"[1,2,3]")
    elif kind == "bad-utf8":
        data = craft.encode_skeleton(None, proto, raw_json=b'{"\xff":1}')
    elif kind == "length-past-end":
        data = craft.SKELETON_MAGIC + struct.pack("<I", 0xFFFFFFFF) + craft.canonical(obj)
    else:
        data = craft.encode_skeleton(obj, b"\xff\xff\xff\xff\x0f garbage")
    h["target"]["skeleton"] = craft.section(data, compress=True)
    world.write("bad.nnpatch", craft.encode_patch(h))
    refused_and_untouched(world, ["apply", "base.safetensors", "bad.nnpatch", "-o", "out.onnx"], 3)


def test_update_cannot_write_beside_the_model(world):
    """A release patch for an ONNX model plants dist/manifest.json and plugins/evil.py."""
    pytest.importorskip("onnx")
    shutil.copyfile(world.work / "base.onnx", world.work / "model.onnx")
    h = world.patch("p-onnx-from-onnx.nnpatch")
    craft.plant_external(h, "dist/manifest.json", b'{"format": "pwned"}\n')
    craft.plant_external(h, "plugins/evil.py", b"import os\n")
    patch = craft.encode_patch(h)
    world.write("dist/up.nnpatch", patch)
    model = world.read("model.onnx")
    # a manifest names the file the patch writes: an ONNX target's model file (outputs[0])
    written = h["target"]["outputs"][0]
    target = {"name": "new", "blake3": written["blake3"], "size": written["size"],
              "model_blake3": h["target"]["model_blake3"]}
    world.write("dist/manifest.json", craft.encode_manifest(
        target, [craft.manifest_entry(craft.digest(model), len(model), "up.nnpatch", patch)]))
    refused_and_untouched(world, ["update", "model.onnx", "--manifest", "dist/manifest.json"], 3)


# --- directory targets -------------------------------------------------------------------------------

GIT_CONFIG_EVIL = b"[core]\n\tfsmonitor = touch /tmp/pwned\n"


def _dir_blobs(*files):
    def edit(h, w):
        for path, content in files:
            craft.add_blob(h, path, content)
    return edit


def _dir_copy(path, source):
    def edit(h, w):
        craft.add_copy(h, path, source, w.read("v1/" + source))
    return edit


DIR_CASES = [
    pytest.param(_dir_blobs((".git/config", GIT_CONFIG_EVIL), (".git/HEAD", b"ref: refs/heads/evil\n")), True,
                 id="blob-dot-git-config-and-HEAD-in-place"),
    pytest.param(_dir_blobs((".git/config", GIT_CONFIG_EVIL)), False, id="blob-dot-git-config-new-dir"),
    pytest.param(_dir_blobs((".git", b"gitdir: /tmp/elsewhere\n")), True, id="blob-named-dot-git-in-place"),
    pytest.param(_dir_blobs(("sub/.git/hooks/post-checkout", EVIL)), False, id="blob-nested-dot-git"),
    pytest.param(_dir_copy("config.bak", ".git/config"), True, id="copy-from-dot-git-config-in-place"),
    pytest.param(_dir_copy("config.bak", ".git/config"), False, id="copy-from-dot-git-config-new-dir"),
    pytest.param(_dir_blobs(("d/" * 1000 + "x", b"deep")), False, id="blob-1000-dirs-deep"),
    pytest.param(lambda h, w: craft.add_copy(h, "c.json", "../base.safetensors", w.read("base.safetensors")), False,
                 id="copy-from-dotdot"),
    pytest.param(lambda h, w: craft.add_copy(h, "c.json", "lnk/secret.txt", w.root.joinpath("outside",
                                                                                            "secret.txt").read_bytes()),
                 False, id="copy-through-symlink-in-base"),
]


@pytest.mark.parametrize("edit, in_place", DIR_CASES)
def test_directory_target_paths_are_confined(world, edit, in_place):
    (world.work / "v1" / "lnk").symlink_to(world.root / "outside")
    h = world.patch("p-dir.nnpatch")
    edit(h, world)
    world.write("evil.nnpatch", craft.encode_patch(h))
    args = ["apply", "v1", "evil.nnpatch"] + (["--in-place"] if in_place else ["-o", "out"])
    refused_and_untouched(world, args, 3)


def test_directory_control_reencoded_patch_applies_in_place(world):
    """Control: the real directory patch, re-encoded by craft.py, updates v1 in place and keeps its .git."""
    h = world.patch("p-dir.nnpatch")
    world.write("same.nnpatch", craft.encode_patch(h))
    git = world.read("v1/.git/config")
    r = world.run("apply", "v1", "same.nnpatch", "--in-place")
    assert r.rc == 0, str(r)
    assert world.read("v1/model.safetensors") == world.read("v2/model.safetensors")
    assert world.read("v1/.git/config") == git


# --- journals ----------------------------------------------------------------------------------------

def _model(world) -> tuple[bytes, dict]:
    """The model file's bytes and each tensor's absolute (start, end)."""
    data = world.read("model.safetensors")
    (n,) = struct.unpack_from("<Q", data, 0)
    head = json.loads(data[8:8 + n])
    head.pop("__metadata__", None)
    return data, {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in head.items()}


def _entry(data, ranges, name="w", *, unit=16, indices=(2,), old=None, over=None):
    start, end = ranges[name]
    old = bytes([0xAB]) * (unit * len(indices)) if old is None else old
    after = bytearray(data[start:end])
    for i, idx in enumerate(indices):
        if 0 <= idx * unit and (idx + 1) * unit <= len(after) and unit > 0:
            after[idx * unit:(idx + 1) * unit] = old[i * unit:(i + 1) * unit]
    # base_blake3 is what the tensor is after the write: a liar makes the final check pass
    return craft.journal_entry(name, start, end - start, unit, list(indices), old,
                               base_blake3=craft.digest(bytes(after)), overrides=over)


def _journal(case, data, ranges):
    meta = craft.journal_meta(data)
    head_len = meta["model"]["header_len"]
    if case == "writes-the-safetensors-header":
        junk = b"\x00" * 8 + b'{"x":{} '
        return craft.encode_journal(meta, [craft.journal_entry("w", 0, 16, 16, [0], junk,
                                                               base_blake3=craft.digest(junk))])
    if case == "header-len-0-skips-identity":
        meta["model"].update(header_len=0, header_blake3=craft.digest(b""))
        return craft.encode_journal(meta, [_entry(data, ranges)])
    if case == "header-len-past-the-file":
        meta["model"].update(header_len=len(data) + 100, header_blake3=craft.digest(data))
        return craft.encode_journal(meta, [_entry(data, ranges)])
    if case == "unit-7":
        return craft.encode_journal(meta, [_entry(data, ranges, unit=7, indices=(0,))])
    if case == "unit-0":
        return craft.encode_journal(meta, [_entry(data, ranges, unit=0, indices=(0,), old=b"")])
    if case == "range-spills-into-next-tensor":
        e = _entry(data, ranges, unit=16, indices=(8,),
                   over={"nbytes": ranges["w"][1] - ranges["w"][0] + 16})
        return craft.encode_journal(meta, [e])
    if case == "range-of-another-tensor":
        e = _entry(data, ranges, "w", unit=16, indices=(0,))
        e["name"] = "e"
        return craft.encode_journal(meta, [e])
    if case == "tensor-not-in-model":
        e = _entry(data, ranges, "w", unit=16, indices=(0,))
        e["name"] = "ghost"
        return craft.encode_journal(meta, [e])
    if case == "range-past-end-of-file":
        e = _entry(data, ranges, unit=16, indices=(0,), over={"offset": len(data) - 8, "nbytes": 16})
        return craft.encode_journal(meta, [e])
    if case == "index-out-of-range":
        return craft.encode_journal(meta, [_entry(data, ranges, unit=16, indices=(9,))])
    if case == "indices-not-increasing":
        return craft.encode_journal(meta, [_entry(data, ranges, unit=16, indices=(3, 1))])
    if case == "count-lies":
        return craft.encode_journal(meta, [_entry(data, ranges, over={"count": 5})])
    negative = {"offset-negative": {"offset": -8}, "nbytes-negative": {"nbytes": -1}, "unit-negative": {"unit": -16},
                "count-negative": {"count": -1}, "index-at-negative": {"index_at": -64},
                "data-at-negative": {"data_at": -64}, "data-at-2e64": {"data_at": 2**64},
                "nbytes-2e70": {"nbytes": 2**70}, "count-2e40": {"count": 2**40},
                "offset-a-string": {"offset": "24"}, "unit-a-float": {"unit": 16.0}, "unit-true": {"unit": True},
                "index-at-in-header": {"index_at": 24}}
    if case in negative:
        return craft.encode_journal(meta, [_entry(data, ranges, over=negative[case])])
    if case == "second-entry-bad":
        return craft.encode_journal(meta, [_entry(data, ranges), _entry(data, ranges, "e", unit=4, indices=(0,),
                                                                         over={"offset": -4})])
    if case == "deep-json-header":
        return craft.encode_journal(meta, [], raw_header=b'{"x":' + craft.nested_list_json(100_000) + b"}")
    if case == "header-not-json":
        return craft.encode_journal(meta, [], raw_header=b'{"model": 1,')
    if case == "entries-an-object":
        return craft.encode_journal(meta, [], raw_header=craft.canonical(dict(meta, entries={"w": 1})))
    if case == "entry-missing-keys":
        return craft.encode_journal(meta, [], raw_header=craft.canonical(dict(meta, entries=[{"name": "w"}])))
    if case == "entry-extra-key":
        e = _entry(data, ranges)
        e["_overrides"]["evil"] = 1
        return craft.encode_journal(meta, [e])
    if case == "model-not-an-object":
        return craft.encode_journal(dict(meta, model=[head_len]), [_entry(data, ranges)])
    if case == "header-len-a-string":
        meta["model"]["header_len"] = str(head_len)
        return craft.encode_journal(meta, [_entry(data, ranges)])
    if case == "version-2":
        return craft.encode_journal(meta, [_entry(data, ranges)], major=2)
    raise AssertionError(case)


JOURNAL_CASES = [
    "writes-the-safetensors-header", "header-len-0-skips-identity", "header-len-past-the-file", "unit-7", "unit-0",
    "range-spills-into-next-tensor", "range-of-another-tensor", "tensor-not-in-model", "range-past-end-of-file",
    "index-out-of-range", "indices-not-increasing", "count-lies", "offset-negative", "nbytes-negative",
    "unit-negative", "count-negative", "index-at-negative", "data-at-negative", "data-at-2e64", "nbytes-2e70",
    "count-2e40", "offset-a-string", "unit-a-float", "unit-true", "index-at-in-header", "second-entry-bad",
    "deep-json-header", "header-not-json", "entries-an-object", "entry-missing-keys", "entry-extra-key",
    "model-not-an-object", "header-len-a-string", "version-2",
]


@pytest.fixture
def journal_world(world):
    shutil.copyfile(world.work / "target.safetensors", world.work / "model.safetensors")
    return world


@pytest.mark.parametrize("case", JOURNAL_CASES)
def test_recover_trusts_a_journal_only_within_the_spec(journal_world, case):
    w = journal_world
    data, ranges = _model(w)
    w.write("model.safetensors.nnpatch-journal", _journal(case, data, ranges))
    # the journal itself may be kept or removed; nothing else may change, the model least of all
    refused_and_untouched(w, ["recover", "model.safetensors"], (3, 4), allow=("work/model.safetensors.nnpatch-journal",))
    assert w.read("model.safetensors") == data


@pytest.mark.parametrize("case", ["writes-the-safetensors-header", "header-len-0-skips-identity", "unit-7"])
def test_apply_in_place_recovers_only_a_valid_journal(journal_world, case):
    """The next `apply --in-place` recovers first: the same journals must not get through it."""
    w = journal_world
    data, ranges = _model(w)
    w.write("model.safetensors.nnpatch-journal", _journal(case, data, ranges))
    h = craft.file_patch(w.read("target.safetensors"), w.read("base.safetensors"))
    w.write("back.nnpatch", craft.encode_patch(h))
    refused_and_untouched(w, ["apply", "--in-place", "model.safetensors", "back.nnpatch"], (3, 4),
                          allow=("work/model.safetensors.nnpatch-journal",))
    assert w.read("model.safetensors") == data


def test_recover_control_a_legitimate_journal_rolls_back(journal_world):
    """Control: a journal that follows the spec (one row of w, its true old bytes) is rolled back."""
    w = journal_world
    data, ranges = _model(w)
    start, end = ranges["w"]
    old = bytearray(data)
    old[start + 2 * 16:start + 3 * 16] = b"\x11" * 16  # OLD: row 2 different; the file on disk is NEW
    old = bytes(old)
    e = craft.journal_entry("w", start, end - start, 16, [2], old[start + 32:start + 48],
                            base_blake3=craft.digest(old[start:end]), target_blake3=craft.digest(data[start:end]))
    w.write("model.safetensors.nnpatch-journal", craft.encode_journal(craft.journal_meta(data), [e]))
    r = w.run("recover", "model.safetensors")
    assert r.rc == 0, str(r)
    assert w.read("model.safetensors") == old
    assert not (w.work / "model.safetensors.nnpatch-journal").exists()


# --- work out of proportion to the input -------------------------------------------------------------

BOMB_BYTES = (64 << 20) - 4096  # just under the 64 MiB header limit


def _bomb_filter(text: bytes) -> bytes:
    """Replace the x-bomb placeholder by ~64 MiB of ``[[[]]],`` (a few KB of zstd)."""
    unit = b"[[[]]],"
    n = (BOMB_BYTES - len(text)) // len(unit)
    return text.replace(b'"x-bomb":0', b'"x-bomb":[' + unit * n + b"[]]", 1)


def _bomb_patch(world, **kw) -> bytes:
    h = craft.file_patch(world.read("base.safetensors"), world.read("target.safetensors"))
    h["x-bomb"] = 0
    return craft.encode_patch(h, zstd_header=True, text_filter=_bomb_filter, **kw)


def test_zstd_header_bomb(world):
    patch = _bomb_patch(world)
    assert len(patch) < 64 << 10
    world.write("bomb.nnpatch", patch)
    refused_and_untouched(world, ["apply", "base.safetensors", "bomb.nnpatch", "-o", "out.safetensors"], 3)


@pytest.mark.parametrize("signer", ["unsigned", "other-key"])
def test_zstd_header_bomb_with_key_is_refused_before_parsing(world, signer):
    pytest.importorskip("cryptography")
    _, pem = craft.new_key()
    other, _ = craft.new_key()
    world.write("release.pub.pem", pem)
    world.write("bomb.nnpatch", _bomb_patch(world, sign_with=other if signer == "other-key" else None))
    refused_and_untouched(world, ["apply", "base.safetensors", "bomb.nnpatch", "-o", "out.safetensors",
                                  "--key", "release.pub.pem"], 4)


@pytest.mark.parametrize("case", ["unsigned-deep-json", "unsigned-bad-utf8", "unsigned-bad-section-layout",
                                  "bad-signature", "other-key"])
def test_key_is_checked_before_anything_else(world, case):
    """With --key, an unsigned or wrongly signed patch is an IntegrityError (4), whatever else is wrong with it."""
    pytest.importorskip("cryptography")
    key, pem = craft.new_key()
    other, _ = craft.new_key()
    world.write("release.pub.pem", pem)
    good = craft.file_patch(world.read("base.safetensors"), world.read("target.safetensors"))
    if case == "unsigned-deep-json":
        data = craft.with_raw_header(b'{"x-":' + craft.nested_list_json(100_000) + b"}", zstd_header=False)
    elif case == "unsigned-bad-utf8":
        data = craft.with_raw_header(b'{"\xff\xfe":1}', zstd_header=True)
    elif case == "unsigned-bad-section-layout":
        data = craft.encode_patch(good, tail=b"\x01" * 64)  # unreferenced bytes before the trailer
    elif case == "bad-signature":
        data = bytearray(craft.encode_patch(good, sign_with=key))
        data[-1] ^= 1
        data = bytes(data)
    else:
        data = craft.encode_patch(good, sign_with=other)
    world.write("x.nnpatch", data)
    refused_and_untouched(world, ["apply", "base.safetensors", "x.nnpatch", "-o", "out.safetensors",
                                  "--key", "release.pub.pem"], 4)


def test_signature_control_a_signed_crafted_patch_applies(world):
    pytest.importorskip("cryptography")
    key, pem = craft.new_key()
    world.write("release.pub.pem", pem)
    h = craft.file_patch(world.read("base.safetensors"), world.read("target.safetensors"))
    world.write("s.nnpatch", craft.encode_patch(h, sign_with=key))
    r = world.run("apply", "base.safetensors", "s.nnpatch", "-o", "out.safetensors", "--key", "release.pub.pem")
    assert r.rc == 0, str(r)
    assert world.read("out.safetensors") == world.read("target.safetensors")


BIG = 16 << 20


@pytest.fixture
def big_world(world):
    """A base with one 16 MiB U8 tensor (zeros) and a target where every element is 1."""
    write_safetensors(world.work / "big.safetensors", {"big": ("U8", (BIG,), bytes(BIG))})
    write_safetensors(world.work / "big-target.safetensors", {"big": ("U8", (BIG,), b"\x01" * BIG)})
    return world


def test_elements_op_over_every_element(big_world):
    """A 2 KB patch: an `elements` op whose index is every one of the 16.7 M elements (a bitmap of ones)."""
    w = big_world
    base, target = w.read("big.safetensors"), w.read("big-target.safetensors")
    h = craft.file_patch(base, target)
    op = h["ops"][0]
    op.update(op="elements", count=BIG,
              index=craft.section(b"\xff" * (BIG // 8), compress=True, codec=["bitmap"]),
              values=craft.section(b"\x01" * BIG, compress=True))
    patch = craft.encode_patch(h)
    assert len(patch) < 8 << 10
    w.write("el.nnpatch", patch)
    before = w.snapshot()
    r = w.run("apply", "big.safetensors", "el.nnpatch", "-o", "out.safetensors")
    assert_bounded(r)
    if r.rc == 0:  # allowed only if it was cheap and exact
        assert w.read("out.safetensors") == target
        assert_untouched(before, w.snapshot(), allow=("work/out.safetensors",))
    else:
        assert_refused(r, 3)
        assert_untouched(before, w.snapshot())


@pytest.mark.parametrize("case", ["count-above-numel", "count-numel-plus-one-u64"])
def test_elements_count_is_bounded_by_the_tensor(world, case):
    h = world.patch()
    op = next(o for o in h["ops"] if o["op"] == "rows")
    n = 8 * 4 + 1
    op.update(op="elements", count=n, index=craft.section(b"".join(struct.pack("<Q", i) for i in range(n)),
                                                          codec=["u64"]),
              values=craft.section(b"\x00" * (4 * n)))
    if case == "count-above-numel":
        op["count"] = 10**6
    world.write("el.nnpatch", craft.encode_patch(h))
    refused_and_untouched(world, ["apply", "base.safetensors", "el.nnpatch", "-o", "out.safetensors"], 3)


@pytest.fixture(scope="module")
def many_adds(tmp_path_factory):
    """A consistent patch of 50,000 `add` ops (a few MB), made once."""
    d = tmp_path_factory.mktemp("many")
    base = {"w": ("U8", (4,), b"abcd")}
    target = dict(base)
    for i in range(50_000):
        target[f"t{i:05d}"] = ("U8", (2,), struct.pack("<H", i))
    write_safetensors(d / "base.safetensors", base)
    write_safetensors(d / "target.safetensors", target)
    h = craft.file_patch((d / "base.safetensors").read_bytes(), (d / "target.safetensors").read_bytes(),
                         compress=False)
    (d / "many.nnpatch").write_bytes(craft.encode_patch(h, zstd_header=True))
    return d


def test_fifty_thousand_add_ops(world, many_adds):
    for name in ("base.safetensors", "target.safetensors", "many.nnpatch"):
        shutil.copyfile(many_adds / name, world.work / ("many-" + name))
    before = world.snapshot()
    r = world.run("apply", "many-base.safetensors", "many-many.nnpatch", "-o", "out.safetensors")
    assert_bounded(r)
    if r.rc == 0:
        assert world.read("out.safetensors") == world.read("many-target.safetensors")
        assert_untouched(before, world.snapshot(), allow=("work/out.safetensors",))
    else:
        assert_refused(r, 3)
        assert_untouched(before, world.snapshot())


def _layout_case(case, data):
    layout, tensors, meta = craft.read_safetensors(data)
    entries = []
    pos = 0
    for name, (dt, shape, raw) in tensors.items():
        entries.append([name, dt, list(shape), pos, pos + len(raw)])
        pos += len(raw)
    w = next(e for e in entries if e[0] == "w")
    if case == "rank-200000":
        w[2] = [1] * 199_998 + [8, 4]
    elif case == "rank-300-huge-dims":
        w[2] = [2**62 - 1] * 300
    elif case == "rank-65":
        w[2] = [1] * 63 + [8, 4]
    elif case == "dim-2e70":
        w[2] = [2**70, 0]
    elif case == "dim-negative":
        w[2] = [-8, -4]
    elif case == "deep-json":
        return craft.safetensors_header([], raw_json=b'{"x":' + craft.nested_list_json(100_000) + b"}")
    elif case == "offsets-overlap":
        w[4] += 4
    elif case == "header-len-2e64":
        return struct.pack("<Q", 2**64 - 1) + layout[8:]
    return craft.safetensors_header(entries, meta)


LAYOUT_CASES = ["rank-200000", "rank-300-huge-dims", "rank-65", "dim-2e70", "dim-negative", "deep-json",
                "offsets-overlap", "header-len-2e64"]


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_target_layout_is_checked_within_limits(world, case):
    h = world.patch()
    craft.set_layout(h, _layout_case(case, world.read("target.safetensors")))
    patch = craft.encode_patch(h)
    assert len(patch) < 64 << 10
    world.write("lay.nnpatch", patch)
    refused_and_untouched(world, ["apply", "base.safetensors", "lay.nnpatch", "-o", "out.safetensors"], 3)


@pytest.mark.parametrize("case", ["op-rank-300-huge-dims", "op-rank-65", "op-name-1000-dirs"])
def test_op_tensor_refs_are_bounded(world, case):
    h = world.patch()
    op = next(o for o in h["ops"] if o["op"] == "add")
    if case == "op-rank-300-huge-dims":
        op["target"]["shape"] = [2**62 - 1] * 300
    elif case == "op-rank-65":
        op["target"]["shape"] = [1] * 63 + [2, 1]
    else:
        op["name"] = "a/" * 1000 + "n"
    world.write("op.nnpatch", craft.encode_patch(h))
    refused_and_untouched(world, ["apply", "base.safetensors", "op.nnpatch", "-o", "out.safetensors"], 3)


# --- lies about the result, and the schema -----------------------------------------------------------

@pytest.mark.parametrize("verify", ["default", "full", "touched"])
def test_target_blake3_lie_is_refused_in_every_verify_mode(world, verify):
    """target.blake3 is wrong, everything else true: every verify mode hashes the output file again and
    refuses the claim as ``full`` does (exit 4, one line), and the output is not left in place."""
    h = world.patch()
    h["target"]["blake3"] = "ab" * 32
    world.write("lie.nnpatch", craft.encode_patch(h))
    before = world.snapshot()
    r = world.run("--quiet", "apply", "base.safetensors", "lie.nnpatch", "-o", "out.safetensors",
                  f"--verify={verify}", "--json")
    assert_refused(r, 4)
    assert "result does not match the patch's target" in r.err, str(r)
    assert_untouched(before, world.snapshot())


@pytest.mark.parametrize("edit", [
    pytest.param(lambda h: h.pop("required_features"), id="required-features-missing"),
    pytest.param(lambda h: h.update(required_features=["x-time-travel"]), id="required-features-unknown"),
    pytest.param(lambda h: h.update(required_features="none"), id="required-features-a-string"),
    pytest.param(lambda h: h.update(required_features=[7]), id="required-features-a-number"),
    pytest.param(lambda h: h.update(created_by=7), id="created-by-a-number"),
])
def test_header_schema_is_enforced(world, edit):
    h = world.patch()
    edit(h)
    world.write("s.nnpatch", craft.encode_patch(h))
    refused_and_untouched(world, ["apply", "base.safetensors", "s.nnpatch", "-o", "out.safetensors"], 3)


# --- show: names are data, never markup or terminal control -------------------------------------------

NAMES = [
    pytest.param("[/]x", "craft", id="name-rich-closing-tag"),
    pytest.param("[bold red]x[/bold red]", "craft", id="name-rich-markup"),
    pytest.param("[link=file:///etc/passwd]x[/link]", "craft", id="name-rich-link"),
    pytest.param("\x1b]0;pwned\x07\x1b[2J", "craft", id="name-osc-title-and-clear-screen"),
    pytest.param("a\x9b2Jb", "craft", id="name-c1-csi"),
    pytest.param("a\rb\x08\x7f", "craft", id="name-cr-backspace-del"),
    pytest.param("line\nbreak", "craft", id="name-newline"),
    pytest.param("plain", "evil\x1b[2J\x1b]0;pwned\x07", id="created-by-escapes"),
    pytest.param("plain", "[/]made by [red]x", id="created-by-markup"),
]


def _named_patch(world, name, created_by="craft"):
    base = craft.read_safetensors(world.read("base.safetensors"))[1]
    target = dict(base, **{name: ("U8", (1,), b"z")})
    path = world.work / "named-target.safetensors"
    write_safetensors(path, target)
    h = craft.file_patch(world.read("base.safetensors"), path.read_bytes(), created_by=created_by)
    path.unlink()
    return h


def _no_control(text: str) -> None:
    bad = CONTROL.findall(text)
    assert not bad, f"control characters reach the terminal: {sorted(set(bad))!r} in {text[:2000]!r}"


@pytest.mark.parametrize("name, created_by", NAMES)
def test_show_prints_names_inertly(world, name, created_by):
    h = _named_patch(world, name, created_by=created_by)
    world.write("n.nnpatch", craft.encode_patch(h))
    before = world.snapshot()
    r = world.run("show", "n.nnpatch")
    assert_untouched(before, world.snapshot())
    _no_control(r.out + r.err)
    if r.rc != 0:
        assert_refused(r, 3)
        return
    assert_bounded(r)
    for text in (name, created_by):
        # printable text comes out literally; text with control characters comes out escaped (checked above),
        # its markup-like parts still literal
        for part in ([text] if text.isprintable() else [p for p in text.split("\x1b") if p.isprintable()]):
            if "[" in part:
                assert part in r.out, f"markup was interpreted, {part!r} not printed literally: {r}"
    rj = world.run("show", "n.nnpatch", "--json")
    assert rj.rc == 0, str(rj)
    _no_control(rj.out + rj.err)
    assert name in [o["name"] for o in json.loads(rj.out)["ops"]]


def test_show_lone_surrogate_name(world):
    h = _named_patch(world, "SURR")
    world.write("s.nnpatch", craft.encode_patch(h, text_filter=lambda t: t.replace(b"SURR", b"\\udc80x")))
    before = world.snapshot()
    for args in (["show", "s.nnpatch"], ["show", "s.nnpatch", "--json"]):
        r = world.run(*args)
        if r.rc != 0:  # refusing a name that is not Unicode text is right (FORMAT.md 5: UTF-8)
            assert_refused(r, 3)
        assert_bounded(r)
        _no_control(r.out + r.err)
    assert_refused(world.run("apply", "base.safetensors", "s.nnpatch", "-o", "out.safetensors"), (3, 4))
    assert_untouched(before, world.snapshot())


@pytest.mark.parametrize("name", [
    pytest.param("a$\\frac{$b", id="mathtext-broken"),
    pytest.param("$\\" + "sqrt{" * 200 + "$", id="mathtext-deep"),
    pytest.param("[/]x", id="rich-closing-tag"),
])
def test_show_plot_does_not_interpret_names(world, name):
    pytest.importorskip("matplotlib")
    h = _named_patch(world, name)
    world.write("m.nnpatch", craft.encode_patch(h))
    before = world.snapshot()
    r = world.run("show", "m.nnpatch", "--plot", "plot.png")
    if r.rc == 0:
        assert_bounded(r)
        assert (world.work / "plot.png").stat().st_size > 0
        assert_untouched(before, world.snapshot(), allow=("work/plot.png",))
    else:
        assert_refused(r, 3)
        assert_untouched(before, world.snapshot())


# --- release manifests -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["patch-name-dotdot", "patch-name-absolute", "deep-json", "sizes-negative",
                                  "patch-is-a-symlink-out"])
def test_update_manifest_is_confined(world, case):
    shutil.copyfile(world.work / "base.safetensors", world.work / "model.safetensors")
    h = world.patch()
    patch = craft.encode_patch(h)
    world.write("dist/p.nnpatch", patch)
    world.write("outside-p.nnpatch", patch)
    model = world.read("model.safetensors")
    target = {"blake3": h["target"]["blake3"], "size": h["target"]["size"], "model_blake3": h["target"]["model_blake3"]}
    entry = craft.manifest_entry(craft.digest(model), len(model), "p.nnpatch", patch)
    if case == "patch-name-dotdot":
        entry["patch"] = "../outside-p.nnpatch"
    elif case == "patch-name-absolute":
        entry["patch"] = str(world.work / "outside-p.nnpatch")
    elif case == "sizes-negative":
        entry["base_size"] = -1
    elif case == "patch-is-a-symlink-out":
        (world.work / "dist" / "p.nnpatch").unlink()
        (world.work / "dist" / "p.nnpatch").symlink_to(world.work / "outside-p.nnpatch")
    manifest = craft.encode_manifest(target, [entry])
    if case == "deep-json":
        manifest = b'{"x":' + craft.nested_list_json(100_000) + b"}"
    world.write("dist/manifest.json", manifest)
    before = world.snapshot()
    r = world.run("update", "model.safetensors", "--manifest", "dist/manifest.json")
    if case == "patch-is-a-symlink-out" and r.rc == 0:
        # following a symlink the release directory holds is the release's own choice; the result must be exact
        assert world.read("model.safetensors") == world.read("target.safetensors")
        return
    assert_refused(r, 3)
    assert_untouched(before, world.snapshot())


def test_update_control_a_crafted_release_applies(world):
    shutil.copyfile(world.work / "base.safetensors", world.work / "model.safetensors")
    h = world.patch()
    patch = craft.encode_patch(h)
    world.write("dist/p.nnpatch", patch)
    model = world.read("model.safetensors")
    target = {"blake3": h["target"]["blake3"], "size": h["target"]["size"], "model_blake3": h["target"]["model_blake3"]}
    world.write("dist/manifest.json", craft.encode_manifest(
        target, [craft.manifest_entry(craft.digest(model), len(model), "p.nnpatch", patch)]))
    r = world.run("update", "model.safetensors", "--manifest", "dist/manifest.json")
    assert r.rc == 0, str(r)
    assert world.read("model.safetensors") == world.read("target.safetensors")
