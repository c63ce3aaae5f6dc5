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

# The EMA averages over at most the last 1/RUN_FRACTION of a run (see run_decay).
RUN_FRACTION = 10


def run_decay(decay: float, total_steps: int) -> float:
    """The per-step decay a run of ``total_steps`` optimizer steps uses: ``min(decay, 1 - 10 / total_steps)``.

    An EMA's horizon is about ``1 / (1 - decay)`` steps: 0.99 averages the last ~100 steps, half of a
    200-step run, so a short run's EMA lags its own model (issue 22: 10 digits epochs tested 0.40 with
    the EMA while the raw weights scored 0.42-0.44 on val). Capping the horizon at a tenth of the run
    keeps a long run's decay (the default digits run, 2,850 steps: 1 - 10/2850 = 0.9965 > 0.99) and
    shortens a short one's (190 steps: 0.947, a 19-step horizon). A constant decay per run, not a
    warm-up in the step: the EMA's arithmetic stays torch's (``get_ema_multi_avg_fn``) and a resumed
    run recomputes the same value from its config."""
    if total_steps <= 0:
        return float(decay)
    return min(float(decay), max(0.0, 1.0 - RUN_FRACTION / total_steps))


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
