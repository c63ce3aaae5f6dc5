"""The original repositories' checkpoints of timm's Eva families, read exactly:

* ``perception_models``: facebookresearch/perception_models' Perception Encoder state dicts
  (``core/vision_encoder/pe.py``: ``conv1``, ``class_embedding``, ``positional_embedding``,
  ``ln_pre``, ``transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ls_1, ls_2, ln_2,
  mlp.c_fc, mlp.c_proj}``, ``ln_post``, ``attn_pool.{probe, attn.*, layernorm, mlp.*}``, ``proj``),
  bare or under ``visual.`` (a whole PE CLIP: its text tower is left out with a note);
* ``baai_eva``: baaivision/EVA EVA-02 state dicts (``EVA-02/asuka/modeling_finetune.py``:
  ``blocks.N.attn.{qkv | q_proj, k_proj, v_proj}`` with ``q_bias`` / ``v_bias``, SwiGLU as
  xformers' packed ``mlp.w12`` / ``w3`` or ``mlp.w1 / w2 / w3`` with ``ffn_ln``,
  ``rope.freqs_cos / freqs_sin`` buffers, ``norm`` or ``fc_norm``, ``head``), under
  ``model`` / ``module`` / ``model_ema`` or bare; EVA-CLIP towers under ``visual.``.

Both are renamed to timm's Eva names as timm 1.0.31's ``checkpoint_filter_fn`` (``_convert_pe``
for PE) does, then read by :func:`vitkit.interop.eva.convert_timm` with the settings the weights
do not show. tests/test_family_originals.py writes random timm models in these layouts and checks
that timm's own filter maps them back to timm's state dict, and that vitkit's outputs match timm's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import CheckpointError
from .clip import PREPROCESS as CLIP_PREPROCESS
from .common import Converted, layout_from_rows, size_hints
from .eva import convert_timm
from .source import Format, Source

# ViTConfig fields a user may pass for the rotary embedding; the check against a checkpoint's own
# RoPE tables uses them, as the model will
_ROPE_HINTS = ("rope_theta", "rope_grid_offset", "rope_ref_grid", "rope_indexing")


def _split_visual(raw: dict[str, torch.Tensor], marker: str, notes: list[str]) -> dict[str, torch.Tensor]:
    """The image tower's tensors: those under ``visual.`` when ``visual.<marker>`` is there (the
    rest is the text tower, left out with a note), else all."""
    if f"visual.{marker}" not in raw:
        return dict(raw)
    text = [k for k in raw if not k.startswith("visual.")]
    if text:
        notes.append(f"text tower not part of the image model ({len(text)} tensors left out)")
    return {k[len("visual."):]: v for k, v in raw.items() if k.startswith("visual.")}


# --------------------------------------------------------------------------- Perception Encoder
PE_HEADS_BY_DIM = {768: 12, 1024: 16, 1536: 16}  # PE-*-B16 / L14 / G14 (PE_VISION_CONFIG heads)
PE_POOL_HEADS = 8  # PEConfig.attn_pooler_heads, every release
# perception_models names -> timm's (the string swaps of timm's _convert_pe, in its order)
_PE_SWAPS = (("conv1", "patch_embed.proj"), ("positional_embedding", "pos_embed"),
             ("transformer.resblocks.", "blocks."), ("ln_pre", "norm_pre"), ("ln_post", "norm"), ("ln_", "norm"),
             ("ls_1.gamma", "gamma_1"), ("ls_2.gamma", "gamma_2"), ("in_proj_", "qkv."), ("out_proj", "proj"),
             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"), ("attn_pool.attn", "attn_pool"),
             ("attn_pool.layernorm", "attn_pool.norm"), ("attn_pool.probe", "attn_pool.latent"))


def looks_like_pe(keys) -> bool:
    """PE's image tower: OpenAI CLIP's names (``conv1``, ``transformer.resblocks``) with PE's
    attention pool (``attn_pool.probe``; OpenCLIP's is ``attn_pool.query``), or without ``ln_post``
    (PE-Lang / Spatial; OpenAI and OpenCLIP towers always have it), or without a class token (PE-G)."""
    keys = set(keys)
    p = "visual." if "visual.conv1.weight" in keys else ""
    if f"{p}conv1.weight" not in keys or f"{p}transformer.resblocks.0.ln_1.weight" not in keys:
        return False
    return any(k not in keys for k in (f"{p}class_embedding", f"{p}ln_post.weight")) or f"{p}attn_pool.probe" in keys


def pe_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PE names and shapes -> timm's Eva (what timm's ``_convert_pe`` returns): the pool's fused
    in_proj split into ``q`` / ``kv``, ``proj`` (D, E) transposed into a zero-bias ``head``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for a, b in _PE_SWAPS:
            k = k.replace(a, b)
        if k.startswith("attn_pool.qkv."):
            kind = k.rsplit(".", 1)[1]
            out[f"attn_pool.q.{kind}"], out[f"attn_pool.kv.{kind}"] = v[: v.shape[0] // 3], v[v.shape[0] // 3:]
        elif k == "proj":
            out["head.weight"], out["head.bias"] = v.t().contiguous(), v.new_zeros(v.shape[1])
        elif k == "class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "pos_embed":
            out[k] = v.unsqueeze(0)
        else:
            out[k] = v
    return out


def convert_pe(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """A perception_models PE image tower (or whole PE CLIP) state dict. What the weights do not
    show is PE's published setting (PEConfig, timm's ``vit_pe_*``), each said in a note: axial
    RoPE (theta 10000, (x, y) axes) offset by the class token's position (1 with a class token, 0
    without: PE-G), its reference grid the position table's; 8 pooling heads; LayerNorm eps 1e-5;
    without a pool the mean of the patch tokens (timm's lang / spatial). ``num_heads``,
    ``map_num_heads`` and the ``rope_*`` fields given by the caller win."""
    src = Source.of(path)
    hints = dict(hints or {})
    notes: list[str] = []
    raw = {k.replace("module.", ""): v for k, v in src.tensors().items()}
    state = pe_to_timm(_split_visual(raw, "conv1.weight", notes))
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{src.path}: no conv1.weight; not a Perception Encoder state dict")
    dim, _, ph, pw = state["patch_embed.proj.weight"].shape
    cls = "cls_token" in state
    heads = hints.get("num_heads") or (arch.num_heads if arch is not None else None) or PE_HEADS_BY_DIM.get(dim)
    args: dict[str, Any] = dict(
        rope_type="cat", use_rot_pos_emb=True, rope_temperature=10000.0, rope_grid_indexing="xy",
        rope_grid_offset=1.0 if cls else 0.0, eps=1e-5, no_embed_class=False, num_heads=heads)
    sizes = size_hints(hints, arch)
    if "pos_embed" in state:
        (H, W), _ = layout_from_rows(state["pos_embed"].shape[1], int(cls), (ph, pw), *sizes, prefix_rows=cls)
        args.update(img_size=(H, W), ref_feat_shape=(H // ph, W // pw))
    elif hints.get("rope_ref_grid") is None:
        raise CheckpointError(f"{src.path}: a PE tower without positional_embedding: its RoPE reference grid (PE's "
                              "pretraining grid) is not in the weights; pass rope_ref_grid=(gh, gw) and image_size=")
    if "attn_pool.latent" in state:
        pool_heads = hints.get("map_num_heads") or PE_POOL_HEADS
        args.update(global_pool="map", attn_pool_num_heads=pool_heads,
                    attn_pool_mlp_ratio=state["attn_pool.mlp.fc1.weight"].shape[0] / dim)
        notes.append(f"attention pool with {pool_heads} heads (not in the weights: PE's attn_pooler_heads"
                     f"{' as given' if hints.get('map_num_heads') else ', every release'})")
    else:
        args["global_pool"] = "avg"
        notes.append("no attention pool (PE-Lang / Spatial): model(x) pools the mean of the patch tokens as timm's "
                     "vit_pe_lang / spatial (the original returns every token: forward_features)")
    notes.append(f"RoPE not in the weights: PE's axial (x, y) RoPE, theta 10000, grid offset {args['rope_grid_offset']:g} "
                 f"({'after' if cls else 'without'} a class token), reference grid "
                 f"{args.get('ref_feat_shape') or hints.get('rope_ref_grid')} (the position table's); LayerNorm eps "
                 "1e-5; fixed input size (the original resamples its table bilinearly at other sizes, which vitkit "
                 "does not reproduce: image_size= resamples as timm does)")
    if heads is None:
        notes.append(f"num_heads not in the weights and width {dim} is no PE release; pass num_heads=")
    conv = convert_timm(state, args, None, str(src.path), hints, sizes, family="perception_encoder")
    conv.format, conv.notes = "perception_models", notes + conv.notes
    conv.preprocess = {"input_size": [conv.config.in_channels, *conv.config.image_hw], "mean": [0.5] * 3,
                       "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 1.0}
    return conv


# --------------------------------------------------------------------------- EVA-02 (baaivision/EVA)
EVA02_REF_GRID = (16, 16)  # pt_hw_seq_len of every EVA-02 (224 / 14)
# EVA-02's names -> timm's (checkpoint_filter_fn's replacements, w12 before w1)
_EVA_SWAPS = (("mlp.ffn_ln", "mlp.norm"), ("attn.inner_attn_ln", "attn.norm"), ("mlp.w12", "mlp.fc1"),
              ("mlp.w1", "mlp.fc1_g"), ("mlp.w2", "mlp.fc1_x"), ("mlp.w3", "mlp.fc2"))


def looks_like_eva02(keys) -> bool:
    """EVA-02's SwiGLU output ``mlp.w3`` in blocks whose attention has ``q_bias`` or separate
    ``q_proj`` (DINOv2's w12 / w3 blocks have a qkv bias; timm names the MLP fc1 / fc2)."""
    keys = set(keys)
    p = "visual." if "visual.patch_embed.proj.weight" in keys else ""
    return (f"{p}patch_embed.proj.weight" in keys and f"{p}blocks.0.mlp.w3.weight" in keys
            and any(f"{p}blocks.0.attn.{n}" in keys for n in ("q_bias", "q_proj.weight")))


def eva02_to_timm(state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """EVA-02 names -> timm's Eva, as timm's checkpoint_filter_fn: a MIM checkpoint's mask token and
    lm_head dropped and its final norm moved to fc_norm (noted), ``q_bias`` / ``v_bias`` as the
    separate projections' biases. The ``rope.*`` buffers are left out (checked by the caller)."""
    mim = "mask_token" in state
    no_qkv = "blocks.0.attn.q_proj.weight" in state
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("rope."):
            continue
        if mim and k in ("mask_token", "lm_head.weight", "lm_head.bias", "norm.weight", "norm.bias"):
            if k.startswith("norm."):
                out["fc_" + k] = v
            continue
        for a, b in _EVA_SWAPS:
            k = k.replace(a, b)
        if no_qkv:
            k = k.replace("q_bias", "q_proj.bias").replace("v_bias", "v_proj.bias")
        out[k] = v
    if mim:
        notes.append("MIM pretraining checkpoint: mask_token and lm_head left out, the final norm read as fc_norm "
                     "after the mean of the patch tokens (timm's reading for fine-tuning)")
    return out


def _ref_grid_from_table(cos: torch.Tensor, sin: torch.Tensor) -> tuple[int, int] | None:
    """EVA-02's pretraining grid from its (g*g, hd) RoPE buffers: the first row-axis channel turns by
    ``1 / g * ref`` (frequency 1) between rows 0 and 1. None for a non-square table."""
    g = math.isqrt(cos.shape[0])
    if g * g != cos.shape[0] or g < 2:
        return None
    step = float(torch.atan2(sin[g, 0], cos[g, 0]) - torch.atan2(sin[0, 0], cos[0, 0]))
    ref = round(step * g)
    return (ref, ref) if ref > 0 else None


def check_rope(config: ViTConfig, cos: torch.Tensor, sin: torch.Tensor, source: str) -> None:
    """CheckpointError when vitkit's RoPE tables for ``config`` differ from a checkpoint's own
    (``rope.freqs_cos / freqs_sin``, (N, hd)), naming the difference."""
    from ..model.rope import RotaryEmbedding

    c = config
    rope = RotaryEmbedding(c.dim // c.num_heads, c.rope_theta, variant="axial", grid_offset=c.rope_grid_offset,
                           ref_grid=c.rope_ref_grid, indexing=c.rope_indexing)
    want_cos, want_sin = rope(c.grid_size, torch.device("cpu"), torch.float32)
    if tuple(want_cos.shape) != tuple(cos.shape):
        n, hd = cos.shape
        raise CheckpointError(f"{source}: rope.freqs_cos is {tuple(cos.shape)}: {n} positions at head width {hd} "
                              f"({c.dim // hd} heads); the model has grid {c.grid_size} and {c.num_heads} heads "
                              f"(tables {tuple(want_cos.shape)})")
    diff = max((want_cos - cos.float()).abs().max().item(), (want_sin - sin.float()).abs().max().item())
    if diff > 1e-4:
        raise CheckpointError(f"{source}: vitkit's RoPE (theta {c.rope_theta:g}, reference grid {c.rope_ref_grid}, "
                              f"offset {c.rope_grid_offset:g}, axes {c.rope_indexing}) differs from the checkpoint's "
                              f"rope.freqs_cos / freqs_sin by up to {diff:.3g}; pass the rope_* settings it was built "
                              "with")


def convert_eva02(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """A baaivision/EVA EVA-02 state dict. Settings the weights do not show are EVA-02's own
    (modeling_finetune.py): axial RoPE, theta 10000, (row, col) axes, LayerNorm eps 1e-6; the RoPE
    reference grid read from the ``rope.freqs_*`` buffers when present (else EVA-02's 16 x 16), the
    heads from their width; the class token pooled unless there is an fc_norm (mean pooling)."""
    src = Source.of(path)
    hints = dict(hints or {})
    notes: list[str] = []
    raw = _split_visual(src.tensors(), "patch_embed.proj.weight", notes)
    cos, sin = raw.get("rope.freqs_cos"), raw.get("rope.freqs_sin")
    state = eva02_to_timm(raw, notes)
    dim = state["patch_embed.proj.weight"].shape[0]
    heads = hints.get("num_heads") or (arch.num_heads if arch is not None else None)
    ref = hints.get("rope_ref_grid")
    if cos is not None and sin is not None:
        heads = heads or dim // cos.shape[-1]
        found = _ref_grid_from_table(cos, sin)
        ref = ref or found or EVA02_REF_GRID
        notes.append(f"RoPE reference grid {ref} and head width {cos.shape[-1]} read from rope.freqs_cos / freqs_sin, "
                     "and the tables checked against vitkit's")
    else:
        ref = ref or EVA02_REF_GRID
        notes.append(f"no rope.freqs_* buffers: EVA-02's RoPE reference grid {tuple(ref)} (pt_hw_seq_len) assumed")
    args: dict[str, Any] = dict(
        rope_type="cat", use_rot_pos_emb=True, rope_temperature=10000.0, rope_grid_indexing="ij",
        ref_feat_shape=tuple(ref), eps=1e-6, no_embed_class=False, num_heads=heads,
        global_pool="avg" if "fc_norm.weight" in state else "token")
    conv = convert_timm(state, args, None, str(src.path), hints, size_hints(hints, arch), family="eva02")
    if cos is not None and sin is not None:
        given = {k: hints[k] for k in _ROPE_HINTS if hints.get(k) is not None}
        check_rope(conv.config.replace(**given), cos, sin, str(src.path))
    conv.format, conv.notes = "baai_eva", notes + conv.notes
    # timm's eva02_* pretrained_cfg: OpenAI CLIP mean / std, bicubic, crop 0.9
    conv.preprocess = {"input_size": [conv.config.in_channels, *conv.config.image_hw], **CLIP_PREPROCESS,
                       "crop_pct": 0.9}
    return conv


PE_FORMAT = Format("perception_models", "facebookresearch/perception_models PE state dict (conv1, "
                   "transformer.resblocks, attn_pool.probe / ls_1)", aliases=("pe",), read=convert_pe,
                   detect_keys=looks_like_pe)
EVA02_FORMAT = Format("baai_eva", "baaivision/EVA EVA-02 state dict (attn.q_bias, mlp.w12 / w1 w2 w3, "
                      "rope.freqs_cos)", read=convert_eva02, detect_keys=looks_like_eva02)
