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
           "eval_transform"]

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
           "nearest": InterpolationMode.NEAREST}


def default_preprocess(config: ViTConfig) -> Preprocess:
    """A model without saved preprocessing: see :meth:`Preprocess.default`."""
    return Preprocess.default(config)


def eval_transform(preprocess: Preprocess | Mapping[str, Any]) -> T.Compose:
    """PIL image / uint8 tensor -> normalised float tensor (C, H, W) as the weights expect.
    Takes a :class:`~vitkit.preprocess.Preprocess` or its dict form."""
    pre = Preprocess.from_dict(preprocess)
    C, H, W = pre.input_size
    interp = _INTERP[pre.interpolation]
    ops: list[Any] = [T.ToImage()]
    if C == 1:
        ops.append(T.Grayscale(1))
    else:  # a grey image (in-memory digits, a 1-channel tensor) for an RGB model: repeated, as PIL's L -> RGB
        ops.append(T.RGB())
    scale = (math.floor(H / pre.crop_pct), math.floor(W / pre.crop_pct))
    if pre.crop_mode == "center" and H == W:
        ops.append(T.Resize(scale[0], interpolation=interp, antialias=True))  # short side, aspect kept
    else:
        ops.append(T.Resize(scale, interpolation=interp, antialias=True))
    if scale != (H, W) or pre.crop_mode == "center":
        ops.append(T.CenterCrop((H, W)))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(pre.mean), list(pre.std))]
    return T.Compose(ops)
