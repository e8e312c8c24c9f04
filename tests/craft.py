"""Write nnpatch containers, journals, ONNX skeletons and release manifests from the spec alone.

This is an attacker's toolkit for the crafted-input tests (tests/test_crafted.py) and the
structure-aware fuzzer (fuzz/): every byte written here comes from this module's own encoder,
following spec/FORMAT.md, spec/JOURNAL.md and spec/json/release-manifest.schema.json, never
from nnpatch's writer; the trailer (and, on request, the Ed25519 signature) is always valid,
so a reader has to reject the content itself.

Sections are edited in place: :func:`decode_patch` returns the header object with each
section's stored bytes under the private key ``"_data"``; :func:`encode_patch` lays the
sections out again (in the spec's order, 64-byte aligned, or end to end when the header's
``required_features`` holds ``packed-sections``), writes ``offset`` and ``length``,
strips ``"_data"`` and recomputes the trailer. ``size`` and ``codec`` are left to the caller
(:func:`section` fills them for raw or zstd data).
"""

from __future__ import annotations

import base64
import copy
import json
import math
import struct
from typing import Callable, Iterable

import blake3
import zstandard

# --- spec constants (FORMAT.md sections 3-4, JOURNAL.md "Layout") ------------------------------------

PATCH_MAGIC = b"\x89NNP\r\n\x1a\n"
JOURNAL_MAGIC = b"\x89NNJ\r\n\x1a\n"
PREAMBLE = struct.Struct("<8sHHIQ")  # magic, major, minor, flags, header length: 24 bytes
FLAG_SIGNED = 1
FLAG_HEADER_ZSTD = 2
TRAILER = 32
SIGNATURE_BLOCK = 96
SIGNATURE_DOMAIN = b"nnpatch-signature-v1\x00"
SKELETON_MAGIC = b"NNPONNX1"
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
            "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def align(n: int) -> int:
    return (n + 63) // 64 * 64


def canonical(obj) -> bytes:
    """Section 5's canonical JSON: sorted keys, no whitespace, non-ASCII unescaped (lone surrogates kept)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


def zstd(data: bytes, level: int = 3) -> bytes:
    """One zstd frame that declares its content size (section 7.3)."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 31)


def digest(data) -> str:
    return blake3.blake3(data).hexdigest()


# --- sections --------------------------------------------------------------------------------------

def section(data: bytes, *, compress: bool = False, codec: list[str] | None = None, size: int | None = None) -> dict:
    """A Section object (5.4) holding ``data`` (raw, or zstd-compressed when ``compress``)."""
    if compress:
        return {"offset": 0, "length": 0, "size": len(data) if size is None else size,
                "codec": (codec or []) + ["zstd"], "_data": zstd(data)}
    return {"offset": 0, "length": 0, "size": len(data) if size is None else size, "codec": codec or [],
            "_data": data}


def section_bytes(s: dict) -> bytes:
    """The bytes a section holds after undoing its zstd stage."""
    return unzstd(s["_data"]) if s["codec"] and s["codec"][-1] == "zstd" else s["_data"]


def section_slots(h: dict) -> list[dict]:
    """The header's Section objects in the order of spec section 6."""
    out = []
    base, target = h.get("base") or {}, h.get("target") or {}
    for s in (base.get("extents"), base.get("layout"), target.get("extents"), target.get("layout"),
              target.get("skeleton")):
        if isinstance(s, dict):
            out.append(s)
    for f in target.get("files") or []:
        for key in ("layout", "content"):
            if isinstance(f, dict) and isinstance(f.get(key), dict):
                out.append(f[key])
    for op in h.get("ops") or []:
        for key in ("index", "scales", "values", "base_values"):
            if isinstance(op, dict) and isinstance(op.get(key), dict):
                out.append(op[key])
    return out


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k != "_data"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


# --- the container ---------------------------------------------------------------------------------

def decode_patch(data: bytes) -> dict:
    """The header object of a patch, each section's stored bytes under ``"_data"``, and ``"_version"``."""
    magic, major, minor, flags, hlen = PREAMBLE.unpack_from(data, 0)
    assert magic == PATCH_MAGIC, "not an nnpatch file"
    raw = data[PREAMBLE.size:PREAMBLE.size + hlen]
    if flags & FLAG_HEADER_ZSTD:
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)  # stops at the frame's end
    else:
        raw = raw.rstrip(b" ")
    h = json.loads(raw.decode("utf-8", "surrogatepass"))
    for s in section_slots(h):
        s["_data"] = bytes(data[s["offset"]:s["offset"] + s["length"]])
    h["_version"] = [major, minor]
    return h


def encode_patch(h: dict, *, zstd_header: bool = False, extra_flags: int = 0,
                 text_filter: Callable[[bytes], bytes] | None = None, sign_with=None,
                 version: tuple[int, int] | None = None, tail: bytes = b"") -> bytes:
    """A patch for header ``h`` (sections from ``"_data"``), laid out per spec section 6.

    ``text_filter`` rewrites the canonical JSON text before it is stored (to plant bytes no
    canonical encoder would write); ``sign_with`` an Ed25519 private key (cryptography) adds
    the signature block; ``version`` overrides ``h["_version"]`` (default 1.2).
    """
    major, minor = version or tuple(h.get("_version", (1, 2)))
    h = {k: v for k, v in h.items() if k != "_version"}
    slots = section_slots(h)
    for s in slots:
        s["length"] = len(s["_data"])
    flags = extra_flags | (FLAG_HEADER_ZSTD if zstd_header else 0) | (FLAG_SIGNED if sign_with is not None else 0)

    def header_text() -> bytes:
        text = canonical(_strip(h))
        if text_filter is not None:
            text = text_filter(text)
        return zstd(text, 19 if len(text) < (1 << 20) else 3) if zstd_header else text

    features = h.get("required_features")
    place = (lambda n: n) if isinstance(features, list) and "packed-sections" in features else align
    hlen = 0
    for _ in range(64):  # the header length only grows, so this settles
        cursor = PREAMBLE.size + hlen
        for s in slots:
            s["offset"] = place(cursor)
            cursor = s["offset"] + s["length"]
        text = header_text()
        if len(text) <= hlen:
            break
        hlen = align(PREAMBLE.size + len(text)) - PREAMBLE.size
    else:
        raise AssertionError("header length did not settle")
    pad = b"\x00" if zstd_header else b" "
    out = bytearray(PREAMBLE.pack(PATCH_MAGIC, major, minor, flags, hlen))
    out += text + pad * (hlen - len(text))
    for s in slots:
        out += b"\x00" * (s["offset"] - len(out))
        out += s["_data"]
    out += b"\x00" * (place(len(out)) - len(out))
    out += tail
    trailer = blake3.blake3(bytes(out)).digest()
    out += trailer
    if sign_with is not None:
        from cryptography.hazmat.primitives import serialization

        public = sign_with.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        out += public + sign_with.sign(SIGNATURE_DOMAIN + trailer)
    return bytes(out)


def trailer_of(patch: bytes) -> str:
    """The trailer hash of a patch (the 32 bytes before the signature block when signed)."""
    flags = PREAMBLE.unpack_from(patch, 0)[3]
    end = len(patch) - (SIGNATURE_BLOCK if flags & FLAG_SIGNED else 0)
    return patch[end - TRAILER:end].hex()


def with_raw_header(text: bytes, *, zstd_header: bool, major: int = 1, minor: int = 2, flags: int = 0) -> bytes:
    """A patch of nothing but a given header text (for parser attacks): no sections, valid trailer."""
    stored = zstd(text) if zstd_header else text
    hlen = align(PREAMBLE.size + len(stored)) - PREAMBLE.size
    body = PREAMBLE.pack(PATCH_MAGIC, major, minor, flags | (FLAG_HEADER_ZSTD if zstd_header else 0), hlen)
    body += stored + (b"\x00" if zstd_header else b" ") * (hlen - len(stored))
    return body + blake3.blake3(body).digest()


# --- safetensors and digests (spec section 8) -----------------------------------------------------

def safetensors_header(entries: Iterable[tuple[str, str, list[int], int, int]], metadata: dict | None = None,
                       *, raw_json: bytes | None = None) -> bytes:
    """The 8-byte length and JSON of a safetensors header (padded with spaces to 8 bytes)."""
    if raw_json is None:
        obj = {name: {"dtype": dt, "shape": list(shape), "data_offsets": [a, b]} for name, dt, shape, a, b in entries}
        if metadata:
            obj["__metadata__"] = metadata
        raw_json = json.dumps(obj, separators=(",", ":")).encode()
    raw_json += b" " * (-len(raw_json) % 8)
    return struct.pack("<Q", len(raw_json)) + raw_json


def read_safetensors(data: bytes) -> tuple[bytes, dict, dict]:
    """(header bytes, {name: (dtype, shape, bytes)}, metadata) of a safetensors file's bytes."""
    (n,) = struct.unpack_from("<Q", data, 0)
    obj = json.loads(data[8:8 + n])
    meta = obj.pop("__metadata__", {}) or {}
    start = 8 + n
    tensors = {k: (v["dtype"], tuple(v["shape"]), bytes(data[start + v["data_offsets"][0]:start + v["data_offsets"][1]]))
               for k, v in obj.items()}
    return bytes(data[:start]), tensors, meta


def name_key(name: str) -> bytes:
    return name.encode("utf-8", "surrogatepass")


def model_digest(tensors: dict) -> str:
    """Model digest (section 8) of ``{name: (dtype, shape, bytes)}``."""
    h = blake3.blake3(b"nnpatch-model-v1\x00")
    for name in sorted(tensors, key=name_key):
        dtype, shape, data = tensors[name]
        nb = name_key(name)
        h.update(struct.pack("<I", len(nb)) + nb + struct.pack("<B", len(dtype)) + dtype.encode()
                 + struct.pack("<B", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
                 + blake3.blake3(data).digest())
    return h.hexdigest()


def directory_digest(files: dict[str, str]) -> str:
    """Directory digest (section 8) of ``{relative path: file digest hex}``."""
    h = blake3.blake3(b"nnpatch-dir-v1\x00")
    for path in sorted(files, key=name_key):
        p = name_key(path)
        h.update(struct.pack("<I", len(p)) + p + bytes.fromhex(files[path]))
    return h.hexdigest()


def tensor_ref(dtype: str, shape, data: bytes) -> dict:
    return {"dtype": dtype, "shape": list(shape), "blake3": digest(data)}


def model_ref(file_bytes: bytes, tensors: dict, fmt: str = "safetensors") -> dict:
    return {"format": fmt, "size": len(file_bytes), "blake3": digest(file_bytes), "model_blake3": model_digest(tensors),
            "tensors": len(tensors)}


def file_patch(base_file: bytes, target_file: bytes, *, compress: bool = True, created_by: str = "craft") -> dict:
    """A header (with sections) turning one safetensors file into another by whole/add/remove ops only."""
    _, base, _ = read_safetensors(base_file)
    layout, target, _ = read_safetensors(target_file)
    ops = []
    for name in sorted(set(base) | set(target), key=name_key):
        if name in base and name in target and base[name] == target[name]:
            continue
        op: dict = {"name": name}
        if name not in target:
            op.update(op="remove", base=tensor_ref(*base[name]))
        elif name not in base:
            op.update(op="add", target=tensor_ref(*target[name]), values=section(target[name][2], compress=compress))
        else:
            op.update(op="whole", base=tensor_ref(*base[name]), target=tensor_ref(*target[name]),
                      values=section(target[name][2], compress=compress))
        ops.append(op)
    t = model_ref(target_file, target)
    t["layout"] = section(layout, compress=compress)
    return {"created_by": created_by, "required_features": [], "base": model_ref(base_file, base), "target": t,
            "ops": ops}


def set_layout(h: dict, layout: bytes, *, compress: bool = True) -> None:
    h["target"]["layout"] = section(layout, compress=compress)


# --- signing ---------------------------------------------------------------------------------------

def new_key():
    """(private key, public PEM bytes) of a fresh Ed25519 key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pem


# --- ONNX skeleton (FORMAT.md 5.7) -----------------------------------------------------------------

def decode_skeleton(data: bytes) -> tuple[dict, bytes]:
    assert data.startswith(SKELETON_MAGIC)
    (n,) = struct.unpack_from("<I", data, 8)
    return json.loads(data[12:12 + n]), data[12 + n:]


def encode_skeleton(obj: dict | None, proto: bytes, *, raw_json: bytes | None = None) -> bytes:
    text = canonical(obj) if raw_json is None else raw_json
    return SKELETON_MAGIC + struct.pack("<I", len(text)) + text + proto


def plant_external(h: dict, location: str, content: bytes, *, size: int | None = None) -> None:
    """Make an ONNX target's skeleton carry an external data file at ``location`` holding ``content``
    (all of it a "gap": no tensor in it), and list it in ``outputs`` with its true size and digest."""
    sk = h["target"]["skeleton"]
    obj, proto = decode_skeleton(section_bytes(sk))
    obj.setdefault("externals", {})[location] = {
        "size": len(content) if size is None else size,
        "gaps": [[0, len(content), base64.b64encode(content).decode()]] if content else []}
    h["target"]["skeleton"] = section(encode_skeleton(obj, proto), compress=True)
    outs = h["target"]["outputs"]
    rest = [o for o in outs[1:] if o["path"] != location] + [{"path": location, "size": len(content),
                                                              "blake3": digest(content)}]
    h["target"]["outputs"] = [outs[0]] + sorted(rest, key=lambda o: name_key(o["path"]))


def edit_skeleton(h: dict, edit: Callable[[dict], None] | None = None, *, raw_json: bytes | None = None) -> None:
    sk = h["target"]["skeleton"]
    obj, proto = decode_skeleton(section_bytes(sk))
    if edit is not None:
        edit(obj)
    h["target"]["skeleton"] = section(encode_skeleton(obj, proto, raw_json=raw_json), compress=True)


# --- directory targets (FORMAT.md 5.6) ---------------------------------------------------------------

def add_blob(h: dict, path: str, content: bytes) -> None:
    """Add (or replace) a ``blob`` file of a directory target, keeping files sorted and the digests true."""
    files = [f for f in h["target"]["files"] if f["path"] != path]
    files.append({"path": path, "kind": "blob", "size": len(content), "blake3": digest(content),
                  "content": section(content, compress=True)})
    h["target"]["files"] = sorted(files, key=lambda f: name_key(f["path"]))
    fix_directory_totals(h)


def add_copy(h: dict, path: str, source: str, content: bytes) -> None:
    """Add a ``copy`` file whose bytes come from the base directory's ``source``."""
    files = [f for f in h["target"]["files"] if f["path"] != path]
    files.append({"path": path, "kind": "copy", "size": len(content), "blake3": digest(content), "from": source})
    h["target"]["files"] = sorted(files, key=lambda f: name_key(f["path"]))
    fix_directory_totals(h)


def fix_directory_totals(h: dict) -> None:
    files = h["target"]["files"]
    h["target"]["size"] = sum(f["size"] for f in files)
    h["target"]["blake3"] = directory_digest({f["path"]: f["blake3"] for f in files})


# --- journals (JOURNAL.md) ---------------------------------------------------------------------------

def journal_meta(model_file: bytes, *, patch: str = "0" * 64) -> dict:
    """A journal's identity part for a model file's bytes (size, header length and digest)."""
    (n,) = struct.unpack_from("<Q", model_file, 0)
    head = model_file[:8 + n]
    return {"created_by": "craft", "model": {"size": len(model_file), "header_len": len(head),
                                             "header_blake3": digest(head)},
            "base": {"blake3": "1" * 64, "model_blake3": "2" * 64},
            "target": {"blake3": "3" * 64, "model_blake3": "4" * 64}, "patch": patch}


def journal_entry(name: str, offset: int, nbytes: int, unit: int, indices: list[int], old: bytes, *,
                  base_blake3: str, target_blake3: str = "5" * 64, overrides: dict | None = None) -> dict:
    """One entry; ``_indices``/``_data`` are the bytes stored, ``overrides`` replace JSON fields
    after layout (e.g. ``index_at=-1``)."""
    e = {"name": name, "offset": offset, "nbytes": nbytes, "unit": unit, "count": len(indices),
         "base_blake3": base_blake3, "target_blake3": target_blake3, "index_at": 0, "data_at": 0,
         "_indices": b"".join(struct.pack("<Q", i) for i in indices), "_data": old, "_overrides": overrides or {}}
    return e


def encode_journal(meta: dict, entries: list[dict], *, raw_header: bytes | None = None,
                   major: int = 1, minor: int = 0, flags: int = 0) -> bytes:
    """A committed journal: preamble, space-padded JSON header, each entry's indices and old bytes
    (each zero-padded to 64), trailer."""
    def text_for(hlen: int) -> bytes:
        pos = PREAMBLE.size + hlen
        for e in entries:
            e["index_at"] = pos
            pos = align(pos + len(e["_indices"]))
            e["data_at"] = pos
            pos = align(pos + len(e["_data"]))
            e.update(e["_overrides"])
        if raw_header is not None:
            return raw_header
        return canonical(dict(meta, entries=[{k: v for k, v in e.items() if not k.startswith("_")}
                                             for e in entries]))

    hlen = 0
    while True:
        text = text_for(hlen)
        if len(text) <= hlen:
            break
        hlen = align(PREAMBLE.size + len(text)) - PREAMBLE.size
    out = bytearray(PREAMBLE.pack(JOURNAL_MAGIC, major, minor, flags, hlen) + text + b" " * (hlen - len(text)))
    for e in entries:
        for part in (e["_indices"], e["_data"]):
            out += part
            out += b"\x00" * (align(len(out)) - len(out))
    return bytes(out) + blake3.blake3(bytes(out)).digest()


# --- release manifests (spec/json/release-manifest.schema.json) -------------------------------------

def manifest_link(patch_name: str, patch: bytes, base_blake3: str, target_blake3: str) -> dict:
    return {"patch": patch_name, "patch_size": len(patch), "patch_blake3": digest(patch),
            "patch_trailer_blake3": trailer_of(patch), "base_blake3": base_blake3, "target_blake3": target_blake3}


def encode_manifest(target: dict, bases: list[dict]) -> bytes:
    """``target``: blake3, size, model_blake3 (name optional); ``bases``: entries of the schema."""
    m = {"format": "nnpatch-release", "version": 1, "created_by": "craft", "target": target, "bases": bases}
    return (json.dumps(m, indent=2, sort_keys=True) + "\n").encode()


MANIFEST_PAYLOAD_TYPE = "application/vnd.nnpatch.release-manifest+json"


def sign_envelope(payload: bytes, key, *, payload_type: str = MANIFEST_PAYLOAD_TYPE) -> bytes:
    """A DSSE v1 envelope (MANIFEST.md, "Signature") of ``payload`` signed with ``key`` over the PAE."""
    t = payload_type.encode()
    sig = key.sign(b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload))
    env = {"payloadType": payload_type, "payload": base64.b64encode(payload).decode(),
           "signatures": [{"sig": base64.b64encode(sig).decode()}]}
    return json.dumps(env).encode()


def manifest_entry(base_blake3: str, base_size: int, patch_name: str, patch: bytes) -> dict:
    return {"name": "old", "base_blake3": base_blake3, "base_size": base_size, "patch": patch_name,
            "patch_size": len(patch), "patch_blake3": digest(patch), "patch_trailer_blake3": trailer_of(patch)}


# --- deep structures ---------------------------------------------------------------------------------

def nested_list_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_copy(h: dict) -> dict:
    return copy.deepcopy(h)


def numel(shape) -> int:
    return math.prod(shape)
