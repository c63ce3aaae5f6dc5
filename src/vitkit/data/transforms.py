"""Preprocessing built from torchvision.transforms.v2, driven by a small dict that travels with
the weights (as torchvision's weight metadata and timm's pretrained_cfg):

    {"input_size": [C, H, W], "mean": [...], "std": [...], "interpolation": "bicubic",
     "crop_pct": 0.875}

``crop_pct`` < 1 resizes the short side to size / crop_pct and center-crops (ImageNet eval);
1.0 resizes straight to (H, W).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..config import ViTConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # JAX / augreg checkpoints
INCEPTION_STD = (0.5, 0.5, 0.5)

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
           "nearest": InterpolationMode.NEAREST}


def default_preprocess(config: ViTConfig) -> dict[str, Any]:
    c = config.in_channels
    return {"input_size": [c, *config.image_hw], "mean": [0.5] * c, "std": [0.5] * c,
            "interpolation": "bicubic", "crop_pct": 1.0}


def eval_transform(preprocess: dict[str, Any]) -> T.Compose:
    """PIL image / uint8 tensor -> normalised float tensor (C, H, W) as the weights expect."""
    C, H, W = preprocess["input_size"]
    interp = _INTERP.get(preprocess.get("interpolation", "bicubic"), InterpolationMode.BICUBIC)
    crop_pct = float(preprocess.get("crop_pct", 1.0) or 1.0)
    ops: list[Any] = [T.ToImage()]
    if C == 1:
        ops.append(T.Grayscale(1))
    if crop_pct < 1.0:
        scale = (math.floor(H / crop_pct), math.floor(W / crop_pct))
        ops += [T.Resize(scale[0] if H == W else scale, interpolation=interp, antialias=True), T.CenterCrop((H, W))]
    else:
        ops.append(T.Resize((H, W), interpolation=interp, antialias=True))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(preprocess["mean"]), list(preprocess["std"]))]
    return T.Compose(ops)
