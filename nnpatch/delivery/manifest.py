"""The release manifest (spec/MANIFEST.md; schema spec/json/release-manifest.schema.json):
its constants, its times, how one is validated (:func:`parse_manifest`) and encoded
(:func:`encode_manifest`, which refuses what an updater would refuse).

A manifest names a release's target and, for each old version (base), the
patch that leads from it and optionally a chain through later versions.
Its times are RFC 3339 UTC to the second; its release number is an integer
every JSON reader holds exactly.
"""

from __future__ import annotations

import calendar
import json
import re
import time

from .._json import load_object
from ..errors import PatchFormatError, UsageError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "nnpatch-release"
MANIFEST_VERSION = 1
MAX_MANIFEST_SIZE = 16 << 20
#: The longest chain a release records and an updater follows.
MAX_CHAIN_LINKS = 32
#: The largest release number: every JSON reader holds it exactly (2^53 - 1).
MAX_RELEASE = (1 << 53) - 1
HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: A patch's file name in a manifest: plain, so that it can never name another folder.
PATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
#: MANIFEST.md: "an http:// or https:// URL ending in /" (patch names are resolved against it).
BASE_URL = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?/$")
#: An http(s) URL of one file (the full model hosted elsewhere): no query, no fragment.
FILE_URL = re.compile(r"^https?://[^\s/?#]+/[^\s?#]*[^\s?#/]$")
#: A version's name (``target.name``, ``bases[i].name``), as MANIFEST.md gives it.
VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,93}$")
_TIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z$")
_DURATION = re.compile(r"^([0-9]{1,9})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# --- times ------------------------------------------------------------------------------------

def parse_duration(text: str) -> int:
    """Seconds in ``90d``, ``12h``, ``30m``, ``45s`` or ``2w``."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise UsageError(f"duration {text!r}: expected a positive number and a unit s, m, h, d or w (like 90d)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def format_time(seconds: float) -> str:
    """RFC 3339 UTC to the second: ``2025-01-31T12:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(seconds)))


def parse_time(text: object) -> int | None:
    """Seconds since the epoch of a ``YYYY-MM-DDTHH:MM:SSZ`` string; None when it is not one."""
    m = _TIME.match(text) if isinstance(text, str) else None
    if not m:
        return None
    y, mo, d, h, mi, s = map(int, m.groups())
    try:
        t = time.struct_time((y, mo, d, h, mi, s, 0, 0, 0))
        seconds = calendar.timegm(t)
    except (ValueError, OverflowError):
        return None
    return seconds if format_time(seconds) == text else None  # 2025-02-30 does not round-trip


# --- validating and encoding a manifest --------------------------------------------------------

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
    if not PATCH_NAME.match(name):
        raise PatchFormatError(f"{where}: patch file name {name!r} is not a plain file name", path=source)
    _req(obj, "patch_size", int, where, source)
    keys = ["patch_blake3", "patch_trailer_blake3"] + (["base_blake3", "target_blake3"] if inline_hashes else [])
    for k in keys:
        if not HEX64.match(_req(obj, k, str, where, source)):
            raise PatchFormatError(f"{where}: '{k}' is not 64 lowercase hex digits", path=source)


def parse_manifest(raw: bytes, *, source: str = MANIFEST_NAME) -> dict:
    """Validate a release manifest's bytes (structure, hex digests, plain patch names)."""
    try:
        m = load_object(raw, limit=MAX_MANIFEST_SIZE, what="manifest")
    except ValueError as e:
        raise PatchFormatError(str(e), path=source) from e
    if m.get("format") != MANIFEST_FORMAT:
        raise PatchFormatError(f"not an nnpatch release manifest (format must be {MANIFEST_FORMAT!r})", path=source)
    if m.get("version") != MANIFEST_VERSION:
        raise PatchFormatError(f"unsupported manifest version {m.get('version')!r}", path=source)
    t = _req(m, "target", dict, "manifest", source)
    for k in ("blake3", "model_blake3"):
        if not HEX64.match(_req(t, k, str, "target", source)):
            raise PatchFormatError(f"target: '{k}' is not 64 lowercase hex digits", path=source)
    _req(t, "size", int, "target", source)
    for i, b in enumerate(_req(m, "bases", list, "manifest", source)):
        where = f"bases[{i}]"
        if not isinstance(b, dict):
            raise PatchFormatError(f"{where}: not an object", path=source)
        if not HEX64.match(_req(b, "base_blake3", str, where, source)):
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
    if "base_url" in m and not (isinstance(m["base_url"], str) and BASE_URL.match(m["base_url"])):
        raise PatchFormatError("manifest: 'base_url' is not an http:// or https:// URL ending in '/'", path=source)
    for where, obj in [("target", t)] + [(f"bases[{i}]", b) for i, b in enumerate(m["bases"])]:
        if "name" in obj and not (isinstance(obj["name"], str) and VERSION_NAME.match(obj["name"])):
            raise PatchFormatError(f"{where}: 'name' must match {VERSION_NAME.pattern} (MANIFEST.md)", path=source)
    if "full" in m:
        _check_full(_req(m, "full", dict, "manifest", source), t, source)
    return m


def _check_full(full: dict, target: dict, source: str) -> None:
    """The full model a device falls back to: the target file itself, so its size and BLAKE3 are
    the target's; at a plain name (beside the patches) or an absolute http(s) URL."""
    url = _req(full, "url", str, "full", source)
    if not (PATCH_NAME.match(url) or FILE_URL.match(url)):
        raise PatchFormatError(f"full: url {url!r} is neither a plain file name nor an http(s) URL", path=source)
    if _req(full, "size", int, "full", source) != target["size"]:
        raise PatchFormatError("full: 'size' is not the target's size", path=source)
    if _req(full, "blake3", str, "full", source) != target["blake3"]:
        raise PatchFormatError("full: 'blake3' is not the target's BLAKE3", path=source)



def encode_manifest(manifest: dict) -> bytes:
    """The bytes of ``manifest`` as a publisher writes them; never what an updater would refuse."""
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    parse_manifest(raw)
    return raw


__all__ = ["BASE_URL", "FILE_URL", "HEX64", "VERSION_NAME", "MANIFEST_FORMAT", "MANIFEST_NAME", "MANIFEST_VERSION", "MAX_CHAIN_LINKS",
           "MAX_MANIFEST_SIZE", "MAX_RELEASE", "PATCH_NAME", "encode_manifest", "format_time", "parse_duration",
           "parse_manifest", "parse_time"]
