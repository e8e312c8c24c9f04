"""Structure-aware fuzzing: crafted patches and journals whose trailers are always valid.

    python fuzz/fuzz_structured.py -max_total_time=180                 # patches (apply, verify)
    FUZZ_TARGET=journal python fuzz/fuzz_structured.py -max_total_time=180   # journals (recover)
    FUZZ_STRICT=1 ...                                                  # stop at the first finding

Where fuzz/fuzz_patch.py flips bytes (and recomputes the trailer), this harness decodes a real
patch (spec/vectors/valid) or a journal into its header JSON, lets the fuzz input pick a few
structural mutations (numbers made huge, negative or off by one, strings replaced by paths,
markup and escapes, keys dropped, list items duplicated, section bytes replaced, shapes of
high rank), and re-emits it with tests/craft.py: sections laid out again per the spec, the
trailer recomputed. So every input reaches the header validation, the planner and apply.

The invariant: every input ends in nnpatch's own error (NnpatchError) or in success, never
another exception, the base is never modified and nothing appears outside the output.
A finding (another exception) is saved once per (type, place) under fuzz/crashes/ as
``structured-<target>-<hash>.bin`` (the fuzz input; rerun with the file as argument) with a
``.txt`` beside it holding the traceback; by default the run goes on, FUZZ_STRICT=1 makes it
stop (libFuzzer then writes the input as well).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import traceback

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import craft  # noqa: E402  (tests/craft.py: the spec-based writer)

with atheris.instrument_imports(include=["nnpatch"]):
    import nnpatch
    from nnpatch.errors import NnpatchError

TARGET = os.environ.get("FUZZ_TARGET", "patch")
STRICT = os.environ.get("FUZZ_STRICT") == "1"
CRASHES = os.path.join(ROOT, "fuzz", "crashes")
VECTORS = os.path.join(ROOT, "spec", "vectors", "valid")
WORK = tempfile.mkdtemp(prefix="nnpatch-sfuzz-")
SEEN: set[str] = set()
STATS = {"inputs": 0, "ok": 0, "refused": 0, "findings": 0}

# --- seeds -------------------------------------------------------------------------------------------

SEEDS = []  # (name, base path, base digest, decoded header)
for name in sorted(os.listdir(VECTORS)):
    d = os.path.join(VECTORS, name)
    base, patch = os.path.join(d, "base.safetensors"), os.path.join(d, "patch.nnpatch")
    if not (os.path.isfile(base) and os.path.isfile(patch)):
        continue
    dst = os.path.join(WORK, f"{name}.safetensors")
    shutil.copyfile(base, dst)
    with open(patch, "rb") as f:
        SEEDS.append((name, dst, nnpatch.hash_file(dst), craft.decode_patch(f.read())))

INTS = [0, 1, -1, 7, 63, 64, 65, 255, 4096, 2**31 - 1, 2**32, 2**32 + 1, 2**53 + 1, 2**62, 2**63 - 1, 2**63,
        2**64, -(2**63), 10**30, 2 * 10**9]
STRINGS = ["", ".", "..", "../x", "/etc/passwd", ".git/config", ".git", "a/../b", "a//b", "[/]x", "[bold]x",
           "\x1b]0;pwned\x07", "a$\\frac{$b", "\udc80", "x" * 5000, "d/" * 1000 + "x", "zstd", "xor", "esort",
           "planes", "bitmap", "u32", "u64", "delta-varint", "rows", "elements", "whole", "add", "remove",
           "safetensors", "safetensors-dir", "onnx", "pytorch", "blob", "copy", "F32", "BF16", "U8", "C64", "I64",
           "0" * 64, "f" * 64]


def paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("_data", "_version"):
                continue
            yield prefix + (k,)
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from paths(v, prefix + (i,))


def value(fdp, old):
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind == 0:
        return fdp.PickValueInList(INTS)
    if kind == 1 and isinstance(old, int) and not isinstance(old, bool):
        return old + fdp.ConsumeIntInRange(-65, 65)
    if kind == 2:
        return fdp.PickValueInList(STRINGS)
    if kind == 3:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    if kind == 4:
        return [fdp.PickValueInList(INTS) for _ in range(fdp.ConsumeIntInRange(0, 70))]
    if kind == 5:
        return [1] * fdp.ConsumeIntInRange(60, 400)
    if kind == 6:
        return fdp.PickValueInList([None, True, False, {}, [], 1.5, "1"])
    if kind == 7 and isinstance(old, list):
        return old + old[:1]
    if kind == 8 and isinstance(old, str) and len(old) == 64:
        return "0" * 64
    return fdp.ConsumeIntInRange(-(2**40), 2**40)


def mutate(fdp, obj) -> None:
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        ps = list(paths(obj))
        if not ps:
            return
        path = ps[fdp.ConsumeIntInRange(0, len(ps) - 1)]
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        action = fdp.ConsumeIntInRange(0, 5)
        if action == 0:
            del parent[key]
        elif action == 1 and isinstance(parent[key], dict) and "_data" in parent[key]:
            sec = parent[key]
            n = fdp.ConsumeIntInRange(0, 256)
            raw = fdp.ConsumeBytes(n)
            if fdp.ConsumeBool():
                sec.update(craft.section(raw, compress=fdp.ConsumeBool(), codec=[c for c in sec.get("codec", [])
                                                                                     if c != "zstd"]))
            else:
                sec["_data"] = raw
        else:
            parent[key] = value(fdp, parent[key])


# --- targets -------------------------------------------------------------------------------------------

def finding(data: bytes, exc: BaseException) -> None:
    tb = traceback.extract_tb(exc.__traceback__)
    where = next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(tb) if "nnpatch" in f.filename),
                 f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?")
    sig = f"{type(exc).__name__} at {where}"
    STATS["findings"] += 1
    if sig not in SEEN:
        SEEN.add(sig)
        os.makedirs(CRASHES, exist_ok=True)
        h = hashlib.sha1(data).hexdigest()[:12]
        with open(os.path.join(CRASHES, f"structured-{TARGET}-{h}.bin"), "wb") as f:
            f.write(data)
        with open(os.path.join(CRASHES, f"structured-{TARGET}-{h}.txt"), "w") as f:
            f.write(sig + "\n\n" + "".join(traceback.format_exception(exc)))
        print(f"\n#finding {len(SEEN)}: {sig}", file=sys.stderr, flush=True)
    if STRICT:
        raise exc


def count() -> None:
    STATS["inputs"] += 1
    if STATS["inputs"] % 2000 == 0:
        print(f"\n#structured {TARGET}: {STATS}, distinct findings {len(SEEN)}", file=sys.stderr, flush=True)


def listing(d: str) -> set[str]:
    return {os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs}


def patch_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    name, base, digest, seed = SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)]
    h = craft.deep_copy(seed)
    mutate(fdp, h)
    try:
        blob = craft.encode_patch(h, zstd_header=fdp.ConsumeBool())
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError, OverflowError, RecursionError):
        return  # a header craft.py cannot lay out (e.g. a section that is no longer an object)
    out_dir = tempfile.mkdtemp(dir=WORK)
    p = os.path.join(out_dir, "in.nnpatch")
    with open(p, "wb") as f:
        f.write(blob)
    before = listing(WORK)
    count()
    try:
        verify = fdp.PickValueInList(["default", "full", "touched"])
        t = h.get("target")
        target = os.path.join(out_dir, "out.onnx" if isinstance(t, dict) and t.get("format") == "onnx" else "out")
        try:
            nnpatch.apply(base, p, target, verify=verify)
            STATS["ok"] += 1
        except NnpatchError:
            STATS["refused"] += 1
        try:
            nnpatch.verify(p)
        except NnpatchError:
            pass
    except Exception as e:  # noqa: BLE001 - the invariant under test
        finding(data, e)
    finally:
        if nnpatch.hash_file(base) != digest:
            shutil.copyfile(os.path.join(VECTORS, name, "base.safetensors"), base)
            finding(data, AssertionError(f"the base {name} was modified"))
        outside = {q for q in listing(WORK) - before if not q.startswith(out_dir + os.sep)}
        if outside:
            finding(data, AssertionError(f"files written outside the output directory: {sorted(outside)[:3]}"))
        shutil.rmtree(out_dir, ignore_errors=True)


_MODEL_SRC = os.path.join(VECTORS, "rows-f32", "target.safetensors")


def _journal_seed() -> tuple[bytes, dict, list]:
    with open(_MODEL_SRC, "rb") as f:
        model = f.read()
    _, tensors, _ = craft.read_safetensors(model)
    import json
    import struct

    (n,) = struct.unpack_from("<Q", model, 0)
    head = json.loads(model[8:8 + n])
    head.pop("__metadata__", None)
    entries = []
    for name, v in sorted(head.items()):
        a, b = 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]
        if b - a:
            entries.append((name, a, b))
    return model, craft.journal_meta(model), entries


JMODEL, JMETA, JENTRIES = _journal_seed()


def journal_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    d = tempfile.mkdtemp(dir=WORK)
    model = os.path.join(d, "model.safetensors")
    with open(model, "wb") as f:
        f.write(JMODEL)
    entries = []
    for name, a, b in JENTRIES[:fdp.ConsumeIntInRange(0, len(JENTRIES))]:
        unit = fdp.PickValueInList([b - a, 4, 1, 16])
        units = max(1, (b - a) // unit)
        idx = sorted({fdp.ConsumeIntInRange(0, units - 1) for _ in range(fdp.ConsumeIntInRange(1, 3))})
        old = JMODEL[a:a + unit * len(idx)] if fdp.ConsumeBool() else fdp.ConsumeBytes(unit * len(idx))
        entries.append(craft.journal_entry(name, a, b - a, unit, idx, old, base_blake3=craft.digest(JMODEL[a:b])))
    meta = craft.deep_copy(JMETA)
    obj = {"meta": meta, "entries": [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]}
    mutate(fdp, obj)
    js = obj.get("entries")
    for e, j in zip(entries, js if isinstance(js, list) else []):
        if isinstance(j, dict):
            e["_overrides"] = {k: v for k, v in j.items() if e.get(k) != v}
    try:
        blob = craft.encode_journal(obj.get("meta") if isinstance(obj.get("meta"), dict) else {}, entries)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, struct_error()):
        return
    with open(model + ".nnpatch-journal", "wb") as f:
        f.write(blob)
    count()
    try:
        try:
            nnpatch.recover(model)
            STATS["ok"] += 1
        except NnpatchError:
            STATS["refused"] += 1
    except Exception as e:  # noqa: BLE001
        finding(data, e)
    finally:
        with open(model, "rb") as f:
            now = f.read()
        legit = obj.get("meta") == JMETA and all(e["_overrides"] == {} for e in entries)
        if now != JMODEL and not legit:
            # a crafted journal may only put back bytes inside the tensors it names, and only bytes
            # that make those tensors their base digest; here every base digest is the model's own
            finding(data, AssertionError("recover changed the model through a crafted journal"))
        shutil.rmtree(d, ignore_errors=True)


def struct_error():
    import struct

    return struct.error


def seed_corpus(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for i in range(16):
        with open(os.path.join(directory, f"seed-{TARGET}-{i}"), "wb") as f:
            f.write(bytes([i]) * (8 + 4 * i))


if __name__ == "__main__":
    corpus = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus and os.path.isdir(corpus) or (corpus and not os.path.exists(corpus)):
        seed_corpus(corpus)
    import atexit

    atexit.register(lambda: print(f"\n#structured {TARGET}: {STATS}, distinct findings {len(SEEN)}",
                                  file=sys.stderr, flush=True))
    atheris.Setup(sys.argv, journal_input if TARGET == "journal" else patch_input)
    atheris.Fuzz()
