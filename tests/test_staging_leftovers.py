"""A killed run's staging file (as large as what it was writing) is removed by the next run that
stages the same file, or by `recover`, in either implementation: it is named after its process
(`.NAME.nnpatch-staged-PID.XXXXXXXX.tmp`), and removed only when that process no longer exists."""

from __future__ import annotations

import os
import subprocess
import sys

from nnpatch.sidefile import remove_stale_staging, staging_prefix

from .conftest import make_pair, read


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _plant(folder, names) -> None:
    for name in names:
        (folder / name).write_bytes(b"staged bytes")


def test_only_a_dead_process_leftover_of_this_file_goes(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    gone = [f".m.bin.nnpatch-staged-{dead}.abcd1234.tmp", f"m.bin.nnpatch-staged-{dead}",
            f".m.bin.nnpatch-staged-{dead}.x9.safetensors.tmp",
            f"..m.bin.nnpatch-staged-{dead}.x9.safetensors.tmp.nnpatch-staged-{dead}.ab12.tmp"]
    kept = [f".m.bin.nnpatch-staged-{live}.abcd1234.tmp",   # a live writer
            f".other.bin.nnpatch-staged-{dead}.abcd1234.tmp",  # another file's
            f".m.bin.nnpatch-staged-{dead}.abcd1234",         # not a temporary name
            f"m.bin.nnpatch-staged-{dead}.tmp",               # neither form
            ".m.bin.nnpatch-staged-x.abcd1234.tmp", ".m.bin.nnpatch-staged-0.abcd1234.tmp",
            f".m.bin.nnpatch-staged-0{dead}.abcd1234.tmp", f".m.bin.nnpatch-staged-+{dead}.abcd1234.tmp",
            f"x.m.bin.nnpatch-staged-{dead}.abcd1234.tmp", "m.bin"]
    _plant(tmp_path, gone + kept)
    assert remove_stale_staging(tmp_path / "m.bin") == len(gone)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_the_prefix_names_this_process():
    assert staging_prefix("/a/b/model.gguf") == f".model.gguf.nnpatch-staged-{os.getpid()}."


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nnpatch", *map(str, args)], capture_output=True, text=True)


def test_apply_to_a_file_removes_the_leftover_of_a_killed_apply_to_it(tmp_path):
    base, target = make_pair(tmp_path)
    patch = tmp_path / "p.nnpatch"
    assert _cli("diff", base, target, "-o", patch, "-q").returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    leftover = f".new.safetensors.nnpatch-staged-{_dead_pid()}.0123abcd.tmp"
    _plant(out, [leftover])
    r = _cli("apply", base, patch, "-o", out / "new.safetensors", "-q")
    assert r.returncode == 0, r.stderr
    assert os.listdir(out) == ["new.safetensors"]
    assert read(out / "new.safetensors") == read(target)


def test_recover_removes_leftovers_of_the_model(tmp_path):
    base, _ = make_pair(tmp_path)
    leftover = f".{os.path.basename(base)}.nnpatch-staged-{_dead_pid()}.0123abcd.tmp"
    _plant(tmp_path, [leftover])
    before = read(base)
    r = _cli("recover", base)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / leftover).exists()
    assert read(base) == before

