"""DINOv2 and DINOv2 with registers (Oquab et al. 2023; Darcet et al. 2024), from

* Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` directories (``model_type``
  ``dinov2`` / ``dinov2_with_registers``): files hold the legacy names
  (``encoder.layer.N.attention.attention.query``, SwiGLU ``mlp.weights_in`` / ``weights_out``);
  transformers 5 renames them in memory (``attention.q_proj``, ``mlp.gate_proj`` / ``up_proj`` /
  ``down_proj``): both read. Resampling: :func:`~vitkit.model.pos_embed.resample_hf` (Dinov2),
  :func:`~vitkit.model.pos_embed.resample_hf_dinov2_registers` (antialiased, WithRegisters).
* the original facebookresearch/dinov2 hub state dicts (``torch.hub.load('facebookresearch/dinov2',
  'dinov2_vits14_reg')``): timm's names except ``register_tokens`` and the giant's SwiGLU
  ``mlp.w12`` / ``mlp.w3``; ``mask_token`` (masked-image training only) is ignored with a note.
  Resampling: :func:`~vitkit.model.pos_embed.resample_dinov2_original` (scale-factor offset 0.1).
* timm ``vit_*_patch14_dinov2*`` / ``*_reg4_dinov2*``: read by :mod:`vitkit.interop.timm`.

What ``model(x)`` returns: the class token after the final norm (HF ``pooler_output``; the
original's ``x_norm_clstoken``); ``forward_features(x)`` = HF ``last_hidden_state`` (all tokens
after the final norm; with registers the order is class, registers, patches as in HF and timm).

Registers: the original and HF add the position table to [class, patches] and insert the
registers after that (registers get no position). vitkit (as timm) folds the class row into the
class token (``cls_token += pos_embed[:, :1]``) and keeps a table over the patches only
(``pos_embed_prefix=False``): exact, also under resampling (the class row is never resampled).
Without registers the table keeps its class row.

SwiGLU (giant): ``w12`` = [w1; w2] packed, ``silu(x w1) * (x w2)`` then ``w3``; the same packing
as timm's ``SwiGLUPacked`` ``mlp.fc1`` / ``mlp.fc2`` (``mlp_layer="swiglu"``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import CheckpointError
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from .common import Converted, guess_heads, layout_from_rows, size_hints
from .source import Format, Source
from .table import RenameTable

# BitImageProcessor as shipped with facebook/dinov2-*: resize the short side to 256, centre crop 224
PREPROCESS = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bicubic", "crop_pct": 0.875,
              "crop_mode": "center"}

_MASK_NOTE = "the mask token is used only by masked-image training, never at inference"

# ---- the original hub layout (one table, both directions) -----------------------------------
_HUB_COMMON = [
    ("cls_token", "cls_token"), ("pos_embed", "pos_embed"), ("reg_token", "register_tokens"),
    ("patch_embed.proj.{p}", "patch_embed.proj.{p}"),
    ("blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"), ("blocks.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"), ("blocks.{i}.ls1.gamma", "blocks.{i}.ls1.gamma"),
    ("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"), ("blocks.{i}.ls2.gamma", "blocks.{i}.ls2.gamma"),
    ("norm.{p}", "norm.{p}"), ("head.{p}", "head.{p}"),
]
HUB_TABLE = RenameTable(_HUB_COMMON + [("blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
                                       ("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}")],
                        dropped={"mask_token": _MASK_NOTE})
HUB_TABLE_SWIGLU = RenameTable(_HUB_COMMON + [("blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.w12.{p}"),
                                              ("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.w3.{p}")],
                               dropped={"mask_token": _MASK_NOTE})

# ---- Hugging Face (file names first: export writes those; 5.x in-memory names read too) --------
HF_TABLE = RenameTable([
    ("cls_token", "embeddings.cls_token"), ("pos_embed", "embeddings.position_embeddings"),
    ("reg_token", "embeddings.register_tokens"),
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layer.{i}.norm1.{p}"),
    ("blocks.{i}.attn.query.{p}", "encoder.layer.{i}.attention.attention.query.{p}"),
    ("blocks.{i}.attn.key.{p}", "encoder.layer.{i}.attention.attention.key.{p}"),
    ("blocks.{i}.attn.value.{p}", "encoder.layer.{i}.attention.attention.value.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("blocks.{i}.ls1.gamma", "encoder.layer.{i}.layer_scale1.lambda1"),
    ("blocks.{i}.norm2.{p}", "encoder.layer.{i}.norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.mlp.fc2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.mlp.weights_in.{p}"),  # SwiGLU: packed [w1; w2]
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.mlp.weights_out.{p}"),
    ("blocks.{i}.ls2.gamma", "encoder.layer.{i}.layer_scale2.lambda1"),
    ("norm.{p}", "layernorm.{p}"),
    # transformers 5.x in-memory names (state_dict() of a live model)
    ("blocks.{i}.attn.q.{p}", "encoder.layer.{i}.attention.q_proj.{p}"),
    ("blocks.{i}.attn.k.{p}", "encoder.layer.{i}.attention.k_proj.{p}"),
    ("blocks.{i}.attn.v.{p}", "encoder.layer.{i}.attention.v_proj.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.o_proj.{p}"),
    ("blocks.{i}.mlp.gate.{p}", "encoder.layer.{i}.mlp.gate_proj.{p}"),
    ("blocks.{i}.mlp.up.{p}", "encoder.layer.{i}.mlp.up_proj.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.mlp.down_proj.{p}"),
], dropped={"embeddings.mask_token": _MASK_NOTE})


def looks_like_dinov2(keys) -> bool:
    """The original hub layout: timm-like block names plus a mask token, register tokens or w12."""
    keys = set(keys)
    return "patch_embed.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys and (
        "mask_token" in keys or "register_tokens" in keys or "blocks.0.mlp.w12.weight" in keys)


def fold_registers(state: dict[str, torch.Tensor]) -> bool:
    """Class row of the table into the class token when there are registers (see module doc)."""
    if "reg_token" not in state:
        return False
    pos = state["pos_embed"]
    state["cls_token"] = state["cls_token"] + pos[:, :1]
    state["pos_embed"] = pos[:, 1:]
    return True


def _fuse_gate_up(state: dict[str, torch.Tensor]) -> None:
    for k in [k for k in state if re.fullmatch(r"blocks\.\d+\.mlp\.gate\.(weight|bias)", k)]:
        up = k.replace(".gate.", ".up.")
        state[k.replace(".gate.", ".fc1.")] = torch.cat([state.pop(k), state.pop(up)], dim=0)


def _config(state: dict[str, torch.Tensor], *, registers: bool, heads: int | None, depth: int | None,
            eps: float, hints: tuple[Any, ...], source: str, act: str = "gelu") -> ViTConfig:
    dim, in_ch, ph, pw = state["patch_embed.proj.weight"].shape
    n_blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    if depth is not None and depth != n_blocks:
        raise CheckpointError(f"{source}: config says {depth} layers, the weights have {n_blocks}")
    fc1, fc2 = state["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc2.weight"]
    swiglu = fc1.shape[0] == 2 * fc2.shape[1]
    regs = state["reg_token"].shape[1] if registers else 0
    image, prefix_rows = layout_from_rows(state["pos_embed"].shape[1], 1 + regs, (ph, pw), *hints,
                                          prefix_rows=not registers)
    extra: dict[str, Any] = {"mlp_layer": "swiglu"} if swiglu else {}
    return ViTConfig(
        image_size=image if image[0] != image[1] else image[0], patch_size=(ph, pw), in_channels=in_ch,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0, dim=dim, depth=n_blocks,
        num_heads=guess_heads(dim, heads, source), mlp_dim=fc2.shape[1], qkv_bias="blocks.0.attn.qkv.bias" in state,
        norm_eps=eps, act="silu" if swiglu else act, pos_embed_prefix=prefix_rows, num_registers=regs,
        layer_scale=1e-5 if "blocks.0.ls1.gamma" in state else None, **extra,
    )


def _preprocess(config: ViTConfig) -> dict[str, Any]:
    return {"input_size": [config.in_channels, *config.image_hw], **PREPROCESS}


# --------------------------------------------------------------------------- readers
def convert(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """The original facebookresearch/dinov2 hub state dict."""
    src = Source.of(path)
    p = src.path
    raw = src.tensors()
    table = HUB_TABLE_SWIGLU if "blocks.0.mlp.w12.weight" in raw else HUB_TABLE
    notes: list[str] = []
    state, unmatched = table.to_vitkit(raw, notes)
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{p}: no patch_embed.proj.weight; not a DINOv2 hub state dict")
    registers = fold_registers(state)
    hints = hints or {}
    config = _config(state, registers=registers, heads=hints.get("num_heads") or (arch.num_heads if arch else None),
                     depth=None, eps=1e-6, hints=size_hints(hints, arch), source=str(p))
    # the original DinoVisionTransformer interpolates its table to every input (interpolate_pos_encoding)
    return Converted(config=config.replace(pos_resample="dinov2", dynamic_img_size=True), state=state, format="dinov2",
                     source=str(p), preprocess=_preprocess(config),
                     unexpected=unmatched, notes=notes,
                     info={"family": "dinov2", "registers": config.num_registers})


def convert_hf(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """A transformers Dinov2Model / Dinov2WithRegistersModel directory (or its weight file)."""
    from .hf_common import fuse_qkv, hf_act, preprocess_from_dir, read_dir

    directory, meta, wfile, raw = read_dir(path)
    archs = [str(a) for a in meta.get("architectures") or []]
    if any(a.endswith("ForImageClassification") for a in archs):
        raise CheckpointError(f"{directory}: {archs[0]}'s classifier reads [class token, mean of patch tokens] "
                              "concatenated, which a ViT head is not; load the backbone (Dinov2Model) instead")
    raw = {(k[len("dinov2."):] if k.startswith("dinov2.") else k): v for k, v in raw.items()}
    notes: list[str] = []
    state, unmatched = HF_TABLE.to_vitkit(raw, notes)
    state = fuse_qkv(state, str(wfile))
    _fuse_gate_up(state)
    registers = fold_registers(state)
    hints = hints or {}
    act = hints.get("act") or hf_act(meta.get("hidden_act", "gelu"), str(directory))
    if meta.get("use_swiglu_ffn"):
        act = "silu"
    size = meta.get("image_size")
    config = _config(state, registers=registers, heads=int(meta.get("num_attention_heads") or 0) or None,
                     depth=meta.get("num_hidden_layers"), eps=float(meta.get("layer_norm_eps", 1e-6)),
                     hints=size_hints(hints, arch, size), source=str(directory), act=act)
    # facebook/dinov2-*: config image_size 518 (the table's grid), processor crop 224; Dinov2Model
    # interpolates the table to each input's grid on every call, so vitkit's model takes any size too
    # (dynamic_img_size, the same interpolation) and keeps the processor's 224 as its input (the load
    # report notes it: vitkit.interop.load.model_from_converted).
    pre = preprocess_from_dir(directory, config, _preprocess(config))
    resample = "hf_dinov2_registers" if meta.get("model_type") == "dinov2_with_registers" else "hf"
    # Dinov2Model takes any input size (interpolate_pos_encoding on every call): so does the model here.
    return Converted(config=config.replace(pos_resample=resample, dynamic_img_size=True), state=state, format="hf",
                     source=str(directory),
                     preprocess=pre, unexpected=unmatched, notes=notes,
                     info={"family": "dinov2", "architectures": archs, "registers": config.num_registers})


# --------------------------------------------------------------------------- writers
def _unfold_registers(sd: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`fold_registers`: a zero class row in front of the table (same outputs)."""
    sd = dict(sd)
    if config.num_registers:
        if config.pos_embed_prefix:
            raise CheckpointError("DINOv2 with registers has no position rows for the registers; this model has")
        pos = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    return sd


def export_hub(model, path: str | Path) -> Path:
    """The original facebookresearch/dinov2 state dict (safetensors), through :data:`HUB_TABLE`."""
    from ..errors import ConfigError
    from ..io import save_state_dict
    from .common import family_parts

    c = model.config
    bad = family_parts(c, allowed=("swiglu",))
    if bad:  # parts the hub's DinoVisionTransformer has no place for (its reader would build a plain one)
        raise ConfigError(f"the DINOv2 hub layout has no place for {bad}; export to timm or vitkit instead")
    sd = _unfold_registers(model.state_dict(), c)
    table = HUB_TABLE_SWIGLU if getattr(c, "mlp_layer", "mlp") == "swiglu" else HUB_TABLE
    out, left = table.from_vitkit(sd)
    if left:
        raise CheckpointError(f"the DINOv2 hub layout has no names for {left}")
    out["mask_token"] = torch.zeros(1, c.dim)
    return save_state_dict(out, Path(path), metadata={"format": "pt"})



def export_hf(model, path: str | Path) -> Path:
    """A transformers ``Dinov2Model`` (``Dinov2WithRegistersModel`` with registers) directory
    through :data:`HF_TABLE` (file names); a table without a class row gets a zero one (the class
    token keeps the sum: same outputs)."""
    from ..errors import ConfigError
    from .common import family_parts
    from .hf_common import act_back, split_qkv, write_dir

    c = model.config
    bad = family_parts(c, allowed=("swiglu",))
    if (bad or not c.class_token or c.pooling != "cls" or c.num_classes or c.fc_norm or c.head_hidden_dim
            or not c.norm_first or c.pos_embed != "learned" or c.image_hw[0] != c.image_hw[1]
            or (c.num_registers and c.pos_embed_prefix)):
        raise ConfigError("no Hugging Face Dinov2 equivalent: it needs a square input, a class token read after "
                          "the final norm, no classifier head (Dinov2ForImageClassification reads [cls, mean]), "
                          f"registers without position rows, and none of {bad or 'norm_pre/map/dist_token'}")
    D, h = c.dim, c.hidden_dim
    swiglu = c.mlp_layer == "swiglu"

    def width(r: int) -> int:  # Dinov2MLP / Dinov2SwiGLUFFN hidden width for an (int) mlp_ratio
        return (int(int(D * r) * 2 / 3) + 7) // 8 * 8 if swiglu else int(D * r)

    ratio = next((r for r in range(1, 17) if width(r) == h), None)
    if ratio is None:
        raise ConfigError(f"MLP width {h} is not reachable through HF Dinov2's integer mlp_ratio for dim {D}")
    sd = _unfold_registers(model.state_dict(), c)
    if not c.num_registers and not c.pos_embed_prefix:
        sd["pos_embed"] = torch.cat([torch.zeros_like(sd["pos_embed"][:, :1]), sd["pos_embed"]], dim=1)
    for i in range(c.depth):
        for ls in ("ls1", "ls2"):
            sd.setdefault(f"blocks.{i}.{ls}.gamma", torch.ones(D))  # HF Dinov2 always has layer scale
    out, left = HF_TABLE.from_vitkit(split_qkv(sd, D, ("query", "key", "value")))
    if left:
        raise ConfigError(f"the HF Dinov2 layout has no names for {left}")
    if swiglu:
        out = {k.replace(".mlp.fc1.", ".mlp.weights_in.").replace(".mlp.fc2.", ".mlp.weights_out."): v
               for k, v in out.items()}
    out["embeddings.mask_token"] = torch.zeros(1, D)
    regs = c.num_registers
    meta = {
        "architectures": ["Dinov2WithRegistersModel" if regs else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if regs else "dinov2", "hidden_size": D,
        "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads, "mlp_ratio": ratio,
        "hidden_act": act_back(c.act if not swiglu else "silu"), "layer_norm_eps": c.norm_eps,
        "image_size": c.image_hw[0], "patch_size": c.patch_hw[0] if c.patch_hw[0] == c.patch_hw[1] else list(c.patch_hw),
        "num_channels": c.in_channels, "qkv_bias": c.qkv_bias, "layerscale_value": 1.0, "use_swiglu_ffn": swiglu,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0,
    }
    if regs:
        meta["num_register_tokens"] = regs
    return write_dir(path, out, meta)


FORMAT = Format("dinov2", "facebookresearch/dinov2 hub state dict (register_tokens, w12/w3)", read=convert,
                write=export_hub, detect_keys=looks_like_dinov2,
                tiny=dict(image_size=28, patch_size=14, num_classes=0, dim=32, depth=2, num_heads=2, num_registers=4,
                          pos_embed_prefix=False, layer_scale=1e-5), tiny_hints=dict(num_heads=2))
