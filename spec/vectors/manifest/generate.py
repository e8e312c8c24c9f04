"""Generate the release-feed test vectors in spec/vectors/manifest/ (spec/MANIFEST.md, "Test vectors").

    python spec/vectors/manifest/generate.py            # check: regenerate in memory, report differences
    python spec/vectors/manifest/generate.py --update   # rewrite the files; review the diff

The model is the rows-f32 patch vector's pair (spec/vectors/valid/rows-f32: old.safetensors is its base,
new.safetensors its target) and old-to-new.nnpatch its patch, signed with the test key. The keys are
Ed25519 keys made from fixed seeds (BLAKE3 of a fixed string), FOR TESTS ONLY: anyone can read the private
halves here. Ed25519 signatures are deterministic, so every file comes out the same each time. Envelopes,
PAE and signatures are written here from MANIFEST.md (with the `cryptography` package), not by nnpatch's
updater; nnpatch is used only to sign the patch (spec/FORMAT.md, "Signatures") and read its digests.
What each case must give is written below from MANIFEST.md and SECURITY.md ("Release feeds"), not taken
from an implementation: tests/test_manifest_vectors.py checks nnpatch against it.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import shutil
import sys
import tempfile

import blake3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.dirname(HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(VECTORS)))
sys.path.insert(1, os.path.dirname(VECTORS))  # spec/, for vectorfiles

from vectorfiles import remove, report, stale  # noqa: E402
from nnpatch.patchfile import read_patch  # noqa: E402
from nnpatch.signing import sign_patch  # noqa: E402

PAYLOAD_TYPE = "application/vnd.nnpatch.release-manifest+json"
KEY = "TEST-ONLY-release-key"
OTHER = "TEST-ONLY-other-key"
PATCH = "old-to-new.nnpatch"
STATE = "model.safetensors.nnpatch-state"
CREATED = "2026-01-01T00:00:00Z"
FUTURE = "2099-12-31T23:59:59Z"
PAST = "2001-01-01T00:00:00Z"
RELEASE = 5

COMMENT = (
    "nnpatch release-feed test vectors (spec/MANIFEST.md, 'Test vectors'). Files: old.safetensors (a model at "
    "its old version), new.safetensors (the release's target), old-to-new.nnpatch (the patch between them, "
    "signed by the test key), TEST-ONLY-release-key.pem / .pub.pem (the feed's key: FOR TESTS ONLY, its private "
    "half is public) and TEST-ONLY-other-key.pem / .pub.pem (another key). To run a case: make an empty folder "
    "W; copy the case's 'model' to W/model.safetensors and, when 'state' is not null, that file to "
    "W/model.safetensors.nnpatch-state; make W/feed/ holding the case's 'manifest' as manifest.json and each "
    "of 'feed_files' under its own name; run the updater on W/model.safetensors with the manifest "
    "W/feed/manifest.json and, when 'key' is not null, that public key (nnpatch update W/model.safetensors "
    "--manifest W/feed/manifest.json --key KEY). Expect: exit 'exit' (0 updated or already current, 3 invalid, "
    "4 refused, 7 no patch leads from this version) with one Error: line when not 0, 'error' the error class as "
    "nnpatch/errors.py names it; W/model.safetensors then byte for byte 'model_after' (BLAKE3 "
    "'model_after_blake3'); the state file: 'state_after' null (none), 'unchanged' (the case's state, byte for "
    "byte), or an object giving the fields the new state must hold (its 'accepted' is the time of the run); and "
    "no other file in W but feed/. 'verdict' says the same in words: updated, current or refused; 'step' the "
    "step of MANIFEST.md's 'What an updater checks' (or 'state': SECURITY.md's state file) that decides it. "
    "Times: valid manifests expire at " + FUTURE + ", expired ones at " + PAST + "."
)


# --- keys and envelopes, from MANIFEST.md ----------------------------------------------------------

def key(name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(blake3.blake3(f"nnpatch {name}, for tests only".encode()).digest())


def raw_public(k: Ed25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(k: Ed25519PrivateKey) -> str:
    return blake3.blake3(raw_public(k)).hexdigest()[:16]


def pae(payload_type: str, body: bytes) -> bytes:
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def dumps(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def envelope(payload: bytes, signatures: list[dict], payload_type: str = PAYLOAD_TYPE) -> bytes:
    return dumps({"payloadType": payload_type, "payload": b64(payload), "signatures": signatures})


def sig(k: Ed25519PrivateKey, payload: bytes, *, payload_type: str = PAYLOAD_TYPE, keyid: bool = True,
        message: bytes | None = None) -> dict:
    s = {"sig": b64(k.sign(pae(payload_type, payload) if message is None else message))}
    if keyid:
        s["keyid"] = key_id(k)
    return s


def signed(payload: bytes, k: Ed25519PrivateKey | None = None) -> bytes:
    return envelope(payload, [sig(k or key(KEY), payload)])


# --- the cases ------------------------------------------------------------------------------------

def build(directory: str) -> dict:
    os.makedirs(directory, exist_ok=True)
    valid = os.path.join(VECTORS, "valid", "rows-f32")
    shutil.copyfile(os.path.join(valid, "base.safetensors"), os.path.join(directory, "old.safetensors"))
    shutil.copyfile(os.path.join(valid, "target.safetensors"), os.path.join(directory, "new.safetensors"))
    the_key, other = key(KEY), key(OTHER)
    for name, k in ((KEY, the_key), (OTHER, other)):
        with open(os.path.join(directory, name + ".pem"), "wb") as f:
            f.write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
        with open(os.path.join(directory, name + ".pub.pem"), "wb") as f:
            f.write(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    patch = os.path.join(directory, PATCH)
    sign_patch(os.path.join(valid, "patch.nnpatch"), os.path.join(directory, KEY + ".pem"), patch)
    unsigned_patch = os.path.join(directory, "unsigned.nnpatch")
    shutil.copyfile(os.path.join(valid, "patch.nnpatch"), unsigned_patch)

    def digest(p) -> str:
        with open(p, "rb") as f:
            return blake3.blake3(f.read()).hexdigest()

    def size(p) -> int:
        return os.path.getsize(p)

    old, new = os.path.join(directory, "old.safetensors"), os.path.join(directory, "new.safetensors")
    with read_patch(patch) as p:
        trailer, model_blake3 = p.trailer_hash, p.header.target.model_blake3
    with read_patch(unsigned_patch) as p:
        unsigned_trailer = p.trailer_hash
    manifest = {
        "format": "nnpatch-release", "version": 1, "created_by": "spec/vectors/manifest/generate.py",
        "release": RELEASE, "created": CREATED, "expires": FUTURE,
        "target": {"name": "new", "blake3": digest(new), "size": size(new), "model_blake3": model_blake3},
        "bases": [{"name": "old", "base_blake3": digest(old), "base_size": size(old), "patch": PATCH,
                   "patch_size": size(patch), "patch_blake3": digest(patch), "patch_trailer_blake3": trailer}],
    }
    good = dumps(manifest)
    target = manifest["target"]["blake3"]

    def state(release: int, target_blake3: str = target, **changes) -> bytes:
        obj = {"format": "nnpatch-update-state", "version": 1, "release": release, "target_blake3": target_blake3,
               "key_id": key_id(the_key), "manifest_blake3": blake3.blake3(b"an earlier manifest").hexdigest(),
               "accepted": CREATED, "expires": FUTURE}
        obj.update(changes)
        return dumps(obj)

    def edited(**changes) -> bytes:
        """The manifest with top-level fields changed (None: removed); dotted keys reach into target and
        bases[0]."""
        m = copy.deepcopy(manifest)
        for k, v in changes.items():
            where, _, field = k.rpartition(".")
            obj = {"": m, "target": m["target"], "base": m["bases"][0]}[where]
            if v is None:
                obj.pop(field)
            else:
                obj[field] = v
        return dumps(m)

    def accepted(payload: bytes) -> dict:
        """The state a signed manifest of ``payload`` leaves once accepted (its 'accepted' time aside)."""
        return {"release": RELEASE, "target_blake3": target, "key_id": key_id(the_key),
                "manifest_blake3": blake3.blake3(payload).hexdigest(), "expires": FUTURE}

    cases = []

    def case(name, description, manifest_bytes, *, step, exit=0, error=None, model="old", key_file=KEY,
             state_bytes=None, state_after=None, feed=(PATCH,)):
        verdict = "refused" if exit else ("current" if model == "new" else "updated")
        after = model if exit else "new"
        if state_after is None and state_bytes is not None:  # refused before the state is written
            state_after = "unchanged"
        cases.append({"name": name, "description": description, "manifest": manifest_bytes, "step": step,
                      "exit": exit, "error": error, "verdict": verdict, "model": model, "model_after": after,
                      "key": key_file, "state": state_bytes, "state_after": state_after, "feed": list(feed)})

    refused = {"exit": 4, "error": "IntegrityError"}
    invalid = {"exit": 3, "error": "PatchFormatError"}
    envl = signed(good)

    # signed, accepted
    case("signed", "a signed release, no state yet: updated, the release recorded", envl, step="10",
         state_after=accepted(good))
    case("signed-current", "a signed release the model already is: nothing to do, the release recorded", envl,
         model="new", step="6", state_after=accepted(good))
    case("signed-newer-than-state", f"release {RELEASE} after release {RELEASE - 1}", envl, step="5",
         state_bytes=state(RELEASE - 1, blake3.blake3(b"the previous target").hexdigest()),
         state_after=accepted(good))
    case("signed-same-release-again", f"release {RELEASE} again, its target the one the state records (the same "
         "release replayed, or an update that stopped after accepting it): accepted", envl, step="5",
         state_bytes=state(RELEASE), state_after=accepted(good))
    case("state-with-more-fields", "the state has a field this version does not know, and expires null: "
         "both fine", envl, step="state", state_bytes=state(RELEASE - 1, expires=None, **{"x-note": "later"}),
         state_after=accepted(good))
    case("signed-no-keyid", "the signature has no keyid (it is only a hint): tried, verified", envelope(
        good, [sig(the_key, good, keyid=False)]), step="2", state_after=accepted(good))
    case("signed-two-signatures", "two signatures, the first by another key: the second verifies", envelope(
        good, [sig(other, good), sig(the_key, good)]), step="2", state_after=accepted(good))
    case("signed-base-url", "base_url with its trailing '/', the model already current (nothing fetched)",
         signed(edited(base_url="https://updates.example/model/")), model="new", step="3",
         state_after=accepted(edited(base_url="https://updates.example/model/")))

    # signed, refused by the envelope (step 2)
    case("wrong-key", "signed by another key", signed(good, other), step="2", **refused)
    case("signature-over-other-bytes", "a valid signature by the key, over another manifest (release 4's)",
         envelope(good, [sig(the_key, edited(release=RELEASE - 1))]), step="2", **refused)
    case("signature-without-pae", "Ed25519 by the key over the payload itself, not over PAE", envelope(
        good, [sig(the_key, good, message=good)]), step="2", **refused)
    case("signature-over-other-type", "a signature over PAE with the payload type 'application/json'",
         envelope(good, [sig(the_key, good, payload_type="application/json")]), step="2", **refused)
    case("signature-short", "a signature of 63 bytes", envelope(good, [{"keyid": key_id(the_key), "sig": b64(
        the_key.sign(pae(PAYLOAD_TYPE, good))[:63])}]), step="2", **refused)
    case("payload-type-wrong", "payloadType 'application/json', signed over PAE with that type: not a "
         "manifest envelope", envelope(good, [sig(the_key, good, payload_type="application/json")],
                                       payload_type="application/json"), step="2", **refused)
    case("signatures-empty", "an envelope with an empty signature list", envelope(good, []), step="2", **refused)
    case("signature-not-base64", "a signature that is not base64 ('!' characters)", envelope(
        good, [{"keyid": key_id(the_key), "sig": "!" * 88}]), step="2", **refused)
    case("payload-not-base64", "a payload that is not base64 (one '*' in it), the signature over the real "
         "payload", envl.replace(b'"payload": "', b'"payload": "*', 1), step="2", **refused)
    case("unsigned-with-key", "a plain manifest where a key requires a signed one", good, step="2", **refused)

    # signed, refused after the envelope
    case("expired", f"expired at {PAST}", signed(edited(expires=PAST)), step="4", **refused)
    case("no-release", "a signed manifest without a release number", signed(edited(release=None)), step="5",
         **refused)
    case("older-release", f"release {RELEASE} after release {RELEASE + 1}", envl, step="5",
         state_bytes=state(RELEASE + 1), **refused)
    case("same-release-other-target", f"release {RELEASE} again, but the state records another target for it",
         envl, step="5", state_bytes=state(RELEASE, blake3.blake3(b"another target").hexdigest()), **refused)
    case("no-entry-for-model", "no entry for the model's version: a full download is needed", signed(edited(
        **{"base.base_blake3": blake3.blake3(b"another version").hexdigest()})), step="6", exit=7,
         error="NoUpdatePathError", state_after=accepted(edited(
             **{"base.base_blake3": blake3.blake3(b"another version").hexdigest()})))
    bad_size = edited(**{"base.base_size": size(old) + 1})
    case("base-size-wrong", "the entry's base_size one more than the model's", signed(bad_size), step="6",
         state_after=accepted(bad_size), **refused)
    for name, desc, fields, feed in (
            ("patch-size-wrong", "patch_size one byte more than the patch's", {"base.patch_size": size(patch) + 1},
             (PATCH,)),
            ("patch-blake3-wrong", "patch_blake3 of other bytes", {"base.patch_blake3": blake3.blake3(
                b"other bytes").hexdigest()}, (PATCH,)),
            ("patch-unsigned", "the patch the manifest names (size and digests right) is not signed",
             {"base.patch": "unsigned.nnpatch", "base.patch_size": size(unsigned_patch),
              "base.patch_blake3": digest(unsigned_patch), "base.patch_trailer_blake3": unsigned_trailer},
             ("unsigned.nnpatch",))):
        m = edited(**fields)
        case(name, desc, signed(m), step="8" if name != "patch-unsigned" else "9", state_after=accepted(m),
             feed=feed, **refused)

    # the manifest itself (step 3), signed; the model already current, so an updater that let one through
    # has nothing to fetch
    for name, desc, m in (
            ("version-2", "manifest version 2", edited(version=2)),
            ("format-wrong", "format 'nnpatch-manifest'", edited(format="nnpatch-manifest")),
            ("duplicate-key", "the key 'release' twice", good.replace(b'"release": 5,', b'"release": 5,\n  '
                                                                      b'"release": 5,', 1)),
            ("target-name-bad", "target name 'new version' (a space: not ^[A-Za-z0-9][A-Za-z0-9._-]{0,93}$)",
             edited(**{"target.name": "new version"})),
            ("base-name-bad", "base name '.old' (must start with a letter or digit)", edited(**{"base.name": ".old"})),
            ("name-too-long", "target name of 95 characters (at most 94)", edited(**{"target.name": "n" * 95})),
            ("base-url-no-slash", "base_url without its trailing '/'",
             edited(base_url="https://updates.example/model")),
            ("base-url-not-http", "base_url 'ftp://updates.example/model/'",
             edited(base_url="ftp://updates.example/model/")),
            ("patch-name-path", "patch '../old-to-new.nnpatch': a path, not a file name",
             edited(**{"base.patch": "../" + PATCH})),
            ("expires-not-rfc3339", "expires '2099-12-31 23:59:59' (a space for the T, no Z)",
             edited(expires="2099-12-31 23:59:59")),
            ("expires-impossible-date", "expires '2099-02-30T00:00:00Z'", edited(expires="2099-02-30T00:00:00Z")),
            ("release-over-2-53", "release 2^53", edited(release=1 << 53)),
            ("release-float", "release 5.0", good.replace(b'"release": 5,', b'"release": 5.0,', 1)),
            ("release-negative", "release -1", edited(release=-1)),
            ("digest-uppercase", "target blake3 in uppercase hex", edited(**{"target.blake3": target.upper()})),
            ("target-missing", "no target", edited(target=None)),
            ("not-json", "a manifest that is not JSON (cut in half), signed", good[:len(good) // 2])):
        case(name, desc, signed(m), model="new", step="3", **invalid)

    # without a key
    case("unsigned", "a plain manifest, no key, no state: updated, no state written", good, key_file=None,
         step="10")
    case("envelope-without-key", "a signed envelope read without a key: opened unchecked, updated, no state "
         "written", envl, key_file=None, step="2")
    case("unsigned-with-state", "no key, but a state file: the device follows a signed feed", good, key_file=None,
         state_bytes=state(RELEASE - 1), step="state", **refused)
    case("unsigned-expired", f"a plain manifest expired at {PAST}", edited(expires=PAST), key_file=None,
         step="4", **refused)

    # the state file
    for name, desc, data in (
            ("state-not-json", "the state file is not JSON (cut in half)", state(RELEASE - 1)[:40]),
            ("state-empty", "the state file is empty", b""),
            ("state-wrong-format", "format 'nnpatch-state'", state(RELEASE - 1, format="nnpatch-state")),
            ("state-version-2", "state version 2", state(RELEASE - 1, version=2)),
            ("state-release-negative", "release -1", state(-1)),
            ("state-release-missing", "no release", state(RELEASE - 1).replace(b'  "release": 4,\n', b"", 1)),
            ("state-key-id-short", "key_id of 15 hex digits", state(RELEASE - 1, key_id=key_id(the_key)[:15])),
            ("state-bad-time", "accepted '2026-01-01'", state(RELEASE - 1, accepted="2026-01-01")),
            ("state-duplicate-key", "the key 'release' twice", state(RELEASE - 1).replace(
                b'"release": 4,', b'"release": 4,\n  "release": 4,', 1)),
            ("state-not-object", "the state file is a JSON array", b"[]\n")):
        case(name, desc, envl, state_bytes=data, step="state", **invalid)
    case("state-not-json-without-key", "a damaged state file and no key: refused as invalid, not ignored", good,
         key_file=None, state_bytes=b"{", step="state", **invalid)
    return write(directory, cases)


def write(directory: str, cases: list[dict]) -> dict:
    index = {"_comment": COMMENT, "payload_type": PAYLOAD_TYPE, "key": KEY + ".pub.pem",
             "key_id": key_id(key(KEY)), "other_key_id": key_id(key(OTHER)), "cases": []}
    names = set()
    for c in cases:
        if c["name"] in names:
            raise SystemExit(f"two cases named {c['name']}")
        names.add(c["name"])
        folder = os.path.join(directory, "cases", c["name"])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "manifest.json"), "wb") as f:
            f.write(c["manifest"])
        state = None
        if c["state"] is not None:
            state = f"cases/{c['name']}/{STATE}"
            with open(os.path.join(directory, state), "wb") as f:
                f.write(c["state"])
        model_after = f"{c['model_after']}.safetensors"
        with open(os.path.join(directory, model_after), "rb") as f:
            after = blake3.blake3(f.read()).hexdigest()
        index["cases"].append({
            "name": c["name"], "description": c["description"], "step": c["step"], "verdict": c["verdict"],
            "exit": c["exit"], "error": c["error"], "model": f"{c['model']}.safetensors",
            "manifest": f"cases/{c['name']}/manifest.json", "feed_files": c["feed"],
            "key": None if c["key"] is None else c["key"] + ".pub.pem", "state": state,
            "model_after": model_after, "model_after_blake3": after, "state_after": c["state_after"]})
    with open(os.path.join(directory, "manifest-vectors.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return index


OWN = ("cases", "manifest-vectors.json", "old.safetensors", "new.safetensors", PATCH, "unsigned.nnpatch",
       KEY + ".pem", KEY + ".pub.pem", OTHER + ".pem", OTHER + ".pub.pem")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true", help="rewrite spec/vectors/manifest/ (but this script)")
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
