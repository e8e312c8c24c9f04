"""LiteRT (TFLite) flatbuffers as a :class:`~nnpatch.weights.model.Model`.

A ``.tflite`` file is a flatbuffer (file identifier ``TFL3`` at bytes 4..8)
whose ``Model`` table holds subgraphs of tensors and a table of buffers; a
tensor names its buffer by index. nnpatch patches it as an ``extents``
target (:mod:`.extents`), like GGUF: every non-empty buffer a tensor uses is
one extent, and every other byte (the graph, the operators, quantization
scales and zero points, metadata buffers, alignment padding) is skeleton,
which the patch carries whole. A per-channel int8 model's new scales
therefore travel in the skeleton, and its int8 rows in the ops.

Where a buffer's bytes are:

- inline: ``Buffer.data``, a ``[ubyte]`` vector inside the flatbuffer (the
  schema asks for 16-byte alignment, converters do not always give it; the
  extent is the vector's data wherever it is, carried exactly);
- by offset (models past 2 GB): ``Buffer.offset`` (> 1) and ``Buffer.size``
  point at bytes after the flatbuffer, counted from the file's start;
- in an external weight file (``Tensor.external_buffer``): refused, since an
  extents target writes one file (spec 5.8).

Buffers are patched, not tensors: the converter shares one buffer among
tensors with identical bytes, and a change made once to the buffer is right
for every tensor that reads it. A buffer's key is its first tensor's
(subgraph, name) as ``"<subgraph>/<name>"``; where names were stripped (or
repeat within a subgraph) it is ``"<subgraph>/#<tensor index>"``, and the
base buffer's BLAKE3, which every op carries, is what proves it is the same
tensor (``show`` says so under ``tflite.keys``).

Its dtype and shape are its first tensor's where they match the buffer's
size (so dimension 0 is a conv's output channel, OHWI, or a fully connected
layer's output, [out, in], and a row op sends whole channels; a depthwise
conv, [1, H, W, C], is one row and changes go as elements); otherwise (int4,
strings, sparse tensors) it is ``U8`` of its byte size.

The flatbuffer is read with :mod:`.flatbuffer`'s bounds-checked reads of
the few fields nnpatch needs, not with the generated accessors of
``ai_edge_litert.schema_py_generated``: those check nothing (a crafted
offset reads from the other end of the file, a string past the end is cut
short silently), and a crafted file must be refused with one line. So no
package is needed to read TFLite. The field slots follow schema.fbs; the
tests read every fixture with the generated code as the second opinion.
"""

from __future__ import annotations

import re

from ..dtypes import ITEMSIZE
from .extents import MAX_NAME, Extent
from .flatbuffer import Flatbuffer
from .model import MappedExtentsModel

#: The flatbuffer file identifier of the TFLite schema, at bytes 4..8.
IDENTIFIER = b"TFL3"
#: Below this a buffer's offset means "no data" (the TFLite runtime reads ``offset > 1``).
_NO_OFFSET = 1
#: Tensor dimensions nnpatch takes (TFLite has no hard limit; safetensors shapes are small).
MAX_DIMS = 16
#: A metadata value shown by ``show``/``textconv`` is cut to this many characters.
SHOWN = 200

# vtable slots (field ids in schema.fbs)
_MODEL_VERSION, _MODEL_SUBGRAPHS, _MODEL_DESCRIPTION, _MODEL_BUFFERS, _MODEL_EXTERNAL_BUFFERS = 0, 2, 3, 4, 9
_SUBGRAPH_TENSORS = 0
_TENSOR_SHAPE, _TENSOR_TYPE, _TENSOR_BUFFER, _TENSOR_NAME, _TENSOR_EXTERNAL = 0, 1, 2, 3, 10
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2

#: TensorType -> (its name, the safetensors dtype of its items or None: stored as U8 bytes).
TENSOR_TYPES = {
    0: ("FLOAT32", "F32"), 1: ("FLOAT16", "F16"), 2: ("INT32", "I32"), 3: ("UINT8", "U8"),
    4: ("INT64", "I64"), 5: ("STRING", None), 6: ("BOOL", "BOOL"), 7: ("INT16", "I16"),
    8: ("COMPLEX64", "C64"), 9: ("INT8", "I8"), 10: ("FLOAT64", "F64"), 11: ("COMPLEX128", None),
    12: ("UINT64", "U64"), 13: ("RESOURCE", None), 14: ("VARIANT", None), 15: ("UINT32", "U32"),
    16: ("UINT16", "U16"), 17: ("INT4", None), 18: ("BFLOAT16", "BF16"), 19: ("INT2", None),
    20: ("UINT4", None), 21: ("FLOAT8_E4M3FN", "F8_E4M3"), 22: ("FLOAT8_E5M2", "F8_E5M2"),
}


_INDEX_KEY = re.compile(r"[0-9]+/#[0-9]+")


def is_index_key(key: str) -> bool:
    """Whether ``key`` is spelt as the key of a tensor without a unique name, ``<subgraph>/#<index>``."""
    return _INDEX_KEY.fullmatch(key) is not None


def _text(raw: bytes | None) -> str:
    s = (raw or b"").decode("utf-8", "replace")
    return s if len(s) <= SHOWN else s[:SHOWN] + "…"


def parse(buf, path: str):
    """(metadata shown as text, [(extent, dtype, shape)]) of the TFLite bytes ``buf``: one extent per
    non-empty buffer a tensor uses, keyed and typed by its first tensor (see the module docstring)."""
    fb = Flatbuffer(buf, path, "TFLite")
    if len(buf) < 8 or bytes(buf[4:8]) != IDENTIFIER:
        fb.fail("no TFL3 identifier at bytes 4..8")
    model = fb.table(fb.deref(0, "the root offset"), "the model")
    _, n_external = model.vector(_MODEL_EXTERNAL_BUFFERS, 4)
    buffers = model.tables(_MODEL_BUFFERS, "buffer")
    subgraphs = model.tables(_MODEL_SUBGRAPHS, "subgraph")
    users: dict[int, list[tuple[str, int, int, tuple[int, ...]]]] = {}  # buffer -> [(key, sg, type, shape)]
    for s, sg in enumerate(subgraphs):
        tensors = sg.tables(_SUBGRAPH_TENSORS, f"subgraph {s}'s tensor")
        names = [t.string(_TENSOR_NAME) for t in tensors]
        counts: dict[bytes, int] = {}
        for n in names:
            counts[n or b""] = counts.get(n or b"", 0) + 1
        keys = set()
        for i, t in enumerate(tensors):
            what = f"subgraph {s}'s tensor {i}"
            if t.scalar(_TENSOR_EXTERNAL, "<I", 0):
                fb.fail(f"{what} keeps its data in an external weight file (ExternalBuffer), which nnpatch "
                        "does not patch yet")
            b = t.scalar(_TENSOR_BUFFER, "<I", 0)
            if b >= len(buffers):
                fb.fail(f"{what} names buffer {b}, past the {len(buffers)} of the buffer table")
            start, rank = t.vector(_TENSOR_SHAPE, 4)
            if rank > MAX_DIMS:
                fb.fail(f"{what} has {rank} dimensions (at most {MAX_DIMS})")
            shape = tuple(fb.scalar("<i", start + 4 * d, f"{what}'s shape") for d in range(rank))
            ttype = t.scalar(_TENSOR_TYPE, "<b", 0)
            name = names[i]
            try:  # a name a patch cannot carry (spec 5.3: 1 to 65,536 UTF-8 bytes) keys by index too
                text = name.decode("utf-8") if name and counts[name] == 1 and len(name) <= MAX_NAME else None
            except UnicodeDecodeError:
                text = None
            if text is None:
                key = f"{s}/#{i}"
            else:
                key = f"{s}/{text}"
            if key in keys:  # a real name spelt like an index key
                fb.fail(f"{what}: the key {key!r} is taken twice")
            keys.add(key)
            users.setdefault(b, []).append((key, s, ttype, shape))
    out, modes, sharers_of = [], set(), {}
    for b, sharers in sorted(users.items()):
        buffer = buffers[b]
        what = f"buffer {b}"
        data, n = buffer.vector(_BUFFER_DATA, 1)
        offset = buffer.scalar(_BUFFER_OFFSET, "<Q", 0)
        size = buffer.scalar(_BUFFER_SIZE, "<Q", 0)
        if n and offset > _NO_OFFSET:
            fb.fail(f"{what} has both inline data and an offset")
        if offset > _NO_OFFSET:
            if size > fb.size or offset > fb.size - size:
                fb.fail(f"{what} ({size} bytes at {offset}) runs past the end of the {fb.size}-byte file")
            data, n = offset, size
        if not n:
            continue  # an activation, or a tensor filled at run time: nothing stored
        key, _, ttype, shape = sharers[0]
        sharers_of[key] = sharers
        tname, dtype = TENSOR_TYPES.get(ttype, (f"TYPE{ttype & 0xff}", None))
        numel = 1
        for d in shape:
            numel = numel * d if d >= 0 else -1
        if dtype is None or numel < 0 or numel * ITEMSIZE[dtype] != n:
            dtype, shape = "U8", (n,)  # packed, strings, sparse or shape-less: bytes
        if not shape:
            row = n
        else:
            row = n // shape[0] if shape[0] else 0
        modes.add("offset" if offset > _NO_OFFSET else "inline")
        out.append((Extent(key, data, n, row, tname), dtype, shape))
    ordered = sorted(out, key=lambda e: e[0].offset)
    for prev, cur in zip(ordered, ordered[1:]):
        if cur[0].offset < prev[0].end:
            fb.fail(f"the buffers of {prev[0].name!r} and {cur[0].name!r} overlap")
    by_index = sum(1 for e, _, _ in out if is_index_key(e.name))
    metadata = {
        "tflite.version": str(model.scalar(_MODEL_VERSION, "<I", 0)),
        "tflite.subgraphs": str(len(subgraphs)),
        "tflite.buffers": str(len(buffers)),
        "tflite.storage": "+".join(sorted(modes)) or "no tensor data",
        "tflite.keys": ("(subgraph, name)" if not by_index else
                        f"(subgraph, name); {by_index} buffers whose tensor has no unique name keyed as "
                        "'<subgraph>/#<tensor index>', checked by the base buffer's BLAKE3"),
    }
    shared = sum(1 for e, _, _ in out if len(sharers_of[e.name]) > 1)
    if shared:
        metadata["tflite.shared_buffers"] = f"{shared} buffers read by several tensors, patched once each"
    description = model.string(_MODEL_DESCRIPTION)
    if description:
        metadata["tflite.description"] = _text(description)
    if n_external:
        metadata["tflite.external_buffers"] = str(n_external)
    return metadata, out


class TfliteModel(MappedExtentsModel):
    """A TFLite file's tensor buffers, zero-copy over a read-only map, and its extents for the patch."""

    def __init__(self, path: str) -> None:
        super().__init__("tflite", path, parse)
