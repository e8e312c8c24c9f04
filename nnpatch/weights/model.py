"""The interface every model reader implements, whatever the format.

Every :class:`Model` has ``kind``, ``path``, ``tensors`` (name ->
:class:`ModelTensor`, sorted by UTF-8 name), ``raw(name)`` (a read-only uint8
numpy array, zero-copy over a file map where the format allows), ``metadata``,
``files`` (:class:`ModelFile` for every file that makes up the model) and
``close()`` / context manager. ``hashing.model_digest(model)`` works on any
of them, so two formats of the same weights have the same model digest.

The readers live in their format's module (``safetensors_file``,
``sharded``, ``torch_file``, ``onnx_file``) and import this one;
:mod:`nnpatch.weights.sniff` recognises a model and opens the right reader.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import numpy as np

from .. import dtypes
from ..errors import NnpatchIOError, WeightsError
from ..hashing import model_digest, name_key

KINDS = ("safetensors", "safetensors-dir", "pytorch", "onnx", "gguf", "tflite")
#: The kinds read as an ``extents`` model (spec 5.8): a skeleton plus tensor extents, which an
#: applier rebuilds without knowing the format.
EXTENTS_KINDS = ("gguf", "tflite")
#: Directories never listed as part of a model directory.
SKIPPED_DIRS = frozenset({".git", ".cache"})


@dataclass(frozen=True)
class ModelTensor:
    """A tensor of any format. ``file``/``begin``/``end`` locate it when it
    lies as contiguous bytes in a file (safetensors, ONNX external data)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str | None = None
    begin: int | None = None
    end: int | None = None

    @property
    def itemsize(self) -> int:
        return dtypes.ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelFile:
    """One file of a model: ``path`` relative to the model (POSIX separators)."""

    path: str
    size: int
    shard: bool = False  # a safetensors shard holding tensors of the model
    tensors: tuple[str, ...] = ()


def read_only(arr: np.ndarray) -> np.ndarray:
    """``arr`` with writing disabled (a no-op for arrays over read-only maps)."""
    if arr.flags.writeable:
        arr.flags.writeable = False
    return arr


@dataclass
class Model:
    kind: str
    path: str
    tensors: dict[str, ModelTensor]
    metadata: dict | None = None
    files: list[ModelFile] = field(default_factory=list)

    def raw(self, name: str) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def digest(self) -> bytes:
        """The canonical model digest (hashing.model_digest)."""
        return model_digest(self)[0]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_directory(directory: str) -> list[tuple[str, int]]:
    """(relative POSIX path, size) of every regular file under ``directory``,
    sorted; ``.git`` and ``.cache`` are skipped; symlinks must stay inside."""
    root = os.path.realpath(directory)
    out = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                real = os.path.realpath(full)
                if os.path.commonpath([root, real]) != root:
                    raise WeightsError(f"{os.path.relpath(full, directory)!r} links outside the model directory",
                                       path=directory)
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            real = os.path.realpath(full)
            if os.path.commonpath([root, real]) != root:
                raise WeightsError(f"{rel!r} links outside the model directory", path=directory)
            try:
                st = os.stat(full)
            except OSError as e:
                raise NnpatchIOError(f"{full}: cannot stat: {e.strerror or e}") from e
            if not stat.S_ISREG(st.st_mode):
                continue
            out.append((rel, st.st_size))
    out.sort(key=lambda e: name_key(e[0]))
    return out

