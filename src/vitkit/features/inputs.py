"""The images a features command is given, as vitkit.data datasets: the image paths given on the
command line (files and folders, labels from class folders), and one dataset over chosen rows of one
or more sources, so that ``vitkit.data.make_loader`` (the model's preprocessing, row indices, skipped
files) reads them all."""

from __future__ import annotations

import bisect
from pathlib import Path

import torch

from ..data.datasets import IMAGE_EXTENSIONS, FileImageDataset
from ..errors import InputError


def file_source(paths: list[str], in_channels: int) -> FileImageDataset:
    """Image files (or ``sample:`` / ``digits:`` specs) as a vitkit.data dataset; targets unused."""
    return FileImageDataset(paths, torch.zeros(len(paths), dtype=torch.long), (1, 1),
                            "L" if in_channels == 1 else "RGB", skip_bad=True, split="input")


class Rows(torch.utils.data.Dataset):
    """Rows ``idx`` of each source (anything with ``read(i) -> (image, target)``: vitkit.data's
    file, in-memory and Hugging Face datasets) one after another; row ``j`` of this dataset is the
    ``j``-th chosen row. Unreadable images are skipped by the loader (``skip_bad``)."""

    skip_bad = True
    in_memory = False  # per image through the model's preprocessing, never the batched fast path
    image_hw = (1, 1)  # unused: the model's preprocessing decides the size

    def __init__(self, parts: list[tuple[object, list[int]]]) -> None:
        self.parts = parts
        self.starts = [0]
        for _, idx in parts:
            self.starts.append(self.starts[-1] + len(idx))

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, j: int):
        k = bisect.bisect_right(self.starts, j) - 1
        src, idx = self.parts[k]
        return src.read(idx[j - self.starts[k]])


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
