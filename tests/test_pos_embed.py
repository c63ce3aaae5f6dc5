"""Position embeddings: the sin/cos tables against their formulas, resampling against timm, and
set_image_size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitkit import ViT
from vitkit.errors import InputError
from vitkit.model import resample_pos_embed, sincos_1d, sincos_2d

timm_layers = pytest.importorskip("timm.layers")


def test_sincos_1d_transformer_formula():
    pe = sincos_1d(50, 16)
    assert pe.shape == (50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert math.isclose(pe[pos, 2 * i], math.sin(angle), abs_tol=1e-6)
            assert math.isclose(pe[pos, 2 * i + 1], math.cos(angle), abs_tol=1e-6)


def _big_vision_sincos2d(h, w, width, temperature=10_000.0):
    """big_vision/models/vit.py posemb_sincos_2d, in numpy."""
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / (temperature**omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)


@pytest.mark.parametrize("grid,dim", [((4, 4), 32), ((3, 5), 16), ((14, 14), 768)])
def test_sincos_2d_big_vision(grid, dim):
    ours = sincos_2d(grid, dim).numpy()
    ref = _big_vision_sincos2d(*grid, dim)
    assert ours.shape == ref.shape and np.abs(ours - ref).max() < 1e-6


def test_sincos_errors():
    with pytest.raises(InputError):
        sincos_1d(4, 7)
    with pytest.raises(InputError):
        sincos_2d(4, 6)


def test_resample_same_grid_is_identity():
    pe = torch.randn(1, 1 + 35, 8)
    assert torch.equal(resample_pos_embed(pe, (5, 7), (5, 7)), pe)
    sq = torch.randn(1, 1 + 16, 8)
    assert torch.equal(resample_pos_embed(sq, 4), sq)


@pytest.mark.parametrize("old,new,prefix", [
    ((14, 14), (24, 24), 1), ((14, 14), (2, 2), 1), ((14, 14), (12, 20), 1),
    ((14, 14), (24, 24), 0), ((6, 10), (9, 4), 5), ((7, 7), (7, 9), 5),
])
def test_resample_equals_timm(old, new, prefix):
    pe = torch.randn(1, prefix + old[0] * old[1], 16)
    ours = resample_pos_embed(pe, new, old, num_prefix_tokens=prefix)
    ref = timm_layers.resample_abs_pos_embed(pe, list(new), list(old), num_prefix_tokens=prefix)
    assert ours.shape == (1, prefix + new[0] * new[1], 16)
    assert (ours - ref).abs().max() < 1e-5
    assert torch.equal(ours[:, :prefix], pe[:, :prefix])  # prefix rows kept apart


def test_resample_constant_field_and_2d_input():
    pe = torch.cat([torch.randn(1, 1, 4), torch.full((1, 64, 4), 0.7)], dim=1)
    out = resample_pos_embed(pe, (5, 11))
    assert torch.allclose(out[:, 1:], torch.full((1, 55, 4), 0.7), atol=1e-5)
    out2 = resample_pos_embed(pe[0], (5, 11))  # (T, D) in, (T', D) out
    assert torch.equal(out2, out[0])


def test_resample_errors():
    with pytest.raises(InputError, match="old_grid"):
        resample_pos_embed(torch.randn(1, 1 + 15, 4), (4, 4))  # 15 is not a square: needs old_grid
    with pytest.raises(InputError, match="15"):
        resample_pos_embed(torch.randn(1, 1 + 15, 4), (4, 4), old_grid=(4, 4))


@pytest.mark.parametrize("kind", ["sincos1d", "sincos2d"])
def test_set_image_size_recomputes_sincos(tiny_config, kind):
    m = ViT(tiny_config(pos_embed=kind)).eval()
    m.set_image_size((24, 32))
    ref = ViT(tiny_config(pos_embed=kind, image_size=(24, 32))).eval()
    assert torch.equal(m.pos_embed, ref.pos_embed)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), ref(x), atol=1e-6)
    assert m.config.image_hw == (24, 32) and m.grid_size == (6, 8)


def test_set_image_size_resamples_learned_like_timm():
    m = ViT(image_size=224, patch_size=16, dim=32, depth=1, num_heads=2, num_classes=3).eval()
    old = m.pos_embed.detach().clone()
    m.set_image_size(384)
    ref = timm_layers.resample_abs_pos_embed(old, [24, 24], [14, 14], num_prefix_tokens=1)
    assert m.pos_embed.shape == (1, 1 + 576, 32)
    assert (m.pos_embed - ref).abs().max() < 1e-5
    assert isinstance(m.pos_embed, torch.nn.Parameter)
    with torch.no_grad():
        y = m(torch.randn(1, 3, 384, 384))
    assert y.shape == (1, 3) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="divisible"):
        m.set_image_size(100)


def test_set_image_size_learned_without_prefix_rows(tiny_config):
    m = ViT(tiny_config(num_registers=2, pos_embed_prefix=False))
    old = m.pos_embed.detach().clone()
    m.set_image_size(24)
    ref = timm_layers.resample_abs_pos_embed(old, [6, 6], [4, 4], num_prefix_tokens=0)
    assert (m.pos_embed - ref).abs().max() < 1e-5
    with torch.no_grad():
        assert m(torch.randn(1, 3, 24, 24)).shape == (1, 5)
