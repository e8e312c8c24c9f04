"""Release sets: one patch from every old version to the new one, and a manifest
an updater reads to pick, check and apply the right one.

    nnpatch release v1.safetensors v2.safetensors v3.safetensors --to v4.safetensors -o dist/
    nnpatch update model.safetensors --manifest dist/manifest.json

``make_release`` writes ``<old>-to-<new>.nnpatch`` for each old version (old
versions given oldest first; names are the files' stems, or hash prefixes
when stems collide or are not plain ``[A-Za-z0-9._-]``), the patches between
consecutive old versions, and ``manifest.json`` (schema:
spec/json/release-manifest.schema.json, documented in docs/WORKFLOWS.md).
For each old version whose chain of consecutive patches
(v1 -> v2 -> ... -> new) totals fewer bytes than its direct patch, the entry
records that ``chain``; consecutive patches no chain uses are not kept.

``update`` hashes the local model, finds its entry, checks the size and
BLAKE3 of every patch file it will use against the manifest *before*
applying, applies into a temporary file beside the model, checks that file's
BLAKE3 against the manifest's target, and only then renames it over the
model: the model file is the old version or the verified new one, never
anything else.

Versions may also be Hugging Face model directories (format 1.1 targets):
a directory is identified by its directory digest (spec/FORMAT.md, section
8) and the total size of its files; ``update`` builds the new directory
beside the old one, checks its directory digest, and swaps it in atomically
(``nnpatch.applier.directory``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from . import __version__
from ._json import loads_strict, read_bounded
from .atomic import atomic_write
from .errors import IntegrityError, NnpatchIOError, NoPatchError, PatchFormatError, UsageError
from .applier import replace_model
from .differ import diff
from .hashing import digests_equal, hash_file, model_digest
from .patchfile import read_patch
from .weights.source import open_source, path_digest

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "nnpatch-release"
MANIFEST_VERSION = 1
MAX_MANIFEST_SIZE = 16 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_PATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


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
                 level: int | None = None, chain: str = "auto") -> dict:
    """Write the patches and ``manifest.json`` into ``outdir``; return the manifest.

    ``olds`` are the versions users may have, oldest first. ``chain``:
    ``"auto"`` records a chain where it is smaller than the direct patch,
    ``"always"`` for every old version with a chain of two links or more,
    ``"never"`` makes no consecutive patches at all.
    """

    if chain not in ("auto", "always", "never"):
        raise UsageError(f"chain must be auto, always or never, got {chain!r}")
    if not olds:
        raise UsageError("release needs at least one old version")
    outdir = os.fspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    diff_kw = {} if level is None else {"level": level}

    def version(p) -> _Version:
        p = os.fspath(p)
        if not (os.path.isfile(p) or os.path.isdir(p)):
            raise UsageError(f"{p}: not a file or model directory")
        return _Version(p, _stem(p), *path_digest(p))

    target = version(new)
    versions: list[_Version] = []
    seen = {target.blake3}
    for p in olds:
        v = version(p)
        if v.blake3 in seen:
            continue  # the new version itself, or a duplicate: nothing to patch
        seen.add(v.blake3)
        versions.append(v)
    stems = [v.name for v in versions] + [target.name]
    by_stem = len(set(stems)) == len(stems) and all(_SAFE_STEM.match(s) for s in stems)
    if not by_stem:
        for v in versions + [target]:
            v.name = v.blake3[:16]

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
            if chain == "always" or total < d["patch_size"]:
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
        "target": {"name": target.name, "blake3": target.blake3, "size": target.size, "model_blake3": target_model},
        "bases": bases,
    }
    with atomic_write(os.path.join(outdir, MANIFEST_NAME)) as f:
        f.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
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
    return m


def load_manifest(path: str | os.PathLike[str]) -> dict:
    path = os.fspath(path)
    return parse_manifest(read_bounded(path, MAX_MANIFEST_SIZE), source=path)


# --- update ------------------------------------------------------------------------------

@dataclass
class UpdateResult:
    path: str
    updated: bool  # False: the model already was the target
    from_blake3: str
    to_blake3: str
    patches: list[str] = field(default_factory=list)
    patch_bytes: int = 0


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


def update(model_path: str | os.PathLike[str], manifest_path: str | os.PathLike[str], *,
           patch_dir: str | os.PathLike[str] | None = None, prefer: str = "direct",
           verify: str = "default") -> UpdateResult:
    """Bring ``model_path`` to the manifest's target version, in place.

    Patch files are looked up in ``patch_dir`` (default: the manifest's
    directory). ``prefer="direct"`` uses the direct patch; ``"smallest"``
    the entry's chain when it has one and it is smaller; ``"chain"`` the
    chain whenever the entry has one.

    The result is always proven in full, by its file (or directory) digest
    against the manifest's target; ``verify`` is accepted for compatibility
    and changes nothing.
    """
    if prefer not in ("direct", "smallest", "chain"):
        raise UsageError(f"prefer must be direct, smallest or chain, got {prefer!r}")
    model_path = os.fspath(model_path)
    manifest_path = os.fspath(manifest_path)
    manifest = load_manifest(manifest_path)
    patch_dir = os.fspath(patch_dir) if patch_dir is not None else (os.path.dirname(manifest_path) or ".")
    target = manifest["target"]
    current, size = path_digest(model_path)
    if digests_equal(current, target["blake3"]):
        return UpdateResult(model_path, False, current, current)
    entry = next((b for b in manifest["bases"] if digests_equal(b["base_blake3"], current)), None)
    if entry is None:
        raise NoPatchError(f"no patch for this model version (BLAKE3 {current}) in {manifest_path}",
                           path=model_path)
    if size != entry["base_size"]:
        raise IntegrityError(f"{model_path}: {size} bytes, the manifest says {entry['base_size']} for BLAKE3 "
                             f"{current}", what="base size")
    if "chain" in entry and (prefer == "chain" or (prefer == "smallest"
                                                   and entry["chain"]["size"] < entry["patch_size"])):
        links = entry["chain"]["links"]
    else:
        links = [dict(entry, base_blake3=current, target_blake3=target["blake3"])]
    paths = []
    for i, link in enumerate(links):
        p = os.path.join(patch_dir, link["patch"])
        _check_patch_file(p, link)
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
        paths.append(p)
    if not digests_equal(links[-1]["target_blake3"], target["blake3"]):
        raise IntegrityError("the manifest's patches do not lead to its target", what="manifest")
    # verify="full": the result's file (or directory) digest is computed from what was written and checked
    # against the last patch's target, which the loop above proved is the manifest's target
    result = replace_model(model_path, paths, verify="full").blake3
    if not digests_equal(result, target["blake3"]):
        raise _target_mismatch(result, target["blake3"])
    return UpdateResult(model_path, True, current, result, [os.path.basename(p) for p in paths],
                        sum(link["patch_size"] for link in links))


def _target_mismatch(result: str, want: str) -> IntegrityError:
    return IntegrityError(f"updated model has BLAKE3 {result}, the manifest's target is {want}",
                          what="target blake3", expected=want, actual=result)

