"""Crafted inputs, round 3 (issue 28): the device's own files, the feed's strings, slow servers,
checks that pass what apply refuses, and strings big enough to exhaust a phone's memory.

Same harness as tests/test_crafted.py (its ``world``: a tree with the base, real patches, a fake
``.git`` and an ``outside/`` folder; the CLI in a subprocess under ``prlimit``, peak RSS measured),
and every input written by tests/craft.py from the spec.
"""

from __future__ import annotations

import base64
import json
import os
import shutil

import numpy as np
import pytest

from . import craft
from .feedserver import Fault, FeedServer
from .test_crafted import (CONTROL, HAVE_ONNX, TIMEOUT_S, assert_bounded, assert_refused, assert_untouched,  # noqa: F401
                           many_adds, refused_and_untouched, template, world)

#: SECURITY.md, "Memory": the most resident memory one nnpatch command may reach on any input
#: (Python; the native applier's bound is far lower). Checked on every case here.
MEMORY_BOUND_MB = 256

STRING_CAP = 1 << 20  # SECURITY.md "Limits": the longest JSON string nnpatch reads, decoded


def within_bound(r) -> None:
    assert r.rss_mb < MEMORY_BOUND_MB, f"peak RSS {r.rss_mb:.0f} MB over the {MEMORY_BOUND_MB} MB bound: {r}"


# --- item 11: big strings inside the other limits ---------------------------------------------------

def _big_string_patch(world, text_filter, *, sign_with=None, zstd_header: bool = True) -> bytes:
    h = craft.file_patch(world.read("base.safetensors"), world.read("target.safetensors"))
    h["x-big"] = 0
    return craft.encode_patch(h, zstd_header=zstd_header, text_filter=text_filter, sign_with=sign_with)


def _low_entropy(n: int) -> bytes:
    """``n`` letters that zstd stores in about a fiftieth of their size (within the 64x header rule)."""
    a = np.full(n, ord("A"), np.uint8)
    a[::40] = np.random.default_rng(0).integers(ord("B"), ord("Z"), len(a[::40]), dtype=np.uint8)
    return a.tobytes()


def _one_string(n: int):
    return lambda text: text.replace(b'"x-big":0', b'"x-big":"' + _low_entropy(n) + b'"', 1)


def _escaped_quotes(n: int):
    """``n`` escaped quotes, every 20th followed by a letter, so that the frame keeps within 64x."""
    unit = b'\\"' * 19 + b'\\"'
    letters = np.random.default_rng(1).integers(ord("a"), ord("z"), n // 20, dtype=np.uint8).tobytes()
    body = b"".join(unit + bytes([c]) for c in letters)
    return lambda text: text.replace(b'"x-big":0', b'"x-big":"' + body + b'"', 1)


@pytest.mark.parametrize("command", ["apply", "verify", "show"])
def test_header_with_a_53_mb_string_is_refused_within_the_bound(world, command):
    """A 907 KB patch whose zstd header expands to ~53 MB of JSON, one string under an x- key."""
    patch = _big_string_patch(world, _one_string(53 << 20))
    assert len(patch) < 2 << 20
    world.write("big.nnpatch", patch)
    args = {"apply": ["apply", "base.safetensors", "big.nnpatch", "-o", "out.safetensors"],
            "verify": ["verify", "big.nnpatch", "--base", "base.safetensors"],
            "show": ["show", "big.nnpatch"]}[command]
    r = refused_and_untouched(world, args, 3)
    assert "string" in r.err, str(r)
    within_bound(r)


def test_header_with_ten_mebi_escaped_quotes_is_refused_within_the_bound(world):
    world.write("q.nnpatch", _big_string_patch(world, _escaped_quotes(10 << 20)))
    r = refused_and_untouched(world, ["apply", "base.safetensors", "q.nnpatch", "-o", "out.safetensors"], 3)
    within_bound(r)


def test_a_string_at_the_cap_is_accepted(world):
    """Control: 1 MiB decoded (2 MiB stored, as escapes) under an x- key is within the rule and applies."""
    world.write("cap.nnpatch", _big_string_patch(world, lambda text: text.replace(
        b'"x-big":0', b'"x-big":"' + b"\\n" * STRING_CAP + b'"', 1), zstd_header=False))
    r = world.run("apply", "base.safetensors", "cap.nnpatch", "-o", "out.safetensors")
    assert r.rc == 0, str(r)
    assert world.read("out.safetensors") == world.read("target.safetensors")
    within_bound(r)


@pytest.mark.parametrize("command", ["apply", "verify"])
@pytest.mark.parametrize("signer", ["unsigned", "other-key"])
def test_big_header_on_stdin_with_key_is_refused_before_expansion(world, command, signer):
    """Unsigned (or signed by another key) on standard input with --key: exit 4 before the header is
    expanded, whatever it holds."""
    pytest.importorskip("cryptography")
    _, pem = craft.new_key()
    other, _ = craft.new_key()
    world.write("release.pub.pem", pem)
    world.write("big.nnpatch", _big_string_patch(world, _one_string(53 << 20),
                                                 sign_with=other if signer == "other-key" else None))
    args = (["apply", "base.safetensors", "-", "-o", "out.safetensors"] if command == "apply" else ["verify", "-"])
    r = refused_and_untouched(world, [*args, "--key", "release.pub.pem"], 4, stdin="big.nnpatch")
    within_bound(r)


def test_target_layout_with_a_95_mib_metadata_string(world):
    base = world.read("base.safetensors")
    target = world.read("target.safetensors")
    h = craft.file_patch(base, target)
    _, tensors, _ = craft.read_safetensors(target)
    entries, pos = [], 0
    for name, (dt, shape, raw) in tensors.items():
        entries.append((name, dt, list(shape), pos, pos + len(raw)))
        pos += len(raw)
    craft.set_layout(h, craft.safetensors_header(entries, {"v": _low_entropy(95 << 20).decode()}))
    world.write("meta.nnpatch", craft.encode_patch(h))
    r = refused_and_untouched(world, ["apply", "base.safetensors", "meta.nnpatch", "-o", "out.safetensors"], 3)
    within_bound(r)


def test_journal_with_a_50_mib_string(world):
    """recover on a journal whose header holds a 50 MiB string: one line, exit 3, journal kept."""
    shutil.copyfile(world.work / "base.safetensors", world.work / "model.safetensors")
    data = world.read("model.safetensors")
    meta = craft.journal_meta(data)
    meta["x-big"] = "J" * (50 << 20)
    world.write("model.safetensors.nnpatch-journal", craft.encode_journal(meta, []))
    r = refused_and_untouched(world, ["recover", "model.safetensors"], (3, 4))
    within_bound(r)


def test_manifest_with_a_big_string(world):
    shutil.copyfile(world.work / "base.safetensors", world.work / "model.safetensors")
    h = world.patch()
    patch = craft.encode_patch(h)
    world.write("dist/p.nnpatch", patch)
    model = world.read("model.safetensors")
    target = {"blake3": h["target"]["blake3"], "size": h["target"]["size"], "model_blake3": h["target"]["model_blake3"]}
    entry = craft.manifest_entry(craft.digest(model), len(model), "p.nnpatch", patch)
    entry["x-note"] = "N" * (12 << 20)
    world.write("dist/manifest.json", craft.encode_manifest(target, [entry]))
    r = refused_and_untouched(world, ["update", "model.safetensors", "--manifest", "dist/manifest.json"], 3)
    within_bound(r)


# --- item 11: many values inside the limits (spec/FORMAT.md section 12) ---------------------------------
# The worst shapes for a parser that builds Python objects: each within 64 MiB and 4,194,304 values. Under
# an x- key the patch is valid and applies; as the ops list it is refused; either way within the bound.

def _one_key_objects(n: int) -> bytes:
    return b"[" + b'{"a":0},' * (n - 1) + b'{"a":0}]'


def _short_strings(n: int) -> bytes:
    return b"[" + b'"a",' * (n - 1) + b'"a"]'


def _strings_of_200(n: int) -> bytes:
    one = b'"' + b"s" * 198 + b'"'
    return b"[" + (one + b",") * (n - 1) + one + b"]"


def _deep_nest(depth: int, per_level: int) -> bytes:
    """``depth`` arrays, each holding the next and then ``per_level`` short strings: every level is long,
    so a parser that walks long containers one at a time meets each of them."""
    filler = b'"a",' * (per_level - 1) + b'"a"'
    return b"[" * depth + b"0" + (b"," + filler + b"]") * depth


SHAPES = {
    "2M-one-key-objects": lambda: _one_key_objects(2_000_000),
    "4M-short-strings": lambda: _short_strings(4_000_000),
    "262144-strings-of-200-bytes": lambda: _strings_of_200(262_144),
    "deep-nest-14-levels": lambda: _deep_nest(14, 280_000),
    # bounded samples of the two slowest (the full ones are marked bigjson: make test-bigjson)
    "65536-strings-of-200-bytes": lambda: _strings_of_200(65_536),
    "deep-nest-14-levels-small": lambda: _deep_nest(14, 70_000),
}
BIG = pytest.mark.bigjson  # over 10 s on a loaded 2-core machine: `make test-bigjson` runs them
X_KEY_SHAPES = list(SHAPES)[:4]
OPS_SHAPES = [*list(SHAPES)[:2], pytest.param(list(SHAPES)[2], marks=BIG), pytest.param(list(SHAPES)[3], marks=BIG),
              *list(SHAPES)[4:]]


def _header_with(world, where: str, value: bytes) -> bytes:
    """The base -> target patch with ``value`` as an x- key's value or as its ops list (plain header:
    text this repetitive would break the 64x rule of a zstd header)."""
    h = craft.file_patch(world.read("base.safetensors"), world.read("target.safetensors"), compress=False)
    if where == "x-key":
        h["x-big"] = 0
        return craft.encode_patch(h, text_filter=lambda t: t.replace(b'"x-big":0', b'"x-big":' + value, 1))
    h["ops"] = "OPS"
    return craft.encode_patch(h, text_filter=lambda t: t.replace(b'"ops":"OPS"', b'"ops":' + value, 1))


@pytest.mark.parametrize("shape", X_KEY_SHAPES)
def test_many_values_under_an_x_key_apply_within_the_bound(world, shape):
    world.write("many.nnpatch", _header_with(world, "x-key", SHAPES[shape]()))
    r = world.run("apply", "base.safetensors", "many.nnpatch", "-o", "out.safetensors", timeout=60)
    assert r.rc == 0, str(r)
    assert world.read("out.safetensors") == world.read("target.safetensors")
    within_bound(r)


def test_show_json_of_a_long_header_keeps_x_keys_within_1_mib(world):
    """A header over 1 MiB keeps its x- values (PatchHeader.extra, show --json) while they total at most
    1 MiB of JSON, and none past that (a reader ignores them, spec 5): here a 330 KB list is kept beside a
    1 MB unknown key; 4,000,000 strings are not."""
    h = craft.file_patch(world.read("base.safetensors"), world.read("target.safetensors"), compress=False)
    h["x-keep"] = ["abcdefgh"] * 30_000
    h["zz-pad"] = 0
    world.write("keep.nnpatch", craft.encode_patch(h, text_filter=lambda t: t.replace(
        b'"zz-pad":0', b'"zz-pad":' + _short_strings(250_000), 1)))
    r = world.run("show", "keep.nnpatch", "--json", timeout=60)
    assert r.rc == 0, str(r)
    assert json.loads(r.out)["x-keep"] == h["x-keep"]
    world.write("many.nnpatch", _header_with(world, "x-key", _short_strings(4_000_000)))
    r = world.run("show", "many.nnpatch", "--json", timeout=60)
    assert r.rc == 0, str(r)
    assert "x-big" not in json.loads(r.out)
    within_bound(r)


@pytest.mark.parametrize("shape", OPS_SHAPES)
def test_many_values_as_the_ops_are_refused_within_the_bound(world, shape):
    world.write("many.nnpatch", _header_with(world, "ops", SHAPES[shape]()))
    before = world.snapshot()
    r = world.run("verify", "many.nnpatch", "--base", "base.safetensors", timeout=60)
    assert_untouched(before, world.snapshot())
    assert_refused(r, 3)
    within_bound(r)


@pytest.mark.parametrize("shape", ["2M-one-key-objects", "4M-short-strings"])
def test_journal_with_many_values_is_refused_within_the_bound(world, shape):
    """recover on a journal whose header holds the shape under an unknown top-level key (which a
    reader ignores): the journal is refused for what it names (not this model's journal), within the bound."""
    shutil.copyfile(world.work / "base.safetensors", world.work / "model.safetensors")
    meta = craft.journal_meta(world.read("model.safetensors"))
    meta["model"]["size"] += 1  # a journal of another model: refused however it parses
    meta["x-big"] = 0
    text = craft.canonical(dict(meta, entries=[])).replace(b'"x-big":0', b'"x-big":' + SHAPES[shape](), 1)
    world.write("model.safetensors.nnpatch-journal", craft.encode_journal(meta, [], raw_header=text))
    before = world.snapshot()
    r = world.run("recover", "model.safetensors", timeout=60)
    assert_untouched(before, world.snapshot())
    assert_refused(r, (3, 4))
    within_bound(r)


def test_journal_names_past_16_mib_together_are_refused_within_the_bound(world):
    """JOURNAL.md Trust step 2: entry names total at most 16 MiB (each is kept); 300 names of 64 KiB with
    an emoji each: refused by the rule, exit 3, journal kept."""
    shutil.copyfile(world.work / "base.safetensors", world.work / "model.safetensors")
    meta = craft.journal_meta(world.read("model.safetensors"))
    entries = b",".join(b'{"base_blake3":"' + b"1" * 64 + b'","count":0,"data_at":0,"index_at":0,"name":"'
                        + f"{i:05d}\U0001F600".encode() + b"a" * 65_527 + b'","nbytes":0,"offset":0,'
                        b'"target_blake3":"' + b"2" * 64 + b'","unit":0}' for i in range(300))
    text = craft.canonical(dict(meta, entries=[])).replace(b'"entries":[]', b'"entries":[' + entries + b"]", 1)
    world.write("model.safetensors.nnpatch-journal", craft.encode_journal(meta, [], raw_header=text))
    before = world.snapshot()
    r = world.run("recover", "model.safetensors", timeout=60)
    assert_untouched(before, world.snapshot())
    assert_refused(r, 3)
    assert "names total more than 16777216 bytes" in r.err, str(r)
    within_bound(r)


def _manifest_with(world, note: bytes) -> None:
    """A one-patch manifest for base -> target, one base entry holding ``note`` under an x- key."""
    shutil.copyfile(world.work / "base.safetensors", world.work / "model.safetensors")
    h = world.patch()
    patch = craft.encode_patch(h)
    world.write("dist/p.nnpatch", patch)
    model = world.read("model.safetensors")
    target = {"blake3": h["target"]["blake3"], "size": h["target"]["size"], "model_blake3": h["target"]["model_blake3"]}
    entry = craft.manifest_entry(craft.digest(model), len(model), "p.nnpatch", patch)
    entry["x-note"] = 0
    raw = craft.encode_manifest(target, [entry]).replace(b'"x-note": 0', b'"x-note": ' + note, 1)
    assert len(raw) < 16 << 20
    world.write("dist/manifest.json", raw)


def test_manifest_with_two_million_objects_is_refused_within_the_bound(world):
    """16 MB (the limit is 16 MiB) of 1,900,000 one-key objects: past the 524,288 values a manifest may
    hold (MANIFEST.md, "Limits"), refused before it is parsed."""
    _manifest_with(world, _one_key_objects(1_900_000))
    r = refused_and_untouched(world, ["update", "model.safetensors", "--manifest", "dist/manifest.json"], 3)
    assert "524288 values" in r.err, str(r)
    within_bound(r)


def test_manifest_at_the_values_limit_applies_within_the_bound(world):
    """Control: 262,000 one-key objects (524,000 values with the rest) under an entry's x- key, which a
    reader ignores: applied."""
    _manifest_with(world, _one_key_objects(262_000))
    r = world.run("update", "model.safetensors", "--manifest", "dist/manifest.json", timeout=60)
    assert r.rc == 0, str(r)
    assert world.read("model.safetensors") == world.read("target.safetensors")
    within_bound(r)


def names_patch(world, count: int, length: int) -> bytes:
    """The base -> target patch with ``count`` more remove ops named by ``length`` bytes of UTF-8 each,
    every one with an emoji (so Python holds each name at 4 bytes a character)."""
    h = craft.file_patch(world.read("base.safetensors"), world.read("target.safetensors"), compress=False)
    ref = {"blake3": "0" * 64, "dtype": "U8", "shape": []}
    extra = [{"base": ref, "name": f"zz{i:05d}\U0001F600" + "a" * (length - 11), "op": "remove"} for i in range(count)]
    assert all(len(o["name"].encode()) == length for o in extra)
    h["ops"] = h["ops"] + extra
    return craft.encode_patch(h)


def test_names_past_16_mib_together_are_refused_within_the_bound(world):
    """FORMAT.md section 12: op names and paths total at most 16 MiB (a reader keeps them all): 300 names
    of 64 KiB with an emoji each (an 18 MiB header) would cost Python 78 MB; refused by the rule."""
    world.write("names.nnpatch", names_patch(world, 300, 65_536))
    r = refused_and_untouched(world, ["verify", "names.nnpatch", "--base", "base.safetensors"], 3)
    assert "names and paths total more than 16777216 bytes" in r.err, str(r)
    within_bound(r)


def test_names_at_16_mib_together_pass_the_rule(world):
    """Control: 255 names of 64 KiB and the patch's own names stay within 16 MiB (refused later, for
    naming tensors the base lacks)."""
    world.write("names.nnpatch", names_patch(world, 255, 65_536))
    r = world.run("verify", "names.nnpatch", "--base", "base.safetensors", timeout=60)
    assert "names and paths" not in r.err, str(r)
    assert "Traceback" not in r.err, str(r)
    within_bound(r)


@pytest.mark.parametrize("what, count", [pytest.param("metadata", 3_000_000, marks=BIG), ("metadata", 500_000),
                                         ("tensors", 1_000_000)])
def test_target_layout_with_millions_of_values_within_the_bound(world, what, count):
    """A target layout (a safetensors header: its limit is 100,000,000 bytes) of millions of metadata
    entries, or of 1,000,000 tensors more than the target has: refused (the layout must describe the
    target exactly), within the bound."""
    base = world.read("base.safetensors")
    target = world.read("target.safetensors")
    h = craft.file_patch(base, target)
    _, tensors, _ = craft.read_safetensors(target)
    entries, pos = [], 0
    for name, (dt, shape, raw) in tensors.items():
        entries.append((name, dt, list(shape), pos, pos + len(raw)))
        pos += len(raw)
    if what == "metadata":
        layout = craft.safetensors_header(entries, {f"k{i:07d}": "v" for i in range(count)})
    else:
        layout = craft.safetensors_header(entries + [(f"z{i:07d}", "U8", [0], pos, pos) for i in range(count)])
    craft.set_layout(h, layout)
    world.write("layout.nnpatch", craft.encode_patch(h))
    before = world.snapshot()
    r = world.run("apply", "base.safetensors", "layout.nnpatch", "-o", "out.safetensors", timeout=60)
    assert_untouched(before, world.snapshot())
    assert_refused(r, 3)
    within_bound(r)


# --- item 9: verify applies what apply applies before writing ----------------------------------------

def _onnx_case(world, case: str) -> None:
    h = world.patch("p-onnx.nnpatch")
    if case == "external-named-as-the-base":
        craft.plant_external(h, "base.safetensors", b"overwrite the base\n")
    elif case == "skeleton-garbage":
        obj, _ = craft.decode_skeleton(craft.section_bytes(h["target"]["skeleton"]))
        h["target"]["skeleton"] = craft.section(craft.encode_skeleton(obj, b"\xff\xff\xff\xff\x0f garbage"),
                                                compress=True)
    elif case == "skeleton-deep-json":
        obj, proto = craft.decode_skeleton(craft.section_bytes(h["target"]["skeleton"]))
        raw = b'{"x-":' + craft.nested_list_json(100_000) + b"," + craft.canonical(obj)[1:]
        h["target"]["skeleton"] = craft.section(craft.encode_skeleton(None, proto, raw_json=raw), compress=True)
    elif case == "external-dot-git":
        craft.plant_external(h, ".git/config", b"[core]\n")
    world.write("bad.nnpatch", craft.encode_patch(h))


ONNX_CASES = ["external-named-as-the-base", "skeleton-garbage", "skeleton-deep-json", "external-dot-git"]


@pytest.mark.parametrize("case", ONNX_CASES)
def test_verify_base_refuses_what_apply_refuses(world, case):
    """verify --base and apply give the same answer (exit 3) on ONNX targets that break spec 5.7."""
    if not HAVE_ONNX:
        pytest.skip("onnx")
    _onnx_case(world, case)
    a = refused_and_untouched(world, ["apply", "base.safetensors", "bad.nnpatch", "-o", "out.onnx"], 3)
    v = refused_and_untouched(world, ["verify", "bad.nnpatch", "--base", "base.safetensors"], 3)
    within_bound(a)
    within_bound(v)


def test_verify_base_control_a_real_onnx_patch_passes(world):
    if not HAVE_ONNX:
        pytest.skip("onnx")
    r = world.run("verify", "p-onnx-ext.nnpatch", "--base", "base.safetensors")
    assert r.rc == 0, str(r)


# --- item 10: the spec's own answers -----------------------------------------------------------------

@pytest.mark.parametrize("signer", ["unsigned", "other-key"])
def test_verify_key_exits_4_like_apply_check_key(world, signer):
    pytest.importorskip("cryptography")
    _, pem = craft.new_key()
    other, _ = craft.new_key()
    world.write("release.pub.pem", pem)
    h = craft.file_patch(world.read("base.safetensors"), world.read("target.safetensors"))
    world.write("x.nnpatch", craft.encode_patch(h, sign_with=other if signer == "other-key" else None))
    refused_and_untouched(world, ["verify", "x.nnpatch", "--key", "release.pub.pem"], 4)


def _release(world, *, edit=None, envelope_edit=None, key=None, patch_key="same", patch_edit=None):
    """A one-patch release of base -> target in dist/ (the manifest signed with ``key`` when given,
    the patch with ``patch_key``: "same", None or another key)."""
    shutil.copyfile(world.work / "base.safetensors", world.work / "model.safetensors")
    h = world.patch()
    if patch_edit is not None:
        patch_edit(h)
    patch = craft.encode_patch(h, sign_with=key if patch_key == "same" else patch_key)
    world.write("dist/p.nnpatch", patch)
    model = world.read("model.safetensors")
    target = {"blake3": h["target"]["blake3"], "size": h["target"]["size"], "model_blake3": h["target"]["model_blake3"],
              "name": "new"}
    m = json.loads(craft.encode_manifest(target, [craft.manifest_entry(craft.digest(model), len(model), "p.nnpatch",
                                                                        patch)]))
    m["release"] = 1
    if edit is not None:
        edit(m)
    raw = (json.dumps(m, indent=2, sort_keys=True) + "\n").encode()
    if key is not None:
        raw = craft.sign_envelope(raw, key)
        if envelope_edit is not None:
            env = json.loads(raw)
            envelope_edit(env)
            raw = json.dumps(env).encode()
    world.write("dist/manifest.json", raw)


MANIFEST_CASES = [
    pytest.param(lambda m: m["target"].update(name="../evil"), None, 3, id="target-name-not-the-pattern"),
    pytest.param(lambda m: m["bases"][0].update(name="x" * 95), None, 3, id="base-name-95-chars"),
    pytest.param(lambda m: m["bases"][0].update(name="\x1b]0;pwned\x07"), None, 3, id="base-name-osc"),
    pytest.param(lambda m: m.update(base_url="http://127.0.0.1:9/dist"), None, 3, id="base-url-no-slash"),
    pytest.param(None, lambda e: e.update(payloadType="application/json"), 4, id="payload-type-wrong"),
    pytest.param(None, lambda e: e.update(signatures=[]), 4, id="signatures-empty"),
]


@pytest.mark.parametrize("edit, envelope_edit, code", MANIFEST_CASES)
def test_manifest_rules_answered_as_manifest_md_says(world, edit, envelope_edit, code):
    pytest.importorskip("cryptography")
    key, pem = craft.new_key()
    world.write("release.pub.pem", pem)
    _release(world, edit=edit, envelope_edit=envelope_edit, key=key)
    refused_and_untouched(world, ["update", "model.safetensors", "--manifest", "dist/manifest.json",
                                  "--key", "release.pub.pem"], code)


def test_manifest_control_a_signed_release_applies(world):
    pytest.importorskip("cryptography")
    key, pem = craft.new_key()
    world.write("release.pub.pem", pem)
    _release(world, key=key)
    r = world.run("update", "model.safetensors", "--manifest", "dist/manifest.json", "--key", "release.pub.pem")
    assert r.rc == 0, str(r)
    assert world.read("model.safetensors") == world.read("target.safetensors")


# --- items 1, 3, 4: the device's own files, slow servers, refused downloads (over HTTP) -----------------

@pytest.fixture
def feed(world):
    """A signed one-patch release served on 127.0.0.1; the device's model is the base."""
    pytest.importorskip("urllib3")
    pytest.importorskip("cryptography")
    key, pem = craft.new_key()
    world.write("release.pub.pem", pem)
    world.key = key
    _release(world, key=key)
    with FeedServer(world.work / "dist") as srv:
        world.srv = srv
        yield world


def _update(world, *extra, timeout=TIMEOUT_S):
    return world.run("update", "model.safetensors", "--manifest", world.srv.url("manifest.json"),
                     "--key", "release.pub.pem", *extra, timeout=timeout)


def _partial(world) -> str:
    m = json.loads(base64.b64decode(json.loads(world.read("dist/manifest.json"))["payload"]))
    return f"model.safetensors.{m['bases'][0]['patch_blake3'][:32]}.nnpatch-part"


PLANTS = ["symlink-outside", "symlink-to-sibling", "dangling-symlink-outside", "hard-link-to-sibling", "fifo"]


@pytest.mark.parametrize("plant", PLANTS)
def test_partial_download_planted_beside_the_model_is_not_written_through(feed, plant):
    w = feed
    part = w.work / _partial(w)
    if plant == "symlink-outside":
        part.symlink_to(w.root / "outside" / "secret.txt")
    elif plant == "symlink-to-sibling":
        part.symlink_to(w.work / "other.bin")
    elif plant == "dangling-symlink-outside":
        part.symlink_to(w.root / "outside" / "new.bin")
    elif plant == "hard-link-to-sibling":
        os.link(w.work / "other.bin", part)
    else:
        os.mkfifo(part)
    before = w.snapshot()
    r = _update(w)
    assert r.rc == 0, str(r)
    assert w.read("model.safetensors") == w.read("target.safetensors")
    # the planted name was discarded (the download went into a new file of its own, then removed)
    assert_untouched(before, w.snapshot(), allow=("work/model.safetensors", "work/model.safetensors.nnpatch-state",
                                                  "work/" + _partial(w)))
    assert not os.path.lexists(part)
    within_bound(r)


@pytest.mark.parametrize("plant", ["fifo", "symlink-to-a-valid-state", "hard-link"])
def test_state_file_that_is_not_the_devices_own_is_refused(feed, plant):
    """A FIFO in place of the state file must not hang update; a link is not trusted: exit 3, one line."""
    w = feed
    state = w.work / "model.safetensors.nnpatch-state"
    if plant == "fifo":
        os.mkfifo(state)
    else:
        elsewhere = w.root / "outside" / "state.json"
        elsewhere.write_text(json.dumps({"format": "nnpatch-update-state", "version": 1, "release": 0,
                                         "target_blake3": "0" * 64, "key_id": "0" * 16, "manifest_blake3": "0" * 64,
                                         "accepted": "2025-01-01T00:00:00Z", "expires": None}))
        if plant == "hard-link":
            os.link(elsewhere, state)
        else:
            state.symlink_to(elsewhere)
    before = w.snapshot()
    r = _update(w, timeout=10)
    assert_refused(r, 3)
    assert "update state" in r.err, str(r)
    assert_untouched(before, w.snapshot())


def test_journal_temporary_file_planted_as_a_symlink_is_not_written_through(world):
    """apply --in-place writes its journal to MODEL.nnpatch-journal.tmp first: a symlink planted
    there is discarded, never followed."""
    shutil.copyfile(world.work / "base.safetensors", world.work / "model.safetensors")
    (world.work / "model.safetensors.nnpatch-journal.tmp").symlink_to(world.root / "outside" / "secret.txt")
    before = world.snapshot()
    r = world.run("apply", "model.safetensors", "p.nnpatch", "--in-place")
    assert r.rc == 0, str(r)
    assert world.read("model.safetensors") == world.read("target.safetensors")
    assert_untouched(before, world.snapshot(), allow=("work/model.safetensors",
                                                      "work/model.safetensors.nnpatch-journal.tmp"))


@pytest.mark.parametrize("plant", ["fifo", "symlink-outside"])
def test_journal_that_is_not_the_models_own_is_refused_and_kept(world, plant):
    shutil.copyfile(world.work / "base.safetensors", world.work / "model.safetensors")
    j = world.work / "model.safetensors.nnpatch-journal"
    if plant == "fifo":
        os.mkfifo(j)
    else:
        j.symlink_to(world.root / "outside" / "secret.txt")
    r = refused_and_untouched(world, ["recover", "model.safetensors"], 3)
    assert "journal" in r.err


def test_a_dripping_patch_server_is_cut_by_the_deadline(feed):
    """1 byte every 2 s: within the read timeout every time; the minimum rate and the deadline end it."""
    w = feed
    w.srv.set_faults(lambda path, rng: Fault("drip", seconds=2.0) if path.endswith(".nnpatch") else None)
    before = w.read("model.safetensors")
    r = _update(w, "--deadline", "6")
    assert_refused(r, 5)
    assert "deadline" in r.err, str(r)
    assert r.seconds < 15, str(r)
    assert w.read("model.safetensors") == before


def test_a_dripping_manifest_server_is_cut_by_default(feed):
    """The defaults alone (1 KiB/s over 10 s windows, 30 s plus the bytes at that rate) end a drip."""
    w = feed
    w.srv.set_faults(lambda path, rng: Fault("drip", seconds=2.0) if path.endswith("manifest.json") else None)
    r = _update(w, timeout=60)
    assert_refused(r, 5)
    assert r.seconds < 45, str(r)


def test_a_slow_but_steady_link_passes(feed):
    """Control: --min-rate low enough for a link that keeps it (bytes every 0.01 s) applies."""
    w = feed
    w.srv.set_faults(lambda path, rng: Fault("drip", seconds=0.0005) if path.endswith(".nnpatch") else None)
    r = _update(w, "--min-rate", "64")
    assert r.rc == 0, str(r)
    assert w.read("model.safetensors") == w.read("target.safetensors")


REFUSALS = ["patch-unsigned", "patch-other-key", "trailer-lies", "target-lies"]


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_download_is_removed(world, case):
    """A patch downloaded whole and then refused leaves no partial file with the attacker's bytes."""
    pytest.importorskip("urllib3")
    pytest.importorskip("cryptography")
    key, pem = craft.new_key()
    other, _ = craft.new_key()
    world.write("release.pub.pem", pem)
    kw = {}
    if case == "patch-unsigned":
        kw["patch_key"] = None
    elif case == "patch-other-key":
        kw["patch_key"] = other
    elif case == "trailer-lies":
        kw["edit"] = lambda m: m["bases"][0].update(patch_trailer_blake3="ab" * 32)
    else:
        kw["patch_edit"] = lambda h: h["target"].update(blake3="cd" * 32)
    _release(world, key=key, **kw)
    with FeedServer(world.work / "dist") as srv:
        world.srv = srv
        before = world.snapshot()
        r = _update(world)
    assert_refused(r, 4)
    assert_untouched(before, world.snapshot(), allow=("work/model.safetensors.nnpatch-state",))
    assert not any(n.endswith(".nnpatch-part") for n in os.listdir(world.work)), os.listdir(world.work)


# --- item 2: strings from the feed reach the terminal escaped ---------------------------------------

def test_update_prints_feed_names_escaped(world):
    """An unsigned manifest naming its versions with terminal escapes: refused by the name pattern, and
    whatever is printed (the error line too) holds no control character."""
    shutil.copyfile(world.work / "base.safetensors", world.work / "model.safetensors")
    h = world.patch()
    patch = craft.encode_patch(h)
    world.write("dist/p.nnpatch", patch)
    model = world.read("model.safetensors")
    evil = "\x1b]0;pwned\x07\x9b2J"
    target = {"blake3": h["target"]["blake3"], "size": h["target"]["size"], "model_blake3": h["target"]["model_blake3"],
              "name": evil}
    entry = craft.manifest_entry(craft.digest(model), len(model), "p.nnpatch", patch)
    entry["name"] = evil
    world.write("dist/manifest.json", craft.encode_manifest(target, [entry]))
    for extra in ([], ["--dry-run"]):
        r = world.run("update", "model.safetensors", "--manifest", "dist/manifest.json", *extra)
        assert not CONTROL.search(r.out + r.err), str(r)
        assert_refused(r, 3)


def test_printable_is_the_one_escaping_function():
    """update, verify, recover and show print untrusted strings through report.printable."""
    import inspect

    from nnpatch.cli import apply as apply_cli, release as release_cli, show as show_cli, verify as verify_cli
    for mod in (apply_cli, release_cli, show_cli, verify_cli):
        assert "printable(" in inspect.getsource(mod), mod.__name__


# --- item 6: directory patches ------------------------------------------------------------------------

@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("path", ["d/" * 1000 + "x", "d/" * 65 + "x", "c" * 305, "a/" + "c" * 256 + "/x"])
def test_directory_paths_past_the_limits_are_refused_before_writing(world, path, in_place):
    h = world.patch("p-dir.nnpatch")
    craft.add_blob(h, path, b"deep")
    world.write("deep.nnpatch", craft.encode_patch(h))
    args = ["apply", "v1", "deep.nnpatch"] + (["--in-place"] if in_place else ["-o", "out"])
    r = refused_and_untouched(world, args, 3)
    assert "deep" in r.err or "longer than 255" in r.err, str(r)


def test_directory_path_at_the_limits_applies(world):
    """Control: 64 directories deep, 255-byte components."""
    h = world.patch("p-dir.nnpatch")
    path = "/".join(["d"] * 63 + ["e" * 255, "f" * 255])
    craft.add_blob(h, path, b"deep")
    world.write("deep.nnpatch", craft.encode_patch(h))
    r = world.run("apply", "v1", "deep.nnpatch", "-o", "out")
    assert r.rc == 0, str(r)
    assert (world.work / "out" / path).read_bytes() == b"deep"


@pytest.mark.parametrize("zstd_header", [False, True])
def test_ten_thousand_empty_blobs(world, zstd_header):
    """Plain header: a valid patch, applied. zstd header: past the 64x expansion rule of the form
    (FORMAT.md section 5: writers keep such a header plain), refused before it is expanded."""
    h = world.patch("p-dir.nnpatch")
    files = [f for f in h["target"]["files"]]
    empty = craft.digest(b"")
    for i in range(10_000):
        files.append({"path": f"e/{i:05d}", "kind": "blob", "size": 0, "blake3": empty,
                      "content": craft.section(b"")})
    h["target"]["files"] = sorted(files, key=lambda f: craft.name_key(f["path"]))
    craft.fix_directory_totals(h)
    world.write("empty.nnpatch", craft.encode_patch(h, zstd_header=zstd_header))
    if zstd_header:
        r = refused_and_untouched(world, ["apply", "v1", "empty.nnpatch", "-o", "out"], 3)
        assert "64x" in r.err, str(r)
        return
    r = world.run("apply", "v1", "empty.nnpatch", "-o", "out")
    assert r.rc == 0, str(r)
    assert len(os.listdir(world.work / "out" / "e")) == 10_000
    within_bound(r)


# --- item 7: show on 50,000 ops -----------------------------------------------------------------------

def test_show_fifty_thousand_ops_is_bounded(world, many_adds):
    shutil.copyfile(many_adds / "many.nnpatch", world.work / "many.nnpatch")
    r = world.run("show", "many.nnpatch")
    assert r.rc == 0, str(r)
    assert_bounded(r)
    within_bound(r)
    assert len(r.out.splitlines()) < 300, len(r.out.splitlines())
    assert "and 49,800 more tensors" in r.out
