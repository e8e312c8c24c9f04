"""Ed25519 signatures of patches (spec/FORMAT.md, "Signatures").

The trailer hash proves a patch is intact, not who made it. A signed patch
sets flag bit 0 and ends with a 96-byte block after the trailer: the signer's
raw Ed25519 public key (32 bytes) and its signature (64 bytes) over
``b"nnpatch-signature-v1\\x00" + trailer_hash``. Since the trailer covers every
byte before it, the signature covers the whole patch.

Uses the ``cryptography`` package (``pip install 'nnpatch[sign]'``), a
well-kept binding to OpenSSL's Ed25519: hand-written curve code has no place
in a security feature.
"""

from __future__ import annotations

import hmac
import os

import blake3

from .atomic import atomic_write
from .errors import IntegrityError, MissingDependencyError, NnpatchIOError, PatchFormatError, UsageError
from .patchfile import FLAG_SIGNED, PREAMBLE, PREAMBLE_SIZE, SIGNATURE_BLOCK_SIZE, TRAILER_SIZE, read_patch

SIGNATURE_DOMAIN = b"nnpatch-signature-v1\x00"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise MissingDependencyError(
            "signatures need the 'cryptography' package: pip install 'nnpatch[sign]'") from e
    return ed25519, serialization, InvalidSignature


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot read: {e.strerror or e}") from e


def generate_keypair(private_path: str, public_path: str) -> str:
    """Write a new private key (PEM, mode 0600) and its public key; return the key id."""
    ed25519, serialization, _ = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public = key.public_key()
    public_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for path in (private_path, public_path):
        if os.path.exists(path):
            raise UsageError(f"{path}: already exists; not overwriting a key")
    with atomic_write(private_path, mode=0o600) as f:
        f.write(private_pem)
    with atomic_write(public_path) as f:
        f.write(public_pem)
    return key_id(_raw_public(public))


def _raw_public(public) -> bytes:
    _, serialization, _ = _crypto()
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(raw_public: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its BLAKE3."""
    return blake3.blake3(raw_public).hexdigest()[:16]


def load_private_key(path: str):
    ed25519, serialization, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as e:
        raise PatchFormatError(f"not an unencrypted PEM private key ({e})", path=path) from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PatchFormatError("not an Ed25519 private key", path=path)
    return key


def load_public_key(path: str):
    ed25519, serialization, _ = _crypto()
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        try:  # a private key file also names its public key
            return load_private_key(path).public_key()
        except PatchFormatError:
            raise PatchFormatError("not a PEM Ed25519 public key", path=path) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise PatchFormatError("not an Ed25519 public key", path=path)
    return key


def signer_from_file(private_path: str):
    """A ``signer(trailer_digest) -> (public_key, signature)`` for PatchWriter.finish."""
    key = load_private_key(private_path)
    raw = _raw_public(key.public_key())

    def signer(digest: bytes) -> tuple[bytes, bytes]:
        return raw, key.sign(SIGNATURE_DOMAIN + digest)

    return signer


def sign_patch(patch_path: str, private_path: str, output: str | None = None) -> str:
    """Sign (or re-sign) a patch, atomically; returns the key id."""
    signer = signer_from_file(private_path)
    with read_patch(patch_path) as p:  # validates the whole patch first
        end = p.trailer_offset
        mv = p.buffer
        _, major, minor, flags, header_len = PREAMBLE.unpack_from(mv, 0)
        pre = PREAMBLE.pack(mv[:8].tobytes(), major, minor, flags | FLAG_SIGNED, header_len)
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        h.update(pre)
        h.update(mv[PREAMBLE_SIZE:end])
        digest = h.digest()
        public, signature = signer(digest)
        with atomic_write(output or patch_path) as f:
            f.write(pre)
            f.write(mv[PREAMBLE_SIZE:end])
            f.write(digest)
            f.write(public + signature)
        del mv
    return key_id(public)


def _require_signed_by(path: str, expected: bytes, trailer_digest: bytes, block: bytes | None) -> str:
    """Raise IntegrityError unless ``block`` (public key and signature after the trailer) is
    ``expected``'s signature of ``trailer_digest``; returns the key id."""
    _, _, InvalidSignature = _crypto()
    if block is None:
        raise IntegrityError(f"{path}: patch is not signed (a key was given, so a signature is required)",
                             what="signature")
    public, signature = block[:32], block[32:]
    if not hmac.compare_digest(public, expected):
        raise IntegrityError(f"{path}: signed by key {key_id(public)}, expected key {key_id(expected)}",
                             what="signature", expected=key_id(expected), actual=key_id(public))
    ed25519, _, _ = _crypto()
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, SIGNATURE_DOMAIN + trailer_digest)
    except InvalidSignature:
        raise IntegrityError(f"{path}: signature does not verify with key {key_id(public)}",
                             what="signature") from None
    return key_id(public)


def authenticator(public_path: str | os.PathLike[str]):
    """An ``authenticate`` callback for :func:`nnpatch.patchfile.read_patch`: the patch must be
    signed by the key in ``public_path``, checked before its header is parsed."""
    expected = _raw_public(load_public_key(os.fspath(public_path)))

    def authenticate(path: str, trailer_digest: bytes, block: bytes | None) -> None:
        _require_signed_by(path, expected, trailer_digest, block)

    return authenticate


def verify_signature(patch, public_path: str) -> str:
    """Raise IntegrityError unless ``patch`` (an open Patch) is signed by the key in ``public_path``."""
    expected = _raw_public(load_public_key(public_path))
    sig = patch.signature
    return _require_signed_by(patch.path, expected, bytes.fromhex(patch.trailer_hash),
                              None if sig is None else sig[0] + sig[1])


__all__ = ["SIGNATURE_DOMAIN", "SIGNATURE_BLOCK_SIZE", "TRAILER_SIZE", "authenticator", "generate_keypair", "key_id",
           "load_private_key", "load_public_key", "sign_patch", "signer_from_file", "verify_signature"]
