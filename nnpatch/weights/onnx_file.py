"""ONNX models: the initializers are the weights, everything else is the skeleton.

:func:`load_onnx` splits a model into

* ``tensors``: every initializer of the main graph and of subgraphs (``If``
  / ``Loop`` / ``Scan`` bodies) whose dtype safetensors has, as raw
  little-endian bytes, whatever way the file stores them: ``raw_data``, a
  typed field (``float_data``, ``int32_data``, ``int64_data``,
  ``double_data``, ``uint64_data``) or external data (``data_location:
  EXTERNAL``, read from the referenced file relative to the model's
  directory; the location must be a plain relative path inside it);
* ``skeleton``: the ModelProto with those payloads removed, serialized
  deterministically, behind a small header that records how each tensor was
  stored and what the external files hold besides tensors (their size and
  any non-zero gap bytes). Initializers nnpatch cannot represent (strings,
  4-bit, FNUZ float8, complex128, segments, ...) stay whole in the skeleton.

:func:`rebuild_onnx` puts the payloads back exactly as they were stored and
serializes: when the graph is unchanged the result is byte-identical to the
original file, for every file written by protobuf's own serializer (what
``onnx.save`` and every exporter use). ``load_onnx`` checks this
(``canonical`` in the skeleton header); a hand-crafted file with, say,
unpacked repeated fields rebuilds to the same model in canonical form.

External data: :func:`rebuild_external` rebuilds each external data file
byte for byte (tensors at their recorded offsets, gaps as they were), and
:func:`write_onnx` writes them. Apply order: every external file first (each
atomically: temporary + rename), the ``.onnx`` file last; a crash in
between leaves new data beside the old graph, so an updater that needs
all-or-nothing applies into a fresh directory and renames it into place.

Skeleton layout: ``b"NNPONNX1"``, u32 little-endian length of a JSON header
(compact, sorted keys), the JSON, then the stripped ModelProto.
"""

from __future__ import annotations

import base64
import collections
import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from .. import dtypes
from ..atomic import atomic_write
from ..errors import MissingDependencyError, NnpatchIOError, WeightsError
from .._json import MAX_DOCUMENT_DEPTH, MAX_DOCUMENT_VALUES, MAX_JSON_STRING, json_shape, loads_strict
from ..hashing import canonical_order
from .model import Model, ModelFile, ModelTensor
from .sharded import safe_relative_path

NEEDS_ONNX = "reading ONNX models needs onnx: pip install 'nnpatch[onnx]'"
SKELETON_MAGIC = b"NNPONNX1"
#: protobuf refuses messages above 2 GiB; so does nnpatch.
MAX_ONNX_SIZE = (2 << 30) - 1

#: ONNX TensorProto.DataType name -> safetensors dtype.
_ONNX_TYPES = {
    "FLOAT": "F32", "UINT8": "U8", "INT8": "I8", "UINT16": "U16", "INT16": "I16", "INT32": "I32",
    "INT64": "I64", "BOOL": "BOOL", "FLOAT16": "F16", "DOUBLE": "F64", "UINT32": "U32", "UINT64": "U64",
    "COMPLEX64": "C64", "BFLOAT16": "BF16", "FLOAT8E4M3FN": "F8_E4M3", "FLOAT8E5M2": "F8_E5M2",
    "FLOAT8E8M0": "F8_E8M0",
}
#: The typed field each safetensors dtype may be stored in.
_TYPED_FIELD = {
    "F32": "float_data", "C64": "float_data", "F64": "double_data", "I64": "int64_data",
    "U32": "uint64_data", "U64": "uint64_data",
    "I32": "int32_data", "I16": "int32_data", "I8": "int32_data", "U16": "int32_data", "U8": "int32_data",
    "BOOL": "int32_data", "F16": "int32_data", "BF16": "int32_data", "F8_E4M3": "int32_data",
    "F8_E5M2": "int32_data", "F8_E8M0": "int32_data",
}
_SIGNED = {"I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise MissingDependencyError(NEEDS_ONNX) from e
    return onnx


def _dtype_of(onnx, data_type: int) -> str | None:
    try:
        name = onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return None
    return _ONNX_TYPES.get(name)


def _initializers(graph, onnx):
    """Every initializer TensorProto, main graph first, then subgraphs depth-first."""
    for t in graph.initializer:
        yield t
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(attr.g, onnx)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _initializers(g, onnx)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _packed_bytes(onnx, t, fieldname: str) -> bytes:
    """The exact wire payload of a packed fixed-width field (float/double bits untouched)."""
    c = onnx.TensorProto()
    c.CopyFrom(t)
    for fd, _ in c.ListFields():
        if fd.name != fieldname:
            c.ClearField(fd.name)
    wire = c.SerializeToString()
    _, i = _read_varint(wire, 0)
    n, i = _read_varint(wire, i)
    if i + n != len(wire):
        raise WeightsError(f"unexpected wire encoding of {fieldname}", tensor=t.name)
    return wire[i:]


def _typed_to_raw(onnx, t, fieldname: str, dtype: str) -> bytes | None:
    """Raw little-endian bytes of a typed field, or None if the values do not fit the dtype."""
    if fieldname in ("float_data", "double_data"):
        return _packed_bytes(onnx, t, fieldname)
    width = dtypes.ITEMSIZE[dtype]
    values = np.array(getattr(t, fieldname), dtype=np.uint64 if fieldname == "uint64_data" else np.int64)
    if dtype in _SIGNED:
        lo, hi = -(1 << (8 * width - 1)), (1 << (8 * width - 1)) - 1
        target = np.dtype(_SIGNED[dtype])
    else:
        lo, hi = 0, (1 << (8 * width)) - 1
        target = dtypes.uint_of_width(width)
    if values.size and (int(values.min()) < lo or int(values.max()) > hi):
        return None
    return values.astype(target).tobytes()


def _refill(onnx, t, form: str, dtype: str, data) -> None:
    """Store raw bytes back into ``t`` the way ``form`` says."""
    if form == "raw_data":
        t.raw_data = bytes(data)
    elif form in ("empty", "external"):
        return
    elif form in ("float_data", "double_data"):
        number = onnx.TensorProto.DESCRIPTOR.fields_by_name[form].number
        data = bytes(data)
        t.MergeFromString(_varint(number << 3 | 2) + _varint(len(data)) + data)
    else:
        width = dtypes.ITEMSIZE[dtype]
        src = np.dtype(_SIGNED[dtype]) if dtype in _SIGNED else dtypes.uint_of_width(width)
        values = np.frombuffer(data, dtype=src)
        getattr(t, form).extend(values.astype(np.uint64 if form == "uint64_data" else np.int64).tolist())


def _storage(t, onnx) -> str | None:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return "external"
    forms = [f for f in _DATA_FIELDS if (t.HasField(f) if f == "raw_data" else len(getattr(t, f)) > 0)]
    if len(forms) == 1:
        return forms[0]
    return "empty" if not forms else None


def _external_ref(t) -> dict:
    kv = {e.key: e.value for e in t.external_data}
    if "location" not in kv:
        raise WeightsError("external data without a location", tensor=t.name)
    try:
        offset = int(kv.get("offset", "0"))
        length = int(kv["length"]) if "length" in kv else None
    except ValueError as e:
        raise WeightsError(f"invalid external data offset/length: {e}", tensor=t.name) from e
    if offset < 0 or (length is not None and length < 0):
        raise WeightsError("negative external data offset/length", tensor=t.name)
    return {"location": kv["location"], "offset": offset, "length": length}


@dataclass
class OnnxTensor:
    """One initializer: safetensors dtype, shape, raw bytes, and how the file stored it."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview
    storage: str  # raw_data | float_data | int32_data | int64_data | double_data | uint64_data | external | empty
    location: str | None = None  # external data file, relative to the model's directory

    def __iter__(self):  # unpacks as (dtype, shape, data)
        return iter((self.dtype, self.shape, self.data))


def load_onnx(path: str | os.PathLike[str], *, check: bool = True) -> tuple[bytes, dict[str, OnnxTensor]]:
    """Split an ONNX model into ``(skeleton, {name: OnnxTensor})``.

    ``check`` serializes the parsed model once to record whether the file is
    in protobuf's canonical form (then rebuild is byte-identical).
    """
    onnx = _onnx()
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_ONNX_SIZE:
                raise WeightsError(f"{size} bytes exceeds protobuf's 2 GiB limit", path=path)
            data = f.read()
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot read: {e.strerror or e}") from e
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # google.protobuf.message.DecodeError
        raise WeightsError(f"not an ONNX model: {e}", path=path) from e
    if not model.HasField("graph"):
        raise WeightsError("not an ONNX model: no graph", path=path)
    canonical = model.SerializeToString() == data if check else None
    del data
    base_dir = os.path.dirname(os.path.abspath(path))
    tensors: dict[str, OnnxTensor] = {}
    forms: dict[str, str] = {}
    ext_files: dict[str, dict] = {}
    ext_cache: dict[str, bytes] = {}
    for t in _initializers(model.graph, onnx):
        dtype = _dtype_of(onnx, t.data_type)
        form = _storage(t, onnx)
        if dtype is None or form is None or form == "string_data" or t.HasField("segment"):
            continue  # stays whole in the skeleton
        if t.name in tensors or not t.name:
            raise WeightsError(f"initializer name {t.name!r} is empty or not unique across graphs", path=path)
        shape = tuple(int(d) for d in t.dims)
        if any(d < 0 for d in shape):
            raise WeightsError(f"negative dimension in {list(shape)}", path=path, tensor=t.name)
        nbytes = math.prod(shape) * dtypes.ITEMSIZE[dtype]
        location = None
        if form == "external":
            ref = _external_ref(t)
            location = ref["location"]
            full = safe_relative_path(base_dir, location, what="external data location", source=path)
            if location not in ext_cache:
                try:
                    with open(full, "rb") as f:
                        ext_cache[location] = f.read()
                except OSError as e:
                    raise NnpatchIOError(f"{full}: cannot read external data: {e.strerror or e}") from e
            blob = ext_cache[location]
            off, length = ref["offset"], ref["length"]
            if length is None:
                length = len(blob) - off
            if length != nbytes or off + length > len(blob):
                raise WeightsError(f"external data {location!r} [{off}, +{length}) does not hold the "
                                   f"{nbytes} bytes dtype {dtype} and shape {list(shape)} need "
                                   f"(file is {len(blob)} bytes)", path=path, tensor=t.name)
            raw = memoryview(blob)[off:off + nbytes]
            ext_files.setdefault(location, {"ranges": []})["ranges"].append((off, nbytes))
        elif form == "raw_data":
            raw = t.raw_data
            if len(raw) != nbytes:
                raise WeightsError(f"raw_data holds {len(raw)} bytes, dtype {dtype} and shape {list(shape)} need "
                                   f"{nbytes}", path=path, tensor=t.name)
            t.ClearField("raw_data")
        elif form == "empty":
            if nbytes:
                continue  # no data at all for a non-empty tensor: leave it as it is
            raw = b""
        else:
            if _TYPED_FIELD.get(dtype) != form:
                continue
            raw = _typed_to_raw(onnx, t, form, dtype)
            if raw is None or len(raw) != nbytes:
                continue
            probe = onnx.TensorProto()
            probe.CopyFrom(t)
            probe.ClearField(form)
            _refill(onnx, probe, form, dtype, raw)
            if probe.SerializeToString() != t.SerializeToString():
                continue  # an unusual encoding of the values: keep it whole in the skeleton
            t.ClearField(form)
        tensors[t.name] = OnnxTensor(dtype, shape, raw, form, location)
        forms[t.name] = form
    names = collections.Counter(t.name for t in _initializers(model.graph, onnx))
    if any(names[n] > 1 for n in tensors):
        raise WeightsError("an initializer nnpatch carries shares its name with another one", path=path)
    externals = {}
    for location, info in sorted(ext_files.items()):
        blob = ext_cache[location]
        externals[location] = {"size": len(blob), "gaps": _gaps(blob, info["ranges"])}
    # an applier refuses more padding than this (check_skeleton_fits): say so here, not there
    padding = sum(n for e in externals.values() for _, n, _ in e["gaps"])
    carried = sum(memoryview(t.data).nbytes for t in tensors.values())
    if padding > carried + GAP_ALLOWANCE:
        raise WeightsError(f"its external data files hold {padding} bytes that are not initializers nnpatch "
                           f"carries (more than their {carried} bytes of tensors plus {GAP_ALLOWANCE})", path=path)
    header = {"canonical": canonical, "externals": externals, "storage": forms, "version": 1}
    hjson = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    skeleton = SKELETON_MAGIC + struct.pack("<I", len(hjson)) + hjson + model.SerializeToString(deterministic=True)
    return skeleton, tensors


def _gaps(blob: bytes, ranges: list[tuple[int, int]]) -> list[list]:
    """Bytes of an external file no tensor covers: [offset, length, base64 or "" when all zero]."""
    out = []
    cursor = 0
    for off, n in sorted(ranges) + [(len(blob), 0)]:
        if off > cursor:
            chunk = blob[cursor:off]
            out.append([cursor, off - cursor, "" if not any(chunk) else base64.b64encode(chunk).decode("ascii")])
        cursor = max(cursor, off + n)
    return out


#: Every way a skeleton may say a tensor's payload is stored.
STORAGE_FORMS = frozenset(("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                           "external", "empty"))
#: Padding in external data files (alignment, free space between tensors) that a patch may ask an applier
#: to write beyond the target's own bytes: onnx aligns tensors to 64 KiB at most, so this is generous.
GAP_ALLOWANCE = 1 << 20
_HEADER_KEYS = frozenset(("canonical", "externals", "storage", "version"))
_MAX_TENSOR_BYTES = 1 << 62


@dataclass
class Skeleton:
    """A skeleton whose header and graph were checked against each other (:func:`read_skeleton`).

    ``externals``: location -> (size, [(offset, length, bytes or None for zeros)]);
    ``stored``: name -> (safetensors dtype, shape, form, location or None, offset);
    ``proto``: the serialized stripped ModelProto, parsed afresh by each rebuild.
    """

    header: dict
    proto: bytes
    externals: dict[str, tuple[int, list[tuple[int, int, bytes | None]]]]
    stored: dict[str, tuple[str, tuple[int, ...], str, str | None, int]]

    @property
    def tensor_bytes(self) -> int:
        return sum(math.prod(shape) * dtypes.ITEMSIZE[dtype] for dtype, shape, *_ in self.stored.values())

    @property
    def gap_bytes(self) -> int:
        return sum(n for _, gaps in self.externals.values() for _, n, _ in gaps)


def _is_int(v) -> bool:
    return type(v) is int  # bool is an int to isinstance, and JSON true is no size


def _plain_location(location) -> bool:
    return (isinstance(location, str) and location != "" and "\\" not in location and "\x00" not in location
            and not location.startswith("/") and not any(p in ("", ".", "..") for p in location.split("/")))


def parse_skeleton(skeleton: bytes) -> tuple[dict, bytes]:
    """(header, serialized stripped ModelProto); the header's fields are checked, not the graph."""
    skeleton = bytes(skeleton)
    if not skeleton.startswith(SKELETON_MAGIC) or len(skeleton) < len(SKELETON_MAGIC) + 4:
        raise WeightsError("not an nnpatch ONNX skeleton")
    (n,) = struct.unpack_from("<I", skeleton, len(SKELETON_MAGIC))
    start = len(SKELETON_MAGIC) + 4
    if start + n > len(skeleton):
        raise WeightsError("ONNX skeleton header truncated")
    try:
        # parsed whole: nesting and values bounded first (spec 5.7), as for every JSON document read whole
        depth, values = json_shape(skeleton[start:start + n], max_string=MAX_JSON_STRING)
        if depth > MAX_DOCUMENT_DEPTH:
            raise ValueError(f"nesting deeper than {MAX_DOCUMENT_DEPTH} levels")
        if values > MAX_DOCUMENT_VALUES:
            raise ValueError(f"more than {MAX_DOCUMENT_VALUES} values")
        header = loads_strict(skeleton[start:start + n], max_string=None)
    except ValueError as e:  # loads_strict turns bad UTF-8 and nesting past the recursion limit into this
        raise WeightsError(f"invalid ONNX skeleton header: {e}") from e
    if not isinstance(header, dict):
        raise WeightsError("invalid ONNX skeleton header: not a JSON object")
    unknown = sorted(set(header) - _HEADER_KEYS)
    if unknown:
        raise WeightsError(f"invalid ONNX skeleton header: unknown key {unknown[0]!r}")
    if not _is_int(header.get("version")) or header["version"] != 1:
        raise WeightsError(f"ONNX skeleton version {header.get('version')!r} is not 1")
    if header.get("canonical") not in (True, False, None):
        raise WeightsError("ONNX skeleton 'canonical' must be true, false or null")
    storage = header.get("storage")
    if not isinstance(storage, dict):
        raise WeightsError("ONNX skeleton 'storage' must be an object")
    for name, form in storage.items():
        if not name or form not in STORAGE_FORMS:
            raise WeightsError(f"ONNX skeleton 'storage' of {name!r}: {form!r} is not a storage form")
    externals = header.setdefault("externals", {})
    if not isinstance(externals, dict):
        raise WeightsError("ONNX skeleton 'externals' must be an object")
    for location, info in externals.items():
        _check_external(location, info)
    return header, skeleton[start + n:]


def _check_external(location, info) -> None:
    where = f"ONNX skeleton external {location!r}"
    if not _plain_location(location):
        raise WeightsError(f"{where}: not a plain relative path")
    if not isinstance(info, dict) or set(info) != {"size", "gaps"}:
        raise WeightsError(f"{where}: must be an object with exactly 'size' and 'gaps'")
    size, gaps = info["size"], info["gaps"]
    if not _is_int(size) or not 0 <= size < _MAX_TENSOR_BYTES:
        raise WeightsError(f"{where}: size {size!r} is not an integer in [0, 2^62)")
    if not isinstance(gaps, list):
        raise WeightsError(f"{where}: 'gaps' must be a list")
    cursor = 0
    for g in gaps:
        if not (isinstance(g, list) and len(g) == 3 and _is_int(g[0]) and _is_int(g[1]) and isinstance(g[2], str)):
            raise WeightsError(f"{where}: a gap must be [offset, length, base64]")
        off, n, b64 = g
        if off < cursor or n < 1 or off + n > size:
            raise WeightsError(f"{where}: gap [{off}, +{n}) is out of order, empty or past the file's {size} bytes")
        # base64 is 4/3 of its bytes: a length that cannot match is refused before decoding anything
        if b64 and len(b64) != 4 * ((n + 2) // 3):
            raise WeightsError(f"{where}: gap at {off} carries {len(b64)} base64 characters, not {n} bytes")
        cursor = off + n


def _gap_bytes(location: str, off: int, n: int, b64: str) -> bytes | None:
    if not b64:
        return None
    try:
        data = base64.b64decode(b64, validate=True)
    except ValueError as e:  # binascii.Error
        raise WeightsError(f"ONNX skeleton external {location!r}: gap at {off}: invalid base64: {e}") from e
    if len(data) != n:
        raise WeightsError(f"ONNX skeleton external {location!r}: gap at {off} holds {len(data)} bytes, not {n}")
    return data


def _strict_ref(t) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of an external tensor, its numbers plain decimal digits."""
    kv = {}
    for e in t.external_data:
        if e.key in kv:
            raise WeightsError(f"external data key {e.key!r} given twice", tensor=t.name)
        kv[e.key] = e.value
    if set(kv) - {"location", "offset", "length", "checksum"} or "location" not in kv:
        raise WeightsError("external data needs a location and allows only offset, length and checksum",
                           tensor=t.name)
    numbers = []
    for key in ("offset", "length"):
        v = kv.get(key)
        if v is not None and not (v.isascii() and v.isdigit() and len(v) <= 19):
            raise WeightsError(f"external data {key} {v!r} is not a decimal integer", tensor=t.name)
        numbers.append(None if v is None else int(v))
    return kv["location"], numbers[0] or 0, numbers[1]


def read_skeleton(skeleton: bytes | Skeleton) -> Skeleton:
    """Parse a skeleton and check it all before anything is built from it: the header's fields,
    the graph, every stored initializer against its storage form, and every external file's
    tensors and gaps, which must tile it exactly. Anything malformed is a WeightsError."""
    if isinstance(skeleton, Skeleton):
        return skeleton
    onnx = _onnx()
    header, proto = parse_skeleton(skeleton)
    model = _parse_model(onnx, proto)
    storage, externals = header["storage"], header["externals"]
    stored: dict[str, tuple] = {}
    ranges: dict[str, list[tuple[int, int]]] = {loc: [] for loc in externals}
    referenced: set[str] = set()
    for t in _initializers(model.graph, onnx):
        form = storage.get(t.name)
        if form is None:
            continue
        if t.name in stored:
            raise WeightsError("stored initializer name is not unique across graphs", tensor=t.name)
        dtype = _dtype_of(onnx, t.data_type)
        if dtype is None or t.HasField("segment"):
            raise WeightsError(f"storage form {form!r} given to an initializer nnpatch does not carry",
                               tensor=t.name)
        shape = tuple(t.dims)
        if any(d < 0 or d >= _MAX_TENSOR_BYTES for d in shape) or \
                math.prod(shape) * dtypes.ITEMSIZE[dtype] >= _MAX_TENSOR_BYTES:
            raise WeightsError(f"dimensions {list(shape)} are negative or too large", tensor=t.name)
        nbytes = math.prod(shape) * dtypes.ITEMSIZE[dtype]
        left = [f for f in _DATA_FIELDS if (t.HasField(f) if f == "raw_data" else len(getattr(t, f)) > 0)]
        if left:
            raise WeightsError(f"the skeleton still holds its {left[0]}", tensor=t.name)
        external = t.data_location == onnx.TensorProto.EXTERNAL
        if external != (form == "external"):
            raise WeightsError(f"storage form {form!r} disagrees with its data_location", tensor=t.name)
        location, offset = None, 0
        if form == "external":
            location, offset, length = _strict_ref(t)
            if location not in externals:
                raise WeightsError(f"external data file {location!r} is not in the skeleton's externals",
                                   tensor=t.name)
            if length is not None and length != nbytes:
                raise WeightsError(f"external data length {length} is not the tensor's {nbytes} bytes",
                                   tensor=t.name)
            if offset + nbytes > externals[location]["size"]:
                raise WeightsError(f"external data [{offset}, +{nbytes}) is past the end of {location!r}",
                                   tensor=t.name)
            referenced.add(location)
            if nbytes:
                ranges[location].append((offset, nbytes))
        elif form == "empty":
            if nbytes:
                raise WeightsError(f"storage form 'empty' for a tensor of {nbytes} bytes", tensor=t.name)
        elif form != "raw_data" and _TYPED_FIELD[dtype] != form:
            raise WeightsError(f"a {dtype} tensor cannot be stored in {form}", tensor=t.name)
        stored[t.name] = (dtype, shape, form, location, offset)
    missing = set(storage) - set(stored)
    if missing:
        raise WeightsError(f"skeleton lists {sorted(missing)[0]!r} but its graph does not")
    files = {}
    for location, info in externals.items():
        gaps = [(off, n, _gap_bytes(location, off, n, b64)) for off, n, b64 in info["gaps"]]
        if location not in referenced:
            raise WeightsError(f"ONNX skeleton external {location!r} holds no tensor")
        _check_tiling(location, info["size"], ranges[location], gaps)
        files[location] = (info["size"], gaps)
    return Skeleton(header, proto, files, stored)


def _parse_model(onnx, proto: bytes):
    model = onnx.ModelProto()
    try:
        model.ParseFromString(proto)
    except Exception as e:  # google.protobuf.message.DecodeError, and whatever a hostile message raises
        raise WeightsError(f"ONNX skeleton: not an ONNX model: {e}") from e
    if not model.HasField("graph"):
        raise WeightsError("ONNX skeleton: not an ONNX model: no graph")
    return model


def _check_tiling(location: str, size: int, tensors: list[tuple[int, int]], gaps: list) -> None:
    """Tensors (which may share bytes) and gaps must cover [0, size) exactly, gaps overlapping nothing:
    then the file's size is accounted for by bytes the applier has or the patch carries."""
    merged: list[list[int]] = []
    for off, n in sorted(tensors):
        if merged and off <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], off + n)
        else:
            merged.append([off, off + n])
    cursor = 0
    for begin, end in sorted([(a, b) for a, b in merged] + [(off, off + n) for off, n, _ in gaps]):
        if begin != cursor:
            raise WeightsError(f"ONNX skeleton external {location!r}: bytes from {min(begin, cursor)} are "
                               f"{'covered twice' if begin < cursor else 'neither a tensor nor a gap'}")
        cursor = end
    if cursor != size:
        raise WeightsError(f"ONNX skeleton external {location!r}: tensors and gaps end at {cursor}, "
                           f"the file is {size} bytes")


def check_skeleton_fits(sk: Skeleton, outputs: dict[str, int], target_size: int) -> None:
    """The skeleton against the patch header: its external files are exactly the patch's
    ``outputs`` (path -> size) after the model file, the tensors it stores fit in the target's
    safetensors rendering (``target.size``), and the gaps add at most that plus GAP_ALLOWANCE."""
    if set(sk.externals) != set(outputs):
        odd = sorted(set(sk.externals) ^ set(outputs))[0]
        raise WeightsError(f"external data file {odd!r} is not both in the skeleton and in the target's outputs")
    for location, (size, _) in sk.externals.items():
        if size != outputs[location]:
            raise WeightsError(f"external data file {location!r} is {size} bytes in the skeleton, "
                               f"{outputs[location]} in the target's outputs")
    if sk.tensor_bytes > target_size:
        raise WeightsError(f"the skeleton stores {sk.tensor_bytes} bytes of tensors, more than the target's "
                           f"{target_size}")
    if sk.gap_bytes > target_size + GAP_ALLOWANCE:
        raise WeightsError(f"the external data files hold {sk.gap_bytes} bytes besides tensors, more than the "
                           f"target's size plus {GAP_ALLOWANCE}")


def _payload(name: str, dtype: str, shape, value):
    if isinstance(value, OnnxTensor) or isinstance(value, tuple):
        vd, vs, data = tuple(value)
        if vd != dtype or tuple(vs) != tuple(shape):
            raise WeightsError(f"is {vd}{list(vs)} but the graph declares {dtype}{list(shape)}", tensor=name)
    else:
        data = value
    n = math.prod(shape) * dtypes.ITEMSIZE[dtype]
    if memoryview(data).nbytes != n:
        raise WeightsError(f"{memoryview(data).nbytes} bytes do not fit {dtype}{list(shape)}", tensor=name)
    return data


def rebuild_onnx(skeleton: bytes | Skeleton, tensors: dict) -> bytes:
    """The ``.onnx`` file's bytes: the skeleton with every payload back in its original form.

    ``tensors`` maps name -> ``(dtype, shape, bytes)``, an :class:`OnnxTensor`
    or plain bytes; each must fit the dtype and shape the graph declares.
    """
    onnx = _onnx()
    sk = read_skeleton(skeleton)
    model = _parse_model(onnx, sk.proto)
    missing = set(sk.stored) - set(tensors)
    if missing:
        raise WeightsError("missing from the tensors to rebuild", tensor=sorted(missing)[0])
    extra = set(tensors) - set(sk.stored)
    if extra:
        raise WeightsError(f"not an initializer of this graph: {sorted(extra)[0]!r}")
    for t in _initializers(model.graph, onnx):
        if t.name in sk.stored:
            dtype, shape, form, _, _ = sk.stored[t.name]
            _refill(onnx, t, form, dtype, _payload(t.name, dtype, shape, tensors[t.name]))
    return model.SerializeToString(deterministic=True)


def rebuild_external(skeleton: bytes | Skeleton, tensors: dict) -> dict[str, bytes]:
    """Each external data file's bytes (location -> bytes), byte-identical to the original layout."""
    sk = read_skeleton(skeleton)
    files = {}
    for location, (size, gaps) in sk.externals.items():
        buf = bytearray(size)
        for off, n, data in gaps:
            if data is not None:
                buf[off:off + n] = data
        files[location] = buf
    for name, (dtype, shape, form, location, offset) in sk.stored.items():
        if form != "external":
            continue
        if name not in tensors:
            raise WeightsError("missing from the tensors to rebuild", tensor=name)
        data = memoryview(_payload(name, dtype, shape, tensors[name])).cast("B")
        files[location][offset:offset + data.nbytes] = data  # in bounds: read_skeleton checked the tiling
    return {k: bytes(v) for k, v in files.items()}


def write_onnx(path: str | os.PathLike[str], skeleton: bytes, tensors: dict) -> None:
    """Write the model and its external data files: external files first, the ``.onnx`` last,
    each atomically. Locations are validated against the model's directory."""
    path = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    model_bytes = rebuild_onnx(skeleton, tensors)
    for location, blob in rebuild_external(skeleton, tensors).items():
        # directories a skeleton names are never created: they exist, or the write fails
        full = safe_relative_path(base_dir, location, what="external data location", source=path)
        with atomic_write(full) as f:
            f.write(blob)
    with atomic_write(path) as f:
        f.write(model_bytes)


class OnnxModel(Model):
    """An ONNX model as a :class:`~nnpatch.weights.model.Model` (initializers as tensors)."""

    def __init__(self, path: str) -> None:
        onnx = _onnx()
        self.skeleton, self.initializers = load_onnx(path)
        header, proto = parse_skeleton(self.skeleton)
        base = os.path.basename(path)
        tensors = {}
        for name in canonical_order(self.initializers):
            t = self.initializers[name]
            tensors[name] = ModelTensor(name, t.dtype, t.shape, memoryview(t.data).nbytes, t.location or base)
        m = onnx.ModelProto()
        m.ParseFromString(proto)
        metadata = {"ir_version": str(m.ir_version), "producer_name": m.producer_name,
                    "producer_version": m.producer_version,
                    "opset": ",".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in m.opset_import)}
        metadata.update({p.key: p.value for p in m.metadata_props})
        self.canonical = header.get("canonical")
        files = [ModelFile(base, os.path.getsize(path), False, tuple(n for n, t in tensors.items() if t.file == base))]
        for location, info in sorted(header.get("externals", {}).items()):
            files.append(ModelFile(location, info["size"], False,
                                   tuple(n for n, t in tensors.items() if t.file == location)))
        super().__init__("onnx", path, tensors, metadata, files)

    def raw(self, name: str) -> np.ndarray:
        data = self.initializers[name].data
        arr = np.frombuffer(data, dtype=np.uint8)
        arr.flags.writeable = False
        return arr
