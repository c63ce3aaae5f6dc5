"""The Hugging Face transformers format: a directory with ``config.json`` (its ``model_type`` names
the family) + ``model.safetensors`` (or ``pytorch_model.bin``) + an optional
``preprocessor_config.json``. One format, one family per module: :data:`MODEL_TYPES` says which
module reads which ``model_type``; export picks the transformers class the model's layout needs
(:func:`vitkit.interop.families.layout_family`). The shared helpers are
:mod:`vitkit.interop.hf_common`; the plain ViT is :mod:`vitkit.interop.hf_vit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ViTConfig
from ..errors import CheckpointError
from . import aimv2, clip, deit, dinov2, dinov3, hf_vit, mae, siglip
from .common import Converted
from .families import layout_family
from .source import Format, Source

# transformers model_type -> the family module that reads it (its convert_hf) and writes it (export_hf)
MODEL_TYPES = {"vit": hf_vit, "deit": deit, "dinov2": dinov2, "dinov2_with_registers": dinov2, "clip": clip,
               "clip_vision_model": clip, "siglip": siglip, "siglip_vision_model": siglip, "siglip2": siglip,
               "siglip2_vision_model": siglip, "dinov3_vit": dinov3, "vit_mae": mae,
               "aimv2_vision_model": aimv2, "aimv2": aimv2}
_EXPORTS = {"deit": deit, "siglip": siglip, "clip": clip, "dinov2": dinov2, "aimv2": aimv2}  # layout_family -> writer


def model_type(meta: dict[str, Any]) -> str | None:
    mt = meta.get("model_type")
    if mt in MODEL_TYPES:
        return mt
    if any(str(a).startswith("ViT") for a in meta.get("architectures") or []):
        return "vit"
    return None


def is_hf_dir(src: Source) -> bool:
    meta = src.config()
    return meta is not None and model_type(meta) is not None


def looks_like_hf(keys) -> bool:
    return any(".attention.attention.query" in k or ".attention.q_proj" in k or ".self_attn.q_proj" in k
               for k in keys)


def read(path: Source | str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """Read a transformers checkpoint (directory, or a weight file next to its config.json) with the
    family module its ``model_type`` names."""
    src = Source.of(path)
    if src.path.is_file() and src.path.suffix != ".json" and not (src.directory / "config.json").is_file():
        raise CheckpointError(f"{src.path}: a Hugging Face weight file needs its config.json next to it")
    meta = src.json(src.directory / "config.json")
    mt = model_type(meta)
    if mt is None:
        raise CheckpointError(f"{src.directory}: config.json model_type={meta.get('model_type')!r} is not one vitkit "
                              f"reads (known: {list(MODEL_TYPES)})")
    return MODEL_TYPES[mt].convert_hf(src, arch, hints)


def export(model, path: str | Path) -> Path:
    """Write a transformers directory for the model's family: ``DeiTForImageClassificationWithTeacher``
    / ``DeiTModel`` (distillation token), ``SiglipVisionModel`` (attention pooling),
    ``CLIPVisionModel[WithProjection]`` (ln_pre), ``Dinov2[WithRegisters]Model`` (layer scale,
    registers or SwiGLU), ``Aimv2VisionModel`` (patch norm), ``ViTMAEModel`` for weights read as MAE (a plain ViT layout), else ViT."""
    c = model.config
    if (getattr(model, "pretrained_info", None) or {}).get("family") == "mae" and layout_family(c, False) is None:
        return mae.export_hf(model, path)
    family = layout_family(c, dinov2=c.layer_scale is not None or bool(c.num_registers) or c.mlp_layer == "swiglu")
    return _EXPORTS.get(family, hf_vit).export_hf(model, path)


FORMAT = Format(
    "hf", "Hugging Face transformers dir: ViT, DeiT, Dinov2[WithRegisters], DINOv3ViT, CLIP, SigLIP/SigLIP2, ViTMAE, Aimv2",
    aliases=("huggingface", "transformers"), read=read, write=export, writes_dir=True, detect_dir=is_hf_dir,
    detect_keys=looks_like_hf, tiny=dict(image_size=32, patch_size=16, num_classes=5, dim=32, depth=2, num_heads=2,
                                         norm_eps=1e-12),
)
