"""NaFlex checkpoints (variable resolution at each image's own aspect ratio; :mod:`vitkit.model.naflex`):

* Hugging Face ``Siglip2VisionModel`` / ``Siglip2Model`` directories (``model_type``
  ``siglip2[_vision_model]``): read by :func:`vitkit.interop.siglip.convert_hf` (the same names as
  SigLIP) with the parts here: the patch embedding is ``nn.Linear(C*P*P, D)`` over patches
  flattened (ph, pw, C) (``Siglip2ImageProcessor.convert_image_to_patches``), the conv kernel
  permuted; the (num_patches, D) table is a square grid, resampled per image with bilinear +
  antialias (``resize_positional_embeddings``: :func:`~vitkit.model.pos_embed.resample_big_vision`);
  ``max_num_patches`` from ``preprocessor_config.json`` (the processor's default 256 without one).
* timm ``naflexvit_*`` state dicts and hub dirs (``embeds.*``): read by :mod:`vitkit.interop.timm`,
  which hands them to :func:`convert_timm`: ``embeds.proj`` (Linear, (ph, pw, C) unless
  ``patchify_channels_last=False``), ``embeds.pos_embed`` (1, H, W, D), ``embeds.cls_token`` /
  ``reg_token``; the blocks and heads have timm ViT names. The table resampling is the model's
  ``pos_embed_interp_mode`` (bicubic by default, bilinear for the ``*_siglip`` models) with
  antialias. Refused, with the reason: factorized tables, aspect-preserving table resampling, RoPE,
  a norm on the patch input or embedding, grid_sample resampling, no antialias (NaFlex RADIO).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..model.patch_embed import conv_to_linear_weight, linear_to_conv_weight

HF_MAX_PATCHES = 256  # Siglip2ImageProcessor.max_num_patches default
TIMM_MAX_PATCHES = 576  # timm's NaFlex eval loader default (create_naflex_loader max_seq_len)
# timm pos_embed_interp_mode (with antialias) -> the vitkit resampler that computes the same
_TIMM_RESAMPLE = {"bicubic": "timm", "bilinear": "big_vision"}


def is_siglip2(meta: dict[str, Any]) -> bool:
    archs = [str(a) for a in meta.get("architectures") or []]
    return str(meta.get("model_type", "")).startswith("siglip2") or any(a.startswith("Siglip2") for a in archs)


def hf_patch_kernel(weight: torch.Tensor, vc: dict[str, Any], source: str) -> torch.Tensor:
    """Siglip2's (D, P*P*C) patch Linear -> vitkit's conv kernel (D, C, P, P)."""
    C, P = int(vc.get("num_channels", 3)), int(vc.get("patch_size", 16))
    if weight.ndim != 2 or weight.shape[1] != C * P * P:
        raise CheckpointError(f"{source}: patch_embedding.weight {tuple(weight.shape)} is not the (D, {C * P * P}) "
                              f"Linear of {C}-channel {P}x{P} patches (config.json num_channels / patch_size)")
    return linear_to_conv_weight(weight, C, P, "ppc")


def hf_fields(directory: Path, notes: list[str]) -> dict[str, Any]:
    """The ViTConfig fields of a Siglip2 NaFlex tower: any grid, big_vision's bilinear resampling,
    and the processor's ``max_num_patches``."""
    from .source import Source

    pp = directory / "preprocessor_config.json"
    n = Source(directory).json(pp).get("max_num_patches") if pp.is_file() else None
    if n is None:
        n = HF_MAX_PATCHES
        notes.append(f"no max_num_patches in {pp.name}: NaFlex input of at most {n} patches (Siglip2ImageProcessor's "
                     "default); pass naflex_max_patches=... for another")
    return {"dynamic_img_size": True, "pos_resample": "big_vision", "naflex_max_patches": int(n)}


def looks_like_timm_naflex(state: dict[str, torch.Tensor]) -> bool:
    return "embeds.proj.weight" in state


def from_timm(state: dict[str, torch.Tensor], meta: dict[str, Any], args: dict[str, Any], source: str,
              notes: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """A timm NaFlexVit state dict (``meta``: its hub config.json, may be empty) -> (tensors in timm
    ViT names, the ``model_args`` the ViT reader infers the rest from, the NaFlex config fields)."""
    arch = str(meta.get("architecture") or "")
    unsupported = [k for k in ("embeds.pos_embed_y", "embeds.norm.weight", "embeds.norm_input.weight") if k in state]
    unsupported += [k for k in ("pos_embed_ar_preserving", "pos_embed_use_grid_sample", "rope_type",
                                "pos_embed_align_corners", "enable_patch_interpolator", "pool_include_prefix")
                    if args.get(k)]
    if "_par" in arch or "radio" in arch or args.get("pos_embed_antialias") is False:
        unsupported.append(arch or "pos_embed_antialias=False")
    if args.get("pos_embed") == "factorized" or args.get("global_pool") in ("avgmax", "max"):
        unsupported.append(f"pos_embed={args.get('pos_embed')!r}, global_pool={args.get('global_pool')!r}")
    w, pos = state["embeds.proj.weight"], state.get("embeds.pos_embed")
    if w.ndim != 2:
        unsupported.append("embed_proj_type='conv' (no NaFlex input: load it as a plain timm ViT)")
    if pos is None:
        unsupported.append("no learned table (embeds.pos_embed)")
    if unsupported:
        raise CheckpointError(f"{source}: a timm NaFlexVit with {unsupported}: vitkit's NaFlex path reproduces a "
                              "learned table resampled per image with antialias (no factorized / aspect-preserving / "
                              "grid_sample tables, RoPE or embedding norms) and token / avg / map pooling")
    interp = args.get("pos_embed_interp_mode") or ("bilinear" if "siglip" in arch else "bicubic")
    if interp not in _TIMM_RESAMPLE:
        raise CheckpointError(f"{source}: pos_embed_interp_mode={interp!r}: vitkit reproduces bicubic and bilinear")
    _, gh, gw, D = pos.shape
    C = int(args.get("in_chans", 3))
    P = math.isqrt(w.shape[1] // C)
    order = "ppc" if args.get("patchify_channels_last", True) else "cpp"
    out = {k: v for k, v in state.items() if not k.startswith("embeds.")}
    out["patch_embed.proj.weight"] = linear_to_conv_weight(w, C, P, order)
    out["pos_embed"] = pos.reshape(1, gh * gw, D)
    for name, to in (("proj.bias", "patch_embed.proj.bias"), ("cls_token", "cls_token"), ("reg_token", "reg_token")):
        if f"embeds.{name}" in state:
            out[to] = state[f"embeds.{name}"]
    # prefix tokens get no position (a table over the patches only); the table's grid is the size
    args = {**args, "no_embed_class": True, "img_size": (gh * P, gw * P)}
    n = int(args.get("max_seq_len") or meta.get("naflex_max_patches") or TIMM_MAX_PATCHES)
    notes.append(f"NaFlex input of at most {n} patches (timm's NaFlex loader default max_seq_len); "
                 "pass naflex_max_patches=... for another")
    # timm's NaFlexVit norms are LayerNorm(eps=1e-6) (its pre_norm too, unlike the CLIP ViTs)
    fields = {"norm_eps": 1e-6, "dynamic_img_size": True, "pos_resample": _TIMM_RESAMPLE[interp],
              "naflex_max_patches": n}
    return out, args, fields


def to_timm(model) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture, model_args, state dict) of timm's ``NaFlexVit`` for a NaFlex model: the inverse of
    :func:`from_timm` (``embeds.proj`` a Linear over (ph, pw, C) patches, ``embeds.pos_embed``
    (1, gh, gw, D)). ``timm.create_model(architecture, **model_args)`` loads the state strictly;
    model_args set every entrypoint default that differs, and the entrypoint is one without layer
    scale where the model has none (create_model drops None arguments). ConfigError for what
    NaFlexVit lacks."""
    from ..config import ACTIVATION_NAMES

    c = model.config
    why = [w for bad, w in (
        (c.norm_layer != "layernorm" or c.norm_eps != 1e-6, "a norm other than LayerNorm eps 1e-6"),
        (not c.norm_first, "post-norm"), (c.mlp_layer != "mlp", "a gated MLP"), (c.norm_pre, "norm_pre"),
        (c.patch_norm, "patch_norm"), (not c.patch_bias, "no patch bias"), (not c.proj_bias, "proj_bias=False"),
        (c.pos_embed != "learned", f"pos_embed={c.pos_embed!r}"), (c.pos_resample not in ("timm", "big_vision"),
                                                                     f"pos_resample={c.pos_resample!r}"),
        (c.pooling == "map" and c.map_head != "latent", f"map_head={c.map_head!r}"), (c.qk_scale, "qk_scale"),
        (c.head_hidden_dim, "a pre-logits layer"), (c.mlp_norm or c.attn_norm, "an MLP / attention norm"),
        (not ACTIVATION_NAMES[c.act].timm, f"act={c.act!r}"), (c.patch_hw[0] != c.patch_hw[1], "non-square patches"),
        (c.pooling == "map" and c.map_prefix, "attention pooling over the prefix tokens")) if bad]
    if why:
        raise ConfigError(f"no timm NaFlexVit equivalent: this NaFlex model has {', '.join(why)}")
    (gh, gw), D = c.grid_size, c.dim
    state = dict(model.state_dict())
    out = {"embeds.proj.weight": conv_to_linear_weight(state.pop("patch_embed.proj.weight"), "ppc"),
           "embeds.proj.bias": state.pop("patch_embed.proj.bias"),
           "embeds.pos_embed": state.pop("pos_embed").reshape(1, gh, gw, D)}
    for name in ("cls_token", "reg_token"):
        if name in state:
            out[f"embeds.{name}"] = state.pop(name)
    out.update(state)
    if "head.weight" in out and "head.bias" not in out:
        out["head.bias"] = torch.zeros(out["head.weight"].shape[0])
    args: dict[str, Any] = dict(
        patch_size=c.patch_hw[0], in_chans=c.in_channels, num_classes=c.num_classes, embed_dim=D, depth=c.depth,
        num_heads=c.num_heads, mlp_ratio=c.hidden_dim / D, qkv_bias=c.qkv_bias, class_token=c.class_token,
        reg_tokens=c.num_registers, pos_embed_grid_size=[gh, gw], act_layer=ACTIVATION_NAMES[c.act].timm[0],
        pos_embed_interp_mode={"timm": "bicubic", "big_vision": "bilinear"}[c.pos_resample],
        global_pool={"cls": "token", "mean": "avg", "map": "map"}[c.pooling], fc_norm=c.fc_norm,
        final_norm=c.final_norm, init_values=c.layer_scale)
    if c.pooling == "map":
        args.update(attn_pool_num_heads=c.map_num_heads or c.num_heads, attn_pool_mlp_ratio=c.map_mlp_ratio or
                    c.hidden_dim / D)
    arch = "naflexvit_base_patch16_gap" if c.layer_scale is not None else "naflexvit_base_patch16_siglip"
    return arch, {k: v for k, v in args.items() if v is not None}, out


def export_timm(model, path: str | Path) -> Path:
    """A timm hub directory of a ``NaFlexVit`` (config.json: architecture, model_args,
    pretrained_cfg, and vitkit's ``naflex_max_patches``; model.safetensors), read back by
    :func:`from_timm`."""
    import json

    from ..io import atomic_write_text, save_state_dict

    c = model.config
    arch, args, state = to_timm(model)
    pre = model.preprocess_cfg or {}
    meta = {"architecture": arch, "num_classes": c.num_classes, "num_features": c.dim,
            "global_pool": args["global_pool"], "model_args": args, "naflex_max_patches": c.naflex_max_patches,
            "pretrained_cfg": {"input_size": list(pre.get("input_size", [c.in_channels, *c.image_hw])),
                               "interpolation": pre.get("interpolation", "bilinear"), "crop_pct": 1.0,
                               "mean": list(pre.get("mean", [0.5] * c.in_channels)),
                               "std": list(pre.get("std", [0.5] * c.in_channels)), "num_classes": c.num_classes,
                               "fixed_input_size": False}}
    if model.labels:
        meta["label_names"] = list(model.labels)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(state, out / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(meta, indent=2) + "\n")
    return out
