"""The ready-to-paste CI job of docs/WORKFLOWS.md, run here step by step (issue 27, item 7):
everything but the hosted runner. `actions/checkout` of nnpatch is this repository,
`actions/setup-python` a fresh virtual environment, `gh` a stand-in that serves the previous
release's model and records the upload, and the user's build step writes the new model. The job
must install nnpatch with its own command and publish a patch that rebuilds the new model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from nnpatch import apply
from nnpatch.hashing import hash_file

from .conftest import read

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_GH = r"""#!/bin/sh
# gh, as far as the job uses it: list releases, download the previous model, upload files
case "$1 $2" in
  "release list") echo v1 ;;
  "release download")
    shift 2; dir=.
    while [ $# -gt 0 ]; do case "$1" in --dir) dir=$2; shift 2 ;; --pattern) shift 2 ;; *) shift ;; esac; done
    cp "$GH_OLD_MODEL" "$dir/model.safetensors" ;;
  "release upload") shift 3; cp "$@" "$GH_UPLOADS/" ;;
  *) echo "gh stand-in: unexpected: $*" >&2; exit 1 ;;
esac
"""


def job_steps(markdown: str) -> list[tuple[str, str]]:
    """(kind, text) for each step of the job: ('uses', action) or ('run', shell script)."""
    block = markdown.split("## CI: build, verify and publish")[1].split("```yaml\n")[1].split("```")[0]
    lines = block.splitlines()
    steps, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)(?:- )?(uses|run):\s*(.*)$", lines[i])
        i += 1
        if not m:
            continue
        indent, kind, value = len(m.group(1)), m.group(2), m.group(3)
        if kind == "run" and value == "|":
            body = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i].strip())
                i += 1
            value = "\n".join(body)
        steps.append((kind, re.sub(r"\s+#.*$", "", value) if kind == "uses" else value))
    return steps


@pytest.mark.slow
def test_the_ci_job_runs_and_publishes_an_exact_patch(tmp_path, pair):
    base, target = pair()
    with open(os.path.join(ROOT, "docs", "WORKFLOWS.md"), encoding="utf-8") as f:
        steps = job_steps(f.read())
    assert [k for k, _ in steps].count("run") >= 5
    assert not any("pip install nnpatch" in text.split("\n")[0] and "./" not in text for _, text in steps), \
        "nnpatch is on no package index: the job must install it from its repository"

    work, fake, uploads, venv = tmp_path / "repo", tmp_path / "bin", tmp_path / "uploads", tmp_path / "venv"
    for d in (work / "scripts", fake, uploads):
        d.mkdir(parents=True)
    (fake / "gh").write_text(FAKE_GH)
    (work / "scripts" / "build-model.sh").write_text(f'#!/bin/sh\nmkdir -p "$(dirname "$1")"\ncp "{target}" "$1"\n')
    for f in (fake / "gh", work / "scripts" / "build-model.sh"):
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv / 'bin'}:{fake}:{os.environ['PATH']}", GH_OLD_MODEL=str(base), GH_UPLOADS=str(uploads),
               GITHUB_REF_NAME="v2", GH_TOKEN="stand-in")
    checkouts = 0
    for kind, text in steps:
        if kind == "uses":
            if text.startswith("actions/checkout"):
                checkouts += 1
                if checkouts == 2:  # nnpatch's own repository, at the path the job names
                    shutil.copytree(ROOT, work / "nnpatch-src", symlinks=True,
                                    ignore=shutil.ignore_patterns(".venv", "build", ".git", "*.so", "__pycache__",
                                                                  "*.egg-info", ".hypothesis", "demo-out"))
            elif text.startswith("actions/setup-python"):
                # the interpreter the test venv was made from: a fresh environment, as on a runner
                subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)],
                               check=True, timeout=300)
            continue
        text = re.sub(r"\$\{\{ github\.token \}\}", "stand-in", text)
        p = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=work, env=env, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, (text, p.stdout[-2000:], p.stderr[-2000:])
    assert checkouts == 2
    assert sorted(os.listdir(uploads)) == ["B3SUMS", "model.nnpatch", "model.safetensors"]
    out = tmp_path / "rebuilt.safetensors"
    apply(base, str(uploads / "model.nnpatch"), str(out))
    assert read(out) == read(target) and hash_file(str(out)) == hash_file(target)
