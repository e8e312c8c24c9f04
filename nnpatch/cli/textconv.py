"""``nnpatch textconv``: a model as text for ``git diff``."""

from __future__ import annotations

import click

from .. import hashing
from ..report import printable
from ..weights import open_model
from ._common import EXIT_CODES_HELP


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("file", type=click.Path())
def textconv(file):
    """A stable text summary of a model, for `git diff` (see the README)."""
    with open_model(file) as w:
        model, per = hashing.model_digest(w)
        click.echo(f"{w.kind}: {len(w.tensors)} tensors, {sum(f.size for f in w.files)} bytes")
        click.echo(f"model blake3: {model.hex()}")
        # names and metadata come from the model file: no terminal escapes through (a model's own
        # backslashes stay as they are, so that ordinary summaries do not change)
        for key in sorted(w.metadata or {}):
            click.echo(f"metadata {printable(key, backslash=False)}: {printable(str(w.metadata[key]), backslash=False)}")
        for name in sorted(w.tensors, key=lambda n: n.encode("utf-8", "surrogatepass")):
            info = w.tensors[name]
            shape = "x".join(map(str, info.shape)) or "scalar"
            click.echo(f"{printable(name, backslash=False)}  {info.dtype}  {shape}  {per[name].hex()[:16]}")
