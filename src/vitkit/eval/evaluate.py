"""Evaluate a model on a dataset split.

``evaluate(model, data, ...)`` runs the model over ``data`` (a dataset split, read through
:func:`eval_loader`, or an iterable of ``(x, y)`` batches in [0, 1]) and returns plain numbers:

* classification: ``loss`` (cross-entropy, no label smoothing), ``accuracy`` (top-1), ``top5`` (only
  with more than 5 classes: with 5 or fewer it is always 1.0 and says nothing),
  ``confusion_matrix`` (list of lists, rows = true class), ``per_class`` precision / recall / F1 /
  support and their macro averages;
* regression: ``loss`` (MSE or L1 as trained), ``mae``, ``rmse``, ``r2`` (mean over targets) and
  per-target values.

Under torchrun each rank evaluates a contiguous shard and the sums are all-reduced, so every rank
returns the numbers for the whole split.

``evaluate_model`` matches the data's classes to the model's labels by name first
(:func:`vitkit.data.labels.match_labels`): the targets are read in the model's output order, so a
folder whose class names sort differently scores the same as one that sorts like the model.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from ..data import make_loader
from ..distributed import DistInfo, all_reduce_sum
from ..errors import ConfigError
from .metrics import classification_report, confusion_matrix, regression_report, regression_stats


def eval_loader(dataset, batch_size: int, *, dist: DistInfo | None = None, workers: int | None = 0,
                device_type: str = "cpu"):
    """In order, this rank's contiguous shard of ``dataset``, every sample once (no drop_last), as
    floats in [0, 1]: the caller normalises on the device."""
    dist = dist or DistInfo()
    return make_loader(dataset, batch_size=batch_size, train=False, workers=workers, rank=dist.rank,
                       world_size=dist.world_size, device_type=device_type, drop_last=False, normalize=False)


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
             amp_dtype: torch.dtype | None = None, workers: int | None = 0, forward=None,
             target_map=None) -> dict[str, Any]:
    """``forward``: what computes the outputs, default ``model`` itself; ``vitkit eval --dtype``
    passes ``vitkit.infer.Predictor(model, dtype)`` (fp32 engine, bf16 or int8). ``target_map``:
    the model output of each data class (``LabelMatch.index``), when they differ."""
    from ..progress import progress_bar

    dist = dist or DistInfo()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if isinstance(data, torch.utils.data.Dataset):
        data = eval_loader(data, batch_size, dist=dist, workers=workers, device_type=device.type)
    sums = _Sums(task, num_outputs, device)
    if target_map is not None:
        target_map = torch.as_tensor(target_map, dtype=torch.long, device=device)
    for batch in progress_bar(data, desc="eval", leave=False, disable=not progress):
        if batch is None:  # every image of the batch skipped (--skip-bad-images)
            continue
        x, y = batch
        x = normalize(x.to(device, non_blocking=True), mean, std)
        y = y.to(device, non_blocking=True)
        if target_map is not None:
            y = target_map[y]  # data class -> the model output of that name
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = (forward or model)(x)
        sums.add(out.float(), y, regression_loss)
    if was_training:
        model.train()
    return sums.report(dist, labels)


class _Sums:
    """The sufficient statistics of an evaluation, on the device: one host sync at the end, not one
    per batch; all-reduced over the ranks before the report."""

    def __init__(self, task: str, num_outputs: int, device: torch.device):
        self.task, self.num_outputs = task, num_outputs
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        self.loss, self.count, self.top5 = zero(), zero(), zero()
        self.cm = torch.zeros(num_outputs, num_outputs, dtype=torch.int64, device=device)
        self.rstats = torch.zeros(5, num_outputs, dtype=torch.float64, device=device)

    def add(self, out: torch.Tensor, y: torch.Tensor, regression_loss: str) -> None:
        """One batch: ``out`` (B, K) float, ``y`` (B,) class ids or (B, T) targets."""
        if self.task == "classification":
            self.loss += F.cross_entropy(out, y, reduction="sum").double()
            k = min(5, out.shape[1])
            self.top5 += (out.topk(k, dim=1).indices == y[:, None]).any(1).sum()
            self.cm += confusion_matrix(out.argmax(1), y, self.num_outputs)
        else:
            y = y.float().view_as(out)
            fn = F.mse_loss if regression_loss == "mse" else F.l1_loss
            self.loss += fn(out, y, reduction="sum").double() / out.shape[1]
            self.rstats += regression_stats(out, y)
        self.count += len(out)

    def report(self, dist: DistInfo, labels: list[str] | None) -> dict[str, Any]:
        all_reduce_sum(self.loss, dist)
        all_reduce_sum(self.count, dist)
        total = max(float(self.count), 1.0)
        result: dict[str, Any] = {"loss": float(self.loss) / total, "count": int(self.count)}
        if self.task == "classification":
            all_reduce_sum(self.top5, dist)
            all_reduce_sum(self.cm, dist)
            rep = classification_report(self.cm.cpu(), labels)
            result.update(accuracy=rep["accuracy"], top5=float(self.top5) / total if self.num_outputs > 5 else None,
                          macro_f1=rep["macro_f1"], macro_precision=rep["macro_precision"],
                          macro_recall=rep["macro_recall"], per_class=rep["per_class"],
                          confusion_matrix=self.cm.cpu().tolist())
        else:
            all_reduce_sum(self.rstats, dist)
            result.update(regression_report(self.rstats.cpu()))
            if labels:
                for r, name in zip(result["per_target"], labels):
                    r["target"] = name
        return result


def evaluate_model(model, splits, split: str = "test", label_map: dict[str, str] | None = None,
                   **kw) -> dict[str, Any]:
    """Evaluate a vitkit model on one split of :func:`vitkit.data.build_data`'s result, with the
    model's own preprocessing mean/std when it has them. Classification: the data's classes matched
    to ``model.labels`` by name (``label_map``: {data class: model label} where they differ); the
    result's ``labels`` name the confusion matrix's rows (the model's outputs), ``label_match``
    says how they were matched, ``label_note`` is a line to show (or None). ``split`` is the split
    really read (``val`` / ``train-holdout`` when the data has no test split: ``splits.test_name``)."""
    from ..data.labels import match_labels

    pre = getattr(model, "preprocess_cfg", None) or {}
    get = pre.get if isinstance(pre, dict) else (lambda k, d: getattr(pre, k, None) or d)
    ds = getattr(splits, split)
    if ds is None:
        raise ConfigError(f"dataset {splits.name!r} has no {split} split")
    real = {"test": splits.test_name, "val": splits.val_name}.get(split, split)
    c = model.config
    if pre and not getattr(ds, "in_memory", False):
        # image files go through the model's own resize / crop / interpolation, as `vitkit predict` and
        # the run's validation read them (in-memory tensors keep the batch resize they were trained with)
        from ..preprocess import Preprocess

        ds.model_preprocess = Preprocess.coerce(pre).for_input(c.in_channels, tuple(ds.image_hw))
    if splits.task != "classification":
        if splits.num_outputs != c.num_classes:
            raise ConfigError(f"model has {c.num_classes} outputs, {splits.name} has {splits.num_outputs} targets")
        r = evaluate(model, ds, task=splits.task, num_outputs=splits.num_outputs, mean=get("mean", splits.mean),
                     std=get("std", splits.std), labels=splits.classes, **kw)
        return {"split": real, **r}
    match = match_labels(getattr(model, "labels", None), splits.classes, label_map, num_outputs=c.num_classes)
    labels = list(model.labels) if match.by != "position" else list(splits.classes)
    r = evaluate(model, ds, task=splits.task, num_outputs=c.num_classes, mean=get("mean", splits.mean),
                 std=get("std", splits.std), labels=labels, target_map=None if match.identity else match.index, **kw)
    return {"split": real, **r, "labels": labels, "label_match": match.by, "label_note": match.note}
