"""The one place that decides how a target is written, by its kind:

* ``safetensors``: the engine builds the file beside the destination and
  renames it there (:func:`~nnpatch.applier.engine.build_file`);
* ``safetensors-dir``: a model directory built beside the destination and
  committed by one rename or an atomic exchange (:mod:`.directory`);
* ``pytorch``: the tensors staged as safetensors, written back with
  ``torch.save`` and proven by the model digest;
* ``onnx``: the tensors put back into the patch's skeleton, every file proven
  by its digest before it is written.
"""

from __future__ import annotations

import contextlib
import os

from .. import codecs
from ..atomic import atomic_path, atomic_write, temporary_path
from ..errors import IntegrityError, NnpatchError, NnpatchIOError, PatchFormatError, WeightsError
from ..hashing import canonical_order, digest_bytes, digests_equal, hash_file
from ..patchfile import Patch
from ..weights import SafetensorsFile
from ..weights.onnx_file import rebuild_external, rebuild_onnx
from ..weights.sharded import safe_relative_path
from ..weights.sniff import open_model
from ..weights.torch_file import save_torch_state
from .directory import build_directory
from .engine import build_file
from .plan import Plan
from .policy import ApplyResult, ProgressFn, Verify


def build(plan: Plan, src, output: str, verify: Verify, progress: ProgressFn, patch: Patch, *,
          replace: bool = False) -> ApplyResult:
    """Write the target of ``plan`` (made by ``patch``, the chain's last link) at ``output``.

    ``replace``: ``output`` is an existing model directory that the new one
    replaces (``apply --in-place``, ``update``); files are always replaced
    atomically.
    """
    kind = patch.header.target.format
    if kind == "safetensors-dir":
        return build_directory(plan, src, output, verify, progress, replace=replace)
    if kind == "pytorch":
        return _build_torch(plan, src, output, verify, progress, patch.header.target.model_blake3)
    if kind == "onnx":
        return _build_onnx(plan, src, output, verify, progress, patch)
    mode = _mode_of(output) if replace else None
    return build_file(plan, src, output, verify, progress, mode=mode)


def _mode_of(path: str) -> int | None:
    """The permissions a replaced file hands on to its successor (None: there is none)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _staged(plan: Plan, b, output: str, verify: Verify, progress: ProgressFn):
    """Build the target's tensors as a safetensors file beside ``output`` (proven as
    any apply is); yields (ApplyResult, open SafetensorsFile); the file is removed after."""
    with temporary_path(output, suffix=".safetensors.tmp") as staging:
        r = build_file(plan, b, staging, verify, progress)
        with SafetensorsFile(staging) as st:
            yield r, st


def _build_torch(plan: Plan, b, output: str, verify: Verify, progress: ProgressFn,
                 model_blake3: str) -> ApplyResult:
    """A PyTorch target: build the tensors as safetensors, then write them back with
    ``torch.save``, proven by the model digest (torch's files are not byte-stable)."""
    with atomic_path(output, mode=None) as tmp:
        with _staged(plan, b, output, verify, progress) as (r, st):
            save_torch_state(tmp, {n: (st.tensors[n].dtype, st.tensors[n].shape, st.raw(n))
                                   for n in canonical_order(st.tensors)})
        with open_model(tmp) as m:
            got = m.digest().hex()
        if not digests_equal(got, model_blake3):
            raise IntegrityError(f"{output}: the PyTorch file written does not hold the patch's target tensors "
                                 f"(model BLAKE3 {got}, expected {model_blake3})", what="target",
                                 expected=model_blake3, actual=got)
    return ApplyResult(output, os.path.getsize(output), hash_file(output), r.ops, verify.mode, r.hashed, r.links,
                       model_blake3)


def _build_onnx(plan: Plan, b, output: str, verify: Verify, progress: ProgressFn, patch: Patch) -> ApplyResult:
    """An ONNX target: build its tensors as safetensors, put them back into the
    patch's skeleton, and check every file against the digest the patch gives
    it before writing (external data files first, the model file last, each
    atomically)."""
    t = patch.header.target
    s = t.skeleton
    skeleton = b"".join(codecs.decoded_chunks(patch.section(s), s.codec, s.size, [s.size], where="target.skeleton"))
    directory = os.path.dirname(os.path.abspath(output))
    try:
        with _staged(plan, b, output, verify, progress) as (r, st):
            tensors = {n: (i.dtype, i.shape, st.raw(n).tobytes()) for n, i in st.tensors.items()}
        try:
            files = {t.outputs[0].path: rebuild_onnx(skeleton, tensors)}
            files.update(rebuild_external(skeleton, tensors))
        except WeightsError as e:
            raise PatchFormatError(f"target skeleton: {e}", path=patch.path) from e
        del tensors
        if sorted(files) != sorted(o.path for o in t.outputs):
            raise PatchFormatError("target outputs do not list the files its skeleton makes", path=patch.path)
        for o in t.outputs:
            got = digest_bytes(files[o.path]).hex()
            if len(files[o.path]) != o.size or not digests_equal(got, o.blake3):
                raise IntegrityError(f"{o.path}: the ONNX file rebuilt does not match the patch's target (BLAKE3 "
                                     f"{got}, expected {o.blake3})", what=o.path, expected=o.blake3, actual=got)
        for o in t.outputs[1:]:  # external data first, the model that points at it last
            full = safe_relative_path(directory, o.path, what="external data location", source=patch.path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with atomic_write(full) as f:
                f.write(files[o.path])
        with atomic_write(output) as f:
            f.write(files[t.outputs[0].path])
    except OSError as e:
        if isinstance(e, NnpatchError):
            raise
        raise NnpatchIOError(f"{output}: cannot write: {e.strerror or e}") from e
    # every file written was hashed above and matched its digest: the model file's is proven
    return ApplyResult(output, t.outputs[0].size, t.outputs[0].blake3, r.ops, verify.mode, r.hashed, r.links,
                       r.model_blake3)
