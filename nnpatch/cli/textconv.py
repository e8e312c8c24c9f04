"""``nnpatch textconv``: a model as text for ``git diff``.

git runs it on whatever the work tree or the object store holds, so it
prints something useful for any input and exits 0 for every file it can
read: a Git LFS pointer (what ``actions/checkout`` leaves without
``lfs: true``) is shown as its object id and size, any other file that is not
a model by its size and BLAKE3."""

from __future__ import annotations

import os

import click

from .. import hashing
from ..errors import MissingDependencyError, WeightsError
from ..report import printable
from ..weights import open_model
from ._common import InputPath, emit_json, json_option

#: The first line of every Git LFS pointer file (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md).
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\n"
#: Pointer files are small; the spec caps them at 1024 bytes.
LFS_POINTER_MAX = 1024


@click.command()
@click.argument("file", type=InputPath())
@json_option()
def textconv(file, as_json):
    """A stable text summary of a model, for `git diff` (see the README)."""
    pointer = _lfs_pointer(file)
    if pointer is not None:
        _show_other(file, as_json, "git-lfs pointer", {k: pointer[k] for k in ("oid", "size") if k in pointer})
        return
    try:
        model = open_model(file)
    except (WeightsError, MissingDependencyError) as e:
        _show_other(file, as_json, "not a model", {"error": str(e)})
        return
    with model as w:
        digest, per = hashing.model_digest(w)
        names = hashing.canonical_order(w.tensors)
        size = sum(f.size for f in w.files)
        if as_json:
            emit_json({"file": file, "kind": w.kind, "size": size, "model_blake3": digest.hex(),
                       "metadata": {k: str(v) for k, v in (w.metadata or {}).items()},
                       "tensors": [{"name": n, "dtype": w.tensors[n].dtype, "shape": list(w.tensors[n].shape),
                                    "blake3": per[n].hex()} for n in names]})
            return
        click.echo(f"{w.kind}: {len(w.tensors)} tensors, {size} bytes")
        click.echo(f"model blake3: {digest.hex()}")
        # names and metadata come from the model file: no terminal escapes through (a model's own
        # backslashes stay as they are, so that ordinary summaries do not change)
        for key in sorted(w.metadata or {}):
            value = printable(str(w.metadata[key]), backslash=False)
            click.echo(f"metadata {printable(key, backslash=False)}: {value}")
        for name in names:
            info = w.tensors[name]
            shape = "x".join(map(str, info.shape)) or "scalar"
            click.echo(f"{printable(name, backslash=False)}  {info.dtype}  {shape}  {per[name].hex()[:16]}")


def _lfs_pointer(path: str) -> dict[str, str] | None:
    """The keys of a Git LFS pointer file at ``path``, or None when it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(LFS_POINTER_MAX + 1)
    except OSError:
        return None
    if not head.startswith(LFS_POINTER) or len(head) > LFS_POINTER_MAX:
        return None
    try:
        lines = head.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return None
    keys = {}
    for line in lines:
        key, _, value = line.partition(" ")
        keys[key] = value
    return keys


def _show_other(path: str, as_json: bool, kind: str, fields: dict[str, str]) -> None:
    """A file that is no model: what it is, its size and BLAKE3, so that git still shows a change."""
    size = os.path.getsize(path)
    digest = hashing.hash_file(path)
    if as_json:
        emit_json({"file": path, "kind": kind, "size": size, "blake3": digest, **fields})
        return
    click.echo(f"{kind}: {size} bytes, BLAKE3 {digest}")
    for key, value in fields.items():
        click.echo(f"{key}: {printable(value, backslash=False)}")
    if kind == "git-lfs pointer":
        click.echo("(the model itself is not checked out: run `git lfs pull`, or check out with LFS, to compare "
                   "its tensors)")
