"""Seed corpora of the native fuzz harnesses, from spec/vectors (every valid and invalid
patch) and native/fuzz/seeds/: python3 native/fuzz/seeds.py OUT_DIR writes
OUT_DIR/{check,apply,journal,json}/. Standard library only (zstd-form headers are
skipped unless the zstandard module is there)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VECTORS = os.path.join(ROOT, "spec", "vectors")


def patches() -> list[str]:
    index = json.load(open(os.path.join(VECTORS, "vectors.json")))
    paths = [os.path.join(VECTORS, v["patch"]) for v in index["valid"] + index["invalid"]]
    return sorted(p for p in set(paths) if os.path.isfile(p))


def header_of(data: bytes) -> bytes | None:
    if len(data) < 24 or not data.startswith(b"\x89NNP"):
        return None
    flags, hlen = struct.unpack_from("<IQ", data, 12)
    raw = data[24:24 + hlen]
    if flags & 2:
        try:
            import zstandard
            return zstandard.ZstdDecompressor().decompress(raw, max_output_size=64 << 20)
        except Exception:
            return None
    return raw.rstrip(b" ")


def main(out: str) -> int:
    dirs = {k: os.path.join(out, k) for k in ("check", "apply", "journal", "json")}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    for p in patches():
        name = os.path.relpath(p, VECTORS).replace(os.sep, "_")
        shutil.copyfile(p, os.path.join(dirs["check"], name))
        shutil.copyfile(p, os.path.join(dirs["apply"], name))
        h = header_of(open(p, "rb").read())
        if h:
            with open(os.path.join(dirs["json"], name + ".json"), "wb") as f:
                f.write(b"\x00" + h)  # first byte: the patch header's limits
    adir = os.path.join(HERE, "seeds", "apply")  # patches for the harnesses' base that no vector makes
    for n in sorted(os.listdir(adir)) if os.path.isdir(adir) else []:
        shutil.copyfile(os.path.join(adir, n), os.path.join(dirs["check"], "seed_" + n))
        shutil.copyfile(os.path.join(adir, n), os.path.join(dirs["apply"], "seed_" + n))
    jdir = os.path.join(HERE, "seeds", "journal")
    for n in sorted(os.listdir(jdir)):
        data = open(os.path.join(jdir, n), "rb").read()
        shutil.copyfile(os.path.join(jdir, n), os.path.join(dirs["journal"], n))
        hlen = struct.unpack_from("<Q", data, 16)[0]
        with open(os.path.join(dirs["json"], "journal_" + n + ".json"), "wb") as f:
            f.write(b"\x01" + data[24:24 + hlen].rstrip(b" "))  # the journal's limits
    for k, d in dirs.items():
        print(f"seeds: {k}: {len(os.listdir(d))} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
