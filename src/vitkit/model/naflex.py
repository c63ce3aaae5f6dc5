"""NaFlex input: each image at its own aspect ratio, as patches padded into one batch with a mask
(SigLIP2's NaFlex variants, Tschannen et al. 2025; timm's ``naflexvit_*``).

    image (C, H, W) -> resized to fit max_patches at its aspect ratio   (C, gh*ph, gw*pw)
      -> patchify, flattened (ph, pw, C) as HF / timm                     (gh*gw, ph*pw*C)
    several images -> pack: zero-padded to the longest                    NaFlexBatch
      patches (B, N, ph*pw*C), grids (B, 2) = (gh, gw), mask (B, N) True = a real patch

The model (:meth:`vitkit.ViT.embed`) embeds the patches with its conv kernel read as a matrix
(same weights as the image path), adds its position table resampled to each image's grid
(``config.pos_resample``; SigLIP2 / big_vision: bilinear with antialias), runs the one block loop
with the mask as a key-padding mask and pools the real tokens only.

:class:`NaFlexTransform` reproduces transformers' ``Siglip2ImageProcessor``: the target size from
its binary search (:func:`size_for_max_patches`), a bilinear antialiased resize of the uint8 image
(torchvision), then normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from ..config import to_2tuple
from ..errors import InputError
from .patch_embed import patchify

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
           "nearest": InterpolationMode.NEAREST}


@dataclass
class NaFlexBatch:
    """Images of different grids as one batch (see the module docstring)."""

    patches: torch.Tensor  # (B, N, ph*pw*C), each patch flattened (ph, pw, C); padding rows zero
    grids: torch.Tensor  # (B, 2) int64: each image's (gh, gw); its gh*gw patches come first, row-major
    mask: torch.Tensor  # (B, N) bool: True = a real patch, False = padding

    def __len__(self) -> int:
        return self.patches.shape[0]

    def to(self, device=None, dtype: torch.dtype | None = None, non_blocking: bool = False) -> NaFlexBatch:
        """Moved (and the patches cast to ``dtype``), as ``Tensor.to``."""
        return NaFlexBatch(self.patches.to(device, dtype, non_blocking=non_blocking),
                           self.grids.to(device, non_blocking=non_blocking),
                           self.mask.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> NaFlexBatch:  # the DataLoader calls it for CUDA
        return NaFlexBatch(self.patches.pin_memory(), self.grids.pin_memory(), self.mask.pin_memory())


def pack(images: Sequence[torch.Tensor], patch_size, length: int | None = None) -> NaFlexBatch:
    """Images (C, H_i, W_i), each divisible by the patch -> a :class:`NaFlexBatch` padded to
    ``length`` patches (default: the longest image's)."""
    if not images:
        raise InputError("pack needs at least one image")
    rows = [patchify(x[None], patch_size)[0] for x in images]  # (n_i, ph*pw*C)
    ph, pw = to_2tuple(patch_size, "patch_size")
    N = max(r.shape[0] for r in rows) if length is None else length
    if max(r.shape[0] for r in rows) > N:
        raise InputError(f"an image has {max(r.shape[0] for r in rows)} patches, more than length={N}")
    patches = rows[0].new_zeros(len(rows), N, rows[0].shape[1])
    mask = torch.zeros(len(rows), N, dtype=torch.bool)
    for i, r in enumerate(rows):
        patches[i, :r.shape[0]] = r
        mask[i, :r.shape[0]] = True
    grids = torch.tensor([[x.shape[-2] // ph, x.shape[-1] // pw] for x in images], dtype=torch.long)
    return NaFlexBatch(patches, grids, mask)


def size_for_max_patches(height: int, width: int, patch: int, max_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """The (H, W) transformers' ``get_image_size_for_max_num_patches`` resizes an image to: a binary
    search for the largest scale whose patch-rounded-up size has at most ``max_patches`` patches
    (each side at least one patch). The same float steps as the original, so the same sizes."""

    def scaled(scale: float, size: int) -> int:
        return max(patch, math.ceil(size * scale / patch) * patch)

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (scaled(mid, height) / patch) * (scaled(mid, width) / patch) <= max_patches:
            lo = mid
        else:
            hi = mid
    return scaled(lo, height), scaled(lo, width)


class NaFlexTransform:
    """PIL image / uint8 tensor -> normalised float (C, H', W') at its own aspect ratio, H' x W'
    from :func:`size_for_max_patches` (``Siglip2ImageProcessor``: resize, rescale, normalise);
    :meth:`batch` packs several. It is also the data loader's pipeline (``sample`` / ``batch``)."""

    def __init__(self, patch_size: int, max_patches: int, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear", in_channels: int = 3) -> None:
        self.patch, self.max_patches = patch_size, max_patches
        self.interpolation = _INTERP[interpolation]
        self.to_image = T.Compose([T.ToImage(), T.Grayscale(1) if in_channels == 1 else T.RGB()])
        self.normalize = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))])

    def __call__(self, img) -> torch.Tensor:
        x = self.to_image(img)  # uint8 (C, H, W)
        size = size_for_max_patches(x.shape[-2], x.shape[-1], self.patch, self.max_patches)
        x = TF.resize(x, list(size), interpolation=self.interpolation, antialias=True)
        return self.normalize(x)

    sample = __call__

    def pack(self, images: Sequence[torch.Tensor]) -> NaFlexBatch:
        return pack(images, self.patch)

    def batch(self, images: Sequence[torch.Tensor], seeds=None) -> NaFlexBatch:
        """The loader's collate (``seeds``: unused, no augmentation)."""
        return self.pack(images)


def naflex_transform(model) -> NaFlexTransform | None:
    """The model's NaFlex preprocessing (``config.naflex_max_patches`` with the saved mean / std /
    interpolation), or None for a fixed-size model."""
    c = model.config
    if not getattr(c, "naflex_max_patches", None):
        return None
    from ..preprocess import Preprocess

    pre = Preprocess.of(model)
    return NaFlexTransform(c.patch_hw[0], c.naflex_max_patches, pre.mean, pre.std, pre.interpolation, c.in_channels)


def naflex_positions(table_for: Callable[[tuple[int, int]], torch.Tensor | None], grids: torch.Tensor,
                     length: int) -> torch.Tensor | None:
    """(B, length, D) position rows per image: ``table_for((gh, gw))`` (1, gh*gw, D) in each image's
    first gh*gw rows (computed once per distinct grid), zeros on the padding. None without a table."""
    out = None
    grid_list = [tuple(g) for g in grids.tolist()]
    for grid in dict.fromkeys(grid_list):
        table = table_for(grid)
        if table is None:
            return None
        if out is None:
            out = table.new_zeros(len(grid_list), length, table.shape[-1])
        idx = [i for i, g in enumerate(grid_list) if g == grid]
        out[idx, :table.shape[1]] = table[0]
    return out
