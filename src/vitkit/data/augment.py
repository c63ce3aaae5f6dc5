"""Training augmentation.

Two kinds:

* Batch-level random affine (rotation, translation, scale, shear, optional horizontal flip) on a
  (B, C, H, W) float batch with ``affine_grid`` / ``grid_sample``. Its parameters come from a
  ``torch.Generator`` seeded from (seed, step) and are drawn for the *global* batch, so a resumed
  run and an N-process DDP run see exactly the same augmentation as one uninterrupted process.
  This is what the digits recipe uses: small affine jitter, never flips (a flipped 2 is not a 2).
* Per-sample torchvision v2 transforms (RandomResizedCrop, RandAugment / TrivialAugment,
  RandomErasing) and batch MixUp / CutMix (``torchvision.transforms.v2.MixUp`` / ``CutMix``), which
  draw from torch's global RNG (saved and restored with the training state).
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


def per_sample_transform(cfg, image_hw: tuple[int, int]):
    """v2 transforms applied image by image on float [0, 1] tensors, or None if nothing is on."""
    ops = []
    if cfg.random_resized_crop:
        ops.append(T.RandomResizedCrop(image_hw, scale=(0.35, 1.0), antialias=True))
    if cfg.auto_augment != "none":
        aa = T.RandAugment() if cfg.auto_augment == "randaugment" else T.TrivialAugmentWide()
        ops += [T.ToDtype(torch.uint8, scale=True), aa, T.ToDtype(torch.float32, scale=True)]
    if cfg.random_erasing > 0:
        ops.append(T.RandomErasing(p=cfg.random_erasing, value=0))
    return T.Compose(ops) if ops else None


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

    @classmethod
    def from_config(cls, cfg, hflip_ok: bool) -> AugmentSpec | None:
        """From a TrainConfig-like object; None when ``cfg.augment`` is off. ``hflip_ok``: the
        dataset's own answer to "does a mirrored image keep its label" (used when hflip is auto)."""
        if not getattr(cfg, "augment", True):
            return None
        hflip = getattr(cfg, "hflip", "auto")
        return cls(random_resized_crop=bool(getattr(cfg, "random_resized_crop", False)),
                   hflip=hflip == "on" or (hflip == "auto" and hflip_ok),
                   auto_augment=getattr(cfg, "auto_augment", "none"),
                   random_erasing=float(getattr(cfg, "random_erasing", 0.0)))

    @property
    def per_sample(self) -> bool:
        return (self.random_resized_crop or self.hflip or self.auto_augment != "none"
                or self.random_erasing > 0)


def sample_transform(image_hw: tuple[int, int], mean, std, augment: AugmentSpec | None = None,
                     normalize: bool = True, resize: bool = True) -> T.Compose:
    """uint8 (or float [0, 1]) (C, H, W) -> float32 at ``image_hw``, normalised when asked.

    Without ``augment`` (evaluation) the image is resized straight to ``image_hw`` (the run's
    preprocessing has crop_pct 1.0, so ``vitkit predict`` sees the same pixels)."""
    ops: list = []
    if augment is not None and augment.random_resized_crop:
        ops.append(T.RandomResizedCrop(image_hw, scale=augment.rrc_scale, antialias=True))
    elif resize:
        ops.append(T.Resize(image_hw, antialias=True))
    if augment is not None and augment.hflip:
        ops.append(T.RandomHorizontalFlip())
    if augment is not None and augment.auto_augment != "none":
        aa = T.RandAugment() if augment.auto_augment == "randaugment" else T.TrivialAugmentWide()
        ops += [T.ToDtype(torch.uint8, scale=True), aa]
    ops.append(T.ToDtype(torch.float32, scale=True))
    if normalize:
        ops.append(T.Normalize(list(mean), list(std)))
    if augment is not None and augment.random_erasing > 0:
        ops.append(T.RandomErasing(p=augment.random_erasing, value=0))
    return T.Compose(ops)
