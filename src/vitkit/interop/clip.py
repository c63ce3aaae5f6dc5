"""CLIP image towers (Radford et al. 2021) and OpenCLIP's, from

* Hugging Face ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` and whole ``CLIPModel``
  directories (``model_type`` ``clip_vision_model`` / ``clip``): the vision tower and
  ``visual_projection``; a CLIPModel's text tower (``text_model.*``, ``text_projection``,
  ``logit_scale``) is ignored with a note. Resampling: :func:`~vitkit.model.pos_embed.resample_hf`.
* OpenAI / OpenCLIP state dicts (format ``openai_clip``): ``visual.conv1``,
  ``visual.class_embedding``, ``visual.positional_embedding``, ``visual.ln_pre``,
  ``visual.transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.out_proj, ln_2, mlp.c_fc,
  mlp.c_proj}``, ``visual.ln_post``, ``visual.proj``; keys without the ``visual.`` prefix (a
  saved ``model.visual``) read too; every non-visual key is the text tower, ignored with a note.
  Resampling: :func:`~vitkit.model.pos_embed.resample_timm`, which is also what OpenCLIP's
  own ``resize_pos_embed`` computes (bicubic, ``antialias=True``, ``align_corners=False`` in
  current open_clip; releases before the antialias argument did not antialias).
* timm ``vit_*_clip_*``: read by :mod:`vitkit.interop.timm` (``norm_pre``, no patch bias, eps 1e-5).

Layout: ViT with ``norm_pre`` (ln_pre), no patch bias, LayerNorm eps 1e-5, the class token
pooled after ``norm`` (ln_post) and a bias-free projection as the head (``head_bias=False``,
``num_classes`` = the embedding width). ``model(x)`` is the projected image embedding, as
``get_image_features`` (not L2-normalised); without a projection (``CLIPVisionModel``) it is
``pooler_output``. ``forward_features(x)`` is every token after ``norm``; HF's
``last_hidden_state`` is *before* post_layernorm (HF applies it to the class token only), so it
differs by design (``forward_intermediates(x, norm=False)[1][-1]`` is HF's last_hidden_state).

Activation, the most reported CLIP-port bug: OpenAI's weights were trained with QuickGELU
(``x * sigmoid(1.702 x)``), most OpenCLIP models with exact GELU. HF configs say which
(``hidden_act``); an OpenCLIP hub dir says in ``open_clip_config.json`` (``quick_gelu``); a bare
state dict cannot: pass ``act="quick_gelu"`` or ``act="gelu"``. Without it vitkit assumes
QuickGELU (the OpenAI checkpoints) and says so in a warning and the load report.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import CheckpointError, ConfigError
from .common import Converted, guess_heads, layout_from_rows, size_hints
from .source import Format, Source
from .table import RenameTable

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
# CLIPImageProcessor / OpenCLIP: bicubic resize of the short side to the size, centre crop
PREPROCESS = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "crop_pct": 1.0,
              "crop_mode": "center"}
_TEXT_NOTE = ("text tower (and the contrastive logit scale) not part of the image model: "
              "vitkit.load_image_text loads both towers")

# ---- OpenAI / OpenCLIP (names after the visual. prefix) ------------------------------------------
OPENAI_TABLE = RenameTable([
    ("cls_token", "class_embedding"),  # (D,) <-> (1, 1, D)
    ("pos_embed", "positional_embedding"),  # (1+N, D) <-> (1, 1+N, D)
    ("patch_embed.proj.weight", "conv1.weight"),
    ("norm_pre.{p}", "ln_pre.{p}"),
    ("blocks.{i}.norm1.{p}", "transformer.resblocks.{i}.ln_1.{p}"),
    ("blocks.{i}.attn.qkv.weight", "transformer.resblocks.{i}.attn.in_proj_weight"),
    ("blocks.{i}.attn.qkv.bias", "transformer.resblocks.{i}.attn.in_proj_bias"),
    ("blocks.{i}.attn.proj.{p}", "transformer.resblocks.{i}.attn.out_proj.{p}"),
    ("blocks.{i}.ls1.gamma", "transformer.resblocks.{i}.ls_1.gamma"),  # OpenCLIP ls_init_value models
    ("blocks.{i}.norm2.{p}", "transformer.resblocks.{i}.ln_2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "transformer.resblocks.{i}.mlp.c_fc.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "transformer.resblocks.{i}.mlp.c_proj.{p}"),
    ("blocks.{i}.ls2.gamma", "transformer.resblocks.{i}.ls_2.gamma"),
    ("norm.{p}", "ln_post.{p}"),
    ("head.weight", "proj"),  # (D, E) <-> (E, D): transposed
])

# transformers' CLIPEncoderLayer names, shared by SigLIP's vision tower (same encoder class layout).
HF_ENCODER_ROWS = [
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.q.{p}", "encoder.layers.{i}.self_attn.q_proj.{p}"),
    ("blocks.{i}.attn.k.{p}", "encoder.layers.{i}.self_attn.k_proj.{p}"),
    ("blocks.{i}.attn.v.{p}", "encoder.layers.{i}.self_attn.v_proj.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.out_proj.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
]

# ---- Hugging Face (vision tower names after an optional vision_model. prefix) ---------------------
HF_TABLE = RenameTable([
    ("cls_token", "embeddings.class_embedding"),  # (D,)
    ("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
    ("pos_embed", "embeddings.position_embedding.weight"),  # (1+N, D)
    ("norm_pre.{p}", "pre_layrnorm.{p}"),  # sic: transformers' spelling
    *HF_ENCODER_ROWS,
    ("norm.{p}", "post_layernorm.{p}"),
    ("head.weight", "visual_projection.weight"),
])


def looks_like_openai_clip(keys) -> bool:
    keys = set(keys)
    return any(k in keys for k in ("visual.conv1.weight", "conv1.weight")) and any(
        k.endswith("class_embedding") for k in keys)


def _clip_config(state: dict[str, torch.Tensor], *, heads: int | None, act: str, eps: float,
                 hints: tuple[Any, ...], source: str) -> ViTConfig:
    import re

    dim, in_ch, ph, pw = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    image, _ = layout_from_rows(state["pos_embed"].shape[1], 1, (ph, pw), *hints, prefix_rows=True)
    has_proj = "head.weight" in state
    return ViTConfig(
        image_size=image if image[0] != image[1] else image[0], patch_size=(ph, pw), in_channels=in_ch,
        num_classes=state["head.weight"].shape[0] if has_proj else 0, dim=dim, depth=depth,
        num_heads=guess_heads(dim, heads, source), mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in state, norm_eps=eps, act=act,
        layer_scale=1e-5 if "blocks.0.ls1.gamma" in state else None,
        norm_pre="norm_pre.weight" in state, patch_bias=False, head_bias=False,
    )


def _reshape_in(state: dict[str, torch.Tensor]) -> None:
    """Source shapes -> vitkit's: class token (D,) -> (1, 1, D), table (T, D) -> (1, T, D),
    projection (D, E) -> head (E, D) (OpenAI only; HF's Linear is already (E, D))."""
    D = state["patch_embed.proj.weight"].shape[0]
    state["cls_token"] = state["cls_token"].reshape(1, 1, D)
    state["pos_embed"] = state["pos_embed"].reshape(1, -1, D)


def _preprocess(config: ViTConfig) -> dict[str, Any]:
    return {"input_size": [config.in_channels, *config.image_hw], **PREPROCESS}


# --------------------------------------------------------------------------- OpenAI / OpenCLIP
def _open_clip_config(p: Path) -> dict[str, Any] | None:
    cfg = p.parent / "open_clip_config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("model_cfg") or None
    except (OSError, ValueError):
        return None


def read_open_clip_weights(path: Source | str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(weight file, raw tensors) of an OpenAI / OpenCLIP state dict or OpenCLIP hub dir, read once
    through the :class:`Source`."""
    src = Source.of(path)
    p = src.path
    if p.is_dir():
        files = [p / f for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin") if (p / f).is_file()]
        if not files:
            raise CheckpointError(f"{p}: no open_clip_model.safetensors / open_clip_pytorch_model.bin in it")
        p = files[0]
    return p, src.tensors(p)


def convert(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """An OpenAI CLIP / OpenCLIP state dict (``visual.*`` keys), the text tower left to
    :func:`vitkit.interop.clip_text.convert_openai` (``vitkit.load_image_text``)."""
    p, raw = read_open_clip_weights(path)
    prefix = "visual." if "visual.conv1.weight" in raw else ""
    if any(k.startswith("visual.trunk.") for k in raw):
        raise CheckpointError(f"{p}: an OpenCLIP model with a timm trunk (visual.trunk.*, e.g. OpenCLIP's SigLIP): "
                              "load it with vitkit.load_image_text (both towers; .vision is the image model)")
    notes: list[str] = []
    visual = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    text = [k for k in raw if not k.startswith(prefix)] if prefix else []
    if text:
        notes.append(f"{_TEXT_NOTE} ({len(text)} tensors)")
    state, unmatched = OPENAI_TABLE.to_vitkit(visual, notes)
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{p}: no visual.conv1.weight; not an OpenAI / OpenCLIP state dict")
    _reshape_in(state)
    if "head.weight" in state:
        state["head.weight"] = state["head.weight"].t().contiguous()
    hints = dict(hints or {})
    oc = _open_clip_config(p)
    vision = (oc or {}).get("vision_cfg") or {}
    act = hints.get("act")
    if act is None and oc is not None:
        act = "quick_gelu" if oc.get("quick_gelu") else "gelu"
        notes.append(f"activation {act} from open_clip_config.json (quick_gelu={bool(oc.get('quick_gelu'))})")
    elif act is None:
        act = "quick_gelu"
        msg = ("activation: the state dict carries no config; assumed QuickGELU (OpenAI's CLIP weights and "
               "OpenCLIP's *-quickgelu models). OpenCLIP models trained with exact GELU (e.g. laion2b ViT-B-32) "
               "need act='gelu': pass it to from_pretrained")
        notes.append(msg)
        warnings.warn(f"{p}: {msg}", stacklevel=3)
    else:
        notes.append(f"activation {act} as given")
    heads = hints.get("num_heads") or (arch.num_heads if arch is not None else None)
    if heads is None and vision.get("width") and vision.get("head_width"):
        heads = int(vision["width"]) // int(vision["head_width"])
    elif heads is None:
        dim = state["patch_embed.proj.weight"].shape[0]
        heads = max(1, dim // 64)  # every OpenAI / OpenCLIP ViT has head_width 64 by default
    own = vision.get("image_size")
    config = _clip_config(state, heads=heads, act=act, eps=1e-5, hints=size_hints(hints, arch, own), source=str(p))
    return Converted(config=config, state=state, format="openai_clip", source=str(p), preprocess=_preprocess(config),
                     unexpected=[prefix + k for k in unmatched], notes=notes,
                     info={"family": "clip", "activation": act})


def export_openai(model, path: str | Path) -> Path:
    """The image tower as an OpenAI / OpenCLIP ``visual.*`` state dict (safetensors)."""
    from ..io import save_state_dict

    c = model.config
    if not getattr(c, "norm_pre", False) or getattr(c, "patch_bias", True) or not c.pos_embed_prefix:
        raise ConfigError("the OpenAI CLIP layout needs norm_pre=True, patch_bias=False and a class row in the table")
    sd = dict(model.state_dict())
    D = c.dim
    sd["cls_token"] = sd["cls_token"].reshape(D)
    sd["pos_embed"] = sd["pos_embed"].reshape(-1, D)
    if "head.weight" in sd:
        if "head.bias" in sd:
            if sd["head.bias"].abs().max() > 0:
                raise ConfigError("the OpenAI CLIP projection has no bias; this head has a non-zero one")
            sd.pop("head.bias")
        sd["head.weight"] = sd["head.weight"].t().contiguous()
    out, left = OPENAI_TABLE.from_vitkit(sd)
    if left:
        raise ConfigError(f"the OpenAI CLIP layout has no names for {left}")
    return save_state_dict({f"visual.{k}": v for k, v in out.items()}, Path(path), metadata={"format": "pt"})



# --------------------------------------------------------------------------- Hugging Face
def convert_hf(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """A transformers CLIPVisionModel[WithProjection] or CLIPModel directory."""
    from .hf_common import fuse_qkv, hf_act, preprocess_from_dir, read_dir, vision_config, vision_tower

    directory, meta, wfile, raw = read_dir(path)
    vc = vision_config(meta)
    notes: list[str] = []
    vis = vision_tower(raw, ("text_model.", "text_projection", "logit_scale"), _TEXT_NOTE, notes)
    state, unmatched = HF_TABLE.to_vitkit(vis, notes)
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{wfile}: no embeddings.patch_embedding.weight; not a CLIP vision tower")
    state = fuse_qkv(state, str(wfile))
    _reshape_in(state)
    hints = dict(hints or {})
    act = hints.get("act") or hf_act(vc.get("hidden_act", "quick_gelu"), str(directory))
    heads = int(vc.get("num_attention_heads") or 0) or hints.get("num_heads")
    config = _clip_config(state, heads=heads, act=act, eps=float(vc.get("layer_norm_eps", 1e-5)),
                          hints=size_hints(hints, arch, vc.get("image_size")), source=str(directory))
    pre = preprocess_from_dir(directory, config, _preprocess(config))
    return Converted(config=config.replace(pos_resample="hf"), state=state, format="hf", source=str(directory), preprocess=pre,
                     unexpected=unmatched, notes=notes,
                     info={"family": "clip", "architectures": meta.get("architectures"), "activation": act})


def export_hf(model, path: str | Path) -> Path:
    """A transformers ``CLIPVisionModelWithProjection`` (``CLIPVisionModel`` without a head)
    directory through :data:`HF_TABLE`, with a CLIPImageProcessor config."""
    from .common import family_parts
    from .hf_common import act_back, split_qkv, write_dir

    c = model.config
    bad = family_parts(c, allowed=("norm_pre", "patch_bias", "head_bias"))
    if (bad or not c.norm_pre or c.patch_bias or not c.class_token or c.pooling != "cls" or c.num_registers
            or c.layer_scale is not None or c.fc_norm or c.head_hidden_dim or not c.qkv_bias or not c.pos_embed_prefix
            or c.image_hw[0] != c.image_hw[1] or c.patch_hw[0] != c.patch_hw[1]):
        raise ConfigError("no Hugging Face CLIP vision equivalent: it needs norm_pre, no patch bias, a class token "
                          "with a table row, square input and patches, qkv bias, and no registers / layer scale / "
                          f"fc_norm / pre-logits{f' / {bad}' if bad else ''}")
    D = c.dim
    sd = dict(model.state_dict())
    if "head.bias" in sd:
        if sd["head.bias"].abs().max() > 0:
            raise ConfigError("CLIP's visual_projection has no bias; this head has a non-zero one")
        sd.pop("head.bias")
    sd["cls_token"] = sd["cls_token"].reshape(D)
    sd["pos_embed"] = sd["pos_embed"].reshape(-1, D)
    out, left = HF_TABLE.from_vitkit(split_qkv(sd, D, ("q", "k", "v")))
    if left:
        raise ConfigError(f"the HF CLIP layout has no names for {left}")
    proj = c.num_classes > 0
    if proj:  # CLIPVisionModelWithProjection keeps the tower under vision_model.
        out = {(k if k.startswith("visual_projection") else f"vision_model.{k}"): v for k, v in out.items()}
    meta = {
        "architectures": ["CLIPVisionModelWithProjection" if proj else "CLIPVisionModel"],
        "model_type": "clip_vision_model", "hidden_size": D, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads, "image_size": c.image_hw[0],
        "patch_size": c.patch_hw[0], "num_channels": c.in_channels, "hidden_act": act_back(c.act),
        "layer_norm_eps": c.norm_eps, "attention_dropout": 0.0, "projection_dim": c.num_classes or 512,
    }
    pre = model.preprocess_cfg or {}
    size = c.image_hw[0]
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
                 "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(pre.get("mean", OPENAI_MEAN)), "image_std": list(pre.get("std", OPENAI_STD)),
                 "do_convert_rgb": True}
    return write_dir(path, out, meta, processor)


FORMAT = Format(
    "openai_clip", "OpenAI CLIP / OpenCLIP state dict (visual.conv1, visual.transformer.resblocks...)",
    aliases=("open_clip", "openclip", "clip"), read=convert, write=export_openai, detect_keys=looks_like_openai_clip,
    tiny=dict(image_size=32, patch_size=16, num_classes=24, dim=32, depth=2, num_heads=2, norm_pre=True,
              patch_bias=False, head_bias=False, act="quick_gelu", norm_eps=1e-5),
    tiny_hints=dict(num_heads=2, act="quick_gelu"))
