"""Writing a state dict as a safetensors file, as ``train-sparse`` writes its output (and the probes of
:mod:`nnpatch.trainer.probes` their targets, so that they price the same layout)."""

from __future__ import annotations

import os

import torch

from .. import dtypes
from ..atomic import atomic_write
from ..errors import WeightsError
from ..weights.safetensors_file import encode_safetensors_header

__all__ = ["save_weights"]


#: torch dtype -> safetensors dtype name
_ST_DTYPES = dtypes.torch_dtypes(torch)[0]


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically: readers see the old file or the new one.

    The layout is the safetensors reference writer's (``encode_safetensors_header``), with
    ``metadata`` in the order given: the reference writer's own order of several metadata
    entries changes from call to call, and the same weights must give the same bytes."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WeightsError("safetensors metadata maps strings to strings", path=str(path))
    raw: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise WeightsError(f"dtype {t.dtype} has no safetensors name", path=str(path), tensor=name)
        raw[name] = (_ST_DTYPES[t.dtype], tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    head, order = encode_safetensors_header({k: (d, s, len(b)) for k, (d, s, b) in raw.items()}, metadata)
    # mode 0o666 less the umask, as any newly created file gets (atomic_write's default is 0o644)
    with atomic_write(path, mode=0o666) as f:
        f.write(head)
        for name in order:
            f.write(raw[name][2])
