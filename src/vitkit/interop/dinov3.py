"""DINOv3 ViTs (Siméoni et al. 2025) from Hugging Face ``DINOv3ViTModel`` directories (``model_type``
``dinov3_vit``, e.g. ``facebook/dinov3-vits16-pretrain-lvd1689m``).

The architecture in vitkit's terms: no position table (``pos_embed="none"``), rotary position
embedding of the patch queries and keys instead (``rope="dinov3"``, :mod:`vitkit.model.rope`),
a class token and register tokens in front of the patches (registers get no position, as nothing
does), LayerScale, pre-norm blocks with eps 1e-5, an MLP or (``use_gated_mlp``, the 7B and
ViT-H+) a SiLU-gated MLP packed as ``[gate; up]`` (``mlp_layer="swiglu"``). No key bias: the
fused qkv bias holds zeros for k (the same numbers). Because RoPE works on patch centres in
[-1, 1], the model takes any input size whose sides the patch divides; the loaded model has
``dynamic_img_size=True`` to match (HF's model takes any size too).

Files name the blocks ``layer.N.*``; a live transformers 5 model's ``state_dict()`` has
``model.layer.N.*``: both read. ``embeddings.mask_token`` (masked-image training only) is dropped
with a note. Train-mode RoPE coordinate augmentation (``pos_embed_shift / jitter / rescale``) is
carried into ``rope_shift / rope_jitter / rope_rescale``.

``model(x)`` returns the class token after the final norm (HF ``pooler_output``);
``forward_features(x)`` = HF ``last_hidden_state`` (class, registers, patches, all normed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import CheckpointError
from .common import Converted, guess_heads
from .table import RenameTable

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# DINOv3ViTImageProcessorFast as shipped: resize to 224 x 224 (no crop), bilinear, ImageNet mean/std
PREPROCESS = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear", "crop_pct": 1.0}

_PARTS = [
    ("blocks.{i}.norm1.{p}", "norm1.{p}"), ("blocks.{i}.attn.q.{p}", "attention.q_proj.{p}"),
    ("blocks.{i}.attn.k.{p}", "attention.k_proj.{p}"), ("blocks.{i}.attn.v.{p}", "attention.v_proj.{p}"),
    ("blocks.{i}.attn.proj.{p}", "attention.o_proj.{p}"), ("blocks.{i}.ls1.gamma", "layer_scale1.lambda1"),
    ("blocks.{i}.norm2.{p}", "norm2.{p}"), ("blocks.{i}.mlp.up.{p}", "mlp.up_proj.{p}"),
    ("blocks.{i}.mlp.gate.{p}", "mlp.gate_proj.{p}"), ("blocks.{i}.mlp.fc2.{p}", "mlp.down_proj.{p}"),
    ("blocks.{i}.ls2.gamma", "layer_scale2.lambda1"),
]
HF_TABLE = RenameTable([
    ("cls_token", "embeddings.cls_token"), ("reg_token", "embeddings.register_tokens"),
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.{p}"), ("norm.{p}", "norm.{p}"),
    *[(ours, "layer.{i}." + theirs) for ours, theirs in _PARTS],          # the files
    *[(ours, "model.layer.{i}." + theirs) for ours, theirs in _PARTS],    # transformers 5 in memory
], dropped={"embeddings.mask_token": "the mask token is used only by masked-image training, never at inference"})


def _fill_biases(state: dict[str, torch.Tensor]) -> bool:
    """Fused qkv for every block; biases the checkpoint leaves out (DINOv3 has no key bias) are
    zeros beside the ones it has. Also zero output-projection / MLP biases where absent
    (``proj_bias`` / ``mlp_bias`` False): vitkit's layers always carry one. Returns qkv_bias."""
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.attn\.q\.weight", k))})
    any_qkv_bias = any(f"blocks.{i}.attn.{n}.bias" in state for i in blocks for n in "qkv")
    for i in blocks:
        b = f"blocks.{i}.attn."
        ws = [state.pop(f"{b}{n}.weight") for n in "qkv"]
        state[f"{b}qkv.weight"] = torch.cat(ws, dim=0)
        biases = [state.pop(f"{b}{n}.bias", None) for n in "qkv"]
        if any_qkv_bias:
            state[f"{b}qkv.bias"] = torch.cat([x if x is not None else ws[0].new_zeros(ws[0].shape[0])
                                               for x in biases])
        for layer in ("attn.proj", "mlp.fc2", "mlp.up", "mlp.gate"):
            w = state.get(f"blocks.{i}.{layer}.weight")
            if w is not None and f"blocks.{i}.{layer}.bias" not in state:
                state[f"blocks.{i}.{layer}.bias"] = w.new_zeros(w.shape[0])
        gate = state.pop(f"blocks.{i}.mlp.gate.weight", None)
        up, up_b = state.pop(f"blocks.{i}.mlp.up.weight"), state.pop(f"blocks.{i}.mlp.up.bias")
        if gate is None:
            state[f"blocks.{i}.mlp.fc1.weight"], state[f"blocks.{i}.mlp.fc1.bias"] = up, up_b
        else:  # packed [gate; up], as vitkit's SwiGLU (timm's SwiGLUPacked) reads it
            state[f"blocks.{i}.mlp.fc1.weight"] = torch.cat([gate, up], dim=0)
            state[f"blocks.{i}.mlp.fc1.bias"] = torch.cat([state.pop(f"blocks.{i}.mlp.gate.bias"), up_b])
    return any_qkv_bias


def convert_hf(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """A transformers DINOv3ViTModel directory (or its weight file next to config.json)."""
    from .hf import hf_act, preprocess_from_dir, read_dir

    directory, meta, wfile, raw = read_dir(path)
    notes: list[str] = []
    state, unmatched = HF_TABLE.to_vitkit(raw, notes)
    if "patch_embed.proj.weight" not in state or "blocks.0.attn.q.weight" not in state:
        raise CheckpointError(f"{wfile}: no embeddings.patch_embeddings / layer.0.attention.q_proj weights; "
                              "not a DINOv3ViTModel checkpoint")
    qkv_bias = _fill_biases(state)
    gated = bool(meta.get("use_gated_mlp"))
    act = hf_act(meta.get("hidden_act", "gelu"), str(directory))
    if gated and act != "silu":
        raise CheckpointError(f"{directory}: a gated MLP with hidden_act={meta.get('hidden_act')!r}; vitkit's gated "
                              "MLP (SwiGLU) gates with SiLU, as every released DINOv3 does")
    dim, in_ch, ph, pw = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    if meta.get("num_hidden_layers") not in (None, depth):
        raise CheckpointError(f"{directory}: config says {meta['num_hidden_layers']} layers, the weights have {depth}")
    hints = hints or {}
    size = hints.get("image_size") or (arch.image_size if arch else None) or meta.get("image_size") or 224
    regs = state["reg_token"].shape[1] if "reg_token" in state else 0
    if regs == 0:
        state.pop("reg_token", None)
    fc2 = state["blocks.0.mlp.fc2.weight"]
    config = ViTConfig(
        image_size=tuple(size) if isinstance(size, (list, tuple)) else int(size), patch_size=(ph, pw),
        in_channels=in_ch, num_classes=0, dim=dim, depth=depth,
        num_heads=guess_heads(dim, int(meta.get("num_attention_heads") or 0) or hints.get("num_heads"),
                              str(directory)),
        mlp_dim=fc2.shape[1], qkv_bias=qkv_bias, norm_eps=float(meta.get("layer_norm_eps", 1e-5)),
        act="silu" if gated else act, mlp_layer="swiglu" if gated else "mlp", pos_embed="none",
        num_registers=regs, layer_scale=float(meta.get("layerscale_value", 1.0)) if "blocks.0.ls1.gamma" in state
        else None, rope="dinov3", rope_theta=float(meta.get("rope_theta", 100.0)),
        rope_shift=meta.get("pos_embed_shift"), rope_jitter=meta.get("pos_embed_jitter"),
        rope_rescale=meta.get("pos_embed_rescale"), dynamic_img_size=True,
    )
    pre = preprocess_from_dir(directory, config, {"input_size": [in_ch, *config.image_hw], **PREPROCESS})
    archs = [str(a) for a in meta.get("architectures") or []]
    return Converted(config=config, state=state, format="hf", source=str(directory), preprocess=pre,
                     unexpected=unmatched, notes=notes,
                     info={"family": "dinov3", "architectures": archs, "registers": regs})
