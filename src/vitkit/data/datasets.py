"""The types every dataset builder returns, and :func:`build_data`, which runs a builder of
:mod:`vitkit.data.registry` with the checks every dataset gets.

A split dataset is a *source*: ``read(i)`` gives one image as stored (uint8, or float [0, 1] for
digits) and its target; in-memory ones (:class:`TensorImageDataset`) also have ``read_batch`` (the
loader's batched fast path), file ones (:class:`FileImageDataset`) decode in the loader's workers.
Decoding, resizing, augmentation and normalisation happen in :func:`vitkit.data.loader.make_loader`,
and the normalisation mean/std go into the saved model's preprocessing so ``vitkit predict`` sees
the same numbers. :class:`DataSplits` is what a builder returns: the splits, the task, the classes,
the input size and how it was chosen.

The builders: :mod:`vitkit.data.memory_datasets` (digits, MNIST, CIFAR), :mod:`vitkit.data.file_datasets`
(imagefolder, csv), :mod:`vitkit.data.shards` (webdataset), :mod:`vitkit.data.hf_datasets` (hf).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, InputError

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


# The target of a training image without a label (``vitkit train --unlabeled``): the teacher's outputs are its
# only target, the label loss skips it (cross-entropy's ignore_index) and training accuracy does not count it
UNLABELLED = -1


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

    def extended(self, paths: list[Path], target: int) -> FileImageDataset:
        """This dataset with ``paths`` appended, each with ``target``; every other attribute kept (the size,
        mean / std and preprocessing the trainer sets on each split apply to the new images too)."""
        new = copy.copy(self)
        new.paths = self.paths + [Path(p) for p in paths]
        new.targets = torch.cat([self.targets, torch.full((len(paths),), target, dtype=self.targets.dtype)])
        return new

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
    # None: the trainer then picks one from image_hw (vitkit.train.arch.auto_patch_size).
    patch_size: int | None = None
    skipped_files: list[str] = field(default_factory=list)  # dropped by the pre-training checks (--skip-bad-images)
    # A pretrained model's preprocessing every split is read with (resize, crop, mean / std) when a fine-tune
    # adopts it (vitkit.train.finetune.adopt_preprocess); None: a plain resize to image_hw and mean / std above.
    preprocess: Any = None
    # The split each role really reads, for every report: "val" or "train-holdout" (held out from train by
    # vitkit.data.validation); test_name is val_name when the data has no test split (test is then val).
    val_name: str = "val"
    test_name: str = "test"

    def splits(self):
        """(name, dataset) of the splits that exist."""
        return [(k, getattr(self, k)) for k in ("train", "val", "test") if getattr(self, k) is not None]


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


def need_dir(cfg) -> Path:
    """``--data-dir`` as a path: every dataset but digits needs one."""
    if not cfg.data_dir:
        raise ConfigError(f"--data-dir is required for dataset {cfg.dataset!r}")
    return Path(cfg.data_dir).expanduser()


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursive, by extension), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
