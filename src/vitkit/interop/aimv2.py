"""Apple's AIMv2 image encoders (Fini et al. 2024, "Multimodal Autoregressive Pre-training of Large
Vision Encoders") from the three places they ship:

* Hugging Face ``Aimv2VisionModel`` directories (``model_type`` ``aimv2_vision_model``, e.g.
  ``apple/aimv2-large-patch14-224``) and whole ``Aimv2Model`` (``aimv2``, the LiT model
  ``apple/aimv2-large-patch14-224-lit``: its image tower and ``visual_projection``; the text tower
  is left out with a note): :func:`convert_hf`, written back by :func:`export_hf`;
* the original apple/ml-aim state dicts (``preprocessor.patchifier.*``, ``trunk.blocks.N.norm_1``,
  SwiGLU ``mlp.fc1 / fc3 / fc2``, ``trunk.post_trunk_norm``; LiT under ``image_encoder.``):
  :func:`convert`, format ``ml_aim`` (key names read from ml-aim's ``aim-v2/aim/v2/torch`` and
  checked against timm's ``_convert_aimv2``, which maps the same files);
* timm's ``aimv2_*`` (``patch_embed.norm``, SwiGLU ``mlp.fc1_g / fc1_x``): read and written by
  :mod:`vitkit.interop.timm` with :func:`from_timm_names` / :func:`to_timm_names`.

The architecture in vitkit's terms: no class token; the patch projection (with bias) followed by
an RMSNorm (``patch_norm``); a learned table over the patches (the native-resolution model:
MAE's 2-D sin-cos table computed per grid, ``pos_embed="sincos2d_mae"``, any input size); pre-norm
blocks with RMSNorm (eps 1e-5), no q/k/v bias, no output-projection or MLP bias
(``proj_bias=False``), a SiLU-gated MLP packed ``[gate; up]`` (``mlp_layer="swiglu"``); a final
RMSNorm. ``forward_features(x)`` = HF ``last_hidden_state``.

Pooling: HF's default ``use_head=True`` and ml-aim's LiT tower end in AIMv2's attention-pooling
head (``pooling="map"``, ``map_head="aimv2"``: the learned ``cls_token`` is the query itself,
k / v projections, an output projection with bias, no norm or MLP): ``model(x)`` = HF
``pooler_output`` (``Aimv2Model``: ``get_image_features``, the projection being the head). Without
a head (timm, ml-aim's pretrained encoders, ``use_head=False``) ``model(x)`` is the mean of the
tokens after the final norm, as timm's ``global_pool='avg'``.

Biases: HF ties the output projection's bias to ``qkv_bias`` and the MLP's to ``mlp_bias``; vitkit
has one ``proj_bias`` for both, so the one a checkpoint lacks is read as zeros (the same numbers).
Heads cannot be seen in the weights: the published AIMv2 widths have head_dim 128
(:data:`HEADS_BY_DIM`, not the ViT paper's 64).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import CheckpointError, ConfigError
from .clip import PREPROCESS as CLIP_PREPROCESS
from .common import Converted, guess_heads, layout_from_rows, size_hints
from .dinov3 import _pack_gated
from .source import Format, Source
from .table import RenameTable

# ml-aim's aimv2_base / large / huge / 1B / 3B (and timm's aimv2_*): width -> heads (head_dim 128)
HEADS_BY_DIM = {768: 6, 1024: 8, 1536: 12, 2048: 16, 3072: 24}
# timm's pretrained_cfg for aimv2_* and HF's processor: OpenAI CLIP mean/std, bicubic, no crop
PREPROCESS = {**CLIP_PREPROCESS, "crop_pct": 1.0}
_TEXT_NOTE = "text tower (and logit scale) not part of the image model: vitkit reads AIMv2's image tower only"

HF_TABLE = RenameTable([
    ("patch_embed.proj.{p}", "embeddings.patch_embed.{p}"),
    ("patch_embed.norm.weight", "embeddings.rms_norm.weight"),
    ("pos_embed", "embeddings.position_embedding.weight"),  # (N, D), no prefix rows
    ("blocks.{i}.norm1.weight", "encoder.layers.{i}.rms_norm1.weight"),
    ("blocks.{i}.attn.q.{p}", "encoder.layers.{i}.attention.q_proj.{p}"),
    ("blocks.{i}.attn.k.{p}", "encoder.layers.{i}.attention.k_proj.{p}"),
    ("blocks.{i}.attn.v.{p}", "encoder.layers.{i}.attention.v_proj.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.attention.out_proj.{p}"),
    ("blocks.{i}.norm2.weight", "encoder.layers.{i}.rms_norm2.weight"),
    ("blocks.{i}.mlp.gate.{p}", "encoder.layers.{i}.ffn.gate_proj.{p}"),  # gate + up packed into fc1
    ("blocks.{i}.mlp.up.{p}", "encoder.layers.{i}.ffn.up_proj.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.ffn.down_proj.{p}"),
    ("norm.weight", "rms_norm.weight"),
    ("attn_pool.latent", "head.cls_token"),
    ("attn_pool.k.{p}", "head.k_proj.{p}"),  # k + v fused into attn_pool.kv
    ("attn_pool.v.{p}", "head.v_proj.{p}"),
    ("attn_pool.proj.{p}", "head.output_proj.{p}"),
])

ML_AIM_TABLE = RenameTable([
    ("patch_embed.proj.{p}", "preprocessor.patchifier.proj.{p}"),
    ("patch_embed.norm.weight", "preprocessor.patchifier.norm.weight"),
    ("pos_embed", "preprocessor.pos_embed"),  # (1, N, D)
    ("blocks.{i}.norm1.weight", "trunk.blocks.{i}.norm_1.weight"),
    ("blocks.{i}.attn.qkv.{p}", "trunk.blocks.{i}.attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "trunk.blocks.{i}.attn.proj.{p}"),
    ("blocks.{i}.norm2.weight", "trunk.blocks.{i}.norm_2.weight"),
    ("blocks.{i}.mlp.gate.{p}", "trunk.blocks.{i}.mlp.fc1.{p}"),  # SwiGLUFFN: silu(fc1(x)) * fc3(x) -> fc2
    ("blocks.{i}.mlp.up.{p}", "trunk.blocks.{i}.mlp.fc3.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "trunk.blocks.{i}.mlp.fc2.{p}"),
    ("norm.weight", "trunk.post_trunk_norm.weight"),
    ("attn_pool.latent", "head.cls_token"),  # AttentionPoolingClassifier (use_batch_norm=False in v2)
    ("attn_pool.k.{p}", "head.k.{p}"),
    ("attn_pool.v.{p}", "head.v.{p}"),
    ("attn_pool.proj.{p}", "head.linear.{p}"),
])


# --------------------------------------------------------------------------- timm names
def from_timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's unpacked SwiGLU (``mlp.fc1_g`` gate, ``mlp.fc1_x`` value) -> vitkit's packed ``fc1``;
    a new dict, every other tensor as it is."""
    out = {k.replace(".mlp.fc1_g.", ".mlp.gate.").replace(".mlp.fc1_x.", ".mlp.up."): v for k, v in state.items()}
    _pack_gated(out)
    return out


def to_timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`from_timm_names`: packed ``fc1`` ([gate; value]) -> ``fc1_g`` / ``fc1_x``."""
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"(blocks\.\d+\.mlp)\.fc1\.(weight|bias)", k)
        if m:
            out[f"{m.group(1)}.fc1_g.{m.group(2)}"], out[f"{m.group(1)}.fc1_x.{m.group(2)}"] = (h.contiguous() for h in v.chunk(2))
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- shared by the readers
def _fill(state: dict[str, torch.Tensor], source: str) -> tuple[bool, bool]:
    """Fuse the head's k / v into ``attn_pool.kv``, pack the gated MLP, and give every output
    projection / MLP linear (and the head's kv and projection) the bias vitkit's layer has where
    the checkpoint leaves it out (zeros: the same numbers). Returns (qkv_bias, proj_bias)."""
    if "attn_pool.k.weight" in state:
        for kind in ("weight", "bias"):
            k, v = state.pop(f"attn_pool.k.{kind}", None), state.pop(f"attn_pool.v.{kind}", None)
            if k is not None and v is not None:
                state[f"attn_pool.kv.{kind}"] = torch.cat([k, v])
            elif (k is None) != (v is None):
                raise CheckpointError(f"{source}: the attention-pooling head has a bias on only one of k / v")
    _pack_gated(state)
    if "blocks.0.mlp.fc1.weight" not in state:
        raise CheckpointError(f"{source}: no gated MLP in block 0; not an AIMv2 encoder")
    qkv_bias = "blocks.0.attn.qkv.bias" in state
    if "attn_pool.kv.bias" in state and not qkv_bias:
        raise CheckpointError(f"{source}: the attention-pooling head's k / v have a bias the blocks' q / k / v "
                              "lack; vitkit's AIMv2 head ties them (as transformers does)")
    layers = ("attn.proj", "mlp.fc1", "mlp.fc2")
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    proj_bias = any(f"blocks.{i}.{name}.bias" in state for i in blocks for name in layers)
    wanted = [f"blocks.{i}.{name}" for i in blocks for name in layers] if proj_bias else []
    wanted += ["attn_pool.proj"] + (["attn_pool.kv"] if qkv_bias else [])
    for name in wanted:
        w = state.get(f"{name}.weight")
        if w is not None and f"{name}.bias" not in state:
            state[f"{name}.bias"] = w.new_zeros(w.shape[0])
    return qkv_bias, proj_bias


def _config(state: dict[str, torch.Tensor], *, heads: int | None, eps: float, sizes: tuple[Any, ...],
            native: bool, source: str, notes: list[str], qkv_bias: bool, proj_bias: bool) -> ViTConfig:
    dim, in_ch, ph, pw = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    if native:
        size = next((s for s in sizes if s is not None), 224)
        image = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
        pos = {"pos_embed": "sincos2d_mae", "dynamic_img_size": True}
    else:
        state["pos_embed"] = state["pos_embed"].reshape(1, -1, dim)
        image, _ = layout_from_rows(state["pos_embed"].shape[1], 0, (ph, pw), *sizes)
        pos = {}
    has_head = "attn_pool.latent" in state
    if has_head:
        state["attn_pool.latent"] = state["attn_pool.latent"].reshape(1, 1, dim)
    else:
        notes.append("no attention-pooling head: model(x) is the mean of the tokens after the final norm "
                     "(timm's global_pool='avg')")
    head = state.get("head.weight")
    return ViTConfig(
        image_size=image if image[0] != image[1] else image[0], patch_size=(ph, pw), in_channels=in_ch,
        num_classes=head.shape[0] if head is not None else 0, dim=dim, depth=depth,
        num_heads=guess_heads(dim, heads or HEADS_BY_DIM.get(dim), source),
        mlp_dim=state["blocks.0.mlp.fc2.weight"].shape[1], qkv_bias=qkv_bias, proj_bias=proj_bias, norm_eps=eps,
        act="silu", norm_layer="rmsnorm", mlp_layer="swiglu", patch_norm=True, class_token=False,
        pooling="map" if has_head else "mean", head_bias=False, **pos, **({"map_head": "aimv2"} if has_head else {}),
    )


# --------------------------------------------------------------------------- Hugging Face
def convert_hf(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """A transformers Aimv2VisionModel or Aimv2Model directory (or its weight file next to config.json)."""
    from .hf_common import fuse_qkv, preprocess_from_dir, read_dir, vision_config, vision_tower

    directory, meta, wfile, raw = read_dir(path)
    vc = vision_config(meta)
    notes: list[str] = []
    if str(vc.get("hidden_act", "silu")) not in ("silu", "swish"):
        raise CheckpointError(f"{directory}: AIMv2 hidden_act={vc['hidden_act']!r}; vitkit's gated MLP gates with "
                              "SiLU (the only activation AIMv2 releases use)")
    vis = vision_tower(raw, ("text_model.", "text_projection.", "logit_scale"), _TEXT_NOTE, notes)
    proj = vis.pop("visual_projection.weight", None)
    state, unmatched = HF_TABLE.to_vitkit(vis, notes)
    if "patch_embed.proj.weight" not in state or "patch_embed.norm.weight" not in state:
        raise CheckpointError(f"{wfile}: no embeddings.patch_embed / embeddings.rms_norm weights; not an AIMv2 "
                              "vision tower")
    if proj is not None:
        if "attn_pool.latent" not in state:
            raise CheckpointError(f"{wfile}: visual_projection without the attention-pooling head it projects")
        state["head.weight"] = proj
    state = fuse_qkv(state, str(wfile))
    qkv_bias, proj_bias = _fill(state, str(wfile))
    native = bool(vc.get("is_native", False))
    if native == ("pos_embed" in state):
        raise CheckpointError(f"{wfile}: is_native={native} but the checkpoint "
                              f"{'has' if native else 'lacks'} embeddings.position_embedding")
    hints = dict(hints or {})
    config = _config(state, heads=hints.get("num_heads") or vc.get("num_attention_heads"),
                     eps=float(vc.get("rms_norm_eps", 1e-5)), sizes=size_hints(hints, arch, vc.get("image_size")),
                     native=native, source=str(wfile), notes=notes, qkv_bias=qkv_bias, proj_bias=proj_bias)
    if not native:
        notes.append("fixed input size, as transformers' Aimv2VisionModel (its position table is not resampled)")
    pre = preprocess_from_dir(directory, config, {"input_size": [config.in_channels, *config.image_hw], **PREPROCESS})
    return Converted(config=config, state=state, format="hf", source=str(directory), preprocess=pre,
                     unexpected=unmatched, notes=notes,
                     info={"family": "aimv2", "architectures": meta.get("architectures")})


def export_hf(model, path: str | Path) -> Path:
    """A transformers ``Aimv2VisionModel`` directory (``Aimv2Model`` needs the text tower vitkit
    does not hold: a model with a projection head is refused)."""
    from .hf_common import split_qkv, write_dir

    c = model.config
    refused = {
        "a class token": c.class_token, "a distillation token": c.dist_token, "registers": bool(c.num_registers),
        "layer scale": c.layer_scale is not None, "fc_norm": c.fc_norm, "norm_pre": c.norm_pre,
        "a classifier / projection head": bool(c.num_classes), "a pre-logits layer": bool(c.head_hidden_dim),
        "a custom qk_scale": bool(c.qk_scale), "post-norm": not c.norm_first, "no patch bias": not c.patch_bias,
        "no patch norm": not c.patch_norm, "LayerNorm": c.norm_layer != "rmsnorm", "a plain MLP": c.mlp_layer != "swiglu",
        "rotary position embedding": c.rope != "none", "NaFlex input": c.naflex_max_patches is not None,
        "pooling other than AIMv2's head or the mean": c.pooling == "cls" or (c.pooling == "map" and c.map_head != "aimv2"),
        "a position table other than learned or MAE's sin-cos": c.pos_embed not in ("learned", "sincos2d_mae"),
        "non-square input or patches": c.image_hw[0] != c.image_hw[1] or c.patch_hw[0] != c.patch_hw[1],
        "an output-projection bias without a q/k/v bias (transformers ties them)": c.proj_bias and not c.qkv_bias,
    }
    bad = [name for name, on in refused.items() if on]
    if bad:
        raise ConfigError(f"no Hugging Face Aimv2VisionModel equivalent: this model has {', '.join(bad)}")
    D = c.dim
    sd = dict(model.state_dict())
    if c.pos_embed == "learned":
        sd["pos_embed"] = sd["pos_embed"].reshape(-1, D)
    for k in [k for k in sd if re.fullmatch(r"blocks\.\d+\.mlp\.fc1\.(weight|bias)", k)]:
        sd[k.replace(".fc1.", ".gate.")], sd[k.replace(".fc1.", ".up.")] = sd.pop(k).chunk(2, dim=0)
    for kind in ("weight", "bias"):
        if f"attn_pool.kv.{kind}" in sd:
            sd[f"attn_pool.k.{kind}"], sd[f"attn_pool.v.{kind}"] = sd.pop(f"attn_pool.kv.{kind}").chunk(2, dim=0)
    if c.qkv_bias and not c.proj_bias:  # HF's out_proj has a bias whenever q/k/v do: zeros are vitkit's map
        for i in range(c.depth):
            sd[f"blocks.{i}.attn.proj.bias"] = sd[f"blocks.{i}.attn.proj.weight"].new_zeros(D)
    out, left = HF_TABLE.from_vitkit(split_qkv(sd, D, ("q", "k", "v")))
    if left:
        raise ConfigError(f"the HF AIMv2 layout has no names for {left}")
    meta = {
        "architectures": ["Aimv2VisionModel"], "model_type": "aimv2_vision_model", "hidden_size": D,
        "intermediate_size": c.hidden_dim, "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads,
        "num_channels": c.in_channels, "image_size": c.image_hw[0], "patch_size": c.patch_hw[0],
        "hidden_act": "silu", "attention_dropout": 0.0, "rms_norm_eps": c.norm_eps, "qkv_bias": c.qkv_bias,
        "mlp_bias": c.proj_bias, "initializer_range": 0.02, "use_head": c.pooling == "map",
        "is_native": c.pos_embed == "sincos2d_mae",
    }
    pre = model.preprocess_cfg or {}
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                 "size": {"shortest_edge": c.image_hw[0]}, "do_center_crop": True,
                 "crop_size": {"height": c.image_hw[0], "width": c.image_hw[1]}, "resample": 3, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(pre.get("mean", PREPROCESS["mean"])), "image_std": list(pre.get("std", PREPROCESS["std"]))}
    return write_dir(path, out, meta, processor)


# --------------------------------------------------------------------------- apple/ml-aim
def looks_like_ml_aim(keys) -> bool:
    """ml-aim's layout (AIM v1 and v2 share it: ``preprocessor.patchifier`` + ``trunk.blocks``),
    bare or as a LiT model's ``image_encoder``."""
    return any(k.startswith(("preprocessor.patchifier.proj.", "image_encoder.preprocessor.patchifier.proj."))
               for k in keys)


def convert(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """An apple/ml-aim AIMv2 state dict: an ``AIMv2VisionEncoder`` (``aimv2_large`` ...,
    ``aimv2_large_native``) or an ``AIMv2LiT`` (image tower + ``image_projector``)."""
    src = Source.of(path)
    raw = src.tensors()
    notes: list[str] = []
    if any(k.startswith("image_encoder.") for k in raw):  # AIMv2LiT: image tower + projector, text left out
        text = [k for k in raw if k.startswith(("text_encoder.", "text_projector.", "log_logit_scale"))]
        if text:
            notes.append(f"{_TEXT_NOTE} ({len(text)} tensors)")
        raw = {k[len("image_encoder."):] if k.startswith("image_encoder.") else k: v for k, v in raw.items()
               if k not in text}
    proj = raw.pop("image_projector.weight", None)
    if not any(k.startswith("trunk.blocks.0.mlp.fc3.") for k in raw):
        raise CheckpointError(f"{src.path}: an ml-aim checkpoint without AIMv2's gated MLP (trunk.blocks.0.mlp.fc3): "
                              "AIM v1, whose attention probe reads the mean of several blocks through a BatchNorm, "
                              "is not a model vitkit builds")
    state, unmatched = ML_AIM_TABLE.to_vitkit(raw, notes)
    if proj is not None:
        state["head.weight"] = proj
    qkv_bias, proj_bias = _fill(state, str(src.path))
    native = "pos_embed" not in state
    if native:
        notes.append("native-resolution encoder: MAE's sin-cos table per grid, any input size (ml-aim computes "
                     "it in float32, vitkit in float64 as transformers: ~1e-6 apart)")
    hints = dict(hints or {})
    config = _config(state, heads=hints.get("num_heads") or (arch.num_heads if arch else None), eps=1e-5,
                     sizes=size_hints(hints, arch), native=native, source=str(src.path), notes=notes,
                     qkv_bias=qkv_bias, proj_bias=proj_bias)
    pre = {"input_size": [config.in_channels, *config.image_hw], **PREPROCESS}
    return Converted(config=config, state=state, format="ml_aim", source=str(src.path), preprocess=pre,
                     unexpected=unmatched, notes=notes, info={"family": "aimv2"})


FORMAT = Format("ml_aim", "apple/ml-aim AIMv2 state dict (preprocessor.patchifier, trunk.blocks, mlp.fc1/fc3/fc2)",
                read=convert, detect_keys=looks_like_ml_aim)
