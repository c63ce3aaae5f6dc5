"""The one validation-split helper: where data has no validation split of its own, a stratified,
seeded part of train is held out for it, never the test split (choosing anything on the test
split, an epoch or a probe's C, makes its numbers optimistic). imagefolder and Hugging Face data
call :func:`hold_out` (datasets) / :func:`holdout_indices` (arrays of labels), and so does the
linear probe when it needs a split to choose C on; ``DataSplits.val_name`` / ``test_name`` record
which split each role really reads, so every report (train, eval, knn, probe) names it. The other
datasets: digits has a fixed three-way split; mnist / cifar hold out the same stratified, seeded
fraction, cut as it always was so existing runs resume on their split; csv regression cuts
train / val / test from its rows; webdataset needs val shards (a stream cannot be cut by index).

Split names in reports: ``train``, ``val``, ``test``, and ``train-holdout`` for the part of train
held out here.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

HELD_OUT = "train-holdout"


def stratified_split(targets: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split indices into len(fractions)+1 parts, class by class (sizes rounded per class, at least one
    when the fraction is > 0 and the class can spare it), seeded."""
    rng = np.random.RandomState(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        start = 0
        for k, f in enumerate(fractions):
            n = int(round(f * len(idx)))
            if n == 0 and f > 0 and len(idx) - start >= 2:  # tiny classes: hold out one rather than none
                n = 1
            parts[k].extend(idx[start:start + n].tolist())
            start += n
        parts[-1].extend(idx[start:].tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def holdout_indices(targets, fraction: float, seed: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of ``targets``: ``fraction`` of each class, seeded (at least
    one per class that has two or more); an error when that holds nothing out."""
    y = np.asarray(targets)
    va, tr = stratified_split(y, [fraction], seed)
    if not len(va) or not len(tr):
        raise InputError(f"{where}: no validation split, and --val-fraction {fraction} of {len(y)} training "
                         "samples holds none out: add a validation split or raise --val-fraction")
    return tr, va


def hold_out(train, fraction: float, seed: int, where: str):
    """(train, val, note): a split dataset (anything with ``targets`` and ``subset``) cut by
    :func:`holdout_indices`; the note is the line reports print. (Streamed shards cannot be cut
    this way: webdataset data needs val-*.tar shards.)"""
    tr, va = holdout_indices(train.targets, fraction, seed, where)
    val = train.subset(va)
    if hasattr(val, "split"):
        val.split = "validation"
    return train.subset(tr), val, holdout_note(where, fraction, seed, len(va), len(tr) + len(va))


def holdout_note(where: str, fraction: float, seed: int, n_val: int, n_train: int) -> str:
    return (f"{where}: no validation split; {n_val} of {n_train} training samples ({fraction:.0%} per class, "
            f"seed {seed}) held out for validation ('{HELD_OUT}')")
