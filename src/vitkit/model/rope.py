"""Rotary position embedding (RoPE) over the patch grid: one module, the variants as data
(``config.rope``; Su et al. 2021, axial 2-D as in Heo et al. 2024).

Every variant rotates the patch tokens' queries and keys in each attention layer by angles that
depend on the patch position; prefix tokens (class, registers) are not rotated. With head width
``hd`` there are ``hd / 2`` channel pairs, each rotated by one angle. What differs:

* ``dinov3`` (DINOv3, Siméoni et al. 2025; facebookresearch/dinov3 ``RopePositionEmbedding``,
  transformers' ``DINOv3ViTRopePositionEmbedding``): coordinates are the patch centres normalised
  per axis to [-1, 1] (``(i + 0.5) / g * 2 - 1``); ``hd / 4`` frequencies ``theta ** -(4 j / hd)``;
  angle ``2 pi * coord * f``; pairs laid out ``[y freqs, x freqs]`` and rotated "rotate half"
  (channel ``c`` pairs with ``c + hd / 2``).
* ``axial`` (timm's ``RotaryEmbeddingCat`` with ``in_pixels=False``: EVA-02, Perception Encoder,
  the RoPE-ViT axial models, timm's SBB ``vit_*_rope_reg*``): coordinates are the integer patch
  indices plus ``grid_offset`` (PE: 1), optionally rescaled so the grid spans ``ref_grid``
  (EVA-02's ``ref_feat_shape``: ``(i + offset) / g * ref``); same frequencies, angle
  ``coord * f`` (no 2 pi); pairs ``[axis0 freqs, axis1 freqs]`` with axis order ``indexing``
  (``ij`` = (row, col), ``xy`` = (col, row)), rotated as interleaved pairs (``2p, 2p + 1``).
* ``mixed`` (RoPE-Mixed, Heo et al. 2024; timm's ``RotaryEmbeddingMixed``): integer indices, and
  learned frequencies per block and head, the parameter ``freqs`` (2, depth, heads, hd / 2):
  angle of pair ``p`` = ``c0 * freqs[0, ..., p] + c1 * freqs[1, ..., p]``; interleaved pairs.
  Its tables are one (cos, sin) per block (each (heads, N, hd)).

Training-time coordinate augmentation as DINOv3 (train mode only, one draw per forward):
``shift`` adds U(-s, s) per axis, ``jitter`` scales each axis by exp(U(-log j, log j)),
``rescale`` scales both by exp(U(-log r, log r)). Inference is deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# which variants rotate interleaved channel pairs (2p, 2p + 1) rather than halves (c, c + hd / 2)
INTERLEAVED = {"dinov3": False, "axial": True, "mixed": True}


def patch_centres(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(gh * gw, 2) patch-centre coordinates (y, x) in [-1, 1], row-major over the grid, float32."""
    gh, gw = grid
    ys = torch.arange(0.5, gh, dtype=torch.float32, device=device) / gh
    xs = torch.arange(0.5, gw, dtype=torch.float32, device=device) / gw
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * coords - 1.0


def patch_indices(grid: tuple[int, int], offset: float = 0.0, ref_grid: tuple[int, int] | None = None,
                  indexing: str = "ij", device: torch.device | None = None) -> torch.Tensor:
    """(gh * gw, 2) integer patch coordinates ``i + offset`` (rescaled ``/ g * ref`` with a reference
    grid), row-major over the grid; channels (row, col) for ``ij``, (col, row) for ``xy``. float32,
    in timm's ``_build_grid`` order of operations."""
    axes = []
    for a, g in enumerate(grid):
        t = torch.arange(g, dtype=torch.int64, device=device).to(torch.float32) + offset
        if ref_grid is not None:
            t = t / g * ref_grid[a]
        axes.append(t)
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, 1)  # (N, 2) as (row, col)
    return coords.flip(-1) if indexing == "xy" else coords


class RotaryEmbedding(nn.Module):
    """(cos, sin) tables for a patch grid, each (gh * gw, head_dim), or for ``mixed`` a list with
    one (cos, sin) per block, each (heads, gh * gw, head_dim). Only ``mixed`` has a parameter
    (``freqs``); the others recompute their few hundred frequencies and keep nothing."""

    def __init__(self, head_dim: int, theta: float = 100.0, shift: float | None = None,
                 jitter: float | None = None, rescale: float | None = None, *, variant: str = "dinov3",
                 grid_offset: float = 0.0, ref_grid: tuple[int, int] | None = None, indexing: str = "ij",
                 depth: int = 1, num_heads: int = 1) -> None:
        super().__init__()
        self.head_dim, self.theta, self.variant = head_dim, float(theta), variant
        self.shift, self.jitter, self.rescale = shift, jitter, rescale
        self.grid_offset, self.ref_grid, self.indexing = float(grid_offset), ref_grid, indexing
        self.interleaved = INTERLEAVED[variant]
        self.freqs = nn.Parameter(self._init_mixed(depth, num_heads)) if variant == "mixed" else None

    def _init_mixed(self, depth: int, num_heads: int) -> torch.Tensor:
        """(2, depth, heads, hd / 2): the axial frequencies turned by a random angle per block and
        head (timm's ``init_random_2d_freqs``), the starting point RoPE-Mixed trains from."""
        mag = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 4, dtype=torch.float32) / self.head_dim)
        angles = torch.rand(depth, num_heads, 1) * 2 * math.pi
        fx = torch.cat([mag * torch.cos(angles), mag * torch.cos(angles + math.pi / 2)], dim=-1)
        fy = torch.cat([mag * torch.sin(angles), mag * torch.sin(angles + math.pi / 2)], dim=-1)
        return torch.stack([fx, fy], dim=0)

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

    def _tables(self, angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair angles (..., hd / 2) -> (cos, sin) (..., hd) in the variant's channel layout."""
        angles = angles.repeat_interleave(2, dim=-1) if self.interleaved else angles.tile(2)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype):
        if self.variant == "dinov3":
            coords = patch_centres(grid, device)
        else:
            coords = patch_indices(grid, self.grid_offset, self.ref_grid if self.variant == "axial" else None,
                                   self.indexing, device)
        if self.training:
            coords = self._augment(coords)
        if self.variant == "mixed":
            f = self.freqs.float()  # (2, depth, heads, hd/2); angles in fp32 as timm's get_mixed_freqs
            angles = coords[:, 0, None] * f[0].unsqueeze(-2) + coords[:, 1, None] * f[1].unsqueeze(-2)
            cos, sin = self._tables(angles, dtype)  # (depth, heads, N, hd)
            return list(zip(cos.unbind(0), sin.unbind(0)))
        exp = torch.arange(0, 1, 4 / self.head_dim, dtype=torch.float32, device=device)
        if self.variant == "dinov3":
            inv_freq = 1.0 / self.theta ** exp
            angles = 2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]
        else:  # timm's freq_bands: int64 arange / num_bands
            nb = self.head_dim // 4
            bands = 1.0 / self.theta ** (torch.arange(nb, dtype=torch.int64, device=device).to(torch.float32) / nb)
            angles = coords[:, :, None] * bands
        return self._tables(angles.flatten(1, 2), dtype)

    def extra_repr(self) -> str:
        aug = ", ".join(f"{n}={getattr(self, n)}" for n in ("shift", "jitter", "rescale") if getattr(self, n) is not None)
        grid = (f", offset={self.grid_offset}, ref_grid={self.ref_grid}, indexing={self.indexing}"
                if self.variant != "dinov3" else "")
        return (f"{self.variant}, head_dim={self.head_dim}, theta={self.theta}{grid}"
                + (f", train-time {aug}" if aug else ""))


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:  # (x0, x1) -> (-x1, x0) per pair, as timm's rot()
        turned = torch.stack([-t[..., 1::2], t[..., ::2]], dim=-1).reshape(t.shape)
    else:
        h = t.shape[-1] // 2
        turned = torch.cat((-t[..., h:], t[..., :h]), dim=-1)
    return t * cos + turned * sin


def apply_rope(q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], interleaved: bool = False):
    """Rotate the patch rows of queries (B, h, M, hd) and keys (B, h, N, hd); the leading
    ``N - patches`` rows are prefix tokens and stay as they are. Queries may be the first M
    tokens only (the class-token-only last block): rows past the prefix are rotated by their
    patches' angles. ``interleaved``: the pair layout of the tables (:data:`INTERLEAVED`)."""
    cos, sin = rope
    n = cos.shape[-2]
    P = k.shape[-2] - n
    k = torch.cat((k[..., :P, :], _rotate(k[..., P:, :], cos, sin, interleaved)), dim=-2)
    M = q.shape[-2]
    if M > P:
        q = torch.cat((q[..., :P, :], _rotate(q[..., P:, :], cos[..., : M - P, :], sin[..., : M - P, :],
                                              interleaved)), dim=-2)
    return q, k
