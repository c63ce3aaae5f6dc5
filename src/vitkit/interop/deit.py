"""DeiT and DeiT-III (Touvron et al. 2021, 2022), from

* timm ``deit_*`` (``VisionTransformer``; the distilled ones ``VisionTransformerDistilled`` with
  ``dist_token`` and ``head_dist``; DeiT-III with layer scale and a table without prefix rows):
  read by :mod:`vitkit.interop.timm` (vitkit's names are timm's).
* Hugging Face ``DeiTModel``, ``DeiTForImageClassification`` and
  ``DeiTForImageClassificationWithTeacher`` directories (``model_type: deit``). Every HF DeiT
  has the distillation token in its sequence ([class, distillation, patches], one table row
  each); the non-distilled DeiTs on the hub (``facebook/deit-base-patch16-224``) are ``vit``
  dirs and load as ViT. Resampling: :func:`~vitkit.model.pos_embed.resample_hf`.

What ``model(x)`` returns: ``DeiTForImageClassificationWithTeacher`` and timm's distilled models:
the average of the two heads, ``(head(cls) + head_dist(dist)) / 2`` (as both at inference).
``DeiTModel``: the average of the class and distillation tokens after the final norm (timm's
distilled ``pre_logits``); HF's ``pooler_output`` (``tanh(dense(cls))``, a layer the published
distilled checkpoints never trained: it is newly initialised when a DeiTModel is made from them)
is not reproduced, and its weights are ignored with a note. ``forward_features`` equals HF's
``last_hidden_state``. ``DeiTForImageClassification`` (one classifier on the class token while
the distillation token rides along) has no vitkit equivalent and is refused with that reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ViTConfig
from ..errors import CheckpointError, ConfigError
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from .common import Converted, guess_heads, layout_from_rows, size_hints
from .table import RenameTable

# DeiTImageProcessor (facebook/deit-*): resize 256 bicubic, centre crop 224, ImageNet statistics
PREPROCESS = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bicubic", "crop_pct": 0.875,
              "crop_mode": "center"}

# legacy (file) names first, then the transformers 5.x in-memory names
HF_TABLE = RenameTable([
    ("cls_token", "embeddings.cls_token"), ("dist_token", "embeddings.distillation_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layer.{i}.layernorm_before.{p}"),
    ("blocks.{i}.attn.query.{p}", "encoder.layer.{i}.attention.attention.query.{p}"),
    ("blocks.{i}.attn.key.{p}", "encoder.layer.{i}.attention.attention.key.{p}"),
    ("blocks.{i}.attn.value.{p}", "encoder.layer.{i}.attention.attention.value.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layer.{i}.layernorm_after.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("norm.{p}", "layernorm.{p}"),
    ("pre_logits.fc.{p}", "pooler.dense.{p}"),
    ("head.{p}", "cls_classifier.{p}"),
    ("head_dist.{p}", "distillation_classifier.{p}"),
    ("head.{p}", "classifier.{p}"),
    ("blocks.{i}.norm1.{p}", "layers.{i}.layernorm_before.{p}"),
    ("blocks.{i}.attn.q.{p}", "layers.{i}.attention.q_proj.{p}"),
    ("blocks.{i}.attn.k.{p}", "layers.{i}.attention.k_proj.{p}"),
    ("blocks.{i}.attn.v.{p}", "layers.{i}.attention.v_proj.{p}"),
    ("blocks.{i}.attn.proj.{p}", "layers.{i}.attention.o_proj.{p}"),
    ("blocks.{i}.norm2.{p}", "layers.{i}.layernorm_after.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "layers.{i}.mlp.fc2.{p}"),
])


def convert_hf(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    """A transformers DeiT directory (any of its three classes)."""
    import re

    from .hf_common import fuse_qkv, hf_act, labels_from_meta, preprocess_from_dir, read_dir

    directory, meta, wfile, raw = read_dir(path)
    archs = [str(a) for a in meta.get("architectures") or []]
    if "DeiTForImageClassification" in archs:
        raise CheckpointError(f"{directory}: DeiTForImageClassification classifies the class token alone while a "
                              "distillation token rides along; vitkit's distilled ViT averages two heads "
                              "(DeiTForImageClassificationWithTeacher, timm) and has no such layout")
    raw = {(k[len("deit."):] if k.startswith("deit.") else k): v for k, v in raw.items()}
    notes: list[str] = []
    state, unmatched = HF_TABLE.to_vitkit(raw, notes)
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{wfile}: no embeddings.patch_embeddings.projection.weight; not a DeiT")
    state = fuse_qkv(state, str(wfile))
    classifier = "head.weight" in state
    if "pre_logits.fc.weight" in state:
        state.pop("pre_logits.fc.weight")
        state.pop("pre_logits.fc.bias", None)
        notes.append("pooler weights ignored: the DeiT classifiers do not use them" if classifier else
                     "pooler (tanh(dense(cls))) ignored: model(x) is the average of the class and distillation "
                     "tokens after the final norm, as timm's distilled pre-logits")
    dim, in_ch, ph, pw = state["patch_embed.proj.weight"].shape
    hints = dict(hints or {})
    dist = "dist_token" in state
    image, _ = layout_from_rows(state["pos_embed"].shape[1], 1 + int(dist), (ph, pw),
                                *size_hints(hints, arch, meta.get("image_size")), prefix_rows=True)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    num_classes = state["head.weight"].shape[0] if classifier else 0
    config = ViTConfig(
        image_size=image if image[0] != image[1] else image[0], patch_size=(ph, pw), in_channels=in_ch,
        num_classes=num_classes, dim=dim, depth=depth,
        num_heads=guess_heads(dim, meta.get("num_attention_heads") or hints.get("num_heads"), str(directory)),
        mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0], qkv_bias=bool(meta.get("qkv_bias", True)),
        norm_eps=float(meta.get("layer_norm_eps", 1e-12)), act=hints.get("act") or hf_act(meta.get("hidden_act", "gelu")),
        **({"dist_token": True} if dist else {}),
    )
    pre = preprocess_from_dir(directory, config, {"input_size": [in_ch, 224, 224], **PREPROCESS}
                              if config.image_hw == (224, 224) else {"input_size": [in_ch, *config.image_hw],
                                                                     **PREPROCESS, "crop_pct": 1.0})
    return Converted(config=config.replace(pos_resample="hf"), state=state, format="hf", source=str(directory), preprocess=pre,
                     labels=labels_from_meta(meta, num_classes), unexpected=unmatched, notes=notes,
                     info={"family": "deit", "architectures": archs})


def export_hf(model, path: str | Path) -> Path:
    """A transformers ``DeiTForImageClassificationWithTeacher`` (``DeiTModel`` without heads)
    directory through :data:`HF_TABLE` (file names). Non-distilled DeiTs export as HF ViT."""
    from .common import family_parts
    from .hf_common import act_back, split_qkv, write_dir

    c = model.config
    bad = family_parts(c, allowed=("dist_token",))
    if (bad or not c.dist_token or c.num_registers or c.layer_scale is not None or c.fc_norm or c.head_hidden_dim
            or not c.pos_embed_prefix or c.pos_embed != "learned" or not c.norm_first):
        raise ConfigError("no Hugging Face DeiT equivalent: it needs the distillation token, a learned table with "
                          "rows for both prefix tokens, and no registers / layer scale / fc_norm / pre-logits"
                          f"{f' / {bad}' if bad else ''}")
    D = c.dim
    sd = split_qkv(dict(model.state_dict()), D, ("query", "key", "value"))
    out, left = HF_TABLE.from_vitkit(sd)
    if left:
        raise ConfigError(f"the HF DeiT layout has no names for {left}")
    heads = c.num_classes > 0
    if heads:
        out = {(k if k.startswith(("cls_classifier", "distillation_classifier")) else f"deit.{k}"): v
               for k, v in out.items()}
    labels = model.labels or [f"LABEL_{i}" for i in range(max(c.num_classes, 2))]
    h, w = c.image_hw
    meta = {
        "architectures": ["DeiTForImageClassificationWithTeacher" if heads else "DeiTModel"], "model_type": "deit",
        "hidden_size": D, "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads,
        "intermediate_size": c.hidden_dim, "hidden_act": act_back(c.act), "layer_norm_eps": c.norm_eps,
        "image_size": h if h == w else [h, w], "patch_size": c.patch_hw[0] if c.patch_hw[0] == c.patch_hw[1]
        else list(c.patch_hw), "num_channels": c.in_channels, "qkv_bias": c.qkv_bias,
        "encoder_stride": c.patch_hw[0], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "id2label": {str(i): str(n) for i, n in enumerate(labels)}, "label2id": {str(n): i for i, n in enumerate(labels)},
    }
    return write_dir(path, out, meta)
