"""The device's update state (SECURITY.md, "Release feeds"): a file beside the model that keeps
what the device last accepted from a signed feed, its release number, its target and the key
id, so that an older release replayed, or a feed frozen on one, is refused
(:func:`nnpatch.delivery.trust.check_not_older`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .._json import load_object
from ..atomic import atomic_write
from ..errors import NnpatchIOError, PatchFormatError
from ..hashing import digest_bytes
from ..sidefile import open_beside
from .manifest import HEX64, MAX_RELEASE, format_time, parse_time

STATE_SUFFIX = ".nnpatch-state"
STATE_FORMAT = "nnpatch-update-state"
STATE_VERSION = 1
MAX_STATE_SIZE = 64 << 10
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


def state_path(model: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.fspath(model)) + STATE_SUFFIX


@dataclass
class State:
    """What the device last accepted from a signed feed."""

    release: int
    target_blake3: str
    key_id: str
    manifest_blake3: str
    accepted: str
    expires: str | None = None

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "release": self.release,
                "target_blake3": self.target_blake3, "key_id": self.key_id,
                "manifest_blake3": self.manifest_blake3, "accepted": self.accepted, "expires": self.expires}


def read_state(model: str | os.PathLike[str]) -> State | None:
    """The state beside ``model``, or None when there is none. A state file that is not one
    is refused (exit 3): ignoring it would undo the rollback defence."""
    path = state_path(model)
    fix = "; it keeps the last release this device accepted: remove it only to trust the feed afresh"
    # not followed if a symlink, not waited on if a FIFO, not trusted if another user's or a hard link
    fd = open_beside(path, write=False, create=False, refuse=PatchFormatError, what="update state")
    if fd is None:
        return None
    try:
        raw = os.read(fd, MAX_STATE_SIZE + 1)
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot read the update state: {e.strerror or e}") from e
    finally:
        os.close(fd)
    try:
        obj = load_object(raw, limit=MAX_STATE_SIZE, what="update state")
    except ValueError as e:
        raise PatchFormatError(f"{e}{fix}", path=path) from e
    ok = (obj.get("format") == STATE_FORMAT and obj.get("version") == STATE_VERSION
          and type(obj.get("release")) is int and 0 <= obj["release"] <= MAX_RELEASE
          and isinstance(obj.get("target_blake3"), str) and HEX64.match(obj["target_blake3"])
          and isinstance(obj.get("manifest_blake3"), str) and HEX64.match(obj["manifest_blake3"])
          and isinstance(obj.get("key_id"), str) and _KEY_ID.match(obj["key_id"])
          and parse_time(obj.get("accepted")) is not None
          and (obj.get("expires") is None or parse_time(obj.get("expires")) is not None))
    if not ok:
        raise PatchFormatError(f"not an nnpatch update state{fix}", path=path)
    return State(obj["release"], obj["target_blake3"], obj["key_id"], obj["manifest_blake3"], obj["accepted"],
                 obj.get("expires"))


def write_state(model: str | os.PathLike[str], state: State) -> None:
    with atomic_write(state_path(model)) as f:
        f.write((json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n").encode("ascii"))


def accepted_state(manifest: dict, payload: bytes, kid: str, *, now: float) -> State:
    return State(manifest["release"], manifest["target"]["blake3"], kid, digest_bytes(payload).hex(),
                 format_time(now), manifest.get("expires"))



__all__ = ["STATE_SUFFIX", "State", "accepted_state", "read_state", "state_path", "write_state"]
