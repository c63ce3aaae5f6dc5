"""Dataset builders (``DataSpec -> DataSplits``, listed in :mod:`vitkit.data.registry`) and the
split datasets they return. A split dataset is a *source*: ``read(i)`` gives one image as stored
(uint8, or float [0, 1] for digits) and its target; in-memory ones also have ``read_batch`` (the
loader's batched fast path). Decoding, resizing, augmentation and normalisation happen in
:func:`vitkit.data.loader.make_loader` (in its workers), and the normalisation mean/std go into the
saved model's preprocessing so ``vitkit predict`` sees the same numbers.

* ``digits``: scikit-learn's 1,797 8x8 digits (shipped inside scikit-learn, no download). Grey
  values 0..16 are mapped to [0, 1] by ``v / 16``, the same scale as a user's 8-bit PNG through
  ``ToDtype(scale=True)`` (``v / 255``): white (255) ink on a black (0) background, like the data.
  Fixed stratified train / val / test split, seeded (default 70 / 10 / 20 %).
* ``mnist``, ``fashion-mnist``: the standard idx files (``<data_dir>/MNIST/raw/train-images-idx3-ubyte``
  ...), read by torchvision. ``cifar10``, ``cifar100``: the standard "python version" batches
  (``<data_dir>/cifar-10-batches-py/data_batch_1`` ...). Those are Python pickles (the dataset's own
  format, from its authors); we read them with a restricted unpickler that only rebuilds NumPy
  arrays and plain containers. ``--download`` fetches them via torchvision; without it a missing
  file is an error saying what to put where. Validation is split from train (stratified, seeded);
  test is the official test set.
* ``imagefolder``: ``<data_dir>/train/<class>/*.png|jpg...`` plus ``val/`` and/or ``test/``; or a flat
  ``<data_dir>/<class>/*`` (the training set; validation held out from it, no test split).
* ``csv`` (regression): a CSV with a header, the first column an image path (relative to the
  CSV's folder), then one or more float target columns.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, InputError
from .validation import HELD_OUT, hold_out

log = logging.getLogger("vitkit.data")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class TensorImageDataset(Dataset):
    """In-memory images (N, C, H, W), uint8 (0..255) or float (0..1), with integer/float targets.

    ``read_batch`` is the loader's fast path: one gather and one batched resize per batch."""

    in_memory = True

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, image_hw: tuple[int, int] | None = None):
        self.images = images
        self.targets = targets
        self.image_hw = tuple(image_hw) if image_hw is not None else tuple(images.shape[-2:])

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int):
        """One image as stored (uint8 or float, native size) and its target: the per-sample path."""
        return self.images[i], self.targets[i]

    def read_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float [0, 1] at image_hw, y) for a list of indices."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if tuple(x.shape[-2:]) != tuple(self.image_hw):
            x = torch.nn.functional.interpolate(x, size=self.image_hw, mode="bilinear", align_corners=False,
                                                antialias=True).clamp(0, 1)
        return x, self.targets[idx]

    def subset(self, idx) -> TensorImageDataset:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TensorImageDataset(self.images[idx], self.targets[idx], self.image_hw)

    def __getitem__(self, i: int):
        x, y = self.read_batch([i])
        return x[0], y[0]


class FileImageDataset(Dataset):
    """Images read from files on access, decoded in the loader's workers (``read``: uint8, native
    size; an unreadable file raises InputError naming it, or is skipped with ``skip_bad``)."""

    in_memory = False

    def __init__(self, paths: list[Path], targets: torch.Tensor, image_hw: tuple[int, int], mode: str = "RGB",
                 skip_bad: bool = False, split: str = "train"):
        self.paths = [Path(p) for p in paths]
        self.targets = targets
        self.image_hw = tuple(image_hw)
        self.mode = mode
        self.skip_bad = skip_bad
        self.split = split

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int):
        from .files import decode_file

        try:
            spec = str(self.paths[i])
            if spec.startswith(("sample:", "digits:")):  # scikit-learn's bundled images, as predict reads them
                from torchvision.transforms.v2.functional import pil_to_tensor

                from .image import load_image

                x = pil_to_tensor(load_image(spec, mode=self.mode))
            else:
                x = decode_file(self.paths[i], channels=1 if self.mode == "L" else 3)
        except InputError as e:
            raise InputError(f"{e} ({self.split} image)") from None
        return x, self.targets[i]

    def subset(self, idx) -> FileImageDataset:
        return FileImageDataset([self.paths[int(i)] for i in idx], self.targets[torch.as_tensor(idx, dtype=torch.long)],
                                self.image_hw, self.mode, self.skip_bad, self.split)


@dataclass
class DataSplits:
    name: str
    train: Any
    val: Any
    test: Any
    task: str  # classification | regression
    num_outputs: int  # classes, or regression targets
    in_channels: int
    image_hw: tuple[int, int]
    classes: list[str] | None
    mean: list[float]
    std: list[float]
    hflip_ok: bool  # whether horizontal flips preserve the label (not for digits / mnist)
    notes: list[str] = field(default_factory=list)
    # How image_hw was chosen ("--image-size 64", "native 8x8", "all 32 probed files are 32x32", ...):
    # the trainer prints it and picks a patch size that keeps the token count sane.
    size_note: str = ""
    size_from_data: bool = False  # image_hw is the files' own common size (not a fixed default)
    # The patch side that goes with a dataset's own default input size (digits: 4 at 16x16), or
    # None: the trainer then picks one from image_hw (vitkit.train.build.auto_patch_size).
    patch_size: int | None = None
    skipped_files: list[str] = field(default_factory=list)  # dropped by the pre-training checks (--skip-bad-images)
    # The split each role really reads, for every report: "val" or "train-holdout" (held out from train by
    # vitkit.data.validation); test_name is val_name when the data has no test split (test is then val).
    val_name: str = "val"
    test_name: str = "test"

    def splits(self):
        """(name, dataset) of the splits that exist."""
        return [(k, getattr(self, k)) for k in ("train", "val", "test") if getattr(self, k) is not None]


NATIVE_SIZE = {"digits": 8, "mnist": 28, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32}
# Default training input (side, patch) where it differs from the native size. Digits: the 8x8
# images upsampled 2x (bilinear) with 4x4 patches, the same 16 tokens as 2x2 patches at 8x8; the
# random affine then moves strokes on a finer grid, and each token sees 16 values instead of 4.
# Measured over seeds 0-8 (benchmarks/train_digits.md): 99.1% mean test accuracy (with the 10
# degree / 10 % affine defaults) against 98.5% at 8x8, at the same speed.
DEFAULT_TRAIN_SIZE = {"digits": (16, 4)}


def resolve_hw(spec, native: int | None = None, paths=None, sizes=None) -> tuple[tuple[int, int], str, bool]:
    """(image_hw, how it was chosen, whether it came from the files).

    ``--image-size`` wins; else a dataset's native size; else the common (H, W) of a sample of the
    files (``paths`` to probe, or ``sizes`` already read) when they all agree and no side exceeds
    PROBE_MAX_SIDE; else DEFAULT_FILE_IMAGE_SIZE."""
    from .spec import DEFAULT_FILE_IMAGE_SIZE, PROBE_MAX_SIDE

    if spec.image_size:
        return (spec.image_size, spec.image_size), f"--image-size {spec.image_size}", False
    if native:
        return (native, native), f"native size {native}x{native}", False
    d = DEFAULT_FILE_IMAGE_SIZE
    if paths is not None:
        from .files import probe_sizes

        sizes = probe_sizes(paths)
    if sizes is not None:
        common = set(sizes)
        if len(common) == 1:
            (h, w), = common
            if max(h, w) <= PROBE_MAX_SIDE:
                return (h, w), f"all {len(sizes)} probed images are {w}x{h} (W x H): trained at that size", True
            return (d, d), (f"all {len(sizes)} probed images are {w}x{h}, larger than {PROBE_MAX_SIDE}: default "
                            f"{d}x{d} (set --image-size to change)"), False
        if common:
            return (d, d), (f"probed images have {len(common)} different sizes: default {d}x{d} "
                            "(set --image-size to change)"), False
    return (d, d), f"default {d}x{d}", False


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


def _stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    dims = [0, 2, 3]
    return ([round(float(v), 4) for v in x.mean(dims)], [round(float(v), 4) for v in x.std(dims).clamp(min=1e-3)])


def check_labels(targets: torch.Tensor, num_classes: int, where: str) -> None:
    """Labels must lie in 0..num_classes-1: reported before training starts."""
    t = torch.as_tensor(targets)
    bad = (t < 0) | (t >= num_classes)
    if bool(bad.any()):
        vals = sorted({int(v) for v in t[bad].tolist()})[:10]
        raise InputError(f"{where}: {int(bad.sum())} label(s) outside the class range 0..{num_classes - 1}: "
                         f"{vals}")


def build_data(spec) -> DataSplits:
    """Build the splits of ``spec.dataset`` (a :class:`vitkit.data.spec.DataSpec`) through the
    registry, with the checks every dataset gets (label range, --num-classes, subset), and with each
    split carrying the normalisation and input size the loader uses (``ds.mean``, ``ds.std``,
    ``ds.image_hw``)."""
    from .registry import get_builder

    name = spec.dataset
    splits = get_builder(name)(spec)
    if splits.test is None:  # no test split: the final numbers are on the validation split, and say so
        splits.test, splits.test_name = splits.val, splits.val_name
        splits.notes.append(f"{name}: no test split; final numbers are on the {splits.val_name} split")
    if splits.task == "classification":
        for split_name, ds in splits.splits():
            check_labels(ds.targets, splits.num_outputs, f"{name} {split_name} split")
    if spec.num_classes and spec.num_classes != splits.num_outputs:
        what = "classes" if splits.task == "classification" else "regression targets"
        raise ConfigError(f"--num-classes {spec.num_classes} disagrees with the data: {name} has "
                          f"{splits.num_outputs} {what}")
    if spec.subset:
        splits.train = splits.train.subset(range(min(spec.subset, len(splits.train))))
    for _, ds in splits.splits():
        ds.mean, ds.std, ds.image_hw = list(splits.mean), list(splits.std), tuple(splits.image_hw)
        ds.skip_bad = spec.skip_bad_images
    return splits


def _in_memory(name, cfg, train_x, train_y, test_x, test_y, classes, hflip_ok, val_from_train=True):
    hw, note, _ = resolve_hw(cfg, NATIVE_SIZE[name])
    y = train_y.numpy()
    # kept as first written (not vitkit.data.validation.holdout_indices, which cuts the other way round) so
    # that existing runs resume on the same split and normalisation
    tr, va = stratified_split(y, [1 - cfg.val_fraction], cfg.seed) if val_from_train else (np.arange(len(y)), [])
    mean, std = _stats(train_x[torch.as_tensor(tr)])
    return DataSplits(
        name=name, train=TensorImageDataset(train_x[tr], train_y[tr], hw), val_name=HELD_OUT,
        val=TensorImageDataset(train_x[va], train_y[va], hw) if len(va) else None,
        test=TensorImageDataset(test_x, test_y, hw), task="classification", num_outputs=len(classes),
        in_channels=train_x.shape[1], image_hw=hw, classes=classes, mean=mean, std=std, hflip_ok=hflip_ok,
        size_note=note)


def _digits(cfg) -> DataSplits:
    from sklearn.datasets import load_digits

    if cfg.image_size:
        (hw, note, _), patch = resolve_hw(cfg, NATIVE_SIZE["digits"]), None
    else:
        side, patch = DEFAULT_TRAIN_SIZE["digits"]
        hw, note = (side, side), (f"8x8 digits upsampled to {side}x{side} (bilinear) with {patch}x{patch} patches, "
                                  "the default recipe; --image-size 8 trains at the native size")
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    targets = torch.from_numpy(d.target.astype(np.int64))
    test_f, val_f = cfg.test_fraction, cfg.val_fraction
    te, va, tr = stratified_split(d.target, [test_f, val_f], seed=1234)  # fixed split, same for every run
    mean, std = _stats(images[torch.as_tensor(tr)])
    ds = lambda idx: TensorImageDataset(images[idx], targets[idx], hw)  # noqa: E731
    return DataSplits(name="digits", train=ds(tr), val=ds(va), test=ds(te), task="classification", num_outputs=10,
                      in_channels=1, image_hw=hw, classes=[str(i) for i in range(10)], mean=mean, std=std,
                      hflip_ok=False, notes=[f"digits split: {len(tr)} train / {len(va)} val / {len(te)} test"],
                      size_note=note, patch_size=patch)


def _need_dir(cfg) -> Path:
    if not cfg.data_dir:
        raise ConfigError(f"--data-dir is required for dataset {cfg.dataset!r}")
    return Path(cfg.data_dir).expanduser()


def _mnist(cfg) -> DataSplits:
    from torchvision import datasets

    root = _need_dir(cfg)
    cls = datasets.MNIST if cfg.dataset == "mnist" else datasets.FashionMNIST
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=cfg.download)
    except RuntimeError as e:
        raise InputError(
            f"{cfg.dataset} not found under {root / cls.__name__ / 'raw'}: expected train-images-idx3-ubyte, "
            "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (the standard files, "
            f"uncompressed). Run once with --download on a connected machine, or copy them there ({e})") from e
    classes = [str(c) for c in train.classes]
    return _in_memory(cfg.dataset, cfg, train.data[:, None].contiguous(), train.targets.long(),
                      test.data[:, None].contiguous(), test.targets.long(), classes, hflip_ok=False)


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only NumPy arrays and plain containers (CIFAR's python batches), nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_cifar_batch(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected a CIFAR python batch there)")
    try:
        with open(path, "rb") as f:
            d = _RestrictedUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise InputError(f"{path}: not a CIFAR python batch ({e})") from e
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar(cfg) -> DataSplits:
    root = _need_dir(cfg)
    c10 = cfg.dataset == "cifar10"
    folder = root / ("cifar-10-batches-py" if c10 else "cifar-100-python")
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if c10 else ["train"]
    meta_name, label_key, names_key = ("batches.meta", "labels", "label_names") if c10 else \
        ("meta", "fine_labels", "fine_label_names")
    if cfg.download:
        from torchvision import datasets

        (datasets.CIFAR10 if c10 else datasets.CIFAR100)(str(root), train=True, download=True)
    try:
        tr = [_read_cifar_batch(folder / f) for f in train_files]
        te = _read_cifar_batch(folder / "test_batch" if c10 else folder / "test")
        meta = _read_cifar_batch(folder / meta_name)
    except FileNotFoundError as e:
        raise InputError(
            f"{cfg.dataset}: missing {e.args[0] if e.args else e}. Expected the CIFAR 'python version' files in "
            f"{folder} ({', '.join(train_files)}, {'test_batch' if c10 else 'test'}, {meta_name}); run once with "
            "--download on a connected machine, or extract the official tar.gz into --data-dir") from e

    def arrays(batches):
        x = np.concatenate([np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
        y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        return torch.from_numpy(x), torch.from_numpy(y)

    x, y = arrays(tr)
    tx, ty = arrays([te])
    classes = [str(c) for c in meta[names_key]]
    return _in_memory(cfg.dataset, cfg, x, y, tx, ty, classes, hflip_ok=True)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _imagefolder(cfg) -> DataSplits:
    """``DIR/train/<class>/*``, ``DIR/val/<class>/*``, ``DIR/test/<class>/*`` (without val/, a validation
    split held out from train: :mod:`vitkit.data.validation`; test/ is never used to validate). Checked before training: class
    folders of val/ and test/ must be training classes; an empty class folder is refused unless
    ``allow_empty_classes`` (it would be a class the model can never learn)."""
    root = _need_dir(cfg)
    train_dir = root / "train"
    notes: list[str] = []
    if not train_dir.is_dir():
        # A flat DIR/<class>/ folder (no train/, val/, test/) is the training set; validation is held out below.
        if not root.is_dir() or any((root / s).is_dir() for s in ("val", "test")) or \
                not any(d.is_dir() for d in root.iterdir()):
            raise InputError(f"imagefolder: expected {train_dir} with one sub-folder per class (and val/ or test/), "
                             f"or class sub-folders directly in {root}")
        train_dir = root
        notes.append(f"imagefolder: no train/ in {root}; its class folders are the training set")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"imagefolder: {train_dir} has no class sub-folders")

    def scan(split_dir: Path):
        paths, labels, empty = [], [], []
        for d in sorted(x for x in split_dir.iterdir() if x.is_dir()):
            if d.name not in classes:
                raise InputError(f"imagefolder: class folder {d} is not among the training classes {classes} "
                                 "(every class must have training images)")
            files = _list_images(d)
            if not files:
                empty.append(d)
            paths += files
            labels += [classes.index(d.name)] * len(files)
        return paths, torch.tensor(labels, dtype=torch.long), empty

    tr_paths, tr_y, empty = scan(train_dir)
    if not tr_paths:
        raise InputError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {train_dir}")
    if empty:
        names = ", ".join(str(d) for d in empty)
        if not cfg.allow_empty_classes:
            raise InputError(f"imagefolder: class folder(s) without images: {names}. Each would become a class the "
                             "model never sees; remove them, add images, or pass --allow-empty-classes")
        log.warning("imagefolder: empty class folder(s) kept as classes: %s", names)
        notes.append(f"imagefolder: empty class folder(s) kept as classes (--allow-empty-classes): {names}")
    hw, size_note, from_data = resolve_hw(cfg, paths=tr_paths)  # every training image (before a val split) may be probed
    splits = {}
    for s in ("val", "test"):
        if (root / s).is_dir():
            p, y, _ = scan(root / s)
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
        val = _check_files(val, "validation", where, cfg.skip_bad_images, skipped)
        if test is not None:
            test = _check_files(test, "test", where, cfg.skip_bad_images, skipped)
    return DataSplits(name="imagefolder", train=train, val=val, test=test, val_name=val_name,
                      task="classification", num_outputs=len(classes), in_channels=3, image_hw=hw, classes=classes,
                      mean=mean, std=std, hflip_ok=True, notes=notes, size_note=size_note, size_from_data=from_data,
                      skipped_files=skipped)


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


def _check_files(ds: FileImageDataset, split: str, where, skip: bool, skipped: list[str]):
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


def _csv(cfg) -> DataSplits:
    """Regression from a CSV: a header, the image path first (relative to the CSV's folder), then one
    or more numeric targets. Checked before training: every target finite, every path inside the
    CSV's folder (unless ``allow_absolute_paths``), every image opens (its header)."""
    path = _need_dir(cfg)
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
            ds = _check_files(ds, split, lambda k, idx=idx: f"csv: {path} line {lines[idx[k]]}: ",
                              cfg.skip_bad_images, skipped)
        if not len(ds):
            raise InputError(f"csv: no readable {split} image left after skipping bad files")
        out[split] = ds
    return DataSplits(name="csv", train=out["train"], val=out["validation"], test=out["test"], task="regression",
                      num_outputs=len(cols), in_channels=3, image_hw=hw, classes=cols, mean=[0.5] * 3,
                      std=[0.5] * 3, hflip_ok=False, notes=notes, size_note=size_note, size_from_data=from_data,
                      skipped_files=skipped, val_name=held or "val", test_name=held or "test")
