"""The plain ViT in Hugging Face transformers directories (``ViTModel`` / ``ViTForImageClassification``):
``config.json`` (``model_type: vit``) + ``model.safetensors`` (or ``pytorch_model.bin``), and an
optional ``preprocessor_config.json``.

Two key spellings exist. ``save_pretrained`` writes (and the hub holds) the legacy names
``vit.encoder.layer.N.attention.attention.query`` ...; transformers 5.x renames them in memory to
``vit.layers.N.attention.q_proj`` ... (checked against the installed 5.23: its state_dict uses the
new names, its files the legacy ones). Both tables are below. Separate q, k, v matrices are
concatenated into timm's fused ``qkv`` (rows q then k then v).

Traps recorded: HF's LayerNorm eps defaults to 1e-12 (1e-6 elsewhere) and is read from
``layer_norm_eps``; ``ViTModel``'s pooler (dense + tanh on the class token) is the paper's
pre-logits layer, so a checkpoint with a pooler maps to ``head_hidden_dim`` + ``head_act``;
``ViTForImageClassification`` has no pooler and reads the class token after the final norm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import ConfigError
from ..io import atomic_write_text, save_state_dict
from .common import Converted, family_parts
from .hf_common import (
    ACT_BACK,
    HF_ACTS,
    fuse_qkv,
    hf_act,
    labels_from_meta,
    preprocess_from_dir,
    read_dir,
    split_qkv,
)
from .source import Source
from .table import RenameTable

# HF ViT: one table, both directions (vitkit name, HF name after the optional "vit." prefix). The
# legacy file names come first (export writes them, as save_pretrained does); the transformers 5.x
# in-memory names follow (import only). q/k/v are fused after import and split before export.
TABLE = RenameTable([
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layer.{i}.layernorm_before.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layer.{i}.layernorm_after.{p}"),
    ("blocks.{i}.attn.query.{p}", "encoder.layer.{i}.attention.attention.query.{p}"),
    ("blocks.{i}.attn.key.{p}", "encoder.layer.{i}.attention.attention.key.{p}"),
    ("blocks.{i}.attn.value.{p}", "encoder.layer.{i}.attention.attention.value.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("norm.{p}", "layernorm.{p}"),
    ("pre_logits.fc.{p}", "pooler.dense.{p}"),
    ("head.{p}", "classifier.{p}"),
    ("blocks.{i}.norm1.{p}", "layers.{i}.layernorm_before.{p}"),
    ("blocks.{i}.norm2.{p}", "layers.{i}.layernorm_after.{p}"),
    ("blocks.{i}.attn.q.{p}", "layers.{i}.attention.q_proj.{p}"),
    ("blocks.{i}.attn.k.{p}", "layers.{i}.attention.k_proj.{p}"),
    ("blocks.{i}.attn.v.{p}", "layers.{i}.attention.v_proj.{p}"),
    ("blocks.{i}.attn.proj.{p}", "layers.{i}.attention.o_proj.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "layers.{i}.mlp.fc2.{p}"),
], dropped={"embeddings.mask_token": "ViTForMaskedImageModeling's mask token is unused for inference"})


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[4:] if k.startswith("vit.") else k): v for k, v in state.items()}


def config_from_hf(meta: dict[str, Any], has_pooler: bool, has_classifier: bool, num_labels: int) -> ViTConfig:
    act = hf_act(meta.get("hidden_act", "gelu"))
    pooler_act = HF_ACTS.get(str(meta.get("pooler_act", "tanh")), "tanh")
    dim = int(meta.get("hidden_size", 768))
    image = meta.get("image_size", 224)
    patch = meta.get("patch_size", 16)
    return ViTConfig(
        image_size=tuple(image) if isinstance(image, list) else image,
        patch_size=tuple(patch) if isinstance(patch, list) else patch,
        in_channels=int(meta.get("num_channels", 3)), num_classes=num_labels if has_classifier else 0,
        dim=dim, depth=int(meta.get("num_hidden_layers", 12)), num_heads=int(meta.get("num_attention_heads", 12)),
        mlp_dim=int(meta.get("intermediate_size", 4 * dim)), qkv_bias=bool(meta.get("qkv_bias", True)),
        norm_eps=float(meta.get("layer_norm_eps", 1e-12)), act=act,
        head_hidden_dim=int(meta.get("pooler_output_size") or dim) if has_pooler else None, head_act=pooler_act,
    )


def convert_hf(path: Source | str | Path, arch: ViTConfig | None = None,
               hints: dict[str, Any] | None = None) -> Converted:
    """Read a transformers ``ViTModel`` / ``ViTForImageClassification`` checkpoint."""
    directory, meta, p, raw = read_dir(path)
    raw = _strip_prefix(raw)
    notes: list[str] = []
    state, unmatched = TABLE.to_vitkit(raw, notes)
    state = fuse_qkv(state, str(p))
    is_classifier = any(str(a).endswith("ForImageClassification") for a in meta.get("architectures") or [])
    has_classifier = "head.weight" in state
    has_pooler = "pre_logits.fc.weight" in state and not is_classifier
    if "pre_logits.fc.weight" in state and is_classifier:
        # ViTForImageClassification never uses a pooler; weights from a ViTModel parent are ignored as HF does
        state.pop("pre_logits.fc.weight")
        state.pop("pre_logits.fc.bias", None)
        notes.append("pooler weights ignored: ViTForImageClassification does not use them")
    num_labels = state["head.weight"].shape[0] if has_classifier else 0
    config = config_from_hf(meta, has_pooler, has_classifier, num_labels)
    labels = labels_from_meta(meta, num_labels) if has_classifier else None
    return Converted(config=config.replace(pos_resample="hf"), state=state, format="hf", source=str(directory),
                     preprocess=preprocess_from_dir(directory, config), labels=labels, unexpected=unmatched, notes=notes,
                     info={"architectures": meta.get("architectures")})


def export_hf(model, path: str | Path) -> Path:
    """Write a transformers ViT directory (legacy file key names, as ``save_pretrained`` does):
    ``ViTForImageClassification`` when the model has a head, ``ViTModel`` (with its pooler when
    the model has a pre-logits layer) otherwise."""
    c = model.config
    if (not c.norm_first or c.pooling != "cls" or c.num_registers or c.pos_embed != "learned"
            or not c.pos_embed_prefix or c.layer_scale is not None or c.fc_norm or c.qk_scale
            or c.act not in ACT_BACK or family_parts(c)):
        raise ConfigError("this config has no Hugging Face ViT equivalent (HF ViT is pre-norm, class-token "
                          "pooled, learned table with a class row, no registers / layer scale / fc_norm / "
                          f"family parts {family_parts(c)}); DINOv2, CLIP, SigLIP and DeiT export to timm or their "
                          "original layouts (export formats dinov2, openai_clip, jax)")
    if c.head_hidden_dim and c.num_classes:
        raise ConfigError("HF ViTForImageClassification has no pre-logits layer; export a model without one")
    sd = dict(model.state_dict())
    if c.num_classes:
        sd = {k: v for k, v in sd.items() if not k.startswith("pre_logits.")}
    D = c.dim
    out, left = TABLE.from_vitkit(split_qkv(sd, D, ("query", "key", "value")))
    if left:
        raise ConfigError(f"HF ViT has no names for {left}")
    if c.num_classes:  # ViTForImageClassification keeps the backbone under vit.
        out = {(k if k.startswith("classifier.") else f"vit.{k}"): v for k, v in out.items()}
    labels = model.labels or [f"LABEL_{i}" for i in range(max(c.num_classes, 2))]
    h, w = c.image_hw
    ph, pw = c.patch_hw
    meta: dict[str, Any] = {
        "architectures": ["ViTForImageClassification" if c.num_classes else "ViTModel"],
        "model_type": "vit", "hidden_size": D, "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads,
        "intermediate_size": c.hidden_dim, "hidden_act": ACT_BACK[c.act], "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": c.norm_eps,
        "image_size": h if h == w else [h, w], "patch_size": ph if ph == pw else [ph, pw],
        "num_channels": c.in_channels, "qkv_bias": c.qkv_bias, "encoder_stride": ph,
        "pooler_output_size": c.head_hidden_dim or D, "pooler_act": "tanh" if not c.head_hidden_dim
        else {v: k for k, v in ACT_BACK.items()}.get(c.head_act, c.head_act),
        "id2label": {str(i): str(n) for i, n in enumerate(labels)},
        "label2id": {str(n): i for i, n in enumerate(labels)},
    }
    if c.head_hidden_dim:
        meta["pooler_act"] = ACT_BACK.get(c.head_act, c.head_act)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_state_dict(out, root / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(root / "config.json", json.dumps(meta, indent=2) + "\n")
    pre_cfg = model.preprocess_cfg or {}
    C, H, W = pre_cfg.get("input_size", [c.in_channels, h, w])
    atomic_write_text(root / "preprocessor_config.json", json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": H, "width": W},
        "resample": {"nearest": 0, "bilinear": 2, "bicubic": 3}.get(pre_cfg.get("interpolation", "bilinear"), 2),
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(pre_cfg.get("mean", [0.5] * C)), "image_std": list(pre_cfg.get("std", [0.5] * C)),
    }, indent=2) + "\n")
    return root
