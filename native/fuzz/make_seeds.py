"""Write the fixed model of fuzz_journal (native/fuzz/data/journal-model.safetensors: a
small model left by the Python in-place apply with every tensor written, its journal
still there) and that journal, its seed (native/fuzz/seeds/journal/journal). Run from the repository root with the project's Python:

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
from nnpatch.weights import write_safetensors

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
SEEDS = os.path.join(HERE, "seeds", "journal")


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
    print(f"wrote {DATA} and {SEEDS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
