"""SigLIP / SigLIP2 image towers at a fixed resolution (Zhai et al. 2023; Tschannen et al. 2025), from

* Hugging Face ``SiglipVisionModel`` and whole ``SiglipModel`` directories (``model_type``
  ``siglip_vision_model`` / ``siglip``; SigLIP2's fixed-resolution checkpoints such as
  ``google/siglip2-base-patch16-224`` are ``SiglipModel`` too). The text tower is ignored with a
  note. SigLIP2's NaFlex models (``Siglip2VisionModel`` / ``Siglip2Model``: variable resolution at
  each image's aspect ratio, a patch mask) load here too, with the parts of
  :mod:`vitkit.interop.naflex` (Linear patch embedding, per-image bilinear table, max_num_patches).
  Resampling: :func:`~vitkit.model.pos_embed.resample_hf`.
* big_vision ``.npz`` (``params/img/...``, ``MAPHead_0``; stacked or unstacked blocks): read by
  :mod:`vitkit.interop.jax`, which maps the MAP head through :data:`NPZ_MAP_HEAD`.
* timm ``vit_*_siglip_*`` (``attn_pool``): read by :mod:`vitkit.interop.timm`.

Layout: no class token, a table over the patches (no prefix rows), the final norm
(``post_layernorm``), then attention pooling (``pooling="map"``, module ``attn_pool`` with timm's
AttentionPoolLatent names): a learned probe attends over the tokens, ``x + mlp(norm(x))``, first
(only) query. ``model(x)`` = HF ``pooler_output`` = ``get_image_features``; ``forward_features(x)``
= HF ``last_hidden_state`` (after post_layernorm, before the head). Preprocessing: resize to the
size (bilinear in HF's SiglipImageProcessor, bicubic in timm/big_vision), mean = std = 0.5.

HF's head uses ``nn.MultiheadAttention``: ``in_proj_weight`` is [q; k; v] (3D, D); timm's
``attn_pool.q`` is the first D rows and ``attn_pool.kv`` the last 2D ([k; v]).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import CheckpointError, ConfigError
from . import naflex
from .clip import HF_ENCODER_ROWS
from .common import Converted, layout_from_rows, size_hints
from .table import RenameTable

PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "crop_pct": 1.0}
_TEXT_NOTE = ("text tower (and logit scale / bias) not part of the image model: "
              "vitkit.load_image_text loads both towers")

HF_TABLE = RenameTable([
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("pos_embed", "embeddings.position_embedding.weight"),  # (N, D)
    *HF_ENCODER_ROWS,  # the same encoder layer names as CLIP's
    ("norm.{p}", "post_layernorm.{p}"),
    ("attn_pool.latent", "head.probe"),
    ("attn_pool.in_proj.weight", "head.attention.in_proj_weight"),  # split into q / kv below
    ("attn_pool.in_proj.bias", "head.attention.in_proj_bias"),
    ("attn_pool.proj.{p}", "head.attention.out_proj.{p}"),
    ("attn_pool.norm.{p}", "head.layernorm.{p}"),
    ("attn_pool.mlp.fc1.{p}", "head.mlp.fc1.{p}"),
    ("attn_pool.mlp.fc2.{p}", "head.mlp.fc2.{p}"),
])

# big_vision MAPHead_0 (under params/img/), kernels (in, out) transposed; attention kernels
# (D, heads, hd) / out (heads, hd, D) reshaped as the encoder's: see jax.py
NPZ_MAP_HEAD = {
    "attn_pool.latent": "MAPHead_0/probe",
    "attn_pool.norm": "MAPHead_0/LayerNorm_0",
    "attn_pool.mlp.fc1": "MAPHead_0/MlpBlock_0/Dense_0",
    "attn_pool.mlp.fc2": "MAPHead_0/MlpBlock_0/Dense_1",
    "attn_pool.mha": "MAPHead_0/MultiHeadDotProductAttention_0",
}


def split_in_proj(state: dict[str, torch.Tensor]) -> None:
    """nn.MultiheadAttention's [q; k; v] -> timm AttentionPoolLatent's q and kv ([k; v])."""
    for kind in ("weight", "bias"):
        t = state.pop(f"attn_pool.in_proj.{kind}", None)
        if t is not None:
            D = t.shape[0] // 3
            state[f"attn_pool.q.{kind}"], state[f"attn_pool.kv.{kind}"] = t[:D], t[D:]


def convert_hf(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """A transformers SiglipVisionModel or SiglipModel directory."""
    from .hf_common import fuse_qkv, hf_act, preprocess_from_dir, read_dir, vision_config, vision_tower

    directory, meta, wfile, raw = read_dir(path)
    archs = [str(a) for a in meta.get("architectures") or []]
    is_naflex = naflex.is_siglip2(meta)
    if any(a.endswith("ForImageClassification") for a in archs):
        raise CheckpointError(f"{directory}: {archs[0]} classifies the mean of the tokens without the MAP head; "
                              "load the SiglipVisionModel backbone instead")
    vc = vision_config(meta)
    notes: list[str] = []
    vis = vision_tower(raw, ("text_model.", "logit_scale", "logit_bias"), _TEXT_NOTE, notes)
    state, unmatched = HF_TABLE.to_vitkit(vis, notes)
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{wfile}: no embeddings.patch_embedding.weight; not a SigLIP vision tower")
    state = fuse_qkv(state, str(wfile))
    split_in_proj(state)
    if is_naflex:
        state["patch_embed.proj.weight"] = naflex.hf_patch_kernel(state["patch_embed.proj.weight"], vc, str(wfile))
    dim, in_ch, ph, pw = state["patch_embed.proj.weight"].shape
    state["pos_embed"] = state["pos_embed"].reshape(1, -1, dim)
    hints = dict(hints or {})
    act = hints.get("act") or hf_act(vc.get("hidden_act", "gelu_pytorch_tanh"), str(directory))
    image, _ = layout_from_rows(state["pos_embed"].shape[1], 0, (ph, pw),
                                *size_hints(hints, arch, vc.get("image_size")))
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    has_head = "attn_pool.latent" in state
    if not has_head:
        notes.append("no attention-pooling head (vision_use_head=False): model(x) is the mean of the tokens")
    config = ViTConfig(
        image_size=image if image[0] != image[1] else image[0], patch_size=(ph, pw), in_channels=in_ch,
        num_classes=0, dim=dim, depth=depth, num_heads=int(vc.get("num_attention_heads", 12)),
        mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0], norm_eps=float(vc.get("layer_norm_eps", 1e-6)),
        act=act, class_token=False, pos_embed_prefix=False, pooling="map" if has_head else "mean",
    )
    config = config.replace(**(naflex.hf_fields(directory, notes) if is_naflex else {"pos_resample": "hf"}))
    pre = preprocess_from_dir(directory, config, {"input_size": [in_ch, *config.image_hw], **PREPROCESS})
    return Converted(config=config, state=state, format="hf", source=str(directory), preprocess=pre,
                     unexpected=unmatched, notes=notes,
                     info={"family": "siglip2_naflex" if is_naflex else "siglip", "architectures": archs})


def export_hf(model, path: str | Path) -> Path:
    """A transformers ``SiglipVisionModel`` directory through :data:`HF_TABLE`."""
    from .common import family_parts
    from .hf_common import act_back, split_qkv, write_dir

    c = model.config
    bad = family_parts(c, allowed=("map",))
    if c.naflex_max_patches:
        raise ConfigError("a NaFlex model has no SiglipVisionModel equivalent (fixed resolution); transformers' "
                          "Siglip2VisionModel layout is not written by vitkit yet")
    if (bad or c.pooling != "map" or c.class_token or c.num_registers
            or c.layer_scale is not None or c.num_classes or not c.qkv_bias or c.image_hw[0] != c.image_hw[1]
            or c.patch_hw[0] != c.patch_hw[1] or c.pos_embed != "learned"):
        raise ConfigError("no Hugging Face SiglipVisionModel equivalent: it needs attention pooling, no class token "
                          "or registers, a learned table, square input and patches, qkv bias, no head / layer scale"
                          f"{f' / {bad}' if bad else ''}")
    D = c.dim
    sd = dict(model.state_dict())
    sd["pos_embed"] = sd["pos_embed"].reshape(-1, D)
    for kind in ("weight", "bias"):
        sd[f"attn_pool.in_proj.{kind}"] = torch.cat([sd.pop(f"attn_pool.q.{kind}"), sd.pop(f"attn_pool.kv.{kind}")])
    out, left = HF_TABLE.from_vitkit(split_qkv(sd, D, ("q", "k", "v")))
    if left:
        raise ConfigError(f"the HF SigLIP layout has no names for {left}")
    meta = {
        "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model", "hidden_size": D,
        "intermediate_size": c.hidden_dim, "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads,
        "image_size": c.image_hw[0], "patch_size": c.patch_hw[0], "num_channels": c.in_channels,
        "hidden_act": act_back(c.act), "layer_norm_eps": c.norm_eps, "attention_dropout": 0.0,
    }
    pre = model.preprocess_cfg or {}
    processor = {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                 "size": {"height": c.image_hw[0], "width": c.image_hw[1]}, "resample": 2, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(pre.get("mean", [0.5] * 3)),
                 "image_std": list(pre.get("std", [0.5] * 3))}
    return write_dir(path, out, meta, processor)
