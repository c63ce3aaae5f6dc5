"""vitkit's one rotary module against timm's RoPE modules (the tables, then the rotation they drive)."""

from __future__ import annotations

import pytest
import torch

from vitkit.model.rope import RotaryEmbedding, apply_rope

pe = pytest.importorskip("timm.layers.pos_embed_sincos")


@pytest.mark.parametrize("grid,offset,ref,indexing,theta", [
    ((4, 4), 0.0, (16, 16), "ij", 10000.0),  # EVA-02
    ((3, 5), 1.0, (24, 24), "xy", 10000.0),  # Perception Encoder, a non-square grid
    ((4, 6), 0.0, None, "xy", 100.0),  # RoPE-ViT axial
])
def test_axial_matches_timm_rotary_embedding_cat(grid, offset, ref, indexing, theta):
    hd = 16
    ours = RotaryEmbedding(hd, theta, variant="axial", grid_offset=offset, ref_grid=ref, indexing=indexing)
    cos, sin = ours(grid, torch.device("cpu"), torch.float32)
    timm_rope = pe.RotaryEmbeddingCat(dim=hd, temperature=theta, in_pixels=False, feat_shape=list(grid),
                                      ref_feat_shape=list(ref) if ref else None, grid_offset=offset,
                                      grid_indexing=indexing)
    t_sin, t_cos = timm_rope.get_embed().chunk(2, -1)
    torch.testing.assert_close(cos, t_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, t_sin, rtol=0, atol=1e-6)
    q, k = torch.randn(2, 3, 1 + grid[0] * grid[1], hd), torch.randn(2, 3, 1 + grid[0] * grid[1], hd)
    rq, rk = apply_rope(q, k, (cos, sin), interleaved=True)  # the class token (row 0) is not rotated
    torch.testing.assert_close(rq[:, :, 1:], pe.apply_rot_embed_cat(q[:, :, 1:], timm_rope.get_embed()))
    torch.testing.assert_close(rk[:, :, :1], k[:, :, :1], rtol=0, atol=0)


def test_mixed_matches_timm_and_its_frequencies_are_a_parameter():
    torch.manual_seed(0)
    timm_rope = pe.RotaryEmbeddingMixed(dim=32, depth=2, num_heads=2, temperature=10.0, feat_shape=[3, 4],
                                        grid_indexing="xy")
    ours = RotaryEmbedding(16, 10.0, variant="mixed", indexing="xy", depth=2, num_heads=2)
    assert [n for n, _ in ours.named_parameters()] == ["freqs"] and ours.freqs.shape == timm_rope.freqs.shape
    ours.load_state_dict(timm_rope.state_dict())
    tables = ours((3, 4), torch.device("cpu"), torch.float32)
    want = timm_rope.get_embed()  # (depth, heads, N, 2 * hd) = [sin, cos]
    for i, (cos, sin) in enumerate(tables):
        t_sin, t_cos = want[i].chunk(2, -1)
        torch.testing.assert_close(cos, t_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, t_sin, rtol=0, atol=1e-6)


def test_dinov3_tables_unchanged_by_the_variants():
    """rope='dinov3' keeps its layout: patch centres in [-1, 1], angles 2 pi * coord * f, rotate-half."""
    cos, sin = RotaryEmbedding(8, 100.0)((1, 2), torch.device("cpu"), torch.float32)
    f = torch.tensor([1.0, 100.0 ** -0.5])
    angles = torch.cat([2 * torch.pi * torch.tensor([[0.0, 0.0], [0.0, 0.0]]) * f,
                        2 * torch.pi * torch.tensor([[-0.5], [0.5]]) * f], dim=1).tile(2)
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())
