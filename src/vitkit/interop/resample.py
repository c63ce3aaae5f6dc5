"""Position-table resampling as each source implementation does it: the functions live beside
the model (:mod:`vitkit.model.pos_embed`, where ``dynamic_img_size`` and ``set_image_size`` use
them through ``ViTConfig.pos_resample``); this module re-exports them for the loaders."""

from __future__ import annotations

from ..model.pos_embed import POS_RESAMPLERS as RESAMPLERS
from ..model.pos_embed import get_pos_resampler as get_resampler
from ..model.pos_embed import (
    resample_big_vision,
    resample_dinov2_original,
    resample_hf,
    resample_hf_dinov2_registers,
    resample_timm,
    resample_torchvision,
    resample_vit_jax,
)

__all__ = ["RESAMPLERS", "get_resampler", "resample_timm", "resample_hf", "resample_hf_dinov2_registers",
           "resample_dinov2_original", "resample_big_vision", "resample_torchvision",
           "resample_vit_jax"]
