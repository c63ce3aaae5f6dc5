"""The trainer's two doors to the data: :func:`train_loader` and :func:`eval_loader`.

Everything the training loop knows about loading is here, so moving to the ``vitkit.data`` loader is
one change in this file. The contract the loop relies on:

* iterating yields ``(x, y)`` batches for *this rank*: ``x`` float32 (B, C, H, W) in [0, 1] (the loop
  applies the batch affine augmentation and the normalisation on the device), ``y`` class ids or
  regression targets; a batch whose images were all skipped (``--skip-bad-images``) is ``None``;
* ``set_epoch(e)``: the order of epoch ``e`` is a function of (seed, e) only;
* ``len(loader)``: batches per epoch; ``state_dict()`` / ``load_state_dict()``: the position inside
  the epoch (torchdata's ``StatefulDataLoader``), so a run killed mid-epoch resumes exactly;
* under torchrun, rank r gets the contiguous slice r of each *global* batch (``--batch-size``, last
  partial batch dropped), so N processes see exactly the samples one process sees.

TODO(data): switch to vitkit.data's make_loader when it lands (same contract).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

from ..data.augment import step_generator
from ..data.datasets import collate_skip_none
from .distributed import DistInfo, shard


class EpochBatchSampler(Sampler[list[int]]):
    """This rank's slice of each global batch of a permutation seeded by (seed, epoch)."""

    def __init__(self, n: int, global_batch: int, seed: int, dist: DistInfo, shuffle: bool = True,
                 drop_last: bool = True):
        self.n, self.batch, self.seed, self.dist = n, global_batch, seed, dist
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch if self.drop_last else -(-self.n // self.batch)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=step_generator(self.seed, self.epoch, salt=1)).tolist()
        else:
            order = list(range(self.n))
        for i in range(len(self)):
            yield shard(order[i * self.batch:(i + 1) * self.batch], self.dist)


class _Batched(Dataset):
    """An in-memory dataset read a whole batch at a time (DataLoader calls ``__getitems__``)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]

    def __getitems__(self, indices):
        return self.ds.get_batch(indices)


def _first(batch):
    return batch


def _loader(dataset, sampler, workers: int, pin: bool):
    import warnings

    from torchdata.stateful_dataloader import StatefulDataLoader

    in_memory = hasattr(dataset, "get_batch")
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in this torch
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return _new(StatefulDataLoader, dataset, sampler, workers, pin, in_memory)


def _new(StatefulDataLoader, dataset, sampler, workers: int, pin: bool, in_memory: bool):
    return StatefulDataLoader(
        _Batched(dataset) if in_memory else dataset, batch_sampler=sampler,
        # in-memory tensors are indexed in the main process: a worker would only add a copy
        num_workers=0 if in_memory else workers, collate_fn=_first if in_memory else collate_skip_none,
        pin_memory=pin, persistent_workers=workers > 0 and not in_memory,
        prefetch_factor=2 if workers > 0 and not in_memory else None)


class TrainLoader:
    """A StatefulDataLoader over :class:`EpochBatchSampler` (see the module docstring)."""

    def __init__(self, dataset, batch_size: int, seed: int, dist: DistInfo, workers: int, pin: bool):
        self.sampler = EpochBatchSampler(len(dataset), batch_size, seed, dist)
        self.loader = _loader(dataset, self.sampler, workers, pin)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return iter(self.loader)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        self.loader.load_state_dict(state)


def train_loader(dataset, batch_size: int, *, seed: int, dist: DistInfo, workers: int, pin: bool) -> TrainLoader:
    return TrainLoader(dataset, batch_size, seed, dist, workers, pin)


def eval_loader(dataset, batch_size: int, *, dist: DistInfo | None = None, workers: int = 0, pin: bool = False):
    """In order, this rank's contiguous shard of ``dataset`` (every rank reads each sample once)."""
    dist = dist or DistInfo()
    n = len(dataset)
    idx = shard(list(range(n)), dist)
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return _loader(dataset, batches, workers, pin)
