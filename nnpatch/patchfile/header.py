"""The nnpatch file format, version 1: constants and the header's types (spec/FORMAT.md is normative).

    Magic (8) | Version_Major (u16) | Version_Minor (u16) | Flags (u32)
    | Header_Length (u64) | Header (UTF-8 JSON, space-padded) | Sections
    (each 64-aligned, zero-padded; packed end to end under the ``packed-sections``
    feature, 1.5) | Trailer_Hash (32, BLAKE3 of all before)
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from .. import codecs, dtypes


MAGIC = b"\x89NNP\r\n\x1a\n"
#: The newest version this module reads and writes. A writer stamps the
#: lowest version whose features the patch uses (1.0; 1.1 for a model
#: directory or ONNX target; 1.2 where a section uses ``esort``; 1.3 where an
#: op is ``qrows``; 1.4 where a model is ``extents``; 1.5 where sections are packed or an
#: extents target's skeleton is a ``zstd-base`` delta), so older readers
#: take every patch they can apply.
FORMAT_VERSION = (1, 5)
#: The version that added directory and ONNX targets.
DIRECTORY_TARGET_VERSION = (1, 1)
#: The version that added the ``esort`` value stage.
ESORT_VERSION = (1, 2)
#: The version that added the ``qrows`` op (exact quantized deltas).
QROWS_VERSION = (1, 3)
#: The version that added the ``extents`` model format (GGUF and other device files).
EXTENTS_VERSION = (1, 4)
#: The version that added packed sections (the ``packed-sections`` feature).
PACKED_VERSION = (1, 5)
#: The feature of a patch whose sections follow each other with no padding (spec section 6): a
#: small patch's dozens of few-byte sections each cost up to 63 bytes of zeros otherwise.
PACKED_SECTIONS = "packed-sections"
PREAMBLE = struct.Struct("<8sHHIQ")
PREAMBLE_SIZE = PREAMBLE.size  # 24
ALIGNMENT = 64
TRAILER_SIZE = 32
#: Flags bit 0: a signature block follows the trailer (spec section 4).
FLAG_SIGNED = 0x00000001
#: Flags bit 1: the header is one zstd frame of the JSON, zero-padded.
FLAG_HEADER_ZSTD = 0x00000002
#: Flags bits 2-15 are reserved: a reader MUST reject a file that sets one.
RESERVED_FLAGS = 0x0000FFFC
#: Public key (32) and Ed25519 signature (64) after the trailer of a signed patch.
SIGNATURE_BLOCK_SIZE = 96

MAX_HEADER_SIZE = 64 << 20
MAX_RANK = 64
MAX_NAME_BYTES = 1 << 16
MAX_JSON_DEPTH = 16
#: A zstd header may expand to at most this many times its frame's length
#: (plus HEADER_EXPANSION_SLACK): a real header of digests and names
#: compresses 2-5x, and a 10 KB frame must not become 64 MiB of JSON.
MAX_HEADER_EXPANSION = 64
HEADER_EXPANSION_SLACK = 1 << 16
#: Most JSON values (counted as opening brackets and commas outside strings)
#: a header may hold: about 40 per op, so 100,000 ops fit; parsing stays
#: within a few hundred MB whatever the values are.
MAX_JSON_VALUES = 1 << 22
#: Bytes of op names and of the paths of files and outputs in one header, together: a reader keeps them
#: all (Python at up to 4 bytes a character), so this bounds what keeping them costs. DeepSeek-V3's
#: ~91,000 names take about 5 MB.
MAX_NAMES_BYTES = 1 << 24
#: Most ops a patch may have (DeepSeek-V3 has about 91,000 tensors).
MAX_OPS = 1 << 18
#: A zstd frame cannot expand beyond this ratio (a 4-byte RLE block -> 128 KiB).
MAX_ZSTD_EXPANSION = 32768

KNOWN_FEATURES: frozenset[str] = frozenset({PACKED_SECTIONS})
OPS = ("rows", "elements", "whole", "add", "remove", "qrows")
#: Formats a base may have.
MODEL_FORMATS = ("safetensors", "safetensors-dir", "pytorch", "onnx", "extents")
#: Formats a target may have (spec section 5.2; "safetensors-dir" since 1.1).
TARGET_FORMATS = ("safetensors", "pytorch", "safetensors-dir", "onnx", "extents")
#: Kinds of file in a directory target (spec section 5.6).
FILE_KINDS = ("safetensors", "blob", "copy")
#: Most files a directory target may have.
MAX_FILES = 1 << 16
MAX_PATH_BYTES = 4096
#: NAME_MAX of the common file systems: a longer component fails there, so a reader refuses it up front.
MAX_PATH_COMPONENT_BYTES = 255
#: Directories a path may go through: model repositories nest a few levels; a deeper tree only costs
#: directory operations per level (and exceeds PATH_MAX once placed under the output's folder).
MAX_PATH_DEPTH = 64


def align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def place(cursor: int, packed: bool) -> int:
    """Where the next section (or the trailer) starts after ``cursor`` (spec section 6)."""
    return cursor if packed else align(cursor)


@dataclass(slots=True)  # a header holds up to 262,144 ops: no __dict__ each
class Section:
    offset: int  # absolute in the file (relative to the spool while writing)
    length: int  # stored bytes
    size: int  # bytes after undoing the zstd stage
    codec: list[str]

    def to_json(self, base: int = 0) -> dict:
        return {"offset": self.offset + base, "length": self.length, "size": self.size, "codec": list(self.codec)}


@dataclass(slots=True)  # a header holds up to 262,144 ops: no __dict__ each
class TensorRef:
    dtype: str
    shape: tuple[int, ...]
    blake3: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.ITEMSIZE[self.dtype]

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "blake3": self.blake3}


@dataclass(slots=True)  # a header holds up to 262,144 ops: no __dict__ each
class Op:
    name: str
    kind: str
    base: TensorRef | None = None
    target: TensorRef | None = None
    count: int | None = None
    index: Section | None = None
    values: Section | None = None
    #: the old bytes, in reversible patches, where the op cannot be undone
    #: without them ("remove", and "whole" without a delta stage)
    base_values: Section | None = None
    #: "qrows" (1.3): the width of a code (8 or 4) and the binary32 scales, one per row or one
    bits: int | None = None
    scales: Section | None = None

    def sections(self) -> list[Section]:
        """Its sections in file order: index, scales, values (codes for "qrows"), base_values."""
        return [s for s in (self.index, self.scales, self.values, self.base_values) if s is not None]

    @property
    def needs_base_values(self) -> bool:
        """Whether undoing this op needs the old bytes stored in the patch."""
        if self.kind == "remove":
            return True
        return self.kind == "whole" and codecs.delta_stage(self.values.codec) is None

    def to_json(self, base: int = 0) -> dict:
        out: dict[str, Any] = {"name": self.name, "op": self.kind}
        if self.base is not None:
            out["base"] = self.base.to_json()
        if self.target is not None:
            out["target"] = self.target.to_json()
        if self.count is not None:
            out["count"] = self.count
        if self.bits is not None:
            out["bits"] = self.bits
        if self.scales is not None:
            out["scales"] = self.scales.to_json(base)
        if self.index is not None:
            out["index"] = self.index.to_json(base)
        if self.values is not None:
            out["values"] = self.values.to_json(base)
        if self.base_values is not None:
            out["base_values"] = self.base_values.to_json(base)
        return out


@dataclass(slots=True)
class TargetFile:
    """One file of a directory target (spec section 5.6).

    ``kind`` says where its bytes come from: ``safetensors`` (a weights
    shard: its header is ``layout``, its tensors come from the base and the
    ops), ``blob`` (carried whole in ``content``) or ``copy`` (the base
    directory's file ``source``, unchanged).
    """

    path: str
    kind: str
    size: int
    blake3: str
    layout: Section | None = None
    content: Section | None = None
    source: str | None = None

    def sections(self) -> list[Section]:
        return [s for s in (self.layout, self.content) if s is not None]

    def to_json(self, base: int = 0) -> dict:
        out: dict[str, Any] = {"path": self.path, "kind": self.kind, "size": self.size, "blake3": self.blake3}
        if self.layout is not None:
            out["layout"] = self.layout.to_json(base)
        if self.content is not None:
            out["content"] = self.content.to_json(base)
        if self.source is not None:
            out["from"] = self.source
        return out


@dataclass(slots=True)
class OutputFile:
    """A file an ONNX target writes: ``path`` is the model file's name (written
    at the output path) for the first, an external data location relative to
    the model file's directory for the others."""

    path: str
    size: int
    blake3: str

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "blake3": self.blake3}


@dataclass
class ModelRef:
    format: str
    size: int
    blake3: str
    model_blake3: str
    tensors: int
    layout: Section | None = None
    #: the files of a directory target ("safetensors-dir"), sorted by path
    files: list[TargetFile] | None = None
    #: an ONNX target: the model without its initializers' payloads, and the files it writes
    skeleton: Section | None = None
    outputs: list[OutputFile] | None = None
    #: an "extents" model (1.4, spec 5.8): where each tensor lies in the file; a target's skeleton is the rest
    extents: Section | None = None

    @property
    def is_directory(self) -> bool:
        return self.files is not None

    @property
    def file_blake3(self) -> str:
        """The digest of the file a target writes: the model file an ONNX or extents target writes
        (``outputs[0]``), else ``blake3`` (for those two, that of the safetensors rendering)."""
        return self.outputs[0].blake3 if self.outputs else self.blake3

    def sections(self) -> list[Section]:
        out = [s for s in (self.extents, self.layout, self.skeleton) if s is not None]
        for f in self.files or ():
            out.extend(f.sections())
        return out

    def to_json(self, base: int = 0) -> dict:
        out = {"format": self.format, "size": self.size, "blake3": self.blake3,
               "model_blake3": self.model_blake3, "tensors": self.tensors}
        if self.layout is not None:
            out["layout"] = self.layout.to_json(base)
        if self.files is not None:
            out["files"] = [f.to_json(base) for f in self.files]
        if self.skeleton is not None:
            out["skeleton"] = self.skeleton.to_json(base)
        if self.outputs is not None:
            out["outputs"] = [f.to_json() for f in self.outputs]
        if self.extents is not None:
            out["extents"] = self.extents.to_json(base)
        return out


@dataclass
class PatchHeader:
    base: ModelRef
    target: ModelRef
    ops: list[Op]
    created_by: str = ""
    required_features: list[str] = field(default_factory=list)
    version: tuple[int, int] | None = None  # None: header.min_version when written
    flags: int = 0
    extra: dict = field(default_factory=dict)  # "x-" keys, kept verbatim

    @property
    def reversible(self) -> bool:
        """The patch also takes the target back to the base (``nnpatch revert``)."""
        return self.base.layout is not None and self.target.layout is not None and self.target.format == \
            "safetensors" and all(
            op.base_values is not None if op.needs_base_values
            else op.kind != "qrows"  # its arithmetic rounds: the old values cannot be recovered
            and (op.kind not in ("rows", "elements") or codecs.delta_stage(op.values.codec) is not None)
            and (op.values is None or "esort" not in op.values.codec)  # its order comes from the old values
            for op in self.ops)

    @property
    def packed(self) -> bool:
        """Sections follow each other with no padding (format 1.5)."""
        return PACKED_SECTIONS in self.required_features

    @property
    def min_version(self) -> tuple[int, int]:
        """The lowest format version that has every feature this header uses."""
        if self.packed or (self.target.skeleton is not None and self.target.skeleton.codec == ["zstd-base"]):
            return PACKED_VERSION  # 1.5: packed sections, or a skeleton delta (spec 5.8)
        if "extents" in (self.base.format, self.target.format):
            return EXTENTS_VERSION
        if any(op.kind == "qrows" for op in self.ops):
            return QROWS_VERSION
        if any(op.values is not None and "esort" in op.values.codec for op in self.ops):
            return ESORT_VERSION
        return DIRECTORY_TARGET_VERSION if self.target.format in ("safetensors-dir", "onnx") else (1, 0)

    def sections(self) -> list[Section]:
        out = self.base.sections() + self.target.sections()
        for op in self.ops:
            out.extend(op.sections())
        return out

    def to_json(self, base: int = 0) -> dict:
        out = {
            "created_by": self.created_by,
            "required_features": list(self.required_features),
            "base": self.base.to_json(base),
            "target": self.target.to_json(base),
            "ops": [op.to_json(base) for op in self.ops],
        }
        out.update(self.extra)
        return out


def header_text(obj: dict) -> bytes:
    """Canonical JSON: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode_header(obj: dict) -> bytes:
    """The canonical JSON padded with spaces to the alignment (the plain form)."""
    text = header_text(obj)
    return text + b" " * (align(PREAMBLE_SIZE + len(text)) - PREAMBLE_SIZE - len(text))


def delta_or_planes(codec: list[str]) -> bool:
    return any(s in codecs.DELTA_STAGES or s == "planes" for s in codec)


__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "DIRECTORY_TARGET_VERSION",
    "ESORT_VERSION",
    "QROWS_VERSION",
    "EXTENTS_VERSION",
    "PREAMBLE",
    "PREAMBLE_SIZE",
    "ALIGNMENT",
    "PACKED_SECTIONS",
    "PACKED_VERSION",
    "TRAILER_SIZE",
    "FLAG_SIGNED",
    "FLAG_HEADER_ZSTD",
    "RESERVED_FLAGS",
    "SIGNATURE_BLOCK_SIZE",
    "MAX_HEADER_SIZE",
    "MAX_RANK",
    "MAX_NAME_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_HEADER_EXPANSION",
    "HEADER_EXPANSION_SLACK",
    "MAX_JSON_VALUES",
    "MAX_NAMES_BYTES",
    "MAX_OPS",
    "MAX_ZSTD_EXPANSION",
    "KNOWN_FEATURES",
    "OPS",
    "MODEL_FORMATS",
    "TARGET_FORMATS",
    "FILE_KINDS",
    "MAX_FILES",
    "MAX_PATH_BYTES",
    "MAX_PATH_COMPONENT_BYTES",
    "MAX_PATH_DEPTH",
    "align",
    "place",
    "Section",
    "TensorRef",
    "Op",
    "TargetFile",
    "OutputFile",
    "ModelRef",
    "PatchHeader",
    "header_text",
    "encode_header",
    "delta_or_planes",
]
