"""Read a patch: validate the whole container and header (everything that can
be checked without the models) before anything else looks at it."""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from collections.abc import Callable

import blake3
import zstandard

from .. import codecs, dtypes, quantdelta
from .._json import EVERY_KEY, MAX_JSON_STRING, WHOLE, LazyArray, Pieces, json_shape, loads_strict, loads_text, utf8_error
from ..errors import NnpatchError, NnpatchIOError, PatchFormatError, UnsupportedVersionError
from ..skeldelta import ZSTD_BASE
from .header import (ALIGNMENT, FILE_KINDS, FLAG_HEADER_ZSTD, FLAG_SIGNED, FORMAT_VERSION, KNOWN_FEATURES, MAGIC,
                     HEADER_EXPANSION_SLACK, MAX_FILES, MAX_HEADER_EXPANSION, MAX_HEADER_SIZE,
                     MAX_JSON_DEPTH, MAX_JSON_VALUES, MAX_NAMES_BYTES, MAX_OPS, MAX_NAME_BYTES, MAX_PATH_BYTES,
                     MAX_PATH_COMPONENT_BYTES, MAX_PATH_DEPTH, MAX_RANK,
                     MAX_ZSTD_EXPANSION, MODEL_FORMATS, OPS, PREAMBLE, PREAMBLE_SIZE, RESERVED_FLAGS,
                     SIGNATURE_BLOCK_SIZE, TARGET_FORMATS, TRAILER_SIZE, ModelRef, Op, OutputFile, PatchHeader,
                     Section, TargetFile, TensorRef, delta_or_planes, place)


# --- reading ----------------------------------------------------------------

#: ``authenticate(path, trailer_digest, signature_block or None)`` raises unless
#: the patch is acceptable (nnpatch.signing.authenticator builds one from a key).
Authenticator = Callable[[str, bytes, "bytes | None"], None]

class Patch:
    """An open, fully validated patch file (memory-mapped, read-only)."""

    def __init__(self, path: str | os.PathLike[str], *, check_trailer: bool = True,
                 authenticate: Authenticator | None = None, name: str | None = None,
                 same_as: os.stat_result | None = None) -> None:
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise NnpatchIOError(f"{self.path}: cannot open: {e.strerror or e}") from e
        if name is not None:  # what errors call it (a spooled stream: "<stdin>")
            self.path = name
        try:
            st = os.fstat(self._file.fileno())
            if same_as is not None and (st.st_dev, st.st_ino) != (same_as.st_dev, same_as.st_ino):
                # ``check_trailer=False`` trusts that this is the file the caller checked: a file swapped in
                # under its name since (another user of the folder) is refused, never read
                raise NnpatchIOError(f"{self.path}: the spooled file was replaced before it was read")
            self.size = st.st_size
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
            self.header = parse_patch(self._map if self._map is not None else b"", path=self.path,
                                      check_trailer=check_trailer, authenticate=authenticate)
        except BaseException:
            self.close()
            raise

    def section(self, s: Section) -> memoryview:
        return memoryview(self._map)[s.offset : s.offset + s.length]

    @property
    def buffer(self) -> memoryview:
        """The whole file, read-only (empty for an empty file)."""
        return memoryview(self._map) if self._map is not None else memoryview(b"")

    @property
    def trailer_offset(self) -> int:
        return self.size - TRAILER_SIZE - self.signature_block_size

    @property
    def signature_block_size(self) -> int:
        return SIGNATURE_BLOCK_SIZE if self.header.flags & FLAG_SIGNED else 0

    @property
    def trailer_hash(self) -> str:
        return bytes(self._map[self.trailer_offset : self.trailer_offset + TRAILER_SIZE]).hex()

    @property
    def signature(self) -> tuple[bytes, bytes] | None:
        """(public key, signature) of a signed patch, else None. Not verified here."""
        if not self.signature_block_size:
            return None
        block = bytes(self._map[self.size - SIGNATURE_BLOCK_SIZE :])
        return block[:32], block[32:]

    @property
    def ops(self) -> list[Op]:
        return self.header.ops

    def close(self) -> None:
        m = getattr(self, "_map", None)
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_patch(path: str | os.PathLike[str], *, authenticate: Authenticator | None = None) -> Patch:
    """Open and validate the patch at ``path``; ``authenticate`` (see :data:`Authenticator`) runs
    as soon as the trailer is proven, before the header is expanded or parsed."""
    return Patch(path, authenticate=authenticate)


def parse_patch(buf, *, path: str = "<patch>", check_trailer: bool = True,
                authenticate: Authenticator | None = None) -> PatchHeader:
    """Validate a whole patch held in ``buf`` and return its header.

    Order (spec/FORMAT.md section 9): preamble, trailer hash, ``authenticate``
    (with a key: the signature), and only then the header, which is the first
    thing a crafted patch can make expensive."""
    size = len(buf)
    if size < PREAMBLE_SIZE:
        if bytes(buf[: min(size, 8)]) != MAGIC[: min(size, 8)]:
            raise PatchFormatError("not an nnpatch file (bad magic)", path=path, offset=0)
        raise PatchFormatError(f"truncated: {size} bytes, the preamble alone is {PREAMBLE_SIZE}", path=path)
    magic, major, minor, flags, header_len = PREAMBLE.unpack_from(buf, 0)
    if magic != MAGIC:
        raise PatchFormatError(f"not an nnpatch file (bad magic {magic!r}, expected {MAGIC!r})", path=path, offset=0)
    if major != FORMAT_VERSION[0]:
        raise UnsupportedVersionError(
            f"unsupported format version {major}.{minor} (this nnpatch reads {FORMAT_VERSION[0]}.x)",
            path=path, offset=8, found=(major, minor), supported=FORMAT_VERSION)
    if flags & RESERVED_FLAGS:
        raise UnsupportedVersionError(f"reserved flag bits set (0x{flags & RESERVED_FLAGS:04x})",
                                      path=path, offset=12, found=flags)
    sig = SIGNATURE_BLOCK_SIZE if flags & FLAG_SIGNED else 0
    if size < PREAMBLE_SIZE + TRAILER_SIZE + sig:
        raise PatchFormatError(f"truncated: {size} bytes, no room for the trailer", path=path)
    size -= sig  # from here on, the file as if unsigned: everything up to the trailer's end
    if check_trailer:
        h = blake3.blake3(max_threads=blake3.blake3.AUTO) if size > 1 << 20 else blake3.blake3()
        h.update(memoryview(buf)[: size - TRAILER_SIZE])
        if h.digest() != bytes(buf[size - TRAILER_SIZE : size]):
            raise PatchFormatError("trailer hash mismatch: the file is corrupt or truncated", path=path,
                                   offset=size - TRAILER_SIZE)
    if authenticate is not None:
        authenticate(path, bytes(buf[size - TRAILER_SIZE : size]), bytes(buf[size : size + sig]) if sig else None)
    if header_len > MAX_HEADER_SIZE:
        raise PatchFormatError(f"header length {header_len} exceeds the {MAX_HEADER_SIZE} limit", path=path, offset=16)
    if PREAMBLE_SIZE + header_len > size - TRAILER_SIZE:
        raise PatchFormatError(f"truncated: header length {header_len} runs past the end of the file",
                               path=path, offset=16)
    if (PREAMBLE_SIZE + header_len) % ALIGNMENT:
        raise PatchFormatError(f"header length {header_len} does not end on a {ALIGNMENT}-byte boundary",
                               path=path, offset=16)
    # a view, not a copy: a plain header of 64 MiB is read where the file is mapped
    header = parse_header(memoryview(buf)[PREAMBLE_SIZE : PREAMBLE_SIZE + header_len], flags, path=path)
    header.version = (major, minor)
    header.flags = flags
    _check_layout(header, buf, PREAMBLE_SIZE + header_len, size, path)
    return header


def parse_header(raw: bytes, flags: int, *, path: str) -> PatchHeader:
    """The header from its stored bytes (plain, or zstd where ``flags`` say so),
    validated on its own: the stream reader checks it before the sections arrive."""
    if flags & FLAG_HEADER_ZSTD:
        raw = _unpacked(bytes(raw), path)
    if len(raw) > WHOLE:
        return _long_header(raw, path)
    return _header_from_json(_load_json(bytes(raw), path), path)


def unpack_header(raw: bytes, path: str) -> bytes:
    """The JSON of a zstd header: one frame declaring its size, then only zero bytes."""
    return bytes(_unpacked(raw, path))


def _unpacked(raw: bytes, path: str) -> memoryview:
    """unpack_header's JSON as the decoded array itself (as bytes, 64 MiB would be held twice)."""
    where = "header"
    try:
        length = codecs.zstd_frame_length(raw)
        size = zstandard.frame_content_size(raw[:18])
    except (PatchFormatError, zstandard.ZstdError) as e:
        raise PatchFormatError(f"compressed header: {e}", path=path, offset=PREAMBLE_SIZE) from e
    if size < 0 or size > MAX_HEADER_SIZE:
        raise PatchFormatError(f"compressed header declares {size} bytes (limit {MAX_HEADER_SIZE})",
                               path=path, offset=PREAMBLE_SIZE)
    if size > MAX_HEADER_EXPANSION * length + HEADER_EXPANSION_SLACK:
        raise PatchFormatError(f"compressed header declares {size} bytes from a {length}-byte frame (at most "
                               f"{MAX_HEADER_EXPANSION}x + {HEADER_EXPANSION_SLACK})", path=path, offset=PREAMBLE_SIZE)
    if any(raw[length:]):
        raise PatchFormatError("compressed header: padding after the zstd frame is not zero",
                               path=path, offset=PREAMBLE_SIZE + length)
    try:
        (out,) = codecs.decoded_chunks(raw[:length], ["zstd"], size, [size], where=where)
        return memoryview(out)
    except PatchFormatError as e:
        raise PatchFormatError(f"compressed {e}", path=path, offset=PREAMBLE_SIZE) from e


#: Every key the reader reads, in any object of the header: a long header keeps only these (and ``x-``
#: keys at the top) of each object longer than a piece, never building what it ignores.
_HEADER_KEYS = frozenset({
    "required_features", "created_by", "base", "target", "ops",  # top
    "format", "size", "blake3", "model_blake3", "tensors", "layout", "files", "skeleton", "outputs", "extents",
    "offset", "length", "codec",  # sections
    "path", "kind", "content", "from",  # files
    "name", "op", "count", "index", "values", "base_values", "bits", "scales", "dtype", "shape",  # ops
})
#: ``x-`` values a long header keeps (PatchHeader.extra) together hold at most this many bytes of
#: JSON; past it, none is kept (a reader MUST ignore them; spec 5), so that they cost no more.
MAX_EXTRA_JSON = WHOLE


def _load_json(raw: bytes, path: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PatchFormatError(f"header is not UTF-8 (byte {PREAMBLE_SIZE + e.start})", path=path) from e
    if not text.startswith("{"):
        raise PatchFormatError("header is not a JSON object", path=path, offset=PREAMBLE_SIZE)
    try:
        depth, values = json_shape(raw, max_string=MAX_JSON_STRING)
    except ValueError as e:
        raise PatchFormatError(f"header JSON holds {e}", path=path, offset=PREAMBLE_SIZE) from e
    if depth > MAX_JSON_DEPTH:
        raise PatchFormatError(f"header JSON nests deeper than {MAX_JSON_DEPTH}", path=path, offset=PREAMBLE_SIZE)
    if values > MAX_JSON_VALUES:
        raise PatchFormatError(f"header JSON holds more than {MAX_JSON_VALUES} values", path=path,
                               offset=PREAMBLE_SIZE)
    try:
        obj = loads_text(text, max_string=None)  # the strings were checked with the shape
    except (ValueError, RecursionError) as e:
        raise PatchFormatError(f"header is not valid JSON: {e}", path=path, offset=PREAMBLE_SIZE) from e
    if not isinstance(obj, dict):
        raise PatchFormatError("header is not a JSON object", path=path, offset=PREAMBLE_SIZE)
    return obj


def _long_header(raw: bytes, path: str) -> PatchHeader:
    """A header longer than WHOLE, with the answers a short one gets (_load_json, then
    _header_from_json), in bounded memory: decoded and parsed a piece at a time
    (:class:`nnpatch._json.Pieces`), building only what the reader reads; ``ops`` and a target's
    ``files`` and ``outputs`` are LazyArrays, which the reader turns into its own objects one at a
    time. The JSON is read once; where that read or the reader refuses something, the whole JSON is
    checked first, so that an invalid header is refused as such, as a short one is, whatever else
    is wrong with it."""
    bad = utf8_error(raw)
    if bad is not None:
        raise PatchFormatError(f"header is not UTF-8 (byte {PREAMBLE_SIZE + bad.start})", path=path)
    if raw[:1] != b"{":
        raise PatchFormatError("header is not a JSON object", path=path, offset=PREAMBLE_SIZE)
    try:
        doc = Pieces(raw, max_string=MAX_JSON_STRING)
    except ValueError as e:
        raise PatchFormatError(f"header JSON holds {e}", path=path, offset=PREAMBLE_SIZE) from e
    if doc.depth > MAX_JSON_DEPTH:
        raise PatchFormatError(f"header JSON nests deeper than {MAX_JSON_DEPTH}", path=path, offset=PREAMBLE_SIZE)
    if doc.values > MAX_JSON_VALUES:
        raise PatchFormatError(f"header JSON holds more than {MAX_JSON_VALUES} values", path=path,
                               offset=PREAMBLE_SIZE)
    try:
        header = _header_from_json(_long_json(doc, raw), path)
        if not all(a.read for a in doc.arrays):
            doc.check()
        return header
    except (NnpatchError, ValueError, RecursionError) as first:
        try:
            doc.check()
        except (ValueError, RecursionError) as e:
            raise PatchFormatError(f"header is not valid JSON: {e}", path=path, offset=PREAMBLE_SIZE) from e
        if isinstance(first, NnpatchError):
            raise
        raise PatchFormatError(f"header is not valid JSON: {first}", path=path, offset=PREAMBLE_SIZE) from first


def _long_json(doc: Pieces, raw: bytes) -> dict:
    """The header's top object as _header_from_json reads it: what it reads built (``x-`` values
    while they total at most MAX_EXTRA_JSON bytes), the rest dropped once read."""
    obj: dict = {}
    extra: dict = {}
    extra_bytes = 0
    for key, v, size in doc.members(*doc.top(), keep=EVERY_KEY):
        if key.startswith("x-"):
            extra_bytes += size
            if isinstance(v, tuple):  # longer than a piece: read (so checked), then built only within the budget
                doc.value(*v)
                v = loads_strict(doc.span(*v), max_string=None) if extra_bytes <= MAX_EXTRA_JSON else None
            if extra_bytes <= MAX_EXTRA_JSON:
                extra[key] = v
            else:
                extra.clear()
        elif not isinstance(v, tuple):
            obj[key] = v
        elif key == "ops":
            obj[key] = doc.lazy(*v, keep=_HEADER_KEYS)
        else:
            obj[key] = doc.value(*v, keep=_HEADER_KEYS if key in _HEADER_KEYS else None,
                                 lazy=frozenset({"files", "outputs"}))
    obj.update(extra)
    return obj


class _Reader:
    """Typed access to JSON fields with errors that name the field."""

    def __init__(self, path: str) -> None:
        self.path = path
        # one object for each codec list and shape the header repeats (every op has a few): a long header's
        # ops are what its reader keeps, so they are kept small
        self._codecs: dict[tuple, list[str]] = {}
        self._shapes: dict[tuple, tuple] = {}
        self._names = 0

    def count_name(self, where: str, encoded: bytes) -> None:
        """Spec section 12: op names and file and output paths total at most MAX_NAMES_BYTES."""
        self._names += len(encoded)
        if self._names > MAX_NAMES_BYTES:
            self.fail(where, f"the header's names and paths total more than {MAX_NAMES_BYTES} bytes of UTF-8")

    def fail(self, where: str, msg: str):
        raise PatchFormatError(f"header: {where}: {msg}", path=self.path)

    def obj(self, parent: dict, key: str, where: str, *, optional: bool = False) -> dict | None:
        if key not in parent:
            if optional:
                return None
            self.fail(where, f"missing required key {key!r}")
        v = parent[key]
        if not isinstance(v, dict):
            self.fail(f"{where}.{key}", "must be an object")
        return v

    def int(self, parent: dict, key: str, where: str, *, optional: bool = False) -> int | None:
        if key not in parent:
            if optional:
                return None
            self.fail(where, f"missing required key {key!r}")
        v = parent[key]
        if type(v) is not int or v < 0 or v >= 1 << 63:
            self.fail(f"{where}.{key}", f"must be an integer in [0, 2^63), found {v!r}")
        return v

    def str(self, parent: dict, key: str, where: str, *, optional: bool = False) -> str | None:
        if key not in parent:
            if optional:
                return None
            self.fail(where, f"missing required key {key!r}")
        v = parent[key]
        if not isinstance(v, str):
            self.fail(f"{where}.{key}", f"must be a string, found {type(v).__name__}")
        return v

    def digest(self, parent: dict, key: str, where: str) -> str:
        v = self.str(parent, key, where)
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            self.fail(f"{where}.{key}", "must be 64 lowercase hex digits")
        return v

    def section(self, parent: dict, key: str, where: str, *, optional: bool = False) -> Section | None:
        o = self.obj(parent, key, where, optional=optional)
        if o is None:
            return None
        w = f"{where}.{key}"
        codec = o.get("codec")
        if not isinstance(codec, list) or not all(isinstance(s, str) for s in codec) or len(codec) > 8:
            self.fail(w, "codec must be a list of at most 8 stage names")
        codec = self._codecs.setdefault(tuple(codec), codec)
        return Section(self.int(o, "offset", w), self.int(o, "length", w), self.int(o, "size", w), codec)

    def tensor(self, parent: dict, key: str, where: str) -> TensorRef:
        o = self.obj(parent, key, where)
        w = f"{where}.{key}"
        dtype = self.str(o, "dtype", w)
        if dtype not in dtypes.ITEMSIZE:
            raise UnsupportedVersionError(f"header: {w}.dtype: unknown dtype {dtype!r}", path=self.path, found=dtype)
        shape = o.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
            type(d) is int and 0 <= d < 1 << 62 for d in shape
        ):
            self.fail(f"{w}.shape", f"must be a list of at most {MAX_RANK} non-negative integers")
        if math.prod(shape) * dtypes.ITEMSIZE[dtype] >= 1 << 62:
            self.fail(f"{w}.shape", "tensor too large")
        shape = tuple(shape)
        return TensorRef(_DTYPES[dtype], self._shapes.setdefault(shape, shape), self.digest(o, "blake3", w))


_DTYPES = {name: name for name in dtypes.ITEMSIZE}  # one string object per dtype name


def _model_ref(r: _Reader, obj: dict, key: str) -> ModelRef:
    o = r.obj(obj, key, "header")
    fmt = r.str(o, "format", key)
    if fmt not in (TARGET_FORMATS if key == "target" else MODEL_FORMATS):
        raise UnsupportedVersionError(f"header: {key}.format: unknown model format {fmt!r}", path=r.path, found=fmt)
    directory = key == "target" and fmt == "safetensors-dir"
    ref = ModelRef(fmt, r.int(o, "size", key), r.digest(o, "blake3", key), r.digest(o, "model_blake3", key),
                   r.int(o, "tensors", key), r.section(o, "layout", key, optional=key == "base" or directory))
    if directory:
        if ref.layout is not None:
            r.fail(f"{key}.layout", "a directory target describes its files under 'files', not 'layout'")
        ref.files = _target_files(r, o, key)
        total = sum(f.size for f in ref.files)
        if total != ref.size:
            r.fail(f"{key}.size", f"{ref.size} is not the sum of its files' sizes ({total})")
    elif "files" in o:
        r.fail(f"{key}.files", "only a directory target ('safetensors-dir') lists files")
    if key == "target" and fmt in ("onnx", "extents"):
        ref.skeleton = r.section(o, "skeleton", key)
        ref.outputs = _onnx_outputs(r, o, key)
        if fmt == "extents" and (len(ref.outputs) != 1 or "/" in ref.outputs[0].path):
            r.fail(f"{key}.outputs", "an extents target writes exactly one file")
    elif "skeleton" in o or "outputs" in o:
        r.fail(key, "only an ONNX or extents target has 'skeleton' and 'outputs'")
    if fmt == "extents":
        ref.extents = r.section(o, "extents", key)
        if key == "target" and ref.layout is None:
            r.fail(f"{key}.layout", "an extents target describes its tensors by a layout")
    elif "extents" in o:
        r.fail(f"{key}.extents", "is for extents models only")
    return ref


def _onnx_outputs(r: _Reader, o: dict, key: str) -> list[OutputFile]:
    items = o.get("outputs")
    if not isinstance(items, (list, LazyArray)) or not 1 <= len(items) <= MAX_FILES:
        r.fail(f"{key}.outputs", f"must be a list of 1 to {MAX_FILES} files")
    out, seen = [], set()
    for i, fj in enumerate(items):
        where = f"{key}.outputs[{i}]"
        if not isinstance(fj, dict):
            r.fail(where, "must be an object")
        path = r.str(fj, "path", where)
        why = check_relative_path(path) or ("must be a file name, without '/'" if i == 0 and "/" in path else None)
        if why:
            r.fail(f"{where}.path", f"{path!r} {why}")
        if path in seen:
            r.fail(f"{where}.path", f"{path!r} is listed twice")
        r.count_name(f"{where}.path", path.encode("utf-8", "surrogatepass"))
        seen.add(path)
        out.append(OutputFile(path, r.int(fj, "size", where), r.digest(fj, "blake3", where)))
    return out


def check_relative_path(path: str) -> str | None:
    """Why ``path`` is not a plain relative POSIX path (spec 5.6), or None."""
    encoded = path.encode("utf-8", "surrogatepass")
    if not path or len(encoded) > MAX_PATH_BYTES:
        return f"must be 1 to {MAX_PATH_BYTES} bytes of UTF-8"
    if "\\" in path or "\x00" in path or path.startswith("/"):
        return "must be a relative path with '/' separators, without NUL or backslash"
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "must not have an empty, '.' or '..' component"
    if len(parts) > MAX_PATH_DEPTH + 1:
        return f"must not lie more than {MAX_PATH_DEPTH} directories deep"
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_PATH_COMPONENT_BYTES for part in parts):
        return f"must not have a component longer than {MAX_PATH_COMPONENT_BYTES} bytes"
    if any(part.casefold() == ".git" for part in path.split("/")):
        # a model directory may be a git clone: its repository is never part of the model, and a patch that
        # could write it could make `git status` run a command of its choosing
        return "must not name or lie inside '.git'"
    return None


def _target_files(r: _Reader, o: dict, key: str) -> list[TargetFile]:
    items = o.get("files")
    if not isinstance(items, (list, LazyArray)) or not 1 <= len(items) <= MAX_FILES:
        r.fail(f"{key}.files", f"must be a list of 1 to {MAX_FILES} files")
    files: list[TargetFile] = []
    previous: bytes | None = None
    for i, fj in enumerate(items):
        where = f"{key}.files[{i}]"
        if not isinstance(fj, dict):
            r.fail(where, "must be an object")
        path = r.str(fj, "path", where)
        why = check_relative_path(path)
        if why:
            r.fail(f"{where}.path", f"{path!r} {why}")
        encoded = path.encode("utf-8", "surrogatepass")
        if previous is not None and encoded <= previous:
            r.fail(f"{where}.path", f"{path!r}: files must be sorted by path, without duplicates")
        if previous is not None and encoded.startswith(previous + b"/"):
            r.fail(f"{where}.path", f"{path!r} lies inside {previous.decode('utf-8', 'surrogatepass')!r}, a file")
        r.count_name(f"{where}.path", encoded)
        previous = encoded
        kind = r.str(fj, "kind", where)
        if kind not in FILE_KINDS:
            raise UnsupportedVersionError(f"header: {where}.kind: unknown file kind {kind!r}", path=r.path,
                                          found=kind, supported=FILE_KINDS)
        f = TargetFile(path, kind, r.int(fj, "size", where), r.digest(fj, "blake3", where))
        allowed = {"safetensors": "layout", "blob": "content", "copy": "from"}[kind]
        for field_ in ("layout", "content", "from"):
            if field_ != allowed and field_ in fj:
                r.fail(where, f"a {kind!r} file has no {field_!r}")
        if kind == "safetensors":
            f.layout = r.section(fj, "layout", where)
        elif kind == "blob":
            f.content = r.section(fj, "content", where)
            if f.content.size != f.size:
                r.fail(f"{where}.content", f"size {f.content.size} is not the file's size {f.size}")
        else:
            f.source = r.str(fj, "from", where)
            why = check_relative_path(f.source)
            if why:
                r.fail(f"{where}.from", f"{f.source!r} {why}")
            r.count_name(f"{where}.from", f.source.encode("utf-8", "surrogatepass"))
        for name, s in (("layout", f.layout), ("content", f.content)):
            if s is None:
                continue
            with _in_header(r.path):
                codecs.check_value_codec(s.codec, relative_allowed=False, where=f"{where}.{name}")
            if delta_or_planes(s.codec):
                r.fail(f"{where}.{name}.codec", f"{name} is stored raw or as zstd only")
        files.append(f)
    return files


def _header_from_json(obj: dict, path: str) -> PatchHeader:
    r = _Reader(path)
    if "required_features" not in obj:
        r.fail("header", "missing required key 'required_features' (a list, empty when none)")
    features = obj["required_features"]
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        r.fail("required_features", "must be a list of strings")
    unknown = [f for f in features if f not in KNOWN_FEATURES]
    if unknown:
        raise UnsupportedVersionError(f"requires feature {unknown[0]!r}, which this nnpatch does not support",
                                      path=path, found=unknown[0], supported=sorted(KNOWN_FEATURES))
    created_by = r.str(obj, "created_by", "header", optional=True) or ""
    base = _model_ref(r, obj, "base")
    target = _model_ref(r, obj, "target")
    if base.layout is not None and base.format != "safetensors":
        r.fail("base.layout", f"only a safetensors base has a layout (this one is {base.format!r})")
    for role, ref, name in (("base", base, "extents"), ("base", base, "layout"), ("target", target, "extents"),
                            ("target", target, "layout"), ("target", target, "skeleton")):
        s = getattr(ref, name)
        if s is None:
            continue
        if name == "skeleton" and s.codec == [ZSTD_BASE]:
            # 1.5, spec 5.8: a delta against the base's skeleton, which only an extents base has
            if base.format != "extents" or target.format != "extents":
                r.fail("target.skeleton.codec", "'zstd-base' needs an extents base and target")
            continue
        with _in_header(path):
            codecs.check_value_codec(s.codec, relative_allowed=False, where=f"{role}.{name}")
        if delta_or_planes(s.codec):
            r.fail(f"{role}.{name}.codec", f"{name} is stored raw or as zstd only")
    ops_json = obj.get("ops")
    if not isinstance(ops_json, (list, LazyArray)):
        r.fail("header", "missing required key 'ops' (a list)")
    if len(ops_json) > MAX_OPS:
        r.fail("ops", f"{len(ops_json)} ops, more than the {MAX_OPS} a patch may have")
    ops = []
    previous = None
    for i, oj in enumerate(ops_json):
        where = f"ops[{i}]"
        if not isinstance(oj, dict):
            r.fail(where, "must be an object")
        name = r.str(oj, "name", where)
        encoded = name.encode("utf-8", "surrogatepass")
        if not name or len(encoded) > MAX_NAME_BYTES:
            r.fail(f"{where}.name", f"must be 1 to {MAX_NAME_BYTES} bytes of UTF-8")
        if previous is not None and encoded <= previous:
            r.fail(f"{where}.name", f"{name!r}: ops must be sorted by name, without duplicates")
        r.count_name(f"{where}.name", encoded)
        previous = encoded
        ops.append(_op_from_json(r, oj, where, name))
    extra = {k: v for k, v in obj.items() if k.startswith("x-")}
    return PatchHeader(base, target, ops, created_by, features, extra=extra)


@contextlib.contextmanager
def _in_header(path: str):
    """Give codec errors raised while reading the header the file's name."""
    try:
        yield
    except UnsupportedVersionError as e:
        raise UnsupportedVersionError(f"header: {e}", path=path, found=e.found, supported=e.supported) from e
    except PatchFormatError as e:
        raise PatchFormatError(f"header: {e}", path=path) from e


_OP_FIELDS = {
    # kind: (base, target, count+index, values)
    "rows": (True, True, True, True),
    "elements": (True, True, True, True),
    "whole": (True, True, False, True),
    "add": (False, True, False, True),
    "remove": (True, False, False, False),
    "qrows": (True, True, True, True),
}


def _op_from_json(r: _Reader, oj: dict, where: str, name: str) -> Op:
    kind = r.str(oj, "op", where)
    if kind not in _OP_FIELDS:
        raise UnsupportedVersionError(f"header: {where}.op: unknown operation {kind!r}", path=r.path, found=kind,
                                      supported=OPS)
    has_base, has_target, has_index, has_values = _OP_FIELDS[kind]
    op = Op(name, kind)
    if has_base:
        op.base = r.tensor(oj, "base", where)
    if has_target:
        op.target = r.tensor(oj, "target", where)
    if has_index:
        op.count = r.int(oj, "count", where)
        op.index = r.section(oj, "index", where)
    if has_values:
        op.values = r.section(oj, "values", where)
    if kind == "qrows":
        op.bits = r.int(oj, "bits", where)
        op.scales = r.section(oj, "scales", where)
    op.base_values = r.section(oj, "base_values", where, optional=True)
    if kind == "remove" and op.base_values is None and "values" in oj:
        r.fail(where, "op 'remove' stores the old bytes under 'base_values'")
    w = f"{where} ({name!r})"
    b, t = op.base, op.target
    same = b is not None and t is not None and b.dtype == t.dtype and b.shape == t.shape
    if kind in ("rows", "elements", "qrows") and not same:
        r.fail(w, f"op {kind!r} needs the same dtype and shape before and after")
    if kind in ("rows", "qrows") and len(t.shape) == 0:
        r.fail(w, f"op {kind!r} needs a tensor of rank 1 or more")
    if kind == "qrows":
        _check_qrows(r, op, w)
    with _in_header(r.path):
        if op.values is not None:
            codecs.check_value_codec(op.values.codec, relative_allowed=same, where=f"{w}.values",
                                     dtype=t.dtype if t is not None else None)
        if op.index is not None:
            codecs.check_index_codec(op.index.codec, where=f"{w}.index")
    # sizes every reader can check before decoding anything
    if kind == "rows":
        bound = t.shape[0]
        row_bytes = t.nbytes // bound if bound else 0
        expected = op.count * row_bytes
    elif kind == "qrows":
        bound = t.shape[0]
        row_elements = math.prod(t.shape) // bound if bound else 0
        expected = op.count * quantdelta.row_code_bytes(row_elements, op.bits)
    elif kind == "elements":
        bound = math.prod(t.shape)
        expected = op.count * dtypes.ITEMSIZE[t.dtype]
    else:
        bound = None
        expected = t.nbytes if t is not None else None
    if bound is not None and op.count > bound:
        r.fail(w, f"count {op.count} exceeds the {bound} positions of the tensor")
    if kind == "elements" and 2 * op.count > bound:
        # more than half the tensor: a `whole` op with a delta stage is smaller, and the index would cost
        # the reader 8 bytes an element
        r.fail(w, f"count {op.count} is more than half the tensor's {bound} elements (use a 'whole' op)")
    if kind in ("rows", "elements", "qrows") and op.count == 0:
        r.fail(w, "count must be at least 1 (an unchanged tensor has no op)")
    if op.values is not None and op.values.size != expected:
        r.fail(f"{w}.values", f"size {op.values.size} does not match the {expected} bytes the op writes")
    if op.scales is not None and op.scales.size not in (quantdelta.SCALE_BYTES,
                                                        quantdelta.SCALE_BYTES * op.count):
        r.fail(f"{w}.scales", f"size {op.scales.size} is neither {quantdelta.SCALE_BYTES} (one scale) nor "
                              f"{quantdelta.SCALE_BYTES * op.count} (one per row)")
    if op.base_values is not None:
        if not op.needs_base_values:
            r.fail(f"{w}.base_values", "only 'remove' and 'whole' without a delta stage carry the old bytes")
        with _in_header(r.path):
            codecs.check_value_codec(op.base_values.codec, relative_allowed=False, where=f"{w}.base_values")
        if op.base_values.size != b.nbytes:
            r.fail(f"{w}.base_values", f"size {op.base_values.size} does not match the {b.nbytes} old bytes")
    return op


def _check_qrows(r: _Reader, op: Op, w: str) -> None:
    """What a ``qrows`` op (1.3) needs beyond a ``rows`` op's keys: a float dtype its arithmetic is
    defined for, a code width of 8 or 4 bits, scales and codes stored raw or as zstd."""
    if op.target.dtype not in quantdelta.DTYPES:
        r.fail(w, f"op 'qrows' changes {', '.join(quantdelta.DTYPES)} tensors, not {op.target.dtype}")
    if op.bits not in quantdelta.BITS:
        r.fail(f"{w}.bits", f"must be 8 or 4, found {op.bits}")
    for name, s in (("scales", op.scales), ("values", op.values)):
        with _in_header(r.path):
            codecs.check_value_codec(s.codec, relative_allowed=False, where=f"{w}.{name}")
        if delta_or_planes(s.codec) or "esort" in s.codec:
            r.fail(f"{w}.{name}.codec", "a 'qrows' op stores its scales and codes raw or as zstd only")


def _check_layout(header: PatchHeader, buf, data_start: int, size: int, path: str) -> None:
    """Sections follow the header in header order, 64-aligned and zero-padded (or packed), no holes."""
    cursor = data_start
    packed = header.packed
    for s in header.sections():
        if s.offset != place(cursor, packed):
            raise PatchFormatError(
                f"section at offset {s.offset} is out of place (expected {place(cursor, packed)}): sections must "
                "follow the header in order, each "
                + ("right after the one before (packed-sections)" if packed else "at the next 64-byte boundary"),
                path=path)
        if s.offset + s.length > size - TRAILER_SIZE:
            raise PatchFormatError(f"section at offset {s.offset} runs past the end of the data", path=path)
        if s.codec and s.codec[-1] in ("zstd", ZSTD_BASE):
            if s.length == 0:
                raise PatchFormatError(f"section at offset {s.offset}: empty zstd section", path=path)
            if s.size > MAX_ZSTD_EXPANSION * s.length + (1 << 17):
                raise PatchFormatError(f"section at offset {s.offset}: size {s.size} is more than zstd can "
                                       f"expand {s.length} bytes to", path=path)
        elif s.length != s.size:
            raise PatchFormatError(f"section at offset {s.offset}: stored raw, so length {s.length} must equal "
                                   f"size {s.size}", path=path)
        _check_zero(buf, cursor, s.offset, path)
        cursor = s.offset + s.length
    end = place(cursor, packed)
    if end != size - TRAILER_SIZE:
        raise PatchFormatError(f"file is {size} bytes, its sections end at {end} (+{TRAILER_SIZE} trailer)"
                               + (": trailing bytes" if size - TRAILER_SIZE > end else ": truncated"), path=path)
    _check_zero(buf, cursor, end, path)


def _check_zero(buf, begin: int, end: int, path: str) -> None:
    if end > begin and any(bytes(buf[begin:end])):
        raise PatchFormatError(f"padding bytes {begin}..{end} are not zero", path=path, offset=begin)
