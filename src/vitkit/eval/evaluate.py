"""Evaluate a model on a dataset split.

``evaluate(model, data, ...)`` runs the model over ``data`` (a dataset split, read through
:func:`vitkit.train.data.eval_loader`, or an iterable of ``(x, y)`` batches in [0, 1]) and returns plain numbers:

* classification: ``loss`` (cross-entropy, no label smoothing), ``accuracy`` (top-1), ``top5`` (only
  with more than 5 classes: with 5 or fewer it is always 1.0 and says nothing),
  ``confusion_matrix`` (list of lists, rows = true class), ``per_class`` precision / recall / F1 /
  support and their macro averages;
* regression: ``loss`` (MSE or L1 as trained), ``mae``, ``rmse``, ``r2`` (mean over targets) and
  per-target values.

Under torchrun each rank evaluates a contiguous shard and the sums are all-reduced, so every rank
returns the numbers for the whole split.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..train.distributed import DistInfo, all_reduce_sum
from ..train.metrics import classification_report, confusion_matrix, regression_report, regression_stats


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel of a (B, C, H, W) batch."""
    m, s = _norm_consts(tuple(float(v) for v in mean), tuple(float(v) for v in std), x.device, x.dtype)
    return (x - m) / s


@functools.lru_cache(maxsize=32)
def _norm_consts(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1, C, 1, 1) constants on ``device``, made once: building them from a list every batch
    copies host memory to the GPU synchronously, a host sync per training step."""
    m = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1).to(device)
    s = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1).to(device)
    return m, s


@torch.no_grad()
def evaluate(model, data, *, task: str = "classification", num_outputs: int, mean, std,
             batch_size: int = 256, device: str | torch.device = "cpu", dist: DistInfo | None = None,
             regression_loss: str = "mse", labels: list[str] | None = None, progress: bool = False,
             amp_dtype: torch.dtype | None = None, workers: int | None = 0, forward=None) -> dict[str, Any]:
    """``forward``: what computes the outputs, default ``model`` itself; ``vitkit eval --dtype``
    passes ``vitkit.infer.Predictor(model, dtype)`` (fp32 engine, bf16 or int8)."""
    from ..progress import progress_bar
    from ..train.data import eval_loader

    dist = dist or DistInfo()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if isinstance(data, torch.utils.data.Dataset):
        data = eval_loader(data, batch_size, dist=dist, workers=workers, device_type=device.type)
    # sums stay on the device: one host sync at the end, not one per batch
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.float64, device=device)
    cm = torch.zeros(num_outputs, num_outputs, dtype=torch.int64, device=device)
    rstats = None
    for batch in progress_bar(data, desc="eval", leave=False, disable=not progress):
        if batch is None:  # every image of the batch skipped (--skip-bad-images)
            continue
        x, y = batch
        x = normalize(x.to(device, non_blocking=True), mean, std)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = (forward or model)(x)
        out = out.float()
        if task == "classification":
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            k = min(5, out.shape[1])
            top5 += (out.topk(k, dim=1).indices == y[:, None]).any(1).sum()
            cm += confusion_matrix(out.argmax(1), y, num_outputs)
        else:
            y = y.float().view_as(out)
            fn = F.mse_loss if regression_loss == "mse" else F.l1_loss
            loss_sum += fn(out, y, reduction="sum").double() / out.shape[1]
            s = regression_stats(out, y)
            rstats = s if rstats is None else rstats + s
        count += len(x)
    all_reduce_sum(loss_sum, dist)
    all_reduce_sum(count, dist)
    if was_training:
        model.train()
    total = max(float(count), 1.0)
    result: dict[str, Any] = {"loss": float(loss_sum) / total, "count": int(count)}
    if task == "classification":
        all_reduce_sum(top5, dist)
        all_reduce_sum(cm, dist)
        rep = classification_report(cm.cpu(), labels)
        result.update(accuracy=rep["accuracy"], top5=float(top5) / total if num_outputs > 5 else None,
                      macro_f1=rep["macro_f1"],
                      macro_precision=rep["macro_precision"], macro_recall=rep["macro_recall"],
                      per_class=rep["per_class"], confusion_matrix=cm.cpu().tolist())
    else:
        if rstats is None:
            rstats = torch.zeros(5, num_outputs, dtype=torch.float64, device=device)
        all_reduce_sum(rstats, dist)
        result.update(regression_report(rstats.cpu()))
        if labels:
            for r, name in zip(result["per_target"], labels):
                r["target"] = name
    return result


def evaluate_model(model, splits, split: str = "test", **kw) -> dict[str, Any]:
    """Evaluate a vitkit model on one split of :func:`vitkit.data.build_data`'s result, with the
    model's own preprocessing mean/std when it has them."""
    pre = getattr(model, "preprocess_cfg", None) or {}
    get = pre.get if isinstance(pre, dict) else (lambda k, d: getattr(pre, k, None) or d)
    ds = getattr(splits, split)
    if ds is None:
        raise ConfigError(f"dataset {splits.name!r} has no {split} split")
    return evaluate(model, ds, task=splits.task, num_outputs=splits.num_outputs,
                    mean=get("mean", splits.mean), std=get("std", splits.std), labels=splits.classes, **kw)
