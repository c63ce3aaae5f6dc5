"""The trainer's two doors to the data: :func:`train_loader` and :func:`eval_loader`, both
``vitkit.data.make_loader`` (torchdata's StatefulDataLoader: workers decode and augment per sample,
the position inside an epoch is saved and restored).

What the loop relies on: batches ``(x, y)`` for *this rank* with ``x`` float32 in [0, 1] (the loop
applies the batch affine augmentation and the normalisation on the device), ``set_epoch(e)`` (order
from (seed, e) only), ``len()``, ``state_dict()`` / ``load_state_dict()``; under torchrun rank r gets
the contiguous slice r of each *global* batch, so N processes see exactly what one process sees.
"""

from __future__ import annotations

import dataclasses

from ..data import AugmentSpec, make_loader
from .distributed import DistInfo


def train_loader(data, cfg, *, batch_size: int, dist: DistInfo, device_type: str, device_flips: bool):
    """``device_flips``: the batch affine on the device draws the horizontal flips (with the affine
    parameters of the step), so the per-sample pipeline must not flip a second time."""
    aug = AugmentSpec.from_config(cfg, data.hflip_ok)
    if aug is not None and device_flips:
        aug = dataclasses.replace(aug, hflip=False)
    return make_loader(data.train, batch_size=batch_size, train=True, seed=cfg.seed, workers=cfg.workers,
                       rank=dist.rank, world_size=dist.world_size, device_type=device_type, augment=aug,
                       normalize=False)


def eval_loader(dataset, batch_size: int, *, dist: DistInfo | None = None, workers: int | None = 0,
                device_type: str = "cpu"):
    """In order, this rank's contiguous shard of ``dataset``, every sample once (no drop_last)."""
    dist = dist or DistInfo()
    return make_loader(dataset, batch_size=batch_size, train=False, workers=workers, rank=dist.rank,
                       world_size=dist.world_size, device_type=device_type, drop_last=False, normalize=False)
