"""Original Google JAX/Flax checkpoints as ``.npz``, in two layouts.

vision_transformer (google-research/vision_transformer, the paper's checkpoints)::

    embedding/kernel (ph, pw, C, D)        cls (1, 1, D)
    Transformer/posembed_input/pos_embedding (1, 1+N, D)   (class row included)
    Transformer/encoderblock_N/LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value}/kernel
        (D, heads, head_dim), out/kernel (heads, head_dim, D), LayerNorm_2, MlpBlock_3/Dense_{0,1}
    Transformer/encoder_norm, pre_logits/{kernel,bias} (D, D'), head/{kernel,bias} (D', K)

big_vision: the same under a ``params/`` prefix, but ``pos_embedding`` at the top level (patch rows
only: the class token gets no position), ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``,
``MlpBlock_0``, and with ``scan`` a single ``Transformer/encoderblock`` whose tensors have a
leading depth axis. ``pool_type='gap'`` checkpoints have no ``cls`` (mean pooling after the norm).

Unlike the PyTorch ports, the number of heads *is* in the file (the query kernel's middle axis).
Trap recorded: flax's ``nn.gelu`` is the tanh approximation, so JAX checkpoints load with
``act="gelu_tanh"`` (faithful to the original network); timm and HF ports use the exact GELU,
which changes logits by ~1e-3. Pass ``act="gelu"`` to match those ports instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ViTConfig
from ..errors import CheckpointError, ConfigError
from ..io import check_extension
from .common import Converted, family_parts, grid_from_rows, size_hints
from .source import Format, Source


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:  # never unpickle object arrays
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} as a NumPy .npz of arrays: {e}") from e


def looks_like_jax(keys) -> bool:
    return any(k.endswith("embedding/kernel") for k in keys)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def read_blocks(s: dict[str, torch.Tensor], blk, depth: int, D: int, names: tuple[str, str, str],
                qkv_bias: bool) -> int:
    """Encoder blocks ``blk(i, name) -> array`` into vitkit's ``blocks.{i}.*`` of ``s`` (q/k/v
    kernels (D, heads, hd) fused, kernels (in, out) transposed); returns the number of heads.
    ``names``: the attention / second norm / MLP module names of the layout. Shared by the image
    tower here and big_vision's text tower (:mod:`vitkit.interop.siglip_text`)."""
    mha, ln2, mlpb = names
    heads = 1
    for i in range(depth):
        b = f"blocks.{i}."
        s[b + "norm1.weight"], s[b + "norm1.bias"] = _t(blk(i, "LayerNorm_0/scale")), _t(blk(i, "LayerNorm_0/bias"))
        s[b + "norm2.weight"], s[b + "norm2.bias"] = _t(blk(i, f"{ln2}/scale")), _t(blk(i, f"{ln2}/bias"))
        qkv = [blk(i, f"{mha}/{n}/kernel") for n in ("query", "key", "value")]  # (D, heads, hd)
        heads = qkv[0].shape[1]
        s[b + "attn.qkv.weight"] = _t(np.concatenate([k.reshape(D, -1).T for k in qkv], axis=0))
        if qkv_bias:
            s[b + "attn.qkv.bias"] = _t(np.concatenate([blk(i, f"{mha}/{n}/bias").reshape(-1)
                                                          for n in ("query", "key", "value")]))
        s[b + "attn.proj.weight"] = _t(blk(i, f"{mha}/out/kernel").reshape(-1, D).T)
        s[b + "attn.proj.bias"] = _t(blk(i, f"{mha}/out/bias"))
        for r, name in ((0, "fc1"), (1, "fc2")):
            s[f"{b}mlp.{name}.weight"] = _t(blk(i, f"{mlpb}/Dense_{r}/kernel").T)
            s[f"{b}mlp.{name}.bias"] = _t(blk(i, f"{mlpb}/Dense_{r}/bias"))
    return heads


def _layout_names(big_vision: bool) -> tuple[str, str, str]:
    """The attention / second norm / MLP module names of a block in the layout."""
    if big_vision:
        return "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"
    return "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"


def _find_prefix(w: dict[str, np.ndarray], p: Path) -> str:
    """The key prefix of the image tower: none (vision_transformer), ``params/`` (big_vision) or
    ``params/img/`` (two-tower SigLIP)."""
    prefix = "params/" if "params/embedding/kernel" in w else ("params/img/" if "params/img/embedding/kernel" in w
                                                              else "")
    if f"{prefix}embedding/kernel" not in w:
        raise CheckpointError(f"{p}: no embedding/kernel; not a ViT .npz")
    return prefix


def _block_depth(w: dict[str, np.ndarray], prefix: str, stacked: bool) -> int:
    if stacked:
        return w[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    return len({k.split("/")[1 + prefix.count("/")] for k in w if k.startswith(f"{prefix}Transformer/encoderblock_")})


def _read_map_head(s: dict[str, torch.Tensor], get, D: int) -> None:
    """SigLIP's attention-pooling head (big_vision MAPHead) into ``attn_pool.*`` of ``s``, as timm's
    _load_weights reads it."""
    from .siglip import NPZ_MAP_HEAD as M

    mha = M["attn_pool.mha"]
    s["attn_pool.latent"] = _t(get(M["attn_pool.latent"])).reshape(1, -1, D)
    q = get(f"{mha}/query/kernel")
    s["attn_pool.q.weight"] = _t(q.reshape(D, -1).T)
    s["attn_pool.q.bias"] = _t(get(f"{mha}/query/bias").reshape(-1))
    s["attn_pool.kv.weight"] = _t(np.concatenate([get(f"{mha}/{n}/kernel").reshape(D, -1).T
                                                  for n in ("key", "value")], axis=0))
    s["attn_pool.kv.bias"] = _t(np.concatenate([get(f"{mha}/{n}/bias").reshape(-1) for n in ("key", "value")]))
    s["attn_pool.proj.weight"] = _t(get(f"{mha}/out/kernel").reshape(-1, D).T)
    s["attn_pool.proj.bias"] = _t(get(f"{mha}/out/bias"))
    s["attn_pool.norm.weight"] = _t(get(f"{M['attn_pool.norm']}/scale"))
    s["attn_pool.norm.bias"] = _t(get(f"{M['attn_pool.norm']}/bias"))
    for name in ("fc1", "fc2"):
        src = M[f"attn_pool.mlp.{name}"]
        s[f"attn_pool.mlp.{name}.weight"] = _t(get(f"{src}/kernel").T)
        s[f"attn_pool.mlp.{name}.bias"] = _t(get(f"{src}/bias"))


def _read_head(s: dict[str, torch.Tensor], w: dict[str, np.ndarray], prefix: str, get) -> tuple[int | None, int]:
    """Pre-logits and classifier (zero-init heads of upstream-only checkpoints load as they are);
    returns (pre-logits width or None, number of classes)."""
    head_hidden = None
    if f"{prefix}pre_logits/kernel" in w:
        s["pre_logits.fc.weight"], s["pre_logits.fc.bias"] = _t(get("pre_logits/kernel").T), _t(get("pre_logits/bias"))
        head_hidden = s["pre_logits.fc.weight"].shape[0]
    num_classes = 0
    if f"{prefix}head/kernel" in w:
        s["head.weight"], s["head.bias"] = _t(get("head/kernel").T), _t(get("head/bias"))
        num_classes = s["head.weight"].shape[0]
    return head_hidden, num_classes


def _text_tower_notes(w: dict[str, np.ndarray], used: set[str]) -> tuple[list[str], list[str]]:
    """(notes, unexpected keys): a two-tower SigLIP .npz's text tower and logit scale / bias are
    vitkit.load_image_text's, so they are noted rather than reported as unexpected."""
    text = [k for k in w if k not in used and (k.startswith("params/txt/") or k in ("params/t", "params/b"))]
    notes = [f"text tower (and logit scale / bias) not part of the image model: vitkit.load_image_text loads both "
             f"towers ({len(text)} arrays)"] if text else []
    return notes, [k for k in w if k not in used and k not in text]


def convert(path: str | Path, arch: ViTConfig | None = None, hints: dict[str, Any] | None = None) -> Converted:
    p = Path(path)
    w = read_npz(p)
    prefix = _find_prefix(w, p)
    big_vision = prefix.startswith("params/") or f"{prefix}pos_embedding" in w
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w
    mha, ln2, mlpb = _layout_names(big_vision)
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        key = prefix + name
        if key not in w:
            raise CheckpointError(f"{p}: missing array {key!r}")
        used.add(key)
        return w[key]

    kernel = get("embedding/kernel")  # (ph, pw, C, D)
    ph, pw, C, D = kernel.shape
    s: dict[str, torch.Tensor] = {"patch_embed.proj.weight": _t(kernel.transpose(3, 2, 0, 1)),
                                  "patch_embed.proj.bias": _t(get("embedding/bias"))}
    has_cls = f"{prefix}cls" in w
    if has_cls:
        s["cls_token"] = _t(get("cls")).reshape(1, 1, D)
    pos = get("pos_embedding") if f"{prefix}pos_embedding" in w else get("Transformer/posembed_input/pos_embedding")
    pos = pos.reshape(1, -1, D)
    s["pos_embed"] = _t(pos)
    depth = _block_depth(w, prefix, stacked)

    def blk(i: int, name: str) -> np.ndarray:
        return get(f"Transformer/encoderblock/{name}")[i] if stacked else get(f"Transformer/encoderblock_{i}/{name}")

    qkv_bias = f"{prefix}Transformer/encoderblock{'' if stacked else '_0'}/{mha}/query/bias" in w
    heads = read_blocks(s, blk, depth, D, (mha, ln2, mlpb), qkv_bias)
    s["norm.weight"], s["norm.bias"] = _t(get("Transformer/encoder_norm/scale")), _t(get("Transformer/encoder_norm/bias"))
    has_map = f"{prefix}MAPHead_0/probe" in w
    if has_map:
        _read_map_head(s, get, D)
    head_hidden, num_classes = _read_head(s, w, prefix, get)
    pos_prefix = has_cls and not big_vision
    image = grid_from_rows(pos.shape[1] - int(pos_prefix), (ph, pw), *size_hints(hints, arch))
    extra: dict[str, Any] = {"pooling": "map"} if has_map else {"pooling": "cls" if has_cls else "mean"}
    config = ViTConfig(
        image_size=image if image[0] != image[1] else image[0], patch_size=(ph, pw), in_channels=C,
        num_classes=num_classes, dim=D, depth=depth, num_heads=int(heads or 1),
        mlp_dim=s["blocks.0.mlp.fc1.weight"].shape[0], qkv_bias=qkv_bias, norm_eps=1e-6, act="gelu_tanh",
        pos_embed_prefix=pos_prefix, class_token=has_cls, head_hidden_dim=head_hidden, head_act="tanh", **extra,
    )
    H, W = config.image_hw
    pre = {"input_size": [C, H, W], "mean": [0.5] * C, "std": [0.5] * C, "interpolation": "bilinear",
           "crop_pct": 1.0}
    notes, unexpected = _text_tower_notes(w, used)
    layout = "big_vision" if big_vision else "vision_transformer"
    return Converted(config=config.replace(pos_resample="big_vision" if big_vision else "vit_jax"), state=s,
                     format="jax", source=str(p), preprocess=pre, unexpected=unexpected, notes=notes,
                     info={"layout": layout, "stacked": stacked, **({"family": "siglip"} if has_map else {})})


def _check_jax_equivalent(c) -> None:
    """The JAX layouts hold a pre-norm ViT with a learned position table, LayerNorm, a GELU MLP and
    class-token (or, without a class token, mean or MAP) pooling; anything else has no equivalent there."""
    parts = family_parts(c, allowed=("map",))
    if parts:
        raise ConfigError(f"this config has no JAX vision_transformer / big_vision equivalent: the .npz layouts "
                          f"have no place for {parts}")
    if (not c.norm_first or c.pos_embed != "learned" or c.num_registers or c.layer_scale is not None
            or c.fc_norm or c.qk_scale or c.act not in ("gelu", "gelu_tanh")
            or (c.pooling == "cls") != c.class_token):
        raise ConfigError("this config has no JAX vision_transformer / big_vision equivalent (those are pre-norm "
                          "with a learned position table, GELU, class-token pooling (mean or MAP without a class "
                          "token), no registers / layer scale / fc_norm); this model has "
                          f"pos_embed={c.pos_embed!r}, pooling={c.pooling!r}, act={c.act!r}")


def _export_block(sd: dict[str, np.ndarray], i: int, D: int, H: int, names: tuple[str, str, str]
                  ) -> dict[str, np.ndarray]:
    """Block ``i`` of vitkit's state dict as the layout's arrays, named relative to the block."""
    mha, ln2, mlpb = names
    hd = D // H
    b = f"blocks.{i}."
    q, k, v = np.split(sd[b + "attn.qkv.weight"], 3, axis=0)
    e = {"LayerNorm_0/scale": sd[b + "norm1.weight"], "LayerNorm_0/bias": sd[b + "norm1.bias"],
         f"{ln2}/scale": sd[b + "norm2.weight"], f"{ln2}/bias": sd[b + "norm2.bias"],
         f"{mha}/out/kernel": sd[b + "attn.proj.weight"].T.reshape(H, hd, D), f"{mha}/out/bias": sd[b + "attn.proj.bias"],
         f"{mlpb}/Dense_0/kernel": sd[b + "mlp.fc1.weight"].T, f"{mlpb}/Dense_0/bias": sd[b + "mlp.fc1.bias"],
         f"{mlpb}/Dense_1/kernel": sd[b + "mlp.fc2.weight"].T, f"{mlpb}/Dense_1/bias": sd[b + "mlp.fc2.bias"]}
    for n, m in zip(("query", "key", "value"), (q, k, v)):
        e[f"{mha}/{n}/kernel"] = m.T.reshape(D, H, hd)
    if b + "attn.qkv.bias" in sd:
        for n, m in zip(("query", "key", "value"), np.split(sd[b + "attn.qkv.bias"], 3)):
            e[f"{mha}/{n}/bias"] = m.reshape(H, hd)
    return e


def _export_map_head(sd: dict[str, np.ndarray], out: dict[str, np.ndarray], pre: str, D: int, H: int) -> None:
    """vitkit's ``attn_pool.*`` as big_vision's MAPHead arrays into ``out``."""
    from .siglip import NPZ_MAP_HEAD as M

    hd = D // H
    mha = f"{pre}{M['attn_pool.mha']}"
    out[f"{pre}{M['attn_pool.latent']}"] = sd["attn_pool.latent"]
    kw, vw = np.split(sd["attn_pool.kv.weight"], 2, axis=0)
    kb, vb = np.split(sd["attn_pool.kv.bias"], 2)
    for n, wt, bs in (("query", sd["attn_pool.q.weight"], sd["attn_pool.q.bias"]), ("key", kw, kb), ("value", vw, vb)):
        out[f"{mha}/{n}/kernel"], out[f"{mha}/{n}/bias"] = wt.T.reshape(D, H, hd), bs.reshape(H, hd)
    out[f"{mha}/out/kernel"], out[f"{mha}/out/bias"] = sd["attn_pool.proj.weight"].T.reshape(H, hd, D), sd["attn_pool.proj.bias"]
    out[f"{pre}{M['attn_pool.norm']}/scale"] = sd["attn_pool.norm.weight"]
    out[f"{pre}{M['attn_pool.norm']}/bias"] = sd["attn_pool.norm.bias"]
    for name in ("fc1", "fc2"):
        out[f"{pre}{M[f'attn_pool.mlp.{name}']}/kernel"] = sd[f"attn_pool.mlp.{name}.weight"].T
        out[f"{pre}{M[f'attn_pool.mlp.{name}']}/bias"] = sd[f"attn_pool.mlp.{name}.bias"]


def _check_layout(c, layout: str) -> bool:
    """Whether ``layout`` is a big_vision one; raises when the config's class row cannot be written there."""
    if layout not in ("vision_transformer", "big_vision", "big_vision_img"):
        raise CheckpointError(f"layout must be vision_transformer, big_vision or big_vision_img, got {layout!r}")
    bv = layout.startswith("big_vision")
    if bv and c.class_token and c.pos_embed_prefix:
        raise CheckpointError("big_vision layout has no position row for the class token (use pos_embed_prefix=False)")
    if not bv and c.class_token and not c.pos_embed_prefix:
        raise CheckpointError("vision_transformer layout needs a class row in the position table")
    return bv


def export_npz(model, path: str | Path, layout: str = "vision_transformer") -> Path:
    """Write the model's weights as a JAX ``.npz`` in ``layout`` ("vision_transformer" or
    "big_vision", stacked blocks). Used by the tests to check both loaders exactly."""
    c = model.config
    _check_jax_equivalent(c)
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    D, H = c.dim, c.num_heads
    bv = _check_layout(c, layout)
    pre = {"big_vision": "params/", "big_vision_img": "params/img/"}.get(layout, "")  # img/: two-tower SigLIP
    out: dict[str, np.ndarray] = {f"{pre}embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                                  f"{pre}embedding/bias": sd["patch_embed.proj.bias"]}
    if c.class_token:
        out[f"{pre}cls"] = sd["cls_token"]
    out[f"{pre}pos_embedding" if bv else "Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    blocks = [_export_block(sd, i, D, H, _layout_names(bv)) for i in range(c.depth)]
    if bv:
        for name in blocks[0]:
            out[f"{pre}Transformer/encoderblock/{name}"] = np.stack([e[name] for e in blocks])
    else:
        for i, e in enumerate(blocks):
            for name, a in e.items():
                out[f"Transformer/encoderblock_{i}/{name}"] = a
    out[f"{pre}Transformer/encoder_norm/scale"] = sd["norm.weight"]
    out[f"{pre}Transformer/encoder_norm/bias"] = sd["norm.bias"]
    if "attn_pool.latent" in sd:
        _export_map_head(sd, out, pre, D, H)
    if "pre_logits.fc.weight" in sd:
        out[f"{pre}pre_logits/kernel"], out[f"{pre}pre_logits/bias"] = sd["pre_logits.fc.weight"].T, sd["pre_logits.fc.bias"]
    if "head.weight" in sd:
        out[f"{pre}head/kernel"], out[f"{pre}head/bias"] = sd["head.weight"].T, sd["head.bias"]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, **out)
    return p


def is_npz(src: Source) -> bool:
    """A NumPy archive by content; an extension that says otherwise is an error naming both."""
    return check_extension(src.path) == "numpy" or src.path.suffix == ".npz"


FORMAT = Format("jax", "Google .npz: vision_transformer, big_vision (ViT, SigLIP)", aliases=("npz", "big_vision"),
                read=convert, write=export_npz, suffix=".npz", options=("layout",), detect_file=is_npz,
                detect_keys=looks_like_jax,
                tiny=dict(image_size=32, patch_size=16, num_classes=5, dim=32, depth=2, num_heads=2,
                          class_token=False, pos_embed_prefix=False, pooling="map", act="gelu_tanh"))
