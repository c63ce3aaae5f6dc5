"""Datasets for ``vitkit train`` / ``vitkit eval``. Every dataset yields ``(image, target)`` with
``image`` a float tensor (C, H, W) in [0, 1] at the model's input size (normalisation with the
dataset's mean/std happens in the training loop, and the same mean/std go into the saved model's
``preprocess_cfg`` so ``vitkit predict`` sees the same numbers).

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
* ``imagefolder``: ``<data_dir>/train/<class>/*.png|jpg...`` plus ``val/`` and/or ``test/``.
* ``csv`` (regression): a CSV with a header, the first column an image path (relative to the
  CSV's folder), then one or more float target columns.
"""

from __future__ import annotations

import csv
import io
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, InputError

log = logging.getLogger("vitkit.data")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class TensorImageDataset(Dataset):
    """In-memory images (N, C, H, W), uint8 (0..255) or float (0..1), with integer/float targets."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, image_hw: tuple[int, int] | None = None):
        self.images = images
        self.targets = targets
        self.image_hw = image_hw

    def __len__(self) -> int:
        return len(self.images)

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.image_hw is not None and tuple(x.shape[-2:]) != tuple(self.image_hw):
            x = torch.nn.functional.interpolate(x, size=self.image_hw, mode="bilinear", align_corners=False,
                                                antialias=True).clamp(0, 1)
        return x, self.targets[idx]

    def __getitem__(self, i: int):
        x, y = self.get_batch([i])
        return x[0], y[0]


class FileImageDataset(Dataset):
    """Images read from files on access (clear error naming a bad file, or skip with a log line)."""

    def __init__(self, paths: list[Path], targets: torch.Tensor, image_hw: tuple[int, int], mode: str,
                 skip_bad: bool = False, transform=None):
        self.paths = paths
        self.targets = targets
        self.image_hw = image_hw
        self.mode = mode
        self.skip_bad = skip_bad
        self.transform = transform  # per-sample train transform on float [0, 1] tensors

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from torchvision.transforms import v2 as T

        from .image import load_image

        try:
            img = load_image(self.paths[i], mode=self.mode)
        except InputError as e:
            if self.skip_bad:
                log.warning("skipping unreadable image: %s", e)
                return None
            raise InputError(f"bad training image: {e}") from e
        x = T.functional.to_dtype(T.functional.to_image(img), torch.float32, scale=True)
        if self.transform is None or not any(isinstance(t, T.RandomResizedCrop) for t in self.transform.transforms):
            x = T.functional.resize(x, list(self.image_hw), antialias=True).clamp(0, 1)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[i]


def collate_skip_none(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return torch.stack([b[0] for b in batch]), torch.stack([torch.as_tensor(b[1]) for b in batch])


def load_batch(dataset, indices: list[int]):
    """(x, y) for a list of indices, or None when every image in it was skipped."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    return collate_skip_none([dataset[i] for i in indices])


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


NATIVE_SIZE = {"digits": 8, "mnist": 28, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32}


def stratified_split(targets: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split indices into len(fractions)+1 parts, class by class (sizes rounded per class), seeded."""
    rng = np.random.RandomState(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        start = 0
        for k, f in enumerate(fractions):
            n = int(round(f * len(idx)))
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


def build_datasets(cfg) -> DataSplits:
    name = cfg.dataset
    size = cfg.image_size or NATIVE_SIZE.get(name, 224)
    hw = (size, size)
    if name == "digits":
        splits = _digits(cfg, hw)
    elif name in ("mnist", "fashion-mnist"):
        splits = _mnist(cfg, hw)
    elif name in ("cifar10", "cifar100"):
        splits = _cifar(cfg, hw)
    elif name == "imagefolder":
        splits = _imagefolder(cfg, hw)
    elif name == "csv":
        splits = _csv(cfg, hw)
    else:  # pragma: no cover - TrainConfig validates
        raise ConfigError(f"unknown dataset {name!r}")
    if splits.task == "classification":
        for split_name in ("train", "val", "test"):
            ds = getattr(splits, split_name)
            if ds is not None:
                check_labels(ds.targets, splits.num_outputs, f"{name} {split_name} split")
    if cfg.num_classes and cfg.num_classes != splits.num_outputs:
        what = "classes" if splits.task == "classification" else "regression targets"
        raise ConfigError(f"--num-classes {cfg.num_classes} disagrees with the data: {name} has "
                          f"{splits.num_outputs} {what}")
    if cfg.subset:
        splits.train = _subset(splits.train, cfg.subset)
    return splits


def _subset(ds, n: int):
    n = min(n, len(ds))
    if isinstance(ds, TensorImageDataset):
        return TensorImageDataset(ds.images[:n], ds.targets[:n], ds.image_hw)
    return FileImageDataset(ds.paths[:n], ds.targets[:n], ds.image_hw, ds.mode, ds.skip_bad, ds.transform)


def _in_memory(name, cfg, hw, train_x, train_y, test_x, test_y, classes, hflip_ok, val_from_train=True):
    y = train_y.numpy()
    tr, va = stratified_split(y, [1 - cfg.val_fraction], cfg.seed) if val_from_train else (np.arange(len(y)), [])
    mean, std = _stats(train_x[torch.as_tensor(tr)])
    return DataSplits(
        name=name, train=TensorImageDataset(train_x[tr], train_y[tr], hw),
        val=TensorImageDataset(train_x[va], train_y[va], hw) if len(va) else None,
        test=TensorImageDataset(test_x, test_y, hw), task="classification", num_outputs=len(classes),
        in_channels=train_x.shape[1], image_hw=hw, classes=classes, mean=mean, std=std, hflip_ok=hflip_ok)


def _digits(cfg, hw) -> DataSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    targets = torch.from_numpy(d.target.astype(np.int64))
    test_f, val_f = cfg.test_fraction, cfg.val_fraction
    te, va, tr = stratified_split(d.target, [test_f, val_f], seed=1234)  # fixed split, same for every run
    mean, std = _stats(images[torch.as_tensor(tr)])
    ds = lambda idx: TensorImageDataset(images[idx], targets[idx], hw)  # noqa: E731
    return DataSplits(name="digits", train=ds(tr), val=ds(va), test=ds(te), task="classification", num_outputs=10,
                      in_channels=1, image_hw=hw, classes=[str(i) for i in range(10)], mean=mean, std=std,
                      hflip_ok=False, notes=[f"digits split: {len(tr)} train / {len(va)} val / {len(te)} test"])


def _need_dir(cfg) -> Path:
    if not cfg.data_dir:
        raise ConfigError(f"--data-dir is required for dataset {cfg.dataset!r}")
    return Path(cfg.data_dir).expanduser()


def _mnist(cfg, hw) -> DataSplits:
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
    return _in_memory(cfg.dataset, cfg, hw, train.data[:, None].contiguous(), train.targets.long(),
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


def _cifar(cfg, hw) -> DataSplits:
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
    return _in_memory(cfg.dataset, cfg, hw, x, y, tx, ty, classes, hflip_ok=True)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _imagefolder(cfg, hw) -> DataSplits:
    from .augment import per_sample_transform

    root = _need_dir(cfg)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise InputError(f"imagefolder: expected {train_dir} with one sub-folder per class (and val/ or test/)")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"imagefolder: {train_dir} has no class sub-folders")

    def scan(split_dir: Path):
        paths, labels = [], []
        for d in sorted(x for x in split_dir.iterdir() if x.is_dir()):
            if d.name not in classes:
                raise InputError(f"imagefolder: class folder {d} is not among the training classes {classes}")
            files = _list_images(d)
            paths += files
            labels += [classes.index(d.name)] * len(files)
        return paths, torch.tensor(labels, dtype=torch.long)

    tr_paths, tr_y = scan(train_dir)
    if not tr_paths:
        raise InputError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {train_dir}")
    mode = "RGB"
    in_ch = 3
    notes = []
    splits = {s: scan(root / s) for s in ("val", "test") if (root / s).is_dir()}
    if not splits:
        tr_i, va_i = stratified_split(tr_y.numpy(), [1 - cfg.val_fraction], cfg.seed)
        splits["val"] = ([tr_paths[i] for i in va_i], tr_y[va_i])
        tr_paths, tr_y = [tr_paths[i] for i in tr_i], tr_y[tr_i]
        notes.append("imagefolder: no val/ or test/; validation split from train, no test split")
    elif "val" not in splits or "test" not in splits:
        only = next(iter(splits))
        splits["val" if only == "test" else "test"] = splits[only]
        notes.append(f"imagefolder: only {only}/ found; it serves as both validation and test set")
    train_tf = per_sample_transform(cfg, hw) if cfg.augment else None
    mk = lambda p, y, tf=None: FileImageDataset(p, y, hw, mode, cfg.skip_bad_images, tf)  # noqa: E731
    mean, std = [0.5] * in_ch, [0.5] * in_ch  # fixed: avoids a full pass over the files
    return DataSplits(name="imagefolder", train=mk(tr_paths, tr_y, train_tf), val=mk(*splits["val"]),
                      test=mk(*splits["test"]) if "test" in splits else None, task="classification",
                      num_outputs=len(classes), in_channels=in_ch, image_hw=hw, classes=classes, mean=mean,
                      std=std, hflip_ok=True, notes=notes)


def _csv(cfg, hw) -> DataSplits:
    from .augment import per_sample_transform

    path = _need_dir(cfg)
    if path.is_dir():
        found = sorted(path.glob("*.csv"))
        if len(found) != 1:
            raise InputError(f"csv: {path} holds {len(found)} .csv files; pass the CSV file itself as --data-dir")
        path = found[0]
    if not path.is_file():
        raise InputError(f"csv: {path}: no such file")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise InputError(f"csv: {path} needs a header row and at least one data row")
    header, rows = rows[0], [r for r in rows[1:] if r]
    cols = [c.strip() for c in cfg.target_columns.split(",")] if cfg.target_columns else header[1:]
    missing = [c for c in cols if c not in header]
    if missing or not cols:
        raise InputError(f"csv: target column(s) {missing or cols} not in header {header}")
    ci = [header.index(c) for c in cols]
    paths, targets = [], []
    for n, r in enumerate(rows, start=2):
        try:
            targets.append([float(r[i]) for i in ci])
        except (ValueError, IndexError) as e:
            raise InputError(f"csv: {path} line {n}: expected float targets in columns {cols}, got {r}") from e
        p = Path(r[0])
        paths.append(p if p.is_absolute() else path.parent / p)
    y = torch.tensor(targets, dtype=torch.float32)
    # seeded random split: val_fraction for validation, the same again for test (>= 1 row each)
    perm = np.random.RandomState(cfg.seed).permutation(len(y))
    n_hold = max(1, int(round(cfg.val_fraction * len(y)))) if len(y) >= 3 else 0
    te_i, va_i, tr_i = perm[:n_hold], perm[n_hold:2 * n_hold], perm[2 * n_hold:]
    if not n_hold:
        te_i = va_i = tr_i
    mode = "RGB"
    train_tf = per_sample_transform(cfg, hw) if cfg.augment else None
    mk = lambda idx, tf=None: FileImageDataset([paths[i] for i in idx], y[idx], hw, mode,  # noqa: E731
                                               cfg.skip_bad_images, tf)
    return DataSplits(name="csv", train=mk(tr_i, train_tf), val=mk(va_i), test=mk(te_i), task="regression",
                      num_outputs=len(cols), in_channels=3, image_hw=hw, classes=cols, mean=[0.5] * 3,
                      std=[0.5] * 3, hflip_ok=False, notes=[f"csv targets: {cols}"])
