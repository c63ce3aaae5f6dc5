"""Exponential moving average of the weights, updated without a host sync.

torch's ``AveragedModel.update_parameters`` asks ``bool(self.n_averaged == 0)`` and copies
``n_averaged`` to the device on every call: on CUDA two host syncs per optimizer step, each one
draining the GPU's queue while the next batch waits (the trainer reads the device only every
``--log-every`` steps). :class:`EMA` keeps torch's class, state dict (``module.*`` and
``n_averaged``: checkpoints written before resume unchanged) and arithmetic
(``torch.optim.swa_utils.get_ema_multi_avg_fn``: ``lerp`` towards the model by ``1 - decay``), and
counts its updates on the host as well.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA(AveragedModel):
    """EMA of ``model``'s parameters and buffers (``use_buffers=True``): the first update copies,
    every later one moves each tensor ``1 - decay`` of the way towards the model's."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=True)
        self.decay = float(decay)
        self._avg = get_ema_multi_avg_fn(self.decay)
        self._count: int | None = 0  # updates so far, on the host; None: read n_averaged once

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._count = None
        return out

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._count is None:  # after a load: one read, not one per step
            self._count = int(self.n_averaged)
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if len(mine) != len(theirs):
            raise ValueError(f"EMA holds {len(mine)} tensors, the model {len(theirs)}")
        if self._count == 0:
            for a, b in zip(mine, theirs):
                a.copy_(b)
        else:
            groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
            for a, b in zip(mine, theirs):
                ga, gb = groups.setdefault((a.device, a.dtype), ([], []))
                ga.append(a)
                gb.append(b.to(a.device))
            for ga, gb in groups.values():
                self._avg(ga, gb, None)  # the EMA function ignores the count
        self._count += 1
        self.n_averaged += 1
