"""Metrics from sufficient statistics (so they can be summed across batches and ranks).

Classification: a confusion matrix ``cm[true, pred]`` gives accuracy and per-class precision,
recall and F1 (sklearn's definitions; 0 where undefined). Regression: per-target sums of
|e|, e^2, y, y^2 and the count give MAE, RMSE and R^2 = 1 - SSE / SST.
"""

from __future__ import annotations

from typing import Any

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts, rows = true class, columns = prediction. Accumulated into a fixed-size tensor:
    ``torch.bincount`` reads the largest index on the host (a sync per batch on a GPU)."""
    idx = (target.long() * num_classes + pred.long()).flatten()
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=idx.device)
    return cm.index_add_(0, idx, torch.ones_like(idx)).reshape(num_classes, num_classes)


def classification_report(cm: torch.Tensor, labels: list[str] | None = None) -> dict[str, Any]:
    cm = cm.double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    n = len(tp)
    labels = labels or [str(i) for i in range(n)]
    per_class = [{"label": labels[i], "precision": float(precision[i]), "recall": float(recall[i]),
                  "f1": float(f1[i]), "support": int(support[i])} for i in range(n)]
    total = float(cm.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()), "per_class": per_class,
    }


def regression_stats(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(5, T) sums: |e|, e^2, y, y^2, count."""
    pred, target = pred.double().reshape(len(pred), -1), target.double().reshape(len(target), -1)
    e = pred - target
    n = torch.full_like(target[0], float(len(target)))
    return torch.stack([e.abs().sum(0), (e * e).sum(0), target.sum(0), (target * target).sum(0), n])


def regression_report(stats: torch.Tensor) -> dict[str, Any]:
    abs_e, sq_e, y, y2, n = stats.double()
    n = n.clamp(min=1)
    sst = y2 - y * y / n
    r2 = torch.where(sst > 0, 1 - sq_e / sst.clamp(min=1e-12), torch.zeros_like(sst))
    mae, rmse = abs_e / n, (sq_e / n).sqrt()
    return {"mae": float(mae.mean()), "rmse": float(rmse.mean()), "r2": float(r2.mean()),
            "per_target": [{"mae": float(a), "rmse": float(b), "r2": float(c)} for a, b, c in zip(mae, rmse, r2)]}
