"""``nnpatch verify``."""

from __future__ import annotations

import click

from .. import errors
from ..verifier import verify as do_verify
from ._common import EXIT_CODES_HELP, emit_json


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("patch", type=click.Path(dir_okay=False))
@click.option("--base", type=click.Path(), help="Check that this is the patch's base.")
@click.option("--target", type=click.Path(), help="Check that this is the patch's target.")
@click.option("--key", type=click.Path(dir_okay=False), help="Require a signature by this Ed25519 public key.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
@click.pass_context
def verify(ctx, patch, base, target, key, as_json):
    """Check a patch's integrity, and optionally its base, target and signature."""
    report = do_verify(patch, base=base, target=target, key=key)
    if as_json:
        emit_json({"patch": report.patch, "ok": report.ok,
                   "checks": [{"what": c.what, "ok": c.ok, "detail": c.detail} for c in report.checks]})
    else:
        for c in report.checks:
            click.echo(f"{c.what}: {'OK' if c.ok else 'FAILED'}  {c.detail}")
    if not report.ok:
        ctx.exit(errors.EXIT_MISMATCH)
