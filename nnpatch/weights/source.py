"""Any model, seen the way diff and apply see a safetensors file.

Patches are keyed by tensor name, so a base may be any format nnpatch reads
(a PyTorch checkpoint, a sharded Hugging Face directory, ONNX) and a target
that is not a single safetensors file is written as one, in the layout the
safetensors reference writer would give it. ``open_source`` returns a real
``SafetensorsFile`` for safetensors files (so apply keeps its zero-copy
paths) and a ``ModelSource`` otherwise.
"""

from __future__ import annotations

import os

import blake3
import numpy as np

from .. import dtypes
from ..hashing import directory_digest, hash_file
from .model import Model
from .safetensors_file import SafetensorsFile, TensorInfo, encode_safetensors_header
from .sniff import open_model, sniff


class ModelSource:
    """Read-only tensors of a non-safetensors model with the SafetensorsFile surface.

    ``tensors`` maps names to TensorInfo whose offsets are those of the
    canonical safetensors serialization (``header_bytes``), which is what
    ``canonical_digest`` hashes; ``path``/``size``/``file_digest`` describe the
    model as it is on disk.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self.kind = model.kind
        self.path = model.path
        self.metadata = model.metadata if isinstance(model.metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in model.metadata.items()) else None
        sizes = {n: (t.dtype, t.shape, t.nbytes) for n, t in model.tensors.items()}
        self.header_bytes, order = encode_safetensors_header(sizes, self.metadata)
        start = len(self.header_bytes)
        self.tensors: dict[str, TensorInfo] = {}
        for name in order:
            t = model.tensors[name]
            self.tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), start, start + t.nbytes)
            start += t.nbytes
        self.canonical_size = start
        self._file_digests: dict[str, str] | None = None
        if os.path.isdir(self.path):
            self.size = sum(f.size for f in model.files)
        else:
            self.size = os.path.getsize(self.path)

    def raw(self, name: str) -> np.ndarray:
        return self.model.raw(name)

    def bits(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return self.raw(name).view(dtypes.uint_of_width(info.itemsize)).reshape(info.shape)

    def file_digests(self) -> dict[str, str]:
        """BLAKE3 of every file of a model directory, by relative path (computed once)."""
        if self._file_digests is None:
            self._file_digests = {f.path: hash_file(os.path.join(self.path, *f.path.split("/")))
                                  for f in self.model.files}
        return self._file_digests

    def file_digest(self) -> str:
        """BLAKE3 of the file, or for a directory the directory digest (spec, section 8)."""
        if not os.path.isdir(self.path):
            return hash_file(self.path)
        return directory_digest(self.file_digests().items())

    def canonical_digest(self) -> str:
        """BLAKE3 of the safetensors file apply writes for this model as a target."""
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        h.update(self.header_bytes)
        for name in self.tensors:
            h.update(self.raw(name))
        return h.hexdigest()

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_source(path: str | os.PathLike[str]) -> SafetensorsFile | ModelSource:
    path = os.fspath(path)
    if not os.path.isdir(path) and sniff(path) == "safetensors":
        return SafetensorsFile(path)
    return ModelSource(open_model(path))


def path_digest(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(BLAKE3 hex, bytes) of a model on disk: a file's own digest and size, or for a model
    directory its directory digest (spec section 8) and the total size of its files."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return hash_file(path), os.path.getsize(path)
    with open_source(path) as src:
        return src.file_digest(), src.size
