"""Hugging Face sharded safetensors: a directory with ``model.safetensors.index.json``.

The index is the one ``transformers`` writes (``save_pretrained`` with a
``max_shard_size``)::

    {
      "metadata": {
        "total_size": 1234
      },
      "weight_map": {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors"
      }
    }

serialized as ``json.dumps(index, indent=2, sort_keys=True) + "\\n"`` (so
``metadata`` comes before ``weight_map``, both sorted, ASCII-escaped, with a
trailing newline); ``total_size`` is the sum of the tensors' byte sizes (not
of the files). Shards are named ``model-XXXXX-of-YYYYY.safetensors``.
:func:`index_json_bytes` reproduces that text byte for byte.

Reading is strict: the index is size-capped and must be a JSON object whose
``weight_map`` maps strings to strings; every shard name must be a plain
relative path inside the directory (no ``..``, no absolute path, no symlink
leading out); every tensor in ``weight_map`` must be in the shard it names
and every tensor of a shard must be mapped to that shard, so names are
unique across shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .._json import load_object, read_bounded
from ..atomic import atomic_write
from ..errors import WeightsError
from ..hashing import canonical_order
from .model import Model, ModelFile, ModelTensor, list_directory, read_only
from .safetensors_file import SafetensorsFile, write_safetensors

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: The biggest index nnpatch reads (real ones are well under 1 MB per 10k tensors).
MAX_INDEX_SIZE = 64 << 20



def parse_index(raw: bytes, *, path: str = INDEX_NAME) -> tuple[dict | None, dict[str, str]]:
    """Validate an index's bytes; returns ``(metadata or None, weight_map)``."""
    try:
        obj = load_object(raw, limit=MAX_INDEX_SIZE, what="index")
    except ValueError as e:
        raise WeightsError(str(e), path=path) from e
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise WeightsError("invalid index: 'weight_map' must map tensor names to shard file names", path=path)
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise WeightsError("invalid index: 'metadata' must be an object", path=path)
    return metadata, weight_map


def read_index(path: str | os.PathLike[str]) -> tuple[dict | None, dict[str, str]]:
    path = os.fspath(path)
    return parse_index(read_bounded(path, MAX_INDEX_SIZE), path=path)


def safe_relative_path(directory: str, name: str, *, what: str = "file name", source: str | None = None) -> str:
    """The absolute path of ``name`` inside ``directory``, or WeightsError.

    ``name`` must be a relative POSIX path with no empty, ``.`` or ``..``
    component, no backslash or NUL, and must not resolve (through symlinks)
    outside ``directory``.
    """
    bad = (
        not name
        or "\x00" in name
        or "\\" in name
        or name.startswith("/")
        or os.path.isabs(name)
        or any(part in ("", ".", "..") for part in name.split("/"))
    )
    if bad:
        raise WeightsError(f"{what} {name!r} is not a plain relative path inside the model directory", path=source)
    root = os.path.realpath(directory)
    full = os.path.join(root, *name.split("/"))
    real = os.path.realpath(full)
    if os.path.commonpath([root, real]) != root or real == root:
        raise WeightsError(f"{what} {name!r} leads outside the model directory", path=source)
    return full


@dataclass(frozen=True)
class ShardTensor:
    """A tensor of a sharded model: where it lives and what it is."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # shard name, relative to the directory
    begin: int  # absolute offsets in that shard
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class ShardedSafetensors:
    """Every shard of a model directory, opened and cross-checked.

    ``shards`` maps shard name -> SafetensorsFile (in sorted name order);
    ``tensors`` maps tensor name -> ShardTensor, sorted by name.
    With ``index=False`` the directory's single ``model.safetensors`` is the
    one shard and ``index_metadata`` is None.
    """

    def __init__(self, directory: str | os.PathLike[str], *, index: bool = True) -> None:
        self.directory = os.fspath(directory)
        self.index_path = os.path.join(self.directory, INDEX_NAME) if index else None
        self.shards: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, ShardTensor] = {}
        try:
            if index:
                self.index_metadata, weight_map = read_index(self.index_path)
            else:
                self.index_metadata, weight_map = None, None
            names = sorted(set(weight_map.values())) if index else [SINGLE_NAME]
            if index and not names:
                raise WeightsError("index lists no tensors", path=self.index_path)
            for shard in names:
                full = safe_relative_path(self.directory, shard, what="shard", source=self.index_path)
                if not os.path.isfile(full):
                    raise WeightsError(f"shard {shard!r} is missing", path=self.index_path)
                self.shards[shard] = SafetensorsFile(full)
            found: dict[str, ShardTensor] = {}
            for shard, f in self.shards.items():
                for name, info in f.tensors.items():
                    if weight_map is not None and weight_map.get(name) != shard:
                        where = weight_map.get(name)
                        raise WeightsError(
                            f"shard {shard!r} holds tensor {name!r}, which the index "
                            + (f"assigns to {where!r}" if where else "does not list"),
                            path=self.index_path,
                        )
                    if name in found:
                        raise WeightsError(f"tensor {name!r} is in both {found[name].file!r} and {shard!r}",
                                           path=self.directory)
                    found[name] = ShardTensor(name, info.dtype, info.shape, shard, info.begin, info.end)
            if weight_map is not None:
                missing = sorted(set(weight_map) - set(found))
                if missing:
                    raise WeightsError(
                        f"tensor {missing[0]!r} is listed in the index for {weight_map[missing[0]]!r} "
                        f"but that shard does not hold it ({len(missing)} missing in all)",
                        path=self.index_path,
                    )
            self.tensors = {k: found[k] for k in canonical_order(found)}
        except BaseException:
            self.close()
            raise

    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return self.shards[t.file].raw(name)

    def close(self) -> None:
        for f in self.shards.values():
            f.close()

    def __enter__(self) -> ShardedSafetensors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_name(i: int, n: int) -> str:
    """The transformers shard name: ``model-00001-of-00003.safetensors`` (1-based)."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def index_json_bytes(weight_map: dict[str, str], metadata: dict | None) -> bytes:
    """The index text exactly as transformers writes it."""
    index = {"metadata": metadata, "weight_map": weight_map} if metadata is not None else {"weight_map": weight_map}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_sharded(directory: str | os.PathLike[str],
                  shards: dict[str, dict[str, tuple[str, tuple[int, ...], bytes]]],
                  index_metadata: dict | None = None, *,
                  shard_metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Write shards then the index (each atomically; the index last).

    ``shards`` maps shard file name -> {tensor name: (dtype, shape, bytes)}.
    ``index_metadata`` defaults to ``{"total_size": <sum of tensor bytes>}``
    as transformers writes it. ``shard_metadata`` is each shard's safetensors
    ``__metadata__`` (transformers uses ``{"format": "pt"}``). Files in the
    directory that are not written here are left alone. Returns the weight_map.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for shard, tensors in shards.items():
        safe_relative_path(directory, shard, what="shard")
        for name, (_, _, data) in tensors.items():
            if name in weight_map:
                raise WeightsError(f"tensor {name!r} is in both {weight_map[name]!r} and {shard!r}")
            weight_map[name] = shard
            total += len(data)
    for shard, tensors in shards.items():
        full = safe_relative_path(directory, shard, what="shard")
        os.makedirs(os.path.dirname(full), exist_ok=True)
        write_safetensors(full, tensors, shard_metadata)
    if index_metadata is None:
        index_metadata = {"total_size": total}
    with atomic_write(os.path.join(directory, INDEX_NAME)) as f:
        f.write(index_json_bytes(weight_map, index_metadata))
    return weight_map


class SafetensorsDirModel(Model):
    """A Hugging Face model directory (sharded or one ``model.safetensors``)."""

    def __init__(self, path: str, *, index: bool) -> None:
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
