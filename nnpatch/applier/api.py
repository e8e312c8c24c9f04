"""The applier's public API: apply, apply a chain, revert."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from ..errors import IntegrityError, UsageError
from ..patchfile import Patch, read_patch
from ..signing import verify_signature
from ..weights import SafetensorsFile
from ..weights.source import open_source
from .engine import build_file
from .journal import journal_path
from .plan import plan_forward, plan_revert
from .policy import ApplyResult, ProgressFn, _check_verify
from .targets import _build_onnx, _build_torch


# --- public API -------------------------------------------------------------------------------

def _open_patch(patch) -> Patch:
    if isinstance(patch, Patch):
        return patch
    return read_patch(patch)


def refuse_unfinished(model: str | os.PathLike[str]) -> None:
    """An input with an undo journal beside it is mid-way through an in-place update: refuse it.

    (An applier never writes its input; ``nnpatch recover`` or ``nnpatch apply --in-place`` rolls it back.)
    """
    if os.path.exists(journal_path(model)):
        raise IntegrityError(f"{os.fspath(model)}: an in-place update of this model was interrupted (undo journal "
                             f"{journal_path(model)}); run `nnpatch recover {os.fspath(model)}` first")


def apply(base: str | os.PathLike[str], patch, output: str | os.PathLike[str], *,
          progress: ProgressFn | None = None, verify: str = "default",
          key: str | os.PathLike[str] | None = None) -> ApplyResult:
    """Rebuild the target of ``patch`` from ``base`` into ``output`` (atomically).

    ``patch`` is a path or an open :class:`~nnpatch.patchfile.Patch`;
    ``verify`` is ``"default"``, ``"full"`` or ``"touched"`` (module docstring);
    ``key`` (an Ed25519 public key, PEM) refuses a patch it did not sign.
    """
    return apply_chain(base, [patch], output, progress=progress, verify=verify, key=key)


def apply_chain(base: str | os.PathLike[str], patches: Sequence, output: str | os.PathLike[str], *,
                progress: ProgressFn | None = None, verify: str = "default",
                key: str | os.PathLike[str] | None = None) -> ApplyResult:
    """Apply P1, P2, ... to ``base`` in one pass, writing only the final model.

    Link k+1 must have been made from the target of link k: the header
    digests are compared before anything is read, and each touched tensor is
    checked against the digest its first op expects. With ``key``, every link
    must be signed by it.
    """
    _check_verify(verify)
    if not patches:
        raise UsageError("apply needs at least one patch")
    output = os.fspath(output)
    refuse_unfinished(base)
    with contextlib.ExitStack() as stack:
        opened = []
        for p in patches:
            q = _open_patch(p)
            if q is not p:
                stack.callback(q.close)
            opened.append(q)
        if key is not None:
            for q in opened:
                verify_signature(q, os.fspath(key))
        b = stack.enter_context(open_source(base))
        plan = plan_forward(b, opened)
        if opened[-1].header.target.format == "pytorch":
            return _build_torch(plan, b, output, verify, progress or (lambda n: None),
                                opened[-1].header.target.model_blake3)
        if opened[-1].header.target.format == "onnx":
            return _build_onnx(plan, b, output, verify, progress or (lambda n: None), opened[-1])
        return build_file(plan, b, output, verify, progress or (lambda n: None))


def revert(new: str | os.PathLike[str], patch, output: str | os.PathLike[str], *,
           progress: ProgressFn | None = None) -> ApplyResult:
    """Rebuild the base of a reversible ``patch`` from its target ``new`` into ``output``.

    The result is always checked against the base's file digest in the patch.
    """
    output = os.fspath(output)
    refuse_unfinished(new)
    with contextlib.ExitStack() as stack:
        p = _open_patch(patch)
        if p is not patch:
            stack.callback(p.close)
        n = stack.enter_context(SafetensorsFile(new))
        plan = plan_revert(n, p)
        return build_file(plan, n, output, "full", progress or (lambda k: None), label="not the patch's target")
