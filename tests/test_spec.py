"""The spec and the code agree: constants, schema, public API."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest

import nnpatch
import crafting
from nnpatch import codecs, dtypes, patchfile

SPEC = os.path.join(os.path.dirname(__file__), os.pardir, "spec")


def spec_text() -> str:
    with open(os.path.join(SPEC, "FORMAT.md"), encoding="utf-8") as f:
        return f.read()


def test_magic_and_version_match_the_spec():
    text = spec_text()
    hexes = re.search(r"`((?:[0-9A-F]{2} ){7}[0-9A-F]{2})`", text).group(1)
    assert bytes.fromhex(hexes) == nnpatch.MAGIC == patchfile.MAGIC
    major, minor = nnpatch.FORMAT_VERSION
    assert f"**Version {major}.{minor} (" in text


def test_limits_match_the_spec():
    text = spec_text()
    assert patchfile.MAX_HEADER_SIZE == 64 * 2**20 and "| `Header_Length` | 64 MiB |" in text
    assert f"| JSON nesting | {patchfile.MAX_JSON_DEPTH} levels |" in text
    assert f"| tensor rank | {patchfile.MAX_RANK} |" in text
    assert patchfile.ALIGNMENT == 64 and patchfile.PREAMBLE_SIZE == 24 and patchfile.TRAILER_SIZE == 32
    assert codecs.CHUNK_ELEMENTS == 2**20 and "floor(2^20 / unit_elements)" in text


def test_every_dtype_stage_and_index_format_is_specified():
    text = spec_text()
    for name in dtypes.ITEMSIZE:
        assert name in text
    for stage in codecs.VALUE_STAGES + codecs.INDEX_FORMATS:
        assert f"`{stage}`" in text


def test_vector_headers_match_the_schema():
    with open(os.path.join(SPEC, "header.schema.json"), encoding="utf-8") as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    with open(os.path.join(SPEC, "vectors", "vectors.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    for vec in manifest["valid"]:
        with open(os.path.join(SPEC, "vectors", vec["patch"]), "rb") as f:
            data = f.read()
        jsonschema.validate(crafting.header_json(data), schema)


def test_public_api():
    assert set(nnpatch.__all__) >= {"diff", "apply", "verify", "hash_file", "Patch", "read_patch",
                                    "NnpatchError", "PatchFormatError", "BaseMismatchError", "IntegrityError"}
    for name in nnpatch.__all__:
        assert hasattr(nnpatch, name), name


def test_import_does_not_pull_torch():
    import subprocess
    import sys

    code = "import sys, nnpatch, nnpatch.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("cls,code", [
    (nnpatch.PatchFormatError, 3), (nnpatch.UnsupportedVersionError, 3), (nnpatch.WeightsError, 3),
    (nnpatch.BaseMismatchError, 4), (nnpatch.IntegrityError, 4), (nnpatch.NnpatchIOError, 5),
])
def test_exit_codes(cls, code):
    assert cls.exit_code == code
