"""MAE encoders (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"), from

* Hugging Face ``ViTMAEModel`` / ``ViTMAEForPreTraining`` directories (``model_type: vit_mae``).
  The file names are HF ViT's (``encoder.layer.N.attention.attention.query`` ..., under ``vit.``
  in ViTMAEForPreTraining), so :data:`vitkit.interop.hf_vit.TABLE` renames them. The decoder
  (``decoder.*``: pixel reconstruction for pretraining) is dropped with a load note.
* timm ``vit_*_patch16_224.mae`` / ``vit_huge_patch14_224.mae`` and the facebookresearch/mae
  ``mae_pretrain_vit_*.pth`` files (``{"model": state dict}``): plain timm ViTs (class token,
  ``global_pool="token"``, no fc_norm, ``num_classes=0``), read by :mod:`vitkit.interop.timm`.

The position table is MAE's fixed 2D sin-cos table with a zero class row, stored in the
checkpoint (``embeddings.position_embeddings``, (1, 1 + N, D)); it is loaded as data (a learned
table with its class row), so the numbers are the file's. HF's ViTMAE computes it with the
original repo's h/w swap ([sin w, cos w, sin h, cos h]), which reading it as data makes moot.

What runs: ``ViTMAEModel`` shuffles and drops 75% of the patches on every call (``mask_ratio``).
vitkit runs the encoder on all patches in order, which is HF's output with ``mask_ratio=0`` and
a ``noise`` that sorts to the identity (``noise=torch.arange(N)``): ``forward_features(x)`` =
``last_hidden_state`` (class token first, after the final norm); ``model(x)`` is the class token
after the norm (MAE's pretrained encoders have no head or pooler; fine-tuning recipes put
their own head on, with mean pooling + fc_norm, which vitkit's ``pooling="mean"`` / ``fc_norm``
name).

Size: ``ViTMAEModel`` refuses another image size unless called with
``interpolate_pos_encoding=True`` (bicubic to the new grid, no antialias:
:func:`~vitkit.model.pos_embed.resample_hf`), as HF ViT does: the model here has a fixed size
(``dynamic_img_size=False``) and ``pos_resample="hf"``, so ``image_size=`` / ``set_image_size``
give HF's interpolated numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ViTConfig
from ..errors import CheckpointError, ConfigError
from .common import Converted, family_parts
from .hf_common import ACT_BACK, fuse_qkv, preprocess_from_dir, read_dir, split_qkv, write_dir
from .hf_vit import TABLE, config_from_hf
from .source import Source

_DECODER_NOTE = "the MAE decoder ({n} decoder.* tensors: pixel reconstruction for pretraining) is dropped"


def convert_hf(path: Source | str | Path, arch: ViTConfig | None = None,
               hints: dict[str, Any] | None = None) -> Converted:
    """A transformers ``ViTMAEModel`` / ``ViTMAEForPreTraining`` directory (or its weight file)."""
    directory, meta, wfile, raw = read_dir(path)
    archs = [str(a) for a in meta.get("architectures") or []]
    notes: list[str] = []
    decoder = [k for k in raw if k.startswith("decoder.")]
    if decoder:
        notes.append(_DECODER_NOTE.format(n=len(decoder)))
    enc = {(k[4:] if k.startswith("vit.") else k): v for k, v in raw.items() if not k.startswith("decoder.")}
    state, unmatched = TABLE.to_vitkit(enc, notes)
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{wfile}: no embeddings.patch_embeddings.projection.weight; not a ViTMAE encoder")
    state = fuse_qkv(state, str(wfile))
    config = config_from_hf(meta, has_pooler=False, has_classifier=False, num_labels=0)
    rows, want = state["pos_embed"].shape[1], config.num_patches + 1
    if rows != want:
        raise CheckpointError(f"{directory}: the position table has {rows} rows; config.json's image_size "
                              f"{meta.get('image_size')} / patch_size {meta.get('patch_size')} give {want} "
                              "(a class row + the patch grid)")
    if float(meta.get("mask_ratio", 0.75)) > 0:
        notes.append(f"mask_ratio {meta.get('mask_ratio', 0.75)} not applied: the encoder sees every patch in order "
                     "(HF's output with mask_ratio=0, noise=arange(N))")
    return Converted(config=config.replace(pos_resample="hf"), state=state, format="hf", source=str(directory),
                     preprocess=preprocess_from_dir(directory, config), unexpected=unmatched, notes=notes,
                     info={"family": "mae", "architectures": archs})


def export_hf(model, path: str | Path) -> Path:
    """A transformers ``ViTMAEModel`` directory (the encoder; ``mask_ratio`` 0.0 so HF's forward
    keeps every patch: pass ``noise=torch.arange(N)`` per image to keep them in order too)."""
    c = model.config
    if (not c.norm_first or not c.class_token or not c.pos_embed_prefix or c.pos_embed != "learned"
            or c.num_registers or c.layer_scale is not None or c.fc_norm or c.qk_scale or c.num_classes
            or c.head_hidden_dim or c.pooling != "cls" or c.act not in ACT_BACK or family_parts(c)):
        raise ConfigError("no Hugging Face ViTMAEModel equivalent: it needs a pre-norm ViT with a class token, a "
                          "learned table with a class row, class-token output and no head, registers, layer "
                          f"scale or fc_norm{f' / {family_parts(c)}' if family_parts(c) else ''}")
    D = c.dim
    out, left = TABLE.from_vitkit(split_qkv(dict(model.state_dict()), D, ("query", "key", "value")))
    if left:
        raise ConfigError(f"the HF ViTMAE layout has no names for {left}")
    (h, w), (ph, pw) = c.image_hw, c.patch_hw
    meta: dict[str, Any] = {
        "architectures": ["ViTMAEModel"], "model_type": "vit_mae", "hidden_size": D, "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads, "intermediate_size": c.hidden_dim, "hidden_act": ACT_BACK[c.act],
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "layer_norm_eps": c.norm_eps,
        "image_size": h if h == w else [h, w], "patch_size": ph if ph == pw else [ph, pw],
        "num_channels": c.in_channels, "qkv_bias": c.qkv_bias, "mask_ratio": 0.0,
    }
    pre = model.preprocess_cfg or {}
    C, H, W = pre.get("input_size", [c.in_channels, h, w])
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": H, "width": W},
                 "resample": {"nearest": 0, "bilinear": 2, "bicubic": 3}.get(pre.get("interpolation", "bicubic"), 3),
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(pre.get("mean", [0.5] * C)), "image_std": list(pre.get("std", [0.5] * C))}
    return write_dir(path, out, meta, processor)
