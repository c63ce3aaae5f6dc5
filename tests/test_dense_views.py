"""Dense-feature views (vitkit.viz.dense) and explore.html's compact encoding, against answers known
by construction: features built so the PCA's first component is the foreground, a second image
that is the first with its patches permuted (the best match of every patch is its own image), the
model's own forward_intermediates for the norms, sklearn's PCA; the compact page's decoded rows
against the model's attention within the precision the page states; the report's patch-grid
numbering and weights table; and the dense modes in headless Chromium."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import vitkit
from vitkit import viz
from vitkit.viz.dense import correspondence, pca_rgb, token_norms
from vitkit.viz.explore import (
    COMPACT_LEVELS,
    SIM_TOPK,
    TOPK,
    dequantise_rows,
    explore_data,
    render_explore,
    topk_rows,
)


def _object_features(grid=(8, 10), d=12, seed=0):
    """Patch features whose largest variance is foreground vs background: a centre block of
    foreground patches at +3 u, the rest at -3 u (u a unit axis), plus small noise; inside the
    foreground a second axis v carries a ramp t (so the foreground PCA's first axis is t)."""
    rng = np.random.default_rng(seed)
    gh, gw = grid
    fg = np.zeros(grid, bool)
    fg[2:6, 3:8] = True
    fg = fg.reshape(-1)
    x = rng.normal(scale=0.05, size=(gh * gw, d))
    x[:, 0] += np.where(fg, 3.0, -3.0)
    t = np.linspace(-1, 1, fg.sum())
    x[fg, 1] += t
    return x, fg, t


def test_pca_first_component_is_the_constructed_foreground():
    x, fg, t = _object_features()
    (rgb,), (mask,), first = pca_rgb([x], [(8, 10)], foreground=True)
    np.testing.assert_array_equal(mask.reshape(-1), fg)
    assert first[fg].min() > 0.9 and first[~fg].max() < 0.1  # oriented: the border is background
    assert (rgb.reshape(-1, 3)[~fg] == 0).all()  # background black
    red = rgb.reshape(-1, 3)[fg, 0]  # the foreground PCA's first axis is the ramp (up to sign)
    assert abs(np.corrcoef(red, t)[0, 1]) > 0.99  # noise 0.05 against a ramp of std 0.58
    # the same features with the foreground on the border instead: the orientation flips
    (_,), (mask2,), _ = pca_rgb([-x], [(8, 10)], foreground=True)
    np.testing.assert_array_equal(mask2.reshape(-1), fg)


def test_pca_without_foreground_matches_sklearn():
    from sklearn.decomposition import PCA

    x = np.random.default_rng(1).normal(size=(48, 10)) * np.arange(10, 0, -1)  # distinct variances
    (rgb,), (mask,), _ = pca_rgb([x], [(6, 8)], foreground=False)
    assert mask.all()
    ref = PCA(3).fit_transform(x)
    ref = (ref - ref.min(0)) / (ref.max(0) - ref.min(0))
    got = rgb.reshape(-1, 3)
    for c in range(3):  # equal up to the sign of each axis
        assert min(np.abs(got[:, c] - ref[:, c]).max(), np.abs(got[:, c] - (1 - ref[:, c])).max()) < 1e-9


def test_joint_pca_over_two_images_splits_back():
    x, fg, _ = _object_features()
    perm = np.random.default_rng(2).permutation(len(x))
    rgbs, masks, _ = pca_rgb([x, x[perm]], [(8, 10), (8, 10)], foreground=True)
    np.testing.assert_allclose(rgbs[1].reshape(-1, 3), rgbs[0].reshape(-1, 3)[perm])
    np.testing.assert_array_equal(masks[1].reshape(-1), fg[perm])
    with pytest.raises(vitkit.InputError, match="for a 8x10 grid"):
        pca_rgb([x[:-1]], [(8, 10)])


def test_correspondence_finds_the_permuted_patch():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(30, 16))
    perm = rng.permutation(30)
    b = a[perm] * rng.uniform(0.5, 2.0, size=(30, 1))  # scaled: cosine ignores the norm
    sim, top = correspondence(a, b, k=4)
    want = np.argsort(perm)  # A patch i sits at position where perm == i in B
    np.testing.assert_array_equal(top[:, 0], want)
    np.testing.assert_allclose(sim[np.arange(30), want], 1.0, atol=1e-12)
    ref = torch.nn.functional.cosine_similarity(torch.from_numpy(a)[:, None], torch.from_numpy(b)[None], dim=-1)
    np.testing.assert_allclose(sim, ref.numpy(), atol=1e-12)
    assert (np.diff(np.take_along_axis(sim, top, 1), axis=1) <= 0).all()  # best first


def _model(**cfg):
    torch.manual_seed(0)
    m = vitkit.create_model(vitkit.ViTConfig(image_size=(24, 32), patch_size=8, in_channels=3, num_classes=5, dim=32,
                                             depth=2, num_heads=2, **cfg))
    with torch.no_grad():  # sharper attention than the init
        for b in m.blocks:
            b.attn.qkv.weight.mul_(15)
    return m.eval()


def test_token_norms_are_the_block_outputs_norms():
    m = _model(num_registers=2)
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        _, hidden = m.forward_intermediates(x, norm=False)
    want = torch.stack([h[0] for h in hidden]).norm(dim=-1).double().numpy()
    np.testing.assert_allclose(token_norms(m, x), want, rtol=1e-6)
    assert want.shape == (2, 3 + 12)


def test_topk_rows_bounds():
    rng = np.random.default_rng(4)
    a = torch.from_numpy(rng.normal(size=(5, 40)) * 3).softmax(-1).numpy()
    idx, q, s, bound = topk_rows(a, 6)
    assert idx.dtype == np.uint16 and (np.diff(idx.astype(int), axis=-1) > 0).all()
    for r in range(5):
        shipped = set(idx[r].tolist())
        assert shipped == set(np.argsort(-a[r])[:6].tolist())
        np.testing.assert_allclose(q[r] * s[r] / 255, a[r, idx[r]], atol=s[r] / 510 + 1e-7)
        rest = np.delete(a[r], idx[r])
        assert rest.max() <= bound[r] * s[r] / 255 + 1e-7  # the printed bound holds
        assert bound[r] * s[r] / 255 <= rest.max() + s[r] / 255 + 1e-7  # and is tight


def test_compact_page_rows_within_the_stated_precision():
    m = _model(num_registers=1)
    x = torch.rand(1, 3, 24, 32)
    meta, arrays = explore_data(m, x, classes=2, compare=x.flip(-1), encoding="compact")
    L, H, T = 2, 2, 2 + 12
    assert meta["encoding"] == "compact" and meta["topk"] == TOPK and "attn_q" not in arrays
    with torch.no_grad():
        _, attns = m(x, return_attention=True)
    A = torch.stack([a[0] for a in attns]).double().numpy()
    mean = A.mean(1)
    got = dequantise_rows(arrays["attnm_q"], arrays["attnm_s"], COMPACT_LEVELS)
    assert (np.abs(got - mean) <= mean.max(-1, keepdims=True) / (2 * COMPACT_LEVELS) + 1e-6).all()
    k = min(TOPK, T)  # T = 14 < TOPK: every key shipped, bound 0
    assert arrays["attn_i"].shape == (L, H, T, k) and (arrays["attn_r"] == 0).all()
    dec = np.zeros_like(A)
    np.put_along_axis(dec, arrays["attn_i"].astype(int), arrays["attn_v"] * (arrays["attn_s"][..., None] / 255), -1)
    assert (np.abs(dec - A) <= A.max(-1, keepdims=True) / 510 + 1e-6).all()
    assert arrays["sim_i"].shape == (L, T, min(SIM_TOPK, T))
    assert "precision" in meta and "4-bit" in meta["precision"]["rollout"]
    assert arrays["corr_i"].shape == (L, 12, 8) and meta["compare"]["grid"] == [3, 4]


def test_patch_grid_numbers_only_readable_grids():
    small = viz.patch_grid_figure(np.zeros((64, 64, 3)), (8, 8))  # 8x8 grid: every patch numbered
    big = viz.patch_grid_figure(np.zeros((518, 518, 3)), (14, 14))  # 37x37: no numbers in the cells
    assert len(small.axes[0].texts) == 64
    assert len(big.axes[0].texts) == 0
    labels = [t.get_text() for t in big.axes[0].get_xticklabels()]
    assert 2 <= len(labels) <= 16 and labels[0] == "0"
    assert "i * 37 + j" in big.axes[0].get_title()


def test_report_weights_row_is_a_table():
    m = _model()
    m.pretrained_info = {"format": "hf", "report": {"loaded": 3, "notes": ["a <note>", "another"]}}
    ex = viz.explain(m, torch.rand(3, 24, 32))
    html = viz.render_html(ex, {})
    row = re.search(r"<tr><td>weights</td><td>(.*?)</td></tr>\n</table>\n<h2>", html, re.S).group(1)
    assert "<table>" in row and "<td>format</td><td>hf</td>" in row and "<td>loaded</td><td>3</td>" in row
    assert "a &lt;note&gt;<br>another" in row and "{" not in row


@pytest.mark.skipif(__import__("vitkit.viz.browser", fromlist=["find_chromium"]).find_chromium() is None,
                    reason="chromium not installed (Debian: apt-get install chromium; .ci/run does it)")
def test_dense_modes_in_chromium(tmp_path):
    """The compact page in a browser: correspondence of an image with itself puts every patch's best
    match on itself (cosine 1); the foreground count and the norms' maximum are the shipped ones; a
    head's view prints its top-k bound; no console errors."""
    from vitkit.viz.browser import Page

    m = _model(num_registers=1)
    x = torch.rand(1, 3, 24, 32)
    meta, arrays = explore_data(m, x, classes=2, compare=x, encoding="compact")
    path = tmp_path / "e.html"
    path.write_text(render_explore(meta, arrays))
    ready = "document.body.dataset.ready || document.body.dataset.error || ''"
    info = "document.getElementById('info').textContent"
    with Page(path, fragment="layer=1&head=mean&patch=5&mode=correspond", width=1100, height=900) as p:
        assert p.wait_for(ready) == "1"
        text = p.evaluate(info)
        assert re.search(r"most similar B patches: 5 \(1\.000\)", text), text
        left, top, w, h = p.evaluate("(() => { const r = document.getElementById('view').getBoundingClientRect();"
                                     " return [r.left, r.top, r.width, r.height]; })()")
        p.click(left + 2.5 * w / 4, top + 1.5 * h / 3)  # row 1, column 2: patch 6
        assert p.fragment.startswith("layer=1&head=mean&patch=6&mode=correspond")
        assert re.search(r"most similar B patches: 6 \(1\.000\)", p.evaluate(info))
        assert p.evaluate("getComputedStyle(document.getElementById('viewb')).display") != "none"
        p.navigate("layer=0&head=mean&patch=cls&mode=pca-fg")
        assert p.wait_for(ready) == "1"
        n_fg = int((arrays["pca_fg"][0].astype(int).sum(-1) > 0).sum())
        assert f"{n_fg} of 12 patches foreground" in p.evaluate(info)
        assert p.evaluate("getComputedStyle(document.getElementById('viewb')).display") == "none"
        p.navigate("layer=1&head=mean&patch=cls&mode=norms")
        assert p.wait_for(ready) == "1"
        got = re.search(r"max ([\d.]+) \(patch (\d+)\)", p.evaluate(info))
        patch_norms = arrays["norms"][1, 2:]
        assert int(got.group(2)) == int(np.argmax(patch_norms))
        assert abs(float(got.group(1)) - patch_norms.max()) < 1e-3
        p.navigate("layer=1&head=1&patch=3&mode=attention")
        assert p.wait_for(ready) == "1"
        assert "tokens not shipped (all but the top 16): each at most 0.0000" in p.evaluate(info)
        assert "Precision:" in p.evaluate("document.getElementById('note').textContent")
        assert p.errors() == []
