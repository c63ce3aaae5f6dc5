"""``DataSpec``: the data options of a run, small enough that ``vitkit eval`` and feature
extraction build one without a whole ``TrainConfig`` (``DataSpec.from_config(cfg)`` reads the
same names from any object that has them: a TrainConfig, argparse args, a saved config dict).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

# Used when the files disagree on their size (or are larger than PROBE_MAX_SIDE): a ViT's usual input.
DEFAULT_FILE_IMAGE_SIZE = 224
# Images whose common size is above this are not trained at full size by default (photos).
PROBE_MAX_SIDE = 384


@dataclass
class DataSpec:
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int = 0  # 0 = from the data (native size, or the files' common size; see DataSplits.size_note)
    val_fraction: float = 0.1  # held out from train when the data has no validation split
    test_fraction: float = 0.2  # digits only
    download: bool = False
    skip_bad_images: bool = False
    allow_absolute_paths: bool = False  # csv: image paths outside the CSV's folder
    target_columns: str | None = None  # csv: comma-separated target columns (default: all but the first)
    image_column: str = "image"  # hf
    label_column: str = "label"  # hf
    allow_empty_classes: bool = False  # imagefolder: an empty class folder is refused unless this is set
    check_files: bool = True  # csv / imagefolder: open every file's header before training starts
    subset: int = 0  # first N training samples (0 = all)
    num_classes: int = 0  # 0 = from the data; else must agree
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> DataSpec:
        """Read the fields DataSpec has from ``cfg`` (attributes or mapping keys); missing ones keep
        their defaults, ``overrides`` win."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d: getattr(cfg, k, d))
        vals = {}
        for f in dataclasses.fields(cls):
            v = get(f.name, f.default)
            if v is not None or f.default is None:
                vals[f.name] = v
        vals.update(overrides)
        return cls(**vals)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.image_size < 0:
            raise ConfigError(f"image_size must be >= 0 (0 = from the data), got {self.image_size}")
