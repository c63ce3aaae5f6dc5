"""Model summary (a Keras-style layer table) and the shape walk-through of one image.

The walk-through follows the tutorials' pipeline on a real image, printing the shape at every
stage: image -> patches (N x P*P*C) -> patch embeddings (N x D) -> + class token -> + position
embedding (-> norm_pre) -> blocks -> pooled output -> logits. Every number comes from the model's
own stages (``patch_embed``, ``embed``, ``run_blocks``, ``norm``, ``forward_head``), not from a
re-implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .bench.flops import count_flops
from .model.patch_embed import patchify
from .model.vit import ViT


@dataclass
class Row:
    name: str
    kind: str
    shape: tuple[int, ...]
    params: int


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("B" if i == 0 else str(s) for i, s in enumerate(shape)) + ")"


def layer_table(model: ViT) -> list[Row]:
    """One row per stage: output shape (batch shown as B) and its own parameter count."""
    c = model.config
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    stages: list[tuple[str, nn.Module]] = [("patch_embed", model.patch_embed)]
    stages += [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    stages += [("norm", model.norm), ("fc_norm", model.fc_norm), ("pre_logits", model.pre_logits),
               ("head", model.head)]
    for name, mod in stages:
        hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape))))
    device = next(model.parameters()).device
    x = torch.zeros(1, c.in_channels, *c.image_hw, device=device)
    try:
        with torch.no_grad():  # every token through every block (forward() runs the last block for the class token only)
            model.forward_head(model.forward_features(x))
    finally:
        for h in hooks:
            h.remove()

    def nparams(m: nn.Module | None) -> int:
        return 0 if m is None else sum(p.numel() for p in m.parameters())

    rows = [Row("input", "Image", (1, c.in_channels, *c.image_hw), 0),
            Row("patch_embed", f"PatchEmbed({c.patch_embed})", shapes["patch_embed"], nparams(model.patch_embed))]
    R = c.num_prefix_tokens
    if R:
        n = sum(p.numel() for p in (model.cls_token, model.dist_token, model.reg_token) if p is not None)
        kinds = (("cls" if c.class_token else "") + ("+dist" if c.dist_token else "")
                 + (f"+{c.num_registers} reg" if c.num_registers else ""))
        rows.append(Row("prefix tokens", f"Tokens({kinds.strip('+')})", (1, c.num_tokens, c.dim), n))
    if c.pos_embed != "none":
        pe = model.pos_embed
        rows.append(Row("pos_embed", f"PosEmbed({c.pos_embed})", (1, c.num_tokens, c.dim),
                        pe.numel() if isinstance(pe, nn.Parameter) else 0))
    if model.norm_pre is not None:
        rows.append(Row("norm_pre", type(model.norm_pre).__name__, (1, c.num_tokens, c.dim), nparams(model.norm_pre)))
    for i, b in enumerate(model.blocks):
        rows.append(Row(f"blocks.{i}", "Block(pre-norm)" if c.norm_first else "Block(post-norm)",
                        shapes[f"blocks.{i}"], nparams(b)))
    if not isinstance(model.norm, nn.Identity):
        rows.append(Row("norm", "LayerNorm", shapes["norm"], nparams(model.norm)))
    rows.append(Row("pool", f"Pool({c.pooling})", (1, c.dim), nparams(model.attn_pool)))
    if not isinstance(model.fc_norm, nn.Identity):
        rows.append(Row("fc_norm", "LayerNorm", shapes["fc_norm"], nparams(model.fc_norm)))
    if not isinstance(model.pre_logits, nn.Identity):
        rows.append(Row("pre_logits", f"Linear+{c.head_act}", shapes["pre_logits"], nparams(model.pre_logits)))
    if not isinstance(model.head, nn.Identity):
        rows.append(Row("head", "Linear", shapes["head"], nparams(model.head) + nparams(model.head_dist)))
    return rows


def format_table(model: ViT) -> str:
    rows = layer_table(model)
    c = model.config
    w1 = max(len(r.name) + len(r.kind) + 5 for r in rows)
    w1 = max(w1, 24)
    w2 = max(max(len(_fmt_shape(r.shape)) for r in rows), 14)
    line = "-" * (w1 + w2 + 18)
    out = [f'Model: "{c.name or "vit"}"', line,
           f"{'Layer (type)':<{w1}}{'Output Shape':<{w2}}{'Param #':>16}", "=" * len(line)]
    for r in rows:
        out.append(f"{r.name + ' (' + r.kind + ')':<{w1}}{_fmt_shape(r.shape):<{w2}}{r.params:>16,}")
    total = model.num_params()
    trainable = model.num_params(trainable_only=True)
    blocks = sum(r.params for r in rows if r.name.startswith("blocks."))
    fl = count_flops(c)
    out += ["=" * len(line),
            f"Total params: {total:,}",
            f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}",
            f"In transformer blocks: {blocks:,} ({100.0 * blocks / max(total, 1):.1f}%)",
            f"Compute per image: {fl['gflops']:.3f} GFLOPs ({fl['gmacs']:.3f} GMACs)",
            line]
    return "\n".join(out)


def walkthrough(model: ViT, image: torch.Tensor, labels: list[str] | None = None) -> str:
    """Shape-by-shape trace of one preprocessed image (C, H, W) through the model's stages."""
    c = model.config
    if image.ndim == 3:
        image = image[None]
    (ph, pw), (gh, gw) = c.patch_hw, c.grid_size
    N, D, R = c.num_patches, c.dim, c.num_prefix_tokens
    steps = []
    with torch.no_grad():
        model.patch_embed.check_input(image)
        patches = patchify(image, c.patch_hw, order="ppc")[0]  # (N, P*P*C)
        emb = model.patch_embed(image)  # (1, N, D)
        steps.append(("image", tuple(image.shape[1:]), f"{c.in_channels} channel(s), {c.image_hw[0]}x{c.image_hw[1]} pixels"))
        steps.append(("patches", tuple(patches.shape),
                      f"{gh}x{gw} grid of {ph}x{pw} patches = {N} patches, each flattened to {ph}*{pw}*{c.in_channels} = {c.patch_dim} values"))
        steps.append(("patch embeddings", tuple(emb.shape[1:]), f"one linear map (a strided conv) {c.patch_dim} -> {D}"))
        if R:
            what = []
            if c.class_token:
                what.append("class token")
            if c.num_registers:
                what.append(f"{c.num_registers} register token(s)")
            steps.append((f"+ {' + '.join(what)}", (N + R, D), f"{R} learned token(s) in front of the patches"))
        x = model.embed(image)  # (1, R+N, D): prefix tokens, position embedding, norm_pre
        if c.pos_embed != "none":
            steps.append(("+ position embedding", tuple(x.shape[1:]), f"{c.pos_embed} table added to every token"))
        if model.norm_pre is not None:
            steps.append(("norm_pre", tuple(x.shape[1:]), "a norm before the first block (CLIP's ln_pre)"))
        rope = model.rope_for(image, x)
        x = model.run_blocks(x, rope).tokens
        steps.append((f"{c.depth} encoder blocks", tuple(x.shape[1:]),
                      f"{'pre' if c.norm_first else 'post'}-norm: {c.num_heads} heads of {c.head_dim}, MLP {D}->{c.hidden_dim}->{D}"
                      + (f"; RoPE ({c.rope}) on the patch queries and keys" if rope is not None else "")))
        x = model.norm(x)
        pooled = model.pool(x)
        steps.append(("class-token output" if c.pooling == "cls" else "mean of patch tokens", tuple(pooled.shape[1:]),
                      "token 0 after the final norm" if c.pooling == "cls" else f"average over the {N} patch tokens"))
        logits = model.forward_head(x)
        if c.num_classes:
            desc = "regression outputs" if c.task == "regression" else f"{c.num_classes} class scores"
            if c.task == "classification":
                p = logits.softmax(-1)[0]
                k = int(p.argmax())
                name = labels[k] if labels and k < len(labels) else str(k)
                desc += f"; top-1 = {name} (p={float(p[k]):.3f})"
            steps.append(("logits", tuple(logits.shape[1:]), desc))
    width = max(len(s[0]) for s in steps) + 2
    sw = max(len(str(s[1])) for s in steps) + 2
    return "\n".join(f"{name:<{width}}{str(shape):<{sw}}{desc}" for name, shape, desc in steps)
