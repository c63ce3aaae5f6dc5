"""SigLIP / SigLIP2 text towers (and the logit scale and bias), read into
:class:`vitkit.model.text.TextTransformer`'s names from transformers ``SiglipModel`` /
``SiglipTextModel`` / ``Siglip2Model`` directories (:data:`HF_TABLE`, both directions).

Layout: CLIP's text encoder without the causal mask, LayerNorm eps 1e-6, tanh-GELU, the *last*
position pooled (the text is padded to the context length), then ``head`` (D -> E, with bias).
``logit_scale`` and ``logit_bias`` are (1,) tensors in transformers, () in vitkit.
SigLIP2's text tower is SigLIP's (its tokenizer is Gemma's: :mod:`vitkit.text.tokenizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import TextConfig
from .clip_text import HF_TEXT_ROWS, TextConverted, read_hf_text, split_pair, text_depth
from .table import RenameTable

HF_TABLE = RenameTable([
    *HF_TEXT_ROWS,
    ("proj.{p}", "head.{p}"),  # under text_model.
    ("logit_scale", "logit_scale"),
    ("logit_bias", "logit_bias"),
], dropped={"embeddings.position_ids": "a buffer of 0..L-1 (older transformers saves)"})


def convert_hf(path: str | Path, hints: dict[str, Any] | None = None) -> TextConverted:
    """The text tower of a transformers SiglipModel / SiglipTextModel / Siglip2Model directory."""
    from .hf_common import hf_act, read_dir

    directory, meta, wfile, raw = read_dir(path)
    tc, state, unexpected, notes = read_hf_text(directory, meta, raw, HF_TABLE, str(wfile))
    scale, bias = split_pair(state)
    V, D = state["token_embed.weight"].shape
    act = (hints or {}).get("text_act") or hf_act(tc.get("hidden_act", "gelu_pytorch_tanh"), str(directory))
    pad = int(tc.get("pad_token_id", 1) or 0)
    eos = int(tc.get("eos_token_id", 1) or 0)
    config = TextConfig(
        vocab_size=V, context_length=state["pos_embed"].shape[1], dim=D, depth=text_depth(state),
        num_heads=int(tc.get("num_attention_heads", 12)), mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
        act=act, norm_eps=float(tc.get("layer_norm_eps", 1e-6)), causal=False, pooling="last",
        embed_dim=state["proj.weight"].shape[0] if "proj.weight" in state else None, proj_bias="proj.bias" in state,
        pad_token_id=pad if pad < V else 0, eos_token_id=eos if eos < V else 0,
    )
    return TextConverted(config=config, state=state, loss="sigmoid", logit_scale=scale, logit_bias=bias,
                         unexpected=unexpected, notes=notes)


def read_siglip2_vision(directory: Path, hints: dict[str, Any] | None = None):
    """The image tower of a transformers ``Siglip2Model`` at its table's own grid, as a
    :class:`~vitkit.interop.common.Converted`. Siglip2 embeds flattened (ph, pw, C) patches with a
    Linear layer and resamples its (n x n) table to each image's grid; at the native grid
    (n * patch pixels square) the resampling is the identity and the model is SigLIP's fixed-grid
    ViT: the Linear becomes the conv kernel (D, C, ph, pw). Other sizes / aspect ratios (NaFlex)
    are not this model."""
    import math

    from ..config import ViTConfig
    from .common import Converted
    from .hf_common import fuse_qkv, hf_act, read_dir, vision_config, vision_tower
    from .siglip import _TEXT_NOTE, PREPROCESS, split_in_proj
    from .siglip import HF_TABLE as VISION_TABLE

    directory, meta, wfile, raw = read_dir(directory)
    vc = vision_config(meta)
    notes: list[str] = []
    vis = vision_tower(raw, ("text_model.", "logit_scale", "logit_bias"), _TEXT_NOTE, notes)
    state, unmatched = VISION_TABLE.to_vitkit(vis, notes)
    state = fuse_qkv(state, str(wfile))
    split_in_proj(state)
    p, C = int(vc.get("patch_size", 16)), int(vc.get("num_channels", 3))
    w = state["patch_embed.proj.weight"]  # (D, ph * pw * C), patches flattened (ph, pw, C)
    D = w.shape[0]
    state["patch_embed.proj.weight"] = w.reshape(D, p, p, C).permute(0, 3, 1, 2).contiguous()
    n = state["pos_embed"].shape[0]
    side = math.isqrt(n)
    state["pos_embed"] = state["pos_embed"].reshape(1, n, D)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    act = (hints or {}).get("act") or hf_act(vc.get("hidden_act", "gelu_pytorch_tanh"), str(directory))
    config = ViTConfig(image_size=side * p, patch_size=p, in_channels=C, num_classes=0, dim=D, depth=depth,
                       num_heads=int(vc.get("num_attention_heads", 12)),
                       mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
                       norm_eps=float(vc.get("layer_norm_eps", 1e-6)), act=act, class_token=False,
                       pos_embed_prefix=False, pooling="map")
    notes.append(f"SigLIP2 image tower at its native grid {side}x{side} ({side * p} px): the fixed-resolution ViT")
    return Converted(config=config, state=state, format="hf", source=str(directory),
                     preprocess={"input_size": [C, side * p, side * p], **PREPROCESS}, unexpected=unmatched,
                     notes=notes, info={"family": "siglip2", "architectures": meta.get("architectures")})


def has_npz_text(path: str | Path) -> bool:
    """Whether a big_vision ``.npz`` holds a text tower (``params/txt/Embed_0/embedding``)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            return "params/txt/Embed_0/embedding" in f.files
    except (OSError, ValueError):
        return False


def convert_npz(path: str | Path, hints: dict[str, Any] | None = None) -> TextConverted:
    """The text tower of a big_vision SigLIP ``.npz`` (``params/txt/``: ``Embed_0/embedding``,
    ``pos_embedding`` (1, L, D), ``Encoder_0/encoderblock[_i]/...`` (stacked with scan or not),
    ``Encoder_0/encoder_norm``, ``head``; ``params/t`` and ``params/b`` the logit scale and bias),
    the names transformers' ``convert_siglip_to_hf.py`` reads. Blocks go through
    :func:`vitkit.interop.jax.read_blocks`, the image tower's reader; flax's GELU is the tanh one."""
    from ..errors import CheckpointError
    from .jax import _t, read_blocks, read_npz

    w = read_npz(path)
    pre = "params/txt/"
    used: set[str] = set()

    def get(name: str):
        if name not in w:
            raise CheckpointError(f"{path}: missing array {name!r}")
        used.add(name)
        return w[name]

    emb = get(pre + "Embed_0/embedding")  # (V, D)
    V, D = emb.shape
    stacked = f"{pre}Encoder_0/encoderblock/LayerNorm_0/scale" in w
    enc = pre + "Encoder_0/"
    if stacked:
        depth = w[f"{enc}encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = len({k[len(enc):].split("/")[0] for k in w if k.startswith(enc + "encoderblock_")})

    def blk(i: int, name: str):
        return get(f"{enc}encoderblock/{name}")[i] if stacked else get(f"{enc}encoderblock_{i}/{name}")

    mha = "MultiHeadDotProductAttention_0"
    s = {"token_embed.weight": _t(emb), "pos_embed": _t(get(pre + "pos_embedding")).reshape(1, -1, D)}
    qkv_bias = f"{enc}encoderblock{'' if stacked else '_0'}/{mha}/query/bias" in w
    heads = read_blocks(s, blk, depth, D, (mha, "LayerNorm_1", "MlpBlock_0"), qkv_bias)
    s["norm.weight"], s["norm.bias"] = _t(get(enc + "encoder_norm/scale")), _t(get(enc + "encoder_norm/bias"))
    if pre + "head/kernel" in w:
        s["proj.weight"], s["proj.bias"] = _t(get(pre + "head/kernel").T), _t(get(pre + "head/bias"))
    scale = _t(get("params/t")).reshape(()) if "params/t" in w else None
    bias = _t(get("params/b")).reshape(()) if "params/b" in w else None
    act = (hints or {}).get("text_act") or "gelu_tanh"
    config = TextConfig(
        vocab_size=V, context_length=s["pos_embed"].shape[1], dim=D, depth=depth, num_heads=int(heads),
        mlp_dim=s["blocks.0.mlp.fc1.weight"].shape[0], act=act, norm_eps=1e-6, qkv_bias=qkv_bias, causal=False,
        pooling="last", embed_dim=s["proj.weight"].shape[0] if "proj.weight" in s else None,
        proj_bias="proj.bias" in s, pad_token_id=min(1, V - 1), eos_token_id=min(1, V - 1),
    )
    text_keys = [k for k in w if k.startswith(pre) or k in ("params/t", "params/b")]
    return TextConverted(config=config, state=s, loss="sigmoid", logit_scale=scale, logit_bias=bias,
                         unexpected=[k for k in text_keys if k not in used],
                         notes=[f"text activation {act} (flax's nn.gelu is the tanh approximation)"])
