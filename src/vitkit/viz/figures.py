"""The explain figures as matplotlib Figures (Agg canvas; pyplot is never used, so no global
figure state leaks into a notebook or a long-running process).

Each ``*_figure`` function takes arrays (from :mod:`vitkit.viz.attention`, :mod:`.posemb`,
:mod:`.filters`, :mod:`.patches`) and returns a :class:`matplotlib.figure.Figure`;
:func:`to_png` renders one to PNG bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .posemb import similarity_mosaic


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _show(ax, image: np.ndarray, **kw):
    if image.ndim == 3 and image.shape[2] == 1:
        return ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, **kw)
    return ax.imshow(image, **kw)


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(gh, gw) map -> (H, W) by bilinear interpolation (torch, align_corners=False)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(grid_map, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _normalise(m: np.ndarray) -> np.ndarray:
    lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


NUMBERED_GRID = 16  # number the patches only up to a 16x16 grid: beyond, the numbers are unreadable


def patch_grid_figure(image: np.ndarray, patch_size: tuple[int, int], width: float = 6.0) -> Figure:
    """The image with the patch grid drawn and every patch numbered (row-major, from 0) while the
    grid is at most :data:`NUMBERED_GRID` patches a side; larger grids get numbered axes (every
    row / column index that is a multiple of a readable step) instead."""
    H, W = image.shape[:2]
    ph, pw = patch_size
    gh, gw = H // ph, W // pw
    fig = new_figure(width, width * H / W + 0.5)
    ax = fig.add_subplot()
    _show(ax, image, extent=(0, W, H, 0), interpolation="nearest")
    for y in range(0, H + 1, ph):
        ax.axhline(y, color="yellow", lw=0.8)
    for x in range(0, W + 1, pw):
        ax.axvline(x, color="yellow", lw=0.8)
    if max(gh, gw) <= NUMBERED_GRID:
        fontsize = max(4.0, min(12.0, 200.0 / max(gh, gw)))
        for i in range(gh):
            for j in range(gw):
                ax.text((j + 0.5) * pw, (i + 0.5) * ph, str(i * gw + j), ha="center", va="center",
                        fontsize=fontsize, color="white",
                        bbox={"boxstyle": "round,pad=0.1", "fc": "black", "alpha": 0.5, "lw": 0})
        ax.set_xticks([])
        ax.set_yticks([])
        note = "numbered row by row"
    else:
        step = -(-max(gh, gw) // NUMBERED_GRID)  # at most NUMBERED_GRID labels a side
        ax.set_xticks([(j + 0.5) * pw for j in range(0, gw, step)], [str(j) for j in range(0, gw, step)], fontsize=7)
        ax.set_yticks([(i + 0.5) * ph for i in range(0, gh, step)], [str(i) for i in range(0, gh, step)], fontsize=7)
        ax.set_xlabel("column j")
        ax.set_ylabel("row i")
        note = f"patch index = i * {gw} + j"
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_title(f"{H}x{W} image, {ph}x{pw} patches: {gh}x{gw} = {gh * gw} patches ({note})")
    return fig


def token_figure(image: np.ndarray, tokens: np.ndarray, patch_size: tuple[int, int], index: int = 0) -> Figure:
    """One patch, its flattened token strip (length ph*pw*C), and the (N, ph*pw*C) token matrix."""
    ph, pw = patch_size
    C = image.shape[2]
    gw = image.shape[1] // pw
    i, j = divmod(index, gw)
    patch = image[i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
    fig = new_figure(9, 6)
    gs = fig.add_gridspec(3, 2, height_ratios=[1.2, 0.35, 2.5], width_ratios=[1, 3])
    ax = fig.add_subplot(gs[0, 0])
    _show(ax, patch, interpolation="nearest")
    ax.set_title(f"patch {index} ({ph}x{pw}x{C})", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax = fig.add_subplot(gs[0, 1])
    ax.axis("off")
    ax.text(0, 0.5, f"flattened in (row, column, channel) order\n-> a token of {ph}*{pw}*{C} = {tokens.shape[1]} "
            f"values\nall {tokens.shape[0]} patches -> a {tokens.shape[0]} x {tokens.shape[1]} matrix",
            va="center", fontsize=10)
    ax = fig.add_subplot(gs[1, :])
    ax.imshow(tokens[index][None], aspect="auto", cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([])
    ax.set_title(f"token strip of patch {index} (length {tokens.shape[1]})", fontsize=9)
    ax = fig.add_subplot(gs[2, :])
    ax.imshow(tokens, aspect="auto", cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axhline(index, color="red", lw=1, alpha=0.7)
    ax.set_xlabel("value index within the token")
    ax.set_ylabel("patch / token index")
    ax.set_title(f"all tokens: {tokens.shape[0]} x {tokens.shape[1]}", fontsize=9)
    return fig


def filters_figure(components: np.ndarray, ratio: np.ndarray | None = None, cols: int = 7) -> Figure:
    """Principal components of the patch-embedding filters, each as a (ph, pw[, C]) image."""
    k = components.shape[0]
    cols = min(cols, k)
    rows = -(-k // cols)
    fig = new_figure(1.3 * cols, 1.3 * rows + 0.6)
    fig.suptitle(f"first {k} principal components of the patch-embedding filters")
    for n in range(k):
        ax = fig.add_subplot(rows, cols, n + 1)
        c = _normalise(components[n])
        if c.shape[2] == 3:
            ax.imshow(c, interpolation="nearest")
        else:
            ax.imshow(c.mean(axis=2), cmap="gray", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if ratio is not None:
            ax.set_title(f"PC{n + 1} {100 * ratio[n]:.1f}%", fontsize=7)
    return fig


def posemb_figure(sim: np.ndarray | None, note: str = "") -> Figure:
    """Position-embedding similarity: tile (i, j) shows cos(pos(i, j), pos(., .)) on the grid."""
    if sim is None:
        fig = new_figure(6, 1.5)
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, note or "this model has no position embedding (pos_embed='none')",
                ha="center", va="center")
        return fig
    gh, gw = sim.shape[:2]
    mosaic = similarity_mosaic(sim)
    h = 6.0 * mosaic.shape[0] / mosaic.shape[1]
    fig = new_figure(7, max(2.0, h + 0.6))
    ax = fig.add_subplot()
    lo = float(np.nanmin(mosaic))
    lo = lo if lo < 0.999 else 0.0  # colour range from the table's own minimum: sin/cos tables on
    im = ax.imshow(mosaic, cmap="viridis", vmin=lo, vmax=1, interpolation="nearest")  # small grids stay > 0.8
    ax.set_xticks([(j + 0.5) * (gw + 1) - 1 for j in range(gw)], [str(j) for j in range(gw)], fontsize=6)
    ax.set_yticks([(i + 0.5) * (gh + 1) - 1 for i in range(gh)], [str(i) for i in range(gh)], fontsize=6)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title("position-embedding cosine similarity" + (f" ({note})" if note else ""))
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
    return fig


def attention_figure(image: np.ndarray, maps: np.ndarray, layers: Sequence[int | str], heads: Sequence[int],
                     query: str = "cls") -> Figure:
    """Readout-query attention per (layer, head), upsampled to the image and overlaid."""
    H, W = image.shape[:2]
    L, nh = maps.shape[:2]
    cell = 1.6
    fig = new_figure(cell * nh * max(W / H, 0.5) + 0.5, cell * L + 0.7)
    who = {"cls": "class token", "map": "pooling query"}.get(query, "mean patch query")
    fig.suptitle(f"{who} -> patches (each panel normalised)", fontsize=9)
    for a, layer in enumerate(layers):
        for b, head in enumerate(heads):
            ax = fig.add_subplot(L, nh, a * nh + b + 1)
            _show(ax, image)
            ax.imshow(_normalise(upsample(maps[a, b], (H, W))), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if a == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if b == 0:
                ax.set_ylabel(f"layer {layer}" if isinstance(layer, int) else str(layer), fontsize=8)
    return fig


def rollout_figure(image: np.ndarray, rmap: np.ndarray, query: str = "cls") -> Figure:
    """Attention rollout map of the readout query, upsampled and overlaid, next to the raw map."""
    H, W = image.shape[:2]
    fig = new_figure(9, 4.5 * H / W + 0.8)
    ax = fig.add_subplot(1, 2, 1)
    _show(ax, image)
    ax.imshow(_normalise(upsample(rmap, (H, W))), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    ax.set_title("attention rollout (overlay)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax = fig.add_subplot(1, 2, 2)
    im = ax.imshow(rmap, cmap="viridis", interpolation="nearest")
    who = {"cls": "class token", "map": "pooling-weighted rows"}.get(query, "mean patch query")
    ax.set_title(f"rollout of the {who} on the patch grid", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def distance_figure(dist: np.ndarray, image_size: tuple[int, int]) -> Figure:
    """Mean attention distance (pixels) of every head against network depth (paper Fig. 7 right)."""
    L, nh = dist.shape
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    for h in range(nh):
        ax.scatter(np.arange(L), dist[:, h], s=18, label=f"head {h}" if nh <= 16 else None)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(np.arange(L))
    diag = float(np.hypot(*image_size))
    ax.set_ylim(0, max(diag / 2, float(np.nanmax(dist)) * 1.1 if dist.size else 1))
    ax.set_title("mean attention distance per head")
    if nh <= 16:
        ax.legend(fontsize=6, ncols=2)
    return fig


def predictions_figure(names: Sequence[str], values: Sequence[float], regression: bool = False) -> Figure:
    """Top-k class probabilities (or the regression outputs) as horizontal bars."""
    n = len(values)
    fig = new_figure(6, 0.4 * n + 1.2)
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]
    ax.barh(y, values, color="tab:blue")
    ax.set_yticks(y, list(names))
    if regression:
        ax.set_xlabel("output value")
        ax.set_title("regression outputs")
    else:
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability")
        ax.set_title(f"top-{n} predictions")
        for yy, v in zip(y, values):
            ax.text(min(v + 0.01, 0.85), yy, f"{v:.3f}", va="center", fontsize=8)
    return fig


def pca_figure(images: Sequence[np.ndarray], rgbs: Sequence[np.ndarray], rgbs_fg: Sequence[np.ndarray] | None = None,
               layer: int | str = "last") -> Figure:
    """Per image: the image, the PCA of its patch features as RGB, and (optionally) the
    foreground-only PCA (background black). ``rgbs``: (gh, gw, 3) in [0, 1] each."""
    cols = 3 if rgbs_fg is not None else 2
    n = len(images)
    H, W = images[0].shape[:2]
    fig = new_figure(3.2 * cols, 3.2 * n * H / W + 0.6)
    for r, image in enumerate(images):
        panels = [(image, "image"), (rgbs[r], f"PCA to RGB (layer {layer})")]
        if rgbs_fg is not None:
            panels.append((rgbs_fg[r], "foreground PCA"))
        for c, (a, title) in enumerate(panels):
            ax = fig.add_subplot(n, cols, r * cols + c + 1)
            _show(ax, a, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    return fig


def norms_figure(norms: np.ndarray, grid: tuple[int, int], prefix: Sequence[str], layer: int | str = "last") -> Figure:
    """Token norms at one layer: the patch norms on the grid, and every token's norm as a bar
    (prefix tokens, e.g. registers, first and labelled)."""
    R = len(prefix)
    fig = new_figure(9, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    im = ax.imshow(norms[R:].reshape(grid), cmap="magma", interpolation="nearest")
    ax.set_title(f"patch-token norms, layer {layer}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax = fig.add_subplot(1, 2, 2)
    ax.hist(norms[R:], bins=40, color="#3b528b")
    for i, name in enumerate(prefix):
        ax.axvline(norms[i], color=f"C{i + 1}", lw=1.5, label=f"{name} {norms[i]:.1f}")
    if R:
        ax.legend(fontsize=7)
    ax.set_xlabel("L2 norm")
    ax.set_ylabel("patches")
    ax.set_title("distribution (prefix tokens as lines)", fontsize=9)
    return fig


def correspondence_figure(image_a: np.ndarray, image_b: np.ndarray, grid_a: tuple[int, int], grid_b: tuple[int, int],
                          queries: Sequence[int], top: np.ndarray, layer: int | str = "last") -> Figure:
    """Chosen patches of image A (numbered markers) and, in image B, each one's most similar patch
    (same marker) plus its next matches (small dots). ``top``: (Na, k) B indices, best first."""
    fig = new_figure(9, 4.6)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for ax, image, title in zip(axes, (image_a, image_b), ("image A: query patches", f"image B: matches (layer {layer})")):
        _show(ax, image)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)

    def centre(p, grid, image):
        gh, gw = grid
        i, j = divmod(int(p), gw)
        return (j + 0.5) * image.shape[1] / gw, (i + 0.5) * image.shape[0] / gh

    for n, q in enumerate(queries):
        colour = f"C{n % 10}"
        axes[0].plot(*centre(q, grid_a, image_a), "o", ms=10, mfc=colour, mec="white")
        axes[0].annotate(str(n), centre(q, grid_a, image_a), color="white", ha="center", va="center", fontsize=7)
        for rank, b in enumerate(top[q]):
            axes[1].plot(*centre(b, grid_b, image_b), "o", ms=10 if rank == 0 else 4, mfc=colour, mec="white")
        axes[1].annotate(str(n), centre(top[q][0], grid_b, image_b), color="white", ha="center", va="center", fontsize=7)
    return fig
