"""The ViT model and its reusable layers (torch only)."""

from .attention import Attention, AttentionPoolLatent
from .block import Block, DropPath, LayerScale, Mlp, SwiGLU, make_act, make_mlp, make_norm
from .image_text import ImageTextModel
from .patch_embed import PatchEmbed, conv_to_linear_weight, linear_to_conv_weight, patchify
from .pos_embed import resample_pos_embed, sincos_1d, sincos_2d
from .text import TextTransformer
from .vit import ViT

__all__ = [
    "Attention", "AttentionPoolLatent", "Block", "DropPath", "LayerScale", "Mlp", "SwiGLU", "make_act", "make_mlp",
    "make_norm", "PatchEmbed", "conv_to_linear_weight", "linear_to_conv_weight", "patchify", "resample_pos_embed",
    "sincos_1d", "sincos_2d", "ViT", "TextTransformer", "ImageTextModel",
]
