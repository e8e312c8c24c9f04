"""``nnpatch release`` and ``update``: release sets and the updater's side of them."""

from __future__ import annotations

import os

import click

from .. import codecs
from ..release import make_release
from ..release import update as do_update
from ._common import EXIT_CODES_HELP, emit_json, human


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("olds", nargs=-1, required=True, type=click.Path())
@click.option("--to", "new", required=True, type=click.Path(), help="The new version (a file or model directory).")
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Directory for the patches and manifest.json.")
@click.option("--level", type=click.IntRange(codecs.MIN_LEVEL, codecs.MAX_LEVEL), default=codecs.DEFAULT_LEVEL,
              show_default=True, help="zstd level.")
@click.option("--chain", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Also record a chain through intermediate versions: where smaller, always, or never.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest to stdout.")
def release(olds, new, outdir, level, chain, as_json):
    """Patches from every old version to the new one, plus a manifest for updaters."""
    manifest = make_release(list(olds), new, outdir, level=level, chain=chain)
    if as_json:
        emit_json(manifest)
        return
    click.echo(f"wrote {len(manifest.get('bases', []))} patches and {os.path.join(outdir, 'manifest.json')}")


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path())
@click.option("--manifest", required=True, type=click.Path(dir_okay=False), help="manifest.json of a release.")
@click.option("--patch-dir", type=click.Path(file_okay=False), help="Where the patches are (default: beside it).")
@click.option("--prefer", type=click.Choice(["direct", "smallest", "chain"]), default="direct", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout.")
def update(model, manifest, patch_dir, prefer, as_json):
    """Bring MODEL to a release's version with the right patch, checked by hash."""
    r = do_update(model, manifest, patch_dir=patch_dir, prefer=prefer)
    if as_json:
        emit_json({"path": r.path, "updated": r.updated, "from_blake3": r.from_blake3, "to_blake3": r.to_blake3,
                   "patches": r.patches, "patch_bytes": r.patch_bytes})
    elif r.updated:
        click.echo(f"updated {r.path} with {', '.join(r.patches)} ({human(r.patch_bytes)}); BLAKE3 {r.to_blake3}")
    else:
        click.echo(f"{r.path} is already the release's version")
