"""``nnpatch verify``."""

from __future__ import annotations

import tempfile

import click

from .. import errors
from ..patchfile import read_patch_stream
from ..report import printable
from ..signing import authenticator
from ..verifier import verify as do_verify
from ._common import InputPath, emit_json, json_option, quiet
from ._inputs import check_order, check_public_key


@click.command()
@click.argument("patch", type=InputPath(dir_okay=False, allow_dash=True, what="patch file"))
@click.option("--base", type=InputPath(), help="Check that this is the patch's base.")
@click.option("--target", type=InputPath(), help="Check that this is the patch's target.")
@click.option("--key", type=InputPath(dir_okay=False, what="key file"),
              help="Require a signature by this Ed25519 public key (PEM).")
@json_option()
@click.pass_context
def verify(ctx, patch, base, target, key, as_json):
    """Check a patch's integrity, and optionally its base, target and signature.

    PATCH '-' reads the patch from standard input.
    """
    check_order("nnpatch verify PATCH [--base OLD] [--target NEW]", models={"--base": base, "--target": target},
                patches={"PATCH": patch})
    check_public_key(key)
    if patch == "-":  # with a key, nothing of the header is parsed before the signature checks out
        patch = read_patch_stream(directory=tempfile.gettempdir(),
                                  authenticate=authenticator(key) if key is not None else None)
    report = do_verify(patch, base=base, target=target, key=key)
    if as_json:
        emit_json({"patch": report.patch, "ok": report.ok,
                   "checks": [{"what": c.what, "ok": c.ok, "detail": c.detail} for c in report.checks]})
    else:
        for c in report.checks:
            if not (c.ok and quiet(ctx)):  # --quiet: only what failed
                # a detail names tensors and files from the patch: escaped as show escapes them
                click.echo(f"{c.what}: {'OK' if c.ok else 'FAILED'}  {printable(c.detail, backslash=False)}")
    if not report.ok:
        ctx.exit(errors.EXIT_MISMATCH)
