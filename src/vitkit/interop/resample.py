"""Position-table resampling as each source implementation does it, one function per implementation.

Loading weights at another resolution (``from_pretrained(..., image_size=)``) must give the
numbers the weights' own implementation computes when it sees that resolution; the
implementations disagree in small ways that change outputs by ~1e-3:

* :func:`resample_timm`: timm's ``resample_abs_pos_embed`` (bicubic, ``antialias=True``,
  ``align_corners=False``, computed in fp32), used by timm's checkpoint filter and its
  ``dynamic_img_size``. It is vitkit's default (:func:`vitkit.model.pos_embed.resample_pos_embed`).
* :func:`resample_hf`: Hugging Face ``interpolate_pos_encoding`` of ViT, DeiT, Dinov2, CLIP,
  SigLIP: bicubic to the target *size*, ``align_corners=False``, no antialias, fp32 (Dinov2
  casts explicitly; the others are fp32 for fp32 weights).
* :func:`resample_hf_dinov2_registers`: Hugging Face ``Dinov2WithRegisters``: the same but with
  ``antialias=True`` (transformers 5.23). It differs from Dinov2's when shrinking *and* when
  enlarging: torch's antialiased bicubic uses PIL's cubic coefficient (a = -0.5), the plain
  path a = -0.75.
* :func:`resample_dinov2_original`: facebookresearch/dinov2 ``interpolate_pos_encoding``:
  bicubic by a *scale factor* ``(g + 0.1) / M`` (``interpolate_offset=0.1``, a workaround from
  DINO for a floating point error), no antialias. With a scale factor, ``F.interpolate`` maps
  coordinates by that factor, not by the size ratio, so results differ from :func:`resample_hf`.
* :func:`resample_big_vision`: big_vision ``resample_posemb``: ``jax.image.resize(...,
  method="bilinear")``. Upsampling equals torch's bilinear with ``align_corners=False``;
  downsampling in JAX uses a scaled triangle kernel, which torch's ``antialias=True`` bilinear
  follows (not verified against JAX here: JAX is not installed).

Each takes a (1, R + gh*gw, D) table, the new and old grids and the number R of prefix rows
(kept as they are) and returns the new table in the input dtype. The same grid returns the input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError


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
    from ..model.pos_embed import resample_pos_embed

    return resample_pos_embed(pos, tuple(new_grid), tuple(old_grid), num_prefix_tokens=num_prefix,
                              interpolation="bicubic", antialias=True)


def resample_hf(pos: torch.Tensor, new_grid, old_grid, num_prefix: int) -> torch.Tensor:
    """Hugging Face ``interpolate_pos_encoding`` (bicubic to the size, no antialias, fp32)."""
    if tuple(new_grid) == tuple(old_grid):
        return pos
    prefix, grid = _split(pos, old_grid, num_prefix)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return _join(prefix, grid, pos.dtype)


def resample_hf_dinov2_registers(pos: torch.Tensor, new_grid, old_grid, num_prefix: int) -> torch.Tensor:
    """Hugging Face ``Dinov2WithRegisters`` ``interpolate_pos_encoding`` (bicubic, antialias, fp32)."""
    if tuple(new_grid) == tuple(old_grid):
        return pos
    prefix, grid = _split(pos, old_grid, num_prefix)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    return _join(prefix, grid, pos.dtype)


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


RESAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "timm": resample_timm, "hf": resample_hf, "hf_dinov2_registers": resample_hf_dinov2_registers, "dinov2": resample_dinov2_original, "big_vision": resample_big_vision,
}


def get_resampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in RESAMPLERS:
        raise ConfigError(f"position resampling must be one of {list(RESAMPLERS)}, got {name!r}")
    return RESAMPLERS[name]
