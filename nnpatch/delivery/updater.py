"""The device's updater: bring a model to a release's target, checked by hash (and signature).

``update`` reads the manifest from a path or a URL; with ``key`` it must be
signed by that key, unexpired, and no older than the last one this device
accepted (the state file beside the model, :mod:`nnpatch.delivery.state`).
It hashes the local model, finds its entry, fetches the patches (resuming
interrupted downloads, :mod:`nnpatch.delivery.fetch`), checks the size and
BLAKE3 of every patch file it will use against the manifest *before*
applying, builds the new version beside the model (or, ``in_place``, behind
the undo journal), proves its BLAKE3 against the manifest's target, and only
then commits it: the model is the old version or the verified new one, never
anything else. (A chain applied ``in_place`` commits link by link: a crash or
a full disk between links leaves the model at an intermediate version of the
manifest, a known and verified one, from which the next ``update`` continues.)

A model directory (format 1.1 targets) is identified by its directory
digest (spec/FORMAT.md, section 8) and the total size of its files; the new
directory is built beside the old one, checked, and swapped in atomically
(``nnpatch.applier.directory``).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..applier import apply_in_place, recover, replace_model
from ..atomic import amount, free_space, fsync_dir
from ..errors import IntegrityError, NnpatchIOError, NoUpdatePathError, PatchFormatError, UsageError
from ..hashing import digests_equal, hash_file
from ..patchfile import read_patch
from ..sidefile import interrupted, journal_path, open_beside, same_file
from ..signing import TrustedKey, authenticator
from ..weights.source import path_digest
from .fetch import FetchOptions, Fetcher, is_url, parent, resolve
from .manifest import MAX_CHAIN_LINKS, parse_manifest
from .state import accepted_state, read_state, state_path, write_state
from .trust import MAX_ENVELOPE_SIZE, check_fresh, check_not_older, open_manifest

PARTIAL_SUFFIX = ".nnpatch-part"


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
    #: ``"new-file"``, ``"in-place"`` or ``"full"`` (the whole target downloaded: no patch led from the model)
    mode: str = "new-file"
    #: in place although not asked for: only that fits the free space beside the model
    in_place_for_room: bool = False
    #: an interrupted in-place update was rolled back first (its journal lay beside the model)
    recovered: bool = False

    def to_json(self) -> dict:
        return {"ok": True, "path": self.path, "status": self.status, "updated": self.updated,
                "from_blake3": self.from_blake3, "to_blake3": self.to_blake3, "from_name": self.from_name,
                "to_name": self.to_name, "release": self.release, "expires": self.expires, "signed": self.signed,
                "key_id": self.key_id, "patches": self.patches, "patch_bytes": self.patch_bytes,
                "downloaded_bytes": self.downloaded_bytes, "resumed_bytes": self.resumed_bytes,
                "in_place": self.in_place, "dry_run": self.dry_run, "mode": self.mode,
                "in_place_for_room": self.in_place_for_room, "recovered": self.recovered}


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


def _download_need(model: str, links: list[dict]) -> int:
    """Bytes still to download beside the model: what the partial files do not hold yet."""
    return sum(max(0, link["patch_size"] - _size_or_zero(partial_path(model, link["patch_blake3"])))
               for link in links)


def _choose_in_place(model: str, in_place: bool | None, download: int, target_size: int,
                     free: int | None) -> tuple[bool, bool]:
    """(apply in place, because only that fits). A new file needs the downloads and a whole copy
    of the target beside the model; in place needs the downloads (and the journal: the old bytes of
    what changes, refused cleanly while it is written if even that does not fit). ``in_place``
    None chooses: a new file when it fits, else in place. ``free`` was measured before this update
    wrote anything."""
    directory = os.path.isdir(model)
    new_file, only_patches = download + target_size, download
    if free is None:  # the free space cannot be told: do as asked, the writes themselves will say
        return bool(in_place), False
    if in_place:
        if only_patches > free:
            raise NnpatchIOError(f"{model}: the patches need about {amount(only_patches)} beside the model, "
                                 f"{amount(free)} were free")
        return True, False
    if new_file <= free:
        return False, False
    hint = ""
    if in_place is None and not directory and only_patches <= free:
        return True, True
    if in_place is False and not directory and only_patches <= free:
        hint = f"; in place (--in-place) needs only about {amount(only_patches)}"
    raise NnpatchIOError(f"{model}: a new copy beside the model needs about {amount(new_file)} (the patches and "
                         f"the new version), {amount(free)} were free{hint}")


@contextlib.contextmanager
def _refused_downloads_removed(partials: set[str]):
    """Remove this update's downloads when their content is refused (a signature, size, digest,
    trailer or target the manifest does not give, a patch that does not apply): such a file can
    never resume a download the manifest still trusts. A network or disk error, or an interrupted
    run, keeps them for the next run to continue (SECURITY.md, "Release feeds")."""
    try:
        yield
    except (IntegrityError, PatchFormatError):
        for p in partials:
            with contextlib.suppress(OSError):
                os.unlink(p)
        raise


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
           key: TrustedKey | str | os.PathLike[str] | None = None, in_place: bool | None = None,
           dry_run: bool = False, fallback: str = "none", fetch: FetchOptions | None = None,
           now: float | None = None, progress: Callable[[int], None] | None = None) -> UpdateResult:
    """Bring ``model_path`` to the manifest's target version, in place.

    ``manifest_path`` is a path or an ``http://``/``https://`` URL. Patch
    files are looked up in ``patch_dir``, else at the manifest's
    ``base_url``, else beside the manifest; those at URLs are downloaded
    beside the model (resumably: :func:`partial_path`).
    ``prefer="direct"`` uses the direct patch; ``"smallest"`` the entry's
    chain when it has one and it is smaller; ``"chain"`` the chain whenever
    the entry has one.

    ``key`` (an Ed25519 public key: a TrustedKey or its PEM file, read once): the manifest and every patch must
    be signed by it, the manifest must carry a release number no older than
    the one this device last accepted (kept in the state file beside the
    model, :func:`nnpatch.delivery.state.state_path`), and it must not have expired.
    A device that once accepted a signed feed refuses to update without a
    key. An in-place update of the model that was interrupted (its undo journal
    lies beside it) is rolled back first (``UpdateResult.recovered``), so the
    same command run again continues it. ``in_place``: True applies behind the undo journal instead of
    building a second copy; False never does; None (the default) builds a
    second copy when the file system has room for it and otherwise applies
    in place (``UpdateResult.in_place_for_room`` says so). ``dry_run``:
    decide (the mode included, against the free space), report, and fetch,
    write or download nothing but the manifest. ``fallback="full"``: when no
    patch leads from the model's version and the manifest lists the full
    target (``full``), download it (resumable, size and BLAKE3 checked) and
    swap it in atomically.

    Raises :class:`~nnpatch.errors.NoUpdatePathError` (exit 7) when no
    patch leads from this model's version; IntegrityError (4) for every
    refused signature, release, expiry or digest; NnpatchIOError (5) for
    network and file errors.

    The result is always proven in full, by its file (or directory) digest
    against the manifest's target: there is no weaker verify mode to choose.
    """
    if prefer not in ("direct", "smallest", "chain"):
        raise UsageError(f"prefer must be direct, smallest or chain, got {prefer!r}")
    if fallback not in ("none", "full"):
        raise UsageError(f"fallback must be none or full, got {fallback!r}")
    model_path = os.fspath(model_path)
    manifest_path = os.fspath(manifest_path)
    now = time.time() if now is None else now
    if not os.path.exists(model_path):
        raise NnpatchIOError(f"{model_path}: no such file or directory")
    recovered = _recover_first(model_path, dry_run)
    free = free_space(os.path.dirname(os.path.abspath(model_path)))  # before this update writes anything
    state = read_state(model_path)
    if state is not None and key is None:
        raise IntegrityError(f"{model_path}: this device follows a signed feed (key {state.key_id}, release "
                             f"{state.release}, {state_path(model_path)}); pass --key to update it",
                             what="signature", expected=state.key_id)
    if key is not None:  # read once, for the manifest and every patch
        key = TrustedKey.of(key)
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
                "key_id": opened.key_id, "in_place": bool(in_place), "dry_run": dry_run,
                "expires": manifest.get("expires"), "recovered": recovered}
        if digests_equal(current, target["blake3"]):
            return UpdateResult(model_path, False, current, current, status="current", from_name=target.get("name"),
                                **info)
        entry = next((b for b in manifest["bases"] if digests_equal(b["base_blake3"], current)), None)
        if entry is None:
            if fallback == "full" and "full" in manifest:
                where = _patch_location(manifest, manifest_path, patch_dir)
                return _fall_back_to_full(fetcher, model_path, manifest["full"], where, current, free, dry_run,
                                          progress, info)
            listed = (" and the manifest lists no full model" if fallback == "full" else
                      "; --fallback full downloads it" if "full" in manifest else "")
            raise NoUpdatePathError(f"no patch for this model version (BLAKE3 {current}) in {manifest_path}: "
                                    f"a full download is needed{listed}", path=model_path)
        if size != entry["base_size"]:
            raise IntegrityError(f"{model_path}: {size} bytes, the manifest says {entry['base_size']} for BLAKE3 "
                                 f"{current}", what="base size")
        links = _choose_links(entry, target, prefer, current)
        if not digests_equal(links[-1]["target_blake3"], target["blake3"]):
            raise IntegrityError("the manifest's patches do not lead to its target", what="manifest")
        info["from_name"] = entry.get("name")
        names = [link["patch"] for link in links]
        total = sum(link["patch_size"] for link in links)
        where = _patch_location(manifest, manifest_path, patch_dir)
        remote = is_url(where)
        in_place, for_room = _choose_in_place(model_path, in_place, _download_need(model_path, links) if remote else 0,
                                              target["size"], free)
        info.update(in_place=in_place, in_place_for_room=for_room, mode="in-place" if in_place else "new-file")
        if dry_run:
            return UpdateResult(model_path, False, current, target["blake3"], names, total, status="would-update",
                                **info)
        partials = {partial_path(model_path, link["patch_blake3"]) for link in links} if remote else set()
        _remove_stale_partials(model_path, partials)
        paths = []
        downloaded = resumed = 0
        with _refused_downloads_removed(partials):
            for link in links:
                location = resolve(where, link["patch"])
                if remote:
                    got = fetcher.download(location, partial_path(model_path, link["patch_blake3"]),
                                           link["patch_size"], link["patch_blake3"], progress)
                    downloaded += got.received
                    resumed += got.resumed_from
                    paths.append(got.path)
                else:
                    _check_patch_file(location, link)
                    paths.append(location)
    with _refused_downloads_removed(partials):
        _check_links(paths, links, current, key)
        if in_place:
            for p in paths:  # never empty: a manifest's chain has at least one link
                result = apply_in_place(model_path, p, verify="full", key=key).blake3
        else:
            # the result's file (or directory) digest is computed from what was written and checked against the
            # last patch's target, which _check_links proved is the manifest's target
            result = replace_model(model_path, paths, verify="full", key=key).blake3
        if not digests_equal(result, target["blake3"]):
            raise _target_mismatch(result, target["blake3"])
    for p in partials:
        with contextlib.suppress(OSError):
            os.unlink(p)
    return UpdateResult(model_path, True, current, result, names, total, downloaded_bytes=downloaded,
                        resumed_bytes=resumed, **info)


def _recover_first(model: str, dry_run: bool) -> bool:
    """An in-place update of ``model`` that was killed leaves its undo journal beside it, and the
    model half-written: neither version's digest, so no manifest entry would match it. Roll it
    back to the version it was (spec/JOURNAL.md) before anything else; True when that was done.
    A dry run changes nothing, so it refuses instead."""
    if not interrupted(model):
        return False
    if dry_run:
        raise IntegrityError(f"{model}: an in-place update of it was interrupted (undo journal "
                             f"{journal_path(model)}); update without --dry-run recovers it first, or run "
                             f"`nnpatch recover {model}`", what="journal")
    recover(model)
    return True


def _patch_location(manifest: dict, manifest_path: str, patch_dir) -> str:
    """Where the release's files are: ``patch_dir``, else the manifest's base_url, else beside it."""
    if patch_dir is not None:
        return os.fspath(patch_dir)
    return manifest.get("base_url") or parent(manifest_path)


def _fall_back_to_full(fetcher: Fetcher, model: str, full: dict, where: str, current: str, free: int | None,
                       dry_run: bool, progress, info: dict) -> UpdateResult:
    """No patch leads from the model's version: fetch the whole target the manifest lists (its
    size and BLAKE3 are the target's, checked as a patch's are) and rename it over the model."""
    if os.path.isdir(model):
        raise NoUpdatePathError(f"{model}: no patch leads from this model directory's version, and a full "
                                "download replaces a model file only", path=model)
    location = full["url"] if is_url(full["url"]) else resolve(where, full["url"])
    partial = partial_path(model, full["blake3"])
    need = max(0, full["size"] - _size_or_zero(partial))
    if free is not None and need > free:
        raise NnpatchIOError(f"{model}: the full model needs about {amount(need)} beside it, {amount(free)} were free")
    info.update(in_place=False, in_place_for_room=False, mode="full")
    name = os.path.basename(full["url"].rstrip("/")) or full["url"]
    if dry_run:
        return UpdateResult(model, False, current, full["blake3"], [name], full["size"], status="would-update", **info)
    _remove_stale_partials(model, {partial})
    downloaded = resumed = 0
    if is_url(location):
        got = fetcher.download(location, partial, full["size"], full["blake3"], progress)
        downloaded, resumed = got.received, got.resumed_from
    else:
        _copy_beside(location, partial)
        with _refused_downloads_removed({partial}):  # the copy is what is committed: it is the one checked
            _check_patch_file(partial, {"patch_size": full["size"], "patch_blake3": full["blake3"]})
    _commit_file(partial, model)
    return UpdateResult(model, True, current, full["blake3"], [name], full["size"], downloaded_bytes=downloaded,
                        resumed_bytes=resumed, **info)


def _copy_beside(source: str, partial: str) -> None:
    """Copy a local full model into its partial file beside the model, opened as every file there
    is (never through a link planted under its name: nnpatch.sidefile)."""
    fd = open_beside(partial, write=True, create=True, what="partial download")
    try:
        os.ftruncate(fd, 0)
        with open(source, "rb") as src:
            while piece := src.read(1 << 20):
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
    except OSError as e:
        raise NnpatchIOError(f"{partial}: cannot write the full model: {e.strerror or e}") from e
    finally:
        os.close(fd)


def _commit_file(done: str, model: str) -> None:
    """Rename a finished, proven file over the model (same folder: atomic), keeping the model's mode."""
    fd = open_beside(done, write=False, create=False, refuse=NnpatchIOError, what="full download")
    if fd is None:
        raise NnpatchIOError(f"{done}: the full download vanished before it was committed")
    try:
        with contextlib.suppress(OSError):
            os.fchmod(fd, stat.S_IMODE(os.stat(model).st_mode))
        os.fsync(fd)
        if not same_file(done, fd):  # the name must still be the file that was proven
            raise NnpatchIOError(f"{done}: the full download was replaced before it was committed")
    finally:
        os.close(fd)
    os.replace(done, model)
    fsync_dir(os.path.dirname(os.path.abspath(model)))


def _fetch_manifest(fetcher: Fetcher, location: str, key) -> tuple:
    """Fetch, open (checking the signature with ``key``) and validate the manifest. One fetched
    over the network that fails is fetched once more before it is refused: a byte damaged in
    transit, or a manifest replaced while it was read, is no reason to give up."""
    for again in (False, True) if is_url(location) else (True,):
        raw = fetcher.read_small(location, MAX_ENVELOPE_SIZE)
        try:
            opened = open_manifest(raw, public_key=key, source=location)
            return opened, parse_manifest(opened.payload, source=location)
        except (PatchFormatError, IntegrityError):
            if again:
                raise
    raise AssertionError("unreachable")


def _check_links(paths: list[str], links: list[dict], current: str, key: TrustedKey | None) -> None:
    """Each patch file is the link the manifest names: made for the right base, making the right
    target, with the right trailer (sizes and whole-file digests were checked before). With ``key``,
    each is signed by it, checked before its header is expanded (as every path does)."""
    authenticate = authenticator(key) if key is not None else None
    for i, (p, link) in enumerate(zip(paths, links)):
        with read_patch(p, authenticate=authenticate) as patch:
            h = patch.header
            want_base = current if i == 0 else links[i - 1]["target_blake3"]
            if not digests_equal(h.base.blake3, want_base) or not digests_equal(h.base.blake3, link["base_blake3"]):
                raise IntegrityError(f"{p}: made for base {h.base.blake3}, expected {want_base}", what="patch base")
            if not digests_equal(h.target.file_blake3, link["target_blake3"]):
                raise IntegrityError(f"{p}: makes {h.target.file_blake3}, the manifest says {link['target_blake3']}",
                                     what="patch target")
            if not digests_equal(patch.trailer_hash, link["patch_trailer_blake3"]):
                raise IntegrityError(f"{p}: trailer BLAKE3 {patch.trailer_hash} does not match the manifest",
                                     what="patch trailer")


def _target_mismatch(result: str, want: str) -> IntegrityError:
    return IntegrityError(f"updated model has BLAKE3 {result}, the manifest's target is {want}",
                          what="target blake3", expected=want, actual=result)

__all__ = ["PARTIAL_SUFFIX", "UpdateResult", "partial_path", "update"]
