"""``nnpatch demo``: the whole story on built-in data, no downloads.

With the trainer installed (torch and scikit-learn: ``nnpatch[train]``), the
demo trains v1 of a small CNN on scikit-learn's bundled digits, makes v2 for
rotated digits with ``train-sparse`` at 10 % of channels, then diffs, applies
and verifies, and prints accuracy and download size side by side. Without
them (or with ``synthetic=True``) it uses two generated versions of a CNN
whose v2 changes 10 % of each layer's channels.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from . import codecs
from .applier import apply
from .differ import diff
from .errors import IntegrityError
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


def _trainer_available() -> bool:
    try:
        import sklearn  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run_demo(directory: str, echo: Callable[[str], None] = print, *, synthetic: bool | None = None) -> dict:
    if synthetic is None:
        synthetic = not _trainer_available()
    if not synthetic:
        return _trained_demo(directory, echo)
    return _synthetic_demo(directory, echo)


def _apply_and_check(v1: str, patch: str, out: str, v2: str, echo: Callable[[str], None],
                     mode: str) -> float:
    """Steps 3 and 4: apply, verify, compare with the real v2 (IntegrityError if not); returns apply seconds."""
    t0 = time.perf_counter()
    a = apply(v1, patch, out, verify=mode)
    t_apply = time.perf_counter() - t0
    echo(f"3. nnpatch apply  -> {out}")
    report = verify(patch, base=v1, target=out)
    same = _read(out) == _read(v2)
    echo(f"4. nnpatch verify -> {'OK' if report.ok else 'FAILED'}; rebuilt file identical to v2: {same}; "
         f"BLAKE3 {hash_file(out)[:16]}... = {hash_file(v2)[:16]}... (apply proved model BLAKE3 "
         f"{(a.model_blake3 or '-')[:16]}...)")
    if not (report.ok and same):
        raise IntegrityError(f"demo: the rebuilt model does not match v2 ({report.failures()})")
    return t_apply


def _zstd_size(path: str) -> int:
    """What downloading the whole file costs today: zstd -19 of it."""
    return len(codecs.zstd_compressor(19).compress(_read(path)))


def _trained_demo(directory: str, echo: Callable[[str], None]) -> dict:
    from .trainer.run import train_sparse_run

    os.makedirs(directory, exist_ok=True)
    v2_path = os.path.join(directory, "v2.safetensors")
    v1_path = os.path.join(directory, "v1.safetensors")
    patch_path = os.path.join(directory, "v1-v2.nnpatch")
    out_path = os.path.join(directory, "v2-rebuilt.safetensors")
    echo("1. nnpatch train-sparse --recipe digits --ratio 0.1: train v1 on upright digits, then update it for "
         "rotated digits (teacher: full fine-tune; student: 10% of channels, with distillation)")
    t0 = time.perf_counter()
    r = train_sparse_run(recipe="digits", model_spec=None, data_spec=None, base=None, ratio=0.1, budget=None,
                         teacher_path=None, teacher_epochs=None, epochs=None, lr=None, batch_size=None, task=None,
                         kd_temperature=None, kd_weight=None, seed=0, device="cpu", output=v2_path,
                         patch=patch_path, base_out=v1_path)
    t_train = time.perf_counter() - t0
    echo(f"   {r['channels_changed']} of {r['channels_total']} channels changed "
         f"({r['percent_params_changed']:.1f}% of parameters), {t_train:.0f} s")
    echo(f"2. nnpatch diff   -> {patch_path} ({r['patch_bytes']:,} bytes)")
    t_apply = _apply_and_check(v1_path, patch_path, out_path, v2_path, echo, "full")
    zstd_full = _zstd_size(v2_path)
    model = r["model_bytes"]
    echo("")
    echo(f"   {'model (rotated digits)':<36} {'accuracy':>9} {'download bytes':>15} {'% of model':>11}")
    rows = [
        ("v1, no update", r["base_metric"], None),
        ("full update (all weights), zstd -19", r["teacher_metric"], zstd_full),
        ("v2 = train-sparse 10%, nnpatch", r["student_metric"], r["patch_bytes"]),
    ]
    for label, acc, n in rows:
        size = f"{n:>15,} {100 * n / model:>10.1f}%" if n is not None else f"{'-':>15} {'-':>11}"
        echo(f"   {label:<36} {acc:>8.1f}% {size}")
    echo(f"   apply {t_apply * 1000:.0f} ms")
    return {"model_bytes": model, "zstd_bytes": zstd_full, "patch_bytes": r["patch_bytes"],
            "verified": True, "apply_seconds": t_apply, "train_seconds": t_train,
            "accuracy": {"base": r["base_metric"], "full_update": r["teacher_metric"],
                         "sparse_update": r["student_metric"]},
            "percent_channels_changed": r["percent_channels_changed"]}


def _synthetic_demo(directory: str, echo: Callable[[str], None]) -> dict:
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

    t_apply = _apply_and_check(v1_path, patch_path, out_path, v2_path, echo, "default")
    zstd_full = _zstd_size(v2_path)
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
    return {"model_bytes": d.target_size, "zstd_bytes": zstd_full, "patch_bytes": d.patch_size,
            "verified": True, "diff_seconds": t_diff, "apply_seconds": t_apply}
