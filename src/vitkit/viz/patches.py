"""Patches and tokens: what the model sees before the first layer.

* :func:`display_image`: the preprocessed input tensor turned back into an image in [0, 1]
  (undoing the normalisation), so every figure shows exactly the pixels the model saw
  (after resize / crop), not the original file.
* :func:`patch_tokens`: the raw tokens, ``(N, P*P*C)`` flattened in (ph, pw, C) order, row-major
  over the grid (the tutorials' ``rearrange('b c (h s1) (w s2) -> b (h w) (s1 s2 c)')``); computed by
  the model's own :func:`vitkit.model.patch_embed.patchify`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.transforms import default_preprocess
from ..model.patch_embed import patchify


def display_image(model, x: torch.Tensor) -> np.ndarray:
    """Preprocessed (C, H, W) or (1, C, H, W) tensor -> (H, W, C) float array in [0, 1]."""
    if x.ndim == 4:
        x = x[0]
    pre = model.preprocess_cfg or default_preprocess(model.config)
    C = x.shape[0]
    mean = torch.as_tensor(pre.get("mean", [0.0] * C), dtype=torch.float32)[:C].view(C, 1, 1)
    std = torch.as_tensor(pre.get("std", [1.0] * C), dtype=torch.float32)[:C].view(C, 1, 1)
    img = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    return img.permute(1, 2, 0).numpy()


def patch_tokens(image: np.ndarray, patch_size) -> np.ndarray:
    """(H, W, C) image -> (N, ph*pw*C) raw patch tokens in (ph, pw, C) order."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    return patchify(t, patch_size, order="ppc")[0].numpy()


def sized_to_input(model, x: torch.Tensor):
    """``model`` with its grid at ``x``'s size: a model that takes any size (``dynamic_img_size``,
    e.g. DINOv2 from Hugging Face: table for 518 px, preprocessing at 224) is copied and resized
    (``set_image_size``: the table resampled exactly as its forward does per input), so every map and
    figure reads the grid it was computed on. Other models are returned as they are."""
    import copy

    hw = tuple(x.shape[-2:])
    if hw == tuple(model.config.image_hw) or not model.config.dynamic_img_size:
        return model
    sized = copy.deepcopy(model)
    sized.set_image_size(hw)
    return sized
