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
    return _private_from_pem(_read(path), path)


def _private_from_pem(data: bytes, source: str):
    ed25519, serialization, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise PatchFormatError(f"not an unencrypted PEM private key ({e})", path=source) from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PatchFormatError("not an Ed25519 private key", path=source)
    return key


class TrustedKey:
    """An Ed25519 public key the caller trusts, parsed once: the one place that checks an Ed25519
    signature, for patches (:func:`authenticator`) and release manifests (nnpatch.delivery.trust).

    Build one with :meth:`from_file` (a PEM file; a private key file names its public key too),
    :meth:`from_pem` (PEM text or bytes) or :meth:`of` (a TrustedKey, or a path)."""

    __slots__ = ("_public", "raw", "key_id")

    def __init__(self, public) -> None:
        self._public = public
        self.raw = _raw_public(public)
        self.key_id = key_id(self.raw)

    @classmethod
    def from_pem(cls, data: bytes | str, *, source: str = "key") -> TrustedKey:
        ed25519, serialization, _ = _crypto()
        if isinstance(data, str):
            data = data.encode("utf-8")
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            try:  # a private key file also names its public key
                return cls(_private_from_pem(data, source).public_key())
            except PatchFormatError:
                raise PatchFormatError("not a PEM Ed25519 public key", path=source) from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise PatchFormatError("not an Ed25519 public key", path=source)
        return cls(key)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TrustedKey:
        path = os.fspath(path)
        return cls.from_pem(_read(path), source=path)

    @classmethod
    def of(cls, key: TrustedKey | str | os.PathLike[str]) -> TrustedKey:
        """``key`` itself, or the key in the PEM file at ``key``."""
        return key if isinstance(key, TrustedKey) else cls.from_file(key)

    def signed(self, public: bytes) -> bool:
        """Whether ``public`` (a raw 32-byte key from a signature block) is this key."""
        return hmac.compare_digest(public, self.raw)

    def verifies(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``message``."""
        _, _, InvalidSignature = _crypto()
        try:
            self._public.verify(signature, message)
        except InvalidSignature:
            return False
        return True


def load_public_key(path: str):
    """The ``cryptography`` public key object in the PEM file at ``path``."""
    return TrustedKey.from_file(path)._public


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


def _require_signed_by(path: str, expected: TrustedKey, trailer_digest: bytes, block: bytes | None) -> str:
    """Raise IntegrityError unless ``block`` (public key and signature after the trailer) is
    ``expected``'s signature of ``trailer_digest``; returns the key id."""
    if block is None:
        raise IntegrityError(f"{path}: patch is not signed (a key was given, so a signature is required)",
                             what="signature")
    public, signature = block[:32], block[32:]
    if not expected.signed(public):
        raise IntegrityError(f"{path}: signed by key {key_id(public)}, expected key {expected.key_id}",
                             what="signature", expected=expected.key_id, actual=key_id(public))
    if not expected.verifies(signature, SIGNATURE_DOMAIN + trailer_digest):
        raise IntegrityError(f"{path}: signature does not verify with key {key_id(public)}",
                             what="signature")
    return expected.key_id


def authenticator(key: TrustedKey | str | os.PathLike[str]):
    """An ``authenticate`` callback for :func:`nnpatch.patchfile.read_patch`: the patch must be
    signed by ``key`` (a TrustedKey, or the PEM file it is in), checked before its header is parsed."""
    expected = TrustedKey.of(key)

    def authenticate(path: str, trailer_digest: bytes, block: bytes | None) -> None:
        _require_signed_by(path, expected, trailer_digest, block)

    return authenticate


def verify_signature(patch, key: TrustedKey | str | os.PathLike[str]) -> str:
    """Raise IntegrityError unless ``patch`` (an open Patch) is signed by ``key`` (a TrustedKey, or
    the PEM file it is in); returns the key id."""
    expected = TrustedKey.of(key)
    sig = patch.signature
    return _require_signed_by(patch.path, expected, bytes.fromhex(patch.trailer_hash),
                              None if sig is None else sig[0] + sig[1])


__all__ = ["SIGNATURE_DOMAIN", "SIGNATURE_BLOCK_SIZE", "TRAILER_SIZE", "TrustedKey", "authenticator",
           "generate_keypair", "key_id", "load_private_key", "load_public_key", "sign_patch", "signer_from_file",
           "verify_signature"]
