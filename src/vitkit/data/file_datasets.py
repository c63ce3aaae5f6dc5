"""The datasets of image files listed on disk (:class:`~vitkit.data.datasets.FileImageDataset`):

* ``imagefolder``: ``<data_dir>/train/<class>/*.png|jpg...`` plus ``val/`` and/or ``test/``; or a flat
  ``<data_dir>/<class>/*`` (the training set; validation held out from it, no test split).
* ``csv`` (regression): a CSV with a header, the first column an image path (relative to the
  CSV's folder), then one or more float target columns.

Both are checked before training: evaluation images are opened (their headers) by
:func:`check_files`, so a bad file stops the run before the first step (or, with
``--skip-bad-images``, is logged and left out).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .datasets import (
    IMAGE_EXTENSIONS,
    UNLABELLED,
    DataSplits,
    FileImageDataset,
    list_images,
    need_dir,
    resolve_hw,
)
from .validation import HELD_OUT, hold_out

log = logging.getLogger("vitkit.data")


def build_imagefolder(cfg) -> DataSplits:
    """``DIR/train/<class>/*``, ``DIR/val/<class>/*``, ``DIR/test/<class>/*`` (without val/, a validation
    split held out from train: :mod:`vitkit.data.validation`; test/ is never used to validate). Checked
    before training: class folders of val/ and test/ must be training classes; an empty class folder is
    refused unless ``allow_empty_classes`` (it would be a class the model can never learn)."""
    root = need_dir(cfg)
    notes: list[str] = []
    train_dir = _train_dir(root, notes)
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"imagefolder: {train_dir} has no class sub-folders")
    tr_paths, tr_y, empty = _scan_classes(train_dir, classes)
    if not tr_paths:
        raise InputError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {train_dir}")
    if empty:
        _allow_empty(empty, cfg.allow_empty_classes, notes)
    hw, size_note, from_data = resolve_hw(cfg, paths=tr_paths)  # every training image (before a val split) may be probed
    splits = {}
    for s in ("val", "test"):
        if (root / s).is_dir():
            p, y, _ = _scan_classes(root / s, classes)
            if not p:
                raise InputError(f"imagefolder: {root / s} holds no images; remove it or add images per class")
            splits[s] = (p, y)
    mk = lambda split, p, y: FileImageDataset(p, y, hw, "RGB", cfg.skip_bad_images, split=split)  # noqa: E731
    train, val_name = mk("train", tr_paths, tr_y), "val"
    if "val" in splits:
        val = mk("validation", *splits["val"])
    else:  # never validate on test/: hold out part of train
        train, val, note = hold_out(train, cfg.val_fraction, cfg.seed, f"imagefolder {root}")
        val_name = HELD_OUT
        notes.append(note)
    mean, std = [0.5] * 3, [0.5] * 3  # fixed: avoids a full pass over the files
    test = mk("test", *splits["test"]) if "test" in splits else None
    skipped: list[str] = []
    if cfg.check_files:
        # Evaluation images are opened (headers) now, so a bad one stops the run before the first step,
        # not after an epoch or at the final test. Training images are checked as the workers read them.
        where = lambda k: "imagefolder: "  # noqa: E731
        val = check_files(val, "validation", where, cfg.skip_bad_images, skipped)
        if test is not None:
            test = check_files(test, "test", where, cfg.skip_bad_images, skipped)
    return DataSplits(name="imagefolder", train=train, val=val, test=test, val_name=val_name,
                      task="classification", num_outputs=len(classes), in_channels=3, image_hw=hw, classes=classes,
                      mean=mean, std=std, hflip_ok=True, notes=notes, size_note=size_note, size_from_data=from_data,
                      skipped_files=skipped)


def _train_dir(root: Path, notes: list[str]) -> Path:
    """``root/train``, or ``root`` itself when it is a flat folder of class folders (noted)."""
    train_dir = root / "train"
    if train_dir.is_dir():
        return train_dir
    # A flat DIR/<class>/ folder (no train/, val/, test/) is the training set; validation is held out later.
    if not root.is_dir() or any((root / s).is_dir() for s in ("val", "test")) or \
            not any(d.is_dir() for d in root.iterdir()):
        raise InputError(f"imagefolder: expected {train_dir} with one sub-folder per class (and val/ or test/), "
                         f"or class sub-folders directly in {root}")
    notes.append(f"imagefolder: no train/ in {root}; its class folders are the training set")
    return root


def _scan_classes(split_dir: Path, classes: list[str]) -> tuple[list[Path], torch.Tensor, list[Path]]:
    """(image paths, their class ids, the class folders without images) of one split folder; a class
    folder that is not a training class is an error."""
    paths, labels, empty = [], [], []
    for d in sorted(x for x in split_dir.iterdir() if x.is_dir()):
        if d.name not in classes:
            raise InputError(f"imagefolder: class folder {d} is not among the training classes {classes} "
                             "(every class must have training images)")
        files = list_images(d)
        if not files:
            empty.append(d)
        paths += files
        labels += [classes.index(d.name)] * len(files)
    return paths, torch.tensor(labels, dtype=torch.long), empty


def _allow_empty(empty: list[Path], allowed: bool, notes: list[str]) -> None:
    names = ", ".join(str(d) for d in empty)
    if not allowed:
        raise InputError(f"imagefolder: class folder(s) without images: {names}. Each would become a class the "
                         "model never sees; remove them, add images, or pass --allow-empty-classes")
    log.warning("imagefolder: empty class folder(s) kept as classes: %s", names)
    notes.append(f"imagefolder: empty class folder(s) kept as classes (--allow-empty-classes): {names}")


def _csv_rows(path: Path, cfg):
    """(paths, targets (N, T) float, target column names, line numbers), every row checked. The
    delimiter (, ; tab |) is sniffed from the header line: spreadsheets in many locales write ';'."""
    with open(path, newline="") as f:
        text = f.read()
    try:
        delimiter = csv.Sniffer().sniff(text.partition("\n")[0], delimiters=",;\t|").delimiter
    except csv.Error:  # a single column: nothing to tell the delimiter by
        delimiter = ","
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    if len(rows) < 2:
        raise InputError(f"csv: {path} needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    cols = [c.strip() for c in cfg.target_columns.split(",")] if cfg.target_columns else header[1:]
    missing = [c for c in cols if c not in header]
    if missing or not cols:
        raise InputError(f"csv: target column(s) {missing or cols} not in header {header} (columns split at "
                         f"{delimiter!r}; expected the image path first, then the target columns)")
    ci = [header.index(c) for c in cols]
    base = path.parent.resolve()
    paths, targets, lines = [], [], []
    for n, r in enumerate(rows[1:], start=2):
        if not r or not any(c.strip() for c in r):
            continue
        try:
            t = [float(r[i]) for i in ci]
        except (ValueError, IndexError):
            raise InputError(f"csv: {path} line {n}: expected numbers in columns {cols}, got {r}") from None
        if not all(math.isfinite(v) for v in t):
            raise InputError(f"csv: {path} line {n}: target(s) {dict(zip(cols, t))} not finite (nan / inf); "
                             "fix or remove the row")
        raw = r[0].strip()
        p = Path(raw)
        full = (p if p.is_absolute() else path.parent / p).resolve()
        if not cfg.allow_absolute_paths and (p.is_absolute() or not full.is_relative_to(base)):
            raise InputError(f"csv: {path} line {n}: image path {raw!r} is outside the CSV's folder {base}; "
                             "use paths relative to it, or pass --allow-absolute-paths to read it anyway")
        paths.append(full)
        targets.append(t)
        lines.append(n)
    if not paths:
        raise InputError(f"csv: {path} has no data rows")
    return paths, torch.tensor(targets, dtype=torch.float32), cols, lines


def check_files(ds: FileImageDataset, split: str, where, skip: bool, skipped: list[str]):
    """Open every file's header before training: a bad file stops here, named with ``where(k)`` (its
    dataset and line) and its split, or with ``skip`` is logged, recorded and left out."""
    from .files import file_header

    keep = []
    for k, p in enumerate(ds.paths):
        try:
            file_header(p)
            keep.append(k)
        except InputError as e:
            msg = f"{where(k)}{split} image {e}"
            if not skip:
                raise InputError(msg + " (--skip-bad-images leaves such files out)") from None
            log.warning("skipping %s", msg)
            skipped.append(str(p))
    return ds if len(keep) == len(ds) else ds.subset(keep)


def add_unlabeled(data: DataSplits, folder: str) -> str:
    """``data.train`` with every image under ``folder`` appended as :data:`UNLABELLED` (``vitkit train --teacher
    SRC --unlabeled DIR``: the teacher's outputs are their only target). Refused: data that is not image files
    with classes, a folder without images, images that are validation or test images, by path or as byte-identical
    copies (they would leak into training); training images listed again are left out. Returns the line the run logs."""
    train = data.train
    if data.task != "classification" or not isinstance(train, FileImageDataset):
        raise ConfigError(f"--unlabeled adds image files to a classification training set read from image files "
                          f"(--dataset imagefolder); --dataset {data.name} is {data.task} data held as "
                          f"{type(train).__name__}")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputError(f"--unlabeled {folder}: no such folder")
    paths = list_images(root)
    if not paths:
        raise InputError(f"--unlabeled {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) under it")
    held = {p.resolve(): name for name, ds in (("validation", data.val), ("test", data.test))
            if isinstance(ds, FileImageDataset) for p in ds.paths}
    real = {p: p.resolve() for p in paths}
    copies = _same_bytes(real, held)  # a copy of an evaluation image elsewhere is the same leak
    leaks = [p for p in paths if real[p] in held or p in copies]
    if leaks:
        kinds = [held.get(real[p]) or copies[p] for p in leaks]
        which = ", ".join(f"{kinds.count(k)} {k}" for k in ("validation", "test") if k in kinds)
        raise InputError(f"--unlabeled {folder}: {len(leaks)} of its {len(paths)} images are evaluation images ({which}; "
                         f"e.g. {leaks[0]}): training on them would leak the evaluation; give a folder without them")
    known = {p.resolve() for p in train.paths}
    new = [p for p in paths if real[p] not in known]
    if not new:
        raise InputError(f"--unlabeled {folder}: all of its {len(paths)} images are training images already")
    data.train = train.extended(new, UNLABELLED)
    again = len(paths) - len(new)
    return (f"unlabeled: {len(new)} images from {folder}, the teacher's outputs their only target; an epoch is "
            f"{len(train)} labelled + {len(new)} unlabelled images"
            + (f" ({again} of the folder's images are training images already: left out)" if again else ""))


def _same_bytes(paths: dict[Path, Path], held: dict[Path, str]) -> dict[Path, str]:
    """Which of ``paths`` (path -> resolved) hold the same bytes as a file of ``held`` (resolved path -> its
    split) at another path: only files of a size some held file has are read, each held file once."""
    import hashlib

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    sizes: dict[int, list[Path]] = {}
    for h in held:
        sizes.setdefault(h.stat().st_size, []).append(h)
    unhashed = dict(sizes)  # sizes whose held files are not hashed yet
    by_hash: dict[str, str] = {}
    out = {}
    for p, real in paths.items():
        size = p.stat().st_size
        if size not in sizes or real in held:
            continue
        for h in unhashed.pop(size, []):  # the held files of this size, hashed the first time it comes
            by_hash.setdefault(digest(h), held[h])
        split = by_hash.get(digest(p))
        if split:
            out[p] = split
    return out


def build_csv(cfg) -> DataSplits:
    """Regression from a CSV: a header, the image path first (relative to the CSV's folder), then one
    or more numeric targets. Checked before training: every target finite, every path inside the
    CSV's folder (unless ``allow_absolute_paths``), every image opens (its header)."""
    path = need_dir(cfg)
    if path.is_dir():
        found = sorted(path.glob("*.csv"))
        if len(found) != 1:
            raise InputError(f"csv: {path} holds {len(found)} .csv files; pass the CSV file itself as --data-dir")
        path = found[0]
    if not path.is_file():
        raise InputError(f"csv: {path}: no such file")
    paths, y, cols, lines = _csv_rows(path, cfg)
    # seeded random split: val_fraction for validation, the same again for test (>= 1 row each)
    perm = np.random.RandomState(cfg.seed).permutation(len(y))
    n_hold = max(1, int(round(cfg.val_fraction * len(y)))) if len(y) >= 3 else 0
    te_i, va_i, tr_i = perm[:n_hold], perm[n_hold:2 * n_hold], perm[2 * n_hold:]
    notes = [f"csv targets: {cols}"]
    held = "train" if not n_hold else None
    if not n_hold:
        te_i = va_i = tr_i
        notes.append("csv: fewer than 3 rows; train, validation and test are the same rows")
    hw, size_note, from_data = resolve_hw(cfg, paths=[paths[i] for i in tr_i])
    skipped: list[str] = []
    out = {}
    for split, idx in (("train", tr_i), ("validation", va_i), ("test", te_i)):
        ds = FileImageDataset([paths[i] for i in idx], y[idx], hw, "RGB", cfg.skip_bad_images, split=split)
        if cfg.check_files:
            ds = check_files(ds, split, lambda k, idx=idx: f"csv: {path} line {lines[idx[k]]}: ",
                              cfg.skip_bad_images, skipped)
        if not len(ds):
            raise InputError(f"csv: no readable {split} image left after skipping bad files")
        out[split] = ds
    return DataSplits(name="csv", train=out["train"], val=out["validation"], test=out["test"], task="regression",
                      num_outputs=len(cols), in_channels=3, image_hw=hw, classes=cols, mean=[0.5] * 3,
                      std=[0.5] * 3, hflip_ok=False, notes=notes, size_note=size_note, size_from_data=from_data,
                      skipped_files=skipped, val_name=held or "val", test_name=held or "test")
