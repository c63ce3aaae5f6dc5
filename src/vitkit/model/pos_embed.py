"""Position embeddings: learned tables, fixed sin/cos tables, and resampling between grids.

* ``sincos_1d(n, dim)``: the Transformer's table (Vaswani et al. 2017, Sec. 3.5) over token
  index 0..n-1: PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(...).
* ``sincos_2d(grid, dim)``: big_vision's ``posemb_sincos_2d`` over the patch grid, used by the
  "Better plain ViT baselines" (Beyer et al. 2022): [sin(x w), cos(x w), sin(y w), cos(y w)].
* ``resample_pos_embed``: bicubic resampling of a learned (1, R + gh*gw, D) table to a new grid,
  keeping the R prefix rows (class / register tokens) apart. Non-square grids work both ways.
  Resampling to the same grid returns the input unchanged (big_vision's invariance), and the
  interpolation itself matches timm's ``resample_abs_pos_embed`` (tests use timm as the oracle).

Resampling as each source implementation does it, one function per implementation
(:data:`POS_RESAMPLERS`, keyed by the names of ``ViTConfig.pos_resample``). Loading weights at
another resolution and ``dynamic_img_size`` must give the numbers the weights' own
implementation computes at that resolution; the implementations disagree in small ways that
change outputs by ~1e-3:

* :func:`resample_timm` (``"timm"``): timm's ``resample_abs_pos_embed`` (bicubic,
  ``antialias=True``, ``align_corners=False``, computed in fp32), used by timm's checkpoint
  filter and its ``dynamic_img_size``; vitkit's default. Also open_clip's ``resize_pos_embed``.
* :func:`resample_hf` (``"hf"``): Hugging Face ``interpolate_pos_encoding`` of ViT, DeiT, Dinov2,
  CLIP, SigLIP: bicubic to the target *size*, ``align_corners=False``, no antialias, fp32 (Dinov2
  casts explicitly; the others are fp32 for fp32 weights).
* :func:`resample_hf_dinov2_registers` (``"hf_dinov2_registers"``): Hugging Face
  ``Dinov2WithRegisters``: the same but with ``antialias=True`` (transformers 5.23). It differs
  from Dinov2's when shrinking *and* when enlarging: torch's antialiased bicubic uses PIL's cubic
  coefficient (a = -0.5), the plain path a = -0.75.
* :func:`resample_dinov2_original` (``"dinov2"``): facebookresearch/dinov2
  ``interpolate_pos_encoding``: bicubic by a *scale factor* ``(g + 0.1) / M``
  (``interpolate_offset=0.1``, a workaround from DINO for a floating point error), no antialias.
  With a scale factor, ``F.interpolate`` maps coordinates by that factor, not by the size ratio,
  so results differ from :func:`resample_hf`.
* :func:`resample_big_vision` (``"big_vision"``): big_vision ``resample_posemb``:
  ``jax.image.resize(..., method="bilinear")``. Upsampling equals torch's bilinear with
  ``align_corners=False``; downsampling in JAX uses a scaled triangle kernel, which torch's
  ``antialias=True`` bilinear follows (not verified against JAX here: JAX is not installed).
* :func:`resample_vit_jax` (``"vit_jax"``): google-research/vision_transformer (the original ViT
  and AugReg ``.npz`` files): ``scipy.ndimage.zoom(..., order=1)``, bilinear with
  ``align_corners=True``, no antialias, in float64.
* :func:`resample_torchvision` (``"torchvision"``): torchvision's ``interpolate_embeddings``, the
  function its references use to fine-tune a ViT at another size: bicubic with
  ``align_corners=True``, no antialias.

Each takes a (1, R + gh*gw, D) table, the new and old grids and the number R of prefix rows
(kept as they are) and returns the new table in the input dtype. The same grid returns the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import to_2tuple
from ..errors import ConfigError, InputError


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


def sincos_2d(grid_size, dim: int, temperature: float = 10000.0, mae: bool = False) -> torch.Tensor:
    """(gh*gw, dim) table over a row-major patch grid, as big_vision's ``posemb_sincos_2d``; with
    ``mae``, MAE's ``get_2d_sincos_pos_embed`` (AIMv2's native-resolution table, same layout
    [sin x, cos x, sin y, cos y]): frequencies 1 / T ** (j / (D/4)) where big_vision divides by D/4 - 1."""
    gh, gw = to_2tuple(grid_size, "grid_size")
    if dim % 4:
        raise InputError(f"sincos_2d needs dim divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                          indexing="ij")
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float64) / (quarter if mae else max(quarter - 1, 1))
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


# ----------------------------------------------------------------------------- per implementation
def _split(pos: torch.Tensor, old_grid, num_prefix: int):
    gh, gw = old_grid
    D = pos.shape[-1]
    if pos.shape[1] - num_prefix != gh * gw:
        raise ConfigError(f"position table of {pos.shape[1]} rows is not {num_prefix} prefix rows + a "
                          f"{gh}x{gw} grid")
    grid = pos[:, num_prefix:].float().reshape(1, gh, gw, D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    return pos[:, :num_prefix], grid


def _join(prefix: torch.Tensor, grid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _, D, gh, gw = grid.shape
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, D).to(dtype)], dim=1)


def resample_timm(pos: torch.Tensor, new_grid, old_grid, num_prefix: int) -> torch.Tensor:
    """timm ``resample_abs_pos_embed`` (bicubic, antialias)."""
    return resample_pos_embed(pos, tuple(new_grid), tuple(old_grid), num_prefix_tokens=num_prefix,
                              interpolation="bicubic", antialias=True)


def resample_hf(pos: torch.Tensor, new_grid, old_grid, num_prefix: int, antialias: bool = False) -> torch.Tensor:
    """Hugging Face ``interpolate_pos_encoding`` (bicubic to the size, no antialias, fp32)."""
    if tuple(new_grid) == tuple(old_grid):
        return pos
    prefix, grid = _split(pos, old_grid, num_prefix)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=antialias)
    return _join(prefix, grid, pos.dtype)


def resample_hf_dinov2_registers(pos: torch.Tensor, new_grid, old_grid, num_prefix: int) -> torch.Tensor:
    """Hugging Face ``Dinov2WithRegisters`` ``interpolate_pos_encoding``: as :func:`resample_hf`,
    but with ``antialias=True`` (unlike plain ``Dinov2``)."""
    return resample_hf(pos, new_grid, old_grid, num_prefix, antialias=True)


def resample_dinov2_original(pos: torch.Tensor, new_grid, old_grid, num_prefix: int,
                             offset: float = 0.1) -> torch.Tensor:
    """facebookresearch/dinov2 ``interpolate_pos_encoding`` (scale factor ``(g + offset) / M``).
    The original returns the table unchanged only when the patch count matches *and* the input
    is square; the same grid here returns it unchanged too (a square grid of the same size)."""
    if tuple(new_grid) == tuple(old_grid):
        return pos
    gh, gw = old_grid
    if gh != gw:
        raise ConfigError(f"the original DINOv2 resampling assumes a square table, got grid {old_grid}")
    prefix, grid = _split(pos, old_grid, num_prefix)
    nh, nw = new_grid
    scale = (float(nh + offset) / gh, float(nw + offset) / gw)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(grid.shape[-2:]) != (nh, nw):
        raise ConfigError(f"DINOv2 scale-factor resampling gave grid {tuple(grid.shape[-2:])}, not {new_grid}")
    return _join(prefix, grid, pos.dtype)


def resample_big_vision(pos: torch.Tensor, new_grid, old_grid, num_prefix: int) -> torch.Tensor:
    """big_vision ``resample_posemb`` (``jax.image.resize`` bilinear)."""
    if tuple(new_grid) == tuple(old_grid):
        return pos
    prefix, grid = _split(pos, old_grid, num_prefix)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=False, antialias=True)
    return _join(prefix, grid, pos.dtype)


def resample_torchvision(pos: torch.Tensor, new_grid, old_grid, num_prefix: int) -> torch.Tensor:
    """torchvision ``vision_transformer.interpolate_embeddings`` (bicubic, ``align_corners=True``, no
    antialias). torchvision's ViT is square-only; the same interpolation serves any grid here."""
    if tuple(new_grid) == tuple(old_grid):
        return pos
    prefix, grid = _split(pos, old_grid, num_prefix)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=True)
    return _join(prefix, grid, pos.dtype)


def resample_vit_jax(pos: torch.Tensor, new_grid, old_grid, num_prefix: int) -> torch.Tensor:
    """google-research/vision_transformer ``checkpoint.load_pretrained``: ``scipy.ndimage.zoom(grid,
    order=1)``, i.e. bilinear through the corner samples (``align_corners=True``), no antialias,
    computed in float64 as scipy does. The original takes square grids; any grid works here."""
    if tuple(new_grid) == tuple(old_grid):
        return pos
    prefix, grid = _split(pos, old_grid, num_prefix)
    grid = F.interpolate(grid.double(), size=tuple(new_grid), mode="bilinear", align_corners=True)
    return _join(prefix, grid, pos.dtype)


# keyed by config.POS_RESAMPLES (the config validates names without importing the model)
POS_RESAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "timm": resample_timm, "hf": resample_hf, "hf_dinov2_registers": resample_hf_dinov2_registers,
    "dinov2": resample_dinov2_original, "big_vision": resample_big_vision, "torchvision": resample_torchvision,
    "vit_jax": resample_vit_jax,
}


def get_pos_resampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in POS_RESAMPLERS:
        raise ConfigError(f"position resampling must be one of {list(POS_RESAMPLERS)}, got {name!r}")
    return POS_RESAMPLERS[name]
