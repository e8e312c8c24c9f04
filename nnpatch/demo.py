"""``nnpatch demo``: the whole story on built-in data, no downloads.

Two versions of a small convolutional network are generated with a fixed
seed: v2 retrains 10 % of the output channels of every layer and adds a
tensor, as an update made with ``train-sparse`` would. The demo diffs them,
applies the patch, verifies the result and prints model size against patch
size (and against zstd of the whole new model, what a download costs today).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import zstandard

from .applier import apply
from .differ import diff
from .hashing import hash_file
from .verifier import verify
from .weights import write_safetensors

_LAYERS = [  # name, shape (out channels first, as in PyTorch)
    ("features.0.weight", (64, 3, 3, 3)),
    ("features.0.bias", (64,)),
    ("features.3.weight", (128, 64, 3, 3)),
    ("features.3.bias", (128,)),
    ("features.6.weight", (256, 128, 3, 3)),
    ("features.6.bias", (256,)),
    ("features.8.weight", (256, 256, 3, 3)),
    ("features.8.bias", (256,)),
    ("classifier.0.weight", (512, 1024)),
    ("classifier.0.bias", (512,)),
    ("classifier.2.weight", (10, 512)),
    ("classifier.2.bias", (10,)),
]


def demo_models(seed: int = 0, share: float = 0.10):
    """(v1, v2) as name -> float32 arrays; v2 changes ``share`` of each layer's channels."""
    rng = np.random.default_rng(seed)
    v1 = {}
    for name, shape in _LAYERS:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        v1[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    v2 = {k: v.copy() for k, v in v1.items()}
    for name, shape in _LAYERS:
        if name.endswith(".weight"):
            k = max(1, round(share * shape[0]))
            rows = rng.choice(shape[0], size=k, replace=False)
            update = (rng.standard_normal((k, *shape[1:])) * 0.05 * np.abs(v1[name][rows]).mean()).astype(np.float32)
            v2[name][rows] += update
            v2[name.replace(".weight", ".bias")][rows] += np.float32(0.01)
    v2["classifier.2.temperature"] = np.array([1.5], dtype=np.float32)
    return v1, v2


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _save(path: str, tensors: dict[str, np.ndarray], version: str) -> None:
    write_safetensors(path, {k: ("F32", v.shape, v.tobytes()) for k, v in tensors.items()},
                      {"format": "pt", "version": version})


def run_demo(directory: str, echo: Callable[[str], None] = print) -> dict:
    os.makedirs(directory, exist_ok=True)
    v1_path, v2_path = os.path.join(directory, "v1.safetensors"), os.path.join(directory, "v2.safetensors")
    patch_path = os.path.join(directory, "v1-v2.nnpatch")
    out_path = os.path.join(directory, "v2-rebuilt.safetensors")
    v1, v2 = demo_models()
    _save(v1_path, v1, "1")
    _save(v2_path, v2, "2")
    echo(f"1. two versions of a small CNN in {directory}/: v2 retrains 10% of the channels of each layer")

    t0 = time.perf_counter()
    d = diff(v1_path, v2_path, patch_path)
    t_diff = time.perf_counter() - t0
    echo(f"2. nnpatch diff   -> {patch_path} ({d.patch_size} bytes, {len(d.changes)} tensors changed)")

    t0 = time.perf_counter()
    a = apply(v1_path, patch_path, out_path)
    t_apply = time.perf_counter() - t0
    echo(f"3. nnpatch apply  -> {out_path}")

    report = verify(patch_path, base=v1_path, target=out_path)
    same = _read(out_path) == _read(v2_path)
    echo(f"4. nnpatch verify -> {'OK' if report.ok else 'FAILED'}; rebuilt file identical to v2: {same}; "
         f"BLAKE3 {a.blake3[:16]}... = {hash_file(v2_path)[:16]}...")

    with open(v2_path, "rb") as f:
        zstd_full = len(zstandard.ZstdCompressor(level=19).compress(f.read()))
    rows = [
        ("v2 model (full download)", d.target_size),
        ("v2 model, zstd -19", zstd_full),
        ("nnpatch v1 -> v2", d.patch_size),
    ]
    echo("")
    echo(f"   {'what users download':<28} {'bytes':>12} {'% of model':>11}")
    for label, n in rows:
        echo(f"   {label:<28} {n:>12,} {100 * n / d.target_size:>10.2f}%")
    echo(f"   diff {t_diff * 1000:.0f} ms, apply {t_apply * 1000:.0f} ms")
    if not (report.ok and same):
        raise SystemExit(4)
    return {"model_bytes": d.target_size, "zstd_bytes": zstd_full, "patch_bytes": d.patch_size,
            "verified": report.ok and same, "diff_seconds": t_diff, "apply_seconds": t_apply}
