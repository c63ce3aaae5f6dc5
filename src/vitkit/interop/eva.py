"""timm's ``Eva`` models (timm/models/eva.py), read through the ``timm`` format and written back:

* EVA-02 (``eva02_*``; Fang et al. 2023): a learned position table *and* axial RoPE (``rope="axial"``
  with EVA's reference grid), separate q/k/v or fused qkv with ``q_bias`` / ``v_bias`` and no key
  bias (fused here, k bias zeros: the same numbers), SwiGLU with separate ``fc1_g`` / ``fc1_x``
  (packed into vitkit's ``fc1 = [gate; value]``), a norm inside the MLP (``scale_mlp`` ->
  ``mlp_norm``), EVA-CLIP's norm on the attention output (``scale_attn_inner`` -> ``attn_norm``);
* Perception Encoder (``vit_pe_core_* / vit_pe_lang_* / vit_pe_spatial_*``; Bolya et al. 2025): a
  norm before the blocks, axial RoPE over (x, y) with the grid offset 1, attention pooling over
  every token with its own 8 heads (``map_num_heads``, ``map_prefix``), LayerNorm eps 1e-5, no
  final norm for lang / spatial;
* timm's RoPE ViTs (``vit_*_rope_*``): RoPE-ViT axial and mixed (Heo et al. 2024; mixed learns its
  frequencies per block and head: ``rope.freqs``), the ``*_ape`` ones with a table too, and timm's
  SBB ``vit_*_rope_reg*_gap_256``.

DINOv3's timm Eva (``vit_*_dinov3*``) keeps its reader, :func:`vitkit.interop.dinov3.convert_timm`.

What the tensors do not show (which RoPE, its base, offset, reference grid and axis order, the
pooling, the norm eps, the pooling heads) comes from the hub config's ``model_args`` over the
defaults of its ``architecture`` (:data:`ARCH_ARGS`, read from timm 1.0.31's entrypoints). A bare
state dict of these models says none of it: it is refused unless the caller names the RoPE
(``rope=...`` and its fields as overrides). Not reproduced (refused, naming the argument):
``use_post_norm`` (EVA-02-E's residual post-norm), ``qk_norm``, ``gated_attn``, ``num_kv_heads``,
``attn_only_layer_scale``, ``rope_type='mrope'``, rotate-half axial RoPE, ``swiglu_align_to``,
``avgmax`` / ``max`` pooling.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import CheckpointError, ConfigError
from ..io import atomic_write_text, save_state_dict
from .common import Converted, guess_heads, layout_from_rows

# timm Eva arguments the weights do not show, per architecture (first match wins); hub model_args
# override them. ``eps``: the LayerNorm eps of the entrypoint's norm_layer.
_EVA02 = dict(rope_type="cat", rope_temperature=10000.0, rope_grid_indexing="ij", ref_feat_shape=(16, 16), eps=1e-6)
_PE = dict(rope_type="cat", rope_temperature=10000.0, rope_grid_indexing="xy", rope_grid_offset=1.0, eps=1e-5)
_PE_CORE = dict(_PE, global_pool="map", attn_pool_num_heads=8, attn_pool_mlp_ratio=4.0)
ARCH_ARGS: tuple[tuple[str, dict[str, Any]], ...] = (
    (r"eva02_enormous_", dict(use_post_norm=True)),
    (r"eva02_.*_clip_", dict(_EVA02, global_pool="token")),
    (r"eva02_", _EVA02),
    (r"vit_pe_core_(tiny|small)_", dict(_PE_CORE, ref_feat_shape=(24, 24))),
    (r"vit_pe_core_base_", dict(_PE_CORE, ref_feat_shape=(14, 14))),
    (r"vit_pe_core_large_", dict(_PE_CORE, ref_feat_shape=(24, 24))),
    (r"vit_pe_core_gigantic_", dict(_PE_CORE, ref_feat_shape=(32, 32), rope_grid_offset=0.0)),
    (r"vit_pe_(lang|spatial)_gigantic_", dict(_PE, ref_feat_shape=(32, 32), rope_grid_offset=0.0)),
    (r"vit_pe_(lang|spatial)_", dict(_PE, ref_feat_shape=(32, 32))),
    (r"vit_.*_rope_mixed", dict(rope_type="mixed", rope_temperature=10.0, rope_grid_indexing="xy", global_pool="token",
                                eps=1e-6)),
    (r"vit_.*_rope_(ape_)?\d+$", dict(rope_type="cat", rope_temperature=100.0, rope_grid_indexing="xy",
                                      global_pool="token", eps=1e-6)),
    (r"vit_.*_rope_reg\d+_gap_", dict(rope_type="cat", rope_temperature=10000.0, rope_grid_indexing="ij",
                                      ref_feat_shape=(16, 16), eps=1e-6)),
)
# Eva arguments vitkit does not reproduce, with the value that is fine
_REFUSED = {"use_post_norm": False, "qk_norm": False, "gated_attn": False, "num_kv_heads": None,
            "attn_only_layer_scale": False, "swiglu_align_to": 0, "rope_rotate_half": False, "dynamic_img_pad": False,
            "attn_head_dim": None, "patch_drop_rate": 0.0}
_ROPES = {"cat": "axial", "mixed": "mixed"}


def arch_args(architecture: str | None) -> dict[str, Any] | None:
    """The defaults :data:`ARCH_ARGS` holds for a timm Eva architecture name (tag stripped), or None."""
    name = (architecture or "").split(".")[0]
    return next((dict(a) for pat, a in ARCH_ARGS if re.match(pat, name)), None)


def is_eva_layout(state) -> bool:
    """timm's Eva names: layer scale as ``gamma_1``, ``q_bias`` / separate ``q_proj``, an MLP norm,
    or learned RoPE frequencies (a plain timm ViT has none of them; AIMv2's ``fc1_g`` alone is not Eva's)."""
    keys = set(state)
    return "patch_embed.proj.weight" in keys and any(
        k in keys for k in ("blocks.0.gamma_1", "blocks.0.attn.q_bias", "blocks.0.attn.q_proj.weight",
                            "blocks.0.mlp.norm.weight", "rope.freqs"))


def is_eva(state, architecture: str | None) -> bool:
    """A non-DINOv3 timm Eva model: by its architecture name when there is one, else by its keys."""
    if architecture:
        return arch_args(architecture) is not None
    return is_eva_layout(state) and ("pos_embed" in state or "rope.freqs" in state
                                     or "blocks.0.attn.qkv.bias" in state or "cls_token" not in state
                                     or any(k.startswith("blocks.0.mlp.norm") for k in state))


def fuse_qkv(state: dict[str, torch.Tensor]) -> None:
    """Eva attention -> one fused ``qkv`` per block, in place: ``q_proj / k_proj / v_proj`` (EVA-02
    base / large) or ``qkv.weight`` with ``q_bias`` / ``v_bias``; the key bias these models lack is
    zeros (exact: timm adds a zero buffer there)."""
    for k in [k for k in state if re.fullmatch(r"blocks\.\d+\.attn\.(q_proj\.weight|q_bias)", k)]:
        b = k[: k.rindex("attn.") + 5]
        if k.endswith("q_proj.weight"):
            state[b + "qkv.weight"] = torch.cat([state.pop(f"{b}{n}_proj.weight") for n in "qkv"])
            parts = [state.pop(f"{b}{n}_proj.bias", None) for n in "qkv"]
        else:
            parts = [state.pop(b + "q_bias"), None, state.pop(b + "v_bias")]
        if any(p is not None for p in parts):
            q = next(p for p in parts if p is not None)
            state[b + "qkv.bias"] = torch.cat([p if p is not None else torch.zeros_like(q) for p in parts])


def _check_args(args: dict[str, Any], source: str) -> None:
    for name, fine in _REFUSED.items():
        if args.get(name, fine) != fine:
            raise CheckpointError(f"{source}: timm Eva {name}={args[name]!r} is not a layout vitkit reproduces "
                                  f"exactly (it reads {name}={fine!r})")
    if args.get("rope_type", "cat") not in _ROPES and args.get("use_rot_pos_emb", True):
        raise CheckpointError(f"{source}: timm Eva rope_type={args['rope_type']!r}; vitkit reproduces 'cat' (axial) "
                              "and 'mixed' here, 'dinov3' through the DINOv3 reader")
    if args.get("global_pool", "avg") not in ("avg", "token", "map"):
        raise CheckpointError(f"{source}: timm Eva global_pool={args['global_pool']!r}; vitkit pools 'avg', "
                              "'token' or 'map'")


def convert_timm(state: dict[str, torch.Tensor], args: dict[str, Any], architecture: str | None, source: str,
                 hints: dict[str, Any], size_hints: tuple[Any, ...], family: str | None = None) -> Converted:
    """A timm Eva state dict (already read) with its hub config's ``model_args`` (may be empty) ->
    vitkit names and config. ``hints``: the caller's overrides (``num_heads``, ``rope``...);
    ``size_hints``: image sizes to read the grid by, most trusted first. ``family``: set by a reader
    of an original layout (:mod:`vitkit.interop.originals`) whose ``args`` hold every setting."""
    base = {} if family else arch_args(architecture)
    if base is None and not hints.get("rope"):
        raise CheckpointError(f"{source}: a timm Eva state dict (EVA-02 / Perception Encoder / RoPE ViT layout) "
                              "without its hub config.json: which rotary embedding it uses is not in the weights; "
                              "load the hub directory, or pass rope='axial' | 'mixed' with rope_theta, "
                              "rope_grid_offset, rope_ref_grid, rope_indexing and num_heads")
    args = {**(base or {}), **args}
    _check_args(args, source)
    notes: list[str] = []
    if any(k.endswith(("attn.q_norm.weight", "attn.gate.weight")) for k in state):
        raise CheckpointError(f"{source}: timm Eva attention with q/k norm or a gate; not reproduced")
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        k = re.sub(r"\.gamma_(\d)$", r".ls\1.gamma", k)
        out[k.replace(".mlp.fc1_g.", ".mlp.gate.").replace(".mlp.fc1_x.", ".mlp.up.")] = v
    fuse_qkv(out)
    from .dinov3 import _pack_gated  # the one packer of [gate; up] SwiGLU halves

    _pack_gated(out)
    dim, in_ch, ph, pw = out["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.", k)))
    fc1, fc2 = out["blocks.0.mlp.fc1.weight"], out["blocks.0.mlp.fc2.weight"]
    swiglu = fc1.shape[0] == 2 * fc2.shape[1]
    class_token = "cls_token" in out
    regs = out["reg_token"].shape[1] if "reg_token" in out else 0
    prefix = int(class_token) + regs
    own = (*size_hints, args.get("img_size"))
    if "pos_embed" in out:
        rows = out["pos_embed"].shape[1]
        known = None if "no_embed_class" not in args else not args["no_embed_class"]
        image_size, pos_prefix = layout_from_rows(rows, prefix, (ph, pw), *own, prefix_rows=known)
    else:
        image_size, pos_prefix = next((h for h in own if h is not None), 224), True
    pool = args.get("global_pool", "avg")
    fc_norm, final_norm = "fc_norm.weight" in out, "norm.weight" in out
    if fc_norm and final_norm:
        raise CheckpointError(f"{source}: timm Eva with both a final norm and fc_norm; vitkit has one or the other")
    rope_type = args.get("rope_type", "cat") if args.get("use_rot_pos_emb", base is not None) else None
    ref = args.get("ref_feat_shape")
    rope: dict[str, Any] = {}
    if rope_type is not None:
        rope = dict(rope=_ROPES[rope_type], rope_theta=float(args.get("rope_temperature", 10000.0)),
                    rope_indexing=args.get("rope_grid_indexing", "ij"),
                    rope_grid_offset=float(args.get("rope_grid_offset", 0.0)) if rope_type == "cat" else 0.0,
                    rope_ref_grid=tuple(ref) if (ref is not None and rope_type == "cat") else None)
    norm_rms = "blocks.0.norm1.weight" in out and "blocks.0.norm1.bias" not in out
    layer_scale = float(args.get("init_values") or 1e-5) if "blocks.0.ls1.gamma" in out else None
    config = ViTConfig(
        image_size=tuple(image_size) if isinstance(image_size, (list, tuple)) else int(image_size),
        patch_size=(ph, pw), in_channels=in_ch, num_classes=out["head.weight"].shape[0] if "head.weight" in out else 0,
        dim=dim, depth=depth, num_heads=guess_heads(dim, hints.get("num_heads") or args.get("num_heads"), source),
        mlp_dim=fc2.shape[1], qkv_bias="blocks.0.attn.qkv.bias" in out, act="silu" if swiglu else "gelu",
        mlp_layer="swiglu" if swiglu else "mlp", norm_eps=float(args.get("eps", 1e-6)),
        norm_layer="rmsnorm" if norm_rms else "layernorm",
        pos_embed="learned" if "pos_embed" in out else "none", pos_embed_prefix=pos_prefix,
        pooling={"token": "cls", "avg": "mean", "map": "map"}[pool], class_token=class_token, num_registers=regs,
        fc_norm=fc_norm, final_norm=final_norm, layer_scale=layer_scale, norm_pre="norm_pre.weight" in out,
        patch_bias="patch_embed.proj.bias" in out, mlp_norm="blocks.0.mlp.norm.weight" in out,
        attn_norm="blocks.0.attn.norm.weight" in out, dynamic_img_size=bool(args.get("dynamic_img_size", False)),
        map_num_heads=args.get("attn_pool_num_heads"), map_mlp_ratio=args.get("attn_pool_mlp_ratio"),
        map_prefix=pool == "map", **rope)
    if config.pooling == "map" and not config.map_mlp_ratio:  # timm: the blocks' mlp_ratio
        config = config.replace(map_mlp_ratio=config.hidden_dim / dim)
    family = family or ("eva02" if (architecture or "").startswith("eva02") else "perception_encoder" if (architecture or "").startswith("vit_pe")
              else "rope_vit" if architecture else "eva")
    if base is None:
        notes.append(f"no timm config: the rotary embedding is the caller's ({config.rope})")
    return Converted(config=config, state=out, format="timm", source=source, notes=notes,
                     info={"family": family, "architecture": architecture})


# --------------------------------------------------------------------------- export
def writes(config: ViTConfig) -> bool:
    """Whether a config needs timm's Eva (rather than VisionTransformer) to hold it."""
    c = config
    return (c.rope != "none" or c.mlp_norm or c.attn_norm or not c.final_norm or c.map_prefix
            or c.map_num_heads is not None)


def to_eva_args(config: ViTConfig) -> dict[str, Any]:
    """``timm.models.eva.Eva`` arguments (JSON values) that rebuild this config exactly; the norm eps
    travels in the architecture name (:func:`eva_architecture`). ConfigError for what Eva lacks."""
    c = config
    why = [w for bad, w in (
        (not c.norm_first, "post-norm"), (c.pos_embed not in ("learned", "none"), f"pos_embed={c.pos_embed!r}"),
        (c.head_hidden_dim, "a pre-logits layer"), (c.qk_scale, "a custom qk_scale"), (c.dist_token, "dist_token"),
        (getattr(c, "patch_norm", False), "patch_norm"), (not getattr(c, "proj_bias", True), "proj_bias=False"),
        (c.norm_layer != "layernorm", "rmsnorm"), (c.norm_pre == c.patch_bias, "patch_bias tied to not norm_pre"),
        (c.act != ("silu" if c.mlp_layer == "swiglu" else "gelu"), f"act={c.act!r}"),
        (c.pooling == "map" and (getattr(c, "map_head", "latent") != "latent"
                                 or (c.num_prefix_tokens and not c.map_prefix)), "attention pooling of patches only"),
        (getattr(c, "naflex_max_patches", None), "NaFlex input")) if bad]
    if why:
        raise ConfigError(f"this config has no timm Eva equivalent: {', '.join(why)}")
    ratio = c.hidden_dim / c.dim
    if int(c.dim * ratio) != c.hidden_dim:
        raise ConfigError(f"mlp_dim {c.hidden_dim} is not reachable by timm's mlp_ratio for dim {c.dim}")
    kw: dict[str, Any] = dict(
        img_size=list(c.image_hw), patch_size=list(c.patch_hw), in_chans=c.in_channels, num_classes=c.num_classes,
        embed_dim=c.dim, depth=c.depth, num_heads=c.num_heads, mlp_ratio=ratio, qkv_fused=True, qkv_bias=c.qkv_bias,
        attn_type="rope", swiglu_mlp=c.mlp_layer == "swiglu", scale_mlp=c.mlp_norm, scale_attn_inner=c.attn_norm,
        init_values=c.layer_scale, class_token=c.class_token, num_reg_tokens=c.num_registers,
        no_embed_class=not c.pos_embed_prefix, use_abs_pos_emb=c.pos_embed == "learned",
        use_rot_pos_emb=c.rope != "none", use_pre_transformer_norm=c.norm_pre, use_fc_norm=c.fc_norm,
        use_post_transformer_norm=c.final_norm and not c.fc_norm,
        global_pool={"cls": "token", "mean": "avg", "map": "map"}[c.pooling], dynamic_img_size=c.dynamic_img_size,
        use_post_norm=False, rope_shift_coords=c.rope_shift, rope_jitter_coords=c.rope_jitter,
        rope_rescale_coords=c.rope_rescale,
        ref_feat_shape=None, rope_grid_offset=0.0, rope_grid_indexing=c.rope_indexing, rope_temperature=c.rope_theta)
    if c.rope == "axial":
        kw.update(rope_type="cat", rope_grid_offset=c.rope_grid_offset,
                  ref_feat_shape=list(c.rope_ref_grid) if c.rope_ref_grid else None)
    elif c.rope == "mixed":
        kw.update(rope_type="mixed")
    elif c.rope == "dinov3":  # read back by vitkit.interop.dinov3.convert_timm
        kw.update(rope_type="dinov3", rope_rotate_half=True)
    if c.pooling == "map":
        kw.update(attn_pool_num_heads=c.map_num_heads or c.num_heads,
                  attn_pool_mlp_ratio=c.map_mlp_ratio or ratio * (2 if c.mlp_layer == "swiglu" else 1))
    return kw


def eva_architecture(config: ViTConfig) -> str:
    """The registered timm Eva whose entrypoint arguments model_args can all override. They cannot
    set the norm (eps 1e-5: PE's and DINOv3's LayerNorm; 1e-6: timm's default), and timm's
    create_model drops None values, so an entrypoint's ``ref_feat_shape`` / ``init_values`` must
    be None where the config has none. ConfigError where no entrypoint fits."""
    c = config
    ref, ls = c.rope == "axial" and c.rope_ref_grid is not None, c.layer_scale is not None
    if c.rope == "dinov3":
        if c.norm_eps == 1e-5 and ls:
            return "vit_small_patch16_dinov3"
    elif c.norm_eps == 1e-6:  # eva02_enormous: no RoPE reference grid, no layer scale (use_post_norm is overridden)
        return "eva02_base_patch14_224" if ref else "vit_small_patch16_rope_224" if ls else "eva02_enormous_patch14_clip_224"
    elif c.norm_eps == 1e-5 and ref:
        return "vit_pe_core_tiny_patch16_384"
    raise ConfigError(f"no timm Eva entrypoint rebuilds norm_eps={c.norm_eps}, rope={c.rope!r} "
                      f"(reference grid: {ref}), layer_scale={c.layer_scale}")


def to_timm_state(model) -> dict[str, torch.Tensor]:
    """vitkit's state dict in timm Eva names (the inverse of :func:`convert_timm` for the layout
    :func:`to_eva_args` writes: fused qkv with its bias, packed SwiGLU unless there is an MLP norm)."""
    c = model.config
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if c.pos_embed != "learned" and k == "pos_embed":
            continue
        k = re.sub(r"\.ls(\d)\.gamma$", r".gamma_\1", k)
        if c.mlp_layer == "swiglu" and c.mlp_norm and re.fullmatch(r"blocks\.\d+\.mlp\.fc1\.(weight|bias)", k):
            g, x = v.chunk(2)  # timm's SwiGLU (used with scale_mlp) keeps the halves apart
            out[k.replace(".fc1.", ".fc1_g.")], out[k.replace(".fc1.", ".fc1_x.")] = g, x
            continue
        out[k] = v
    if "head.weight" in out and "head.bias" not in out:
        out["head.bias"] = torch.zeros(out["head.weight"].shape[0])
    return out


def export(model, path: str | Path) -> Path:
    """A timm hub directory of an Eva model: config.json (architecture, model_args, pretrained_cfg)
    + model.safetensors; ``timm.create_model(architecture, **model_args)`` loads it strictly."""
    c = model.config
    model_args = to_eva_args(c)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    pre = model.preprocess_cfg or {}
    meta = {
        "architecture": eva_architecture(c), "num_classes": c.num_classes, "num_features": c.dim,
        "global_pool": model_args["global_pool"], "model_args": model_args,
        "pretrained_cfg": {
            "input_size": list(pre.get("input_size", [c.in_channels, *c.image_hw])),
            "interpolation": pre.get("interpolation", "bicubic"), "crop_pct": pre.get("crop_pct", 1.0),
            "crop_mode": "center", "mean": list(pre.get("mean", [0.5] * c.in_channels)),
            "std": list(pre.get("std", [0.5] * c.in_channels)), "num_classes": c.num_classes,
            "first_conv": "patch_embed.proj", "classifier": "head", "fixed_input_size": not c.dynamic_img_size},
    }
    if model.labels:
        meta["label_names"] = list(model.labels)
    save_state_dict(to_timm_state(model), out / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(meta, indent=2) + "\n")
    return out
