"""Preprocessing built from torchvision.transforms.v2, driven by the
:class:`vitkit.preprocess.Preprocess` that travels with the weights (as torchvision's weight
metadata and timm's pretrained_cfg); see that module for ``crop_pct`` and ``crop_mode``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..config import ViTConfig
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

INCEPTION_MEAN = (0.5, 0.5, 0.5)  # JAX / augreg checkpoints
INCEPTION_STD = (0.5, 0.5, 0.5)
__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN", "INCEPTION_STD", "default_preprocess",
           "eval_transform", "resize_ops"]

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
           "nearest": InterpolationMode.NEAREST}


def default_preprocess(config: ViTConfig) -> Preprocess:
    """A model without saved preprocessing: see :meth:`Preprocess.default`."""
    return Preprocess.default(config)


def eval_transform(preprocess: Preprocess | Mapping[str, Any]) -> T.Compose:
    """PIL image / uint8 tensor -> normalised float tensor (C, H, W) as the weights expect.
    Takes a :class:`~vitkit.preprocess.Preprocess` or its dict form."""
    pre = Preprocess.from_dict(preprocess)
    ops: list[Any] = [T.ToImage()]
    if pre.input_size[0] == 1:
        ops.append(T.Grayscale(1))
    else:  # a grey image (in-memory digits, a 1-channel tensor) for an RGB model: repeated, as PIL's L -> RGB
        ops.append(T.RGB())
    ops += resize_ops(pre)
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(pre.mean), list(pre.std))]
    return T.Compose(ops)


def resize_ops(preprocess: Preprocess) -> list[Any]:
    """The geometry of ``preprocess`` alone: resize (its interpolation) and center crop to its input
    size, on an image tensor of any dtype. The training loader runs the same ops (a run that adopts a
    pretrained model's preprocessing trains on exactly what ``vitkit predict`` feeds it)."""
    _, H, W = preprocess.input_size
    interp = _INTERP[preprocess.interpolation]
    scale = (math.floor(H / preprocess.crop_pct), math.floor(W / preprocess.crop_pct))
    ops: list[Any] = []
    if preprocess.crop_mode == "center" and H == W:
        ops.append(T.Resize(scale[0], interpolation=interp, antialias=True))  # short side, aspect kept
    else:
        ops.append(T.Resize(scale, interpolation=interp, antialias=True))
    if scale != (H, W) or preprocess.crop_mode == "center":
        ops.append(T.CenterCrop((H, W)))
    return ops
