"""Header JSON that is valid syntax but not Unicode text, or not RFC 8259 numbers, is refused
by the patch reader (FORMAT.md section 5), as the native applier's parser refuses it."""

from pathlib import Path

import blake3
import pytest

from crafting import header_json, with_header
from nnpatch.errors import PatchFormatError
from nnpatch.patchfile.reader import parse_patch

VALID = Path(__file__).resolve().parents[1] / "spec" / "vectors" / "valid" / "rows-f32" / "patch.nnpatch"


def _retrail(buf: bytes) -> bytes:
    body = buf[:-32]
    return body + blake3.blake3(body).digest()


def _with_raw_note(raw_value: bytes) -> bytes:
    """The vector's patch with an ``x-note`` whose JSON text is exactly raw_value."""
    placeholder = "P" * (len(raw_value) - 2)
    obj = header_json(VALID.read_bytes())
    obj["x-note"] = placeholder
    buf = with_header(VALID.read_bytes(), obj)
    quoted = b'"' + placeholder.encode() + b'"'
    assert buf.count(quoted) == 1
    return _retrail(buf.replace(quoted, raw_value))


def test_the_placeholder_patch_itself_is_valid():
    assert parse_patch(_with_raw_note(b'"abcdef"'), path="p").extra["x-note"] == "abcdef"


@pytest.mark.parametrize("raw", [b'"\\ud800"', b'"\\udfff"', b'"a\\udc00b"', b'"\\ud800\\u0041"'])
def test_lone_surrogate_escapes_are_refused(raw):
    with pytest.raises(PatchFormatError, match="lone surrogate"):
        parse_patch(_with_raw_note(raw), path="p")


def test_a_surrogate_pair_is_one_code_point_and_accepted():
    assert parse_patch(_with_raw_note(b'"\\ud83d\\ude00"'), path="p").extra["x-note"] == "\U0001F600"


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_standard_numbers_are_refused(raw):
    with pytest.raises(PatchFormatError, match="not allowed"):
        parse_patch(_with_raw_note(raw), path="p")


@pytest.mark.parametrize("raw, message", [
    (b"{}" + b" " * 99, "thing of 101 bytes exceeds the 100 limit"),
    (b'{"a": 1, "a": 2}', "invalid thing JSON: duplicate key 'a'"),
    (b'{"a": NaN}', "invalid thing JSON: NaN is not allowed"),
    (b"\xff", "invalid thing JSON"),
    (b"[1]", "invalid thing: not a JSON object"),
])
def test_load_object_is_one_rule_for_small_documents(raw, message):
    """Size cap, strict JSON, an object: manifests, envelopes, the update state and shard indexes
    all go through _json.load_object."""
    from nnpatch._json import load_object

    with pytest.raises(ValueError) as e:
        load_object(raw, limit=100, what="thing")
    assert str(e.value).startswith(message)
    assert load_object(b'{"a": [1]}', limit=100, what="thing") == {"a": [1]}
