"""``nnpatch demo``."""

from __future__ import annotations

import click

from ..demo import run_demo
from ._common import EXIT_CODES_HELP, emit_json


@click.command(epilog=EXIT_CODES_HELP)
@click.option("--dir", "directory", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Where to write the demo files.")
@click.option("--synthetic", is_flag=True, help="Use generated models instead of training (no torch needed).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
@click.pass_context
def demo(ctx, directory, synthetic, as_json):
    """Train, update with train-sparse, diff, apply and verify on built-in data."""
    result = run_demo(directory, echo=(lambda s: None) if as_json else click.echo, synthetic=synthetic or None)
    if as_json:
        emit_json(result)
