"""How close an approximate Predictor (bf16, int8) comes to the exact fp32 one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .predictor import Predictor


@dataclass
class Agreement:
    dtype: str  # what actually ran (a CPU without native bf16 runs fp32)
    n: int  # images compared
    top1: float  # fraction of images whose arg-max output is the same as fp32's
    max_abs_diff: float  # largest |output - fp32 output| over all images and outputs
    mean_abs_diff: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.dtype}: top-1 agreement with fp32 {100 * self.top1:.2f}% over {self.n} images "
                f"(max |diff| {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g})")


@torch.no_grad()
def agreement(model: nn.Module, batches: Iterable[torch.Tensor], dtype: str, reference: Predictor | None = None,
              candidate: Predictor | None = None) -> Agreement:
    """Run every (B, C, H, W) batch through ``Predictor(model, "fp32")`` and
    ``Predictor(model, dtype)`` and compare: top-1 agreement of the arg-max, and the largest and
    mean absolute output difference. Use real images (a random input's arg-max is a coin toss
    between near-equal logits and says little)."""
    ref = reference or Predictor(model, "fp32")
    cand = candidate or Predictor(model, dtype)
    n = same = 0
    max_diff = sum_diff = 0.0
    count = 0
    for x in batches:
        a, b = ref(x), cand(x)
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
        d = (a - b).abs()
        max_diff = max(max_diff, float(d.max()))
        sum_diff += float(d.sum())
        count += d.numel()
    return Agreement(dtype=cand.dtype, n=n, top1=same / max(n, 1), max_abs_diff=max_diff,
                     mean_abs_diff=sum_diff / max(count, 1))
