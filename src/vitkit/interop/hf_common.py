"""What every Hugging Face transformers reader and writer shares: the directory's files (config.json,
weights, preprocessor_config.json) read through one :class:`~vitkit.interop.source.Source`, the
activation names both ways, q/k/v fused and split, labels from ``id2label``, and writing a
transformers directory. The format itself (which family module reads which ``model_type``) is
:mod:`vitkit.interop.hf`; the plain ViT is :mod:`vitkit.interop.hf_vit`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ACTIVATION_NAMES, ViTConfig
from ..errors import CheckpointError, ConfigError
from .source import Source

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# transformers hidden_act -> vitkit, from the one activation table
HF_ACTS = {hf: act for act, names in ACTIVATION_NAMES.items() for hf in names.hf}


_QKV = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


def hf_act(name: Any, source: str = "") -> str:
    """vitkit's name for a transformers ``hidden_act``; an unknown one is an error naming it."""
    act = HF_ACTS.get(str(name))
    if act is None:
        raise CheckpointError(f"{source}: HF hidden_act={name!r} is not an activation vitkit knows "
                              f"(known: {sorted(HF_ACTS)}); pass act=... to choose one")
    return act


def read_dir(path: Source | str | Path) -> tuple[Path, dict[str, Any], Path, dict[str, torch.Tensor]]:
    """(directory, config.json, weight file, raw tensors) of a transformers checkpoint dir or file,
    each read once through the :class:`Source` (detection and the family reader share them)."""
    src = Source.of(path)
    p, directory = src.path, src.directory
    meta = src.json(directory / "config.json")
    if p.is_dir():
        files = [p / f for f in WEIGHT_FILES if (p / f).is_file()]
        if not files:
            raise CheckpointError(f"{p}: Hugging Face directory without weights (expected one of {WEIGHT_FILES})")
        p = files[0]
    return directory, meta, p, src.tensors(p)


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


def preprocess_from_dir(directory: Path, config: ViTConfig, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preprocessing from ``preprocessor_config.json`` over the family's processor ``defaults``
    (ViTImageProcessor's when none: resize to the size, bilinear, mean = std = 0.5)."""
    pp = directory / "preprocessor_config.json"
    C, (H, W) = config.in_channels, config.image_hw
    out = {"input_size": [C, H, W], "mean": [0.5] * C, "std": [0.5] * C, "interpolation": "bilinear",
           "crop_pct": 1.0}
    out.update(defaults or {})
    if pp.is_file():
        p = Source(directory).json(pp)
        if p.get("image_mean") is not None:
            out["mean"] = list(p["image_mean"])
        if p.get("image_std") is not None:
            out["std"] = list(p["image_std"])
        crop = p.get("crop_size") if p.get("do_center_crop") and p.get("crop_size") else None
        size = crop or p.get("size")
        resize = p.get("size")
        if isinstance(crop, dict) and "height" in crop and isinstance(resize, dict) and "shortest_edge" in resize:
            # BitImageProcessor / CLIPImageProcessor: short side to shortest_edge, then the centre crop
            out["crop_pct"] = min(1.0, int(crop["height"]) / int(resize["shortest_edge"]))
            out["crop_mode"] = "center"
        if isinstance(size, dict) and "height" in size:
            out["input_size"] = [C, int(size["height"]), int(size["width"])]
        elif isinstance(size, dict) and "shortest_edge" in size:
            out["input_size"] = [C, int(size["shortest_edge"]), int(size["shortest_edge"])]
        elif isinstance(size, int):
            out["input_size"] = [C, size, size]
        if "resample" in p:
            out["interpolation"] = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(p["resample"], "bilinear")
    return out


# vitkit -> the hidden_act export writes
ACT_BACK = {act: names.hf[0] for act, names in ACTIVATION_NAMES.items() if names.hf}


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
    if act not in ACT_BACK:
        raise ConfigError(f"activation {act!r} has no transformers name")
    return ACT_BACK[act]


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
