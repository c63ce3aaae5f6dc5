"""Datasets, image loading and the DataLoaders of training and evaluation.

    from vitkit.data import DataSpec, build_data, make_loader
    data = build_data(DataSpec(dataset="imagefolder", data_dir="photos"))
    loader = make_loader(data.train, batch_size=64, train=True, seed=0, workers=4)
"""

from .augment import AugmentSpec
from .datasets import DataSplits, build_data
from .image import builtin_image, load_image
from .loader import DataWorkerError, default_workers, make_loader
from .registry import DATASETS, dataset_names
from .spec import DataSpec

__all__ = ["load_image", "builtin_image", "DataSpec", "DataSplits", "build_data", "make_loader", "AugmentSpec",
           "default_workers", "DataWorkerError", "DATASETS", "dataset_names"]
