"""Position embeddings: learned tables, fixed sin/cos tables, and resampling between grids.

* ``sincos_1d(n, dim)``: the Transformer's table (Vaswani et al. 2017, Sec. 3.5) over token
  index 0..n-1: PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(...).
* ``sincos_2d(grid, dim)``: big_vision's ``posemb_sincos_2d`` over the patch grid, used by the
  "Better plain ViT baselines" (Beyer et al. 2022): [sin(x w), cos(x w), sin(y w), cos(y w)].
* ``resample_pos_embed``: bicubic resampling of a learned (1, R + gh*gw, D) table to a new grid,
  keeping the R prefix rows (class / register tokens) apart. Non-square grids work both ways.
  Resampling to the same grid returns the input unchanged (big_vision's invariance), and the
  interpolation itself matches timm's ``resample_abs_pos_embed`` (tests use timm as the oracle).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import to_2tuple
from ..errors import InputError


def sincos_1d(num_positions: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(num_positions, dim) table, sin on even and cos on odd columns."""
    if dim % 2:
        raise InputError(f"sincos_1d needs an even dim, got {dim}")
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(temperature) / dim))
    pe = torch.zeros(num_positions, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe.float()


def sincos_2d(grid_size, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(gh*gw, dim) table over a row-major patch grid, as big_vision's ``posemb_sincos_2d``."""
    gh, gw = to_2tuple(grid_size, "grid_size")
    if dim % 4:
        raise InputError(f"sincos_2d needs dim divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                          indexing="ij")
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1)
    omega = 1.0 / temperature**omega
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([torch.sin(x), torch.cos(x), torch.sin(y), torch.cos(y)], dim=1).float()


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid,
    old_grid=None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, R + gh*gw, D) position table to ``new_grid`` (gh', gw').

    Args:
        pos_embed: the table; a 2-D (R + N, D) table is accepted and returned 2-D.
        new_grid: target (gh', gw') or an int for a square grid.
        old_grid: the table's grid; inferred as square when None.
        num_prefix_tokens: rows at the front (class/register tokens) kept as they are.
        interpolation: any ``F.interpolate`` mode for 4-D input ("bicubic", "bilinear", ...).
        antialias: anti-alias when downsampling (as timm).

    Returns the resampled table with the same dtype, (1, R + gh'*gw', D).
    """
    squeeze = pos_embed.ndim == 2
    if squeeze:
        pos_embed = pos_embed[None]
    if pos_embed.ndim != 3:
        raise InputError(f"expected a position table (1, R+N, D), got shape {tuple(pos_embed.shape)}")
    new_gh, new_gw = to_2tuple(new_grid, "new_grid")
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise InputError(
                f"cannot infer the grid of a table with {n} patch rows (not a square); pass old_grid=(gh, gw)"
            )
        old_grid = (side, side)
    old_gh, old_gw = to_2tuple(old_grid, "old_grid")
    if old_gh * old_gw != n:
        raise InputError(f"old_grid {old_gh}x{old_gw} = {old_gh * old_gw} rows, but the table has {n} patch rows")
    if (old_gh, old_gw) == (new_gh, new_gw):
        return pos_embed[0] if squeeze else pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    orig_dtype = grid.dtype
    grid = grid.float().reshape(1, old_gh, old_gw, dim).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=(new_gh, new_gw), mode=interpolation,
                         antialias=antialias if interpolation in ("bilinear", "bicubic") else False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_gh * new_gw, dim).to(orig_dtype)
    out = torch.cat([prefix, grid], dim=1)
    return out[0] if squeeze else out
