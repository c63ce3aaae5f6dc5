"""DINOv3 ViTs (Siméoni et al. 2025) from the three places they ship:

* Hugging Face ``DINOv3ViTModel`` directories (``model_type`` ``dinov3_vit``, e.g.
  ``facebook/dinov3-vits16-pretrain-lvd1689m``): :func:`convert_hf`;
* the original facebookresearch/dinov3 state dicts (``storage_tokens``, ``rope_embed.periods``,
  ``attn.qkv.bias`` with a ``bias_mask`` zeroing its k part, ``ls1.gamma``, SwiGLU ``mlp.w1/w2/w3``):
  :func:`convert`, format ``dinov3``;
* timm's ``vit_*_patch16_dinov3*`` (its ``Eva`` class: ``reg_token``, ``gamma_1``, ``q_bias`` /
  ``v_bias``, SwiGLU ``mlp.fc1_g / fc1_x``): :func:`convert_timm`, reached through format ``timm``.
  ``model(x)`` is timm's: the mean of the patch tokens unless the hub config's ``global_pool`` is
  ``token`` (the class token, as upstream).

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
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError
from .common import Converted, guess_heads
from .source import Format, Source
from .table import RenameTable

# DINOv3ViTImageProcessorFast as shipped: resize to 224 x 224 (no crop), bilinear, ImageNet mean/std
PREPROCESS = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bilinear", "crop_pct": 1.0}

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


def _fill_biases(state: dict[str, torch.Tensor]) -> None:
    """Fused qkv for every block; biases the checkpoint leaves out (DINOv3 has no key bias) are
    zeros beside the ones it has. Also zero output-projection / MLP biases where absent
    (``proj_bias`` / ``mlp_bias`` False): vitkit's layers always carry one. A model with no
    q/k/v bias at all keeps none (``qkv_bias=False``)."""
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
        if f"blocks.{i}.mlp.gate.weight" not in state:  # plain MLP: up_proj is fc1
            for kind in ("weight", "bias"):
                state[f"blocks.{i}.mlp.fc1.{kind}"] = state.pop(f"blocks.{i}.mlp.up.{kind}")
    _pack_gated(state)


def convert_hf(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """A transformers DINOv3ViTModel directory (or its weight file next to config.json)."""
    from .hf_common import hf_act, preprocess_from_dir, read_dir

    directory, meta, wfile, raw = read_dir(path)
    notes: list[str] = []
    state, unmatched = HF_TABLE.to_vitkit(raw, notes)
    if "patch_embed.proj.weight" not in state or "blocks.0.attn.q.weight" not in state:
        raise CheckpointError(f"{wfile}: no embeddings.patch_embeddings / layer.0.attention.q_proj weights; "
                              "not a DINOv3ViTModel checkpoint")
    _fill_biases(state)
    gated = bool(meta.get("use_gated_mlp"))
    act = hf_act(meta.get("hidden_act", "gelu"), str(directory))
    if gated and act != "silu":
        raise CheckpointError(f"{directory}: a gated MLP with hidden_act={meta.get('hidden_act')!r}; vitkit's gated "
                              "MLP (SwiGLU) gates with SiLU, as every released DINOv3 does")
    hints = hints or {}
    size = hints.get("image_size") or (arch.image_size if arch else None) or meta.get("image_size") or 224
    config = _config_from_state(
        state, heads=int(meta.get("num_attention_heads") or 0) or hints.get("num_heads"),
        theta=float(meta.get("rope_theta", 100.0)), pooling="cls", size=size, source=str(directory), gated=gated,
        act=act, norm_eps=float(meta.get("layer_norm_eps", 1e-5)), layer_scale=float(meta.get("layerscale_value", 1.0))
        if "blocks.0.ls1.gamma" in state else None, rope_shift=meta.get("pos_embed_shift"),
        rope_jitter=meta.get("pos_embed_jitter"), rope_rescale=meta.get("pos_embed_rescale"))
    if meta.get("num_hidden_layers") not in (None, config.depth):
        raise CheckpointError(f"{directory}: config says {meta['num_hidden_layers']} layers, the weights have "
                              f"{config.depth}")
    pre = preprocess_from_dir(directory, config, {"input_size": [config.in_channels, *config.image_hw], **PREPROCESS})
    archs = [str(a) for a in meta.get("architectures") or []]
    return Converted(config=config, state=state, format="hf", source=str(directory), preprocess=pre,
                     unexpected=unmatched, notes=notes,
                     info={"family": "dinov3", "architectures": archs, "registers": config.num_registers})


# ---- the original facebookresearch/dinov3 layout ------------------------------------------------
_ORIG_NOTE = "used only by DINOv3 pretraining (masked tokens / local crops), never at inference"
HUB_TABLE = RenameTable([
    ("cls_token", "cls_token"), ("reg_token", "storage_tokens"), ("patch_embed.proj.{p}", "patch_embed.proj.{p}"),
    ("blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"), ("blocks.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"), ("blocks.{i}.ls1.gamma", "blocks.{i}.ls1.gamma"),
    ("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"), ("blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"), ("blocks.{i}.mlp.gate.{p}", "blocks.{i}.mlp.w1.{p}"),
    ("blocks.{i}.mlp.up.{p}", "blocks.{i}.mlp.w2.{p}"), ("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.w3.{p}"),
    ("blocks.{i}.ls2.gamma", "blocks.{i}.ls2.gamma"), ("norm.{p}", "norm.{p}"), ("head.{p}", "head.{p}"),
], dropped={"mask_token": _ORIG_NOTE, "local_cls_norm.weight": _ORIG_NOTE, "local_cls_norm.bias": _ORIG_NOTE})


def looks_like_dinov3(keys) -> bool:
    """The original layout: DINOv2's hub names plus ``storage_tokens`` or the RoPE periods."""
    keys = set(keys)
    return "patch_embed.proj.weight" in keys and ("storage_tokens" in keys or "rope_embed.periods" in keys)


def _theta_from_periods(periods: torch.Tensor, head_dim: int, source: str) -> float:
    """The RoPE base the original stored as ``periods = base ** (4 j / head_dim)``; checked."""
    n = periods.numel()
    if n != head_dim // 4:
        raise CheckpointError(f"{source}: rope_embed.periods has {n} entries, a head of {head_dim} needs {head_dim // 4}")
    if n < 2:
        return 100.0
    theta = float(periods[1].double() ** (head_dim / 4))
    want = theta ** (4 * torch.arange(n, dtype=torch.float64) / head_dim)
    if not torch.allclose(periods.double(), want, rtol=1e-4):
        raise CheckpointError(f"{source}: rope_embed.periods are not base ** (4 j / head_dim) for one base; "
                              "this RoPE (min/max periods) is not one vitkit reproduces")
    return round(theta, 6)


def _pack_gated(state: dict[str, torch.Tensor]) -> bool:
    """``gate`` + ``up`` -> packed SwiGLU ``fc1`` ([gate; up]); returns whether any block is gated."""
    gated = False
    for k in [k for k in state if re.fullmatch(r"blocks\.\d+\.mlp\.gate\.weight", k)]:
        b = k[: -len("gate.weight")]
        for kind in ("weight", "bias"):
            if f"{b}gate.{kind}" in state:
                state[f"{b}fc1.{kind}"] = torch.cat([state.pop(f"{b}gate.{kind}"), state.pop(f"{b}up.{kind}")])
        gated = True
    return gated


def _config_from_state(state: dict[str, torch.Tensor], *, heads: int | None, theta: float, pooling: str,
                       size: Any, source: str, gated: bool, act: str = "gelu", **fields: Any) -> ViTConfig:
    """The config the tensors imply (RoPE, no table, any size); ``fields``: what the source's own
    config says beyond them (eps, layer-scale init, RoPE augmentation). Drops an empty reg_token."""
    dim, in_ch, ph, pw = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    regs = state["reg_token"].shape[1] if "reg_token" in state else 0
    if regs == 0:
        state.pop("reg_token", None)
    head = state.get("head.weight")
    kw: dict[str, Any] = dict(norm_eps=1e-5, layer_scale=1e-5 if "blocks.0.ls1.gamma" in state else None)
    kw.update(fields)
    return ViTConfig(
        image_size=tuple(size) if isinstance(size, (list, tuple)) else int(size or 224), patch_size=(ph, pw),
        in_channels=in_ch, num_classes=head.shape[0] if head is not None else 0, dim=dim, depth=depth,
        num_heads=guess_heads(dim, heads, source), mlp_dim=state["blocks.0.mlp.fc2.weight"].shape[1],
        qkv_bias="blocks.0.attn.qkv.bias" in state, act="silu" if gated else act,
        mlp_layer="swiglu" if gated else "mlp", pos_embed="none", pooling=pooling, num_registers=regs,
        rope="dinov3", rope_theta=theta, dynamic_img_size=True, **kw,
    )


def convert(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """The original facebookresearch/dinov3 state dict (``torch.hub.load('facebookresearch/dinov3', ...)``)."""
    from .common import size_hints

    src = Source.of(path)
    p = src.path
    raw = src.tensors()
    notes: list[str] = []
    periods = raw.get("rope_embed.periods")
    masked = any(k.endswith(".attn.qkv.bias_mask") for k in raw)
    raw = {k: v for k, v in raw.items() if k != "rope_embed.periods" and not k.endswith(".bias_mask")}
    state, unmatched = HUB_TABLE.to_vitkit(raw, notes)
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{p}: no patch_embed.proj.weight; not a DINOv3 state dict")
    for i in sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.attn\.qkv\.bias", k))}):
        b = state[f"blocks.{i}.attn.qkv.bias"].clone()
        D = b.shape[0] // 3
        b[D: 2 * D] = 0  # the original masks the k bias to zero in every forward (bias_mask); so does timm
        state[f"blocks.{i}.attn.qkv.bias"] = b
    if masked:
        notes.append("attn.qkv.bias_mask: the k part of each qkv bias is zero (as the original applies it)")
    gated = _pack_gated(state)
    hints = hints or {}
    dim = state["patch_embed.proj.weight"].shape[0]
    heads = hints.get("num_heads") or (arch.num_heads if arch else None)
    head_dim = dim // guess_heads(dim, heads, str(p))
    theta = _theta_from_periods(periods, head_dim, str(p)) if periods is not None else 100.0
    size = next((h for h in size_hints(hints, arch) if h is not None), 224)
    config = _config_from_state(state, heads=heads, theta=theta, pooling="cls", size=size, source=str(p),
                                gated=gated)
    pre = {"input_size": [config.in_channels, *config.image_hw], **PREPROCESS}
    return Converted(config=config, state=state, format="dinov3", source=str(p), preprocess=pre,
                     unexpected=unmatched, notes=notes, info={"family": "dinov3", "registers": config.num_registers})


def looks_like_timm_dinov3(state, architecture: str | None) -> bool:
    """timm's Eva layout of DINOv3: ``gamma_1`` layer scales and no position table; with a hub
    config, an architecture named ``*dinov3*`` (timm's other Eva models, EVA-02 and the RoPE ViTs,
    rotate differently: an error, never a silent misread)."""
    eva = "blocks.0.gamma_1" in state and "patch_embed.proj.weight" in state
    if architecture:
        if "dinov3" in architecture:
            return True
        if eva:
            raise CheckpointError(f"timm architecture {architecture!r} is one of timm's Eva models; vitkit reads the "
                                  "DINOv3 ones (vit_*_patch16_dinov3*), whose RoPE it reproduces")
        return False
    if eva and ("pos_embed" in state or "rope.freqs" in state):
        raise CheckpointError("a timm Eva state dict with a position table or learned RoPE frequencies (EVA-02, "
                              "mixed RoPE); vitkit reads timm's DINOv3 Eva models only")
    return eva


def convert_timm(state: dict[str, torch.Tensor], args: dict[str, Any], architecture: str | None, source: str,
                 size: Any) -> Converted:
    """timm ``vit_*_patch16_dinov3*`` weights (already read) with its hub config's ``model_args``; the
    preprocessing is DINOv3's (the caller replaces it with the hub config's ``pretrained_cfg``)."""
    notes: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("rope.") or re.fullmatch(r"blocks\.\d+\.attn\.(q_bias|v_bias)", k):
            continue
        k = re.sub(r"\.gamma_(\d)$", r".ls\1.gamma", k)
        k = k.replace(".mlp.fc1_g.", ".mlp.gate.").replace(".mlp.fc1_x.", ".mlp.up.")
        out[k] = v
    for k in [k for k in state if k.endswith(".attn.q_bias")]:
        q, v = state[k], state[k.replace("q_bias", "v_bias")]
        out[k.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.zeros_like(q), v])
    if any(k.startswith("blocks.0.attn.q_proj") for k in out) or "blocks.0.attn.qkv.weight" not in out:
        raise CheckpointError(f"{source}: a timm Eva model without a fused qkv; only timm's DINOv3 layout is read")
    gated = _pack_gated(out)
    pool = args.get("global_pool", "avg")
    if pool not in ("avg", "token"):
        raise CheckpointError(f"{source}: global_pool={pool!r}; timm's DINOv3 pools 'avg' or 'token'")
    theta = float(args.get("rope_temperature", 100.0))
    config = _config_from_state(out, heads=args.get("num_heads"), theta=theta,
                                pooling="cls" if pool == "token" else "mean", size=size, source=source, gated=gated)
    if not architecture:
        notes.append("no timm config: read as timm's DINOv3 (Eva, RoPE 'dinov3', global_pool 'avg' unless told)")
    if pool == "avg":
        notes.append("model(x) is timm's default for DINOv3: the mean of the patch tokens (global_pool='avg'); "
                     "upstream reads the class token (timm global_pool='token')")
    pre = {"input_size": [config.in_channels, *config.image_hw], **PREPROCESS}
    return Converted(config=config, state=out, format="timm", source=source, preprocess=pre, notes=notes,
                     info={"family": "dinov3", "architecture": architecture, "registers": config.num_registers})


FORMAT = Format("dinov3", "facebookresearch/dinov3 state dict (storage_tokens, rope_embed.periods, w1/w2/w3)",
                read=convert, detect_keys=looks_like_dinov3)
