"""Model readers and writers.

Files are recognised by their content, not their suffix. The core speaks
safetensors; other formats (PyTorch checkpoints, ONNX) plug in here without
the rest of nnpatch knowing.
"""

from .model import KINDS, Model, ModelFile, ModelTensor
from .safetensors_file import (
    MAX_HEADER_SIZE,
    SafetensorsFile,
    TensorInfo,
    encode_safetensors_header,
    open_safetensors,
    parse_safetensors_header,
    write_safetensors,
)
from .sniff import open_model, sniff

__all__ = [
    "KINDS",
    "Model",
    "ModelFile",
    "ModelTensor",
    "open_model",
    "sniff",
    "MAX_HEADER_SIZE",
    "SafetensorsFile",
    "TensorInfo",
    "encode_safetensors_header",
    "open_safetensors",
    "parse_safetensors_header",
    "write_safetensors",
]
