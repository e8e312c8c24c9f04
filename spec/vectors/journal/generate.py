"""Generate the journal test vectors in spec/vectors/journal/ (spec/JOURNAL.md, "Test vectors").

    python spec/vectors/journal/generate.py            # check: regenerate in memory, report differences
    python spec/vectors/journal/generate.py --update   # rewrite the files; review the diff

A small model (old.safetensors) and its update (new.safetensors, patch.nnpatch: a rows, an elements and a
whole op, one tensor untouched) come from numpy's PCG64 generator with the seed below. The valid journal is
the one nnpatch's own writer leaves when an in-place apply of patch.nnpatch dies right after the journal's
commit point; every other journal is that one, decoded and re-encoded here with one thing changed (the
trailer recomputed unless the trailer is the point). The encoder below is written from JOURNAL.md alone and
must reproduce the writer's journal byte for byte before anything is written. Each case is a folder
cases/NAME/ holding the model as it is on disk and the journal beside it under the names recovery looks
for; journal.json says what recovering it must give.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile

import blake3
import numpy as np
import zstandard

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
sys.path.insert(1, os.path.dirname(os.path.dirname(HERE)))  # spec/, for vectorfiles

import nnpatch  # noqa: E402
from vectorfiles import remove, report, stale  # noqa: E402
from nnpatch import differ  # noqa: E402
from nnpatch.applier import apply_in_place  # noqa: E402
from nnpatch.applier.inplace import SimulatedCrash  # noqa: E402
from nnpatch.weights import parse_safetensors_header, write_safetensors  # noqa: E402

SEED = 22
MODEL = "model.safetensors"
#: (the model's name in a case folder, the file it is before the update[, after it, the patch]) per kind of model
SAFETENSORS = (MODEL, "old.safetensors")  # the update: the index's model_updated and patch
GGUF = ("model.gguf", "old.gguf", "new.gguf", "patch-gguf.nnpatch")
JOURNAL = MODEL + ".nnpatch-journal"
MAGIC = b"\x89NNJ\r\n\x1a\n"
PREAMBLE = struct.Struct("<8sHHIQ")

COMMENT = (
    "nnpatch undo-journal test vectors (spec/JOURNAL.md, 'Test vectors'). old.safetensors is the model before an "
    "in-place update, new.safetensors after it, patch.nnpatch the update (made by nnpatch diff, zstd "
    "'zstd_version'; only the journals' 'patch' field depends on its bytes). Each case is a folder "
    "cases/NAME/ with 'model.safetensors', the model as it is on disk, and beside it the journal under the name "
    "recovery looks for ('model.safetensors.nnpatch-journal', and/or '.nnpatch-journal.tmp'). To run a case: "
    "copy its folder's files into an empty folder, run recovery on the copy of model.safetensors (nnpatch "
    "recover MODEL, nnpatch-apply --recover MODEL, or the library's recover), and compare. 'outcome': "
    "'recovered' (exit 0; the model's bytes are then those of 'model_after', BLAKE3 'model_after_blake3', and "
    "no journal is left), 'discarded' (exit 0; a torn or uncommitted journal is deleted and the model is left "
    "as it was), or 'refused' (exit 'exit', error class 'error' as nnpatch/errors.py names it and nnp_error_name "
    "returns it; the model is not written and the journal is kept byte for byte). 'journal_after' lists the "
    "journal files left in the folder afterwards. 'valid' is true for journals the writer could have made; "
    "'trust' names the step of JOURNAL.md's Trust section (or 'protocol') that decides the case."
)


def _f32(rng, shape):
    return (rng.standard_normal(shape) * 0.05).astype("<f4")


def models() -> tuple[dict, dict, dict]:
    """(old tensors, new tensors, metadata): rows of a, one element of b and all of c change; d does not."""
    rng = np.random.default_rng(SEED)
    a = _f32(rng, (24, 16))
    b = (rng.standard_normal((10, 12)) * 0.05).astype("<f2")
    c = _f32(rng, (20,))
    d = rng.integers(0, 256, 33, dtype=np.uint8)
    a2, b2 = a.copy(), b.copy()
    a2[[2, 3, 9, 17, 18]] += np.float32(1e-3)
    b2[3, 4] = np.float16(1.5)
    c2 = _f32(rng, (20,))
    old = {"a": ("F32", a.shape, a.tobytes()), "b": ("F16", b.shape, b.tobytes()),
           "c": ("F32", c.shape, c.tobytes()), "d": ("U8", d.shape, d.tobytes())}
    new = dict(old, a=("F32", a.shape, a2.tobytes()), b=("F16", b.shape, b2.tobytes()),
               c=("F32", c.shape, c2.tobytes()))
    return old, new, {"source": "spec/vectors/journal/generate.py"}


# --- the journal format, written from spec/JOURNAL.md ---------------------------------------------------

def pad(n: int) -> int:
    return -n % 64


def decode(journal: bytes) -> tuple[dict, list[dict]]:
    """(header without entries, [{'entry': dict, 'indices': bytes, 'data': bytes}]) of a journal."""
    _, _, _, _, hlen = PREAMBLE.unpack_from(journal, 0)
    meta = json.loads(journal[PREAMBLE.size:PREAMBLE.size + hlen])
    parts = []
    for e in meta.pop("entries"):
        parts.append({"entry": e, "indices": journal[e["index_at"]:e["index_at"] + 8 * e["count"]],
                      "data": journal[e["data_at"]:e["data_at"] + e["unit"] * e["count"]]})
    return meta, parts


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def encode(meta: dict, parts: list[dict], *, edit=None, text_edit=None, major: int = 1, minor: int = 0,
           flags: int = 0, tail: bytes = b"", trailer: bool = True) -> bytes:
    """A journal: ``meta`` plus one entry per part, laid out as the Layout section says (index_at and
    data_at found at the fixed point of the header's length). ``edit`` changes the header object after
    layout, ``text_edit`` its JSON text; both are found in the fixed point too, so the entry data still
    lands where the (edited) header's length puts it."""
    hlen = 0
    for _ in range(16):
        pos = PREAMBLE.size + hlen
        entries = []
        for p in parts:
            e = dict(p["entry"], index_at=pos)
            pos += len(p["indices"])
            pos += pad(pos)
            e["data_at"] = pos
            pos += len(p["data"])
            pos += pad(pos)
            entries.append(e)
        obj = dict(meta, entries=entries)
        if edit:
            obj = json.loads(json.dumps(obj))
            edit(obj)  # in place
        text = canonical(obj)
        if text_edit:
            text = text_edit(text)
        text += b" " * pad(PREAMBLE.size + len(text))
        if len(text) == hlen:
            break
        hlen = len(text)
    else:
        raise SystemExit("the journal header's length does not settle")
    body = bytearray(PREAMBLE.pack(MAGIC, major, minor, flags, hlen) + text)
    for p in parts:
        body += p["indices"] + b"\0" * pad(len(p["indices"]))
        body += p["data"] + b"\0" * pad(len(p["data"]))
    body += tail
    return bytes(body) + (blake3.blake3(bytes(body)).digest() if trailer else b"")


def retrail(journal: bytes) -> bytes:
    return journal[:-32] + blake3.blake3(journal[:-32]).digest()


#: What JOURNAL.md says each Trust step's failure gives (step 1 is named case by case: a torn journal is
#: discarded, another major version refused).
RECOVERED = ("recovered", 0, None)
DISCARDED = ("discarded", 0, None)
REFUSED_INVALID = ("refused", 3, "InvalidJournal")
REFUSED_INTEGRITY = ("refused", 4, "IntegrityError")
BY_STEP = {"protocol": RECOVERED, "2": REFUSED_INVALID, "3": REFUSED_INTEGRITY, "4": REFUSED_INVALID,
           "5": REFUSED_INTEGRITY}


# --- the cases --------------------------------------------------------------------------------------

def writer_journal(old_path: str, patch_path: str, MODEL: str = MODEL) -> bytes:
    """The journal nnpatch's writer leaves when an in-place apply dies at the journal's commit point."""
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, MODEL)
        shutil.copyfile(old_path, model)

        def hook(step):
            if step == "journal":
                raise SimulatedCrash(step)
        try:
            apply_in_place(model, patch_path, hook=hook)
        except SimulatedCrash:
            pass
        else:
            raise SystemExit("the in-place apply did not stop at its journal")
        with open(model, "rb") as f:
            if f.read() != open(old_path, "rb").read():
                raise SystemExit("the model was written before the journal's commit point")
        with open(os.path.join(tmp, MODEL + ".nnpatch-journal"), "rb") as f:
            return f.read()


def halfway(old: bytes, new: bytes, parts: list[dict]) -> bytes:
    """The model as a crash in the middle of writing leaves it: the first entry's tensor fully new, the
    second one's units up to half written and the unit at the half torn (only its first half new), the
    rest not yet written."""
    mix = bytearray(old)
    first, second = parts[0]["entry"], parts[1]["entry"]
    mix[first["offset"]:first["offset"] + first["nbytes"]] = new[first["offset"]:first["offset"] + first["nbytes"]]
    idx = np.frombuffer(parts[1]["indices"], "<u8")
    unit = second["unit"]
    half = len(idx) // 2
    for k, i in enumerate(idx[:half + 1]):
        lo = second["offset"] + int(i) * unit
        hi = lo + (unit if k < half else max(1, unit // 2))
        mix[lo:hi] = new[lo:hi]
    return bytes(mix)


def ent(obj: dict, name: str) -> dict:
    return next(e for e in obj["entries"] if e["name"] == name)


def part(parts: list[dict], name: str) -> dict:
    return next(p for p in parts if p["entry"]["name"] == name)


def build(directory: str) -> dict:
    os.makedirs(directory, exist_ok=True)
    old_t, new_t, metadata = models()
    old_path, new_path = os.path.join(directory, "old.safetensors"), os.path.join(directory, "new.safetensors")
    patch_path = os.path.join(directory, "patch.nnpatch")
    write_safetensors(old_path, old_t, metadata)
    write_safetensors(new_path, new_t, metadata)
    # created_by names the writer's version; pinned, so that the vectors do not change with each release
    differ.__version__ = "vectors"
    nnpatch.diff(old_path, new_path, patch_path, level=9)
    old, new = open(old_path, "rb").read(), open(new_path, "rb").read()
    written = writer_journal(old_path, patch_path)
    meta, parts = decode(written)
    if encode(meta, parts) != written:
        raise SystemExit("the encoder written from JOURNAL.md does not reproduce the writer's journal")
    # (name, unit, count): rows of a first (halfway() writes it whole), c whole, one element of b
    units = [(p["entry"]["name"], p["entry"]["unit"], p["entry"]["count"]) for p in parts]
    if units != [("a", 64, 5), ("c", 80, 1), ("b", 2, 1)]:
        raise SystemExit(f"the patch no longer journals rows of a, all of c and an element of b: {units}")
    mix = halfway(old, new, parts)

    # name -> (description, model bytes, {file suffix: bytes}, valid, trust, expected outcome)
    cases: dict[str, tuple] = {}

    def case(name, description, model, files, *, valid=False, trust, expect=None, kind=None):
        if name in cases:
            raise SystemExit(f"two cases named {name}")
        cases[name] = (description, model, files, valid, trust, expect or BY_STEP[trust], kind or SAFETENSORS)

    def craft(name, description, *, model=mix, trust, expect=None, **kw):
        case(name, description, model, {".nnpatch-journal": encode(meta, parts, **kw)}, trust=trust, expect=expect)

    def with_entry(which, **changes):
        return lambda obj: ent(obj, which).update(changes)

    # valid: written by the writer, at each moment a crash can leave it
    case("journal-before-writes", "the journal is committed, no model byte is written yet", old,
         {".nnpatch-journal": written}, valid=True, trust="protocol")
    case("halfway", "the first entry's tensor (a, rows) written, the second's (c, whole) torn halfway, the third "
         "(b, one element) not yet", mix, {".nnpatch-journal": written}, valid=True, trust="protocol")
    case("all-written", "every new byte written and synced, the journal not yet removed (the update's commit "
         "point not reached)", new, {".nnpatch-journal": written}, valid=True, trust="protocol")
    case("uncommitted-tmp", "only a .tmp journal, cut short: it was never committed, so the model was not written",
         old, {".nnpatch-journal.tmp": written[:len(written) // 2]}, valid=True, trust="protocol", expect=DISCARDED)
    case("tmp-beside-committed", "a stale .tmp journal beside a committed one, model half written: the .tmp one is "
         "deleted, the committed one rolls back", mix,
         {".nnpatch-journal": written, ".nnpatch-journal.tmp": written[:100]}, valid=True, trust="protocol")
    case("minor-version-and-unknown-key", "Version_Minor 7 and an unknown top-level key (a later minor version): "
         "accepted", mix, {".nnpatch-journal": encode(meta, parts, minor=7,
                                                      edit=lambda o: o.update({"x-later": {"n": [1, 2]}}))},
         valid=True, trust="1", expect=RECOVERED)

    # torn: deleted, the model left as it was (a torn journal was never acted upon)
    case("torn-truncated", "the journal cut short in its entry data", old,
         {".nnpatch-journal": written[:len(written) - 100]}, trust="1", expect=DISCARDED)
    case("torn-no-trailer", "the journal cut just before its trailer", old,
         {".nnpatch-journal": written[:-32]}, trust="1", expect=DISCARDED)
    case("torn-flipped-byte", "one byte of old data flipped: the trailer hash does not match", old,
         {".nnpatch-journal": written[:-40] + bytes([written[-40] ^ 1]) + written[-39:]}, trust="1", expect=DISCARDED)
    case("torn-bad-trailer", "the trailer hash itself damaged", old,
         {".nnpatch-journal": written[:-1] + bytes([written[-1] ^ 0x80])}, trust="1", expect=DISCARDED)
    case("torn-bad-magic", "the first byte of the magic changed (trailer recomputed)", old,
         {".nnpatch-journal": retrail(b"\x88" + written[1:])}, trust="1", expect=DISCARDED)
    case("torn-empty", "a zero-byte journal", old, {".nnpatch-journal": b""}, trust="1", expect=DISCARDED)
    case("torn-55-bytes", "55 bytes, one short of the smallest journal (preamble and trailer)", old,
         {".nnpatch-journal": written[:55]}, trust="1", expect=DISCARDED)

    # version: refused before the trailer is looked at, kept
    craft("future-major", "Version_Major 2 (a journal from a newer nnpatch)", major=2, trust="1",
          expect=REFUSED_INTEGRITY)
    craft("future-major-bad-trailer", "Version_Major 2 and a trailer that does not match: the version is checked "
          "before the trailer, so it is refused and kept, not deleted as torn", major=2, trailer=False,
          tail=b"\xee" * 32, trust="1", expect=REFUSED_INTEGRITY)
    craft("major-zero", "Version_Major 0", major=0, trust="1", expect=REFUSED_INTEGRITY)

    # format (Trust step 2): refused, exit 3, kept
    craft("flags", "Flags = 1", flags=1, trust="2")
    j = encode(meta, parts)
    hlen = PREAMBLE.unpack_from(j, 0)[4]
    case("header-length-unaligned", "Header_Length one less than the padded header (24 + H not a multiple of 64)",
         mix, {".nnpatch-journal": retrail(PREAMBLE.pack(MAGIC, 1, 0, 0, hlen - 1) + j[PREAMBLE.size:])}, trust="2")
    case("header-length-past-end", "Header_Length 2^40: past the end of the journal (and over 64 MiB)", mix,
         {".nnpatch-journal": retrail(PREAMBLE.pack(MAGIC, 1, 0, 0, 1 << 40) + j[PREAMBLE.size:])}, trust="2")
    craft("bad-json", "the header is not JSON (its closing brace removed)",
          text_edit=lambda t: t[:-1], trust="2")
    craft("not-utf8", "a byte 0xff inside created_by", text_edit=lambda t: t.replace(b'"nnpatch"', b'"nn\xffpatch"'),
          trust="2")
    craft("duplicate-key", "the key 'patch' twice at top level (both with the same value)",
          text_edit=lambda t: t[:-1] + b',"patch":"' + meta["patch"].encode() + b'"}', trust="2")
    craft("duplicate-key-in-entry", "the key 'count' twice in entry a",
          text_edit=lambda t: t.replace(b'"name":"a"', b'"name":"a","count":%d' % part(parts, "a")["entry"]["count"]),
          trust="2")
    craft("lone-surrogate", "created_by holds the escape \\ud800 (a lone surrogate)",
          text_edit=lambda t: t.replace(b'"nnpatch"', b'"nnpatch\\ud800"'), trust="2")
    craft("too-deep", "an unknown top-level key nesting 9 deep", edit=lambda o: o.update(
        {"x": [[[[[[[[1]]]]]]]]}), trust="2")
    craft("not-an-object", "the header is a JSON array", text_edit=lambda t: b"[" + t + b"]", trust="2")
    craft("missing-entries", "no 'entries' key", edit=lambda o: o.pop("entries"), trust="2")
    craft("model-extra-key", "'model' has a fourth key", edit=lambda o: o["model"].update({"mtime": 1}), trust="2")
    craft("base-missing-key", "'base' lacks model_blake3", edit=lambda o: o["base"].pop("model_blake3"),
          trust="2")
    craft("created-by-not-string", "created_by is a number", edit=lambda o: o.update({"created_by": 1}), trust="2")
    craft("entries-not-array", "entries is an object", edit=lambda o: o.update(
        {"entries": {e["name"]: e for e in o["entries"]}}), trust="2")
    craft("entry-extra-key", "entry a has a tenth key", edit=with_entry("a", op="rows"), trust="2")
    craft("entry-missing-key", "entry b lacks target_blake3",
          edit=lambda o: ent(o, "b").pop("target_blake3"), trust="2")
    craft("float-number", "entry c's offset written as a float (N.0)",
          text_edit=lambda t: t.replace(b'"offset":%d' % part(parts, "c")["entry"]["offset"],
                                        b'"offset":%d.0' % part(parts, "c")["entry"]["offset"]), trust="2")
    craft("bool-number", "entry c's count is true", edit=with_entry("c", count=True), trust="2")
    craft("negative-number", "entry a's offset is negative", edit=with_entry("a", offset=-64), trust="2")
    craft("number-over-2-63", "model.size is 2^63", edit=lambda o: o["model"].update({"size": 1 << 63}), trust="2")
    craft("uppercase-digest", "base_blake3 of entry a in uppercase hex",
          edit=lambda o: ent(o, "a").update(base_blake3=ent(o, "a")["base_blake3"].upper()), trust="2")
    craft("short-digest", "the patch digest has 63 hex digits", edit=lambda o: o.update(patch=o["patch"][:63]),
          trust="2")
    a = part(parts, "a")
    dup = {"entry": dict(a["entry"]), "indices": a["indices"], "data": a["data"]}
    case("duplicate-entry", "entry a twice (each with its own indices and old bytes)", mix,
         {".nnpatch-journal": encode(meta, [*parts, dup])}, trust="2")
    craft("count-times-unit-over-nbytes", "entry b's nbytes smaller than count x unit",
          edit=with_entry("b", nbytes=1), trust="2")
    b = part(parts, "b")
    zb = [p if p is not b else {"entry": dict(b["entry"], unit=0), "indices": b["indices"], "data": b""}
          for p in parts]
    case("unit-zero-with-count", "entry b's unit 0 with count 1 (no old bytes, so the layout still holds)", mix,
         {".nnpatch-journal": encode(meta, zb)}, trust="2")
    craft("index-at-wrong", "entry b's index_at 64 bytes later than the layout puts it",
          edit=lambda o: ent(o, "b").update(index_at=ent(o, "b")["index_at"] + 64), trust="2")
    craft("data-at-wrong", "entry a's data_at 64 bytes earlier than the layout puts it",
          edit=lambda o: ent(o, "a").update(data_at=ent(o, "a")["data_at"] - 64), trust="2")
    craft("bytes-before-trailer", "64 zero bytes between the last entry's data and the trailer",
          tail=b"\0" * 64, trust="2")
    short = [p if p is not b else {"entry": b["entry"], "indices": b["indices"], "data": b["data"][:-1]}
             for p in parts]
    case("data-short-by-one", "entry b's last old byte cut off: the zero padding takes its place, so the layout holds "
         "but the byte put back is wrong", mix, {".nnpatch-journal": encode(meta, short)}, trust="5")

    # identity (Trust step 3): another file, exit 4, kept
    other = dict(metadata, source="another model")
    with tempfile.TemporaryDirectory() as tmp:
        write_safetensors(os.path.join(tmp, "o.safetensors"), old_t, other)
        ohead = open(os.path.join(tmp, "o.safetensors"), "rb").read()
    ohead = ohead[:8 + struct.unpack_from("<Q", ohead, 0)[0]]
    craft("another-model", "the journal names another model (same tensors, other metadata: another header BLAKE3)",
          edit=lambda o: o["model"].update(header_len=len(ohead), header_blake3=blake3.blake3(ohead).hexdigest()),
          trust="3")
    craft("model-size-differs", "model.size one byte more than the model's", edit=lambda o: o["model"].update(
        size=o["model"]["size"] + 1), trust="3")
    craft("header-len-differs", "model.header_len 8 less than the model's (the JSON without its length prefix)",
          edit=lambda o: o["model"].update(header_len=o["model"]["header_len"] - 8), trust="3")
    case("model-truncated", "the model cut to half its size (the journal is the writer's)", mix[:len(mix) // 2],
         {".nnpatch-journal": written}, trust="3")
    case("model-empty", "a zero-byte model (the journal is the writer's)", b"", {".nnpatch-journal": written},
         trust="3")

    # entries against the model (Trust step 4): exit 3, kept
    craft("unknown-tensor", "entry c renamed to a tensor the model does not have", edit=with_entry("c", name="e"),
          trust="4")
    craft("offset-into-header", "entry c's offset 0: the safetensors header, not the tensor",
          edit=with_entry("c", offset=0), trust="4")
    craft("offset-past-end", "entry c's offset past the end of the model",
          edit=with_entry("c", offset=len(old) + 64), trust="4")
    craft("offset-off-by-one", "entry a's offset one byte after the tensor's first byte",
          edit=with_entry("a", offset=a["entry"]["offset"] + 1), trust="4")
    craft("nbytes-wrong", "entry c's nbytes twice the tensor's (count x unit still fits)",
          edit=with_entry("c", nbytes=2 * part(parts, "c")["entry"]["nbytes"]), trust="4")
    ua = np.frombuffer(a["indices"], "<u8")
    halves = np.sort(np.concatenate([2 * ua, 2 * ua + 1])).astype("<u8").tobytes()
    odd = [p if p is not a else {"entry": dict(a["entry"], unit=32, count=2 * len(ua)), "indices": halves,
                                 "data": a["data"]} for p in parts]
    case("unit-not-row-element-or-whole", "entry a in half rows (unit 32, each row's two halves): the bytes put "
         "back are right, but a unit is a row, an element or the whole tensor", mix,
         {".nnpatch-journal": encode(meta, odd)}, trust="4")

    def indices(name, new_idx):
        p = part(parts, name)
        return [q if q is not p else {"entry": p["entry"], "indices": np.asarray(new_idx, "<u8").tobytes(),
                                      "data": p["data"]} for q in parts]

    case("indices-not-increasing", "entry a's first two unit indices swapped", mix,
         {".nnpatch-journal": encode(meta, indices("a", [ua[1], ua[0], *ua[2:]]))}, trust="4")
    case("indices-repeated", "entry a's second unit index equal to its first", mix,
         {".nnpatch-journal": encode(meta, indices("a", [ua[0], ua[0], *ua[2:]]))}, trust="4")
    case("index-out-of-range", "entry a's last unit index equal to the tensor's number of rows", mix,
         {".nnpatch-journal": encode(meta, indices("a", [*ua[:-1], a["entry"]["nbytes"] // a["entry"]["unit"]]))},
         trust="4")

    # result (Trust step 5): exit 4, kept
    flipped = [q if q is not a else {"entry": a["entry"], "indices": a["indices"],
                                     "data": bytes([a["data"][0] ^ 1]) + a["data"][1:]} for q in parts]
    case("old-bytes-wrong", "one old byte of entry a changed (trailer recomputed): the rollback would not give "
         "a's base_blake3", mix, {".nnpatch-journal": encode(meta, flipped)}, trust="5")
    changed = bytearray(mix)
    idx_a = set(int(i) for i in ua)
    row = next(r for r in range(a["entry"]["nbytes"] // 64) if r not in idx_a)
    changed[a["entry"]["offset"] + row * 64] ^= 1
    case("model-changed-since", "a byte of a row of tensor a that the update does not touch changed since the "
         "journal was written: the rollback would not give a's base_blake3", bytes(changed),
         {".nnpatch-journal": written}, trust="5")
    craft("base-digest-wrong", "entry c's base_blake3 is its target_blake3",
          edit=lambda o: ent(o, "c").update(base_blake3=ent(o, "c")["target_blake3"]), trust="5")

    # entries that save nothing (count 0: JOURNAL.md allows them) and journals with no entry
    head = old[:8 + struct.unpack_from("<Q", old, 0)[0]]
    d = parse_safetensors_header(head, file_size=len(old))[1]["d"]
    d_bytes = old[d.begin:d.end]

    def with_d(unit: int, base: bytes) -> list[dict]:
        e = {"name": "d", "offset": d.begin, "nbytes": d.nbytes, "unit": unit, "count": 0,
             "base_blake3": blake3.blake3(base).hexdigest(), "target_blake3": blake3.blake3(d_bytes).hexdigest()}
        return [*parts, {"entry": e, "indices": b"", "data": b""}]

    case("count-zero-entry", "a fourth entry, for tensor d, with count 0 (nothing to put back; d is already "
         "its base)", mix, {".nnpatch-journal": encode(meta, with_d(1, d_bytes))}, valid=True, trust="protocol")
    case("no-entries", "a journal with no entries (nothing to put back; the model is left as it is)", old,
         {".nnpatch-journal": encode(meta, [])}, valid=True, trust="protocol")
    case("count-zero-entry-unit-zero", "the count-0 entry for d with unit 0: not a row, an element or the "
         "whole tensor", mix, {".nnpatch-journal": encode(meta, with_d(0, d_bytes))}, trust="4")
    case("count-zero-entry-not-base", "the count-0 entry for d names a base_blake3 that d is not: nothing to "
         "put back would make it so", mix, {".nnpatch-journal": encode(meta, with_d(1, b"another d"))}, trust="5")

    # the model's own header, as the journal names it
    garbled = bytearray(mix)
    garbled[8] = ord("[")  # its JSON no longer an object; same size, same length prefix
    ghead = bytes(garbled[:len(head)])
    case("model-header-not-safetensors", "the journal names the model's header exactly, but that header is not "
         "a safetensors header (its JSON starts with '[')", bytes(garbled), {".nnpatch-journal": encode(
             meta, parts, edit=lambda o: o["model"].update(header_blake3=blake3.blake3(ghead).hexdigest()))},
         trust="4")
    huge = struct.pack("<Q", 1 << 62) + mix[8:]
    case("model-header-length-huge", "the model's first 8 bytes say its header is 2^62 bytes long (the journal "
         "is the writer's)", huge, {".nnpatch-journal": written}, trust="3")

    gguf_cases(directory, case)
    return write(directory, cases, old, new)


def gguf_model(path: str, rows) -> None:
    """A small GGUF file (gguf-py): an F32 matrix whose ``rows`` are moved, a Q8_0 one, an F32 vector."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    rng = np.random.default_rng(SEED)
    m = (rng.standard_normal((12, 16)) * 0.05).astype("<f4")
    q = (rng.standard_normal((4, 64)) * 0.05).astype("<f4")
    v = (rng.standard_normal(16) * 0.05).astype("<f4")
    m[list(rows)] += np.float32(1e-3)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("journal vectors")
    w.add_tensor("m.weight", m)
    w.add_tensor("q.weight", quants.quantize(q, Q.Q8_0), raw_shape=quants.quant_shape_to_byte_shape(q.shape, Q.Q8_0),
                 raw_dtype=Q.Q8_0)
    w.add_tensor("v.weight", v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_cases(directory: str, case) -> None:
    """An extents model (GGUF, journal 1.1): the writer's journal recovered before and after the writes,
    and one case per extents rule of Trust steps 2 to 4."""
    old_path, new_path = os.path.join(directory, "old.gguf"), os.path.join(directory, "new.gguf")
    patch_path = os.path.join(directory, "patch-gguf.nnpatch")
    gguf_model(old_path, [])
    gguf_model(new_path, [1, 5, 6])
    nnpatch.diff(old_path, new_path, patch_path, level=9)
    old, new = open(old_path, "rb").read(), open(new_path, "rb").read()
    written = writer_journal(old_path, patch_path, GGUF[0])
    meta, parts = decode(written)
    if encode(meta, parts, minor=1) != written:
        raise SystemExit("the encoder written from JOURNAL.md does not reproduce the writer's GGUF journal")

    def craft(name, description, *, model=new, trust, **kw):
        case(name, description, model, {".nnpatch-journal": encode(meta, parts, minor=1, **kw)}, trust=trust,
             kind=GGUF)

    def model_edit(**changes):
        return lambda obj: obj["model"].update(changes)

    case("gguf-journal-before-writes", "an extents model (GGUF, journal 1.1): committed, nothing written", old,
         {".nnpatch-journal": written}, valid=True, trust="protocol", kind=GGUF)
    case("gguf-journal-after-writes", "an extents model (GGUF, journal 1.1): every new row written", new,
         {".nnpatch-journal": written}, valid=True, trust="protocol", kind=GGUF)
    table = meta["model"]["extents"]
    craft("gguf-extents-not-hex", "model.extents has an uppercase hex digit", trust="2",
          edit=model_edit(extents=table.upper()))
    craft("gguf-extents-odd", "model.extents is an odd number of hex digits", trust="2",
          edit=model_edit(extents=table[:-1]))
    craft("gguf-extents-cut", "model.extents is a table cut short", trust="2", edit=model_edit(extents=table[:-2]))
    craft("gguf-extents-other-size", "model.extents describes a file of another size than model.size", trust="2",
          edit=model_edit(size=meta["model"]["size"] + 1))
    craft("gguf-extents-header-keys", "model has header_len beside extents", trust="2",
          edit=model_edit(header_len=0))
    craft("gguf-skeleton-other", "model.skeleton_blake3 names another skeleton", trust="3",
          edit=model_edit(skeleton_blake3="0" * 64))
    skel = bytearray(new)
    skel[4] ^= 1  # the GGUF version field: a skeleton byte
    case("gguf-model-skeleton-changed", "a byte of the model outside its extents changed since", bytes(skel),
         {".nnpatch-journal": written}, trust="3", kind=GGUF)
    craft("gguf-entry-not-an-extent", "an entry names no extent of the table", trust="4",
          edit=lambda obj: obj["entries"][0].update(name="nope"))
    craft("gguf-entry-offset", "an entry's offset is not its extent's", trust="4",
          edit=lambda obj: obj["entries"][0].update(offset=obj["entries"][0]["offset"] - 32))
    craft("gguf-entry-unit", "an entry's unit is neither a row, the extent, nor an item dividing a row", trust="4",
          edit=lambda obj: obj["entries"][0].update(unit=3))
    mixed = bytearray(new)
    e = parts[0]["entry"]
    mixed[e["offset"]:e["offset"] + e["nbytes"]] = b"\xff" * e["nbytes"]
    case("gguf-rollback-not-base", "the model's tensor changed since: the rollback would not give the base",
         bytes(mixed), {".nnpatch-journal": written}, trust="5", kind=GGUF)


def outcome(name: str, model: bytes, files: dict, old: bytes, MODEL: str = MODEL) -> dict:
    """What Python's recover does with a case (the generator records it; the tests compare both
    implementations against the record)."""
    from nnpatch.applier import recover
    from nnpatch.errors import NnpatchError
    with tempfile.TemporaryDirectory() as tmp:
        m = os.path.join(tmp, MODEL)
        with open(m, "wb") as f:
            f.write(model)
        for suffix, data in files.items():
            with open(m + suffix, "wb") as f:
                f.write(data)
        try:
            note = recover(m)
        except NnpatchError as e:
            after = open(m, "rb").read()
            left = sorted(n for n in os.listdir(tmp) if n != MODEL)
            if after != model or left != sorted(MODEL + s for s in files) or any(
                    open(m + s, "rb").read() != d for s, d in files.items()):
                raise SystemExit(f"{name}: refused ({e}) but the model or a journal changed")
            return {"outcome": "refused", "exit": e.exit_code, "error": type(e).__name__, "journal_after": left,
                    "python_message": str(e).replace(tmp + os.sep, "")}
        after = open(m, "rb").read()
        left = sorted(n for n in os.listdir(tmp) if n != MODEL)
        if left:
            raise SystemExit(f"{name}: recovered but left {left}")
        if after == model and note is not None and "rolled back" not in note:
            return {"outcome": "discarded", "exit": 0, "journal_after": []}
        if after != old:
            raise SystemExit(f"{name}: recovered to something other than the old model")
        return {"outcome": "recovered", "exit": 0, "journal_after": []}


def write(directory: str, cases: dict, old: bytes, new: bytes) -> dict:
    index = {"_comment": COMMENT,
             "model_before": "old.safetensors", "model_before_blake3": blake3.blake3(old).hexdigest(),
             "model_updated": "new.safetensors", "model_updated_blake3": blake3.blake3(new).hexdigest(),
             "patch": "patch.nnpatch", "zstd_version": list(zstandard.ZSTD_VERSION), "cases": []}
    for name, (description, model, files, valid, trust, expect, kind) in cases.items():
        MODEL, before = kind[:2]  # noqa: N806 (the model's name and the file it is before the update)
        old = open(os.path.join(directory, before), "rb").read()
        folder = os.path.join(directory, "cases", name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, MODEL), "wb") as f:
            f.write(model)
        for suffix, data in files.items():
            with open(os.path.join(folder, MODEL + suffix), "wb") as f:
                f.write(data)
        got = outcome(name, model, files, old, MODEL)
        if (got["outcome"], got["exit"], got.get("error")) != expect:
            raise SystemExit(f"{name}: JOURNAL.md says {expect}, nnpatch's recover gives {got}")
        after = old if got["outcome"] == "recovered" else model
        entry = {"name": name, "description": description, "valid": valid, "trust": trust,
                 "dir": f"cases/{name}", "model": MODEL, "journals": sorted(MODEL + s for s in files),
                 "model_blake3": blake3.blake3(model).hexdigest(), **got,
                 "model_after": before if got["outcome"] == "recovered" else f"cases/{name}/{MODEL}",
                 "model_after_blake3": blake3.blake3(after).hexdigest()}
        if len(kind) > 2:  # another update than the index's
            entry.update(model_updated=kind[2], patch=kind[3])
        index["cases"].append(entry)
    with open(os.path.join(directory, "journal.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return index


OWN = ("cases", "journal.json", "old.safetensors", "new.safetensors", "patch.nnpatch", "old.gguf", "new.gguf",
       "patch-gguf.nnpatch")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true", help="rewrite spec/vectors/journal/ (but this script)")
    args = ap.parse_args()
    if args.update:
        remove(HERE, OWN)
        index = build(HERE)
        print(f"wrote {len(index['cases'])} cases to {HERE}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp)
        return report(stale(tmp, HERE, owned=("cases",)))


if __name__ == "__main__":
    raise SystemExit(main())
