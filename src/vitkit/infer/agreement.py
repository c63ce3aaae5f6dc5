"""How close an approximate Predictor (bf16, int8) comes to the exact fp32 one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import InputError
from .predictor import Predictor


@dataclass
class Agreement:
    dtype: str  # what actually ran (a CPU without native bf16 runs fp32)
    n: int  # images compared
    top1: float  # fraction of images whose arg-max output is the same as fp32's (a non-finite output never is)
    max_abs_diff: float  # largest |output - fp32 output| over the images with finite outputs
    mean_abs_diff: float
    nonfinite: int = 0  # images whose output holds NaN or inf (where fp32's does not): overflow in dtype

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.dtype}: top-1 agreement with fp32 {100 * self.top1:.2f}% over {self.n} images "
                f"(max |diff| {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g}"
                + (f"; {self.nonfinite} image(s) gave NaN or inf" if self.nonfinite else "") + ")")


@torch.no_grad()
def agreement(model: nn.Module, batches: Iterable[torch.Tensor], dtype: str, reference: Predictor | None = None,
              candidate: Predictor | None = None) -> Agreement:
    """Run every (B, C, H, W) batch through ``Predictor(model, "fp32")`` and
    ``Predictor(model, dtype)`` and compare: top-1 agreement of the arg-max, and the largest and
    mean absolute output difference. Use real images (a random input's arg-max is a coin toss
    between near-equal logits and says little). An image whose ``dtype`` output is not finite
    counts as a disagreement (``nonfinite``) and stays out of the differences; a non-finite fp32
    output is an InputError (the model itself is broken, there is nothing to agree with)."""
    ref = reference or Predictor(model, "fp32")
    cand = candidate or Predictor(model, dtype)
    n = same = nonfinite = 0
    max_diff = sum_diff = 0.0
    count = 0
    for x in batches:
        a, b = ref(x), cand(x)
        broken = int((~torch.isfinite(a).flatten(1).all(1)).sum())
        if broken:
            raise InputError(f"the fp32 outputs of {broken} of {a.shape[0]} images hold NaN or inf: the model itself "
                             "does not compute finite numbers, so there is nothing to agree with")
        finite = torch.isfinite(b).flatten(1).all(1)  # (B,)
        nonfinite += int((~finite).sum())
        same += int(((a.argmax(-1) == b.argmax(-1)) & finite).sum())
        n += a.shape[0]
        d = (a[finite] - b[finite]).abs()
        if d.numel():
            max_diff = max(max_diff, float(d.max()))
            sum_diff += float(d.sum())
            count += d.numel()
    return Agreement(dtype=cand.dtype, n=n, top1=same / max(n, 1), max_abs_diff=max_diff,
                     mean_abs_diff=sum_diff / max(count, 1), nonfinite=nonfinite)
