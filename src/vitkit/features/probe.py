"""Linear probe: multinomial logistic regression (scikit-learn) on frozen features.

The inverse regularisation strength C is chosen from a small sweep by top-1 accuracy on the
validation split (the first best wins, so ties go to the stronger regularisation); the model fit on
train with that C is scored on the test split. C is never chosen on the split that is scored: data
without a validation split gets one held out from train (:mod:`vitkit.data.validation`), and data
without a test split is scored on its validation split with C chosen on a part of train held out
by the same helper. The result names both (``select_split``, ``split``).
"""

from __future__ import annotations

import numpy as np

from .knn import require_classes, topk_accuracy, topk_report

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)


def _full_proba(clf, x: np.ndarray, num_classes: int) -> np.ndarray:
    """predict_proba widened to every class (a class absent from train gets probability 0)."""
    p = clf.predict_proba(x)
    if p.shape[1] == num_classes:
        return p
    full = np.zeros((len(x), num_classes), dtype=p.dtype)
    full[:, clf.classes_] = p
    return full


def fit_probe(train_x, train_y, C: float, max_iter: int = 1000, seed: int = 0):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(train_x, train_y)


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, num_classes: int, Cs=DEFAULT_CS,
                 max_iter: int = 1000) -> dict:
    """{"top1", "top5", "C", "sweep": [{"C", "val_top1"}]} (see the module docstring; "top5" is None
    with 5 classes or fewer)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    require_classes(train_y, None, "the linear probe")
    sweep, best, best_clf = [], None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported per C below instead
        for C in Cs:
            clf = fit_probe(train_x, train_y, C, max_iter)
            acc = topk_accuracy(_full_proba(clf, val_x, num_classes), val_y, ks=(1,))["top1"]
            sweep.append({"C": float(C), "val_top1": acc, "converged": bool(np.all(clf.n_iter_ < max_iter))})
            if best is None or acc > best["val_top1"]:
                best, best_clf = sweep[-1], clf
    res = topk_report(_full_proba(best_clf, test_x, num_classes), test_y, num_classes)
    return {**res, "C": best["C"], "val_top1": best["val_top1"], "sweep": sweep}


def probe_on_dataset(model, dataset: str, *, data_dir: str | None = None, Cs=DEFAULT_CS, spec=None,
                     batch_size: int = 64, workers: int = 0, progress: bool = True, max_iter: int = 1000,
                     **dataset_options) -> dict:
    """Linear-probe accuracy of a model's features: fit on train, C chosen on the validation split,
    scored on the test split (see the module docstring for data without either)."""
    from ..data import DataSpec
    from ..data.validation import HELD_OUT, holdout_indices
    from .embed import labelled_features, split_features
    from .extract import FeatureSpec

    feats, splits = labelled_features(model, dataset, data_dir=data_dir, want=("train", "val"), spec=spec,
                                      batch_size=batch_size, workers=workers, progress=progress, **dataset_options)
    (tx, ty, _), (vx, vy, _) = feats["train"], feats["val"]
    require_classes(ty, splits.classes, "the linear probe")
    if splits.test is splits.val:  # no test split: val is scored, so C is chosen on a part of train
        d = DataSpec(**{k: v for k, v in dataset_options.items() if k in ("val_fraction", "seed")})
        tr, va = holdout_indices(ty, d.val_fraction, d.seed, f"{dataset} (the probe's C)")
        (tx, ty), sel, (ex, ey), select_split = (tx[tr], ty[tr]), (tx[va], ty[va]), (vx, vy), HELD_OUT
    else:
        feats["test"] = split_features(model, splits, "test", spec=spec or FeatureSpec(), batch_size=batch_size,
                                       workers=workers, progress=progress)
        sel, (ex, ey, _), select_split = (vx, vy), feats["test"], splits.val_name
    res = linear_probe(tx, ty, sel[0], sel[1], ex, ey, len(splits.classes), Cs=Cs, max_iter=max_iter)
    skipped = [p for v in feats.values() for p, _ in v[2]]
    return {**res, "split": splits.test_name, "select_split": select_split, "train_count": len(tx),
            "count": len(ex), "skipped": skipped}
