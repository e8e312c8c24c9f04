"""What ``--data`` may give, read as batches: the one place that tells a loader from a dataset.

Each side of ``--data`` (train and eval) is one of:

* a **loader**: a ``torch.utils.data.DataLoader``, a list of batches, or any
  other object that can be iterated once per epoch and yields ``(inputs,
  targets)`` batches.  Its batches are used as they come (``--batch-size`` does
  not apply).  The number of batches per epoch is ``len(loader)``, or one
  counting pass when it has no length.  Each epoch is iterated with the global
  torch RNG seeded from ``(seed, epoch)`` (and restored afterwards), so a
  ``DataLoader(shuffle=True)`` gives the same order in a resumed run as in an
  uninterrupted one.  Under ``torchrun`` every rank iterates the loader and
  takes every ``world``-th batch; the last ``len % world`` batches of an epoch
  are left out, so that every rank runs the same number of steps.
* a **dataset**: a map-style ``torch.utils.data.Dataset`` (or any object with
  ``__getitem__`` and ``__len__`` but no ``__iter__``) of ``(input, target)``
  samples.  It is batched here with ``--batch-size``, in an order drawn from
  ``(seed, epoch)`` only, and split between ranks sample by sample.
* an ``IterableDataset`` of samples is batched with ``--batch-size`` and then read as a loader.

A one-shot iterator (a generator, ``iter(loader)``) is refused: it would be
empty from the second epoch on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..errors import NnpatchError, UserCodeError
from .usercode import describe

__all__ = ["Batches", "as_batches", "to_device"]


class _Indexed(torch.utils.data.Sampler):
    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _is_dataset(obj: Any) -> bool:
    if isinstance(obj, DataLoader | IterableDataset | list | tuple):
        return False
    if isinstance(obj, Dataset):
        return True
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not hasattr(obj, "__iter__")


class Batches:
    """One side of the data (``what``: "train" or "eval") as ``(inputs, targets)`` batches.

    ``spec`` (e.g. ``"--data mydata:loaders"``) names the user's code in errors: with it, an
    exception raised while reading the data becomes a one-line
    :class:`~nnpatch.errors.UserCodeError`; without it (library use) it propagates as it is.
    A batch that is not an ``(inputs, targets)`` pair is refused either way."""

    def __init__(self, source: Any, *, batch_size: int = 64, seed: int = 0, what: str = "train",
                 spec: str | None = None) -> None:
        if isinstance(source, Batches):
            source = source.source
        self.spec = spec
        self.what = what
        self.batch_size = batch_size
        self.seed = seed
        if isinstance(source, IterableDataset):
            source = DataLoader(source, batch_size=batch_size)
        self.source = source
        self.kind = "dataset" if _is_dataset(source) else "loader"
        self._count: int | None = None
        if self.kind == "loader":
            if not (hasattr(source, "__iter__") or hasattr(source, "__getitem__")):
                raise self._contract(f"is a {type(source).__name__}, which is neither iterable (a loader of "
                                     f"batches) nor a dataset (__getitem__ and __len__)")
            if isinstance(source, Iterator):
                raise self._contract(f"is a one-shot iterator ({type(source).__name__}); give something that "
                                     f"can be iterated once per epoch, such as a DataLoader or a list of batches")

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        """Samples (a dataset) or batches (a loader) in one epoch, before any split between ranks."""
        if self.kind == "dataset":
            return self._guard("len()", lambda: len(self.source))
        if self._count is None:
            try:
                self._count = len(self.source)
            except TypeError:  # no length: count one pass
                with _seeded(self.seed, -1):
                    self._count = sum(1 for _ in self._iterate(self.source))
        return self._count

    def num_batches(self, world: int = 1) -> int:
        """Batches per epoch on each of ``world`` ranks."""
        n = len(self)
        if self.kind == "dataset":
            if n == 0:
                raise self._contract("has no samples (len() is 0)")
            return math.ceil(math.ceil(n / world) / self.batch_size)
        if n == 0:
            raise self._contract("gave no batches")
        if n < world:
            raise self._contract(f"gave {n} batches, fewer than the {world} ranks")
        return n // world

    # ---------------------------------------------------------------- batches
    def epoch(self, epoch: int, *, start: int = 0, rank: int = 0, world: int = 1,
              shuffle: bool = True) -> Iterator[tuple[Any, Any]]:
        """The batches of ``epoch`` for ``rank``, skipping the first ``start`` of them."""
        if self.kind == "dataset":
            yield from self._dataset_epoch(epoch, start, rank, world, shuffle)
            return
        steps = self.num_batches(world)
        with _seeded(self.seed, epoch):
            it = self._iterate(self.source)
            # the loader draws its shuffling seed at the first batch: take it under the epoch's seed
            first = next(it, None)
        done = 0
        batches = it if first is None else _chain(first, it)
        for i, batch in enumerate(batches):
            if i % world != rank:
                continue
            if done >= start:
                yield batch
            done += 1
            if done == steps:
                return
        raise self._contract(f"gave {done} batches for rank {rank} in epoch {epoch + 1}, where len() promised {steps}")

    def _dataset_epoch(self, epoch: int, start: int, rank: int, world: int, shuffle: bool):
        n = len(self)
        if shuffle:
            gen = torch.Generator().manual_seed(1_000_003 * self.seed + epoch)
            perm = torch.randperm(n, generator=gen).tolist()
        else:
            perm = list(range(n))
        if world > 1:  # pad like DistributedSampler so every rank runs the same number of steps
            size = math.ceil(len(perm) / world) * world
            perm = (perm * math.ceil(size / len(perm)))[:size]  # as often as it takes: n may be < world / 2
        idx = perm[rank::world][start * self.batch_size:]
        # an own generator: the loader must not consume the global RNG (resumed runs replay exactly)
        loader = DataLoader(self.source, batch_size=self.batch_size, sampler=_Indexed(idx),
                            generator=torch.Generator().manual_seed(self.seed + epoch))
        yield from self._iterate(loader)

    def _iterate(self, iterable: Any) -> Iterator[tuple[Any, Any]]:
        it = None
        while True:
            try:
                if it is None:
                    it = iter(iterable)
                batch = next(it)
            except StopIteration:
                return
            except (NnpatchError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - the user's code: reported as such
                if self.spec is None:
                    raise
                raise UserCodeError(f"{self._name()}: reading a batch raised {describe(exc)}") from exc
            if not (isinstance(batch, tuple | list) and len(batch) == 2):
                raise self._contract(f"yielded a {type(batch).__name__}"
                                     f"{f' of {len(batch)}' if isinstance(batch, tuple | list) else ''}, "
                                     f"not an (inputs, targets) pair")
            target = batch[1]
            if self.kind == "loader" and (isinstance(target, int) or
                                          (isinstance(target, torch.Tensor) and target.dim() == 0)):
                raise self._contract("yielded a single sample (its target has no batch dimension), not a batch; "
                                     "a list of samples is a dataset: wrap it in a TensorDataset or a DataLoader")
            yield batch[0], target

    # ----------------------------------------------------------------- errors
    def _name(self) -> str:
        where = f"{self.spec}: " if self.spec else ""
        side = "the training data" if self.what == "train" else "the evaluation data"
        return f"{where}{side}"

    def _contract(self, message: str) -> UserCodeError:
        return UserCodeError(f"{self._name()} {message}")

    def _guard(self, what: str, fn):
        try:
            return fn()
        except (NnpatchError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001
            if self.spec is None:
                raise
            raise UserCodeError(f"{self._name()}: {what} raised {describe(exc)}") from exc


def as_batches(source: Any, **kwargs: Any) -> Batches:
    """``source`` itself when it is a :class:`Batches` already, else ``Batches(source, **kwargs)``."""
    return source if isinstance(source, Batches) else Batches(source, **kwargs)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` on ``device``: a tensor, or the tensors inside a tuple, list or dict."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _chain(first: Any, rest: Iterator) -> Iterator:
    yield first
    yield from rest


class _seeded:
    """The global torch RNG seeded from ``(seed, epoch)`` inside, restored as it was outside."""

    def __init__(self, seed: int, epoch: int) -> None:
        self.seed = (2_000_003 * seed + 7919 * (epoch + 1)) % (2**63)

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)
