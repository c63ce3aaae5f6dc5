"""Analytic parameter and FLOP counts from a config (no model built).

FLOPs here are real floating-point operations: one multiply-add = 2 FLOPs. Papers and timm often
quote multiply-adds (MACs) as "FLOPs"; ``count_flops(...)["gmacs"]`` gives that number (ViT-B/16
at 224: 17.6 GMACs = 35.1 GFLOPs). Counted: every matmul/conv (patch embedding, qkv, attention
scores, attention x values, output projection, MLP, pre-logits, head). Not counted: norms,
softmax, activations, additions (under 1% for ViT). The test compares with
``torch.utils.flop_counter.FlopCounterMode`` on real models.
"""

from __future__ import annotations

from ..config import ViTConfig


def count_params(c: ViTConfig) -> int:
    D, H = c.dim, c.hidden_dim
    ph, pw = c.patch_hw
    norm = D if c.norm_layer == "rmsnorm" else 2 * D  # rmsnorm has no bias
    n = D * c.in_channels * ph * pw + (D if c.patch_bias else 0)  # patch embedding
    n += D * c.num_prefix_tokens  # class, distillation and register tokens
    if c.pos_embed == "learned":
        n += D * (c.num_patches + (c.num_prefix_tokens if c.pos_embed_prefix else 0))
    if c.norm_pre:
        n += norm
    per_block = 2 * norm
    per_block += D * 3 * D + (3 * D if c.qkv_bias else 0) + D * D + D  # qkv + proj
    if c.mlp_layer == "swiglu":
        per_block += D * 2 * H + 2 * H + H * D + D  # packed fc1 (gate; value) + fc2
    else:
        per_block += D * H + H + H * D + D  # MLP
    if c.layer_scale is not None:
        per_block += 2 * D
    n += c.depth * per_block
    if (c.norm_first and not c.fc_norm) or c.fc_norm:
        n += norm
    if c.pooling == "map":  # latent, q, kv, proj, norm, plain MLP as wide as the blocks' fc1
        H = H * (2 if c.mlp_layer == "swiglu" else 1)
        n += D + (D * D + D) + (2 * D * D + 2 * D) + (D * D + D) + norm + (D * H + H + H * D + D)
    head_in = D
    if c.head_hidden_dim:
        n += D * c.head_hidden_dim + c.head_hidden_dim
        head_in = c.head_hidden_dim
    if c.num_classes:
        n += (1 + int(c.dist_token)) * (head_in * c.num_classes + (c.num_classes if c.head_bias else 0))
    return n


def count_flops(c: ViTConfig) -> dict[str, float]:
    """FLOPs for one image by stage, plus totals (``flops``, ``gflops``, ``gmacs``)."""
    D, H, T, N = c.dim, c.hidden_dim, c.num_tokens, c.num_patches
    ph, pw = c.patch_hw
    macs = {
        "patch_embed": N * c.in_channels * ph * pw * D,
        "qkv": c.depth * T * D * 3 * D,
        "attn_scores": c.depth * T * T * D,
        "attn_values": c.depth * T * T * D,
        "attn_proj": c.depth * T * D * D,
        "mlp": c.depth * 2 * T * D * H,
        "head": (D * c.head_hidden_dim + c.head_hidden_dim * c.num_classes) if c.head_hidden_dim
        else D * c.num_classes,
    }
    out = {k: 2.0 * v for k, v in macs.items()}
    total = sum(out.values())
    out.update(flops=total, gflops=total / 1e9, gmacs=total / 2e9)
    return out


def train_flops(c: ViTConfig) -> float:
    """FLOPs of one image's training step, forward + backward (the backward's two matmuls per forward
    matmul: ~3x the forward), the usual count for MFU."""
    return 3.0 * count_flops(c)["flops"]
