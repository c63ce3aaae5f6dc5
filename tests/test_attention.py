"""Attention: fused SDPA == explicit path; softmax over the keys, scores scaled by head_dim**-0.5
before the softmax; permutation equivariance without position embeddings; the checks discriminate
against the tutorials' two mistakes."""

from __future__ import annotations

import pytest
import torch

from vitkit import ViT
from vitkit.model import Attention


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("qkv_bias,qk_scale", [(True, None), (False, 0.3)])
def test_sdpa_equals_explicit(train, qkv_bias, qk_scale):
    a = Attention(48, 6, qkv_bias=qkv_bias, qk_scale=qk_scale).train(train)
    _randomize(a)
    x = torch.randn(3, 11, 48)
    fast = a(x)
    slow, w = a(x, return_attention=True)
    assert (fast - slow).abs().max() < 1e-5
    assert w.shape == (3, 6, 11, 11)
    assert torch.allclose(w.sum(-1), torch.ones(3, 6, 11), atol=1e-5)


def _hand(a: Attention, x, scale, wrong=None):
    """Reference attention written out; ``wrong`` reproduces a tutorial mistake."""
    B, N, D = x.shape
    h, hd = a.num_heads, D // a.num_heads
    q, k, v = a.qkv(x).reshape(B, N, 3, h, hd).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-2, -1)
    if wrong == "softmax_over_queries":
        w = (s * scale).softmax(dim=-2)
    elif wrong == "scale_after_softmax":
        w = s.softmax(dim=-1) / D**0.5
    else:
        w = (s * scale).softmax(dim=-1)
    out = (w @ v).transpose(1, 2).reshape(B, N, D)
    return a.proj(out), w


def test_weights_equal_hand_computation_and_discriminate():
    a = Attention(8, 2).eval()
    _randomize(a)
    x = torch.randn(1, 4, 8) * 3
    with torch.no_grad():
        out, w = a(x, return_attention=True)
        ref_out, ref_w = _hand(a, x, 4**-0.5)
        assert torch.allclose(w, ref_w, atol=1e-6) and torch.allclose(out, ref_out, atol=1e-6)
        assert torch.allclose(a(x), ref_out, atol=1e-5)
        # a single score by hand: head 1, query 2, key 0
        q, k, _ = a.qkv(x).reshape(1, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
        scores = torch.tensor([float(q[0, 1, 2] @ k[0, 1, j]) * 0.5 for j in range(4)])
        assert abs(float(w[0, 1, 2, 0]) - float(scores.softmax(0)[0])) < 1e-6
        for wrong in ("softmax_over_queries", "scale_after_softmax"):
            bad_out, bad_w = _hand(a, x, 4**-0.5, wrong=wrong)
            assert not torch.allclose(bad_out, out, atol=1e-3), wrong
            assert not torch.allclose(bad_w.sum(-1), torch.ones(1, 2, 4), atol=1e-3), wrong  # rows no longer sum to 1


def test_qk_scale_honoured():
    a = Attention(8, 2, qk_scale=0.1).eval()
    _randomize(a)
    x = torch.randn(2, 5, 8) * 3
    with torch.no_grad():
        out, w = a(x, return_attention=True)
        ref_out, ref_w = _hand(a, x, 0.1)
        default_out, _ = _hand(a, x, 4**-0.5)
    assert torch.allclose(w, ref_w, atol=1e-6) and torch.allclose(a(x), ref_out, atol=1e-5)
    assert not torch.allclose(out, default_out, atol=1e-3)


def test_model_attention_maps_rows_sum_to_one(tiny_config):
    m = ViT(tiny_config(depth=2)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits, maps = m(x, return_attention=True)
        assert torch.allclose(logits, m(x), atol=1e-5)
    for w in maps:
        assert w.shape == (2, 4, 17, 17) and (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(2, 4, 17), atol=1e-5)


def _permute_patches(x, perm, p=4):
    """Move patch perm[i] of a 16x16 image (4x4 grid of 4x4 patches) to grid position i."""
    B, C, H, W = x.shape
    g = H // p
    patches = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C, p, p)
    patches = patches[:, perm]
    return patches.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def test_permutation_equivariance_without_pos_embed(tiny_config):
    m = ViT(tiny_config(pos_embed="none", pooling="mean", class_token=False, fc_norm=True)).eval()
    x = torch.randn(2, 3, 16, 16)
    perm = torch.randperm(16)
    xp = _permute_patches(x, perm)
    assert not torch.allclose(x, xp)
    with torch.no_grad():
        t, tp = m.forward_features(x), m.forward_features(xp)
        assert torch.allclose(tp, t[:, perm], atol=1e-5)  # tokens are permuted the same way
        assert torch.allclose(m(xp), m(x), atol=1e-5)  # the prediction does not move
    # with a learned position embedding the same permutation changes the prediction
    m2 = ViT(tiny_config(pooling="mean", class_token=False)).eval()
    with torch.no_grad():
        assert (m2(xp) - m2(x)).abs().max() > 1e-4


def test_explicit_path_dropout_applies_after_weights_returned():
    a = Attention(16, 2, attn_drop=0.5).train()
    x = torch.randn(2, 6, 16)
    out, w = a(x, return_attention=True)
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 6), atol=1e-5)  # weights reported before dropout
    a.eval()
    assert torch.allclose(a(x), a(x, return_attention=True)[0], atol=1e-5)
