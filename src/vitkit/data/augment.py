"""Training augmentation.

Two kinds:

* Batch-level random affine (rotation, translation, scale, shear, optional horizontal flip) on a
  (B, C, H, W) float batch with ``affine_grid`` / ``grid_sample``. Its parameters come from a
  ``torch.Generator`` seeded from (seed, step) and are drawn for the *global* batch, so a resumed
  run and an N-process DDP run see exactly the same augmentation as one uninterrupted process.
  This is what the digits recipe uses: small affine jitter, never flips (a flipped 2 is not a 2);
  the default on in-memory data only (:class:`AugmentChoice`: image files get the per-sample pieces).
* Per-sample torchvision v2 transforms (RandomResizedCrop, flip, RandAugment / TrivialAugment,
  RandomErasing: :class:`AugmentSpec`, :class:`SamplePipeline`), run in the loader's workers under
  a seed per (seed, epoch, sample index); batch MixUp / CutMix (``torchvision.transforms.v2.MixUp``
  / ``CutMix``) on the device, from torch's global RNG (saved and restored with the training state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + salt) % (2**63 - 1))


def sample_affine(n: int, g: torch.Generator, degrees: float, translate: float, scale: float,
                  shear: float, hflip: bool) -> torch.Tensor:
    """(n, 2, 3) inverse-affine matrices for ``F.affine_grid`` (normalised coordinates)."""
    u = torch.rand(n, 6, generator=g) * 2 - 1  # uniform(-1, 1)
    ang = u[:, 0] * math.radians(degrees)
    sh = u[:, 1] * math.radians(shear)
    s = 1.0 + u[:, 2] * scale
    tx, ty = u[:, 3] * translate * 2, u[:, 4] * translate * 2  # fraction of size -> normalised coords
    flip = torch.where((u[:, 5] > 0) & hflip, -1.0, 1.0)
    cos, sin = torch.cos(ang), torch.sin(ang)
    # sample grid = R(ang) @ Shear(sh) @ diag(flip, 1) / s, then translate
    a = (cos * flip) / s
    b = (-sin + cos * torch.tan(sh)) / s
    c = (sin * flip) / s
    d = (cos + sin * torch.tan(sh)) / s
    return torch.stack([torch.stack([a, b, tx], 1), torch.stack([c, d, ty], 1)], 1)


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="zeros", align_corners=False)


def mix_transform(cfg, num_classes: int):
    """MixUp / CutMix (one of them per batch) on (images, int labels) -> (images, soft labels)."""
    ops = []
    if cfg.mixup > 0:
        ops.append(T.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        ops.append(T.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else T.RandomChoice(ops)


# --------------------------------------------------------------------------- per-sample, in workers
@dataclass
class AugmentSpec:
    """Per-sample training augmentation, run in the DataLoader workers on uint8 images.

    Order: crop / resize first (on uint8, the cheap size), flip, RandAugment / TrivialAugment
    (uint8 ops), then float + normalise, then RandomErasing (on the normalised image, so erased
    pixels are the mean colour, as timm does)."""

    random_resized_crop: bool = False
    rrc_scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool = False
    auto_augment: str = "none"  # none | randaugment | trivialaugment
    random_erasing: float = 0.0

    @property
    def per_sample(self) -> bool:
        return (self.random_resized_crop or self.hflip or self.auto_augment != "none"
                or self.random_erasing > 0)


# The batch affine (degrees, translate, scale) where --affine-* are not given, per kind of data: the
# digits recipe's on in-memory small images (digits, MNIST, CIFAR: benchmarks/train_digits.md), none on
# image files, which get RandomResizedCrop + flip per image in the workers instead (issue 21: on a
# 224 px batch the affine's grid_sample took 56 ms of a 140 ms step in the training process, on the
# cores the workers decode on: 0.47x torchvision's bare loader end to end).
DEFAULT_AFFINE = {True: (10.0, 0.1, 0.1), False: (0.0, 0.0, 0.0)}  # keyed by "the data is in memory"


@dataclass(frozen=True)
class AugmentChoice:
    """A run's training augmentation: its options (a TrainConfig-like object) where given, else the
    defaults of its kind of data (``in_memory``: small images held as tensors; else image files)."""

    affine: tuple[float, float, float, float] | None  # the batch affine's (degrees, translate, scale, shear)
    affine_flips: bool  # the batch affine draws the horizontal flips (else they are per image, in ``sample``)
    sample: AugmentSpec | None  # per image, in the loader's workers; None with augmentation off
    note: str  # the choice and why, one log line ("" with augmentation off)

    @classmethod
    def from_config(cls, cfg, *, in_memory: bool, hflip_ok: bool, classes=()) -> AugmentChoice:
        """``hflip_ok``: the dataset's own answer to "does a mirrored image keep its label" (--hflip auto);
        ``classes``: its class names, which can overrule it (:func:`glyph_classes`)."""
        if not cfg.augment:
            return cls(None, False, None, "")
        glyphs = cfg.hflip == "auto" and hflip_ok and glyph_classes(classes)
        hflip_ok = hflip_ok and not glyphs
        given = (cfg.affine_degrees, cfg.affine_translate, cfg.affine_scale)
        deg, tr, sc = (g if g is not None else d for g, d in zip(given, DEFAULT_AFFINE[in_memory]))
        rrc = cfg.random_resized_crop if cfg.random_resized_crop is not None else not in_memory
        hflip = cfg.hflip == "on" or (cfg.hflip == "auto" and hflip_ok)
        # In memory, flips ride the batch affine even alone (one op per batch keeps the loader's batched
        # fast path); from files they are per image, where a flip is a cheap copy in a worker.
        on = bool(deg or tr or sc or cfg.affine_shear or (hflip and in_memory))
        spec = AugmentSpec(random_resized_crop=rrc, hflip=hflip and not on, auto_augment=cfg.auto_augment,
                           random_erasing=cfg.random_erasing)
        parts = [f"batch random affine ({deg:g} deg, translate {tr:g}, scale {sc:g}, shear {cfg.affine_shear:g}"
                 f"{', flips' if hflip else ''}) in the training process"] if on else []
        per_image = ([f"RandomResizedCrop (scale {spec.rrc_scale[0]:g}-{spec.rrc_scale[1]:g})"] * rrc
                     + ["horizontal flip"] * spec.hflip + [spec.auto_augment] * (spec.auto_augment != "none")
                     + [f"random erasing {spec.random_erasing:g}"] * (spec.random_erasing > 0))
        if per_image:
            parts.append(" + ".join(per_image) + " per image in the loader's workers")
        auto = [f"--{k.replace('_', '-')}" for k in ("affine_degrees", "affine_translate", "affine_scale",
                                                     "random_resized_crop") if getattr(cfg, k) is None]
        why = ("as given" if not auto else
               f"{', '.join(auto)} not given: the defaults for in-memory small images, the digits recipe's affine"
               if in_memory else f"{', '.join(auto)} not given: the defaults for image files, crop + flip per image "
               "and nothing per batch in the training process")
        if glyphs:
            why += "; no flips: the classes are named as single characters (digits, letters), whose mirror " \
                   "images are other characters or none (--hflip on to flip)"
        return cls((deg, tr, sc, cfg.affine_shear) if on else None, hflip and on, spec,
                   f"augmentation: {'; '.join(parts) or 'none'} ({why})")


def glyph_classes(classes) -> bool:
    """Whether every class name is one letter or digit (``0``-``9``, ``a``-``z``: a folder of digits or
    characters): mirrored, a 2 is no digit and a b is a d, so ``--hflip auto`` does not flip them."""
    return bool(classes) and all(len(c.strip()) == 1 and c.strip().isalnum() for c in classes)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) with channels-last storage: torch's uint8 antialiased resize is ~3x faster on it (a
    decoded image already is; a crop of one is a strided view and is not)."""
    return x.unsqueeze(0).contiguous(memory_format=torch.channels_last)[0]


class _RandomResizedCrop(T.RandomResizedCrop):
    """torchvision's RandomResizedCrop (its own crop sampling), with the crop made channels-last
    contiguous before the resize: same pixels, ~3x faster on uint8 (measured 1.9 -> 0.6 ms at 224)."""

    def transform(self, inpt, params):
        x = T.functional.crop(inpt, params["top"], params["left"], params["height"], params["width"])
        return T.functional.resize(_channels_last(x), self.size, interpolation=self.interpolation,
                                   antialias=self.antialias)


class _Resize(T.Resize):
    def transform(self, inpt, params):
        return super().transform(_channels_last(inpt), params)


class SamplePipeline:
    """The loader's image pipeline, in two halves so the float work is one vectorised op per batch:

    * ``sample(img)``: per image, on uint8 (or the float [0, 1] of an in-memory dataset): crop /
      resize to ``image_hw`` (RandomResizedCrop when training asks, else a straight resize, or a
      fine-tune's ``resize_rule``: what the run saves as its preprocessing, so ``vitkit predict`` sees
      the same pixels), flip,
      RandAugment / TrivialAugment (uint8 ops); returns a contiguous (C, H, W) tensor.
    * ``batch(images, seeds)``: stack, to float32 in [0, 1], normalise (when asked), then
      RandomErasing per image (on the normalised image: erased pixels are the mean colour, as timm
      does), each under its own seed.
    """

    def __init__(self, image_hw, mean, std, augment: AugmentSpec | None = None, normalize: bool = True,
                 resize_rule=None):
        """``resize_rule``: a :class:`~vitkit.preprocess.Preprocess` whose interpolation and crop replace
        the plain bilinear resize (a fine-tune reads its data as the pretrained model's preprocessing does)."""
        from .transforms import resize_ops

        ops: list = []
        interp = T.InterpolationMode(resize_rule.interpolation if resize_rule is not None else "bilinear")
        if augment is not None and augment.random_resized_crop:
            ops.append(_RandomResizedCrop(image_hw, scale=augment.rrc_scale, interpolation=interp, antialias=True))
        elif resize_rule is not None:
            ops += resize_ops(resize_rule)
        else:
            ops.append(_Resize(image_hw, antialias=True))
        if augment is not None and augment.hflip:
            ops.append(T.RandomHorizontalFlip())
        if augment is not None and augment.auto_augment != "none":
            aa = T.RandAugment() if augment.auto_augment == "randaugment" else T.TrivialAugmentWide()
            ops += [T.ToDtype(torch.uint8, scale=True), aa]
        self.per_sample = T.Compose(ops)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1) if normalize else None
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1) if normalize else None
        p = augment.random_erasing if augment is not None else 0.0
        self.erasing = T.RandomErasing(p=p, value=0) if p > 0 else None

    @classmethod
    def from_preprocess(cls, preprocess) -> SamplePipeline:
        """A model's own preprocessing (``model.preprocess_cfg``: resize / center crop / interpolation
        / mean / std) per image, exactly what ``vitkit predict`` applies (``eval_transform``)."""
        from .transforms import eval_transform

        pipe = cls((1, 1), [0.0], [1.0], None, normalize=False)
        pipe.per_sample = eval_transform(preprocess)  # ends normalised float: batch() only stacks
        return pipe

    def sample(self, img: torch.Tensor) -> torch.Tensor:
        return self.per_sample(img).contiguous()

    def batch(self, images: list[torch.Tensor], seeds: list[int]) -> torch.Tensor:
        x = torch.stack(images)  # (B, C, H, W), uint8 (or float in [0, 1])
        scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
        x = x.to(torch.float32)
        if self.mean is not None:  # (x * scale - mean) / std as one multiply-add pass
            x = torch.addcmul(-self.mean / self.std, x, scale / self.std)
        elif scale != 1.0:
            x.mul_(scale)
        if self.erasing is not None:
            for k, s in enumerate(seeds):
                torch.default_generator.manual_seed((s + 1) % (1 << 63))
                x[k] = self.erasing(x[k])
        return x
