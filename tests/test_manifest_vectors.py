"""spec/vectors/manifest: every release-feed case gives, through ``nnpatch update``, the exit code, model
and state file that manifest-vectors.json (written from spec/MANIFEST.md) says. The native update client
(issue 23) is to run the same index; how is in the index's _comment and MANIFEST.md, "Test vectors"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import blake3
import pytest
from click.testing import CliRunner

from nnpatch.cli import cli

pytest.importorskip("cryptography")  # signed feeds (the nnpatch[sign] extra)

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "spec", "vectors", "manifest")
with open(os.path.join(HERE, "manifest-vectors.json"), encoding="utf-8") as _f:
    INDEX = json.load(_f)
CASES = INDEX["cases"]
STATE = "model.safetensors.nnpatch-state"

#: Cases where nnpatch answers otherwise than MANIFEST.md today: a wrong envelope with a key exits 3 where
#: step 2 says 4, and version names and base_url are not checked against the manifest's rules (step 3).
#: The fix (issue 28 item 10) turns these into passes, and strict=True then fails them: remove them here.
#: Cases where the implementation lagged the spec, marked xfail(strict=True) until fixed: none now
#: (issue 28 item 10 brought Python to MANIFEST.md's answers). A new one goes here with its reason.
SPEC_AHEAD: dict[str, str] = {}


def marked(case):
    reason = SPEC_AHEAD.get(case["name"])
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(case, id=case["name"], marks=marks)


def read(p) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def lay_out(case, work) -> tuple[str, str]:
    """The case's files in ``work`` as the index's _comment says: (model path, manifest path)."""
    model = os.path.join(work, "model.safetensors")
    shutil.copyfile(os.path.join(HERE, case["model"]), model)
    if case["state"] is not None:
        shutil.copyfile(os.path.join(HERE, case["state"]), os.path.join(work, STATE))
    feed = os.path.join(work, "feed")
    os.mkdir(feed)
    shutil.copyfile(os.path.join(HERE, case["manifest"]), os.path.join(feed, "manifest.json"))
    for name in case["feed_files"]:
        shutil.copyfile(os.path.join(HERE, name), os.path.join(feed, name))
    return model, os.path.join(feed, "manifest.json")


def check_after(case, work) -> None:
    model = read(os.path.join(work, "model.safetensors"))
    assert model == read(os.path.join(HERE, case["model_after"])), "the model is not what the case says"
    assert blake3.blake3(model).hexdigest() == case["model_after_blake3"]
    want = case["state_after"]
    left = sorted(set(os.listdir(work)) - {"model.safetensors", "feed"})
    assert left == ([] if want is None else [STATE]), left
    if want == "unchanged":
        assert read(os.path.join(work, STATE)) == read(os.path.join(HERE, case["state"]))
    elif want is not None:
        state = json.loads(read(os.path.join(work, STATE)))
        assert (state["format"], state["version"]) == ("nnpatch-update-state", 1)
        assert {k: state[k] for k in want} == want


@pytest.mark.parametrize("case", [marked(c) for c in CASES])
def test_update(case, tmp_path):
    model, manifest = lay_out(case, tmp_path)
    args = ["update", model, "--manifest", manifest]
    if case["key"] is not None:
        args += ["--key", os.path.join(HERE, case["key"])]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == case["exit"], r.output
    if case["exit"]:
        lines = r.stderr.strip("\n").splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
        assert type(r.exception).__name__ == "SystemExit"
    check_after(case, tmp_path)


@pytest.mark.parametrize("case", [marked(c) for c in CASES if c["exit"]])
def test_update_error_class(case, tmp_path):
    """The library's updater raises the class the index names (a native client reports the same kind)."""
    from nnpatch.errors import NnpatchError
    from nnpatch.release import update

    model, manifest = lay_out(case, tmp_path)
    key = None if case["key"] is None else os.path.join(HERE, case["key"])
    with pytest.raises(NnpatchError) as info:
        update(model, manifest, key=key)
    assert (type(info.value).__name__, info.value.exit_code) == (case["error"], case["exit"])


def test_the_cases_cover_what_manifest_md_names():
    """A guard against a shrinking set."""
    names = {c["name"] for c in CASES}
    assert {"signed", "wrong-key", "signature-over-other-bytes", "payload-type-wrong", "signatures-empty",
            "signature-not-base64", "expired", "older-release", "signed-same-release-again",
            "same-release-other-target", "unsigned-with-state", "state-not-json", "target-name-bad",
            "base-url-no-slash"} <= names
    assert {c["exit"] for c in CASES} == {0, 3, 4, 7}
    assert SPEC_AHEAD.keys() <= names


def test_the_key_is_a_test_key():
    """The committed private keys say what they are in their names (anyone can read them)."""
    assert all(n.startswith("TEST-ONLY-") for n in os.listdir(HERE) if n.endswith(".pem"))


def test_vectors_are_current():
    """The generator, run again, reproduces spec/vectors/manifest exactly."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(HERE, "generate.py")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=root))
    assert p.returncode == 0, p.stdout + p.stderr
