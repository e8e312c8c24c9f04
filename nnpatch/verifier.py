"""Check a patch on its own, and optionally against the base and target it names.

``verify()`` returns a report; ``require_verified()`` raises on the first
failure. A patch that cannot be parsed at all raises in both.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import blake3

from . import codecs
from .applier.decode import check_qrows
from .applier.plan import check_base, check_ops_against_layout, plan_forward, target_layout
from .applier.targets import check_extents, check_onnx_patch, refuse_external_over_base
from .errors import BaseMismatchError, IntegrityError, NnpatchError, NnpatchIOError, PatchFormatError, WeightsError
from .hashing import digests_equal, hash_file, model_digest
from .applier.skeleton import target_skeleton
from .patchfile import Patch, read_patch
from .signing import TrustedKey, authenticator, verify_signature
from .weights.source import open_source, path_digest


@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class VerifyReport:
    patch: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def check_sections(p: Patch) -> None:
    """Decode every section without a base: zstd frames, index order and range, sizes."""
    layout = target_layout(p)
    check_ops_against_layout(p, layout.tensors)
    if p.header.target.format == "onnx":  # spec 5.7: what apply checks before writing, from the patch alone
        check_onnx_patch(p)
    if "extents" in (p.header.base.format, p.header.target.format):
        check_extents(p, layout.tensors)  # the extent tables, as apply checks them
    for f in layout.files:  # files carried whole must have the digest the header gives them
        if f.kind == "blob":
            h = blake3.blake3()
            for chunk in codecs.decoded_chunks(p.section(f.content), f.content.codec, f.size,
                                               codecs.piece_sizes(f.size), where=f"file {f.path!r}"):
                h.update(chunk)
            if not digests_equal(h.hexdigest(), f.blake3):
                raise PatchFormatError(f"file {f.path!r} carried by the patch does not match its digest "
                                       f"(BLAKE3 {h.hexdigest()}, expected {f.blake3})", path=p.path)
    for op in p.ops:
        if op.index is not None:
            bound = op.target.shape[0] if op.kind in ("rows", "qrows") else math.prod(op.target.shape)
            codecs.decode_indices(p.section(op.index), op.index.codec, count=op.count, bound=bound,
                                  size=op.index.size, where=f"{op.name!r}.index")
        if op.kind == "qrows":  # scales finite, codes' padding zero (spec 7.5)
            check_qrows(p, op)
        for key, s in (("values", op.values), ("base_values", op.base_values)):
            if s is not None:
                where = f"{op.name!r}.{key}"
                for _ in codecs.decoded_chunks(p.section(s), s.codec, s.size, codecs.piece_sizes(s.size), where=where):
                    pass


def verify(patch: str | os.PathLike[str] | Patch, *, base: str | os.PathLike[str] | None = None,
           target: str | os.PathLike[str] | None = None,
           key: TrustedKey | str | os.PathLike[str] | None = None) -> VerifyReport:
    """Check the patch's integrity, that ``base`` / ``target`` are the files it
    names, and with ``key`` (an Ed25519 public key, PEM) that it is signed by it.

    With ``key``, the signature is checked right after the trailer, before the header is expanded
    or parsed, and an unsigned or wrongly signed patch raises :class:`IntegrityError` (exit 4), as
    ``apply --key`` does. With ``base``, every rule ``apply`` checks before writing is checked
    (the plan from this base, and an ONNX target's external paths beside it); a patch that breaks
    one raises as apply would (exit 3), a base that is not the patch's fails the ``base`` check.

    ``patch`` is a path, or a :class:`Patch` the caller opened (a stream; with ``key`` the caller
    opens it with :func:`nnpatch.signing.authenticator`), which it also closes."""
    opened = patch if isinstance(patch, Patch) else None
    report = VerifyReport(opened.path if opened is not None else os.fspath(patch))
    key = TrustedKey.of(key) if key is not None else None  # read once, for the header and the check below
    authenticate = authenticator(key) if key is not None else None
    with opened if opened is not None else read_patch(patch, authenticate=authenticate) as p:
        if key is not None:
            kid = verify_signature(p, key)  # already proven for a path; raises for a stream
        check_sections(p)
        report.checks.append(Check("patch", True, f"trailer BLAKE3 {p.trailer_hash}"))
        if key is not None:
            report.checks.append(Check("signature", True, f"signed by key {kid}"))
        h = p.header
        if base is not None:
            report.checks.append(_check_model(os.fspath(base), "base", h.base.blake3, h.base.model_blake3, p))
        if target is not None and h.target.format in ("onnx", "extents"):  # checked by the files written
            report.checks.append(_check_onnx(os.fspath(target), h.target.outputs))
        elif target is not None:
            report.checks.append(_check_model(os.fspath(target), "target", h.target.blake3, h.target.model_blake3,
                                              p if h.target.format == "pytorch" else None))
    return report


def _check_onnx(path: str, outputs) -> Check:
    """An ONNX target: the model file and each external data file beside it, by file digest."""
    directory = os.path.dirname(os.path.abspath(path))
    for i, o in enumerate(outputs):
        where = path if i == 0 else os.path.join(directory, *o.path.split("/"))
        try:
            actual = hash_file(where)
        except NnpatchError as e:
            return Check("target", False, str(e))
        if not digests_equal(actual, o.blake3):
            return Check("target", False, f"{where}: file BLAKE3 {actual} does not match the patch's target "
                                          f"{o.blake3}")
    extra = f" and {len(outputs) - 1} external data file(s)" if len(outputs) > 1 else ""
    return Check("target", True, f"{path}: file BLAKE3 matches{extra}")


def _check_model(path: str, role: str, file_digest: str, model_blake3: str, p: Patch | None) -> Check:
    what = "directory" if os.path.isdir(path) else "file"
    try:
        actual, _ = path_digest(path)
    except NnpatchError as e:
        return Check(role, False, str(e))
    if role == "base" and p is not None:
        try:  # what apply checks before writing: the plan from this base, and where an ONNX target's files go
            with open_source(path) as w:
                plan_forward(w, [p])
                refuse_external_over_base(p, w)
            if p.header.target.format == "extents":
                target_skeleton([p], path)  # a delta: this file proven the base, the frame decoded against it
        except (BaseMismatchError, WeightsError) as e:
            return Check(role, False, str(e))
        except NnpatchIOError as e:
            return Check(role, False, str(e))
    if digests_equal(actual, file_digest):
        return Check(role, True, f"{path}: {what} BLAKE3 matches")
    if role == "target" and not (p is not None and p.header.target.format == "pytorch"):
        return Check(role, False, f"{path}: {what} BLAKE3 {actual} does not match the patch's target {file_digest}")
    # A re-serialized base with the same tensors, in any format, still takes the patch.
    try:
        with open_source(path) as w:
            if p is not None and role == "base":
                check_base(p, w, target_layout(p).tensors)
            digest, _ = model_digest(w)
    except BaseMismatchError as e:
        return Check(role, False, str(e))
    except NnpatchError as e:
        return Check(role, False, str(e))
    if digests_equal(digest.hex(), model_blake3):
        return Check(role, True, f"{path}: same tensors as the patch's {role} (file layout differs)")
    return Check(role, False, f"{path}: tensor contents differ from the patch's {role} (model BLAKE3 "
                              f"{digest.hex()}, expected {model_blake3})")


def require_verified(patch, *, base=None, target=None, key=None) -> VerifyReport:
    report = verify(patch, base=base, target=target, key=key)
    for c in report.failures():
        cls = BaseMismatchError if c.what == "base" else IntegrityError
        raise cls(c.detail, what=c.what)
    return report
