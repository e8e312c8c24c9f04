"""Release feeds: one patch from every old version to the new one, a manifest an
updater reads to pick, check and apply the right one, and the updater.

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
(:mod:`nnpatch.feed`); a signed feed must carry a release number.

``update`` reads the manifest from a path or a URL; with ``key`` it must be
signed by that key, unexpired, and no older than the last one this device
accepted (the state file beside the model). It hashes the local model, finds
its entry, fetches the patches (resuming interrupted downloads,
:mod:`nnpatch.fetch`), checks the size and BLAKE3 of every patch file it
will use against the manifest *before* applying, builds the new version
beside the model (or, ``in_place``, behind the undo journal), proves its
BLAKE3 against the manifest's target, and only then commits it: the model
is the old version or the verified new one, never anything else. (A chain
applied ``in_place`` commits link by link: a crash or a full disk between
links leaves the model at an intermediate version of the manifest, a known
and verified one, from which the next ``update`` continues.)

Versions may also be Hugging Face model directories (format 1.1 targets):
a directory is identified by its directory digest (spec/FORMAT.md, section
8) and the total size of its files; ``update`` builds the new directory
beside the old one, checks its directory digest, and swaps it in atomically
(``nnpatch.applier.directory``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import __version__
from ._json import loads_strict, read_bounded
from .applier import apply_in_place, replace_model
from .atomic import atomic_write
from .differ import diff
from .errors import (
    IntegrityError,
    NnpatchIOError,
    NoPatchError,
    NoUpdatePathError,
    PatchFormatError,
    UsageError,
)
from .feed import (
    MAX_RELEASE,
    accepted_state,
    check_fresh,
    check_not_older,
    format_time,
    open_manifest,
    parse_time,
    read_state,
    sign_manifest,
    state_path,
    write_state,
)
from .fetch import FetchOptions, Fetcher, is_url, parent, resolve
from .hashing import digests_equal, hash_file, model_digest
from .patchfile import read_patch
from .weights.source import open_source, path_digest

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "nnpatch-release"
MANIFEST_VERSION = 1
MAX_MANIFEST_SIZE = 16 << 20
#: The longest chain a release records and an updater follows.
MAX_CHAIN_LINKS = 32
PARTIAL_SUFFIX = ".nnpatch-part"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: A version name: at most 94 characters, so that a patch name "A-to-B.nnpatch" fits _PATCH_NAME's 200.
_SAFE_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,93}$")
_PATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_BASE_URL = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")

__all__ = ["MANIFEST_NAME", "MAX_CHAIN_LINKS", "NoPatchError", "NoUpdatePathError", "UpdateResult", "load_manifest",
           "make_release", "parse_manifest", "update"]


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
            "target_blake3": h.target.blake3,
            "target_model_blake3": h.target.model_blake3,
        }


def make_release(olds: list[str | os.PathLike[str]], new: str | os.PathLike[str], outdir: str | os.PathLike[str], *,
                 level: int | None = None, chain: str = "auto", sign_key: str | os.PathLike[str] | None = None,
                 release: int | None = None, expires: int | None = None, names: dict[str, str] | None = None,
                 base_url: str | None = None, now: float | None = None) -> dict:
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
    if base_url is not None:
        if not _BASE_URL.match(base_url):
            raise UsageError(f"--base-url {base_url!r}: not an http:// or https:// URL")
        base_url = base_url if base_url.endswith("/") else base_url + "/"
    now = time.time() if now is None else now
    outdir = os.fspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    diff_kw: dict = {} if level is None else {"level": level}
    if sign_key is not None:
        diff_kw["sign_key"] = os.fspath(sign_key)

    def version(p) -> _Version:
        p = os.fspath(p)
        if not (os.path.isfile(p) or os.path.isdir(p)):
            raise UsageError(f"{p}: not a file or model directory")
        return _Version(p, "", *path_digest(p))

    target = version(new)
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
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    parse_manifest(raw)  # never publish what an updater would refuse
    if sign_key is not None:
        raw, _ = sign_manifest(raw, sign_key)
    with atomic_write(os.path.join(outdir, MANIFEST_NAME)) as f:
        f.write(raw)
    return manifest


# --- reading a manifest ---------------------------------------------------------------

def _req(obj: dict, key: str, kind, where: str, source: str):
    v = obj.get(key)
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if not ok:
        raise PatchFormatError(f"{where}: '{key}' missing or not {getattr(kind, '__name__', kind)}", path=source)
    if kind is int and v < 0:
        raise PatchFormatError(f"{where}: '{key}' is negative", path=source)
    return v


def _check_link(obj: dict, where: str, source: str, *, inline_hashes: bool) -> None:
    name = _req(obj, "patch", str, where, source)
    if not _PATCH_NAME.match(name):
        raise PatchFormatError(f"{where}: patch file name {name!r} is not a plain file name", path=source)
    _req(obj, "patch_size", int, where, source)
    keys = ["patch_blake3", "patch_trailer_blake3"] + (["base_blake3", "target_blake3"] if inline_hashes else [])
    for k in keys:
        if not _HEX64.match(_req(obj, k, str, where, source)):
            raise PatchFormatError(f"{where}: '{k}' is not 64 lowercase hex digits", path=source)


def parse_manifest(raw: bytes, *, source: str = MANIFEST_NAME) -> dict:
    """Validate a release manifest's bytes (structure, hex digests, plain patch names)."""
    if len(raw) > MAX_MANIFEST_SIZE:
        raise PatchFormatError(f"manifest of {len(raw)} bytes exceeds the {MAX_MANIFEST_SIZE} limit", path=source)
    try:
        m = loads_strict(raw)
    except ValueError as e:
        raise PatchFormatError(f"invalid manifest JSON: {e}", path=source) from e
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise PatchFormatError(f"not an nnpatch release manifest (format must be {MANIFEST_FORMAT!r})", path=source)
    if m.get("version") != MANIFEST_VERSION:
        raise PatchFormatError(f"unsupported manifest version {m.get('version')!r}", path=source)
    t = _req(m, "target", dict, "manifest", source)
    for k in ("blake3", "model_blake3"):
        if not _HEX64.match(_req(t, k, str, "target", source)):
            raise PatchFormatError(f"target: '{k}' is not 64 lowercase hex digits", path=source)
    _req(t, "size", int, "target", source)
    for i, b in enumerate(_req(m, "bases", list, "manifest", source)):
        where = f"bases[{i}]"
        if not isinstance(b, dict):
            raise PatchFormatError(f"{where}: not an object", path=source)
        if not _HEX64.match(_req(b, "base_blake3", str, where, source)):
            raise PatchFormatError(f"{where}: 'base_blake3' is not 64 lowercase hex digits", path=source)
        _req(b, "base_size", int, where, source)
        _check_link(b, where, source, inline_hashes=False)
        if "chain" in b:
            c = _req(b, "chain", dict, where, source)
            _req(c, "size", int, f"{where}.chain", source)
            links = _req(c, "links", list, f"{where}.chain", source)
            if not links:
                raise PatchFormatError(f"{where}.chain: no links", path=source)
            for j, link in enumerate(links):
                if not isinstance(link, dict):
                    raise PatchFormatError(f"{where}.chain.links[{j}]: not an object", path=source)
                _check_link(link, f"{where}.chain.links[{j}]", source, inline_hashes=True)
            if len(links) > MAX_CHAIN_LINKS:
                raise PatchFormatError(f"{where}.chain: {len(links)} links, more than the {MAX_CHAIN_LINKS} an "
                                       "updater follows", path=source)
    if "release" in m:
        r = m["release"]
        if type(r) is not int or not 0 <= r <= MAX_RELEASE:
            raise PatchFormatError(f"manifest: 'release' must be an integer from 0 to {MAX_RELEASE}", path=source)
    for k in ("created", "expires"):
        if k in m and parse_time(m[k]) is None:
            raise PatchFormatError(f"manifest: '{k}' is not a UTC time like 2025-01-31T12:00:00Z", path=source)
    if "base_url" in m and not (isinstance(m["base_url"], str) and _BASE_URL.match(m["base_url"])):
        raise PatchFormatError("manifest: 'base_url' is not an http:// or https:// URL", path=source)
    return m


def load_manifest(path: str | os.PathLike[str], *, key: str | os.PathLike[str] | None = None) -> dict:
    """The manifest in ``path`` (plain, or a signed envelope: with ``key``, checked against it)."""
    path = os.fspath(path)
    raw = read_bounded(path, _MAX_ENVELOPE_SIZE)
    return parse_manifest(_payload(raw, key, path).payload, source=path)


#: An envelope carries the manifest in base64 (4 bytes for 3) plus its signatures.
_MAX_ENVELOPE_SIZE = MAX_MANIFEST_SIZE * 4 // 3 + (64 << 10)


def _payload(raw: bytes, key, source: str):
    if len(raw) > _MAX_ENVELOPE_SIZE:
        raise PatchFormatError(f"manifest over {_MAX_ENVELOPE_SIZE} bytes", path=source)
    return open_manifest(raw, public_key=key, source=source)


# --- update ------------------------------------------------------------------------------

@dataclass
class UpdateResult:
    """What ``update`` did. ``status``: ``"updated"``, ``"current"`` (the model already was the
    target) or ``"would-update"`` (a dry run). ``downloaded_bytes``: bytes received over the
    network; ``resumed_bytes``: bytes an earlier, interrupted run had already downloaded."""

    path: str
    updated: bool  # False: the model already was the target, or a dry run
    from_blake3: str
    to_blake3: str
    patches: list[str] = field(default_factory=list)
    patch_bytes: int = 0
    status: str = "updated"
    release: int | None = None
    from_name: str | None = None
    to_name: str | None = None
    signed: bool = False
    key_id: str | None = None
    downloaded_bytes: int = 0
    resumed_bytes: int = 0
    in_place: bool = False
    dry_run: bool = False
    expires: str | None = None

    def to_json(self) -> dict:
        return {"ok": True, "path": self.path, "status": self.status, "updated": self.updated,
                "from_blake3": self.from_blake3, "to_blake3": self.to_blake3, "from_name": self.from_name,
                "to_name": self.to_name, "release": self.release, "expires": self.expires, "signed": self.signed,
                "key_id": self.key_id, "patches": self.patches, "patch_bytes": self.patch_bytes,
                "downloaded_bytes": self.downloaded_bytes, "resumed_bytes": self.resumed_bytes,
                "in_place": self.in_place, "dry_run": self.dry_run}


def _check_patch_file(path: str, link: dict) -> None:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot read patch: {e.strerror or e}") from e
    if size != link["patch_size"]:
        raise IntegrityError(f"{path}: {size} bytes, the manifest says {link['patch_size']}"
                             + (" (truncated download?)" if size < link["patch_size"] else ""),
                             what="patch size", expected=str(link["patch_size"]), actual=str(size))
    actual = hash_file(path)
    if not digests_equal(actual, link["patch_blake3"]):
        raise IntegrityError(f"{path}: BLAKE3 {actual} does not match the manifest's {link['patch_blake3']}",
                             what="patch blake3", expected=link["patch_blake3"], actual=actual)


def partial_path(model: str | os.PathLike[str], patch_blake3: str) -> str:
    """Where a download of the patch with this BLAKE3 goes, beside ``model``: named by the
    digest the manifest gives, so that a partial file is only ever continued with the same bytes."""
    return f"{os.path.normpath(os.fspath(model))}.{patch_blake3[:32]}{PARTIAL_SUFFIX}"


def _remove_stale_partials(model: str, keep: set[str]) -> None:
    """Remove partial downloads of this model that this update does not continue."""
    folder = os.path.dirname(os.path.abspath(model))
    # exactly partial_path's names: another model whose name starts with this one's keeps its downloads
    mine = re.compile(re.escape(os.path.basename(os.path.normpath(model))) + r"\.[0-9a-f]{32}"
                      + re.escape(PARTIAL_SUFFIX))
    keep = {os.path.abspath(p) for p in keep}
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if mine.fullmatch(name) and path not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _check_room(model: str, links: list[dict]) -> None:
    """Refuse, before the first byte, a download the model's file system has no room for."""
    need = sum(max(0, link["patch_size"] - _size_or_zero(partial_path(model, link["patch_blake3"]))) for link in links)
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(model)))
    except (OSError, AttributeError):
        return
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise NnpatchIOError(f"{model}: the patches need {need} more bytes beside the model, {free} are free")


def _size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _choose_links(entry: dict, target: dict, prefer: str, current: str) -> list[dict]:
    if "chain" in entry and len(entry["chain"]["links"]) <= MAX_CHAIN_LINKS and (
            prefer == "chain" or (prefer == "smallest" and entry["chain"]["size"] < entry["patch_size"])):
        return entry["chain"]["links"]
    return [dict(entry, base_blake3=current, target_blake3=target["blake3"])]


def update(model_path: str | os.PathLike[str], manifest_path: str | os.PathLike[str], *,
           patch_dir: str | os.PathLike[str] | None = None, prefer: str = "direct",
           verify: str = "default", key: str | os.PathLike[str] | None = None, in_place: bool = False,
           dry_run: bool = False, fetch: FetchOptions | None = None, now: float | None = None,
           progress: Callable[[int], None] | None = None) -> UpdateResult:
    """Bring ``model_path`` to the manifest's target version, in place.

    ``manifest_path`` is a path or an ``http://``/``https://`` URL. Patch
    files are looked up in ``patch_dir``, else at the manifest's
    ``base_url``, else beside the manifest; those at URLs are downloaded
    beside the model (resumably: :func:`partial_path`).
    ``prefer="direct"`` uses the direct patch; ``"smallest"`` the entry's
    chain when it has one and it is smaller; ``"chain"`` the chain whenever
    the entry has one.

    ``key`` (an Ed25519 public key, PEM): the manifest and every patch must
    be signed by it, the manifest must carry a release number no older than
    the one this device last accepted (kept in the state file beside the
    model, :func:`nnpatch.feed.state_path`), and it must not have expired.
    A device that once accepted a signed feed refuses to update without a
    key. ``in_place``: apply behind the undo journal instead of building
    a second copy. ``dry_run``: decide, report, and fetch, write or
    download nothing but the manifest.

    Raises :class:`~nnpatch.errors.NoUpdatePathError` (exit 7) when no
    patch leads from this model's version; IntegrityError (4) for every
    refused signature, release, expiry or digest; NnpatchIOError (5) for
    network and file errors.

    The result is always proven in full, by its file (or directory) digest
    against the manifest's target; ``verify`` is accepted for compatibility
    and changes nothing.
    """
    if prefer not in ("direct", "smallest", "chain"):
        raise UsageError(f"prefer must be direct, smallest or chain, got {prefer!r}")
    model_path = os.fspath(model_path)
    manifest_path = os.fspath(manifest_path)
    now = time.time() if now is None else now
    if not os.path.exists(model_path):
        raise NnpatchIOError(f"{model_path}: no such file or directory")
    state = read_state(model_path)
    if state is not None and key is None:
        raise IntegrityError(f"{model_path}: this device follows a signed feed (key {state.key_id}, release "
                             f"{state.release}, {state_path(model_path)}); pass --key to update it",
                             what="signature", expected=state.key_id)
    with Fetcher(fetch) as fetcher:
        opened, manifest = _fetch_manifest(fetcher, manifest_path, key)
        check_fresh(manifest, now=now, source=manifest_path)
        if key is not None:
            check_not_older(manifest, opened.payload, state, source=manifest_path)
            if not dry_run:
                write_state(model_path, accepted_state(manifest, opened.payload, opened.key_id, now=now))
        target = manifest["target"]
        current, size = path_digest(model_path)
        info = {"release": manifest.get("release"), "to_name": target.get("name"), "signed": opened.signed,
                "key_id": opened.key_id, "in_place": in_place, "dry_run": dry_run, "expires": manifest.get("expires")}
        if digests_equal(current, target["blake3"]):
            return UpdateResult(model_path, False, current, current, status="current", from_name=target.get("name"),
                                **info)
        entry = next((b for b in manifest["bases"] if digests_equal(b["base_blake3"], current)), None)
        if entry is None:
            raise NoUpdatePathError(f"no patch for this model version (BLAKE3 {current}) in {manifest_path}: "
                                    "a full download is needed", path=model_path)
        if size != entry["base_size"]:
            raise IntegrityError(f"{model_path}: {size} bytes, the manifest says {entry['base_size']} for BLAKE3 "
                                 f"{current}", what="base size")
        links = _choose_links(entry, target, prefer, current)
        if not digests_equal(links[-1]["target_blake3"], target["blake3"]):
            raise IntegrityError("the manifest's patches do not lead to its target", what="manifest")
        info["from_name"] = entry.get("name")
        names = [link["patch"] for link in links]
        total = sum(link["patch_size"] for link in links)
        if dry_run:
            return UpdateResult(model_path, False, current, target["blake3"], names, total, status="would-update",
                                **info)
        if patch_dir is not None:
            where = os.fspath(patch_dir)
        else:
            where = manifest.get("base_url") or parent(manifest_path)
        remote = is_url(where)
        partials = {partial_path(model_path, link["patch_blake3"]) for link in links} if remote else set()
        _remove_stale_partials(model_path, partials)
        if remote:
            _check_room(model_path, links)
        paths = []
        downloaded = resumed = 0
        for link in links:
            location = resolve(where, link["patch"])
            if remote:
                got = fetcher.download(location, partial_path(model_path, link["patch_blake3"]), link["patch_size"],
                                       link["patch_blake3"], progress)
                downloaded += got.received
                resumed += got.resumed_from
                paths.append(got.path)
            else:
                _check_patch_file(location, link)
                paths.append(location)
    _check_links(paths, links, current)
    if in_place:
        result = None
        for p in paths:
            result = apply_in_place(model_path, p, verify="full", key=key).blake3
    else:
        # verify="full": the result's file (or directory) digest is computed from what was written and checked
        # against the last patch's target, which _check_links proved is the manifest's target
        result = replace_model(model_path, paths, verify="full", key=key).blake3
    if result is None or not digests_equal(result, target["blake3"]):
        raise _target_mismatch(result or path_digest(model_path)[0], target["blake3"])
    for p in partials:
        with contextlib.suppress(OSError):
            os.unlink(p)
    return UpdateResult(model_path, True, current, result, names, total, downloaded_bytes=downloaded,
                        resumed_bytes=resumed, **info)


def _fetch_manifest(fetcher: Fetcher, location: str, key) -> tuple:
    """Fetch, open (checking the signature with ``key``) and validate the manifest. One fetched
    over the network that fails is fetched once more before it is refused: a byte damaged in
    transit, or a manifest replaced while it was read, is no reason to give up."""
    for again in (False, True) if is_url(location) else (True,):
        raw = fetcher.read_small(location, _MAX_ENVELOPE_SIZE)
        try:
            opened = _payload(raw, key, location)
            return opened, parse_manifest(opened.payload, source=location)
        except (PatchFormatError, IntegrityError):
            if again:
                raise
    raise AssertionError("unreachable")


def _check_links(paths: list[str], links: list[dict], current: str) -> None:
    """Each patch file is the link the manifest names: made for the right base, making the right
    target, with the right trailer (sizes and whole-file digests were checked before)."""
    for i, (p, link) in enumerate(zip(paths, links)):
        with read_patch(p) as patch:
            h = patch.header
            want_base = current if i == 0 else links[i - 1]["target_blake3"]
            if not digests_equal(h.base.blake3, want_base) or not digests_equal(h.base.blake3, link["base_blake3"]):
                raise IntegrityError(f"{p}: made for base {h.base.blake3}, expected {want_base}", what="patch base")
            if not digests_equal(h.target.blake3, link["target_blake3"]):
                raise IntegrityError(f"{p}: makes {h.target.blake3}, the manifest says {link['target_blake3']}",
                                     what="patch target")
            if not digests_equal(patch.trailer_hash, link["patch_trailer_blake3"]):
                raise IntegrityError(f"{p}: trailer BLAKE3 {patch.trailer_hash} does not match the manifest",
                                     what="patch trailer")


def _target_mismatch(result: str, want: str) -> IntegrityError:
    return IntegrityError(f"updated model has BLAKE3 {result}, the manifest's target is {want}",
                          what="target blake3", expected=want, actual=result)
