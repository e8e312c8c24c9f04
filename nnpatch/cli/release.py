"""``nnpatch release`` and ``update``: release feeds and the updater's side of them."""

from __future__ import annotations

import dataclasses
import os

import click

from .. import codecs, errors
from ..delivery.manifest import MAX_RELEASE, parse_duration
from ..release import make_release
from ..report import printable
from ..delivery import fetch
from ..delivery.updater import update as do_update
from ._common import InputPath, emit_json, human


def _names(ctx, param, values) -> dict[str, str]:
    out = {}
    for v in values:
        path, eq, name = v.rpartition("=")
        if not eq or not path or not name:
            raise click.BadParameter(f"{v!r}: expected PATH=NAME")
        out[path] = name
    return out


def _duration(ctx, param, value) -> int | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except errors.UsageError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.argument("olds", nargs=-1, required=True, type=click.Path())
@click.option("--to", "new", required=True, type=click.Path(), help="The new version (a file or model directory).")
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Directory for the patches and manifest.json.")
@click.option("--sign-key", type=InputPath(dir_okay=False, what="key file"),
              help="Ed25519 private key (nnpatch keygen): signs every patch and the manifest. Needs --version.")
@click.option("--version", "release_number", type=click.IntRange(0, MAX_RELEASE), metavar="N",
              help="The release number; it must grow from one release to the next (devices refuse older ones).")
@click.option("--expires", callback=_duration, metavar="DURATION",
              help="Updaters refuse the manifest this long after now: 90d, 12h, 30m, 45s, 2w.")
@click.option("--name", "names", multiple=True, callback=_names, metavar="PATH=NAME",
              help="Name a version (default: file stems, else the folders they sit in, else hash prefixes).")
@click.option("--base-url", help="Where updaters fetch the patches (default: beside the manifest).")
@click.option("--level", type=click.IntRange(codecs.MIN_LEVEL, codecs.MAX_LEVEL), default=codecs.DEFAULT_LEVEL,
              show_default=True, help="zstd level.")
@click.option("--chain", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Also record a chain through intermediate versions: where smaller, always, or never.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest to stdout.")
def release(olds, new, outdir, sign_key, release_number, expires, names, base_url, level, chain, as_json):
    """Patches from every old version to the new one, plus a manifest for updaters."""
    manifest = make_release(list(olds), new, outdir, level=level, chain=chain, sign_key=sign_key,
                            release=release_number, expires=expires, names=names, base_url=base_url)
    if sign_key is not None and expires is None:
        click.echo("warning: no --expires: a device cannot tell a frozen feed from a quiet one", err=True)
    if as_json:
        emit_json(manifest)
        return
    how = "signed" if sign_key else "unsigned (for trusted networks only)"
    number = f" release {manifest['release']}" if "release" in manifest else ""
    click.echo(f"wrote {len(manifest.get('bases', []))} patches and {os.path.join(outdir, 'manifest.json')}: "
               f"{how}{number}, target {manifest['target']['name']}")


@click.command()
@click.argument("model", type=click.Path())
@click.option("--manifest", required=True, metavar="URL|PATH",
              help="The release's manifest.json: an http(s):// URL or a local path.")
@click.option("--key", type=InputPath(dir_okay=False, what="key file"),
              help="Ed25519 public key: require a manifest and patches it signed, unexpired, and no older than "
                   "the last release this device accepted.")
@click.option("--in-place", is_flag=True, help="Apply behind the undo journal: no second copy of the model.")
@click.option("--dry-run", is_flag=True, help="Say which patch would be fetched and what it makes; change nothing.")
@click.option("--patch-dir", type=click.Path(file_okay=False),
              help="Where the patches are (default: the manifest's base URL, else beside it).")
@click.option("--prefer", type=click.Choice(["direct", "smallest", "chain"]), default="direct", show_default=True,
              help="Which patch to take when several lead to the target: the one made from this version, the "
                   "fewest bytes to download, or a chain through intermediate versions.")
@click.option("--min-rate", type=click.FloatRange(min=1.0), metavar="BYTES/S",
              help="Slowest transfer accepted, over every 10 s of a download (a slower one is cut and resumed) "
                   "and on average over the whole download of a file after its first 30 s. Default: 1024.")
@click.option("--deadline", type=click.FloatRange(min=1.0), metavar="SECONDS",
              help="Most seconds the download of one file (the manifest, each patch) may take, every retry "
                   "included; exit 5 past it. Default: 30 s plus the bytes received at --min-rate.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout (on errors too).")
def update(model, manifest, key, in_place, dry_run, patch_dir, prefer, min_rate, deadline, as_json):
    """Bring MODEL to a release's version with the right patch, checked by hash (and signature)."""
    # errors: the one handler in nnpatch.cli prints the Error: line, and with --json the error object
    given = {k: v for k, v in (("min_rate", min_rate), ("deadline", deadline)) if v is not None}
    options = dataclasses.replace(fetch.DEFAULT_OPTIONS, **given) if given else None
    r = do_update(model, manifest, patch_dir=patch_dir, prefer=prefer, key=key, in_place=in_place, dry_run=dry_run,
                  fetch=options)
    if as_json:
        emit_json(r.to_json())
        return
    # names and patch file names come from the feed: escaped as show escapes them (report.printable)
    to_name = printable(str(r.to_name), backslash=False)
    release_text = f"release {r.release} ({to_name})" if r.release is not None else f"version {to_name}"
    patches = printable(", ".join(r.patches), backslash=False)
    if not r.signed:
        trust = ", unsigned feed"
    elif r.key_id is None:
        trust = ", signature not checked (no --key)"
    else:
        trust = f", signed by {r.key_id}"
    if r.status == "current":
        click.echo(f"{r.path} is already {release_text}: nothing to do{trust}")
    elif r.status == "would-update":
        click.echo(f"would fetch {patches} ({human(r.patch_bytes)}) to bring {r.path} from "
                   f"{printable(r.from_name or r.from_blake3[:16], backslash=False)} to {release_text}{trust}")
    else:
        fetched = f", {human(r.downloaded_bytes)} downloaded" if r.downloaded_bytes or r.resumed_bytes else ""
        if r.resumed_bytes:
            fetched += f" (resumed after {human(r.resumed_bytes)})"
        click.echo(f"updated {r.path} to {release_text} with {patches} ({human(r.patch_bytes)}"
                   f"{fetched}); BLAKE3 {r.to_blake3}{trust}")
