"""The TFLite fixtures of tests/data/tflite, their pairs, and files derived from them for the tests.

``offset_mode`` re-serializes a fixture with every tensor buffer stored by ``Buffer.offset/size``
after the flatbuffer (the layout the converter writes for models past 2 GB), with the schema's own
builder (``ai_edge_litert.tools.flatbuffer_utils``); ``outputs`` runs a file with LiteRT's
interpreter on fixed inputs.
"""

from __future__ import annotations

import os

import numpy as np

litert = __import__("pytest").importorskip("ai_edge_litert")
from ai_edge_litert import schema_py_generated as schema  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402
from ai_edge_litert.tools import flatbuffer_utils  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tflite")
#: (base, target) file names, without ".tflite"
PAIRS = [("cnn", "cnn-channels"), ("cnn", "cnn-moved"), ("cnn", "cnn-bias"),
         ("cnn-int8", "cnn-int8-channels"), ("cnn-int8", "cnn-int8-moved"), ("cnn-int8", "cnn-int8-bias"),
         ("cnn-stripped", "cnn-stripped-channels")]
ALIGN = 16


def fixture(name: str) -> str:
    return os.path.join(DATA, f"{name}.tflite")


def offset_mode(src: str, dst: str) -> str:
    """``src`` written again with each non-empty buffer after the flatbuffer, 16-byte aligned, found by
    ``Buffer.offset`` (from the file's start) and ``Buffer.size``; returns ``dst``."""
    with open(src, "rb") as f:
        model = flatbuffer_utils.read_model_from_bytearray(bytearray(f.read()))
    blobs = []
    for b in model.buffers:
        if b.data is not None and len(b.data):
            blobs.append((b, bytes(np.asarray(b.data, dtype=np.uint8))))
            b.data, b.offset, b.size = None, 1, len(blobs[-1][1])  # offset 1: a placeholder that is written
    head = flatbuffer_utils.convert_object_to_bytearray(model)
    packed = schema.Model.GetRootAs(head, 0)
    pos, tail = -(-len(head) // ALIGN) * ALIGN, bytearray()
    start = pos
    index = {id(b): i for i, b in enumerate(model.buffers)}
    for b, blob in blobs:
        flatbuffer_utils.update_packed_buffer(packed.Buffers(index[id(b)]), offset=pos, size=len(blob))
        tail += bytes(pos - start - len(tail)) + blob
        pos = -(-(pos + len(blob)) // ALIGN) * ALIGN
    with open(dst, "wb") as f:
        f.write(bytes(head) + bytes(start - len(head)) + bytes(tail))
    return dst


def outputs(path: str, seed: int = 0) -> list[np.ndarray]:
    """The model's outputs on fixed random inputs (three batches), for a bit-for-bit comparison."""
    it = Interpreter(model_path=path, num_threads=1)
    it.allocate_tensors()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(3):
        for d in it.get_input_details():
            it.set_tensor(d["index"], rng.standard_normal(d["shape"]).astype(d["dtype"]))
        it.invoke()
        out += [it.get_tensor(d["index"]).copy() for d in it.get_output_details()]
    return out
