"""Seed corpora of the native fuzz harnesses, from spec/vectors (every valid and invalid
patch) and native/fuzz/seeds/: python3 native/fuzz/seeds.py OUT_DIR writes
OUT_DIR/{check,apply,journal,json,feed}/. Standard library only (zstd-form headers are
skipped unless the zstandard module is there)."""

from __future__ import annotations

import base64
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


def feed_seeds(out: str) -> None:
    """fuzz_feed: every manifest vector's envelope (first byte 0: with the key, 1: without), its
    payload when it is one (2) and every state file (3)."""
    mdir = os.path.join(VECTORS, "manifest")
    for case in json.load(open(os.path.join(mdir, "manifest-vectors.json")))["cases"]:
        raw = open(os.path.join(mdir, case["manifest"]), "rb").read()
        for tag in (0, 1):
            with open(os.path.join(out, f"{case['name']}.{tag}"), "wb") as f:
                f.write(bytes([tag]) + raw)
        try:
            payload = base64.b64decode(json.loads(raw)["payload"])
        except Exception:
            payload = raw
        with open(os.path.join(out, f"{case['name']}.2"), "wb") as f:
            f.write(b"\x02" + payload)
        if case["state"]:
            with open(os.path.join(out, f"{case['name']}.3"), "wb") as f:
                f.write(b"\x03" + open(os.path.join(mdir, case["state"]), "rb").read())


def main(out: str) -> int:
    dirs = {k: os.path.join(out, k) for k in ("check", "apply", "journal", "json", "feed")}
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
    feed_seeds(dirs["feed"])
    for k, d in dirs.items():
        print(f"seeds: {k}: {len(os.listdir(d))} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
