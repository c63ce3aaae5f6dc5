"""RunState: everything a run saves and resumes, as one object.

model, optimizer, EMA, grad scaler, the loader's position inside the epoch (torchdata's
StatefulDataLoader), every rank's RNG states, epoch / step counters, the history of epoch records,
the best-so-far record, the running sums of the current epoch, and the data's class names (a resume
checks them; states written before they were saved resume without the check). ``state_dict()`` is what
``train_state.pt`` holds (tensors and plain containers only: loaded with ``weights_only=True``);
``load_state_dict()`` puts a run back exactly where it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed import DistInfo
from .checkpoint import rng_state, set_rng_state


def _new_best() -> dict[str, Any]:
    return {"score": [-math.inf, -math.inf], "epoch": -1, "which": None, "val_accuracy": None}


@dataclass
class RunState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: Any  # vitkit.train.ema.EMA (a torch AveragedModel) or None
    scaler: torch.amp.GradScaler
    loader: Any  # the train loader (vitkit.train.build.train_loader: a StatefulDataLoader)
    device: torch.device
    fsdp: bool = False
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch_pos: int = 0  # batches done in the current epoch
    seconds: float = 0.0  # training seconds spent in the current epoch before a resume
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=_new_best)
    wall_seconds: float = 0.0  # wall time of earlier sessions of this run (resumed runs)
    labels: list[str] | None = None  # the data's class / target names: a resume checks its data has them
    # On the device, read only at read points (no host sync per step): this epoch's
    # [sum of loss * n, correct, n, labelled n], and [step, loss] of the first non-finite loss (step -1: none).
    sums: torch.Tensor = field(init=False)
    first_nonfinite: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.reset_sums()
        self.first_nonfinite = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=self.device)

    def reset_sums(self, values=(0.0, 0.0, 0.0, 0.0)) -> None:
        values = list(values)
        if len(values) == 3:  # saved before --unlabeled: every image counted was labelled
            values.append(values[2])
        self.sums = torch.tensor(values, dtype=torch.float64, device=self.device)

    def note_loss(self, loss: torch.Tensor, correct: torch.Tensor, n: int, labelled: torch.Tensor | None = None) -> None:
        """Accumulate one micro-batch's numbers on the device (no sync): ``n`` rows, ``labelled`` of them with a
        label (None: all; --unlabeled's rows are not), ``correct`` of those predicted right."""
        loss = loss.detach().double()
        count = torch.full_like(loss, n)
        self.sums += torch.stack([loss * n, correct.double(), count,
                                  count if labelled is None else labelled.double()])
        first = ~torch.isfinite(loss) & (self.first_nonfinite[0] < 0)
        self.first_nonfinite = torch.where(first, torch.stack([torch.full_like(loss, self.step), loss]),
                                           self.first_nonfinite)

    # ------------------------------------------------------------ save / load
    def model_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) weights; under FSDP every rank takes part, rank 0 gets the tensors."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def state_dict(self, dist: DistInfo, *, mid_epoch: bool, finished: bool = False) -> dict[str, Any]:
        """Collective under torchrun (RNG states are gathered from every rank)."""
        # per rank: the RNG (dropout / stochastic-depth streams differ per rank) and this epoch's
        # running sums (each rank's own shard; they are all-reduced at the epoch end)
        mine = {"rng": rng_state(), "sums": [float(v) for v in self.sums.tolist()]}
        ranks = [mine]
        if dist.enabled:
            ranks = [None] * dist.world_size
            torch.distributed.all_gather_object(ranks, mine)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim = get_optimizer_state_dict(self.model, self.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optim = self.optimizer.state_dict()
        return {"model": self.model_state(), "optimizer": optim,
                "ema": self.ema.state_dict() if self.ema is not None else None, "scaler": self.scaler.state_dict(),
                # at an epoch end the next epoch starts from set_epoch alone: no position to keep
                "loader": self.loader.state_dict() if mid_epoch else None, "rng": [r["rng"] for r in ranks],
                "epoch": self.epoch, "step": self.step, "batch_pos": self.batch_pos, "seconds": self.seconds,
                "history": self.history, "best": self.best, "sums": [r["sums"] for r in ranks],
                "wall_seconds": self.wall_seconds, "labels": self.labels,
                # only the schedule's end finishes a run (a --max-steps stop does not)
                "finished": finished}

    def load_state_dict(self, state: dict[str, Any], dist: DistInfo) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model"], options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.set_epoch(state["epoch"])
        if state.get("loader") is not None:
            self.loader.load_state_dict(state["loader"])
        self.epoch, self.step, self.batch_pos = state["epoch"], state["step"], state["batch_pos"]
        self.seconds, self.wall_seconds = state.get("seconds", 0.0), state.get("wall_seconds", 0.0)
        self.history = [dict(h) for h in state["history"]]
        self.best = dict(state["best"])
        sums = state["sums"]
        if len(sums) != dist.world_size:  # resumed with another world size: rank 0 carries the total
            sums = [[sum(col) for col in zip(*sums)]] + [[0.0, 0.0, 0.0]] * (dist.world_size - 1)
        self.reset_sums(sums[dist.rank])
        rngs = state["rng"]
        set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
