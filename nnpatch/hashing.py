"""BLAKE3 digests of files, tensors and whole models, and b3sum manifests.

Three digests, defined byte for byte in spec/FORMAT.md section "Hashes":

* file digest: BLAKE3 of the file's bytes (what ``b3sum`` prints);
* tensor digest: BLAKE3 of the tensor's raw little-endian C-order bytes;
* model digest: BLAKE3 over (name, dtype, shape, tensor digest) of every
  tensor, sorted by name, so it ignores file layout and metadata;
* directory digest: BLAKE3 over (relative path, file digest) of every file of
  a model directory, sorted by path;

and the canonical order (names by their UTF-8 bytes) all of them use.
"""

from __future__ import annotations

import hmac
import mmap
import os
import struct
import sys
from dataclasses import dataclass

import blake3

from .errors import NnpatchIOError, PatchFormatError

DIGEST_SIZE = 32
MODEL_DIGEST_DOMAIN = b"nnpatch-model-v1\x00"
DIRECTORY_DIGEST_DOMAIN = b"nnpatch-dir-v1\x00"
#: Below this size the cost of starting threads outweighs their help.
_THREADED_MIN = 1 << 20
#: The largest checksum list ``hash --check`` reads: about 400,000 lines of 64-hex digests and
#: paths, so a list of every file of a large model tree fits, and an endless stream
#: (``< /dev/zero``) is refused after this many bytes instead of filling memory.
MAX_CHECKSUM_LIST_SIZE = 64 << 20
_READ_PIECE = 1 << 20


def _hasher_for(n: int) -> blake3.blake3:
    return blake3.blake3(max_threads=blake3.blake3.AUTO) if n >= _THREADED_MIN else blake3.blake3()


def digest_bytes(data) -> bytes:
    """BLAKE3 of a bytes-like object (numpy arrays included), using all cores when large."""
    mv = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    h = _hasher_for(len(mv))
    h.update(mv)
    return h.digest()


def hash_file(path: str | os.PathLike[str]) -> str:
    """Hex BLAKE3 of a file, as ``b3sum`` prints it."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return hash_fd(f.fileno())
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot read: {e.strerror or e}") from e


def hash_fd(fd: int) -> str:
    """Hex BLAKE3 of the file open as ``fd``: the file already opened and checked, whatever its
    name points to now (a download or a staged output). Raises ``OSError``."""
    size = os.fstat(fd).st_size
    h = _hasher_for(size)
    if size:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            h.update(m)
    return h.hexdigest()


def name_key(name: str) -> bytes:
    """The sort key of the canonical tensor (and file) order: the name's UTF-8
    bytes (spec/FORMAT.md, "Hashes"). Lone surrogates, which some readers
    let through, sort by their surrogate-escaped bytes instead of failing."""
    return name.encode("utf-8", "surrogatepass")


def canonical_order(names) -> list[str]:
    """``names`` in the canonical order (see :func:`name_key`)."""
    return sorted(names, key=name_key)


def model_record(name: str, dtype: str, shape, tensor_digest: bytes) -> bytes:
    """One tensor's contribution to the model digest (see the spec)."""
    n = name.encode("utf-8")
    d = dtype.encode("ascii")
    return (
        struct.pack("<I", len(n)) + n
        + struct.pack("<B", len(d)) + d
        + struct.pack("<B", len(shape)) + b"".join(struct.pack("<Q", s) for s in shape)
        + tensor_digest
    )


class ModelHasher:
    """Accumulates tensor digests in any order; digest() sorts them by name."""

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}

    def add(self, name: str, dtype: str, shape, tensor_digest: bytes) -> None:
        self._records[name] = model_record(name, dtype, shape, tensor_digest)

    def digest(self) -> bytes:
        h = blake3.blake3(MODEL_DIGEST_DOMAIN)
        for name in canonical_order(self._records):
            h.update(self._records[name])
        return h.digest()


def model_digest_of(tensors, digests) -> bytes:
    """The model digest from tensor digests already at hand (``tensors``: name -> info with dtype and shape)."""
    m = ModelHasher()
    for name, info in tensors.items():
        m.add(name, info.dtype, info.shape, digests[name])
    return m.digest()


def model_digest(weights) -> tuple[bytes, dict[str, bytes]]:
    """(model digest, {name: tensor digest}) of an open model (anything with ``tensors`` and ``raw``)."""
    per = {name: digest_bytes(weights.raw(name)) for name in weights.tensors}
    return model_digest_of(weights.tensors, per), per


def directory_digest(files) -> str:
    """The directory digest (spec section 8) of ``(relative path, file digest hex)`` pairs."""
    h = blake3.blake3(DIRECTORY_DIGEST_DOMAIN)
    for path, digest in sorted(files, key=lambda e: name_key(e[0])):
        name = path.encode("utf-8", "surrogatepass")
        h.update(len(name).to_bytes(4, "little") + name)
        h.update(bytes.fromhex(digest))
    return h.hexdigest()


def digests_equal(a: bytes | str, b: bytes | str) -> bool:
    if isinstance(a, str):
        a = a.encode()
    if isinstance(b, str):
        b = b.encode()
    return hmac.compare_digest(a, b)


# --- b3sum manifests -----------------------------------------------------

def manifest_line(hexdigest: str, path: str) -> str:
    """A line ``b3sum -c`` accepts, escaping names the way b3sum does."""
    if "\\" in path or "\n" in path or "\r" in path:
        escaped = path.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{hexdigest}  {escaped}"
    return f"{hexdigest}  {path}"


def read_checksum_list(source: str, *, limit: int = MAX_CHECKSUM_LIST_SIZE) -> str:
    """A b3sum checksum list from a file, or from standard input when ``source`` is ``-``.

    Read in pieces, so the list is refused once it passes ``limit`` bytes, and a
    signal (Ctrl-C, SIGTERM) is handled between pieces: one ``read()`` of an endless pipe would
    neither stop nor let the handler run."""
    if source == "-":
        stream = getattr(sys.stdin, "buffer", sys.stdin)
        return _decode_list(_read_pieces(stream.read, source, limit), source)
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError as e:
        raise NnpatchIOError(f"{source}: cannot read: {e.strerror or e}") from e
    try:
        return _decode_list(_read_pieces(lambda n: os.read(fd, n), source, limit), source)
    finally:
        os.close(fd)


def _read_pieces(read, source: str, limit: int) -> bytes:
    pieces, size = [], 0
    try:
        while piece := read(_READ_PIECE):
            size += len(piece)
            if size > limit:
                raise PatchFormatError(f"checksum list exceeds the {limit}-byte limit", path=source)
            pieces.append(piece)
    except OSError as e:
        raise NnpatchIOError(f"{source}: cannot read: {e.strerror or e}") from e
    return b"".join(pieces)


def _decode_list(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PatchFormatError("checksum list is not UTF-8 text", path=source) from e


def parse_manifest(text: str, *, source: str = "<manifest>") -> list[tuple[str, str]]:
    """Parse b3sum output into (hexdigest, path) pairs."""
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        digest, sep, name = body.partition("  ")
        if not sep or len(digest) != 2 * DIGEST_SIZE or not all(c in "0123456789abcdef" for c in digest) or not name:
            raise PatchFormatError(f"line {lineno}: not a b3sum line (expected '<64 hex digits>  <path>')", path=source)
        if escaped:
            name = _unescape(name, lineno, source)
        entries.append((digest, name))
    return entries


def _unescape(name: str, lineno: int, source: str) -> str:
    out = []
    i = 0
    while i < len(name):
        c = name[i]
        if c == "\\":
            nxt = name[i + 1 : i + 2]
            if nxt not in ("\\", "n", "r"):
                raise PatchFormatError(f"line {lineno}: invalid escape in file name", path=source)
            out.append({"\\": "\\", "n": "\n", "r": "\r"}[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class CheckResult:
    path: str
    expected: str
    actual: str | None  # None when the file could not be read
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.actual is not None and digests_equal(self.expected, self.actual)


def check_manifest(entries: list[tuple[str, str]], *, root: str = ".") -> list[CheckResult]:
    results = []
    for expected, name in entries:
        full = name if os.path.isabs(name) else os.path.join(root, name)
        try:
            actual = hash_file(full)
            results.append(CheckResult(name, expected, actual))
        except NnpatchIOError as e:
            results.append(CheckResult(name, expected, None, str(e)))
    return results
