"""Linear probe: multinomial logistic regression (scikit-learn) on frozen features.

The inverse regularisation strength C is chosen from a small sweep by top-1 accuracy on the
validation split (the first best wins, so ties go to the stronger regularisation); the model fit on
train with that C is scored on the test split.
"""

from __future__ import annotations

import numpy as np

from .knn import topk_accuracy

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
    """{"top1", "top5", "C", "sweep": [{"C", "val_top1"}]} (see the module docstring)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    sweep, best, best_clf = [], None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported per C below instead
        for C in Cs:
            clf = fit_probe(train_x, train_y, C, max_iter)
            acc = topk_accuracy(_full_proba(clf, val_x, num_classes), val_y, ks=(1,))["top1"]
            sweep.append({"C": float(C), "val_top1": acc, "converged": bool(np.all(clf.n_iter_ < max_iter))})
            if best is None or acc > best["val_top1"]:
                best, best_clf = sweep[-1], clf
    res = topk_accuracy(_full_proba(best_clf, test_x, num_classes), test_y)
    return {**res, "C": best["C"], "val_top1": best["val_top1"], "sweep": sweep}


def probe_on_dataset(model, dataset: str, *, data_dir: str | None = None, Cs=DEFAULT_CS, spec=None,
                     batch_size: int = 64, workers: int = 0, progress: bool = True, max_iter: int = 1000,
                     **dataset_options) -> dict:
    """Linear-probe accuracy of a model's features: fit on train, C chosen on val, scored on test
    (val doubles as test when the dataset has no test split, and the result says so)."""
    from ..errors import InputError
    from .embed import labelled_features

    feats, splits = labelled_features(model, dataset, data_dir=data_dir, spec=spec, batch_size=batch_size,
                                      workers=workers, progress=progress, **dataset_options)
    if "train" not in feats or ("val" not in feats and "test" not in feats):
        raise InputError(f"{dataset}: the linear probe needs a train split and a val or test split")
    val = feats.get("val") or feats["test"]
    test_split = "test" if "test" in feats else "val"
    test = feats[test_split]
    res = linear_probe(feats["train"][0], feats["train"][1], val[0], val[1], test[0], test[1],
                       len(splits.classes), Cs=Cs, max_iter=max_iter)
    skipped = [p for v in feats.values() for p, _ in v[2]]
    return {**res, "split": test_split, "train_count": len(feats["train"][0]), "count": len(test[0]),
            "skipped": skipped}
