"""Google JAX .npz checkpoints in both layouts (vision_transformer and big_vision, stacked
blocks), written from a model's weights and loaded back exactly; plus an independent NumPy
forward pass of the vision_transformer layout as an oracle for the axis conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitkit
from test_interop_common import max_diff, tiny
from vitkit.interop.jax import export_npz


@pytest.mark.parametrize("kw", [
    dict(),
    dict(head_hidden_dim=24),  # pre_logits
    dict(qkv_bias=False, patch_size=16, image_size=64),
    dict(image_size=(32, 48), num_classes=3),
])
def test_vision_transformer_layout_roundtrip(kw, tmp_path):
    model = tiny(act="gelu_tanh", **kw)
    path = export_npz(model, tmp_path / "vt.npz", layout="vision_transformer")
    keys = set(np.load(path).files)
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in keys
    back = vitkit.from_pretrained(path, image_size=model.config.image_size)  # size hint for non-square grids
    assert back.config.act == "gelu_tanh"  # flax nn.gelu is the tanh approximation
    assert back.config.num_heads == model.config.num_heads  # heads are read from the kernel shape
    x = torch.randn(2, 3, *model.config.image_hw)
    with torch.no_grad():
        assert max_diff(back(x), model(x)) <= 1e-5
    assert back.pretrained_info["layout"] == "vision_transformer"
    assert back.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("kw", [dict(), dict(class_token=False, pooling="mean")])
def test_big_vision_layout_roundtrip(kw, tmp_path):
    model = tiny(act="gelu_tanh", pos_embed_prefix=False, **kw)  # big_vision: no position row for cls
    path = export_npz(model, tmp_path / "bv.npz", layout="big_vision")
    f = np.load(path)
    assert f["params/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (2, 32, 128)  # depth axis
    assert "params/pos_embedding" in f.files
    back = vitkit.from_pretrained(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(back(x), model(x)) <= 1e-5
    assert back.pretrained_info["layout"] == "big_vision" and back.pretrained_info["stacked"]


def test_jax_exact_gelu_override(tmp_path):
    """act='gelu' loads the same file the way the timm/HF ports run it; it differs from tanh GELU."""
    model = tiny(act="gelu")
    path = export_npz(model, tmp_path / "vt.npz")
    exact = vitkit.from_pretrained(path, act="gelu")
    tanh = vitkit.from_pretrained(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(exact(x), model(x)) <= 1e-5
        assert max_diff(tanh(x), model(x)) > 1e-6


def _numpy_forward(w: dict, x: np.ndarray, heads: int) -> np.ndarray:
    """The vision_transformer Flax model written out in NumPy (NHWC conv, einsum attention)."""
    from math import erf, sqrt  # noqa: F401

    k = w["embedding/kernel"]  # (ph, pw, C, D)
    ph, pw, C, D = k.shape
    B, _, H, W = x.shape
    xh = x.transpose(0, 2, 3, 1).reshape(B, H // ph, ph, W // pw, pw, C).transpose(0, 1, 3, 2, 4, 5)
    tok = np.einsum("bhwpqc,pqcd->bhwd", xh, k).reshape(B, -1, D) + w["embedding/bias"]
    tok = np.concatenate([np.broadcast_to(w["cls"], (B, 1, D)), tok], 1) + w["Transformer/posembed_input/pos_embedding"]

    def ln(t, p):
        mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + 1e-6) * w[p + "/scale"] + w[p + "/bias"]

    def gelu_tanh(t):
        return 0.5 * t * (1 + np.tanh(np.sqrt(2 / np.pi) * (t + 0.044715 * t**3)))

    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        b = f"Transformer/encoderblock_{i}/"
        m = b + "MultiHeadDotProductAttention_1/"
        y = ln(tok, b + "LayerNorm_0")
        q, kk, v = (np.einsum("btd,dhk->bthk", y, w[m + n + "/kernel"]) + w[m + n + "/bias"]
                    for n in ("query", "key", "value"))
        s = np.einsum("bqhk,bthk->bhqt", q, kk) / np.sqrt(q.shape[-1])
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("bhqt,bthk->bqhk", a, v)
        tok = tok + np.einsum("bqhk,hkd->bqd", o, w[m + "out/kernel"]) + w[m + "out/bias"]
        y = ln(tok, b + "LayerNorm_2")
        y = gelu_tanh(y @ w[b + "MlpBlock_3/Dense_0/kernel"] + w[b + "MlpBlock_3/Dense_0/bias"])
        tok = tok + y @ w[b + "MlpBlock_3/Dense_1/kernel"] + w[b + "MlpBlock_3/Dense_1/bias"]
        i += 1
    cls = ln(tok, "Transformer/encoder_norm")[:, 0]
    return cls @ w["head/kernel"] + w["head/bias"]


def test_jax_layout_against_numpy_oracle(tmp_path):
    """Write a random npz directly in the JAX axis conventions (not via vitkit), load it, and compare
    with an independent NumPy implementation of the Flax model."""
    rng = np.random.default_rng(0)
    D, Hh, hd, C, P, K, M = 32, 4, 8, 3, 8, 5, 64
    r = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
    w = {"embedding/kernel": r(P, P, C, D), "embedding/bias": r(D), "cls": r(1, 1, D),
         "Transformer/posembed_input/pos_embedding": r(1, 1 + 16, D),
         "Transformer/encoder_norm/scale": 1 + r(D), "Transformer/encoder_norm/bias": r(D),
         "head/kernel": r(D, K), "head/bias": r(K)}
    for i in range(2):
        b = f"Transformer/encoderblock_{i}/"
        m = b + "MultiHeadDotProductAttention_1/"
        for n in ("query", "key", "value"):
            w[m + n + "/kernel"], w[m + n + "/bias"] = r(D, Hh, hd), r(Hh, hd)
        w[m + "out/kernel"], w[m + "out/bias"] = r(Hh, hd, D), r(D)
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            w[b + ln + "/scale"], w[b + ln + "/bias"] = 1 + r(D), r(D)
        w[b + "MlpBlock_3/Dense_0/kernel"], w[b + "MlpBlock_3/Dense_0/bias"] = r(D, M), r(M)
        w[b + "MlpBlock_3/Dense_1/kernel"], w[b + "MlpBlock_3/Dense_1/bias"] = r(M, D), r(D)
    np.savez(tmp_path / "ref.npz", **w)
    model = vitkit.from_pretrained(tmp_path / "ref.npz")
    x = rng.normal(size=(2, C, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    ref = _numpy_forward(w, x.astype(np.float64), Hh)
    assert np.abs(ours - ref).max() <= 1e-4  # float32 model vs float64 oracle
    assert model.config.num_heads == 4


def test_npz_with_object_arrays_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", **{"embedding/kernel": np.array([object()], dtype=object)})
    with pytest.raises(vitkit.CheckpointError, match="NumPy"):
        vitkit.from_pretrained(tmp_path / "evil.npz")


@pytest.mark.parametrize("size,pooling", [(48, "cls"), (24, "cls"), ((32, 48), "mean")])
def test_vision_transformer_npz_at_another_size_resamples_as_the_original(size, pooling, tmp_path):
    """google-research/vision_transformer resizes the table with scipy.ndimage.zoom(order=1) of the
    grid (class row kept): the oracle is scipy itself on the npz's own array. timm's interpolation
    (the default before) gives other numbers."""
    from scipy import ndimage

    kw = dict(class_token=False, pooling="mean") if pooling == "mean" else {}
    model = tiny(act="gelu_tanh", **kw)
    with torch.no_grad():
        model.pos_embed.normal_()
    path = export_npz(model, tmp_path / "vt.npz", layout="vision_transformer")
    table = np.load(path)["Transformer/posembed_input/pos_embedding"]  # (1, R + 4*4, 64)
    R = 1 if pooling == "cls" else 0
    new = (size, size) if isinstance(size, int) else size
    grid = (new[0] // 8, new[1] // 8)
    zoomed = ndimage.zoom(table[0, R:].reshape(4, 4, -1), (grid[0] / 4, grid[1] / 4, 1), order=1)
    want = np.concatenate([table[:, :R], zoomed.reshape(1, grid[0] * grid[1], -1)], axis=1)
    back = vitkit.from_pretrained(path, image_size=size)
    assert back.config.pos_resample == "vit_jax"
    got = back.pos_embed.detach().numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    timm_way = vitkit.from_pretrained(path, image_size=size, pos_resample="timm").pos_embed.detach().numpy()
    assert np.abs(timm_way - want).max() > 1e-3
