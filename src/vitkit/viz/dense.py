"""Dense-feature views: what people look at when they load DINOv2/DINOv3, from the tokens
``model.forward_intermediates`` returns (one path for every family).

* :func:`pca_rgb`: PCA of the patch features to RGB (DINOv2 paper, Figure 1), over one image or
  jointly over several. With ``foreground=True`` it follows DINOv2's README recipe: a first PCA over
  all patches, the first component min-max scaled to [0, 1] and thresholded to separate the
  foreground, then a second PCA over the foreground patches only, its first three components as
  RGB (background black). The first component's sign is arbitrary; it is oriented so that the
  image border (mostly background in object photos) has the low values.
* :func:`correspondence`: cosine similarity of every patch of image A to every patch of image B
  at one layer, and each A patch's ``k`` most similar B patches.
* :func:`token_norms`: the L2 norm of every token output by every block (before the final norm),
  which shows the high-norm artefact tokens of register-free ViTs (Darcet et al. 2024, "Vision
  Transformers Need Registers"); prefix tokens (class, registers) are reported separately.

Maps are numpy arrays; :mod:`vitkit.viz.figures` draws them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError


def block_tokens(model, x: torch.Tensor, norm: bool = True) -> np.ndarray:
    """Every block's output tokens for the first image of ``x``: (L, T, D) float64.

    ``norm=True`` applies the final norm (DINOv2's ``x_norm_patchtokens`` at the last layer)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, hidden = model.forward_intermediates(x[:1].to(next(model.parameters()).device), norm=norm)
    finally:
        model.train(was_training)
    return torch.stack([h[0].double().cpu() for h in hidden]).numpy()


def _pca(x: np.ndarray, k: int) -> np.ndarray:
    """(N, D) -> (N, k) projections on the top-k principal axes; each axis' sign fixed so its
    largest-magnitude loading is positive (SVD signs are otherwise arbitrary)."""
    xc = x - x.mean(0)
    # eigenvectors of the (D, D) scatter matrix: the principal axes, much faster than an SVD of
    # (N, D) when N >> D (1,369 patches of 384 features: 20 ms against 0.4 s)
    w, v = np.linalg.eigh(xc.T @ xc)
    vt = v[:, ::-1][:, :min(k, len(xc))].T  # (k, D), largest variance first
    vt = vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
    out = xc @ vt.T
    if out.shape[1] < k:  # fewer samples or dimensions than components
        out = np.pad(out, ((0, 0), (0, k - out.shape[1])))
    return out


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = a.min(0), a.max(0)
    return (a - lo) / np.where(hi > lo, hi - lo, 1.0)


def _border(grid: tuple[int, int]) -> np.ndarray:
    gh, gw = grid
    b = np.zeros((gh, gw), bool)
    b[0], b[-1], b[:, 0], b[:, -1] = True, True, True, True
    return b.reshape(-1)


def pca_views(features: Sequence[np.ndarray], grids: Sequence[tuple[int, int]], threshold: float = 0.5
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both PCA views over the concatenated patches (N, D): ``(rgb_all (N, 3), rgb_fg (N, 3),
    fg (N,), first (N,))``; see :func:`pca_rgb`."""
    if len(features) != len(grids) or not features:
        raise InputError(f"pca_rgb needs one grid per feature array, got {len(features)} arrays and {len(grids)} grids")
    for f, (gh, gw) in zip(features, grids):
        if f.ndim != 2 or f.shape[0] != gh * gw:
            raise InputError(f"expected ({gh * gw}, D) patch features for a {gh}x{gw} grid, got {tuple(f.shape)}")
    x = np.concatenate([np.asarray(f, np.float64) for f in features])
    comps = _pca(x, 3)
    first = _minmax(comps[:, :1])[:, 0]
    border = np.concatenate([_border(g) for g in grids])
    if first[border].mean() > first.mean():  # background (the border) gets the low values
        first = 1.0 - first
    fg = first > threshold
    rgb_fg = np.zeros((len(x), 3))
    if fg.any():
        rgb_fg[fg] = _minmax(_pca(x[fg], 3))
    return _minmax(comps), rgb_fg, fg, first


def pca_rgb(features: Sequence[np.ndarray], grids: Sequence[tuple[int, int]], foreground: bool = True,
            threshold: float = 0.5) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """PCA of patch features to RGB, jointly over the images.

    ``features``: per image (N_i, D) patch features (no prefix tokens); ``grids``: per image
    (gh, gw) with gh * gw = N_i. Returns ``(rgb, fg, first)``: per image (gh, gw, 3) colours in
    [0, 1], (gh, gw) foreground masks (all True with ``foreground=False``), and the first
    component over all patches, min-max scaled and oriented (the value that was thresholded)."""
    rgb_all, rgb_fg, fg, first = pca_views(features, grids, threshold)
    rgb = rgb_fg if foreground else rgb_all
    if not foreground:
        fg = np.ones_like(fg)
    cuts = np.cumsum([f.shape[0] for f in features])[:-1]
    return ([r.reshape(*g, 3) for r, g in zip(np.split(rgb, cuts), grids)],
            [m.reshape(g) for m, g in zip(np.split(fg, cuts), grids)], first)


def correspondence(a: np.ndarray, b: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Patch features of image A (Na, D) and B (Nb, D) -> (cosine (Na, Nb), top-k B indices (Na, k),
    most similar first)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"expected (Na, D) and (Nb, D) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    sim = an @ bn.T
    k = min(k, b.shape[0])
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < b.shape[0] else np.argsort(-sim, axis=1)
    order = np.argsort(-np.take_along_axis(sim, part, 1), axis=1, kind="stable")
    return sim, np.take_along_axis(part, order, 1)


def token_norms(model, x: torch.Tensor) -> np.ndarray:
    """(L, T) L2 norms of the tokens each block outputs (before the final norm), first image."""
    return np.linalg.norm(block_tokens(model, x, norm=False), axis=-1)
