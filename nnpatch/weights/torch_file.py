"""PyTorch checkpoints (``.pt``, ``.pth``, ``.bin`` state dicts).

Read only with ``torch.load(path, map_location="cpu", weights_only=True)``
(memory-mapped for the zip format, ``mmap=True``; the legacy pickle format
cannot be mapped and is read whole): no code in a checkpoint runs. The file
must hold a state dict (str -> Tensor), or a dict whose ``"state_dict"`` or
``"model"`` entry is one; any other entry is an error naming it.

torch's zip output is not byte-stable (archive names, record order and
padding depend on the torch version and on how the file was written), so
exactness for these files is proven by the canonical model digest
(``hashing.model_digest``: names, dtypes, shapes and raw bytes), not by the
file's BLAKE3. ``save_torch_state`` writes a state dict that loads back to
the same tensors, bit for bit.

torch is imported only inside functions; without it every entry point
raises :class:`~nnpatch.errors.MissingDependencyError`.
"""

from __future__ import annotations

import collections
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .. import dtypes
from ..atomic import atomic_write
from ..errors import MissingDependencyError, NnpatchIOError, WeightsError
from ..hashing import canonical_order
from .model import Model, ModelFile, ModelTensor

#: torch.save's legacy (non-zip) format starts by pickling this number (protocol 2).
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
ZIP_MAGIC = b"PK\x03\x04"
NEEDS_TORCH = "reading PyTorch checkpoints needs torch: pip install 'nnpatch[torch]'"
#: Keys under which training scripts nest the state dict.
WRAPPER_KEYS = ("state_dict", "model")

def _torch():
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError(NEEDS_TORCH) from e
    return torch


def dtype_maps():
    """(torch dtype -> safetensors name, safetensors name -> torch dtype) for this torch."""
    return dtypes.torch_dtypes(_torch())


def tensor_bytes(t, name: str = "?") -> np.ndarray:
    """A tensor's raw little-endian C-order bytes as a read-only uint8 array.

    Zero-copy for a contiguous CPU tensor (its memory may be a file map);
    views with strides, conjugate/negative bits or another device are
    materialized first.
    """
    torch = _torch()
    to_st, _ = dtype_maps()
    if not isinstance(t, torch.Tensor):
        raise WeightsError(f"not a tensor ({type(t).__name__})", tensor=name)
    if t.layout != torch.strided or t.is_quantized:
        raise WeightsError(f"unsupported tensor layout {t.layout}{' (quantized)' if t.is_quantized else ''}",
                           tensor=name)
    if t.dtype not in to_st:
        raise WeightsError(f"unsupported dtype {t.dtype}", tensor=name)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    u8 = flat if t.dtype == torch.uint8 else flat.view(torch.uint8)
    arr = u8.numpy()
    arr.flags.writeable = False
    return arr


def tensor_from_bytes(dtype: str, shape, data):
    """A torch tensor (owning its memory) from raw little-endian bytes."""
    torch = _torch()
    _, from_st = dtype_maps()
    if dtype not in from_st:
        raise WeightsError(f"dtype {dtype} has no torch equivalent in torch {torch.__version__}")
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape) * dtypes.ITEMSIZE[dtype]
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if buf.dtype != np.uint8:
        buf = buf.view(np.uint8)
    if buf.size != n:
        raise WeightsError(f"{buf.size} bytes do not fit dtype {dtype} and shape {list(shape)}")
    if n == 0:
        return torch.empty(shape, dtype=from_st[dtype])
    u8 = torch.from_numpy(buf.copy())  # owns its memory, writable: no torch warning
    if from_st[dtype] == torch.uint8:
        return u8.reshape(shape)
    return u8.view(from_st[dtype]).reshape(shape)


@dataclass
class TorchCheckpoint:
    """A loaded checkpoint: its state dict and how it was packaged."""

    path: str
    state: dict  # name -> torch.Tensor, file order
    wrapper: str | None = None  # "state_dict" / "model" when nested under that key
    legacy: bool = False  # torch's pre-1.6 pickle format
    module_metadata: dict | None = None  # the state dict's ``_metadata`` attribute (module versions)
    extra: dict = field(default_factory=dict)


def load_torch(path: str | os.PathLike[str]) -> TorchCheckpoint:
    """Load a state dict with ``torch.load(weights_only=True)``, mapped when possible."""
    torch = _torch()
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(TORCH_LEGACY_MAGIC))
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot open: {e.strerror or e}") from e
    legacy = not head.startswith(ZIP_MAGIC)
    try:
        obj = _torch_load(torch, path, mmap=not legacy)
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot read: {e.strerror or e}") from e
    except Exception as e:  # UnpicklingError for anything but plain tensors, RuntimeError, EOFError...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"torch.load(weights_only=True) refused the file: {msg}", path=path) from e
    wrapper = None
    if isinstance(obj, dict) and not _all_tensors(obj, torch):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                wrapper = key
                break
        if wrapper is not None:
            others = sorted(str(k) for k in obj if k != wrapper)
            if others:
                raise WeightsError(f"checkpoint holds entries besides {wrapper!r} that are not weights: "
                                   + ", ".join(repr(k) for k in others[:5]), path=path)
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightsError(f"not a state dict: the checkpoint holds a {type(obj).__name__}", path=path)
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad_keys:
        raise WeightsError(f"state dict keys must be strings, found {bad_keys[0]!r}", path=path)
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError("entries that are not tensors: " + ", ".join(repr(k) for k in bad[:5])
                           + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""), path=path)
    meta = getattr(obj, "_metadata", None)
    return TorchCheckpoint(path, dict(obj), wrapper, legacy, dict(meta) if isinstance(meta, dict) else None)


def _torch_load(torch, path: str, *, mmap: bool):
    """torch.load(weights_only=True), on the content whatever the name says.

    torch.load hands any path ending in ``.safetensors`` to the safetensors
    package; nnpatch decides formats by content, so such a path is opened
    here and given to torch as ``/proc/self/fd/N`` (still a path, so still
    mapped), or as a file object where /proc is missing (read, not mapped).
    """
    if not path.endswith(".safetensors"):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    with open(path, "rb") as f:
        alias = f"/proc/self/fd/{f.fileno()}"
        if mmap and os.path.exists(alias):
            return torch.load(alias, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(f, map_location="cpu", weights_only=True)


def _all_tensors(d: dict, torch) -> bool:
    return all(isinstance(v, torch.Tensor) for v in d.values())


def save_torch_state(path: str | os.PathLike[str], tensors: dict, like: TorchCheckpoint | str | None = None) -> None:
    """Write a state dict with ``torch.save``, atomically (temporary file + rename).

    ``tensors`` maps name -> ``(dtype, shape, bytes)`` (safetensors dtype
    names) or name -> torch.Tensor, in the order to write. ``like`` (a
    :class:`TorchCheckpoint` or a checkpoint path) gives the packaging to
    reproduce: the wrapper key, the legacy format, the ``_metadata``.
    """
    torch = _torch()
    if isinstance(like, (str, os.PathLike)):
        like = load_torch(like)
    state = collections.OrderedDict()
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            tensor_bytes(value, name)  # validates dtype/layout
            state[name] = value.detach().cpu().contiguous()
        else:
            dtype, shape, data = value
            state[name] = tensor_from_bytes(dtype, shape, data)
    if like is not None and like.module_metadata is not None:
        state._metadata = collections.OrderedDict(like.module_metadata)  # type: ignore[attr-defined]
    obj = {like.wrapper: state} if like is not None and like.wrapper else state
    legacy = bool(like is not None and like.legacy)
    with atomic_write(path) as f:
        torch.save(obj, f, _use_new_zipfile_serialization=not legacy)


class TorchModel(Model):
    """A PyTorch checkpoint as a :class:`~nnpatch.weights.model.Model`."""

    def __init__(self, path: str) -> None:
        ckpt = load_torch(path)
        to_st, _ = dtype_maps()
        tensors = {}
        for name in canonical_order(ckpt.state):
            t = ckpt.state[name]
            if t.dtype not in to_st:
                raise WeightsError(f"unsupported dtype {t.dtype}", path=path, tensor=name)
            dtype = to_st[t.dtype]
            shape = tuple(int(d) for d in t.shape)
            tensors[name] = ModelTensor(name, dtype, shape, math.prod(shape) * dtypes.ITEMSIZE[dtype])
        size = os.path.getsize(path)
        metadata = {"format": "pt", "wrapper": ckpt.wrapper or "", "legacy": "1" if ckpt.legacy else "0"}
        super().__init__("pytorch", path, tensors, metadata,
                         [ModelFile(os.path.basename(path), size, False, tuple(tensors))])
        self.checkpoint = ckpt

    def raw(self, name: str) -> np.ndarray:
        try:
            return tensor_bytes(self.checkpoint.state[name], name)
        except WeightsError as e:
            raise WeightsError(str(e), path=self.path) from e

    def close(self) -> None:
        self.checkpoint.state = {}
