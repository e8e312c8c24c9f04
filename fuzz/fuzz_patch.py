"""Coverage-guided fuzzing of the patch reader and apply (atheris, libFuzzer).

    make fuzz                       # FUZZ_SECONDS (default 600) of fuzzing
    python fuzz/fuzz_patch.py fuzz/corpus -max_total_time=60

The corpus is seeded from spec/vectors. Each input is parsed as a patch and,
when it parses, applied to a real base. The invariant: nnpatch raises only
NnpatchError (never another exception), never writes the output unless the
result is exact, and never changes the base. A crash input found here
becomes a vector in spec/vectors/invalid/.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import atheris
import blake3

with atheris.instrument_imports(include=["nnpatch"]):
    import nnpatch
    from nnpatch.patchfile import parse_patch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "spec", "vectors")
WORK = tempfile.mkdtemp(prefix="nnpatch-fuzz-")
BASES = []
for name in ("rows-f32", "all-ops", "every-dtype", "esort"):
    src = os.path.join(VECTORS, "valid", name, "base.safetensors")
    dst = os.path.join(WORK, f"{name}.safetensors")
    shutil.copyfile(src, dst)
    BASES.append((dst, nnpatch.hash_file(dst), os.path.join(VECTORS, "valid", name, "target.safetensors")))
PATCH = os.path.join(WORK, "input.nnpatch")
OUT = os.path.join(WORK, "out.safetensors")


def one_input(data: bytes) -> None:
    # Each input is tried as is and with its trailer recomputed: random
    # mutations almost always break the trailer, which would hide the parser
    # and apply behind the first check.
    check(data)
    if len(data) >= 32:
        check(data[:-32] + blake3.blake3(data[:-32]).digest())


def check(data: bytes) -> None:
    try:
        header = parse_patch(data, path="input")
    except nnpatch.NnpatchError:
        return
    with open(PATCH, "wb") as f:
        f.write(data)
    for base, digest, _target in BASES:
        if header.base.blake3 != digest and header.base.tensors != _count(base):
            continue
        for mode in ("full", "default"):
            try:
                result = nnpatch.apply(base, PATCH, OUT, verify=mode)
            except nnpatch.NnpatchError:
                if os.path.exists(OUT):
                    raise AssertionError("output written although apply failed")
                continue
            # A success must be exact. "full" proves the file digest the patch
            # names; "default" proves the tensors (model digest) and layout.
            if mode == "full" and nnpatch.hash_file(OUT) != header.target.blake3:
                raise AssertionError("apply --verify=full succeeded with a wrong file")
            if mode == "default":
                from nnpatch.weights import SafetensorsFile

                with SafetensorsFile(OUT) as w:
                    if nnpatch.model_digest(w)[0].hex() != header.target.model_blake3:
                        raise AssertionError("apply succeeded with wrong tensors")
            os.unlink(OUT)
        if nnpatch.hash_file(base) != digest:
            raise AssertionError("the base was modified")


_COUNTS: dict[str, int] = {}


def _count(path: str) -> int:
    if path not in _COUNTS:
        from nnpatch.weights import SafetensorsFile

        with SafetensorsFile(path) as f:
            _COUNTS[path] = len(f.tensors)
    return _COUNTS[path]


def seed_corpus(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for root, _, files in os.walk(VECTORS):
        for name in files:
            if name.endswith(".nnpatch"):
                rel = os.path.relpath(os.path.join(root, name), VECTORS).replace(os.sep, "_")
                shutil.copyfile(os.path.join(root, name), os.path.join(directory, rel))


if __name__ == "__main__":
    corpus = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus:
        seed_corpus(corpus)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
