"""Apply a patch: rebuild the target model byte for byte from the base.

Order of work (spec/FORMAT.md, "Applying"): the patch is validated whole
(structure and trailer hash) before the base is opened; the base's tensor set
is checked against the patch; the output is built in a temporary file beside
the destination and committed by rename only when every check passed. The
base is only ever read.

The engine makes ONE read pass over the base, on every core:

* unchanged tensors move base -> output with ``os.copy_file_range`` (the
  kernel copies page cache to page cache; falls back to numpy copies between
  memory maps where the file system refuses), merged into runs;
* meanwhile, worker threads hash every base tensor from the page cache
  (BLAKE3 and copy_file_range both release the GIL), for the base model
  digest and the per-tensor digests of the touched tensors;
* touched tensors are copied, the patch's values decoded and scattered into
  the output's memory map by :mod:`nnpatch.kernel`, and the result hashed
  while still hot and compared with the op's target digest.

What is hashed and checked is the :class:`~nnpatch.applier.policy.Verify`
policy's to say; the engine only follows it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import threading
from collections.abc import Callable, Sequence

import blake3
import numpy as np

from ..atomic import atomic_write, write_error
from ..errors import BaseMismatchError, IntegrityError, NnpatchError, PatchFormatError
from ..hashing import digest_bytes, digests_equal, model_digest_of, name_key
from ..weights import SafetensorsFile
from .decode import run_step
from .oscopy import allocate, copy_range, start_writeback
from .plan import Item, Plan
from .policy import ApplyResult, ProgressFn, Verify


#: Unchanged runs are copied in pieces of this size, so the workers share them.
_COPY_PIECE = 64 << 20


# --- the engine ------------------------------------------------------------------------------

def workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(2, min(8, n))


class _Errors:
    """Collects failures from worker threads; the most telling one is raised."""

    def __init__(self) -> None:
        self.items: list[BaseException] = []
        self.lock = threading.Lock()

    def add(self, e: BaseException) -> None:
        with self.lock:
            self.items.append(e)

    def raise_first(self) -> None:
        if not self.items:
            return

        def rank(e):
            if isinstance(e, PatchFormatError):
                return 0
            if isinstance(e, BaseMismatchError):
                return 1
            if isinstance(e, NnpatchError):
                return 2
            return 3
        # the same error on every run, whichever thread failed first: ties go to the first tensor by name
        raise min(self.items, key=lambda e: (rank(e), name_key(str(getattr(e, "what", None) or ""))))


def require_target_model(plan: Plan, finals: dict[str, bytes], digests: dict[str, bytes]) -> None:
    """The target's model digest from the digests at hand: touched tensors as written, the rest as copied."""
    got = model_digest_of({item.info.name: item.info for item in plan.items},
                          {item.info.name: finals[item.info.name] if item.touched else digests[item.src.name]
                           for item in plan.items}).hex()
    if not digests_equal(got, plan.output_model):
        raise IntegrityError(f"result does not match the patch's target model digest (model BLAKE3 "
                             f"{got}, expected {plan.output_model})", what="target",
                             expected=plan.output_model, actual=got)


def proven_model(plan: Plan, verify: Verify) -> str | None:
    """The output's model digest where the policy had the engine check it, else None."""
    return plan.output_model if verify.whole_base or plan.always_full else None


def _input_locator(inp) -> Callable[[str], tuple[int, object, int]] | None:
    """Where an input tensor's bytes lie in a file, as (fd, map, offset), so
    unchanged tensors move by ``copy_file_range``; None for inputs whose
    tensors are not plain byte ranges of a file (PyTorch, ONNX), which are
    copied through their arrays."""
    if isinstance(inp, SafetensorsFile):
        fd, m = inp.fileno(), inp.buffer
        return lambda name: (fd, m, inp.tensors[name].begin)
    model = getattr(inp, "model", None)
    if getattr(inp, "kind", None) == "safetensors-dir" and model is not None:
        shards = model.shards
        return lambda name: (shards[model.tensors[name].file].fileno(), shards[model.tensors[name].file].buffer,
                             model.tensors[name].begin)
    return None


def execute(plan: Plan, inp: SafetensorsFile, outs: Sequence[tuple[int, object] | None], verify: Verify,
            progress: ProgressFn, label: str) -> tuple[str, int, dict[int, str]]:
    """Fill the output files per ``plan``; ``outs[i]`` is (fd, writable map or None
    when empty) of ``plan.files[i]`` (None for files that hold no tensors).

    Returns (output digest, bytes hashed, {file index: file digest} of the files
    re-hashed, which every mode does)."""
    hash_all = verify.whole_base
    locate = _input_locator(inp)
    errors_ = _Errors()
    digests: dict[str, bytes] = {}
    finals: dict[str, bytes] = {}
    hashed = [0]
    lock = threading.Lock()

    for f, out in zip(plan.files, outs):
        if out is not None and out[1] is not None:
            out[1][: len(f.raw_layout)] = f.raw_layout

    def hash_input(names: list[str]) -> None:
        for name in names:
            hash_one(name)

    def hash_one(name: str) -> None:
        d = digest_bytes(inp.raw(name))
        with lock:
            digests[name] = d
            hashed[0] += inp.tensors[name].nbytes
        want = plan.input_expect.get(name)
        if want is not None and not digests_equal(d.hex(), want):
            raise BaseMismatchError(
                f"{inp.path}: {label}: tensor {name!r} differs from the patch's "
                f"{'base' if label == 'wrong base' else 'target'} (BLAKE3 {d.hex()}, "
                f"expected {want})", what=name, expected=want, actual=d.hex())

    def copy_tensor(item: Item) -> None:
        """An input tensor's bytes into the output, by the kernel where both are files."""
        out_fd, out_map = outs[item.file]
        info = item.info
        if not info.nbytes:
            return
        if locate is not None:
            in_fd, in_map, begin = locate(item.src.name)
            copy_range(in_fd, out_fd, begin, info.begin, info.nbytes, in_map, out_map)
        else:
            np.frombuffer(out_map, np.uint8, info.nbytes, info.begin)[:] = inp.raw(item.src.name)

    def copy_run(in_fd: int, in_map, out_fd: int, out_map, src_off: int, dst_off: int, n: int) -> None:
        copy_range(in_fd, out_fd, src_off, dst_off, n, in_map, out_map)
        start_writeback(out_fd, dst_off, n)

    def make(item: Item) -> None:
        info = item.info
        out_fd, out_map = outs[item.file]
        dst = np.frombuffer(out_map, np.uint8, info.nbytes, info.begin) if info.nbytes else np.empty(0, np.uint8)
        if item.src is not None:
            if item.src.name in hashed_by_make:  # checked here, before its bytes are used, while they are hot
                hash_one(item.src.name)
            copy_tensor(item)
        if item.fill is not None:
            run_step(item.fill, info, dst)
        for step in item.steps:
            run_step(step, info, dst)
        d = digest_bytes(dst)
        with lock:
            finals[info.name] = d
            hashed[0] += info.nbytes
        if item.expect is not None and not digests_equal(d.hex(), item.expect):
            raise IntegrityError(
                f"tensor {info.name!r}: result does not match the patch's target (BLAKE3 {d.hex()}, "
                f"expected {item.expect})", what=info.name, expected=item.expect, actual=d.hex())
        start_writeback(out_fd, info.begin, info.nbytes)

    hashed_by_make = {item.src.name for item in plan.items if item.touched and item.src is not None
                      and (hash_all or plan.input_expect.get(item.src.name) is not None)}
    tasks: list[tuple[Callable, tuple, int]] = []
    if locate is not None:
        # unchanged tensors: merge neighbours (same input and output file, contiguous) into runs, cut into pieces
        runs: list[list] = []
        for item in plan.items:
            if item.touched:
                continue
            in_fd, in_map, s_off = locate(item.src.name)
            out_fd, out_map = outs[item.file]
            run = runs[-1] if runs else None
            if run is not None and run[0] == in_fd and run[2] == out_fd and run[4] + run[6] == s_off \
                    and run[5] + run[6] == item.info.begin:
                run[6] += item.info.nbytes
            else:
                runs.append([in_fd, in_map, out_fd, out_map, s_off, item.info.begin, item.info.nbytes])
        for in_fd, in_map, out_fd, out_map, s_off, d_off, n in runs:
            for off in range(0, n, _COPY_PIECE):
                k = min(_COPY_PIECE, n - off)
                tasks.append((copy_run, (in_fd, in_map, out_fd, out_map, s_off + off, d_off + off, k), k))
    else:
        for item in plan.items:
            if not item.touched:
                tasks.append((copy_tensor, (item,), item.info.nbytes))
    # hash tasks, small tensors batched
    to_hash = [n for n in inp.tensors if (hash_all or plan.input_expect.get(n) is not None)
               and n not in hashed_by_make]
    batch: list[str] = []
    batch_bytes = 0
    hash_tasks = []
    for name in sorted(to_hash, key=lambda n: inp.tensors[n].begin):
        nb = inp.tensors[name].nbytes
        if nb >= 4 << 20:
            hash_tasks.append((hash_input, ([name],), 0))
            continue
        batch.append(name)
        batch_bytes += nb
        if batch_bytes >= 4 << 20:
            hash_tasks.append((hash_input, (batch,), 0))
            batch, batch_bytes = [], 0
    if batch:
        hash_tasks.append((hash_input, (batch,), 0))
    make_tasks = [(make, (item,), item.info.nbytes) for item in plan.items if item.touched]
    # interleave so that copies, hashes and touched tensors of the same region run together
    ordered = []
    queues = [make_tasks, tasks, hash_tasks]
    while any(queues):
        for q in queues:
            if q:
                ordered.append(q.pop(0))

    def guarded(fn, args):
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            errors_.add(e)
            raise

    with cf.ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="nnpatch-apply") as pool:
        futures = {pool.submit(guarded, fn, args): n for fn, args, n in ordered}
        try:
            for fut in cf.as_completed(futures):
                if fut.exception() is not None:
                    break
                progress(futures[fut])
        finally:
            for fut in futures:
                fut.cancel()
    if errors_.items:
        errors_.raise_first()
    # the base as a whole
    if hash_all and plan.input_model is not None:
        got = model_digest_of(inp.tensors, digests).hex()
        if not digests_equal(got, plan.input_model):
            raise BaseMismatchError(
                f"{inp.path}: {label}: tensor contents differ from the patch's "
                f"{'base' if label == 'wrong base' else 'target'} (model BLAKE3 {got}, "
                f"expected {plan.input_model})", what="base", expected=plan.input_model, actual=got)
    # the target as a whole, from the digests at hand
    if hash_all and plan.output_model is not None:
        require_target_model(plan, finals, digests)
    rehashed: dict[int, str] = {}
    if verify.rehash_output or plan.always_full:
        for i, (f, out) in enumerate(zip(plan.files, outs)):
            if out is None:
                continue
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            if out[1] is not None:
                h.update(out[1])
            digest = rehashed[i] = h.hexdigest()
            hashed[0] += f.size
            if not digests_equal(digest, f.blake3):
                where = f"file {f.path!r}" if plan.directory else "result"
                raise IntegrityError(
                    f"{where} does not match the patch's {'target' if not plan.always_full else 'base'} (BLAKE3 "
                    f"{digest}, expected {f.blake3})", what=f.path or "target", expected=f.blake3, actual=digest)
        if not plan.directory:
            return rehashed[0], hashed[0], rehashed
    return None, hashed[0], rehashed


def build_file(plan: Plan, inp: SafetensorsFile, output: str, verify: Verify, progress: ProgressFn,
               label: str = "wrong base", *, mode: int | None = None) -> ApplyResult:
    """Run ``plan`` into a temporary file beside ``output``; rename it there when every check passed.

    ``mode``: the new file's permissions (default 0644 less the umask)."""
    size = plan.size
    try:
        with atomic_write(output, **({} if mode is None else {"mode": mode})) as f:
            out = None
            try:
                out = allocate(f.fileno(), size)
                digest, hashed, _ = execute(plan, inp, [(f.fileno(), out)], verify, progress, label)
            finally:
                if out is not None:
                    with contextlib.suppress(BufferError):
                        out.close()
    except OSError as e:
        if isinstance(e, NnpatchError):
            raise
        raise write_error(output, e, what="the new model (built beside it, then renamed into place)",
                          needed=size) from e
    return ApplyResult(output, size, digest, plan.ops, verify.mode, hashed, plan.links, proven_model(plan, verify))
