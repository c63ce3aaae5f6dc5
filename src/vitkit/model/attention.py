"""Multi-head self-attention with one fused qkv projection, and attention pooling (MAP).

    scores = (Q K^T) * scale,  scale = head_dim ** -0.5 (applied *before* the softmax)
    A = softmax(scores, dim=-1)          # over the keys: every row sums to 1
    out = proj(concat_heads(A V))

Two of the tutorials get this wrong (softmax over the query axis; dividing by sqrt(D) after the
softmax). The fast path calls ``F.scaled_dot_product_attention`` (fused kernels on CPU and GPU);
``return_attention=True`` takes the explicit path and also returns A. The two paths are tested
to give the same output.

``num_queries=k`` computes the output of the first k tokens only: their queries attend over the
keys and values of *every* token. It is what a class-token head needs from the last block.

Input (B, N, D) -> output (B, N, D) (or (B, k, D) with ``num_queries=k``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float,
            return_attention: bool, attn_mask: torch.Tensor | None = None):
    """(B, h, M, hd) queries over (B, h, N, hd) keys/values -> (B, h, M, hd) [, weights (B, h, M, N)].
    ``attn_mask`` as SDPA's: bool (True = may attend) or additive float, broadcastable to (B, h, M, N)."""
    if not return_attention:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale), None
    attn = (q @ k.transpose(-2, -1)) * scale  # (B, h, M, N)
    if attn_mask is not None:
        attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
    weights = attn.softmax(dim=-1)  # over the keys
    attn = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return attn @ v, weights


class Attention(nn.Module):
    """Args:
    dim: token width D.
    num_heads: heads; D must be divisible by it.
    qkv_bias: bias on the fused qkv projection.
    qk_scale: score scale, None = head_dim ** -0.5.
    attn_drop: dropout on the attention weights (training only).
    proj_drop: dropout after the output projection.
    proj_bias: bias on the output projection (timm's ``proj_bias``; AIMv2 has none).
    norm: a norm on the heads' concatenated output before ``proj`` (EVA-CLIP's ``scale_attn_inner``).
    rope_interleaved: the rotary tables' pair layout (vitkit.model.rope.INTERLEAVED).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, proj_bias: bool = True,
                 norm: nn.Module | None = None, rope_interleaved: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.rope_interleaved = rope_interleaved
        self.norm = norm
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else None

    def forward(self, x: torch.Tensor, num_queries: int | None = None, return_attention: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, attn_mask: torch.Tensor | None = None):
        """(B, N, D) -> (B, M, D) [, weights (B, heads, M, N)], M = num_queries or N.

        ``num_queries=k``: only the first k tokens' queries are projected and attended with, and
        only their outputs projected (the rows the full call gives for them, at k/N of the
        query-side cost); keys and values still come from all N tokens. ``rope``: (cos, sin) of
        the patch tokens (vitkit.model.rope), rotating their queries and keys. ``attn_mask``: which
        keys each query may see, bool (True = attend) or additive float, broadcastable to
        (B, heads, M, N) (the text tower's causal and padding masks); both paths apply it alike."""
        B, N, D = x.shape
        H, hd = self.num_heads, self.head_dim
        M = N if num_queries is None else num_queries
        if num_queries is None or type(self.qkv) is not nn.Linear:
            # a wrapped projection (a peft LoRA layer) is only right through its own forward: run it
            # whole and keep the first M queries
            q, k, v = self.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
            q = q[:, :, :M]
        else:
            w, b = self.qkv.weight, self.qkv.bias  # rows [q; k; v]: slice the fused projection
            q = F.linear(x[:, :M], w[:D], None if b is None else b[:D]).reshape(B, M, H, hd).transpose(1, 2)
            kv = F.linear(x, w[D:], None if b is None else b[D:])
            k, v = kv.reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope(q, k, rope, self.rope_interleaved)
        dropout_p = self.attn_drop if self.training else 0.0
        out, weights = _attend(q, k, v, self.scale, dropout_p, return_attention, attn_mask)
        out = out.transpose(1, 2).reshape(B, M, D)
        out = self.proj(self.norm(out) if self.norm is not None else out)
        if self.proj_drop is not None:
            out = self.proj_drop(out)
        return (out, weights) if return_attention else out


class AttentionPoolLatent(nn.Module):
    """Multi-head attention pooling (big_vision's MAPHead, SigLIP; timm's ``AttentionPoolLatent``
    with the same parameter names): a learned probe ``latent`` attends over the tokens, then a
    residual norm + MLP. (B, N, D) -> (B, D).

    Args:
        dim, num_heads: widths (the model's).
        mlp: the MLP module (applied as ``x + mlp(norm(x))``); None = no such residual step.
        norm: the norm module before the MLP (None with ``mlp=None``).
        qk_scale: score scale, None = head_dim ** -0.5.
        q_proj: project the probe into the query; False = the probe is the query itself
            (AIMv2's AttentionPoolingClassifier: ``cls_token``, ``k``, ``v``, ``linear``).
        kv_bias: bias of the key/value projection.
    """

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module | None, norm: nn.Module | None,
                 qk_scale: float | None = None, q_proj: bool = True, kv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim) if q_proj else None
        self.kv = nn.Linear(dim, 2 * dim, bias=kv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = norm
        self.mlp = mlp

    def forward(self, x: torch.Tensor, return_attention: bool = False, attn_mask: torch.Tensor | None = None):
        """(B, N, D) -> (B, D) [, weights (B, heads, 1, N)]. ``attn_mask``: which tokens the probe
        may read, as :class:`Attention`'s (NaFlex padding: (B, 1, 1, N) bool)."""
        B, N, D = x.shape
        H, hd = self.num_heads, self.head_dim
        probe = self.q(self.latent) if self.q is not None else self.latent  # (1, 1, D)
        q = probe.reshape(1, 1, H, hd).transpose(1, 2).expand(B, -1, -1, -1)  # (B, H, 1, hd)
        k, v = self.kv(x).reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out, weights = _attend(q, k, v, self.scale, 0.0, return_attention, attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(B, 1, D))
        if self.mlp is not None:
            out = out + self.mlp(self.norm(out))
        return (out[:, 0], weights) if return_attention else out[:, 0]
