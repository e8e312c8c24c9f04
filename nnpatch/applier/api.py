"""The applier's public API: apply (a patch or a chain), revert, apply in place, recover.

Each call parses its verification policy once, opens the patches, checks
their signatures when a key is given (before anything else in them is
used), plans, and hands the target to the one dispatcher by target kind
(:func:`nnpatch.applier.targets.build`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from ..errors import BaseMismatchError, IntegrityError, NnpatchError, UsageError
from ..hashing import digest_bytes, digests_equal, model_digest, name_key
from ..patchfile import Patch, read_patch
from ..signing import TrustedKey, authenticator, verify_signature
from ..weights import SafetensorsFile
from ..weights.source import open_source, path_digest
from . import inplace, targets
from .engine import build_file
from .inplace import HookFn
from .journal import journal_path
from .plan import plan_forward, plan_revert
from .policy import ApplyResult, ProgressFn, Verify

PathLike = str | os.PathLike[str]
#: a public key: a TrustedKey, or the PEM file it is in
KeyLike = TrustedKey | PathLike


def _no_progress(n: int) -> None:
    pass


def _open_patches(stack: contextlib.ExitStack, patches: Sequence, key: KeyLike | None) -> list[Patch]:
    """Open every patch (paths are closed with ``stack``); with ``key``, each must be signed by it."""
    key = TrustedKey.of(key) if key is not None else None  # read once for every link
    authenticate = authenticator(key) if key is not None else None
    opened = []
    for p in patches:
        if isinstance(p, Patch):  # opened by the caller (a stream): checked now
            if key is not None:
                verify_signature(p, key)
            opened.append(p)
        else:  # checked before its header is parsed
            opened.append(stack.enter_context(read_patch(p, authenticate=authenticate)))
    return opened


def refuse_unfinished(model: PathLike) -> None:
    """An input with an undo journal beside it is mid-way through an in-place update: refuse it.

    (An applier never writes its input; ``nnpatch recover`` or ``nnpatch apply --in-place`` rolls it back.)
    A journal that was never committed is only a leftover, and is removed.
    """
    inplace.discard_uncommitted(model)
    if os.path.exists(journal_path(model)):
        raise IntegrityError(f"{os.fspath(model)}: an in-place update of this model was interrupted (undo journal "
                             f"{journal_path(model)}); run `nnpatch recover {os.fspath(model)}` first")


def apply(base: PathLike, patch, output: PathLike, *, progress: ProgressFn | None = None, verify: str = "default",
          key: KeyLike | None = None) -> ApplyResult:
    """Rebuild the target of ``patch`` from ``base`` into ``output`` (atomically).

    ``patch`` is a path or an open :class:`~nnpatch.patchfile.Patch`;
    ``verify`` is ``"default"``, ``"full"`` or ``"touched"``
    (:class:`~nnpatch.applier.policy.Verify`); ``key`` (an Ed25519 public
    key, PEM) refuses a patch it did not sign.
    """
    return apply_chain(base, [patch], output, progress=progress, verify=verify, key=key)


def apply_chain(base: PathLike, patches: Sequence, output: PathLike, *, progress: ProgressFn | None = None,
                verify: str = "default", key: KeyLike | None = None) -> ApplyResult:
    """Apply P1, P2, ... to ``base`` in one pass, writing only the final model.

    Link k+1 must have been made from the target of link k: the header
    digests are compared before anything is read, and each touched tensor is
    checked against the digest its first op expects. With ``key``, every link
    must be signed by it.
    """
    return _build_chain(base, patches, output, verify, progress, key, replace=False)


def apply_in_place(model: PathLike, patch, *, verify: str = "default", progress: ProgressFn | None = None,
                   hook: HookFn | None = None, key: KeyLike | None = None) -> ApplyResult:
    """Apply ``patch`` to ``model`` in place, surviving a crash at any moment
    (:mod:`nnpatch.applier.inplace`); ``key`` as for :func:`apply`."""
    policy = Verify.parse(verify)
    with contextlib.ExitStack() as stack:
        (p,) = _open_patches(stack, [patch], key)
        try:
            return inplace.update_in_place(os.fspath(model), p, policy, progress or _no_progress,
                                           hook or (lambda step: None))
        except BaseMismatchError as e:
            raise explain_wrong_base(os.fspath(model), p, e) from None


def replace_model(model: PathLike, patches: Sequence, *, verify: str = "full", key: KeyLike | None = None,
                  progress: ProgressFn | None = None) -> ApplyResult:
    """Bring ``model`` (a file or a model directory) to the target of the chain
    ``patches``: the new version is built beside it, proven, and only then
    put in its place (a file renamed over it, keeping its permissions; a
    directory exchanged atomically), under the model's lock."""
    return _build_chain(model, patches, model, verify, progress, key, replace=True)


def _build_chain(base: PathLike, patches: Sequence, output: PathLike, verify: str, progress: ProgressFn | None,
                 key: KeyLike | None, *, replace: bool) -> ApplyResult:
    """Plan ``base`` -> ``patches`` and write the result at ``output``; with ``replace``, ``output`` is
    ``base`` itself, held under its lock while the new version is built beside it and swapped in."""
    policy = Verify.parse(verify)
    if not patches:
        raise UsageError("apply needs at least one patch")
    base = os.fspath(base)
    refuse_unfinished(base)
    with contextlib.ExitStack() as stack:
        opened = _open_patches(stack, patches, key)
        if replace:
            stack.enter_context(inplace.locked(base))
        try:
            src = stack.enter_context(open_source(base))
            plan = plan_forward(src, opened)
            return targets.build(plan, src, os.fspath(output), policy, progress or _no_progress, opened[-1],
                                 replace=replace, links=opened)
        except BaseMismatchError as e:
            raise explain_wrong_base(base, opened[0], e) from None


def explain_wrong_base(path: str, patch: Patch, e: BaseMismatchError) -> BaseMismatchError:
    """A wrong base, said the way a user can check it: the file BLAKE3 the patch was made for and the
    one ``path`` has (what ``b3sum``, ``nnpatch hash`` and release manifests show), then the first
    tensor that differs in the canonical order (the same one on every run, whichever thread saw
    a difference first). ``e`` is returned as it is when ``path`` is the patch's base file after all
    (a later link of a chain does not fit) or cannot be read again.

    The error's ``expected`` and ``actual`` are the two file digests, for callers that know
    version names by digest (a release manifest)."""
    want = patch.header.base
    try:
        actual, size = path_digest(path)
        if digests_equal(actual, want.blake3):
            return e
        detail = _first_difference(path, patch)
    except NnpatchError:
        return e
    if detail is None:  # same tensors: what differs is elsewhere (a file of a model directory), as e says
        detail = str(e)
        for prefix in (f"{path}: ", "wrong base: "):
            detail = detail[len(prefix):] if detail.startswith(prefix) else detail
    what = "directory" if os.path.isdir(path) else "file"
    return BaseMismatchError(
        f"{path}: wrong base: the patch was made for the {what} with BLAKE3 {want.blake3} ({want.size} bytes); "
        f"this one has BLAKE3 {actual} ({size} bytes); {detail}", what="base", expected=want.blake3, actual=actual)


def _first_difference(path: str, patch: Patch) -> str | None:
    """The first tensor, in the canonical order, where ``path`` is not the patch's base; None when
    its tensors are the base's."""
    h = patch.header
    with open_source(path) as src:
        for op in sorted(h.ops, key=lambda o: name_key(o.name)):
            info = src.tensors.get(op.name)
            if op.base is None:
                if info is not None:
                    return f"tensor {op.name!r} already exists, the patch adds it"
                continue
            if info is None:
                return f"tensor {op.name!r} is missing"
            if info.dtype != op.base.dtype or tuple(info.shape) != tuple(op.base.shape):
                return (f"tensor {op.name!r} is {info.dtype}{list(info.shape)}, the patch's base has "
                        f"{op.base.dtype}{list(op.base.shape)}")
            d = digest_bytes(src.raw(op.name)).hex()
            if not digests_equal(d, op.base.blake3):
                return f"first difference: tensor {op.name!r} (BLAKE3 {d}, the patch's base has {op.base.blake3})"
        if len(src.tensors) != h.base.tensors:
            return f"{len(src.tensors)} tensors, the patch's base has {h.base.tensors}"
        got, _ = model_digest(src)
        if digests_equal(got.hex(), h.base.model_blake3):
            return None
        return (f"the tensors the patch changes match, but tensor contents differ elsewhere (model BLAKE3 "
                f"{got.hex()}, the patch's base has {h.base.model_blake3})")


def recover(model: PathLike) -> str | None:
    """Roll back an interrupted in-place apply. Returns what was done, or None when nothing was to do."""
    return inplace.recover(model)


def revert(new: PathLike, patch, output: PathLike, *, progress: ProgressFn | None = None) -> ApplyResult:
    """Rebuild the base of a reversible ``patch`` from its target ``new`` into ``output``.

    The result is always checked against the base's file digest in the patch.
    """
    output = os.fspath(output)
    refuse_unfinished(new)
    with contextlib.ExitStack() as stack:
        (p,) = _open_patches(stack, [patch], None)
        n = stack.enter_context(SafetensorsFile(new))
        plan = plan_revert(n, p)
        return build_file(plan, n, output, Verify("full"), progress or _no_progress, label="not the patch's target")
