"""Multi-head self-attention with one fused qkv projection.

    scores = (Q K^T) * scale,  scale = head_dim ** -0.5 (applied *before* the softmax)
    A = softmax(scores, dim=-1)          # over the keys: every row sums to 1
    out = proj(concat_heads(A V))

Two of the tutorials get this wrong (softmax over the query axis; dividing by sqrt(D) after the
softmax). The fast path calls ``F.scaled_dot_product_attention`` (fused kernels on CPU and GPU);
``return_attention=True`` takes the explicit path and also returns A, (B, heads, N, N). The two
paths are tested to give the same output.

Input (B, N, D) -> output (B, N, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Workspace:
    """Named scratch buffers for one allocation-light inference forward (see ``ViT.forward``).

    The default CPU allocator hands large tensors back to the OS when they are freed, so every
    fresh activation of a plain forward costs page faults (one per 4 KiB, 170k+ per ViT-S/16
    forward at batch 32). A forward that writes its matmuls into a few buffers, reused by every
    block, faults once per buffer instead of once per layer. Made per call: nothing stays
    allocated afterwards and concurrent forwards never share a buffer.
    """

    def __init__(self, like: torch.Tensor) -> None:
        self.like = like
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or tuple(buf.shape) != shape:
            buf = self.buffers[name] = self.like.new_empty(shape)
        return buf


def linear_into(layer: nn.Linear, x2d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``layer(x2d)`` written into ``out`` (M, out_features). Bit-identical to ``F.linear``,
    which runs this same ``addmm(bias, x, W^T)`` for a contiguous input."""
    if layer.bias is not None:
        return torch.addmm(layer.bias, x2d, layer.weight.t(), out=out)
    return torch.mm(x2d, layer.weight.t(), out=out)


class Attention(nn.Module):
    """Args:
    dim: token width D.
    num_heads: heads; D must be divisible by it.
    qkv_bias: bias on the fused qkv projection.
    qk_scale: score scale, None = head_dim ** -0.5.
    attn_drop: dropout on the attention weights (training only).
    proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else None

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """(B, N, D) -> (B, N, D) [, weights (B, heads, N, N)]."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        dropout_p = self.attn_drop if self.training else 0.0
        if return_attention:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, heads, N, N)
            attn = attn.softmax(dim=-1)  # over the keys
            weights = attn
            if dropout_p > 0:
                attn = F.dropout(attn, p=dropout_p)
            out = attn @ v  # (B, heads, N, head_dim)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
            weights = None
        out = out.transpose(1, 2).reshape(B, N, D)
        out = self.proj(out)
        if self.proj_drop is not None:
            out = self.proj_drop(out)
        return (out, weights) if return_attention else out

    def forward_first_query(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, 1, D): the output for token 0 alone (the class token).

        Keys and values still come from every token; only token 0's query is projected and
        attended with, and only its output projected: the rows :meth:`forward` would compute
        for token 0, at 1/N of the query-side cost."""
        B, N, D = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], w[:D], None if b is None else b[:D])
        kv = F.linear(x, w[D:], None if b is None else b[D:])
        q = q.reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = kv.reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
        out = self.proj(out.transpose(1, 2).reshape(B, 1, D))
        if self.proj_drop is not None:
            out = self.proj_drop(out)
        return out

    def forward_into(self, x: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """Inference: (B, N, D) -> the projected output as a (B*N, D) workspace buffer ("out").

        Same kernels and results as :meth:`forward` in eval mode; qkv and the output
        projection are written into reused buffers instead of fresh tensors."""
        B, N, D = x.shape
        qkv = linear_into(self.qkv, x.reshape(B * N, D), ws.get("qkv", B * N, 3 * D))
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return linear_into(self.proj, out.transpose(1, 2).reshape(B * N, D), ws.get("out", B * N, D))
