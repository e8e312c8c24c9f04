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

import mmap
import os
import stat
from dataclasses import dataclass, field

import numpy as np

from .. import dtypes
from ..errors import NnpatchIOError, WeightsError
from ..hashing import canonical_order, model_digest, name_key

KINDS = ("safetensors", "safetensors-dir", "pytorch", "onnx", "gguf", "tflite", "ptd")
#: The kinds read as an ``extents`` model (spec 5.8): a skeleton plus tensor extents, which an
#: applier rebuilds without knowing the format.
EXTENTS_KINDS = ("gguf", "tflite", "ptd")
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


class MappedExtentsModel(Model):
    """A one-file model read as tensor extents (spec 5.8) over a read-only map. ``parse(view, path)``
    gives (metadata, [(extent, dtype, shape)]); ``extents`` and ``size`` feed the patch's extent
    table, ``data()`` (the whole file) its skeleton, and ``raw`` is zero-copy."""

    def __init__(self, kind: str, path: str, parse) -> None:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as e:
            raise NnpatchIOError(f"{path}: cannot open: {e.strerror or e}") from e
        self.size = size
        self._view = memoryview(self._map)
        try:
            metadata, entries = parse(self._view, path)
        except BaseException:
            self.close()
            raise
        self.extents = [e for e, _, _ in entries]
        base = os.path.basename(path)
        by_name = {e.name: (e, dtype, shape) for e, dtype, shape in entries}
        tensors = {}
        for name in canonical_order(by_name):
            e, dtype, shape = by_name[name]
            tensors[name] = ModelTensor(name, dtype, shape, e.size, base, e.offset, e.end)
        super().__init__(kind, path, tensors, metadata, [ModelFile(base, size, False, tuple(tensors))])

    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return read_only(np.frombuffer(self._view[t.begin:t.end], dtype=np.uint8))

    def data(self) -> memoryview:
        """The whole file's bytes (for the skeleton)."""
        return self._view

    def close(self) -> None:
        view, self._view = self._view, memoryview(b"")
        try:
            view.release()
            if isinstance(self._map, mmap.mmap):
                self._map.close()
        except BufferError:  # a tensor array still borrows the map: the GC closes it
            pass


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

