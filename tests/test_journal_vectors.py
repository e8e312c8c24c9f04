"""spec/vectors/journal: every golden journal recovers, is discarded or is refused as journal.json says,
through the library's ``recover`` and through ``nnpatch recover`` (tests/native/test_native_journal_vectors.py
runs the same cases through ``nnpatch-apply --recover``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import blake3
import pytest
import zstandard
from click.testing import CliRunner

from nnpatch.applier import recover
from nnpatch.cli import cli
from nnpatch.errors import NnpatchError

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "spec", "vectors", "journal")
with open(os.path.join(HERE, "journal.json"), encoding="utf-8") as _f:
    INDEX = json.load(_f)
CASES = INDEX["cases"]


def read(p) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def lay_out(case, tmp_path) -> str:
    """The case's files copied into ``tmp_path``: the model's path."""
    for name in [case["model"], *case["journals"]]:
        shutil.copyfile(os.path.join(HERE, case["dir"], name), tmp_path / name)
    return str(tmp_path / case["model"])


def check_after(case, tmp_path) -> None:
    """The model is exactly what the case says, and the journals left are the case's, byte for byte."""
    model = read(tmp_path / case["model"])
    assert model == read(os.path.join(HERE, case["model_after"]))
    assert blake3.blake3(model).hexdigest() == case["model_after_blake3"]
    assert sorted(n for n in os.listdir(tmp_path) if n != case["model"]) == case["journal_after"]
    for name in case["journal_after"]:
        assert read(tmp_path / name) == read(os.path.join(HERE, case["dir"], name)), f"{name} changed"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_library_recover(case, tmp_path):
    model = lay_out(case, tmp_path)
    if case["outcome"] == "refused":
        with pytest.raises(NnpatchError) as info:
            recover(model)
        assert (type(info.value).__name__, info.value.exit_code) == (case["error"], case["exit"])
        assert str(info.value).replace(str(tmp_path) + os.sep, "") == case["python_message"]
    else:
        note = recover(model)
        assert note is not None and ("rolled back" in note) == (case["outcome"] == "recovered"), note
    check_after(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_cli_recover(case, tmp_path):
    model = lay_out(case, tmp_path)
    r = CliRunner().invoke(cli, ["recover", model])
    assert r.exit_code == case["exit"], r.output
    if case["exit"]:
        lines = r.stderr.strip("\n").splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    else:
        assert r.stderr == "", r.stderr
    check_after(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_apply_in_place_recovers_first(case, tmp_path):
    """`apply --in-place` recovers first (JOURNAL.md, Protocol step 1): where recovery succeeds the update then
    makes the new model; where it refuses, the apply refuses the same way and writes nothing."""
    model = lay_out(case, tmp_path)
    r = CliRunner().invoke(cli, ["apply", "--in-place", model, os.path.join(HERE, case.get("patch", INDEX["patch"]))])
    assert r.exit_code == case["exit"], r.output
    if case["exit"]:
        check_after(case, tmp_path)
    else:
        assert read(model) == read(os.path.join(HERE, case.get("model_updated", INDEX["model_updated"])))
        assert os.listdir(tmp_path) == [case["model"]]


def test_the_cases_cover_what_journal_md_names():
    """A guard against a shrinking set: each moment of a crash, each torn kind, each Trust step."""
    names = {c["name"] for c in CASES}
    assert {"journal-before-writes", "halfway", "all-written", "uncommitted-tmp", "torn-truncated",
            "torn-flipped-byte", "future-major", "another-model", "duplicate-key", "bad-json", "offset-past-end",
            "model-changed-since"} <= names
    assert {c["trust"] for c in CASES} == {"protocol", "1", "2", "3", "4", "5"}
    assert {(c["outcome"], c["exit"]) for c in CASES} == {("recovered", 0), ("discarded", 0), ("refused", 3),
                                                          ("refused", 4)}
    # every journal the writer could have made rolls back to the model before the update
    assert all(c["model_after"] == ("old.gguf" if c["name"].startswith("gguf-") else INDEX["model_before"])
               for c in CASES if c["valid"] and c["outcome"] == "recovered")
    # an extents model (journal 1.1): both moments, and each extents rule of Trust steps 2 to 5
    assert {c["trust"] for c in CASES if c["name"].startswith("gguf-")} == {"protocol", "2", "3", "4", "5"}


def test_vectors_are_current():
    """The generator, run again, reproduces spec/vectors/journal exactly."""
    if zstandard.ZSTD_VERSION != tuple(INDEX["zstd_version"]):
        pytest.skip(f"made with zstd {INDEX['zstd_version']}: patch.nnpatch (and the journals' 'patch' field) differ")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(HERE, "generate.py")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=root))
    assert p.returncode == 0, p.stdout + p.stderr
