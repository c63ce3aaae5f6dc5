"""torchvision ``VisionTransformer`` state dicts (``vit_b_16``, ``vit_b_32``, ``vit_l_16`` ...):
``class_token``, ``conv_proj``, ``encoder.pos_embedding``, ``encoder.layers.encoder_layer_N.{ln_1,
self_attention.in_proj_weight, self_attention.out_proj, ln_2, mlp.0, mlp.3}``, ``encoder.ln``,
``heads.head`` and, with ``representation_size``, ``heads.pre_logits`` (Linear + tanh).

``in_proj_weight`` is already the fused (3D, D) q;k;v matrix timm uses. torchvision's ViT is
square-only, eps 1e-6, exact GELU, class-token pooled. Its weights expect ImageNet mean/std,
bilinear resize to 256 and a 224 center crop (crop_pct 0.875), as its weight metadata says.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError, ConfigError
from ..io import save_state_dict
from .common import Converted, family_parts, grid_from_rows, guess_heads, size_hints
from .source import Format, Source
from .table import RenameTable

# one table, both directions (vitkit name, torchvision name); the first spelling is what export writes
TABLE = RenameTable([
    ("cls_token", "class_token"),
    ("patch_embed.proj.{p}", "conv_proj.{p}"),
    ("pos_embed", "encoder.pos_embedding"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.encoder_layer_{i}.ln_1.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.encoder_layer_{i}.ln_2.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.encoder_layer_{i}.self_attention.in_proj_{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.encoder_layer_{i}.self_attention.out_proj.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.encoder_layer_{i}.mlp.0.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.encoder_layer_{i}.mlp.3.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.encoder_layer_{i}.mlp.linear_1.{p}"),  # older torchvision
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.encoder_layer_{i}.mlp.linear_2.{p}"),
    ("norm.{p}", "encoder.ln.{p}"),
    ("pre_logits.fc.{p}", "heads.pre_logits.{p}"),
    ("head.{p}", "heads.head.{p}"),
])


def looks_like_torchvision(keys) -> bool:
    return "conv_proj.weight" in set(keys) and any(k.startswith("encoder.layers.encoder_layer_") for k in keys)


def convert(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    src = Source.of(path)
    p = src.path
    raw = src.tensors()
    state, unmatched = TABLE.to_vitkit(raw)
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{p}: no conv_proj.weight; not a torchvision ViT state dict")
    dim, in_ch, ph, pw = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    rows = state["pos_embed"].shape[1]
    image = grid_from_rows(rows - 1, (ph, pw), *size_hints(hints, arch))
    heads = guess_heads(dim, (hints or {}).get("num_heads") or (arch.num_heads if arch else None), str(p))
    config = ViTConfig(
        image_size=image if image[0] != image[1] else image[0], patch_size=(ph, pw), in_channels=in_ch,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0, dim=dim, depth=depth,
        num_heads=heads, mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0], qkv_bias="blocks.0.attn.qkv.bias" in state,
        norm_eps=1e-6, head_hidden_dim=state["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in state else None,
        head_act="tanh",
    )
    H, W = config.image_hw
    pre = {"input_size": [in_ch, H, W], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
           "interpolation": "bilinear", "crop_pct": 0.875}
    if in_ch != 3:
        pre.update(mean=[0.5] * in_ch, std=[0.5] * in_ch)
    return Converted(config=config.replace(pos_resample="torchvision"), state=state, format="torchvision",
                     source=str(p), preprocess=pre,
                     unexpected=unmatched)


def export_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights in torchvision's names (for ``torchvision.models.VisionTransformer``)."""
    c = model.config
    if (not c.norm_first or c.pooling != "cls" or c.num_registers or c.layer_scale is not None or c.fc_norm
            or c.act != "gelu" or not c.qkv_bias or c.image_hw[0] != c.image_hw[1] or c.pos_embed != "learned"
            or family_parts(c)):
        raise ConfigError("this config has no torchvision VisionTransformer equivalent (torchvision's ViT is "
                          f"square, class-token pooled, exact GELU, none of {family_parts(c) or 'the family parts'})")
    out, left = TABLE.from_vitkit(dict(model.state_dict()))
    if left:
        raise ConfigError(f"torchvision's ViT has no names for {left}")
    return out


def export(model, path: str | Path) -> Path:
    """A safetensors state dict in torchvision's names."""
    return save_state_dict(export_state_dict(model), path)


FORMAT = Format("torchvision", "torchvision vit_* state dict", read=convert, write=export,
                detect_keys=looks_like_torchvision, tiny_hints=dict(num_heads=2))  # heads: not in the weights
