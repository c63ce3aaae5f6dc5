"""Hugging Face transformers ViT directories (``ViTModel`` / ``ViTForImageClassification``):
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

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import CheckpointError, ConfigError
from .common import Converted, dir_config, family_parts, read_json, read_state_dict
from .table import RenameTable

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
            "relu": "relu", "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu", "tanh": "tanh"}

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
_QKV = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


# transformers model_type -> the vitkit module that reads it (one "hf" format, one family per module)
MODEL_TYPES = {"vit": "hf", "deit": "deit", "dinov2": "dinov2", "dinov2_with_registers": "dinov2",
               "clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip",
               "siglip2": "siglip", "siglip2_vision_model": "siglip", "dinov3_vit": "dinov3"}


def model_type(meta: dict[str, Any]) -> str | None:
    mt = meta.get("model_type")
    if mt in MODEL_TYPES:
        return mt
    if any(str(a).startswith("ViT") for a in meta.get("architectures") or []):
        return "vit"
    return None


def is_hf_dir(path: Path) -> bool:
    meta = dir_config(path)
    return meta is not None and model_type(meta) is not None


def looks_like_hf(keys) -> bool:
    return any(".attention.attention.query" in k or ".attention.q_proj" in k or ".self_attn.q_proj" in k
               for k in keys)


def hf_act(name: Any, source: str = "") -> str:
    """vitkit's name for a transformers ``hidden_act``; an unknown one is an error naming it."""
    act = _HF_ACTS.get(str(name))
    if act is None:
        raise CheckpointError(f"{source}: HF hidden_act={name!r} is not an activation vitkit knows "
                              f"(known: {sorted(_HF_ACTS)}); pass act=... to choose one")
    return act


def read_dir(path: str | Path) -> tuple[Path, dict[str, Any], Path, dict[str, torch.Tensor]]:
    """(directory, config.json, weight file, raw tensors) of a transformers checkpoint dir or file."""
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    meta = read_json(directory / "config.json")
    if p.is_dir():
        files = [p / f for f in WEIGHT_FILES if (p / f).is_file()]
        if not files:
            raise CheckpointError(f"{p}: Hugging Face directory without weights (expected one of {WEIGHT_FILES})")
        p = files[0]
    return directory, meta, p, read_state_dict(p)


def vision_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The vision tower's config of a two-tower model (CLIPModel, SiglipModel), else ``meta``."""
    vc = meta.get("vision_config")
    if not isinstance(vc, dict):
        vc = meta.get("vision_config_dict")  # early transformers wrote the sub-config under this key
    return dict(vc) if isinstance(vc, dict) else meta


def vision_tower(raw: dict[str, torch.Tensor], text_prefixes: tuple[str, ...], note: str,
                 notes: list[str]) -> dict[str, torch.Tensor]:
    """The image tower of a two-tower (CLIP / SigLIP) state dict, ``vision_model.`` stripped; the
    text tower's tensors (``text_prefixes``) are counted into one note instead of being loaded."""
    vis: dict[str, torch.Tensor] = {}
    text = 0
    for k, v in raw.items():
        if k.startswith("vision_model."):
            vis[k[len("vision_model."):]] = v
        elif k.startswith(text_prefixes):
            text += 1
        else:
            vis[k] = v
    if text:
        notes.append(f"{note} ({text} tensors)")
    return vis


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[4:] if k.startswith("vit.") else k): v for k, v in state.items()}


def fuse_qkv(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for k, v in state.items():
        m = re.fullmatch(r"(blocks\.\d+\.attn)\.(query|key|value|q|k|v)\.(weight|bias)", k)
        if m:
            parts.setdefault((m.group(1), m.group(3)), {})[_QKV[m.group(2)]] = v
        else:
            out[k] = v
    for (blk, kind), qkv in parts.items():
        if len(qkv) != 3:
            raise CheckpointError(f"{source}: {blk} has only {len(qkv)} of query/key/value {kind}")
        out[f"{blk}.qkv.{kind}"] = torch.cat([qkv[0], qkv[1], qkv[2]], dim=0)
    return out


def labels_from_meta(meta: dict[str, Any], num_labels: int) -> list[str] | None:
    id2label = meta.get("id2label") or {}
    if not num_labels or len(id2label) != num_labels:
        return None
    labels = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(num_labels)]
    if all(re.fullmatch(r"LABEL_\d+", x) for x in labels):
        return None  # transformers' placeholders carry no information
    return labels


def config_from_hf(meta: dict[str, Any], has_pooler: bool, has_classifier: bool, num_labels: int) -> ViTConfig:
    act = hf_act(meta.get("hidden_act", "gelu"))
    pooler_act = _HF_ACTS.get(str(meta.get("pooler_act", "tanh")), "tanh")
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


def preprocess_from_dir(directory: Path, config: ViTConfig, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preprocessing from ``preprocessor_config.json`` over the family's processor ``defaults``
    (ViTImageProcessor's when none: resize to the size, bilinear, mean = std = 0.5)."""
    pp = directory / "preprocessor_config.json"
    C, (H, W) = config.in_channels, config.image_hw
    out = {"input_size": [C, H, W], "mean": [0.5] * C, "std": [0.5] * C, "interpolation": "bilinear",
           "crop_pct": 1.0}
    out.update(defaults or {})
    if pp.is_file():
        p = read_json(pp)
        if p.get("image_mean") is not None:
            out["mean"] = list(p["image_mean"])
        if p.get("image_std") is not None:
            out["std"] = list(p["image_std"])
        size = p.get("crop_size") if p.get("do_center_crop") and p.get("crop_size") else p.get("size")
        if isinstance(size, dict) and "height" in size:
            out["input_size"] = [C, int(size["height"]), int(size["width"])]
        elif isinstance(size, dict) and "shortest_edge" in size:
            out["input_size"] = [C, int(size["shortest_edge"]), int(size["shortest_edge"])]
        elif isinstance(size, int):
            out["input_size"] = [C, size, size]
        if "resample" in p:
            out["interpolation"] = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(p["resample"], "bilinear")
    return out


def convert(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """Read a transformers checkpoint: ViT here; DeiT, Dinov2, DINOv3, CLIP, SigLIP in their family modules."""
    from importlib import import_module

    p = Path(path)
    directory = p if p.is_dir() else p.parent
    meta = read_json(directory / "config.json")
    mt = model_type(meta)
    if mt is None:
        raise CheckpointError(f"{directory}: config.json model_type={meta.get('model_type')!r} is not one vitkit "
                              f"reads (known: {list(MODEL_TYPES)})")
    if MODEL_TYPES[mt] != "hf":
        return import_module(f"vitkit.interop.{MODEL_TYPES[mt]}").convert_hf(path, arch, hints)
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


# --------------------------------------------------------------------------- export
_ACT_BACK = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "quick_gelu": "quick_gelu",
             "silu": "silu", "tanh": "tanh"}


def write_dir(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
              processor: dict[str, Any] | None = None) -> Path:
    """A transformers directory: model.safetensors + config.json (+ preprocessor_config.json)."""
    import json

    from ..io import atomic_write_text, save_state_dict

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_state_dict({k: v.contiguous() for k, v in tensors.items()}, root / "model.safetensors",
                    metadata={"format": "pt"})
    atomic_write_text(root / "config.json", json.dumps(meta, indent=2) + "\n")
    if processor is not None:
        atomic_write_text(root / "preprocessor_config.json", json.dumps(processor, indent=2) + "\n")
    return root


def act_back(act: str) -> str:
    if act not in _ACT_BACK:
        raise ConfigError(f"activation {act!r} has no transformers name")
    return _ACT_BACK[act]


def split_qkv(tensors: dict[str, torch.Tensor], dim: int, names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: ``blocks.N.attn.qkv.*`` -> ``blocks.N.attn.<q|k|v name>.*``."""
    out = {}
    for k, v in tensors.items():
        m = re.fullmatch(r"(blocks\.\d+\.attn)\.qkv\.(weight|bias)", k)
        if m:
            for name, part in zip(names, v.split(dim, dim=0)):
                out[f"{m.group(1)}.{name}.{m.group(2)}"] = part
        else:
            out[k] = v
    return out


def export(model, path: str | Path) -> Path:
    """Write a transformers directory for the model's family: ``DeiTForImageClassificationWithTeacher``
    / ``DeiTModel`` (distillation token), ``SiglipVisionModel`` (attention pooling),
    ``CLIPVisionModel[WithProjection]`` (ln_pre), ``Dinov2[WithRegisters]Model`` (layer scale or
    registers), else ViT (below)."""
    from importlib import import_module

    c = model.config
    family = ("deit" if c.dist_token else "siglip" if c.pooling == "map" else "clip" if c.norm_pre
              else "dinov2" if (c.layer_scale is not None or c.num_registers or c.mlp_layer == "swiglu") else None)
    if family is not None:
        return import_module(f"vitkit.interop.{family}").export_hf(model, path)
    return export_vit(model, path)


def export_vit(model, path: str | Path) -> Path:
    """Write a transformers ViT directory (legacy file key names, as ``save_pretrained`` does):
    ``ViTForImageClassification`` when the model has a head, ``ViTModel`` (with its pooler when
    the model has a pre-logits layer) otherwise."""
    import json

    from ..io import atomic_write_text, save_state_dict

    c = model.config
    if (not c.norm_first or c.pooling != "cls" or c.num_registers or c.pos_embed != "learned"
            or not c.pos_embed_prefix or c.layer_scale is not None or c.fc_norm or c.qk_scale
            or c.act not in _ACT_BACK or family_parts(c)):
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
        "intermediate_size": c.hidden_dim, "hidden_act": _ACT_BACK[c.act], "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": c.norm_eps,
        "image_size": h if h == w else [h, w], "patch_size": ph if ph == pw else [ph, pw],
        "num_channels": c.in_channels, "qkv_bias": c.qkv_bias, "encoder_stride": ph,
        "pooler_output_size": c.head_hidden_dim or D, "pooler_act": "tanh" if not c.head_hidden_dim
        else {v: k for k, v in _ACT_BACK.items()}.get(c.head_act, c.head_act),
        "id2label": {str(i): str(n) for i, n in enumerate(labels)},
        "label2id": {str(n): i for i, n in enumerate(labels)},
    }
    if c.head_hidden_dim:
        meta["pooler_act"] = _ACT_BACK.get(c.head_act, c.head_act)
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
