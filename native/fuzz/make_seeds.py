"""Write the qrows seeds of fuzz_apply and fuzz_check (native/fuzz/seeds/apply/: patches of format
1.3 for the harnesses' fixed base, spec/vectors/valid/all-ops/base.safetensors, which no spec vector
reaches), and the fixed model of fuzz_journal (native/fuzz/data/journal-model.safetensors: a
small model left by the Python in-place apply with every tensor written, its journal
still there) and that journal, its seed (native/fuzz/seeds/journal/journal; journal-gguf beside it is
spec/vectors/journal/cases/gguf-journal-after-writes/model.gguf.nnpatch-journal, a journal 1.1 of an extents
model, which fuzz_journal refuses at Trust step 3 after parsing its extent table). Run from the repository root
with the project's Python:

    .venv/bin/python native/fuzz/make_seeds.py

Deterministic: the same bytes every run (a fixed seed, zstd level of the Python diff)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np

import nnpatch
from nnpatch.applier import apply_in_place
from nnpatch.applier.inplace import SimulatedCrash
from nnpatch.applier.journal import journal_path
from nnpatch.quantdelta import QuantDelta
from nnpatch.weights import open_safetensors, write_safetensors

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
SEEDS = os.path.join(HERE, "seeds", "journal")
APPLY_SEEDS = os.path.join(HERE, "seeds", "apply")
ALL_OPS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "spec", "vectors", "valid", "all-ops",
                       "base.safetensors")


def qrows_seeds() -> None:
    """8- and 4-bit qrows patches (one scale per row, and one for all) on the all-ops base's F32 and
    F16 tensors."""
    rng = np.random.default_rng(31)
    os.makedirs(APPLY_SEEDS, exist_ok=True)
    with open_safetensors(ALL_OPS) as st:
        tensors = {n: (i.dtype, tuple(i.shape), bytes(st.raw(n))) for n, i in st.tensors.items()}
    for bits, single in ((8, False), (4, True)):
        new, deltas = dict(tensors), {}
        for name in ("dense", "rows", "elems"):
            dtype, shape, raw = tensors[name]
            words = np.frombuffer(raw, "<u4" if dtype == "F32" else "<u2").reshape(shape[0], -1)
            lo, hi = (-128, 127) if bits == 8 else (-8, 7)
            rows = np.sort(rng.choice(shape[0], 3, replace=False))
            qd = QuantDelta(rows, np.float32(rng.uniform(1e-3, 1e-1, 1 if single else 3)),
                            rng.integers(lo, hi + 1, (3, words.shape[1])), bits)
            deltas[name] = qd
            new[name] = (dtype, shape, qd.apply(words, dtype).tobytes())
        with tempfile.TemporaryDirectory() as tmp:
            target = os.path.join(tmp, "new.safetensors")
            write_safetensors(target, new)
            nnpatch.diff(ALL_OPS, target, os.path.join(APPLY_SEEDS, f"qrows-{bits}.nnpatch"), quantized=deltas)


def main() -> int:
    rng = np.random.default_rng(13)
    a = (rng.standard_normal((32, 16)) * 0.05).astype("<f4")
    b = (rng.standard_normal((10, 6)) * 0.05).astype("<f2")
    c = (rng.standard_normal(20) * 0.05).astype("<f4")
    a2, b2, c2 = a.copy(), b.copy(), c.copy()
    a2[[1, 7, 30]] += np.float32(1e-3)  # rows
    b2[3, 4] = np.float16(1.5)  # elements
    c2[:] = rng.standard_normal(20).astype("<f4")  # whole
    os.makedirs(DATA, exist_ok=True)
    os.makedirs(SEEDS, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        old, new = os.path.join(tmp, "old.safetensors"), os.path.join(tmp, "new.safetensors")
        write_safetensors(old, {k: (d, v.shape, v.tobytes()) for k, d, v in (("a", "F32", a), ("b", "F16", b), ("c", "F32", c))})
        write_safetensors(new, {k: (d, v.shape, v.tobytes()) for k, d, v in (("a", "F32", a2), ("b", "F16", b2), ("c", "F32", c2))})
        patch = os.path.join(tmp, "p.nnpatch")
        nnpatch.diff(old, new, patch)
        model = os.path.join(tmp, "model.safetensors")
        shutil.copyfile(old, model)

        def hook(s):
            if s == "synced":  # every tensor written, the journal still there
                raise SimulatedCrash(s)
        try:
            apply_in_place(model, patch, hook=hook)
        except SimulatedCrash:
            pass
        shutil.copyfile(journal_path(model), os.path.join(SEEDS, "journal"))
        shutil.copyfile(model, os.path.join(DATA, "journal-model.safetensors"))
        shutil.copyfile(old, os.path.join(DATA, "journal-old.safetensors"))
    qrows_seeds()
    print(f"wrote {DATA}, {SEEDS} and {APPLY_SEEDS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
