"""``nnpatch keygen`` and ``sign``: Ed25519 signatures (cryptography is imported by nnpatch.signing when used)."""

from __future__ import annotations

import click

from ..signing import generate_keypair, sign_patch
from ._common import InputPath, emit_json, json_option, say


@click.command()
@click.option("-o", "--output", "prefix", required=True, type=click.Path(dir_okay=False),
              help="Writes PREFIX.pem (private, mode 0600) and PREFIX.pub.pem.")
@json_option()
@click.pass_context
def keygen(ctx, prefix, as_json):
    """Make an Ed25519 key pair for signing patches."""
    private, public = f"{prefix}.pem", f"{prefix}.pub.pem"
    kid = generate_keypair(private, public)
    if as_json:
        emit_json({"private_key": private, "public_key": public, "key_id": kid})
    else:
        say(ctx, f"wrote {private} (keep it secret) and {public}; key id {kid}")


@click.command()
@click.argument("patch", type=InputPath(dir_okay=False, what="patch file"))
@click.option("--key", required=True, type=InputPath(dir_okay=False, what="key file"),
              help="Ed25519 private key (PEM).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the signed patch here (default: in place).")
@json_option()
@click.pass_context
def sign(ctx, patch, key, output, as_json):
    """Sign a patch (its trailer hash, which covers every byte)."""
    kid = sign_patch(patch, key, output)
    if as_json:
        emit_json({"patch": output or patch, "key_id": kid})
    else:
        say(ctx, f"signed {output or patch} with key {kid}")
