"""Which format a model is in, and the reader that opens it.

:func:`open_model` recognises a model by its content, never by its suffix:

=================  ===========================================================
kind               recognised by
=================  ===========================================================
``safetensors``    a file: 8-byte little-endian header length, then ``{``
``safetensors-dir`` a directory with ``model.safetensors.index.json``
                   (Hugging Face shards) or with a single ``model.safetensors``
                   (Hugging Face layout: weights plus config.json, tokenizer...)
``pytorch``        a file: a zip archive holding ``*/data.pkl`` (torch.save),
                   or the pickle magic of torch's legacy format
``onnx``           a file: a protobuf ``ModelProto`` (field 1, ir_version,
                   first), parsed with the ``onnx`` package
``gguf``           a file starting with the magic ``GGUF`` (llama.cpp)
``tflite``         a file with the flatbuffer identifier ``TFL3`` at bytes
                   4..8 (LiteRT / TensorFlow Lite)
``ptd``            a file with the flatbuffer identifier ``FT01`` at bytes
                   4..8 (ExecuTorch named data)
=================  ===========================================================
"""

from __future__ import annotations

import os
import struct
import zipfile

from ..errors import NnpatchIOError, WeightsError
from .model import Model
from .safetensors_file import MAX_HEADER_SIZE, SafetensorsModel
from .gguf_file import MAGIC as GGUF_MAGIC, GgufModel
from .onnx_file import OnnxModel
from .ptd_file import IDENTIFIER as PTD_IDENTIFIER, PtdModel
from .tflite_file import IDENTIFIER as TFLITE_IDENTIFIER, TfliteModel
from .sharded import INDEX_NAME, SINGLE_NAME, SafetensorsDirModel
from .torch_file import TORCH_LEGACY_MAGIC, ZIP_MAGIC, TorchModel


def sniff(path: str | os.PathLike[str]) -> str:
    """The kind of model at ``path``, from its content; WeightsError if none."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, INDEX_NAME)):
            return "safetensors-dir"
        if os.path.isfile(os.path.join(path, SINGLE_NAME)):
            return "safetensors-dir"
        raise WeightsError(f"directory has neither {INDEX_NAME} nor {SINGLE_NAME}", path=path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(16)
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot open: {e.strerror or e}") from e
    if head.startswith(ZIP_MAGIC):
        if _is_torch_zip(path):
            return "pytorch"
        raise WeightsError("a zip archive, but not a PyTorch checkpoint (no data.pkl)", path=path)
    if head.startswith(GGUF_MAGIC):
        return "gguf"
    if head[4:8] == TFLITE_IDENTIFIER:
        return "tflite"
    if head[4:8] == PTD_IDENTIFIER:
        return "ptd"
    if head.startswith(TORCH_LEGACY_MAGIC):
        return "pytorch"
    if len(head) >= 9:
        (n,) = struct.unpack_from("<Q", head, 0)
        if n <= MAX_HEADER_SIZE and 8 + n <= size and head[8:9] == b"{":
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] <= 64:
        return "onnx"  # ModelProto field 1 (ir_version), as every ONNX writer puts first
    raise WeightsError("not a model nnpatch can read (safetensors, PyTorch checkpoint, ONNX, GGUF, TFLite, "
                       "ExecuTorch .ptd, or a Hugging Face model directory)", path=path)


def _is_torch_zip(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def open_model(path: str | os.PathLike[str]) -> Model:
    """Open any supported model; see the module docstring for how each kind is recognised."""
    path = os.fspath(path)
    kind = sniff(path)
    if kind == "safetensors":
        return SafetensorsModel(path)
    if kind == "safetensors-dir":
        return SafetensorsDirModel(path, index=os.path.isfile(os.path.join(path, INDEX_NAME)))
    if kind == "pytorch":
        return TorchModel(path)
    if kind == "gguf":
        return GgufModel(path)
    if kind == "tflite":
        return TfliteModel(path)
    if kind == "ptd":
        return PtdModel(path)
    return OnnxModel(path)
