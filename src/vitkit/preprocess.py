"""The preprocessing a model's weights expect, as one typed, validated object that travels with
the weights (as torchvision's weight metadata and timm's ``pretrained_cfg``).

    pre = Preprocess(input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     interpolation="bicubic", crop_pct=0.875, crop_mode="center")
    model.preprocess_cfg = pre                # a plain dict is accepted and converted
    transform = vitkit.data.transforms.eval_transform(pre)

``crop_mode``:
  * ``"center"``: resize the short side to size / crop_pct (keeping the aspect ratio of a
    square target), then center-crop (H, W) (ImageNet evaluation; timm's "center").
  * ``"squash"``: resize to (H, W) / crop_pct ignoring the aspect ratio, then center-crop
    (H, W) (with crop_pct 1.0: a plain resize to (H, W); Hugging Face's ViTImageProcessor).
Saved files written before ``crop_mode`` existed have none; they read as "center" when
crop_pct < 1 and "squash" when crop_pct == 1, which is what vitkit did with them then.

A Preprocess is also a read-only mapping (``pre["mean"]``, ``pre.get("crop_pct")``,
``dict(pre)``) so code written for the old dict keeps working. It imports nothing heavy: the
torchvision transform is built by :func:`vitkit.data.transforms.eval_transform`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
CROP_MODES = ("center", "squash")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess(Mapping):
    """Image -> model input settings. Validated on construction (ConfigError naming the field)."""

    input_size: tuple[int, int, int]  # (C, H, W) the model takes
    mean: tuple[float, ...]  # per channel, after scaling pixels to [0, 1]
    std: tuple[float, ...]  # per channel, non-zero
    interpolation: str = "bicubic"  # one of INTERPOLATIONS
    crop_pct: float = 1.0  # in (0, 1]: the share of the resized image kept by the crop
    crop_mode: str = "center"  # one of CROP_MODES (module docstring)

    def __post_init__(self) -> None:
        def bad(field: str, msg: str) -> ConfigError:
            return ConfigError(f"preprocess.{field}: {msg}")

        try:
            size = tuple(int(v) for v in self.input_size)
        except (TypeError, ValueError) as e:
            raise bad("input_size", f"expected (C, H, W) integers, got {self.input_size!r}") from e
        if len(size) != 3 or min(size) <= 0 or any(float(a) != b for a, b in zip(self.input_size, size)):
            raise bad("input_size", f"expected three positive integers (C, H, W), got {self.input_size!r}")
        C = size[0]
        stats = {}
        for name in ("mean", "std"):
            v = getattr(self, name)
            try:
                t = tuple(float(x) for x in v)
            except (TypeError, ValueError) as e:
                raise bad(name, f"expected {C} numbers (one per channel), got {v!r}") from e
            if len(t) != C:
                raise bad(name, f"has {len(t)} values but input_size {list(size)} has {C} channel(s)")
            if not all(math.isfinite(x) for x in t):
                raise bad(name, f"values must be finite, got {list(t)}")
            stats[name] = t
        if any(s == 0 for s in stats["std"]):
            raise bad("std", f"values must be non-zero (inputs are divided by them), got {list(stats['std'])}")
        if self.interpolation not in INTERPOLATIONS:
            raise bad("interpolation", f"expected one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")
        try:
            crop_pct = float(self.crop_pct)
        except (TypeError, ValueError) as e:
            raise bad("crop_pct", f"expected a number in (0, 1], got {self.crop_pct!r}") from e
        if not 0 < crop_pct <= 1:
            raise bad("crop_pct", f"expected a number in (0, 1], got {self.crop_pct!r}")
        if self.crop_mode not in CROP_MODES:
            raise bad("crop_mode", f"expected one of {list(CROP_MODES)}, got {self.crop_mode!r}")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", stats["mean"])
        object.__setattr__(self, "std", stats["std"])
        object.__setattr__(self, "crop_pct", crop_pct)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Preprocess, where: str | None = None) -> Preprocess:
        """From the saved dict (``config.json``'s "preprocess", a converter's output). ``where``
        names the file or source in error messages."""
        if isinstance(d, Preprocess):
            return d
        prefix = f"{where}: " if where else ""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{prefix}preprocess: expected a mapping of settings, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{prefix}preprocess: unknown key(s) {unknown}; expected {names}")
        missing = [k for k in ("input_size", "mean", "std") if k not in d]
        if missing:
            raise ConfigError(f"{prefix}preprocess: missing {missing}")
        kw = dict(d)
        if kw.get("crop_pct") is None:
            kw["crop_pct"] = 1.0
        if "crop_mode" not in kw:  # files from before crop_mode: what vitkit did with them
            try:
                kw["crop_mode"] = "center" if float(kw["crop_pct"]) < 1 else "squash"
            except (TypeError, ValueError):
                kw["crop_mode"] = "center"  # the crop_pct check below names the problem
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}") from None

    @classmethod
    def coerce(cls, value: Any, where: str | None = None) -> Preprocess | None:
        """None stays None; a Preprocess is returned as is; a mapping is read with from_dict."""
        return None if value is None else cls.from_dict(value, where)

    @classmethod
    def default(cls, config) -> Preprocess:
        """What a model without saved preprocessing gets: mean = std = 0.5 per channel, a plain
        bicubic resize to the model's size (no crop)."""
        C = config.in_channels
        return cls((C, *config.image_hw), (0.5,) * C, (0.5,) * C, "bicubic", 1.0, "squash")

    @classmethod
    def of(cls, model) -> Preprocess:
        """The model's preprocessing (``model.preprocess_cfg``), else :meth:`default`."""
        pre = getattr(model, "preprocess_cfg", None)
        return cls.from_dict(pre) if pre is not None else cls.default(model.config)

    def for_input(self, in_channels: int, image_hw: tuple[int, int]) -> Preprocess:
        """The same settings for a model resized to ``image_hw`` or with another channel count
        (mean / std averaged over the old channels, as a grey image replicated to RGB)."""
        mean, std = self.mean, self.std
        if in_channels != self.input_size[0]:
            mean = (sum(mean) / len(mean),) * in_channels
            std = (sum(std) / len(std),) * in_channels
        return self.replace(input_size=(in_channels, *image_hw), mean=mean, std=std)

    def replace(self, **changes: Any) -> Preprocess:
        return Preprocess(**{**self.to_dict(), **changes})

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists for the sequences (what config.json stores)."""
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    # read-only mapping over the dict form (lists, as config.json), for code written against
    # the old dict: pre["input_size"] == [3, 224, 224] as before; attributes give tuples
    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        value = getattr(self, key)
        return list(value) if isinstance(value, tuple) else value

    def __eq__(self, other: object) -> bool:
        """Equal to another Preprocess with the same fields, or to a dict that reads as one
        (a saved dict without crop_mode compares by what it means)."""
        if isinstance(other, Preprocess):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            try:
                return self == Preprocess.from_dict(other)
            except ConfigError:
                return False
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.input_size, self.mean, self.std, self.interpolation, self.crop_pct, self.crop_mode))

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


def preprocess_property() -> property:
    """``model.preprocess_cfg`` as a property that accepts None, a dict or a Preprocess and
    stores a Preprocess (validated on assignment). Attached to ViT by the vitkit package."""

    def get(self) -> Preprocess | None:
        return self.__dict__.get("_preprocess_cfg")

    def set(self, value: Any) -> None:
        self.__dict__["_preprocess_cfg"] = Preprocess.coerce(value)

    return property(get, set, doc="The preprocessing these weights expect (vitkit.preprocess.Preprocess) or None.")
