"""``nnpatch demo``."""

from __future__ import annotations

import click

from ..demo import run_demo
from ._common import emit_json, json_option, quiet


@click.command()
@click.option("--dir", "directory", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Where to write the demo files.")
@click.option("--synthetic", is_flag=True, help="Use generated models instead of training (no torch needed).")
@json_option()
@click.pass_context
def demo(ctx, directory, synthetic, as_json):
    """Train, update with train-sparse, diff, apply and verify on built-in data."""
    result = run_demo(directory, echo=(lambda s: None) if as_json or quiet(ctx) else click.echo, synthetic=synthetic or None)
    if as_json:
        emit_json(result)
