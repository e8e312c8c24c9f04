"""``nnpatch release`` and ``update``: release feeds and the updater's side of them."""

from __future__ import annotations

import dataclasses
import os
import re

import click

from .. import codecs, errors
from ..delivery import fetch
from ..delivery.manifest import MAX_RELEASE, parse_duration
from ..delivery.updater import update as do_update
from ..release import make_release, published_files
from ..report import printable
from ._common import InputPath, emit_json, human, say
from ._inputs import check_public_key


def _names(ctx, param, values) -> dict[str, str]:
    out = {}
    for v in values:
        path, eq, name = v.rpartition("=")
        if not eq or not path or not name:
            raise click.BadParameter(f"{v!r}: expected PATH=NAME")
        out[path] = name
    return out


def _header(ctx, param, values) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values:
        name, colon, value = v.partition(":")
        name, value = name.strip(), value.strip()
        # a token (RFC 9110) for the name, and no line break anywhere: nothing can be smuggled into the request
        if not colon or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) or re.search(r"[\r\n\0]", value):
            raise click.BadParameter(f"{v!r}: expected 'Name: value'")
        out.append((name, value))
    return tuple(out)


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
@click.option("--full", is_flag=True,
              help="Also publish the new model itself beside the patches, listed in the manifest for devices no "
                   "patch leads from (update --fallback full).")
@click.option("--full-url", metavar="URL", help="List a copy of the new model hosted at this http(s) URL instead.")
@click.option("--force", is_flag=True,
              help="Write into a folder that is not empty, removing the files the new manifest does not name.")
@click.option("--aligned", is_flag=True,
              help="Patches with 64-byte aligned sections (format 1.4 and older), for devices whose applier is "
                   "nnpatch 0.4 or older; default: packed (format 1.5).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest to stdout.")
@click.pass_context
def release(ctx, olds, new, outdir, sign_key, release_number, expires, names, base_url, level, chain, full, full_url,
            force, aligned, as_json):
    """Patches from every old version to the new one, plus a manifest for updaters."""
    manifest = make_release(list(olds), new, outdir, level=level, chain=chain, sign_key=sign_key,
                            release=release_number, expires=expires, names=names, base_url=base_url, full=full,
                            full_url=full_url, force=force, aligned=aligned)
    if sign_key is not None and expires is None:
        click.echo("warning: no --expires: a device cannot tell a frozen feed from a quiet one", err=True)
    if as_json:
        emit_json(manifest)
        return
    how = "signed" if sign_key else "unsigned (for trusted networks only)"
    number = f" release {manifest['release']}" if "release" in manifest else ""
    files = published_files(manifest)
    patches = len(files) - (1 if full else 0)
    whole = ", the full model" if full else ""
    say(ctx, f"wrote {patches} patch{'' if patches == 1 else 'es'}{whole} and {os.path.join(outdir, 'manifest.json')}: "
             f"{how}{number}, target {manifest['target']['name']}")


@click.command()
@click.argument("model", type=click.Path())
@click.option("--manifest", required=True, metavar="URL|PATH",
              help="The release's manifest.json: an http(s):// URL or a local path.")
@click.option("--key", type=InputPath(dir_okay=False, what="key file"),
              help="Ed25519 public key: require a manifest and patches it signed, unexpired, and no older than "
                   "the last release this device accepted.")
@click.option("--in-place/--no-in-place", default=None,
              help="Apply behind the undo journal: no second copy of the model. Default: a second copy when the "
                   "disk has room for one, else in place (and it says so); --no-in-place forbids in place.")
@click.option("--dry-run", is_flag=True, help="Say which patch would be fetched and what it makes; change nothing.")
@click.option("--patch-dir", type=click.Path(file_okay=False),
              help="Where the patches are (default: the manifest's base URL, else beside it).")
@click.option("--prefer", type=click.Choice(["direct", "smallest", "chain"]), default="direct", show_default=True,
              help="Which patch to take when several lead to the target: the one made from this version, the "
                   "fewest bytes to download, or a chain through intermediate versions.")
@click.option("--fallback", type=click.Choice(["none", "full"]), default="none", show_default=True,
              help="When no patch leads from the model's version: 'full' downloads the whole new model the signed "
                   "manifest lists (release --full), checked by size and BLAKE3, and swaps it in.")
@click.option("--min-rate", type=click.FloatRange(min=1.0), metavar="BYTES/S",
              help="Slowest transfer accepted, over every 10 s of a download (a slower one is cut and resumed) "
                   "and on average over the whole download of a file after its first 30 s. Default: 1024.")
@click.option("--deadline", type=click.FloatRange(min=1.0), metavar="SECONDS",
              help="Most seconds the download of one file (the manifest, each patch) may take, every retry "
                   "included; exit 5 past it. Default: 30 s plus the bytes received at --min-rate.")
@click.option("--timeout", type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="Connect and read timeout of each request (default: 10 s to connect, 30 s between bytes).")
@click.option("--retries", type=click.IntRange(0, 100), metavar="N",
              help="Further tries of a file after the first, with a growing pause (default: 5).")
@click.option("--header", "headers", multiple=True, callback=_header, metavar="'NAME: VALUE'",
              help="An extra request header (a token, a cookie), sent to the manifest's and patches' origin only; "
                   "may be repeated.")
@click.option("--ca-file", type=InputPath(dir_okay=False, what="CA file"),
              help="PEM bundle of the certificate authorities to trust for https:// (default: the system's).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object to stdout (on errors too).")
@click.pass_context
def update(ctx, model, manifest, key, in_place, dry_run, patch_dir, prefer, fallback, min_rate, deadline, timeout,
           retries, headers, ca_file, as_json):
    """Bring MODEL to a release's version with the right patch, checked by hash (and signature)."""
    # errors: the one handler in nnpatch.cli prints the Error: line, and with --json the error object
    check_public_key(key)
    given = {k: v for k, v in (("min_rate", min_rate), ("deadline", deadline), ("connect_timeout", timeout),
                               ("read_timeout", timeout), ("retries", retries), ("ca_file", ca_file),
                               ("headers", headers or None)) if v is not None}
    options = dataclasses.replace(fetch.DEFAULT_OPTIONS, **given) if given else None
    r = do_update(model, manifest, patch_dir=patch_dir, prefer=prefer, key=key, in_place=in_place, dry_run=dry_run,
                  fallback=fallback, fetch=options)
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
    how = (" in place (no room beside the model for a second copy)" if r.in_place_for_room else
           " by downloading the full model (no patch leads from this version)" if r.mode == "full" else "")
    if r.status == "current":
        say(ctx, f"{r.path} is already {release_text}: nothing to do{trust}")
    elif r.status == "would-update":
        say(ctx, f"would fetch {patches} ({human(r.patch_bytes)}) to bring {r.path} from "
                 f"{printable(r.from_name or r.from_blake3[:16], backslash=False)} to {release_text}{how}{trust}")
    else:
        fetched = f", {human(r.downloaded_bytes)} downloaded" if r.downloaded_bytes or r.resumed_bytes else ""
        if r.resumed_bytes:
            fetched += f" (resumed after {human(r.resumed_bytes)})"
        say(ctx, f"updated {r.path} to {release_text}{how} with {patches} ({human(r.patch_bytes)}"
                 f"{fetched}); BLAKE3 {r.to_blake3}{trust}")
