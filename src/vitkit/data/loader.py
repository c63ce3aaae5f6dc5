"""DataLoaders for training and evaluation: ``make_loader(dataset, ...)``.

One loader for every dataset (in memory, image files, CSV, Hugging Face, WebDataset shards), built
on torchdata's ``StatefulDataLoader`` so that its position can be saved and restored mid-epoch.

What it yields: ``(x, y)`` batches, ``x`` float32 (B, C, H, W) normalised with the dataset's mean /
std (``normalize=False``: in [0, 1]), ``y`` int64 (B,) class indices or float32 (B, T) targets.
``len(loader)`` is the number of batches this rank yields per epoch.

Order and sharding. ``batch_size`` is the GLOBAL batch size: epoch ``e``'s order is a permutation
seeded by (seed, e) (``train=True``; evaluation keeps the dataset's order), cut into global batches
(``drop_last`` drops a final partial one, so every step and every rank has equal batches), and
rank ``r`` of ``world_size`` takes its contiguous slice of each global batch. So the ranks cover an
epoch exactly once, and N processes see the same global batches as one (DDP gives the same result).

Augmentation randomness. Sample ``i`` of epoch ``e`` is transformed under ``torch.manual_seed(
f(seed, e, i))`` inside whichever process loads it (torchvision.transforms.v2 draws from torch's
global RNG; in the main process, with ``workers=0``, the caller's RNG is saved and restored around
it). So batches are bit-identical for any ``workers``, on any rank layout, and after a resume.

Workers decode (``vitkit.data.files``) and augment (``vitkit.data.augment.sample_transform``) in
worker processes: persistent, prefetching, pinned memory when the device is CUDA (move batches
with ``.to(device, non_blocking=True)``). In-memory datasets without per-sample augmentation take
a batched fast path in the main process (one indexing op per batch, no per-sample Python, no
workers whatever ``workers`` says).

Resume. ``state_dict()`` -> {"epoch", "batches" (yielded this epoch), "dl" (the
StatefulDataLoader's own state), "skipped"}; a fresh loader given ``load_state_dict(state)``
continues with exactly the batches the uninterrupted loader would have yielded next (the sampler is
fast-forwarded, no image is decoded for the skipped batches). WebDataset shards resume the same
way: see ``vitkit.data.shards``.

Bad files. An unreadable image stops iteration with an ``InputError`` whose message starts with the
file's name (raised in the main process, not a worker traceback); with ``skip_bad=True`` the file
is logged, left out of its batch and counted in ``loader.skipped``. A worker process that dies
raises ``DataWorkerError``; nothing is written by the loader, so the last checkpoint stays intact.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import InputError, VitkitError
from .augment import AugmentSpec, sample_transform
from .deps import require

log = logging.getLogger("vitkit.data")


class DataWorkerError(VitkitError):
    """A DataLoader worker process died (killed, out of memory). The loader wrote nothing."""


def default_workers() -> int:
    """Worker processes for file datasets when the user does not say: every core but one for the
    training process, at most 8 (decoding rarely needs more per GPU)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus - 1))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in epoch ``epoch`` (a hash: no collisions between
    nearby triples, unlike a linear mix)."""
    h = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class GlobalBatchSampler(Sampler):
    """Yields this rank's slice of each global batch, as lists of (epoch, index) pairs (the epoch
    travels with the index so persistent workers need no message to know it)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        B = self.batch_size
        stop = (self.n // B) * B if self.drop_last else self.n
        return [order[i:i + B] for i in range(0, stop, B)]

    def _local(self, gb: list[int]) -> list[int]:
        per, extra = divmod(len(gb), self.world_size)  # same slicing as vitkit.train.distributed.shard
        start = self.rank * per + min(self.rank, extra)
        return gb[start:start + per + (1 if self.rank < extra else 0)]

    def __iter__(self):
        for gb in self.global_batches():
            local = self._local(gb)
            if local:
                yield [(self.epoch, i) for i in local]

    def __len__(self) -> int:
        B = self.batch_size
        full, rest = divmod(self.n, B)
        count = full
        if rest and not self.drop_last:
            count += 1 if len(self._local(list(range(rest)))) else 0
        if full and not len(self._local(list(range(B)))):
            count -= full
        return count


def _identity(batch):
    return batch


class _Bad:
    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


class EpochDataset(Dataset):
    """Wraps a source dataset (``read(i) -> (image, target)``) for the loader: per-sample seeded
    transforms, bad-file handling, and the batched fast path of in-memory sources."""

    def __init__(self, source, transform, seed: int, skip_bad: bool, fast: bool):
        self.source, self.transform, self.seed, self.skip_bad, self.fast = source, transform, seed, skip_bad, fast

    def __len__(self) -> int:
        return len(self.source)

    def _one(self, epoch: int, i: int):
        try:
            img, y = self.source.read(i)
        except InputError as e:
            return _Bad(str(e))
        torch.manual_seed(sample_seed(self.seed, epoch, i))
        return self.transform(img), y

    def __getitem__(self, key):
        epoch, i = key
        return self._one(epoch, i)

    def __getitems__(self, keys):
        """A whole batch -> (x, y, skipped messages). Runs in a worker, or in the main process."""
        if self.fast:  # in memory, no per-sample randomness: one gather + one resize for the batch
            x, y = self.source.read_batch([i for _, i in keys])
            return self.transform(x), y, [], None
        main = torch.utils.data.get_worker_info() is None
        with torch.random.fork_rng(devices=[], enabled=main):  # keep the trainer's RNG stream untouched
            items = [self._one(e, i) for e, i in keys]
        return collate(items, self.skip_bad)


def collate(items, skip_bad: bool):
    """Samples (or _Bad markers) -> (x, y, skipped messages, fatal message or None). A bad file is
    returned, not raised: the main process raises it as an InputError that starts with the file's
    name (a worker's exception would arrive wrapped in its traceback)."""
    bad = [it.message for it in items if isinstance(it, _Bad)]
    if bad and not skip_bad:
        return None, None, [], bad[0]
    good = [it for it in items if not isinstance(it, _Bad)]
    if not good:
        return None, None, bad, None
    x = torch.stack([g[0] for g in good])
    y = torch.stack([torch.as_tensor(g[1]) for g in good])
    return x, y, bad, None


class Loader:
    """Iterable over (x, y) batches with ``set_epoch``, ``state_dict``, ``load_state_dict``, ``len``;
    see the module docstring. Build with :func:`make_loader`."""

    def __init__(self, dataset, *, batch_size: int, train: bool, seed: int, workers: int, rank: int,
                 world_size: int, device_type: str, drop_last: bool, augment: AugmentSpec | None,
                 mean, std, normalize: bool, prefetch_factor: int):
        sdl = require("torchdata.stateful_dataloader", "the vitkit data loader")
        self.dataset = dataset
        self.train = train
        self.epoch = 0
        self.skipped = 0
        self._yielded = 0
        self._pending: dict[str, Any] | None = None
        self._iterable = hasattr(dataset, "stream")  # shards: an IterableDataset per epoch
        aug = augment if train else None
        mean = list(mean if mean is not None else getattr(dataset, "mean", [0.5] * 3))
        std = list(std if std is not None else getattr(dataset, "std", [0.5] * 3))
        hw = tuple(dataset.image_hw)
        fast = bool(getattr(dataset, "in_memory", False)) and (aug is None or not aug.per_sample)
        if fast:
            # batch tensors: only normalisation left to do (read_batch already resized)
            tf = _Normalize(mean, std) if normalize else _identity
            workers = 0  # an indexing op per batch: workers would only add copies
        else:
            tf = sample_transform(hw, mean, std, aug, normalize=normalize)
        self.workers = workers
        kw: dict[str, Any] = dict(num_workers=workers, collate_fn=_identity, pin_memory=device_type == "cuda")
        if workers > 0:
            kw.update(prefetch_factor=prefetch_factor, persistent_workers=not self._iterable)
        if self._iterable:
            self.sampler = None
            self._ds = dataset.stream(batch_size=batch_size, train=train, seed=seed, rank=rank,
                                      world_size=world_size, drop_last=drop_last, transform=tf,
                                      skip_bad=getattr(dataset, "skip_bad", False))
            self._dl = _quiet(sdl.StatefulDataLoader, self._ds, batch_size=None, **kw)
        else:
            self.sampler = GlobalBatchSampler(len(dataset), batch_size, shuffle=train, seed=seed, rank=rank,
                                              world_size=world_size, drop_last=drop_last)
            self._ds = EpochDataset(dataset, tf, seed, getattr(dataset, "skip_bad", False), fast)
            self._dl = _quiet(sdl.StatefulDataLoader, self._ds, batch_sampler=self.sampler, **kw)

    # ------------------------------------------------------------------ epochs and length
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        else:
            self._ds.set_epoch(self.epoch)

    def __len__(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self._ds)

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        self.set_epoch(self.epoch)
        start = 0
        pending, self._pending = self._pending, None
        if pending is not None and pending["epoch"] == self.epoch and 0 < pending["batches"] < len(self):
            start = pending["batches"]
            if self.sampler is not None:
                self._dl.load_state_dict(pending["dl"])
            else:
                self._ds.start_batch = start
        elif self.sampler is None:
            self._ds.start_batch = 0
        self._yielded = start
        it = iter(self._dl)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                break
            except RuntimeError as e:
                if "DataLoader worker" in str(e) and ("killed" in str(e) or "exited unexpectedly" in str(e)):
                    raise DataWorkerError(f"a data loader worker died ({str(e).splitlines()[0]}); nothing was "
                                          "saved by the loader, the last checkpoint is intact") from e
                raise
            x, y, bad, fatal = batch
            if fatal is not None:
                raise InputError(fatal)
            self._yielded += 1
            for m in bad:
                log.warning("skipped unreadable image: %s", m)
            self.skipped += len(bad)
            if x is None:  # every image of this batch was unreadable
                continue
            yield x, y
        self._yielded = 0
        self.epoch_done = True

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        mid = 0 < self._yielded < len(self)
        dl = self._dl.state_dict() if (mid and self.sampler is not None) else None
        return {"epoch": self.epoch, "batches": self._yielded if mid else 0, "dl": dl, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken: the next ``iter()`` of epoch ``state['epoch']`` resumes
        after the batches already yielded (``set_epoch`` to another epoch discards it)."""
        self.epoch = int(state["epoch"])
        self.skipped = int(state.get("skipped", 0))
        self._pending = dict(state) if state.get("batches") else None
        self.set_epoch(self.epoch)


def _quiet(fn, *args, **kw):
    import warnings

    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in this torch
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return fn(*args, **kw)


class _Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x):
        return (x - self.mean) / self.std


def make_loader(dataset, *, batch_size: int, train: bool, seed: int = 0, workers: int | None = None,
                rank: int = 0, world_size: int = 1, device_type: str = "cpu", drop_last: bool | None = None,
                augment: AugmentSpec | None = None, mean=None, std=None, normalize: bool = True,
                prefetch_factor: int = 4) -> Loader:
    """A :class:`Loader` over ``dataset`` (a split of :func:`vitkit.data.build_data`'s result).

    batch_size: GLOBAL batch size (each of ``world_size`` ranks gets its slice).
    train: shuffle by (seed, epoch) and apply ``augment``; evaluation keeps order, no augmentation.
    workers: worker processes (None = :func:`default_workers`; 0 = load in this process).
    drop_last: default ``train`` (equal batches for every step and rank).
    mean / std: normalisation (default: the dataset's own, set by build_data).
    """
    if workers is None:
        workers = default_workers()
    if workers < 0:
        raise InputError(f"workers must be >= 0, got {workers}")
    return Loader(dataset, batch_size=batch_size, train=train, seed=seed, workers=workers, rank=rank,
                  world_size=world_size, device_type=device_type, drop_last=train if drop_last is None else drop_last,
                  augment=augment, mean=mean, std=std, normalize=normalize, prefetch_factor=prefetch_factor)
