"""Batches of preprocessed images for feature extraction, decoded in DataLoader workers.

Two sources, one batch shape: ``(indices (B,), images (B, C, H, W) or None, failures)`` where
``failures`` lists ``(index, message)`` for images that could not be read (skipped, reported by the
caller). Order is the source order, so row i of the output is item i of the input.

# TODO(data): switch to vitkit.data loader. Why not yet: vitkit.data.make_loader yields (x, y)
# resized and normalised with the *dataset's* numbers and stops (or drops silently) on a bad
# file, while features need the *model's* own preprocessing (its resize / crop / mean / std, as
# `predict` uses), the row each image came from, and the list of unreadable files. A make_loader
# option for a per-sample transform + (index, error) items would let this file shrink to a call.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import IMAGE_EXTENSIONS
from ..errors import InputError


class ImageFiles(Dataset):
    """Image paths -> the model's eval transform (decoding happens in the worker that asks)."""

    def __init__(self, paths: list[str], transform, mode: str) -> None:
        self.paths = paths
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from ..data.image import load_image

        try:
            x = self.transform(load_image(self.paths[i], mode=self.mode))
        except (InputError, OSError, ValueError) as e:
            return i, None, str(e)
        return i, x, None


class TensorSplit(Dataset):
    """An in-memory split (vitkit.data.datasets.TensorImageDataset: floats in [0, 1] at the
    dataset's size) resized to the model's input and normalised with the model's mean / std.
    Grey images fed to an RGB model are repeated to 3 channels (as PIL's L -> RGB does)."""

    def __init__(self, ds, input_size, mean, std) -> None:
        self.ds = ds
        self.C, self.H, self.W = input_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices: list[int]):
        x, _ = self.ds.get_batch(indices)  # (B, c, h, w) in [0, 1] (vitkit.data read_batch)
        if tuple(x.shape[-2:]) != (self.H, self.W):
            # bilinear + antialias: the resize the datasets use for training and `vitkit eval`
            x = torch.nn.functional.interpolate(x, size=(self.H, self.W), mode="bilinear",
                                                align_corners=False, antialias=True).clamp(0, 1)
        if x.shape[1] == 1 and self.C == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != self.C:
            raise InputError(f"the dataset has {x.shape[1]} channel(s), the model expects {self.C}")
        x = (x - self.mean) / self.std
        return [(i, xi, None) for i, xi in zip(indices, x)]

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]


class ReadSplit(Dataset):
    """A dataset split with ``read(i) -> (uint8 image (C, H, W), target)`` (vitkit.data), each
    image through the model's eval transform (grey -> RGB repeated for an RGB model)."""

    def __init__(self, ds, indices: list[int], transform, in_channels: int) -> None:
        self.ds, self.indices, self.transform, self.C = ds, indices, transform, in_channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        try:
            img, _ = self.ds.read(self.indices[i])
            img = torch.as_tensor(img)
            if img.shape[0] == 1 and self.C == 3:
                img = img.expand(3, -1, -1)
            return i, self.transform(img), None
        except (InputError, OSError, ValueError) as e:
            return i, None, str(e)


def collate(items):
    ok = [(i, x) for i, x, err in items if err is None]
    failures = [(i, err) for i, _, err in items if err is not None]
    if not ok:
        return torch.empty(0, dtype=torch.long), None, failures
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    return idx, torch.stack([x for _, x in ok]), failures


def make_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if workers < 0:
        raise InputError(f"workers must be >= 0, got {workers}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      prefetch_factor=4 if workers else None)


def list_images(inputs: list[str]) -> tuple[list[str], list[str | None]]:
    """Files and folders (recursive, sorted) -> (paths, labels). A label is the name of the folder
    an image sits in when that folder is below the given folder (class folders: root/cat/1.png ->
    "cat"); images directly in the given folder, and files named one by one, get None."""
    paths: list[str] = []
    labels: list[str | None] = []
    seen: set[str] = set()
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            for f in found:
                if str(f) in seen:
                    continue
                seen.add(str(f))
                paths.append(str(f))
                labels.append(f.parent.name if f.parent != p else None)
        elif p.exists() or spec.startswith(("sample:", "digits:")):
            if spec in seen:
                continue
            seen.add(spec)
            paths.append(spec)
            labels.append(None)
        else:
            raise InputError(f"{spec}: no such file or folder")
    if not paths:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(map(str, inputs))}")
    return paths, labels


class Chain(Dataset):
    """Datasets one after another; items carry their position in the chain (ConcatDataset would
    pass the parts' own indices through, and fetches one item at a time)."""

    def __init__(self, parts: list[Dataset]) -> None:
        self.parts = parts
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + len(p))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitems__(self, indices: list[int]):
        import bisect

        out = []
        groups: dict[int, list[int]] = {}
        for i in indices:
            groups.setdefault(bisect.bisect_right(self.starts, i) - 1, []).append(i)
        for k, idx in groups.items():
            part, off = self.parts[k], self.starts[k]
            local = [i - off for i in idx]
            got = part.__getitems__(local) if hasattr(part, "__getitems__") else [part[i] for i in local]
            out += [(i + off, x, err) for i, x, err in got]
        return out

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]
