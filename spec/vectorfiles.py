"""What the three vector generators (spec/generate_vectors.py, spec/vectors/journal/generate.py,
spec/vectors/manifest/generate.py) share: telling whether the committed vectors are what the
generator makes now."""

from __future__ import annotations

import os
import shutil


def _files(root: str, under: str = "") -> set[str]:
    top = os.path.join(root, under)
    return {os.path.relpath(os.path.join(r, n), root) for r, _, names in os.walk(top) for n in names}


def stale(generated: str, committed: str, *, owned: tuple[str, ...] = ()) -> list[str]:
    """The files of ``generated`` that ``committed`` lacks or holds with other bytes, then the files
    under ``committed``'s ``owned`` folders the generator no longer makes."""
    bad = []
    for rel in sorted(_files(generated)):
        mine = os.path.join(committed, rel)
        with open(os.path.join(generated, rel), "rb") as f:
            new = f.read()
        if not os.path.isfile(mine):
            bad.append(rel)
            continue
        with open(mine, "rb") as f:
            if f.read() != new:
                bad.append(rel)
    for folder in owned:
        gone = _files(committed, folder) - _files(generated, folder)
        bad += [f"{rel} (no longer generated)" for rel in sorted(gone)]
    return bad


def report(bad: list[str]) -> int:
    """Print each stale file; the generator's exit status."""
    for rel in bad:
        print(f"differs: {rel}")
    return 1 if bad else 0


def remove(folder: str, names) -> None:
    """Remove a generator's own files and folders from ``folder`` before it writes them anew."""
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
