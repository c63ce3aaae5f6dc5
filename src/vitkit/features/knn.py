"""Weighted k-NN classification on frozen features (DINO, Caron et al. 2021, ``eval_knn.py``).

Features are L2-normalised; for each test vector the k most similar training vectors (cosine
similarity s) vote for their class with weight exp(s / T); the class scores rank the
predictions (top-1, and top-5 with more than 5 classes: with 5 or fewer it counts any vote, and
is 1.0 for the probe's probabilities, so it says nothing). One class is refused: every prediction
would be right.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError


@torch.no_grad()
def knn_scores(train_x, train_y, test_x, num_classes: int, k: int = 20, temperature: float = 0.07,
               chunk: int = 256) -> torch.Tensor:
    """Class scores (Q, C): sum over the k nearest training vectors of exp(sim / T) per class."""
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    train = F.normalize(torch.as_tensor(np.asarray(train_x), dtype=torch.float32), dim=1)
    test = F.normalize(torch.as_tensor(np.asarray(test_x), dtype=torch.float32), dim=1)
    labels = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    k = min(k, len(train))
    out = []
    for s in range(0, len(test), chunk):  # bounded (chunk, N_train) similarity block
        sim = test[s:s + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)  # (q, k)
        weights = (top_sim / temperature).exp()
        scores = torch.zeros(len(sim), num_classes)
        scores.scatter_add_(1, labels[top_idx], weights)
        out.append(scores)
    return torch.cat(out)


def topk_accuracy(scores, targets, ks=(1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ...} from class scores (Q, C) and true classes (Q,).

    A hit at k: fewer than k classes score higher than the true class, and the true class scores
    above 0 (a class no neighbour voted for is not a prediction, whatever a sort's tie order says;
    probabilities are always above 0)."""
    scores = torch.as_tensor(np.asarray(scores))
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    true = scores.gather(1, targets[:, None])  # (Q, 1)
    higher = (scores > true).sum(1)
    res = {}
    for k in ks:
        res[f"top{k}"] = float(((higher < k) & (true[:, 0] > 0)).double().mean())
    return res


def topk_report(scores, targets, num_classes: int) -> dict:
    """{"top1", "top5"}; with 5 classes or fewer "top5" is None and "top5_note" says why."""
    if num_classes > 5:
        return topk_accuracy(scores, targets)
    return {**topk_accuracy(scores, targets, ks=(1,)), "top5": None,
            "top5_note": f"top-5 is reported with more than 5 classes; the data has {num_classes}"}


def require_classes(train_y, classes: list[str] | None, what: str) -> None:
    """Refuse training labels of fewer than two classes (``classes``: names, for the message)."""
    present = np.unique(np.asarray(train_y))
    if len(present) < 2:
        named = [classes[int(c)] for c in present] if classes else present.tolist()
        raise InputError(f"{what} needs training samples of at least 2 classes; the train split has "
                         f"{len(present)}: {named}")


def knn_evaluate(train_x, train_y, test_x, test_y, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> dict:
    require_classes(train_y, None, "k-NN")
    scores = knn_scores(train_x, train_y, test_x, num_classes, k=k, temperature=temperature)
    return topk_report(scores, test_y, num_classes)


def knn_on_dataset(model, dataset: str, *, data_dir: str | None = None, k: int = 20, temperature: float = 0.07,
                   spec=None, batch_size: int = 64, workers: int = 0, progress: bool = True,
                   **dataset_options) -> dict:
    """k-NN accuracy of a model's features: the train split is the memory, the test split is
    scored (the validation split when the data has none: ``split`` names the one read, as
    :mod:`vitkit.data.validation` set it up for every command)."""
    from .embed import labelled_features

    feats, splits = labelled_features(model, dataset, data_dir=data_dir, want=("train", "test"), spec=spec,
                                      batch_size=batch_size, workers=workers, progress=progress, **dataset_options)
    (tx, ty, s1), (ex, ey, s2) = feats["train"], feats["test"]
    require_classes(ty, splits.classes, "k-NN")
    res = knn_evaluate(tx, ty, ex, ey, len(splits.classes), k=k, temperature=temperature)
    return {**res, "k": min(k, len(tx)), "temperature": temperature, "split": splits.test_name,
            "train_count": len(tx), "count": len(ex), "skipped": [p for p, _ in s1 + s2]}
