"""vitkit.viz: rollout, attention distance, maps, position-embedding similarity, filter PCA,
patches, figures. Oracles: hand-computed cases, the model's own attention path, sklearn PCA,
torch cosine similarity, plain numpy slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitkit
from vitkit import viz
from vitkit.errors import InputError
from vitkit.model.pos_embed import sincos_1d


def tiny(**kw):
    cfg = dict(image_size=(16, 24), patch_size=(8, 6), in_channels=3, num_classes=5, dim=16, depth=2, num_heads=2)
    cfg.update(kw)
    torch.manual_seed(0)
    return vitkit.create_model(vitkit.ViTConfig(**cfg)).eval()


def rand_input(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return torch.randn(1, c.in_channels, *c.image_hw, generator=g)


# ----------------------------------------------------------------------------- rollout
def test_rollout_identity_attention_is_identity():
    A = [np.broadcast_to(np.eye(5), (3, 5, 5)) for _ in range(4)]  # 4 layers, 3 heads
    np.testing.assert_allclose(viz.rollout(A)[0], np.eye(5), atol=1e-12)
    np.testing.assert_allclose(viz.rollout(A, add_residual=False)[0], np.eye(5), atol=1e-12)


def test_rollout_uniform_attention():
    T = 5
    U = np.full((2, T, T), 1.0 / T)
    # without the residual: uniform in, uniform out
    np.testing.assert_allclose(viz.rollout([U, U, U], add_residual=False)[0], np.full((T, T), 1 / T), atol=1e-12)
    # with it: (U + I)/2 per layer; 2 layers = (3U + I)/4 -- uniform over every token but self
    R = viz.rollout([U, U])[0]
    np.testing.assert_allclose(R, (3 * np.full((T, T), 1 / T) + np.eye(T)) / 4, atol=1e-12)
    off = R[0, 1:]
    np.testing.assert_allclose(off, off[0])


def test_rollout_two_layer_hand_example():
    # layer 1: two heads whose mean is [[.5,.5],[0,1]]; layer 2: one head [[0,1],[.5,.5]]
    l1 = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])
    l2 = np.array([[[0.0, 1.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]])
    # A1' = rownorm(A1 + I) = [[.75,.25],[0,1]]; A2' = [[.5,.5],[.25,.75]]; R = A2' @ A1'
    expected = np.array([[0.375, 0.625], [0.1875, 0.8125]])
    R = viz.rollout([l1, l2])[0]
    np.testing.assert_allclose(R, expected, atol=1e-12)
    np.testing.assert_allclose(R.sum(-1), 1.0)
    # order matters: the reverse product is different, so this would catch A1' @ A2'
    assert not np.allclose(viz.rollout([l2, l1])[0], expected)
    # start_layer=1 keeps only layer 2
    np.testing.assert_allclose(viz.rollout([l1, l2], start_layer=1)[0], [[0.5, 0.5], [0.25, 0.75]])


def test_rollout_accepts_batched_tensors_and_rejects_bad_input():
    a = torch.softmax(torch.randn(3, 2, 4, 6, 6), -1)  # 3 layers, B=2
    R = viz.rollout(list(a))
    assert R.shape == (2, 6, 6)
    np.testing.assert_allclose(R.sum(-1), 1.0, atol=1e-9)
    np.testing.assert_allclose(R[1], viz.rollout([x[1:2] for x in a])[0], atol=1e-12)
    with pytest.raises(InputError):
        viz.rollout([])
    with pytest.raises(InputError):
        viz.rollout([np.ones((2, 3, 4))])
    with pytest.raises(InputError):
        viz.rollout(list(a), head_fusion="median")


# ----------------------------------------------------------------------------- attention distance
def _pattern(grid, target_of, R=1, prefix_mass=0.0):
    gh, gw = grid
    N = gh * gw
    A = np.zeros((1, R + N, R + N))
    A[0, :R, :R] = np.eye(R)
    for q in range(N):
        i, j = divmod(q, gw)
        ti, tj = target_of(i, j)
        A[0, R + q, R + ti * gw + tj] = 1.0 - prefix_mass
        if R:
            A[0, R + q, 0] = prefix_mass
    return A


def test_attention_distance_hand_cases():
    grid, patch = (2, 3), (4, 6)  # non-square patches: 4 px high, 6 px wide
    self_att = _pattern(grid, lambda i, j: (i, j))
    right = _pattern(grid, lambda i, j: (i, j + 1 if j + 1 < 3 else j - 1))
    down = _pattern(grid, lambda i, j: (1 - i, j), prefix_mass=0.3)  # renormalised over patches
    diag = _pattern(grid, lambda i, j: (1 - i, j + 1 if j + 1 < 3 else j - 1), R=0)
    d = viz.mean_attention_distance([self_att[None], right[None], down[None]], grid, patch, num_prefix_tokens=1)
    np.testing.assert_allclose(d[:, 0], [0.0, 6.0, 4.0], atol=1e-12)
    d = viz.mean_attention_distance([diag], grid, patch, num_prefix_tokens=0)
    np.testing.assert_allclose(d, [[np.hypot(4, 6)]])
    # uniform over a 1x2 grid of 10-px patches: each query is half on itself, half 10 px away -> 5
    u = np.full((1, 2, 2), 0.5)
    np.testing.assert_allclose(viz.mean_attention_distance([u], (1, 2), 10, num_prefix_tokens=0), [[5.0]])
    with pytest.raises(InputError):
        viz.mean_attention_distance([u], (2, 2), 10, num_prefix_tokens=0)


# ----------------------------------------------------------------------------- maps from the model's own path
def test_attention_maps_equal_model_attention():
    m = tiny()
    x = rand_input(m)
    with torch.no_grad():
        _, attns = m(x, return_attention=True)
    maps = viz.attention_maps(m, x, layers=[0, -1], heads=[1])
    gh, gw = m.config.grid_size
    for a, layer in enumerate([0, 1]):
        expect = attns[layer][0, 1, 0, 1:].reshape(gh, gw).numpy()
        np.testing.assert_allclose(maps[a, 0], expect, atol=1e-6)
    # the explicit path that returns weights gives the same logits as the fused one
    torch.testing.assert_close(m(x), m(x, return_attention=True)[0], atol=1e-5, rtol=1e-5)
    # maps depend on the image
    assert not np.allclose(maps, viz.attention_maps(m, rand_input(m, seed=7), layers=[0, -1], heads=[1]))


def test_mean_pooling_without_class_token_uses_mean_patch_query():
    m = tiny(class_token=False, pooling="mean", in_channels=1)
    assert viz.readout_query(m) == "mean"
    x = rand_input(m)
    _, attns = m(x, return_attention=True)
    maps = viz.attention_maps(m, x)
    gh, gw = m.config.grid_size
    expect = attns[1][0, 0].mean(0).reshape(gh, gw).detach().numpy()  # no prefix: all queries are patches
    np.testing.assert_allclose(maps[1, 0], expect, atol=1e-6)
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, atol=1e-5)  # rows over patches sum to 1
    r = viz.rollout_map(m, x)
    assert r.shape == (gh, gw)
    np.testing.assert_allclose(r.sum(), 1.0, atol=1e-6)


def test_register_tokens_are_excluded_and_reported():
    m = tiny(num_registers=2)
    x = rand_input(m)
    _, attns = viz.get_attentions(m, x)
    maps = viz.attention_maps(m, x)
    pre = viz.prefix_attention(m, attns)
    assert pre["names"] == ["cls", "reg0", "reg1"]
    assert maps.shape[2:] == m.config.grid_size
    # readout row = patches (overlay) + prefix (reported separately): together exactly 1
    np.testing.assert_allclose(maps.sum(axis=(2, 3)) + pre["from_readout"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(pre["from_patches"][0, 1, 2], attns[0][0, 1, 3:, 2].mean().item(), atol=1e-6)


def test_bad_layer_and_head_indices():
    m = tiny()
    x = rand_input(m)
    with pytest.raises(InputError, match="layer index 2 is out of range.*2 layers"):
        viz.attention_maps(m, x, layers=[2])
    with pytest.raises(InputError, match="head index -3"):
        viz.attention_maps(m, x, heads=[-3])
    assert viz.check_indices([-1, 0, -1], 4, "layer") == [3, 0]


def test_model_attention_distance_matches_function():
    m = tiny()
    x = rand_input(m)
    _, attns = m(x, return_attention=True)
    d = viz.model_attention_distance(m, x)
    assert d.shape == (2, 2)
    np.testing.assert_allclose(d, viz.mean_attention_distance(attns, (2, 4), (8, 6), 1))
    assert np.all(d > 0) and np.all(d < np.hypot(16, 24))


# ----------------------------------------------------------------------------- position embeddings
def test_posemb_similarity_learned_matches_cosine():
    m = tiny()
    with torch.no_grad():
        m.pos_embed.normal_()
    sim = viz.posemb_similarity(m)
    pos = m.pos_embed[0, 1:].detach()  # patch rows only
    oracle = torch.nn.functional.cosine_similarity(pos[:, None], pos[None], dim=-1).numpy()
    np.testing.assert_allclose(sim.reshape(8, 8), oracle, atol=1e-6)
    np.testing.assert_allclose(sim[1, 2, 1, 2], 1.0)


def test_posemb_similarity_sincos_and_none():
    m = tiny(pos_embed="sincos1d")  # table over all tokens incl. the class token
    sim = viz.posemb_similarity(m).reshape(8, 8)
    pe = sincos_1d(9, 16)[1:].double()
    pe = pe / pe.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(sim, (pe @ pe.T).numpy(), atol=1e-6)
    s2 = viz.posemb_similarity(tiny(pos_embed="sincos2d"))
    # 2-D table: neighbours are more similar than far positions
    assert s2[0, 0, 0, 1] > s2[0, 0, 1, 3] and s2[0, 0, 1, 0] > s2[0, 0, 1, 3]
    assert viz.posemb_similarity(tiny(pos_embed="none")) is None
    fig = viz.posemb_figure(None)
    assert "no position embedding" in fig.axes[0].texts[0].get_text()


# ----------------------------------------------------------------------------- filters
def test_embedding_filters_match_sklearn_pca():
    from sklearn.decomposition import PCA

    m = tiny(dim=32)
    comps, ratio = viz.embedding_filters(m, k=6)
    assert comps.shape == (6, 8, 6, 3)
    w = m.patch_embed.proj.weight.detach().double().numpy()  # (D, C, ph, pw)
    pca = PCA(n_components=6).fit(w.reshape(32, -1))
    ours = comps.transpose(0, 3, 1, 2).reshape(6, -1)
    for a, b in zip(ours, pca.components_):
        assert abs(abs(a @ b) - 1.0) < 1e-8  # same axis up to sign
    np.testing.assert_allclose(ratio, pca.explained_variance_ratio_, rtol=1e-8)
    with pytest.raises(InputError):
        viz.embedding_filters(m, k=0)


# ----------------------------------------------------------------------------- patches and tokens
def test_tutorial_60x100_patch20_gives_15_numbered_patches():
    img = np.random.default_rng(0).random((60, 100, 1))
    tokens = viz.patch_tokens(img, (20, 20))
    assert tokens.shape == (15, 400)
    # token 7 = row 1, column 2, flattened (row, column, channel)
    np.testing.assert_allclose(tokens[7], img[20:40, 40:60].reshape(-1), atol=1e-7)
    fig = viz.patch_grid_figure(img, (20, 20))
    labels = sorted(int(t.get_text()) for t in fig.axes[0].texts)
    assert labels == list(range(15))
    assert "15 patches" in fig.axes[0].get_title()


def test_display_image_is_what_the_model_saw():
    from PIL import Image

    m = tiny()
    m.preprocess_cfg = {"input_size": [3, 16, 24], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                        "interpolation": "bilinear", "crop_pct": 1.0}
    arr = (np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)
    x = m.preprocess(Image.fromarray(arr))
    np.testing.assert_allclose(viz.display_image(m, x), arr / 255.0, atol=1e-5)


def test_figures_do_not_touch_pyplot_state():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    m = tiny(in_channels=1)
    ex = viz.explain(m, "digits:0", heads=[0])
    assert plt.get_fignums() == before
    png = viz.to_png(ex.figures["attention"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _map_model(**kw):
    torch.manual_seed(0)
    m = vitkit.create_model(vitkit.ViTConfig(image_size=16, patch_size=8, in_channels=1, num_classes=4, dim=16,
                                             depth=2, num_heads=2, pooling="map", **kw)).eval()
    with torch.no_grad():  # a non-zero latent and keys, so the pooling weights are not uniform
        m.attn_pool.latent.normal_()
        m.attn_pool.q.weight.mul_(20)
    return m


def _pool_weights_by_hand(m, x):
    """softmax(q(latent) . k(patch tokens)^T * scale) per head from attn_pool's own parameters."""
    p, R = m.attn_pool, m.num_prefix_tokens
    with torch.no_grad():
        tokens = m.forward_features(x)[0, R:]  # (N, D): the patch tokens ViT.pool feeds the head
        H, hd = p.num_heads, p.head_dim
        q = p.q(p.latent[0]).reshape(H, hd)  # (H, hd)
        k = p.kv(tokens)[:, : H * hd].reshape(-1, H, hd).transpose(0, 1)  # (H, N, hd)
        return torch.softmax((k @ q[:, :, None])[..., 0] * p.scale, dim=-1).numpy()  # (H, N)


@pytest.mark.parametrize("class_token", [False, True])
def test_report_readout_for_map_pooling_is_the_pooling_heads_attention(class_token):
    """SigLIP-style attention pooling: the report's readout map is attn_pool's own attention over
    the patches (not the mean over patch queries), the same function explore.html uses."""
    m = _map_model(class_token=class_token, num_registers=1)
    assert viz.readout_query(m) == "map"
    ex = viz.explain(m, "digits:0")
    from vitkit.viz.report import prepare_image

    x, _ = prepare_image(m, "digits:0")
    want = _pool_weights_by_hand(m, x)  # (H, N)
    gh, gw = m.config.grid_size
    assert ex.query == "map" and ex.attention_maps.shape == (1, 2, gh, gw)
    np.testing.assert_allclose(ex.attention_maps.mean(axis=1)[0], want.mean(0).reshape(gh, gw), atol=1e-6)
    np.testing.assert_allclose(ex.attention_maps[0], want.reshape(2, gh, gw), atol=1e-6)
    mean_query = viz.attention_maps(m, x, layers=[-1], query="mean").mean(axis=1)[0]
    assert np.abs(mean_query - want.mean(0).reshape(gh, gw)).max() > 1e-3  # what the report showed before
    # one function for both pages: explore's pooling weights are the report's
    _, arrays = viz.explore_data(m, x)
    R = m.num_prefix_tokens
    np.testing.assert_allclose(arrays["pool"][:, R:].reshape(2, gh, gw), ex.attention_maps[0], atol=1e-6)
    # rollout / prefix rows: the rows mixed by the head-averaged pooling weights (explore's rule)
    w = np.concatenate([np.zeros(R), want.mean(0)])
    roll = viz.rollout(ex.attentions)[0]
    np.testing.assert_allclose(ex.rollout_map, (w @ roll)[R:].reshape(gh, gw), atol=1e-6)
    np.testing.assert_allclose(ex.prefix["from_readout"][-1, 0], (w @ ex.attentions[-1][0, 0].double().numpy())[:R],
                               atol=1e-6)
    assert "attention-pooling head" in ex.info["readout query"]
