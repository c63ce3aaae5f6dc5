"""timm ``VisionTransformer`` checkpoints: a state dict file (.safetensors / .pth / .bin) or a
timm hub directory (``config.json`` with ``architecture`` + ``pretrained_cfg`` [+ ``model_args``]
and ``model.safetensors`` / ``pytorch_model.bin``).

One module on purpose (~430 lines): it is one format, reader and writer (``FORMAT`` pairs them)
sharing the activation and architecture-name tables, as every other format module is one file.

vitkit's parameter names are timm's, so the rename table is the identity; what takes work is the
config. In order of trust: ``model_args`` from the hub config; the ``architecture`` name when it
is a vitkit preset; the tensor shapes (dim, depth, patch, grid, classes, qkv bias, registers,
layer scale, fc_norm / mean pooling, pos table with or without prefix rows). Heads cannot be seen
in the weights: see :func:`~vitkit.interop.common.guess_heads`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..config import ACTIVATION_NAMES, PRESETS, ViTConfig, resolve_name
from ..errors import CheckpointError, ConfigError
from ..io import atomic_write_text, save_state_dict
from . import aimv2, dinov3, eva, naflex
from .common import Converted, guess_heads, layout_from_rows, size_hints
from .families import layout_family
from .source import Format, Source

log = logging.getLogger("vitkit.interop")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")

# timm act_layer strings (model_args) -> vitkit, from the one activation table. Anything else is
# an error naming the value.
_ACTS = {t: act for act, names in ACTIVATION_NAMES.items() for t in names.timm}


def is_timm_dir(src: Source) -> bool:
    meta = src.config()
    return meta is not None and "architecture" in meta and "pretrained_cfg" in meta


def looks_like_timm(keys) -> bool:
    keys = set(keys)  # embeds.proj: NaFlexVit (vitkit.interop.naflex)
    return (("patch_embed.proj.weight" in keys or "embeds.proj.weight" in keys)
            and any(k.startswith("blocks.0.attn.qkv") for k in keys))


def act_from_args(args: dict[str, Any], architecture: str | None, source: str, notes: list[str]) -> str:
    """The MLP activation: ``model_args['act_layer']``, else the architecture name (timm's
    ``*_quickgelu_*`` variants), else timm's default GELU. An unknown name is an error."""
    raw = args.get("act_layer")
    if raw is not None:
        act = _ACTS.get(str(raw).lower())
        if act is None:
            raise CheckpointError(f"{source}: timm act_layer={raw!r} is not an activation vitkit knows "
                                  f"(known: {sorted(_ACTS)}); pass act=... to choose one")
        return act
    if architecture and "quickgelu" in architecture:
        return "quick_gelu"
    return "gelu"


def _pooling(state: dict[str, torch.Tensor], args: dict[str, Any], source: str, class_token: bool,
             fc_norm: bool) -> str:
    pool = args.get("global_pool")
    if pool not in (None, "", "token", "avg", "map"):
        raise CheckpointError(f"{source}: timm global_pool={pool!r} is not supported (only 'token', 'avg', 'map')")
    if "attn_pool.latent" in state or pool == "map":
        return "map"
    return "mean" if (pool == "avg" or fc_norm or not class_token) else "cls"


def _position_layout(state: dict[str, torch.Tensor], args: dict[str, Any], prefix: int, patch: tuple[int, int],
                     hints: tuple[Any, ...], regs: int) -> tuple[str, Any, bool]:
    """(pos_embed, image_size, pos_embed_prefix) from the position table's rows and the size hints."""
    if "pos_embed" not in state:
        return "none", next((h for h in (*hints, args.get("img_size")) if h is not None), 224), True
    rows = state["pos_embed"].shape[1]
    known = None if "no_embed_class" not in args else not args["no_embed_class"]
    # No config: timm's default table has prefix rows; a square table without them is
    # no_embed_class (DeiT-III, *_reg4 models). A size hint that fits decides; when both
    # readings are square, register models read as no_embed_class (all of timm's are).
    image_size, pos_prefix = layout_from_rows(rows, prefix, patch, *hints, args.get("img_size"),
                                              prefix_rows=known, prefer_prefix=regs == 0)
    return "learned", image_size, pos_prefix


def _part_flags(state: dict[str, torch.Tensor], swiglu: bool, dist: bool) -> dict[str, Any]:
    """The config fields that differ from vitkit's defaults, as the state dict's keys show them."""
    extra: dict[str, Any] = {}
    if swiglu:
        extra["mlp_layer"] = "swiglu"
    if "norm_pre.weight" in state:
        extra["norm_pre"] = True
    if "patch_embed.proj.bias" not in state:
        extra["patch_bias"] = False
    if "head.weight" in state and "head.bias" not in state:
        extra["head_bias"] = False
    if dist:
        extra["dist_token"] = True
    if "blocks.0.norm1.weight" in state and "blocks.0.norm1.bias" not in state:
        extra["norm_layer"] = "rmsnorm"
    if "patch_embed.norm.weight" in state:
        extra["patch_norm"] = True
    if "blocks.0.attn.proj.weight" in state and "blocks.0.attn.proj.bias" not in state:
        extra["proj_bias"] = False  # timm's proj_bias: the MLP's linears have none either
    return extra


def infer_config(state: dict[str, torch.Tensor], args: dict[str, Any], source: str,
                 hints: tuple[Any, ...] = (), notes: list[str] | None = None,
                 architecture: str | None = None) -> ViTConfig:
    """A ViTConfig from timm ``model_args`` (may be empty), size ``hints`` (the user's image_size,
    arch's, the checkpoint config's; the first whose grid fits the table is used) and the shapes."""
    notes = notes if notes is not None else []
    w = state.get("patch_embed.proj.weight")
    if w is None:
        raise CheckpointError(f"{source}: no patch_embed.proj.weight, not a timm ViT state dict")
    dim, in_ch, ph, pw = w.shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    class_token = "cls_token" in state
    dist = "dist_token" in state
    regs = state["reg_token"].shape[1] if "reg_token" in state else 0
    fc1, fc2 = state["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc2.weight"]
    # SwiGLUPacked (DINOv2 giant): fc1 holds [w1; w2], twice the width fc2 reads
    swiglu = fc1.shape[0] == 2 * fc2.shape[1]
    layer_scale = None
    if "blocks.0.ls1.gamma" in state:
        layer_scale = args.get("init_values") or 1e-5  # the init value; the loaded gamma replaces it
    fc_norm = "fc_norm.weight" in state
    head_hidden = state["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in state else None
    pooling = _pooling(state, args, source, class_token, fc_norm)
    pos, image_size, pos_prefix = _position_layout(state, args, int(class_token) + int(dist) + regs, (ph, pw),
                                                   hints, regs)
    act = "silu" if swiglu else act_from_args(args, architecture, source, notes)
    # a norm after the patch embedding (embed_norm_layer) is, among timm's ViTs, AIMv2's alone (aimv2_*)
    aim = "patch_embed.norm.weight" in state
    heads = guess_heads(dim, args.get("num_heads") or (aimv2.HEADS_BY_DIM.get(dim) if aim else None), source)
    # timm's CLIP models (pre_norm=True) use LayerNorm eps 1e-5 (OpenAI's nn.LayerNorm), aimv2_* RmsNorm
    # eps 1e-5; the rest 1e-6
    eps = 1e-5 if ("norm_pre.weight" in state or (architecture and "_clip_" in architecture) or aim) else 1e-6
    if "norm_pre.weight" in state and "act_layer" not in args and not (architecture and "quickgelu" in architecture):
        notes.append(f"activation {act!r} as timm's vit_*_clip_* models (OpenAI's own weights use QuickGELU: "
                     "pass act='quick_gelu' for those)")
    return ViTConfig(
        image_size=tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size,
        patch_size=(ph, pw), in_channels=in_ch, num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        dim=dim, depth=depth, num_heads=heads, mlp_dim=fc2.shape[1], qkv_bias="blocks.0.attn.qkv.bias" in state,
        norm_eps=eps, act=act, pos_embed=pos, pos_embed_prefix=pos_prefix, pooling=pooling, class_token=class_token,
        num_registers=regs, fc_norm=fc_norm, head_hidden_dim=head_hidden, head_act="tanh", layer_scale=layer_scale,
        **_part_flags(state, swiglu, dist),
    )


def _preprocess(pcfg: dict[str, Any] | None, config: ViTConfig) -> dict[str, Any] | None:
    if not pcfg:
        return None
    size = list(pcfg.get("input_size") or [config.in_channels, *config.image_hw])
    return {"input_size": size, "mean": list(pcfg.get("mean", (0.5, 0.5, 0.5))),
            "std": list(pcfg.get("std", (0.5, 0.5, 0.5))), "interpolation": pcfg.get("interpolation", "bicubic"),
            "crop_pct": float(pcfg.get("crop_pct", 1.0) or 1.0)}


def convert(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """Read a timm checkpoint file or hub directory into vitkit names (identical) and a config."""
    src = Source.of(path)
    p = src.path
    meta: dict[str, Any] = {}
    if p.is_dir():
        meta = src.json(p / "config.json")
        files = [p / f for f in WEIGHT_FILES if (p / f).is_file()]
        if not files:
            raise CheckpointError(f"{p}: timm directory without weights (expected one of {WEIGHT_FILES})")
        wfile = files[0]
    else:
        wfile = p
    state = src.tensors(wfile)
    args = dict(meta.get("model_args") or {})
    if meta.get("global_pool") and "global_pool" not in args:
        args["global_pool"] = meta["global_pool"]
    architecture = meta.get("architecture")
    if "dinov3" not in (architecture or "") and eva.is_eva(state, architecture):  # EVA-02, PE, RoPE ViTs
        pcfg = meta.get("pretrained_cfg") or {}
        own = (tuple(pcfg["input_size"][1:]) if "input_size" in pcfg else None,)
        conv = eva.convert_timm(state, args, architecture, str(p), dict(hints or {}), size_hints(hints, arch, *own))
        conv.preprocess = _preprocess(pcfg, conv.config)
        return conv
    if dinov3.looks_like_timm_dinov3(state, meta.get("architecture")):
        pcfg = meta.get("pretrained_cfg") or {}
        h = dict(hints or {})
        if h.get("num_heads"):
            args["num_heads"] = h["num_heads"]
        size = h.get("image_size") or (arch.image_size if arch else None) or args.get("img_size") or (
            tuple(pcfg["input_size"][1:]) if "input_size" in pcfg else 224)
        conv = dinov3.convert_timm(state, args, meta.get("architecture"), str(p), size)
        conv.preprocess = _preprocess(pcfg, conv.config) or conv.preprocess
        return conv
    hints = dict(hints or {})
    notes: list[str] = []
    naflex_fields: dict[str, Any] = {}
    if naflex.looks_like_timm_naflex(state):
        state, args, naflex_fields = naflex.from_timm(state, meta, args, str(p), notes)
    if "blocks.0.mlp.fc1_g.weight" in state:  # timm's unpacked SwiGLU (aimv2_*): packed as vitkit's fc1
        state = aimv2.from_timm_names(state)
    architecture = meta.get("architecture")
    preset = None
    if architecture:
        try:
            preset = PRESETS[resolve_name(architecture)]
        except ConfigError:
            pass
    if hints.get("num_heads"):
        args["num_heads"] = hints["num_heads"]
    elif arch is not None:
        args.setdefault("num_heads", arch.num_heads)
    elif preset is not None:
        args.setdefault("num_heads", preset.num_heads)
    if hints.get("act"):
        args["act_layer"] = hints["act"]  # the user's word beats the file's (and an unknown name there)
    pcfg = meta.get("pretrained_cfg") or {}
    own = (args.get("img_size"), tuple(pcfg["input_size"][1:]) if "input_size" in pcfg else None,
           preset.image_size if preset is not None else None)
    args.pop("img_size", None)
    config = infer_config(state, args, str(p), hints=size_hints(hints, arch, *own), notes=notes,
                          architecture=architecture)
    if naflex_fields:
        config = config.replace(**naflex_fields)
    if "norm_eps" in meta:  # written by vitkit's export (timm's model_args cannot hold it)
        config = config.replace(norm_eps=float(meta["norm_eps"]))
    if args.get("dynamic_img_size"):  # timm's model takes any size, resampling its table per input (as "timm")
        config = config.replace(dynamic_img_size=True)
    labels = meta.get("label_names")
    if isinstance(labels, dict):
        labels = [labels[str(i)] for i in range(len(labels))] if all(str(i) in labels for i in range(len(labels))) else None
    info = {"architecture": meta.get("architecture"), "tag": pcfg.get("tag")} if meta else {}
    c = config  # the family the layout says (informational: the layout itself is what loads)
    info["family"] = layout_family(c, dinov2="dinov2" in (architecture or "") or c.mlp_layer == "swiglu")
    return Converted(config=config, state=state, format="timm", source=str(p), preprocess=_preprocess(pcfg, config),
                     labels=list(labels) if labels else None, notes=notes, info={k: v for k, v in info.items() if v})


# --------------------------------------------------------------------------- export
def to_timm_kwargs(config: ViTConfig, serializable: bool = False) -> dict[str, Any]:
    """Arguments of ``timm.models.vision_transformer.VisionTransformer`` (or, with ``dist_token``,
    ``timm.models.deit.VisionTransformerDistilled``) for this config. ``serializable``: only
    JSON values (timm's ``model_args``: classes like the norm with its eps come from the
    architecture name then, see :func:`timm_architecture`)."""
    c = config
    if not c.norm_first or c.pos_embed not in ("learned", "none") or c.head_hidden_dim or c.qk_scale:
        raise ConfigError("this config has no timm VisionTransformer equivalent (post-norm, sin/cos table, "
                          "pre-logits layer or custom qk_scale)")
    if not ACTIVATION_NAMES[c.act].timm:
        raise ConfigError(f"activation {c.act!r} has no timm equivalent here")
    norm_pre, patch_bias = getattr(c, "norm_pre", False), getattr(c, "patch_bias", True)
    if norm_pre == patch_bias:
        raise ConfigError(f"timm ties the patch bias to pre_norm (bias = not pre_norm); this config has "
                          f"norm_pre={norm_pre}, patch_bias={patch_bias}")
    # timm's AIMv2 (aimv2_*): embed_norm_layer, unpacked SwiGLU (fc1_g / fc1_x), RmsNorm; its head is not in timm
    aim = getattr(c, "patch_norm", False)
    if aim and (c.norm_layer != "rmsnorm" or c.mlp_layer != "swiglu" or c.pooling == "map"):
        raise ConfigError("timm's only ViT with a norm after the patch embedding is aimv2_* (RmsNorm, SwiGLU, no "
                          f"attention head); this config has norm_layer={c.norm_layer!r}, mlp_layer={c.mlp_layer!r}, "
                          f"pooling={c.pooling!r}")
    if c.pooling == "map" and getattr(c, "map_head", "latent") != "latent":
        raise ConfigError(f"timm has no {c.map_head!r} attention-pooling head (its global_pool='map' is AttentionPoolLatent)")
    import torch.nn as nn

    swiglu = getattr(c, "mlp_layer", "mlp") == "swiglu"
    pool = {"mean": "avg", "map": "map"}.get(c.pooling, "token")
    kw: dict[str, Any] = dict(
        img_size=list(c.image_hw) if serializable else c.image_hw,
        patch_size=list(c.patch_hw) if serializable else c.patch_hw, in_chans=c.in_channels,
        num_classes=c.num_classes, embed_dim=c.dim, depth=c.depth, num_heads=c.num_heads,
        mlp_ratio=(2 if swiglu and not aim else 1) * c.hidden_dim / c.dim, qkv_bias=c.qkv_bias, class_token=c.class_token,
        reg_tokens=c.num_registers, no_embed_class=not c.pos_embed_prefix, init_values=c.layer_scale,
        global_pool=pool, fc_norm=c.fc_norm, pos_embed="learn" if c.pos_embed == "learned" else "none",
        pre_norm=norm_pre)
    if getattr(c, "dynamic_img_size", False):
        kw["dynamic_img_size"] = True
    if aim or not getattr(c, "proj_bias", True):  # aimv2_* defaults to False: say it either way
        kw["proj_bias"] = getattr(c, "proj_bias", True)
    if serializable:
        if c.act != "gelu":
            kw["act_layer"] = c.act
        return kw
    from functools import partial

    kw["act_layer"] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}.get(c.act, c.act)
    if getattr(c, "norm_layer", "layernorm") == "rmsnorm":
        from timm.layers import RmsNorm

        kw["norm_layer"] = partial(RmsNorm, eps=c.norm_eps)
    else:
        kw["norm_layer"] = partial(nn.LayerNorm, eps=c.norm_eps)
    if aim:
        from timm.layers import SwiGLU

        kw["embed_norm_layer"], kw["mlp_layer"] = kw["norm_layer"], SwiGLU
    elif swiglu:
        from timm.layers import SwiGLUPacked

        kw["mlp_layer"] = SwiGLUPacked
    return kw


# timm's registered VisionTransformer models (timm 1.0.31; each built on the meta device to read its
# sizes), by the parts timm's JSON model_args cannot set: the model class (DeiT's distilled one),
# the MLP (DINOv2-g's SwiGLU) and CLIP's norm_pre with its LayerNorm eps 1e-5 ("plain": eps 1e-6,
# plain MLP). Within a family, (dim, depth, heads) -> names; a name tells the rest (patch,
# registers, pooling, image size), see _name_parts.
_TIMM_VITS: dict[str, dict[tuple[int, int, int], str]] = {
    "plain": {
        (192, 12, 3): "vit_tiny_patch16_224 vit_tiny_patch16_384",
        (256, 14, 4): "vit_wee_patch16_reg1_gap_256",
        (320, 14, 5): "vit_little_patch16_reg1_gap_256 vit_little_patch16_reg4_gap_256",
        (384, 12, 6): "vit_small_patch8_224 vit_small_patch14_dinov2 vit_small_patch14_reg4_dinov2 "
                      "vit_small_patch16_224 vit_small_patch16_384 vit_small_patch32_224 "
                      "vit_small_patch32_384",
        (384, 36, 6): "vit_small_patch16_36x1_224",
        (512, 12, 8): "vit_medium_patch16_gap_240 vit_medium_patch16_gap_256 vit_medium_patch16_gap_384 "
                      "vit_medium_patch16_reg1_gap_256 vit_medium_patch16_reg4_gap_256",
        (512, 20, 8): "vit_mediumd_patch16_reg4_gap_256 vit_mediumd_patch16_reg4_gap_384",
        (640, 12, 10): "vit_betwixt_patch16_gap_256 vit_betwixt_patch16_reg1_gap_256 "
                       "vit_betwixt_patch16_reg4_gap_256 vit_betwixt_patch16_reg4_gap_384",
        (768, 12, 12): "vit_base_patch8_224 vit_base_patch14_dinov2 vit_base_patch14_reg4_dinov2 "
                       "vit_base_patch16_224 vit_base_patch16_384 vit_base_patch16_reg4_gap_256 "
                       "vit_base_patch16_siglip_224 vit_base_patch16_siglip_256 "
                       "vit_base_patch16_siglip_384 vit_base_patch16_siglip_512 "
                       "vit_base_patch16_siglip_gap_224 vit_base_patch16_siglip_gap_256 "
                       "vit_base_patch16_siglip_gap_384 vit_base_patch16_siglip_gap_512 "
                       "vit_base_patch32_224 vit_base_patch32_384 vit_base_patch32_siglip_256 "
                       "vit_base_patch32_siglip_gap_256",
        (768, 12, 16): "vit_base_patch16_gap_224",
        (832, 21, 13): "vit_so150m2_patch16_reg1_gap_256 vit_so150m2_patch16_reg1_gap_384 "
                       "vit_so150m2_patch16_reg1_gap_448",
        (896, 12, 14): "vit_base_patch16_plus_240 vit_base_patch32_plus_256",
        (896, 18, 14): "vit_so150m_patch16_reg4_gap_256 vit_so150m_patch16_reg4_gap_384 "
                       "vit_so150m_patch16_reg4_map_256",
        (1024, 24, 16): "vit_large_patch14_224 vit_large_patch14_dinov2 vit_large_patch14_reg4_dinov2 "
                        "vit_large_patch16_224 vit_large_patch16_384 vit_large_patch16_siglip_256 "
                        "vit_large_patch16_siglip_384 vit_large_patch16_siglip_512 "
                        "vit_large_patch16_siglip_gap_256 vit_large_patch16_siglip_gap_384 "
                        "vit_large_patch16_siglip_gap_512 vit_large_patch32_224 vit_large_patch32_384",
        (1152, 27, 16): "vit_so400m_patch14_siglip_224 vit_so400m_patch14_siglip_378 "
                        "vit_so400m_patch14_siglip_384 vit_so400m_patch14_siglip_gap_224 "
                        "vit_so400m_patch14_siglip_gap_378 vit_so400m_patch14_siglip_gap_384 "
                        "vit_so400m_patch14_siglip_gap_448 vit_so400m_patch14_siglip_gap_896 "
                        "vit_so400m_patch16_siglip_256 vit_so400m_patch16_siglip_384 "
                        "vit_so400m_patch16_siglip_512 vit_so400m_patch16_siglip_gap_256 "
                        "vit_so400m_patch16_siglip_gap_384 vit_so400m_patch16_siglip_gap_512",
        (1280, 32, 16): "vit_huge_patch14_224 vit_huge_patch14_gap_224 vit_huge_patch16_gap_448",
        (1408, 40, 16): "vit_giant_patch14_224 vit_giant_patch16_gap_224",
        (1536, 40, 16): "vit_giantopt_patch16_siglip_256 vit_giantopt_patch16_siglip_384 "
                        "vit_giantopt_patch16_siglip_gap_256 vit_giantopt_patch16_siglip_gap_384",
        (1664, 48, 16): "vit_gigantic_patch14_224",
    },
    "clip": {
        (256, 10, 4): "vit_xsmall_patch16_clip_224",
        (512, 12, 8): "vit_medium_patch16_clip_224 vit_medium_patch32_clip_224",
        (640, 12, 10): "vit_betwixt_patch32_clip_224",
        (768, 12, 12): "vit_base_patch16_clip_224 vit_base_patch16_clip_384 "
                       "vit_base_patch16_clip_quickgelu_224 vit_base_patch32_clip_224 "
                       "vit_base_patch32_clip_256 vit_base_patch32_clip_384 vit_base_patch32_clip_448 "
                       "vit_base_patch32_clip_quickgelu_224",
        (896, 12, 14): "vit_base_patch16_plus_clip_240",
        (1024, 24, 16): "vit_large_patch14_clip_224 vit_large_patch14_clip_336 "
                        "vit_large_patch14_clip_quickgelu_224 vit_large_patch14_clip_quickgelu_336",
        (1280, 32, 16): "vit_huge_patch14_clip_224 vit_huge_patch14_clip_336 vit_huge_patch14_clip_378 "
                        "vit_huge_patch14_clip_quickgelu_224 vit_huge_patch14_clip_quickgelu_378",
        (1408, 40, 16): "vit_giant_patch14_clip_224",
        (1664, 48, 16): "vit_gigantic_patch14_clip_224 vit_gigantic_patch14_clip_378 "
                        "vit_gigantic_patch14_clip_quickgelu_224",
    },
    "swiglu": {
        (1536, 40, 24): "vit_giant_patch14_dinov2 vit_giant_patch14_reg4_dinov2",
    },
    "aimv2": {
        (1024, 24, 8): "aimv2_large_patch14_224 aimv2_large_patch14_336 aimv2_large_patch14_448",
        (1536, 24, 12): "aimv2_huge_patch14_224 aimv2_huge_patch14_336 aimv2_huge_patch14_448",
        (2048, 24, 16): "aimv2_1b_patch14_224 aimv2_1b_patch14_336 aimv2_1b_patch14_448",
        (3072, 24, 24): "aimv2_3b_patch14_224 aimv2_3b_patch14_336 aimv2_3b_patch14_448",
    },
    "distilled": {
        (192, 12, 3): "deit_tiny_distilled_patch16_224",
        (384, 12, 6): "deit_small_distilled_patch16_224",
        (768, 12, 12): "deit_base_distilled_patch16_224 deit_base_distilled_patch16_384",
    },
}
# Where no registered model has the config's sizes: a model of the same family, whose sizes
# model_args replace (timm's own convention for custom sizes; timm.create_model refuses an
# unregistered name, so a made-up "neutral" one would not load).
_FAMILY_BASE = {"plain": "vit_base_patch16_224", "clip": "vit_base_patch16_clip_224",
                "swiglu": "vit_giant_patch14_dinov2", "distilled": "deit_base_distilled_patch16_224",
                "aimv2": "aimv2_large_patch14_224"}


def _name_parts(name: str) -> tuple[int, int, str, bool, int | None]:
    """(patch, registers, pooling, QuickGELU, image size or None) as a timm ViT name spells them."""
    regs = re.search(r"_reg(\d+)_", name)
    size = re.search(r"_(\d+)$", name)
    pool = "mean" if "_gap" in name else "map" if ("siglip" in name or "_map_" in name) else "cls"
    return (int(re.search(r"patch(\d+)", name).group(1)), int(regs.group(1)) if regs else 0, pool,
            "quickgelu" in name, int(size.group(1)) if size else None)


def timm_architecture(config: ViTConfig) -> str:
    """The registered timm model this config is: same fixed parts (model class, MLP type, norm_pre
    and its eps) and, where timm has one, the same width, depth, heads and patch, preferring the
    same registers, pooling, activation and image size (a ViT-S/14 at 112 px is
    vit_small_patch14_dinov2 with img_size 112). ``timm.create_model(architecture, **model_args)``
    rebuilds it either way: model_args set every size."""
    c = config
    family = ("distilled" if getattr(c, "dist_token", False) else "aimv2" if getattr(c, "patch_norm", False)
              else "swiglu" if getattr(c, "mlp_layer", "mlp") == "swiglu"
              else "clip" if getattr(c, "norm_pre", False) else "plain")
    names = [n for n in _TIMM_VITS[family].get((c.dim, c.depth, c.num_heads), "").split()
             if c.patch_hw[0] == c.patch_hw[1] == _name_parts(n)[0]]
    want = (c.num_registers, c.pooling, c.act == "quick_gelu", c.image_hw[0] if c.image_hw[0] == c.image_hw[1] else -1)
    if names:
        return max(names, key=lambda n: ([a == b for a, b in zip(_name_parts(n)[1:], want)], n == c.name))
    if family == "clip" and c.act == "quick_gelu":
        return "vit_base_patch16_clip_quickgelu_224"
    if family == "plain" and c.pooling == "map":
        return "vit_base_patch16_siglip_224"
    return _FAMILY_BASE[family]


def export(model, path: str | Path) -> Path:
    """Write a timm hub-style directory: config.json (architecture, model_args, pretrained_cfg)
    + model.safetensors. ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`` or
    ``VisionTransformer(**model_args)`` + ``load_state_dict`` read it back."""
    c = model.config
    if c.naflex_max_patches:  # timm's NaFlexVit: a VisionTransformer would drop the NaFlex input
        return naflex.export_timm(model, path)
    if eva.writes(c):  # RoPE, an MLP / attention norm, PE's pooling: timm's Eva holds these
        return eva.export(model, path)
    kw = to_timm_kwargs(c)
    aim = getattr(c, "patch_norm", False)  # aimv2_*: unpacked SwiGLU, mlp_ratio counts the gated width
    swiglu = getattr(c, "mlp_layer", "mlp") == "swiglu" and not aim
    if int(c.hidden_dim) * (2 if swiglu else 1) != int(c.dim * kw["mlp_ratio"]):
        raise ConfigError(f"mlp_dim {c.hidden_dim} is not reachable by timm's mlp_ratio for dim {c.dim}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    if aim:
        state = aimv2.to_timm_names(state)
    if c.pos_embed != "learned":
        state.pop("pos_embed", None)
    for head in ("head", "head_dist"):  # timm heads always have a bias: a zero one is the same map
        if f"{head}.weight" in state and f"{head}.bias" not in state:
            state[f"{head}.bias"] = torch.zeros(state[f"{head}.weight"].shape[0])
    pre = model.preprocess_cfg or {}
    model_args = to_timm_kwargs(c, serializable=True)
    if c.norm_eps != (1e-5 if aim else 1e-6) and not getattr(c, "norm_pre", False):
        log.warning("timm's model_args cannot carry LayerNorm eps %g; timm.create_model(%r, **model_args) uses "
                    "its architecture's (vitkit reads it back from norm_eps in config.json)", c.norm_eps,
                    timm_architecture(c))
    meta = {
        "architecture": timm_architecture(c),
        "norm_eps": c.norm_eps,
        "num_classes": c.num_classes,
        "num_features": c.dim,
        "global_pool": model_args["global_pool"],
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": list(pre.get("input_size", [c.in_channels, *c.image_hw])),
            "interpolation": pre.get("interpolation", "bicubic"), "crop_pct": pre.get("crop_pct", 1.0),
            "crop_mode": "center", "mean": list(pre.get("mean", [0.5] * c.in_channels)),
            "std": list(pre.get("std", [0.5] * c.in_channels)), "num_classes": c.num_classes,
            "first_conv": "patch_embed.proj", "classifier": "head", "fixed_input_size": True,
        },
    }
    if model.labels:
        meta["label_names"] = list(model.labels)
    save_state_dict(state, out / "model.safetensors", metadata={"format": "pt"})
    import json

    atomic_write_text(out / "config.json", json.dumps(meta, indent=2) + "\n")
    return out


FORMAT = Format(
    "timm", "timm VisionTransformer state dict or hub dir (ViT, DeiT, DINOv2, CLIP, SigLIP)", read=convert,
    write=export, writes_dir=True, writes_rope=True, detect_dir=is_timm_dir, detect_keys=looks_like_timm,
    tiny=dict(image_size=(32, 48), patch_size=16, num_classes=5, dim=32, depth=2, num_heads=2, dist_token=True),
)
