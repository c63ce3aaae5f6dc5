"""Rotary position embedding (RoPE) over the patch grid, as DINOv3 uses it (``config.rope="dinov3"``).

DINOv3 (Siméoni et al. 2025; facebookresearch/dinov3 ``RopePositionEmbedding``, transformers'
``DINOv3ViTRopePositionEmbedding``) has no position table: each attention layer rotates the patch
tokens' queries and keys by angles that depend on the patch centre. The centres are normalised
per axis to [-1, 1] (``(i + 0.5) / g * 2 - 1``), so any grid maps onto the same range and the
model takes any input size without resampling anything. With head width ``hd`` there are
``hd / 4`` frequencies ``theta ** -(4 j / hd)``; the angle of frequency ``f`` on axis ``a`` is
``2 pi * coord_a * f``, laid out ``[y freqs, x freqs, y freqs, x freqs]`` and applied with the
"rotate half" convention (channel ``c`` pairs with ``c + hd / 2``). Prefix tokens (class,
registers) are not rotated.

Training-time coordinate augmentation as DINOv3 (train mode only, one draw per forward):
``rope_shift`` adds U(-s, s) per axis, ``rope_jitter`` scales each axis by exp(U(-log j, log j)),
``rope_rescale`` scales both by exp(U(-log r, log r)). Inference is deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def patch_centres(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(gh * gw, 2) patch-centre coordinates (y, x) in [-1, 1], row-major over the grid, float32."""
    gh, gw = grid
    ys = torch.arange(0.5, gh, dtype=torch.float32, device=device) / gh
    xs = torch.arange(0.5, gw, dtype=torch.float32, device=device) / gw
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * coords - 1.0


class RotaryEmbedding(nn.Module):
    """(cos, sin) tables, each (gh * gw, head_dim), for a patch grid. No parameters and no buffers
    (nothing in the state dict; the frequencies are recomputed, a few hundred numbers)."""

    def __init__(self, head_dim: int, theta: float = 100.0, shift: float | None = None,
                 jitter: float | None = None, rescale: float | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, float(theta)
        self.shift, self.jitter, self.rescale = shift, jitter, rescale

    def _augment(self, coords: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            coords = coords + torch.empty(1, 2, device=coords.device).uniform_(-self.shift, self.shift)
        if self.jitter is not None:
            r = math.log(self.jitter)
            coords = coords * torch.empty(1, 2, device=coords.device).uniform_(-r, r).exp()
        if self.rescale is not None:
            r = math.log(self.rescale)
            coords = coords * torch.empty(1, device=coords.device).uniform_(-r, r).exp()
        return coords

    def forward(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        coords = patch_centres(grid, device)
        if self.training:
            coords = self._augment(coords)
        inv_freq = 1.0 / self.theta ** torch.arange(0, 1, 4 / self.head_dim, dtype=torch.float32, device=device)
        angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2).tile(2)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def extra_repr(self) -> str:
        aug = ", ".join(f"{n}={getattr(self, n)}" for n in ("shift", "jitter", "rescale") if getattr(self, n) is not None)
        return f"head_dim={self.head_dim}, theta={self.theta}" + (f", train-time {aug}" if aug else "")


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., h:], t[..., :h]), dim=-1) * sin


def apply_rope(q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    """Rotate the patch rows of queries (B, h, M, hd) and keys (B, h, N, hd); the leading
    ``N - patches`` rows are prefix tokens and stay as they are. Queries may be the first M
    tokens only (the class-token-only last block): rows past the prefix are rotated by their
    patches' angles."""
    cos, sin = rope
    P = k.shape[-2] - cos.shape[0]
    k = torch.cat((k[..., :P, :], _rotate(k[..., P:, :], cos, sin)), dim=-2)
    M = q.shape[-2]
    if M > P:
        q = torch.cat((q[..., :P, :], _rotate(q[..., P:, :], cos[: M - P], sin[: M - P])), dim=-2)
    return q, k
