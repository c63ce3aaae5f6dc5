"""Chefer et al. 2021 relevance (vitkit.viz.attribution) against an independent implementation of
the paper's rule written here (backward() with retain_grad on the attention tensors the model
returns, numpy for the propagation), and a sanity check on a model trained on digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitkit
from vitkit.viz.attribution import attention_with_relevance, relevance_map


def _oracle(model, x, k):
    """The paper's rule, directly: dy_k/dA by backward(), Abar = mean_h relu(grad * A),
    R <- R + Abar R from the identity. Returns R after every layer, (L, T, T)."""
    model.eval()
    logits, attns = model(x, return_attention=True)
    for a in attns:
        a.retain_grad()
    logits[0, k].backward()
    T = attns[0].shape[-1]
    R = np.eye(T)
    out = []
    for a in attns:
        g, w = a.grad[0].double().numpy(), a.detach()[0].double().numpy()
        abar = np.maximum(g * w, 0).mean(axis=0)
        R = R + abar @ R
        out.append(R.copy())
    return np.stack(out)


@pytest.mark.parametrize("cfg", [
    dict(class_token=True, pooling="cls", num_registers=0),
    dict(class_token=True, pooling="cls", num_registers=2),
    dict(class_token=False, pooling="mean", num_registers=0),
])
def test_relevance_matches_direct_autograd(cfg):
    torch.manual_seed(0)
    m = vitkit.create_model(vitkit.ViTConfig(image_size=(8, 12), patch_size=4, in_channels=1, num_classes=5, dim=16,
                                             depth=3, num_heads=2, **cfg))
    with torch.no_grad():  # sharper attention than the 0.02 init, so relevance is not ~identity
        for b in m.blocks:
            b.attn.qkv.weight.mul_(40)
    x = torch.randn(1, 1, 8, 12)
    logits, A, classes, rel = attention_with_relevance(m, x, topk=3)
    assert rel.shape == (3, 3, A.shape[-1], A.shape[-1])
    assert classes.tolist() == logits.topk(3).indices.tolist()
    for i, k in enumerate(classes):
        want = _oracle(m, x, int(k))
        np.testing.assert_allclose(rel[i], want, rtol=1e-5, atol=1e-9)
        assert np.abs(want[-1] - np.eye(want.shape[-1])).max() > 1e-3  # not the trivial identity
    # the multiplication order matters (R + R Abar is a different rule): the oracle can tell
    assert not np.allclose(rel[0], rel[1])


def test_relevance_uses_the_models_own_attention():
    torch.manual_seed(1)
    m = vitkit.create_model(vitkit.ViTConfig(image_size=8, patch_size=4, in_channels=3, num_classes=3, dim=16,
                                             depth=2, num_heads=2))
    x = torch.randn(1, 3, 8, 8)
    logits, A, _, _ = attention_with_relevance(m, x, classes=[0])
    with torch.no_grad():
        want_logits, want = m.eval()(x, return_attention=True)
    np.testing.assert_allclose(A, torch.stack([a[0] for a in want]).numpy(), atol=1e-6)
    np.testing.assert_allclose(logits.numpy(), want_logits[0].numpy(), atol=1e-5)
    assert m.training is False  # eval restored... and training mode restored when it was on:
    m.train()
    attention_with_relevance(m, x, classes=[0])
    assert m.training


def test_regression_and_featureless_models_have_no_relevance():
    m = vitkit.create_model(vitkit.ViTConfig(image_size=8, patch_size=4, in_channels=1, num_classes=0, dim=16,
                                             depth=1, num_heads=2))
    _, _, classes, rel = attention_with_relevance(m, torch.randn(1, 1, 8, 8))
    assert classes.size == 0 and rel.shape[0] == 0
    with pytest.raises(vitkit.InputError, match="classification head"):
        relevance_map(m, torch.randn(1, 1, 8, 8))


@pytest.fixture(scope="module")
def digits_model():
    """A tiny ViT trained on scikit-learn's digits for a few seconds (class token, 2x2 patches)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = (x - 0.3) / 0.4
    y = torch.from_numpy(d.target)
    torch.manual_seed(0)
    m = vitkit.create_model(vitkit.ViTConfig(image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=32,
                                             depth=2, num_heads=4, mlp_dim=64, pos_embed="sincos2d"))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    m.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small is ~10x slower on 2 threads of a busy machine
    try:
        for _ in range(200):
            idx = torch.randint(0, 1500, (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    m.eval()
    with torch.no_grad():
        acc = (m(x[1500:]).argmax(-1) == y[1500:]).float().mean().item()
    return m, x[1500:], y[1500:], acc


def test_trained_digits_maps_differ_between_classes(digits_model):
    m, x, y, acc = digits_model
    assert acc > 0.5  # (chance: 0.1) the model learned something, so its relevance means something
    diffs = []
    for i in range(5):
        xi = x[i:i + 1]
        pred = int(m(xi).argmax())
        other = (pred + 1) % 10
        a, b = relevance_map(m, xi, pred), relevance_map(m, xi, other)
        assert a.shape == (4, 4)
        a, b = a / a.sum(), b / b.sum()
        diffs.append(np.abs(a - b).sum())
    assert np.median(diffs) > 0.3, diffs  # L1 distance of the normalised maps (max 2; ~1 measured)
