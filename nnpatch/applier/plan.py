"""The plan of an apply: what the target is made of (its files and every
tensor's place), whether the base fits it, and where each output tensor's
bytes come from (an input tensor, a patch's values, and the ops on top)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import codecs
from ..errors import BaseMismatchError, PatchFormatError, UsageError, WeightsError
from ..hashing import digests_equal
from ..patchfile import Op, Patch, Section
from .._json import WHOLE
from ..weights import SafetensorsFile, TensorInfo, parse_safetensors_header
from ..weights.sharded import safe_relative_path


_MODE_OF_STAGE = {"xor": "xor", "add": "add", "zadd": "zadd", None: "replace"}
#: The mode that undoes each delta mode (``nnpatch revert``).
INVERSE_MODE = {"xor": "xor", "add": "sub", "zadd": "zsub"}


# --- layout and base checks ------------------------------------------------------------

def decode_layout(patch: Patch, s: Section, size: int, what: str) -> tuple[bytes, dict[str, TensorInfo]]:
    (array,) = codecs.decoded_chunks(patch.section(s), s.codec, s.size, [s.size], where=f"{what}.layout")
    # a long layout (up to 100 MB) is used where it was decoded; joined into bytes it would be held twice
    raw = memoryview(array) if len(array) > WHOLE else array.tobytes()
    try:
        _, tensors = parse_safetensors_header(raw, file_size=size, path=f"{patch.path}: {what} layout")
    except WeightsError as e:
        raise PatchFormatError(str(e)) from e
    if len(raw) != (next(iter(tensors.values())).begin if tensors else size):
        raise PatchFormatError(f"{what} layout carries bytes beyond the safetensors header", path=patch.path)
    return raw, tensors


@dataclass
class OutFile:
    """One file of the output: a safetensors file built from tensors (its
    header ``raw_layout``), a blob decoded from ``content`` of ``patch``, or a
    copy of the input file ``source`` (an absolute path, or None when the
    input is not a directory). ``path`` is relative to the output directory
    ("" for a single-file target)."""

    path: str
    kind: str
    size: int
    blake3: str
    raw_layout: bytes = b""
    patch: Patch | None = None
    content: Section | None = None
    source: str | None = None


@dataclass
class TargetLayout:
    """What a patch says the target is made of: its files and every tensor's place."""

    files: list[OutFile]
    tensors: dict[str, TensorInfo]  # name -> offsets in its file
    file_of: dict[str, int]  # name -> index in files


def target_layout(patch: Patch) -> TargetLayout:
    """The target's file(s) as carried by the patch, decoded and validated.

    A single-file target is one safetensors header; a directory target
    (format 1.1) has a header per shard, and tensor names are unique across
    shards.
    """
    t = patch.header.target
    if not t.is_directory:
        raw, tensors = decode_layout(patch, t.layout, t.size, "target")
        return TargetLayout([OutFile("", "safetensors", t.size, t.blake3, raw_layout=raw)], tensors,
                            dict.fromkeys(tensors, 0))
    files: list[OutFile] = []
    tensors: dict[str, TensorInfo] = {}
    file_of: dict[str, int] = {}
    for i, f in enumerate(t.files):
        out = OutFile(f.path, f.kind, f.size, f.blake3, patch=patch, content=f.content, source=f.source)
        if f.kind == "safetensors":
            out.raw_layout, shard = decode_layout(patch, f.layout, f.size, f"target file {f.path!r}")
            for name, info in shard.items():
                if name in tensors:
                    raise PatchFormatError(f"tensor {name!r} is in both {t.files[file_of[name]].path!r} and "
                                           f"{f.path!r}", path=patch.path)
                tensors[name] = info
                file_of[name] = i
        files.append(out)
    return TargetLayout(files, tensors, file_of)


def check_ops_against_layout(patch: Patch, layout: dict[str, TensorInfo]) -> None:
    ops = {op.name: op for op in patch.ops}
    for name, info in layout.items():
        op = ops.get(name)
        if op is None:
            continue
        if op.target is None:
            raise PatchFormatError(f"tensor {name!r} is removed by the patch but present in the target layout",
                                   path=patch.path)
        if op.target.dtype != info.dtype or op.target.shape != info.shape:
            raise PatchFormatError(f"tensor {name!r}: op and target layout disagree on dtype or shape",
                                   path=patch.path)
    for name, op in ops.items():
        if op.target is not None and name not in layout:
            raise PatchFormatError(f"tensor {name!r} is written by an op but missing from the target layout",
                                   path=patch.path)
    if len(layout) != patch.header.target.tensors:
        raise PatchFormatError(f"target layout has {len(layout)} tensors, the header says "
                               f"{patch.header.target.tensors}", path=patch.path)


def check_base(patch: Patch, base: SafetensorsFile, layout: dict[str, TensorInfo]) -> None:
    """Refuse a base whose tensor set, dtypes or shapes differ from the patch's base."""
    ops = {op.name: op for op in patch.ops}
    hb = patch.header.base
    for name, op in ops.items():
        if op.base is not None:
            info = base.tensors.get(name)
            if info is None:
                raise BaseMismatchError(f"{base.path}: wrong base: tensor {name!r} is missing")
            if info.dtype != op.base.dtype or info.shape != op.base.shape:
                raise BaseMismatchError(
                    f"{base.path}: wrong base: tensor {name!r} is {info.dtype}{list(info.shape)}, "
                    f"the patch expects {op.base.dtype}{list(op.base.shape)}")
        elif name in base.tensors:
            raise BaseMismatchError(f"{base.path}: wrong base: tensor {name!r} already exists, the patch adds it")
    for name, info in layout.items():
        if name not in ops:
            src = base.tensors.get(name)
            if src is None:
                raise BaseMismatchError(f"{base.path}: wrong base: tensor {name!r} is missing")
            if src.dtype != info.dtype or src.shape != info.shape:
                raise BaseMismatchError(
                    f"{base.path}: wrong base: tensor {name!r} is {src.dtype}{list(src.shape)}, "
                    f"the patch expects {info.dtype}{list(info.shape)}")
    check_ops_against_layout(patch, layout)
    if len(base.tensors) != hb.tensors:
        raise BaseMismatchError(
            f"{base.path}: wrong base: {len(base.tensors)} tensors, the patch's base has {hb.tensors}")


# --- the plan: what each output tensor is made of ---------------------------------------

@dataclass
class Step:
    """One op applied on top of the current bytes of a tensor."""

    patch: Patch
    op: Op
    section: Section
    mode: str  # kernel mode; "replace" for absolute fills


@dataclass
class Item:
    info: TensorInfo  # where it goes in the output (offsets in its file)
    src: TensorInfo | None = None  # input tensor whose bytes it starts from
    fill: Step | None = None  # or: values decoded from a patch (absolute)
    steps: list[Step] = field(default_factory=list)  # relative ops, in order
    expect: str | None = None  # digest of the final bytes (touched tensors)
    file: int = 0  # index of its output file in Plan.files

    @property
    def touched(self) -> bool:
        return self.fill is not None or bool(self.steps)


@dataclass
class Plan:
    files: list[OutFile]
    items: list[Item]
    #: input tensor name -> digest it must have (None: hashed only for the model digest)
    input_expect: dict[str, str | None]
    input_model: str | None  # expected model digest of the input (None: not checked)
    output_model: str | None
    output_file: str  # the output's file digest (a directory's: its directory digest), per the patch
    always_full: bool = False
    ops: int = 0
    links: int = 1
    directory: bool = False  # the output is a model directory (Plan.files are its files)

    @property
    def raw_layout(self) -> bytes:
        """The header of a single-file output."""
        return self.files[0].raw_layout

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def delta_mode(op: Op, section: Section) -> str:
    if op.kind == "qrows":  # its own arithmetic on the old rows (decode._run_qrows); never undone
        return "qrows"
    return _MODE_OF_STAGE[codecs.delta_stage(section.codec)]


def plan_forward(base: SafetensorsFile, patches: Sequence[Patch]) -> Plan:
    """The plan for a chain base -> P1 -> ... -> Pn (one link is a plain apply)."""
    first = patches[0]
    layouts: list[TargetLayout] = []
    for k, p in enumerate(patches):
        tl = target_layout(p)
        layouts.append(tl)
        if k == 0:
            check_base(p, base, tl.tensors)
        else:
            prev = patches[k - 1]
            check_ops_against_layout(p, tl.tensors)
            if not digests_equal(p.header.base.model_blake3, prev.header.target.model_blake3):
                raise BaseMismatchError(
                    f"{p.path}: broken chain: link {k + 1} was made for another base than the target of link {k} "
                    f"({prev.path}) (model BLAKE3 {p.header.base.model_blake3}, expected "
                    f"{prev.header.target.model_blake3})", what="chain",
                    expected=prev.header.target.model_blake3, actual=p.header.base.model_blake3)
    # per tensor: the digest it has after each link, where a header says so
    known: dict[str, str | None] = {}  # name -> digest per the previous link's op (None: as in the base)
    present = set(base.tensors)
    ops_by_link = [{op.name: op for op in p.ops} for p in patches]
    for k, (p, ops) in enumerate(zip(patches, ops_by_link)):
        for name, op in ops.items():
            if op.base is not None:
                if name not in present:
                    raise BaseMismatchError(f"{p.path}: broken chain: tensor {name!r} does not exist before link "
                                            f"{k + 1}")
                if known.get(name) is not None and not digests_equal(known[name], op.base.blake3):
                    raise BaseMismatchError(f"{p.path}: broken chain: tensor {name!r} before link {k + 1} is not "
                                            f"the one its op expects", what=name, expected=op.base.blake3,
                                            actual=known[name])
            elif name in present:
                raise BaseMismatchError(f"{p.path}: broken chain: link {k + 1} adds {name!r}, which exists")
            if op.target is None:
                present.discard(name)
                known.pop(name, None)
            else:
                present.add(name)
                known[name] = op.target.blake3
        if k:
            if present != set(layouts[k].tensors):
                raise BaseMismatchError(f"{p.path}: broken chain: tensor set after link {k + 1} does not match its "
                                        f"target layout")
    final = layouts[-1]
    items: list[Item] = []
    input_expect: dict[str, str | None] = {name: None for name in base.tensors}
    for name, info in final.tensors.items():
        item = Item(info, file=final.file_of[name])
        start = 0
        for k in range(len(patches) - 1, -1, -1):
            op = ops_by_link[k].get(name)
            if op is not None and (op.kind == "add" or (op.kind == "whole" and codecs.delta_stage(op.values.codec)
                                                        is None)):
                item.fill = Step(patches[k], op, op.values, "replace")
                start = k + 1
                break
        else:
            item.src = base.tensors[name]
        for k in range(start, len(patches)):
            op = ops_by_link[k].get(name)
            if op is not None:
                item.steps.append(Step(patches[k], op, op.values, delta_mode(op, op.values)))
        last = next((ops_by_link[k][name] for k in range(len(patches) - 1, -1, -1) if name in ops_by_link[k]),
                    None)
        if last is not None:
            item.expect = last.target.blake3
        items.append(item)
    # touched input tensors must have the digest the first op on them expects
    for k, ops in enumerate(ops_by_link):
        for name, op in ops.items():
            if op.base is not None and name in input_expect and input_expect[name] is None and all(
                    name not in ops_by_link[j] for j in range(k)):
                input_expect[name] = op.base.blake3
    last = patches[-1]
    return Plan(_resolve_copies(base, patches, layouts), items, input_expect, first.header.base.model_blake3,
                last.header.target.model_blake3, last.header.target.blake3,
                ops=sum(len(p.ops) for p in patches), links=len(patches),
                directory=last.header.target.is_directory)


def _resolve_copies(base, patches: Sequence[Patch], layouts: list[TargetLayout]) -> list[OutFile]:
    """The final link's files, each ``copy`` traced back through the chain to
    a blob of an earlier link or to a file of the base directory."""
    out = []
    for f in layouts[-1].files:
        if f.kind != "copy":
            out.append(f)
            continue
        f = OutFile(f.path, f.kind, f.size, f.blake3, source=f.source)
        src, k = f.source, len(patches) - 1
        while True:
            k -= 1
            if k < 0:
                if not os.path.isdir(base.path):
                    raise BaseMismatchError(f"{base.path}: wrong base: the patch copies {src!r} from its base "
                                            "directory, and this base is not a directory")
                try:
                    full = safe_relative_path(base.path, src, what="copied file")
                except WeightsError as e:
                    raise PatchFormatError(str(e), path=patches[0].path) from e
                if not os.path.isfile(full):
                    raise BaseMismatchError(f"{base.path}: wrong base: file {src!r} is missing")
                f.source = full
                break
            link = patches[k]
            entry = next((e for e in layouts[k].files if e.path == src), None) \
                if link.header.target.is_directory else None
            if entry is None or entry.blake3 != f.blake3:
                raise BaseMismatchError(f"{patches[k + 1].path}: broken chain: link {k + 2} copies {src!r} from its "
                                        f"base, which link {k + 1} ({link.path}) does not make")
            if entry.kind == "blob":
                f.kind, f.patch, f.content, f.source = "blob", entry.patch, entry.content, None
                break
            if entry.kind == "safetensors":
                raise UsageError(f"{patches[k + 1].path}: link {k + 2} copies the weights file {src!r} made by link "
                                 f"{k + 1}; apply these links one at a time")
            src = entry.source
        out.append(f)
    return out


def plan_revert(new: SafetensorsFile, patch: Patch) -> Plan:
    """The plan that takes the patch's target back to its base."""
    h = patch.header
    quantized = next((op for op in h.ops if op.kind == "qrows"), None)
    if quantized is not None:
        raise PatchFormatError(f"patch is not reversible: op {quantized.name!r} is qrows (quantized deltas; their "
                               "rounding loses the old values)", path=patch.path)
    if not h.reversible:
        raise PatchFormatError("patch is not reversible (it lacks the base layout or old bytes, or orders values by "
                               "the old ones); "
                               "make it with `nnpatch diff --reversible`", path=patch.path)
    if h.target.is_directory:
        raise PatchFormatError("patch is not reversible: its target is a model directory", path=patch.path)
    raw_layout, layout = decode_layout(patch, h.base.layout, h.base.size, "base")
    _, target = decode_layout(patch, h.target.layout, h.target.size, "target")
    check_ops_against_layout(patch, target)
    ops = {op.name: op for op in patch.ops}
    # the input must be the patch's target: same tensor set, dtypes, shapes
    for name, info in target.items():
        got = new.tensors.get(name)
        if got is None or got.dtype != info.dtype or got.shape != info.shape:
            found = "missing" if got is None else f"{got.dtype}{list(got.shape)}"
            raise BaseMismatchError(f"{new.path}: not the patch's target: tensor {name!r} is {found}, the patch "
                                    f"made {info.dtype}{list(info.shape)}")
    if len(new.tensors) != len(target):
        extra = sorted(set(new.tensors) - set(target))[:1]
        raise BaseMismatchError(f"{new.path}: not the patch's target: unexpected tensor {extra[0]!r}")
    if len(layout) != h.base.tensors:
        raise PatchFormatError(f"base layout has {len(layout)} tensors, the header says {h.base.tensors}",
                               path=patch.path)
    items = []
    for name, info in layout.items():
        op = ops.get(name)
        item = Item(info)
        if op is None:
            src = target.get(name)
            if src is None or src.dtype != info.dtype or src.shape != info.shape:
                raise PatchFormatError(f"tensor {name!r}: base layout and target layout disagree, with no op",
                                       path=patch.path)
            item.src = new.tensors[name]
        elif op.base is None or op.base.dtype != info.dtype or op.base.shape != info.shape:
            raise PatchFormatError(f"tensor {name!r}: op and base layout disagree on dtype or shape",
                                   path=patch.path)
        elif op.base_values is not None:
            item.fill = Step(patch, op, op.base_values, "replace")
            item.expect = op.base.blake3
        else:
            mode = delta_mode(op, op.values)
            if mode == "replace":
                raise PatchFormatError(
                    f"patch cannot be reverted: op {op.name!r} ({op.kind}) stores the new values without a delta "
                    "stage and without the old ones", path=patch.path)
            item.src = new.tensors[name]
            item.steps.append(Step(patch, op, op.values, INVERSE_MODE[mode]))
            item.expect = op.base.blake3
        items.append(item)
    for name, op in ops.items():
        if op.base is not None and name not in layout:
            raise PatchFormatError(f"tensor {name!r} is in the patch's base but missing from its base layout",
                                   path=patch.path)
    input_expect = {name: (ops[name].target.blake3 if name in ops else None) for name in new.tensors}
    files = [OutFile("", "safetensors", h.base.size, h.base.blake3, raw_layout=raw_layout)]
    return Plan(files, items, input_expect, h.target.model_blake3, h.base.model_blake3,
                h.base.blake3, always_full=True, ops=len(patch.ops))
