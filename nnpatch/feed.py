"""Trust in a release feed: the signed manifest envelope, times, and the device's update state.

The envelope (spec/MANIFEST.md, "Signature") is a DSSE v1 envelope
(github.com/secure-systems-lab/dsse): the manifest's exact bytes, base64, and
Ed25519 signatures over ``PAE(payloadType, bytes)``, where PAE is
``"DSSEv1" SP len(type) SP type SP len(bytes) SP bytes`` with the lengths in
ASCII decimal. The payload type doubles as the domain string: a signature of
a manifest can never pass for a patch signature, nor the other way round.
Keys are the Ed25519 keys ``nnpatch keygen`` makes.

The state file (SECURITY.md, "Release feeds") sits beside the model and keeps
what the device last accepted from a signed feed: its release number, its
target and the key id, so that an older release replayed, or a feed frozen
on one, is refused.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import json
import os
import re
import time
from dataclasses import dataclass

from ._json import loads_strict, read_bounded
from .atomic import atomic_write
from .errors import IntegrityError, MissingDependencyError, PatchFormatError, UsageError
from .hashing import digest_bytes, digests_equal
from .signing import key_id, load_private_key, load_public_key

PAYLOAD_TYPE = "application/vnd.nnpatch.release-manifest+json"
MAX_SIGNATURES = 16
STATE_SUFFIX = ".nnpatch-state"
STATE_FORMAT = "nnpatch-update-state"
STATE_VERSION = 1
MAX_STATE_SIZE = 64 << 10
#: The largest release number: every JSON reader holds it exactly (2^53 - 1).
MAX_RELEASE = (1 << 53) - 1
_TIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z$")
_DURATION = re.compile(r"^([0-9]{1,9})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


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


# --- the envelope -------------------------------------------------------------------------------

def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
    except ImportError as e:
        raise MissingDependencyError(
            "signatures need the 'cryptography' package: pip install 'nnpatch[sign]'") from e
    return serialization, InvalidSignature


def _raw(public) -> bytes:
    serialization, _ = _crypto()
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what a signature covers."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign_manifest(payload: bytes, private_key: str | os.PathLike[str]) -> tuple[bytes, str]:
    """The envelope (JSON bytes) holding ``payload`` signed by ``private_key``, and the key id."""
    key = load_private_key(os.fspath(private_key))
    kid = key_id(_raw(key.public_key()))
    sig = key.sign(pae(PAYLOAD_TYPE, payload))
    envelope = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode("ascii"),
                "signatures": [{"keyid": kid, "sig": base64.b64encode(sig).decode("ascii")}]}
    return (json.dumps(envelope, indent=2, sort_keys=True) + "\n").encode("ascii"), kid


@dataclass
class Opened:
    """A manifest's bytes, and what is known of its signature: ``signed`` (an envelope), and
    ``key_id`` only when a signature was checked against a key and verified."""

    payload: bytes
    signed: bool
    key_id: str | None = None


def _b64(value: object, what: str, source: str) -> bytes:
    if not isinstance(value, str):
        raise PatchFormatError(f"envelope: '{what}' is not a string", path=source)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PatchFormatError(f"envelope: '{what}' is not base64", path=source) from e


def is_envelope(obj: object) -> bool:
    return isinstance(obj, dict) and "payloadType" in obj and "signatures" in obj


def open_manifest(raw: bytes, *, public_key: str | os.PathLike[str] | None, source: str) -> Opened:
    """The manifest bytes in ``raw``: an envelope, or a plain (unsigned) manifest.

    With ``public_key``, the manifest must be an envelope with a signature by
    that key that verifies (else IntegrityError, exit 4). Without one an
    envelope is opened unchecked (say so to the user)."""
    try:
        obj = loads_strict(raw)
    except ValueError as e:
        raise PatchFormatError(f"invalid manifest JSON: {e}", path=source) from e
    if not is_envelope(obj):
        if public_key is not None:
            raise IntegrityError(f"{source}: the manifest is not signed (a key was given, so a signature is "
                                 "required)", what="signature")
        return Opened(raw, False)
    if obj.get("payloadType") != PAYLOAD_TYPE:
        raise PatchFormatError(f"envelope: payloadType must be {PAYLOAD_TYPE!r}", path=source)
    payload = _b64(obj.get("payload"), "payload", source)
    sigs = obj.get("signatures")
    if not isinstance(sigs, list) or not sigs or len(sigs) > MAX_SIGNATURES:
        raise PatchFormatError(f"envelope: 'signatures' must be a list of 1 to {MAX_SIGNATURES}", path=source)
    parsed = []
    for i, s in enumerate(sigs):
        if not isinstance(s, dict) or not isinstance(s.get("keyid", ""), str):
            raise PatchFormatError(f"envelope: signatures[{i}] is not an object with a string 'keyid'", path=source)
        parsed.append((s.get("keyid", ""), _b64(s.get("sig"), f"signatures[{i}].sig", source)))
    if public_key is None:
        return Opened(payload, True)
    _, InvalidSignature = _crypto()
    public = load_public_key(os.fspath(public_key))
    want = key_id(_raw(public))
    message = pae(PAYLOAD_TYPE, payload)
    # keyid is only a hint (DSSE): every signature of a matching or missing id is tried
    for kid, sig in parsed:
        if kid not in ("", want) or len(sig) != 64:
            continue
        try:
            public.verify(sig, message)
        except InvalidSignature:
            continue
        return Opened(payload, True, want)
    others = sorted({kid for kid, _ in parsed if kid and kid != want})
    why = f"signed by key {', '.join(others)}, expected key {want}" if others and not any(
        kid in ("", want) for kid, _ in parsed) else f"no signature verifies with key {want}"
    raise IntegrityError(f"{source}: manifest {why}", what="signature", expected=want)


# --- the device's state ----------------------------------------------------------------------------

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
    if not os.path.lexists(path):
        return None
    raw = read_bounded(path, MAX_STATE_SIZE)
    fix = "; it keeps the last release this device accepted: remove it only to trust the feed afresh"
    if len(raw) > MAX_STATE_SIZE:
        raise PatchFormatError(f"update state over {MAX_STATE_SIZE} bytes{fix}", path=path)
    try:
        obj = loads_strict(raw)
    except ValueError as e:
        raise PatchFormatError(f"update state is not valid JSON ({e}){fix}", path=path) from e
    ok = (isinstance(obj, dict) and obj.get("format") == STATE_FORMAT and obj.get("version") == STATE_VERSION
          and type(obj.get("release")) is int and 0 <= obj["release"] <= MAX_RELEASE
          and isinstance(obj.get("target_blake3"), str) and _HEX64.match(obj["target_blake3"])
          and isinstance(obj.get("manifest_blake3"), str) and _HEX64.match(obj["manifest_blake3"])
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


def check_fresh(manifest: dict, *, now: float, source: str) -> None:
    """Refuse an expired manifest (IntegrityError)."""
    expires = manifest.get("expires")
    if expires is not None and now >= parse_time(expires):
        raise IntegrityError(f"{source}: the manifest expired at {expires} (now {format_time(now)}); the feed is "
                             "stale or frozen", what="expires", expected=f"before {expires}", actual=format_time(now))


def check_not_older(manifest: dict, payload: bytes, state: State | None, *, source: str) -> None:
    """Refuse a signed manifest older than the one this device accepted, or one that claims the
    same release number for another target (IntegrityError)."""
    release = manifest.get("release")
    if release is None:
        raise IntegrityError(f"{source}: a signed manifest must carry a release number", what="release")
    if state is None:
        return
    if release < state.release:
        raise IntegrityError(f"{source}: release {release} is older than release {state.release}, which this "
                             "device already accepted (replayed or stale feed)", what="release",
                             expected=f">= {state.release}", actual=str(release))
    if release == state.release and not digests_equal(manifest["target"]["blake3"], state.target_blake3):
        raise IntegrityError(f"{source}: release {release} names another target than the release {release} this "
                             "device accepted", what="release")


def accepted_state(manifest: dict, payload: bytes, kid: str, *, now: float) -> State:
    return State(manifest["release"], manifest["target"]["blake3"], kid, digest_bytes(payload).hex(),
                 format_time(now), manifest.get("expires"))


__all__ = ["MAX_RELEASE", "PAYLOAD_TYPE", "STATE_SUFFIX", "Opened", "State", "accepted_state", "check_fresh",
           "check_not_older", "format_time", "is_envelope", "open_manifest", "pae", "parse_duration", "parse_time",
           "read_state", "sign_manifest", "state_path", "write_state"]
