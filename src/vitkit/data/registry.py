"""The dataset registry: name -> builder. Adding a dataset is one line here plus its builder
(a function ``DataSpec -> DataSplits``); train, eval and features read this table.

Builders are imported on first use, so a format's optional dependencies (webdataset, datasets)
load only when that format is asked for.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class DatasetEntry:
    builder: str  # "module:function" under vitkit.data
    help: str


DATASETS: dict[str, DatasetEntry] = {
    "digits": DatasetEntry("memory_datasets:build_digits", "scikit-learn's 1,797 8x8 digits (built in)"),
    "mnist": DatasetEntry("memory_datasets:build_mnist", "MNIST idx files in DIR/MNIST/raw (--download fetches them)"),
    "fashion-mnist": DatasetEntry("memory_datasets:build_mnist", "Fashion-MNIST idx files in DIR/FashionMNIST/raw"),
    "cifar10": DatasetEntry("memory_datasets:build_cifar", "CIFAR-10 python batches in DIR/cifar-10-batches-py"),
    "cifar100": DatasetEntry("memory_datasets:build_cifar", "CIFAR-100 python batches in DIR/cifar-100-python"),
    "imagefolder": DatasetEntry("file_datasets:build_imagefolder", "DIR/train/<class>/*.jpg (+ val/, test/), or DIR/<class>/*.jpg "
                                "(validation held out of it)"),
    "csv": DatasetEntry("file_datasets:build_csv", "regression: CSV of image path + numeric target columns"),
    "webdataset": DatasetEntry("shards:build_webdataset", "tar shards DIR/train-*.tar (+ val-*, test-*) or "
                               "DIR/train/*.tar (+ val/, test/): .jpg/.png/.webp + .cls (a class id or name)"),
    "hf": DatasetEntry("hf_datasets:build_hf", "Hugging Face dataset saved with save_to_disk, or a folder of parquet "
                       "files"),
}


def dataset_names() -> tuple[str, ...]:
    return tuple(DATASETS)


def get_builder(name: str) -> Callable:
    entry = DATASETS.get(name)
    if entry is None:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown dataset {name!r}: one of {', '.join(DATASETS)}{hint}")
    module, func = entry.builder.split(":")
    return getattr(importlib.import_module(f"vitkit.data.{module}"), func)
