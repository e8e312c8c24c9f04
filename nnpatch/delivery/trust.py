"""Trust in a release feed: the signed manifest envelope, its expiry, and its release number
against the device's state.

The envelope (spec/MANIFEST.md, "Signature") is a DSSE v1 envelope
(github.com/secure-systems-lab/dsse): the manifest's exact bytes, base64, and
Ed25519 signatures over ``PAE(payloadType, bytes)``, where PAE is
``"DSSEv1" SP len(type) SP type SP len(bytes) SP bytes`` with the lengths in
ASCII decimal. The payload type doubles as the domain string: a signature of
a manifest can never pass for a patch signature, nor the other way round.
Keys are the Ed25519 keys ``nnpatch keygen`` makes, checked by
:class:`nnpatch.signing.TrustedKey`, as patch signatures are.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass

from .._json import load_object, read_bounded
from ..errors import IntegrityError, PatchFormatError
from ..hashing import digests_equal
from ..signing import TrustedKey, load_private_key
from .manifest import MAX_MANIFEST_SIZE, format_time, parse_manifest, parse_time
from .state import State

PAYLOAD_TYPE = "application/vnd.nnpatch.release-manifest+json"
MAX_SIGNATURES = 16
#: An envelope carries the manifest in base64 (4 bytes for 3) plus its signatures.
MAX_ENVELOPE_SIZE = MAX_MANIFEST_SIZE * 4 // 3 + (64 << 10)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what a signature covers."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign_manifest(payload: bytes, private_key: str | os.PathLike[str]) -> tuple[bytes, str]:
    """The envelope (JSON bytes) holding ``payload`` signed by ``private_key``, and the key id."""
    key = load_private_key(os.fspath(private_key))
    kid = TrustedKey(key.public_key()).key_id
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


def _b64(value: object, what: str, source: str | None) -> bytes:
    if not isinstance(value, str):
        raise PatchFormatError(f"envelope: '{what}' is not a string", path=source)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PatchFormatError(f"envelope: '{what}' is not base64", path=source) from e


def _envelope(obj: dict, source: str | None) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The payload and the (keyid, signature) pairs of an envelope, each checked for form."""
    if obj.get("payloadType") != PAYLOAD_TYPE:
        raise PatchFormatError(f"envelope: payloadType must be {PAYLOAD_TYPE!r}", path=source)
    payload = _b64(obj.get("payload"), "payload", source)
    if len(payload) > MAX_MANIFEST_SIZE:
        raise PatchFormatError(f"envelope: the payload exceeds the {MAX_MANIFEST_SIZE}-byte manifest limit",
                               path=source)
    sigs = obj.get("signatures")
    if not isinstance(sigs, list) or not sigs or len(sigs) > MAX_SIGNATURES:
        raise PatchFormatError(f"envelope: 'signatures' must be a list of 1 to {MAX_SIGNATURES}", path=source)
    parsed = []
    for i, s in enumerate(sigs):
        if not isinstance(s, dict) or not isinstance(s.get("keyid", ""), str):
            raise PatchFormatError(f"envelope: signatures[{i}] is not an object with a string 'keyid'", path=source)
        parsed.append((s.get("keyid", ""), _b64(s.get("sig"), f"signatures[{i}].sig", source)))
    return payload, parsed


def is_envelope(obj: object) -> bool:
    return isinstance(obj, dict) and "payloadType" in obj and "signatures" in obj


def open_manifest(raw: bytes, *, public_key: TrustedKey | str | os.PathLike[str] | None, source: str) -> Opened:
    """The manifest bytes in ``raw``: an envelope, or a plain (unsigned) manifest.

    With ``public_key`` (a TrustedKey, or its PEM file), the manifest must be an
    envelope with a signature by that key that verifies (else IntegrityError,
    exit 4). Without one an envelope is opened unchecked (say so to the user)."""
    try:
        # the one JSON string allowed past MAX_JSON_STRING: the envelope's payload, the whole manifest
        # in base64, bounded by the envelope's own size (SECURITY.md, "Limits")
        obj = load_object(raw, limit=MAX_ENVELOPE_SIZE, what="manifest", max_string=MAX_ENVELOPE_SIZE)
    except ValueError as e:
        raise PatchFormatError(str(e), path=source) from e
    if not is_envelope(obj):
        if public_key is not None:
            raise IntegrityError(f"{source}: the manifest is not signed (a key was given, so a signature is "
                                 "required)", what="signature")
        return Opened(raw, False)
    try:
        payload, parsed = _envelope(obj, None)
    except PatchFormatError as e:
        if public_key is None:
            raise PatchFormatError(e.message, path=source) from None
        # MANIFEST.md step 2: with a trusted key, anything but an envelope signed by it is refused (exit 4)
        raise IntegrityError(f"{source}: the manifest is not signed by the key ({e.message})",
                             what="signature") from None
    if public_key is None:
        return Opened(payload, True)
    public = TrustedKey.of(public_key)
    want = public.key_id
    message = pae(PAYLOAD_TYPE, payload)
    # keyid is only a hint (DSSE): every signature of a matching or missing id is tried
    for kid, sig in parsed:
        if kid not in ("", want) or len(sig) != 64:
            continue
        if public.verifies(sig, message):
            return Opened(payload, True, want)
    others = sorted({kid for kid, _ in parsed if kid and kid != want})
    why = f"signed by key {', '.join(others)}, expected key {want}" if others and not any(
        kid in ("", want) for kid, _ in parsed) else f"no signature verifies with key {want}"
    raise IntegrityError(f"{source}: manifest {why}", what="signature", expected=want)


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


def load_manifest(path: str | os.PathLike[str], *, key: TrustedKey | str | os.PathLike[str] | None = None) -> dict:
    """The manifest in ``path`` (plain, or a signed envelope: with ``key``, checked against it)."""
    path = os.fspath(path)
    raw = read_bounded(path, MAX_ENVELOPE_SIZE)
    return parse_manifest(open_manifest(raw, public_key=key, source=path).payload, source=path)


__all__ = ["MAX_ENVELOPE_SIZE", "PAYLOAD_TYPE", "Opened", "check_fresh", "check_not_older", "is_envelope",
           "load_manifest", "open_manifest", "pae", "sign_manifest"]
