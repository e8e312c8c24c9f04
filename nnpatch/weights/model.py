"""One interface over every model format nnpatch reads.

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
=================  ===========================================================

Every :class:`Model` has ``kind``, ``path``, ``tensors`` (name ->
:class:`ModelTensor`, sorted by UTF-8 name), ``raw(name)`` (a read-only uint8
numpy array, zero-copy over a file map where the format allows), ``metadata``,
``files`` (:class:`ModelFile` for every file that makes up the model) and
``close()`` / context manager. ``hashing.model_digest(model)`` works on any
of them, so two formats of the same weights have the same model digest.
"""

from __future__ import annotations

import os
import stat
import struct
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .. import dtypes
from ..errors import NnpatchIOError, WeightsError
from ..hashing import name_key
from .safetensors_file import MAX_HEADER_SIZE, SafetensorsFile

KINDS = ("safetensors", "safetensors-dir", "pytorch", "onnx")
#: torch.save's legacy (non-zip) format starts by pickling this number (protocol 2).
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
ZIP_MAGIC = b"PK\x03\x04"
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
        from ..hashing import model_digest

        return model_digest(self)[0]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsModel(Model):
    def __init__(self, path: str) -> None:
        self._f = SafetensorsFile(path)
        tensors = {
            n: ModelTensor(n, t.dtype, t.shape, t.nbytes, os.path.basename(path), t.begin, t.end)
            for n, t in sorted(self._f.tensors.items(), key=lambda kv: name_key(kv[0]))
        }
        files = [ModelFile(os.path.basename(path), self._f.size, True, tuple(tensors))]
        super().__init__("safetensors", path, tensors, self._f.metadata, files)

    @property
    def safetensors(self) -> SafetensorsFile:
        return self._f

    def raw(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise KeyError(name)
        return read_only(self._f.raw(name))

    def close(self) -> None:
        self._f.close()


class SafetensorsDirModel(Model):
    """A Hugging Face model directory (sharded or one ``model.safetensors``)."""

    def __init__(self, path: str, *, index: bool) -> None:
        from .sharded import ShardedSafetensors

        self._s = ShardedSafetensors(path, index=index)
        try:
            tensors = {n: ModelTensor(n, t.dtype, t.shape, t.nbytes, t.file, t.begin, t.end)
                       for n, t in self._s.tensors.items()}
            by_shard: dict[str, list[str]] = {}
            for n, t in tensors.items():
                by_shard.setdefault(t.file, []).append(n)
            files = [
                ModelFile(rel, size, rel in self._s.shards, tuple(by_shard.get(rel, ())))
                for rel, size in list_directory(path)
            ]
            metadata = self._s.index_metadata
            if not index:
                metadata = self._s.shards[next(iter(self._s.shards))].metadata
        except BaseException:
            self._s.close()
            raise
        super().__init__("safetensors-dir", path, tensors, metadata, files)
        self.sharded = index

    @property
    def shards(self) -> dict[str, SafetensorsFile]:
        return self._s.shards

    def raw(self, name: str) -> np.ndarray:
        return read_only(self._s.raw(name))

    def close(self) -> None:
        self._s.close()


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


def sniff(path: str | os.PathLike[str]) -> str:
    """The kind of model at ``path``, from its content; WeightsError if none."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from .sharded import INDEX_NAME, SINGLE_NAME

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
    if head.startswith(TORCH_LEGACY_MAGIC):
        return "pytorch"
    if len(head) >= 9:
        (n,) = struct.unpack_from("<Q", head, 0)
        if n <= MAX_HEADER_SIZE and 8 + n <= size and head[8:9] == b"{":
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] <= 64:
        return "onnx"  # ModelProto field 1 (ir_version), as every ONNX writer puts first
    raise WeightsError("not a model nnpatch can read (safetensors, PyTorch checkpoint, ONNX, "
                       "or a Hugging Face model directory)", path=path)


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
        from .sharded import INDEX_NAME

        return SafetensorsDirModel(path, index=os.path.isfile(os.path.join(path, INDEX_NAME)))
    if kind == "pytorch":
        from .torch_file import TorchModel

        return TorchModel(path)
    from .onnx_file import OnnxModel

    return OnnxModel(path)
