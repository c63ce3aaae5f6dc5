"""DataLoaders for training and evaluation: ``make_loader(dataset, ...)``.

One module on purpose (~440 lines): the sampler, the per-epoch dataset, collate and
:class:`Loader` are the parts of the one loader ``make_loader`` builds, and the order, determinism
and resume guarantees below hold only across all of them together.

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

Augmentation randomness. Sample ``i`` of epoch ``e`` is transformed with torch's default
generator seeded with ``f(seed, e, i)`` inside whichever process loads it (torchvision.transforms.v2 draws from torch's
global RNG; in the main process, with ``workers=0``, the caller's RNG is saved and restored around
it). So batches are bit-identical for any ``workers``, on any rank layout, and after a resume.

Workers decode (``vitkit.data.files``) and augment (``vitkit.data.augment.SamplePipeline``) in
worker processes: persistent, prefetching, pinned memory when the device is CUDA (move batches
with ``.to(device, non_blocking=True)``). In-memory datasets without per-sample augmentation take
a batched fast path in the main process (one indexing op per batch, no per-sample Python, no
workers whatever ``workers`` says).

Resume. ``state_dict()`` -> {"epoch", "batches" (yielded this epoch), "dl" (the
StatefulDataLoader's own state), "skipped", "skipped_keys"}; a fresh loader given ``load_state_dict(state)``
continues with exactly the batches the uninterrupted loader would have yielded next (the sampler is
fast-forwarded, no image is decoded for the skipped batches). WebDataset shards resume the same
way: see ``vitkit.data.shards``. Without torchdata (the ``vitkit[data]`` extra) the loader is torch's
DataLoader and resuming skips the batches already done in the (deterministic) batch sampler: same
batches, so the default ``vitkit train`` needs no extra.

Bad files. An unreadable image stops iteration with an ``InputError`` whose message starts with the
file's name (raised in the main process, not a worker traceback); with ``skip_bad=True`` the file
is logged, left out of its batch and counted in ``loader.skipped`` once (not once per epoch:
``loader.skipped`` is the number of distinct files). A worker process that dies
raises ``DataWorkerError``; nothing is written by the loader, so the last checkpoint stays intact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import InputError, VitkitError
from ..model.naflex import NaFlexTransform
from .augment import AugmentSpec, SamplePipeline

log = logging.getLogger("vitkit.data")


class DataWorkerError(VitkitError):
    """A DataLoader worker process died (killed, out of memory). The loader wrote nothing."""


def default_workers() -> int:
    """Worker processes for file datasets when the user does not say: this process's share of the
    cores (divided among torchrun's local ranks, ``LOCAL_WORLD_SIZE``) but one for the training
    process, at most 16. Measured: ViT-B/16 bf16 on one H200 trains at ~3,300 img/s from 500x375
    JPEGs with 15 workers (BENCHMARKS.md, GPU), about 220 images/s per worker, so the former cap
    of 8 would have fed it about half of that."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cpus = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(16, cpus // local - 1))


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
        self.start_batch = 0  # resume without torchdata: skip this many batches once

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
        per, extra = divmod(len(gb), self.world_size)  # the slicing of vitkit.train.loop.step_theta
        start = self.rank * per + min(self.rank, extra)
        return gb[start:start + per + (1 if self.rank < extra else 0)]

    def __iter__(self):
        skip, self.start_batch = self.start_batch, 0
        n = 0
        for gb in self.global_batches():
            local = self._local(gb)
            if local:
                n += 1
                if n > skip:
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


class single_threaded_ops:
    """In the training process (workers=0): per-image ops on one intra-op thread. Splitting a
    crop or a 224x224 resize across threads costs more than it saves (measured on 2 busy cores:
    100 vs 340 images/s); DataLoader workers already run with one thread each. The RNG around the
    samples is forked by the caller (the trainer's stream stays untouched)."""

    def __init__(self, enabled: bool):
        self.enabled, self.n = enabled, 0

    def __enter__(self):
        if self.enabled:
            self.n = torch.get_num_threads()
            if self.n != 1:
                torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.enabled and self.n != 1:
            torch.set_num_threads(self.n)
        return False


def _identity(batch):
    return batch


class _Bad:
    """An unreadable sample: its message (starting with the file's name) and a key naming the file
    (the dataset index, or a shard sample's name), so a file bad in every epoch is counted once."""

    __slots__ = ("message", "key")

    def __init__(self, message: str, key):
        self.message, self.key = message, key


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
            return _Bad(str(e), i)
        s = sample_seed(self.seed, epoch, i)
        torch.default_generator.manual_seed(s)
        return self.transform.sample(img), y, s, i

    def __getitem__(self, key):
        return self.__getitems__([key])

    def __getitems__(self, keys):
        """A whole batch -> (x, y, skipped messages). Runs in a worker, or in the main process."""
        if self.fast:  # in memory, no per-sample randomness: one gather + one resize for the batch
            idx = [i for _, i in keys]
            x, y = self.source.read_batch(idx)
            return self.transform(x), y, [], None, torch.tensor(idx)
        main = torch.utils.data.get_worker_info() is None
        with torch.random.fork_rng(devices=[], enabled=main), single_threaded_ops(main):
            items = [self._one(e, i) for e, i in keys]
            return collate(items, self.skip_bad, self.transform)


def collate(items, skip_bad: bool, pipeline: SamplePipeline):
    """Samples (image, target, seed) or _Bad markers -> (x, y, skipped [(key, message)], fatal message
    or None). A bad file is returned, not raised: the main process raises it as an InputError that
    starts with the file's name (a worker's exception would arrive wrapped in its traceback)."""
    bad = [(it.key, it.message) for it in items if isinstance(it, _Bad)]
    if bad and not skip_bad:
        return None, None, [], bad[0][1], None
    good = [it for it in items if not isinstance(it, _Bad)]
    if not good:
        return None, None, bad, None, None
    x = pipeline.batch([g[0] for g in good], [g[2] for g in good])
    y = torch.stack([torch.as_tensor(g[1]) for g in good])
    return x, y, bad, None, torch.tensor([g[3] for g in good])


_LOADERS: weakref.WeakSet = weakref.WeakSet()


def close_all_loaders() -> None:
    """Stop the workers of every live vitkit loader. Call it when a worker died outside the loader's
    own ``next()`` (torch then raises "DataLoader worker ... killed" from its SIGCHLD handler wherever
    the process is): every dead worker left registered would raise that again, later, anywhere."""
    import gc

    gc.collect()  # loaders no longer referenced but not yet collected (cycles): their __del__ stops them
    for loader in list(_LOADERS):
        loader.close()


def _shutdown(it) -> None:
    """Shut a DataLoader iterator's workers down (torch's own cleanup, also what its __del__ runs)."""
    stop = getattr(it, "_shutdown_workers", None)
    if stop is not None:
        stop()


class Loader:
    """Iterable over (x, y) batches with ``set_epoch``, ``state_dict``, ``load_state_dict``, ``len``;
    see the module docstring. Build with :func:`make_loader`."""

    def __init__(self, dataset, *, batch_size: int, train: bool, seed: int, workers: int, rank: int,
                 world_size: int, device_type: str, drop_last: bool, augment: AugmentSpec | None,
                 mean, std, normalize: bool, prefetch_factor: int, preprocess=None, with_index: bool = False):
        loader_cls, self.stateful = _dataloader_class()
        _LOADERS.add(self)
        self.dataset = dataset
        self.train = train
        self.epoch = 0
        self.skipped_files: list[str] = []  # one message per distinct file, each starting with its name
        self._skipped_keys: set = set()
        self._skipped_before = 0  # from a saved state that predates skipped_keys
        self.with_index = with_index
        self._yielded = 0
        self._pending: dict[str, Any] | None = None
        self._iterable = hasattr(dataset, "stream")  # shards: an IterableDataset per epoch
        aug = augment if train else None
        mean = list(mean if mean is not None else getattr(dataset, "mean", [0.5] * 3))
        std = list(std if std is not None else getattr(dataset, "std", [0.5] * 3))
        hw = tuple(dataset.image_hw)
        rule = getattr(dataset, "model_preprocess", None)  # a fine-tune's resize / crop rule (vitkit.train.finetune)
        fast = (bool(getattr(dataset, "in_memory", False)) and (aug is None or not aug.per_sample)
                and preprocess is None and rule is None)
        if isinstance(preprocess, NaFlexTransform):  # NaFlex: own aspect ratio, packed with a mask
            tf = preprocess
        elif preprocess is not None:
            tf = SamplePipeline.from_preprocess(preprocess)
        elif fast:
            # batch tensors: only normalisation left to do (read_batch already resized)
            tf = _Normalize(mean, std) if normalize else _identity
            workers = 0  # an indexing op per batch: workers would only add copies
        else:
            tf = SamplePipeline(hw, mean, std, aug, normalize=normalize, resize_rule=rule)
        self.workers = workers
        # A private generator: DataLoader draws its workers' base seed from it at every iter(); from the
        # global RNG that draw would shift the trainer's dropout / MixUp stream, and differently after a
        # mid-epoch resume. (Our augmentation seeds come from (seed, epoch, index), not from it.)
        kw: dict[str, Any] = dict(num_workers=workers, collate_fn=_identity, pin_memory=device_type == "cuda",
                                  generator=torch.Generator().manual_seed(seed))
        if workers > 0:
            kw.update(prefetch_factor=prefetch_factor, persistent_workers=not self._iterable)
        if self._iterable:
            self.sampler = None
            self._ds = dataset.stream(batch_size=batch_size, train=train, seed=seed, rank=rank,
                                      world_size=world_size, drop_last=drop_last, transform=tf,
                                      skip_bad=getattr(dataset, "skip_bad", False))
            self._dl = _quiet(loader_cls, self._ds, batch_size=None, **kw)
        else:
            self.sampler = GlobalBatchSampler(len(dataset), batch_size, shuffle=train, seed=seed, rank=rank,
                                              world_size=world_size, drop_last=drop_last)
            self._ds = EpochDataset(dataset, tf, seed, getattr(dataset, "skip_bad", False), fast)
            self._dl = _quiet(loader_cls, self._ds, batch_sampler=self.sampler, **kw)

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
            if self.sampler is not None and self.stateful and pending.get("dl") is not None:
                self._dl.load_state_dict(pending["dl"])
            elif self.sampler is not None:  # no torchdata: the sampler skips the batches already done
                self.sampler.start_batch = start
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
                if not ("DataLoader worker" in str(e) and ("killed" in str(e) or "exited unexpectedly" in str(e))):
                    raise
                died = str(e).splitlines()[0]
            else:
                died = None
            if died is not None:
                # Stop the workers of this and every other vitkit loader now and unregister their pids:
                # a worker death is fatal to the run, and torch's SIGCHLD handler would otherwise raise
                # again, later, anywhere in the process, for each dead worker still registered (an
                # out-of-memory kill can take several, of several loaders).
                _shutdown(it)
                close_all_loaders()
                raise DataWorkerError(f"a data loader worker died ({died}); nothing was saved by the loader, "
                                      "the last checkpoint is intact")
            x, y, bad, fatal, idx = batch
            if fatal is not None:
                raise InputError(fatal)
            self._yielded += 1
            for key, m in bad:
                if key in self._skipped_keys:  # skipped in an earlier epoch already: one file, counted once
                    continue
                self._skipped_keys.add(key)
                log.warning("skipped unreadable image: %s", m)
                self.skipped_files.append(m)
            if x is None:  # every image of this batch was unreadable
                continue
            yield (x, y, idx) if self.with_index else (x, y)
        self._yielded = 0

    def close(self) -> None:
        """Stop this loader's worker processes now (they also stop when the loader is collected)."""
        _shutdown(getattr(self._dl, "_iterator", None))
        if hasattr(self._dl, "_iterator"):
            self._dl._iterator = None

    @property
    def skipped(self) -> int:
        """Distinct unreadable files skipped so far (over all epochs, a resume included)."""
        return self._skipped_before + len(self._skipped_keys)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        mid = 0 < self._yielded < len(self)
        dl = self._dl.state_dict() if (mid and self.sampler is not None and self.stateful) else None
        return {"epoch": self.epoch, "batches": self._yielded if mid else 0, "dl": dl, "skipped": self.skipped,
                "skipped_keys": sorted(self._skipped_keys, key=str)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken: the next ``iter()`` of epoch ``state['epoch']`` resumes
        after the batches already yielded (``set_epoch`` to another epoch discards it)."""
        self.epoch = int(state["epoch"])
        keys = state.get("skipped_keys")
        self._skipped_keys = set(keys or ())
        self._skipped_before = 0 if keys is not None else int(state.get("skipped", 0))
        self._pending = dict(state) if state.get("batches") else None
        self.set_epoch(self.epoch)


def _dataloader_class():
    """torchdata's StatefulDataLoader (its state_dict holds the mid-epoch position, workers included),
    else torch's DataLoader: the default `vitkit train` must not need the `vitkit[data]` extra, and the
    batch sampler is deterministic, so resuming there means skipping the batches already done."""
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        log.debug("torchdata not installed (pip install 'vitkit[data]'): torch DataLoader + sampler resume")
        return torch.utils.data.DataLoader, False
    return StatefulDataLoader, True


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
                prefetch_factor: int = 4, preprocess=None, with_index: bool = False) -> Loader:
    """A :class:`Loader` over ``dataset`` (a split of :func:`vitkit.data.build_data`'s result).

    batch_size: GLOBAL batch size (each of ``world_size`` ranks gets its slice).
    train: shuffle by (seed, epoch) and apply ``augment``; evaluation keeps order, no augmentation.
    workers: worker processes (None = :func:`default_workers`; 0 = load in this process).
    drop_last: default ``train`` (equal batches for every step and rank).
    mean / std: normalisation (default: the dataset's own, set by build_data).
    preprocess: a model's preprocessing (``model.preprocess_cfg``) instead of the resize + mean/std
        above: per image exactly what ``vitkit predict`` does (resize, center crop, normalise); a
        NaFlex model's :class:`~vitkit.model.naflex.NaFlexTransform` yields NaFlexBatch batches.
    with_index: yield (x, y, indices) — each row's index in ``dataset`` (rows of skipped files are
        absent; their messages are in ``loader.skipped_files``).
    """
    if workers is None:
        workers = default_workers()
    if workers < 0:
        raise InputError(f"workers must be >= 0, got {workers}")
    return Loader(dataset, batch_size=batch_size, train=train, seed=seed, workers=workers, rank=rank,
                  world_size=world_size, device_type=device_type, drop_last=train if drop_last is None else drop_last,
                  augment=augment, mean=mean, std=std, normalize=normalize, prefetch_factor=prefetch_factor,
                  preprocess=preprocess, with_index=with_index)
