"""The publisher of release feeds: one patch from every old version to the new one, and
the manifest an updater reads to pick, check and apply the right one.

    nnpatch release old/model.safetensors --to new/model.safetensors -o dist/ \
        --sign-key release.pem --version 7 --expires 90d --base-url https://cdn.example/m/
    nnpatch update model.safetensors --manifest https://cdn.example/m/manifest.json --key release.pub.pem

``make_release`` writes ``<old>-to-<new>.nnpatch`` for each old version (old
versions given oldest first), the patches between consecutive old versions,
and ``manifest.json`` (spec/MANIFEST.md; schema
spec/json/release-manifest.schema.json). Versions are named by ``names``
(``--name PATH=NAME``), else by their files' stems, else by the folders they
sit in (the CI layout ``old/model.safetensors``, ``new/model.safetensors``),
else by hash prefixes. For each old version whose chain of consecutive
patches (v1 -> v2 -> ... -> new) totals fewer bytes than its direct patch,
the entry records that ``chain`` (at most ``MAX_CHAIN_LINKS`` links);
consecutive patches no chain uses are not kept. With ``sign_key`` every
patch is signed, and ``manifest.json`` is a signed envelope of the manifest
(:mod:`nnpatch.delivery.trust`); a signed feed must carry a release number.

The device's side, ``update`` (the updater) and the manifest's format, signature
and state file, live in :mod:`nnpatch.delivery`; their public names are
importable from here as well, as they always were.

Versions may also be Hugging Face model directories (format 1.1 targets):
a directory is identified by its directory digest (spec/FORMAT.md, section
8) and the total size of its files.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass

from ._version import __version__
from .atomic import atomic_path, atomic_write
from .delivery.manifest import (
    BASE_URL,
    FILE_URL,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MAX_CHAIN_LINKS,
    MAX_RELEASE,
    PATCH_NAME,
    encode_manifest,
    format_time,
    parse_manifest,
)
from .delivery.trust import load_manifest, sign_manifest
from .delivery.updater import UpdateResult, partial_path, update
from .differ import diff
from .errors import NoPatchError, NoUpdatePathError, UsageError
from .hashing import hash_file, model_digest
from .patchfile import read_patch
from .weights.source import open_source, path_digest

#: A version name: at most 94 characters, so that a patch name "A-to-B.nnpatch" fits a manifest's 200.
_SAFE_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,93}$")

# the updater's names (update, UpdateResult, load_manifest, ...) are public here too: nnpatch.release
# was their home before nnpatch.delivery, and code written against it keeps working
__all__ = ["MANIFEST_NAME", "MAX_CHAIN_LINKS", "NoPatchError", "NoUpdatePathError", "UpdateResult", "load_manifest",
           "make_release", "parse_manifest", "partial_path", "published_files", "update"]


@dataclass
class _Version:
    path: str
    name: str
    blake3: str
    size: int


def _stem(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    stem, dot, _ = base.rpartition(".")
    return stem if dot and stem else base


def _folder(path: str) -> str:
    return os.path.basename(os.path.dirname(os.path.abspath(path)))


def _name_versions(versions: list[_Version], names: dict[str, str]) -> None:
    """Name each version: ``names`` (path -> name) first, then the first rule that gives the rest
    distinct, plain names: file stems, the folders the files sit in, hash prefixes."""
    given: dict[str, str] = {}
    for path, name in names.items():
        if not _SAFE_STEM.match(name):
            raise UsageError(f"--name {path}={name}: a name is 1 to 94 of [A-Za-z0-9._-], starting with a "
                             "letter or digit")
        given[os.path.realpath(path)] = name
    unknown = set(given) - {os.path.realpath(v.path) for v in versions}
    if unknown:
        raise UsageError(f"--name {sorted(unknown)[0]}: not one of the release's versions")
    fixed = [v for v in versions if os.path.realpath(v.path) in given]
    for v in fixed:
        v.name = given[os.path.realpath(v.path)]
    if len({v.name for v in fixed}) != len(fixed):
        raise UsageError("--name gives two versions the same name")
    rest = [v for v in versions if os.path.realpath(v.path) not in given]
    taken = {v.name for v in fixed}
    for rule in (lambda v: _stem(v.path), lambda v: _folder(v.path), lambda v: v.blake3[:16]):
        cand = [rule(v) for v in rest]
        if len(set(cand)) == len(cand) and not taken & set(cand) and all(_SAFE_STEM.match(c) for c in cand):
            break
    else:  # a given name equal to a hash prefix: keep hashes, longer
        cand = [v.blake3 for v in rest]
    for v, c in zip(rest, cand):
        v.name = c


def _patch_info(path: str) -> dict:
    with read_patch(path) as p:
        h = p.header
        return {
            "patch": os.path.basename(path),
            "patch_size": os.path.getsize(path),
            "patch_blake3": hash_file(path),
            "patch_trailer_blake3": p.trailer_hash,
            "base_blake3": h.base.blake3,
            "target_blake3": h.target.file_blake3,
            "target_model_blake3": h.target.model_blake3,
        }


def make_release(olds: list[str | os.PathLike[str]], new: str | os.PathLike[str], outdir: str | os.PathLike[str], *,
                 level: int | None = None, chain: str = "auto", sign_key: str | os.PathLike[str] | None = None,
                 release: int | None = None, expires: int | None = None, names: dict[str, str] | None = None,
                 base_url: str | None = None, full: bool = False, full_url: str | None = None, force: bool = False,
                 now: float | None = None, aligned: bool = False) -> dict:
    """Write the patches and ``manifest.json`` into ``outdir``; return the manifest.

    ``olds`` are the versions users may have, oldest first. ``chain``:
    ``"auto"`` records a chain where it is smaller than the direct patch,
    ``"always"`` for every old version with a chain of two links or more,
    ``"never"`` makes no consecutive patches at all. ``sign_key`` (an Ed25519
    private key, PEM) signs every patch and the manifest, and needs
    ``release``, the feed's release number (it must grow from one release
    to the next). ``expires``: seconds from ``now`` after which updaters
    refuse the manifest. ``names``: path -> version name. ``base_url``:
    where updaters fetch the patches (default: beside the manifest).
    ``full``: also publish the target file itself beside the patches and list
    it as the manifest's ``full`` entry (the fallback of a device no patch
    leads from); ``full_url``: list a copy of it hosted at that http(s) URL
    instead. ``outdir`` must be empty (or missing) unless ``force``: then the
    files of an earlier release that the new manifest does not name are
    removed, so the folder holds exactly this release. ``aligned``: patches
    in the 1.4 layout, for a fleet whose appliers are nnpatch 0.4 (``nnpatch
    diff --aligned``).
    """

    if chain not in ("auto", "always", "never"):
        raise UsageError(f"chain must be auto, always or never, got {chain!r}")
    if not olds:
        raise UsageError("release needs at least one old version")
    if sign_key is not None and release is None:
        raise UsageError("a signed release needs --version (its release number, larger than the last one's)")
    if release is not None and not (0 <= release <= MAX_RELEASE):
        raise UsageError(f"the release number must be 0 to {MAX_RELEASE}, got {release}")
    if expires is not None and expires <= 0:
        raise UsageError("expires must be a positive number of seconds")
    if full and full_url is not None:
        raise UsageError("--full publishes the target beside the patches, --full-url lists a copy elsewhere: "
                         "give one")
    if full_url is not None and not FILE_URL.match(full_url):
        raise UsageError(f"--full-url {full_url!r}: not the http:// or https:// URL of a file")
    if base_url is not None:
        base_url = base_url if base_url.endswith("/") else base_url + "/"
        if not BASE_URL.match(base_url):
            raise UsageError(f"--base-url {base_url!r}: not an http:// or https:// URL")
    now = time.time() if now is None else now
    outdir = os.fspath(outdir)
    earlier = _earlier_files(outdir, force)
    os.makedirs(outdir, exist_ok=True)
    diff_kw: dict = {} if level is None else {"level": level}
    if aligned:
        diff_kw["aligned"] = True
    if sign_key is not None:
        diff_kw["sign_key"] = os.fspath(sign_key)

    def version(p) -> _Version:
        p = os.fspath(p)
        if not (os.path.isfile(p) or os.path.isdir(p)):
            raise UsageError(f"{p}: not a file or model directory")
        return _Version(p, "", *path_digest(p))

    target = version(new)
    if (full or full_url is not None) and os.path.isdir(target.path):
        raise UsageError(f"{target.path}: --full and --full-url list a target file; a model directory is not one")
    versions: list[_Version] = []
    seen = {target.blake3}
    for p in olds:
        v = version(p)
        if v.blake3 in seen:
            continue  # the new version itself, or a duplicate: nothing to patch
        seen.add(v.blake3)
        versions.append(v)
    _name_versions(versions + [target], names or {})

    def patch_name(a: _Version, b: _Version) -> str:
        return f"{a.name}-to-{b.name}.nnpatch"

    direct: dict[str, dict] = {}
    for v in versions:
        out = os.path.join(outdir, patch_name(v, target))
        diff(v.path, target.path, out, **diff_kw)
        direct[v.blake3] = _patch_info(out)
    # links[i]: the patch from versions[i] to the next version (the last one's is its direct patch)
    links: list[dict] = []
    made_consecutive: list[str] = []
    if chain != "never":
        for i, v in enumerate(versions):
            if i == len(versions) - 1:
                links.append(direct[v.blake3])
                continue
            nxt = versions[i + 1]
            out = os.path.join(outdir, patch_name(v, nxt))
            diff(v.path, nxt.path, out, **diff_kw)
            links.append(_patch_info(out))
            made_consecutive.append(out)
    used: set[str] = set()
    bases = []
    target_model = None
    for i, v in enumerate(versions):
        d = direct[v.blake3]
        target_model = d["target_model_blake3"]
        entry = {
            "name": v.name,
            "base_blake3": v.blake3,
            "base_size": v.size,
            "patch": d["patch"],
            "patch_size": d["patch_size"],
            "patch_blake3": d["patch_blake3"],
            "patch_trailer_blake3": d["patch_trailer_blake3"],
        }
        if chain != "never" and i < len(versions) - 1:
            steps = links[i:]
            total = sum(s["patch_size"] for s in steps)
            if len(steps) <= MAX_CHAIN_LINKS and (chain == "always" or total < d["patch_size"]):
                entry["chain"] = {
                    "size": total,
                    "links": [{k: s[k] for k in ("patch", "patch_size", "patch_blake3", "patch_trailer_blake3",
                                                 "base_blake3", "target_blake3")} for s in steps],
                }
                used.update(s["patch"] for s in steps)
        bases.append(entry)
    for out in made_consecutive:
        if os.path.basename(out) not in used:
            os.unlink(out)
    if target_model is None:
        with open_source(target.path) as t:
            target_model = model_digest(t)[0].hex()
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created_by": f"nnpatch {__version__}",
        "created": format_time(now),
        "target": {"name": target.name, "blake3": target.blake3, "size": target.size, "model_blake3": target_model},
        "bases": bases,
    }
    if release is not None:
        manifest["release"] = release
    if expires is not None:
        manifest["expires"] = format_time(now + expires)
    if base_url is not None:
        manifest["base_url"] = base_url
    if full:
        manifest["full"] = {"url": _publish_full(target, outdir), "size": target.size, "blake3": target.blake3}
    elif full_url is not None:
        manifest["full"] = {"url": full_url, "size": target.size, "blake3": target.blake3}
    raw = encode_manifest(manifest)  # never publishes what an updater would refuse
    if sign_key is not None:
        raw, _ = sign_manifest(raw, sign_key)
    with atomic_write(os.path.join(outdir, MANIFEST_NAME)) as f:
        f.write(raw)
    named = published_files(manifest) | {MANIFEST_NAME}
    inputs = {os.path.realpath(os.fspath(p)) for p in [*olds, new]}
    for name in earlier - named:
        path = os.path.join(outdir, name)
        if os.path.realpath(path) not in inputs:  # `-o . --force` beside the models keeps the models
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return manifest


def published_files(manifest: dict) -> set[str]:
    """The files of ``outdir`` a release's manifest names, besides manifest.json itself: every
    direct and chained patch, and the full model when it is published beside them."""
    names = {b["patch"] for b in manifest["bases"]}
    names.update(link["patch"] for b in manifest["bases"] for link in b.get("chain", {}).get("links", ()))
    full = manifest.get("full")
    if full is not None and not FILE_URL.match(full["url"]):
        names.add(full["url"])
    return names


def _earlier_files(outdir: str, force: bool) -> set[str]:
    """The files an earlier release left in ``outdir``; refused unless ``force``, because a
    manifest replaced beside patches it no longer names is a folder that is synced to a CDN as is."""
    try:
        entries = list(os.scandir(outdir))
    except FileNotFoundError:
        return set()
    except NotADirectoryError as e:
        raise UsageError(f"-o {outdir}: not a directory") from e
    if entries and not force:
        raise UsageError(f"-o {outdir}: the folder is not empty (an earlier release?); give an empty folder, or "
                         "--force to replace its release (files the new manifest does not name are removed)")
    return {e.name for e in entries if e.is_file(follow_symlinks=False) or e.is_symlink()}


def _publish_full(target: _Version, outdir: str) -> str:
    """Copy the target file into ``outdir`` as ``NAME.EXT`` (its version name and its file's
    extension); return that name."""
    ext = os.path.splitext(target.path)[1]
    name = f"{target.name}{ext}" if PATCH_NAME.match(f"{target.name}{ext}") else f"{target.name}.model"
    with atomic_path(os.path.join(outdir, name)) as tmp:
        shutil.copyfile(target.path, tmp)
    return name
