"""``vitkit explain`` end to end: one image through one model -> arrays, figures, an HTML report.

:func:`explain` runs the model once on the preprocessed image (its own attention path) and
collects every map; :func:`write_report` writes each figure as a PNG and one self-contained
``report.html`` (PNG bytes embedded as base64 data URIs, no external resources, opens offline).
The page's small script decodes every image and records the result on ``<body data-decoded=...>``,
so a headless browser can check it (see tests/test_report_browser.py).
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..errors import InputError
from . import figures as F
from .attention import (
    _query_rows,
    check_indices,
    get_attentions,
    mean_attention_distance,
    pool_attention,
    prefix_attention,
    readout_maps,
    readout_query,
    rollout,
)
from .filters import embedding_filters
from .patches import display_image, patch_tokens, sized_to_input
from .posemb import posemb_similarity

# (key, title, caption) in report order
SECTIONS = [
    ("patches", "1. Patches", "The image as the model saw it (after resize/crop), cut into patches, "
     "numbered row by row (up to a 16x16 grid; larger grids number the rows and columns)."),
    ("tokens", "2. Tokens", "One patch flattened into its token strip, and all patches stacked into the "
     "token matrix that the patch embedding multiplies by one learned matrix."),
    ("filters", "3. Patch-embedding filters", "The first principal components of the embedding "
     "filters (paper, Figure 7 left)."),
    ("posemb", "4. Position-embedding similarity", "Tile (row, column) shows the cosine similarity of "
     "that position's embedding to every other position (paper, Figure 7 centre)."),
    ("attention", "5. Attention maps", "Attention weights of the readout query over the patches, per "
     "layer and head, upsampled and overlaid. Register tokens are excluded (see the table below)."),
    ("rollout", "6. Attention rollout", "Abnar &amp; Zuidema (2020): average the heads, add the identity for "
     "the residual, renormalise rows, multiply across layers."),
    ("distance", "7. Mean attention distance", "Attention-weighted distance in pixels between query and "
     "key patches, per head, against depth (paper, Figure 7 right)."),
    ("predictions", "8. Predictions", "What the model outputs for this image."),
    ("pca", "9. Dense features: PCA", "PCA of the last block's patch features (after the final norm) to RGB "
     "(DINOv2 paper, Figure 1), and the foreground PCA of DINOv2's README: the first component, min-max "
     "scaled and oriented so the image border is low, thresholded at 0.5; a second PCA over the foreground "
     "patches only, background black. With a compared image the PCA is fitted jointly over both."),
    ("norms", "10. Dense features: token norms", "L2 norm of every token output by the last block (before the "
     "final norm). Register-free ViTs grow a few high-norm artefact tokens (Darcet et al. 2024, \"Vision "
     "Transformers Need Registers\"); prefix tokens (class, registers) are drawn as lines."),
    ("correspondence", "11. Dense features: correspondence", "Patches spread over image A's foreground and "
     "their most similar patches in image B: cosine of the final-normed patch tokens at the last layer "
     "(large marker: the best match; dots: the next ones)."),
]


READOUT_NAMES = {"cls": "class token", "mean": "mean of patch queries",
                 "map": "attention-pooling head (its own weights; rollout mixes the rows by them)"}


@dataclass
class Explanation:
    """Everything ``vitkit explain`` computes for one image (arrays are numpy, first image only)."""

    image: np.ndarray  # (H, W, C) in [0, 1], what the model saw
    tokens: np.ndarray  # (N, ph*pw*C) raw patch tokens
    layers: list[int]
    heads: list[int]
    query: str  # "cls", "mean" or "map" (attention pooling; see vitkit.viz.readout_query)
    attentions: list[torch.Tensor]  # per layer (1, heads, T, T), from model(x, return_attention=True)
    attention_maps: np.ndarray  # (len(layers), len(heads), gh, gw); map: (1, len(heads), gh, gw), the pooling head's
    rollout_map: np.ndarray  # (gh, gw)
    distance: np.ndarray  # (depth, heads) pixels
    posemb: np.ndarray | None  # (gh, gw, gh, gw) or None
    filters: np.ndarray  # (k, ph, pw, C)
    filters_ratio: np.ndarray  # (k,)
    prefix: dict[str, Any]  # prefix_attention(...)
    predictions: list[tuple[str, float]]
    regression: bool
    walkthrough: str
    info: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    # dense-feature views (vitkit.viz.dense), last layer: "pca" / "pca_fg" (gh, gw, 3) per image,
    # "norms" (T,), and with a compared image "image_b", "grid_b", "queries", "top" (Na, k)
    dense: dict[str, Any] = field(default_factory=dict)


def prepare_image(model, image) -> tuple[torch.Tensor, dict[str, Any]]:
    """A path / built-in spec / PIL image -> the model's input (1, C, H, W) via ``model.preprocess``."""
    from PIL import Image

    from ..data.image import load_image

    C = model.config.in_channels
    info: dict[str, Any] = {}
    if isinstance(image, (str, Path)):
        info["source"] = str(image)
        image = load_image(image, mode="L" if C == 1 else "RGB")
    if isinstance(image, Image.Image):
        info["original_size"] = f"{image.size[0]}x{image.size[1]} {image.mode}"
        if C == 1 and image.mode != "L":
            image = image.convert("L")
        elif C == 3 and image.mode != "RGB":
            image = image.convert("RGB")
        x = model.preprocess(image)
    elif isinstance(image, torch.Tensor):
        x = image
        if x.ndim == 4:
            x = x[0]
    else:
        raise InputError(f"expected an image path, a PIL image or a (C, H, W) tensor, got {type(image).__name__}")
    if x.shape[0] != C:
        raise InputError(f"the image has {x.shape[0]} channel(s) after preprocessing, the model expects {C}")
    return x[None].float(), info


def _predictions(model, logits: torch.Tensor, topk: int) -> tuple[list[tuple[str, float]], bool]:
    c = model.config
    out = logits[0].detach().float().cpu()
    if c.num_classes == 0:
        return [], False
    if c.task == "regression":
        from ..interop.labels import output_names

        return list(zip(output_names(model), (float(v) for v in out))), True
    p = out.softmax(-1)
    k = min(topk, p.numel())
    vals, idx = p.topk(k)
    labels = model.labels
    names = [labels[i] if labels and i < len(labels) else f"class {i}" for i in idx.tolist()]
    return list(zip(names, vals.tolist())), False


def default_layers(depth: int) -> list[int]:
    """First, middle and last layer."""
    return sorted({0, depth // 2, depth - 1})


def dense_views(model, x: torch.Tensor, compare: torch.Tensor | None = None, queries: int = 4) -> dict[str, Any]:
    """The report's dense-feature views at the last layer (see :mod:`vitkit.viz.dense`): PCA (jointly
    with ``compare`` when given), token norms, and the correspondence of ``queries`` patches spread
    over image A's foreground (in patch order) to their best matches in ``compare``. (Not the most
    attended patches: in register-free ViTs those are the high-norm artefact tokens.)"""
    from .dense import block_tokens, correspondence, pca_rgb, pca_views, token_norms

    R = model.num_prefix_tokens
    grid = tuple(model.grid_size)
    fa = block_tokens(model, x, norm=True)[-1, R:]
    feats, grids = [fa], [grid]
    out: dict[str, Any] = {"norms": token_norms(model, x)[-1]}
    if compare is not None:
        fb = block_tokens(model, compare, norm=True)[-1, R:]
        feats.append(fb)
        grids.append(tuple(model.patch_embed.grid_for(compare)))
        _, top = correspondence(fa, fb, k=5)
        fg = np.flatnonzero(pca_views([fa], [grid])[2])
        fg = fg if len(fg) else np.arange(len(fa))
        pick = fg[np.linspace(0, len(fg) - 1, queries + 2).round().astype(int)[1:-1]]
        out.update(image_b=display_image(model, compare), grid_b=grids[1], top=top, queries=[int(q) for q in pick])
    out["pca"] = pca_rgb(feats, grids, foreground=False)[0]
    out["pca_fg"] = pca_rgb(feats, grids, foreground=True)[0]
    return out


def explain(model, image, layers=None, heads=None, topk: int = 5, filters: int = 28,
            token_index: int | None = None, compare=None) -> Explanation:
    """Run ``model`` on ``image`` once and compute every map and figure of the report
    (``compare``: a second image for the correspondence view and the joint PCA)."""
    from ..summary import walkthrough

    model.eval()
    x, info = prepare_image(model, image)
    model = sized_to_input(model, x)
    c = model.config
    layers = check_indices(default_layers(c.depth) if layers is None else layers, c.depth, "layer")
    heads = check_indices(heads, c.num_heads, "head")
    x = x.to(next(model.parameters()).device)
    logits, attns = get_attentions(model, x)
    attns = [a[:1].detach().cpu() for a in attns]
    R = c.num_prefix_tokens
    gh, gw = c.grid_size
    query = readout_query(model)
    pool = pool_attention(model, x)  # (heads, T) for attention pooling, else None
    A = np.stack([a[0].double().numpy() for a in attns])  # (depth, heads, T, T)
    maps = readout_maps(model, A, layers, heads, query, pool)
    rmap = _query_rows(rollout(attns)[0], query, R, pool)[R:].reshape(gh, gw)
    dist = mean_attention_distance(attns, (gh, gw), c.patch_hw, R)
    img = display_image(model, x)
    tokens = patch_tokens(img, c.patch_hw)
    if token_index is None:
        token_index = int(np.argmax(maps.mean(axis=(0, 1))))  # most-attended patch
    if not 0 <= token_index < c.num_patches:
        raise InputError(f"token index {token_index} out of range 0..{c.num_patches - 1}")
    comps, ratio = embedding_filters(model, filters)
    preds, regression = _predictions(model, logits, topk)
    with torch.no_grad():
        walk = walkthrough(model, x[0], labels=model.labels)
    info.update({"model": c.name or "vit", "image_size": f"{c.image_hw[0]}x{c.image_hw[1]}",
                 "patch_size": f"{c.patch_hw[0]}x{c.patch_hw[1]}", "grid": f"{gh}x{gw}",
                 "tokens": f"{R} prefix + {c.num_patches} patches", "pos_embed": c.pos_embed,
                 "pooling": c.pooling, "readout query": READOUT_NAMES[query],
                 "token shown": token_index})
    if model.pretrained_info:
        info["weights"] = model.pretrained_info  # rendered as a nested table
    ex = Explanation(image=img, tokens=tokens, layers=layers, heads=heads, query=query, attentions=attns,
                     attention_maps=maps, rollout_map=rmap, distance=dist, posemb=posemb_similarity(model),
                     filters=comps, filters_ratio=ratio, prefix=prefix_attention(model, attns, pool),
                     predictions=preds, regression=regression, walkthrough=walk, info=info)
    xb = None if compare is None else prepare_image(model, compare)[0].to(x.device)
    ex.dense = dense_views(model, x, xb)
    ex.figures = make_figures(ex, c.patch_hw, token_index, c.pos_embed, c.rope)
    return ex


def make_figures(ex: Explanation, patch_hw, token_index: int, pos_embed: str,
                 rope: str = "none") -> dict[str, Figure]:
    note = ("sin/cos table (fixed)" if pos_embed.startswith("sincos") else
            "RoPE kernel" if rope != "none" else "")
    figs = {
        "patches": F.patch_grid_figure(ex.image, patch_hw),
        "tokens": F.token_figure(ex.image, ex.tokens, patch_hw, token_index),
        "filters": F.filters_figure(ex.filters, ex.filters_ratio),
        "posemb": F.posemb_figure(ex.posemb, note),
        "attention": F.attention_figure(ex.image, ex.attention_maps, ["attn_pool"] if ex.query == "map" else ex.layers,
                                        ex.heads, ex.query),
        "rollout": F.rollout_figure(ex.image, ex.rollout_map, ex.query),
        "distance": F.distance_figure(ex.distance, ex.image.shape[:2]),
    }
    if ex.predictions:
        names, vals = zip(*ex.predictions)
        figs["predictions"] = F.predictions_figure(names, vals, ex.regression)
    d = ex.dense
    if d:
        gh, gw = ex.image.shape[0] // patch_hw[0], ex.image.shape[1] // patch_hw[1]
        images = [ex.image] + ([d["image_b"]] if "image_b" in d else [])
        figs["pca"] = F.pca_figure(images, d["pca"], d["pca_fg"])
        figs["norms"] = F.norms_figure(d["norms"], (gh, gw), ex.prefix["names"])
        if "top" in d:
            figs["correspondence"] = F.correspondence_figure(ex.image, d["image_b"], (gh, gw), d["grid_b"],
                                                             d["queries"], d["top"])
    return figs


_SCRIPT = """
(function () {
  var errors = [];
  window.addEventListener('error', function (e) { errors.push(String(e.message || e)); });
  function finish() {
    var imgs = Array.prototype.slice.call(document.images);
    Promise.all(imgs.map(function (img) {
      return img.decode().then(function () { return img.naturalWidth > 0; }, function () { return false; });
    })).then(function (ok) {
      var good = ok.filter(Boolean).length;
      document.body.setAttribute('data-decoded', good + '/' + imgs.length);
      document.body.setAttribute('data-errors', String(errors.length));
      document.body.setAttribute('data-ready', '1');
    });
  }
  if (document.readyState === 'complete') { finish(); } else { window.addEventListener('load', finish); }
})();
"""

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 2px 8px; }
.caption { color: #555; }
"""


def _cell(v) -> str:
    """A table cell: dicts become nested tables, lists one item a line, the rest escaped text."""
    if isinstance(v, dict):
        return _table([[k, x] for k, x in v.items()]) if v else "none"
    if isinstance(v, (list, tuple)):
        return "<br>".join(_cell(x) for x in v) if v else "none"
    return html.escape(str(v))


def _table(rows: list[list[Any]], header: list[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render_html(ex: Explanation, pngs: dict[str, bytes], title: str = "vitkit explain") -> str:
    """The self-contained report: PNGs as data URIs, no external resources."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             _table([[k, v] for k, v in ex.info.items()]),
             "<h2>Shape walk-through</h2>", f"<pre>{html.escape(ex.walkthrough)}</pre>"]
    for key, heading, caption in SECTIONS:
        parts.append(f"<h2 id='{key}'>{heading}</h2><p class='caption'>{caption}</p>")
        if key in pngs:
            b64 = base64.b64encode(pngs[key]).decode("ascii")
            parts.append(f"<img alt='{key}' src='data:image/png;base64,{b64}'>")
        if key == "predictions":
            if ex.predictions:
                head = ["output", "value"] if ex.regression else ["class", "probability"]
                parts.append(_table([[n, f"{v:.4f}"] for n, v in ex.predictions], head))
            else:
                parts.append("<p>This model has no head (num_classes=0): it outputs features.</p>")
        if key == "distance":
            rows = [[str(i)] + [f"{d:.1f}" for d in ex.distance[i]] for i in range(ex.distance.shape[0])]
            parts.append(_table(rows, ["layer"] + [f"head {h}" for h in range(ex.distance.shape[1])]))
        if key == "attention" and ex.prefix["names"]:
            names = ex.prefix["names"]
            rows = [[str(i)] + [f"{ex.prefix['from_patches'][i, :, r].mean():.3f}" for r in range(len(names))]
                    for i in range(ex.prefix["from_patches"].shape[0])]
            parts.append("<p>Mean attention (over heads and patch queries) on each prefix token, per layer:</p>")
            parts.append(_table(rows, ["layer"] + names))
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write_report(ex: Explanation, out_dir: str | Path, title: str = "vitkit explain") -> Path:
    """Write ``<out_dir>/<figure>.png`` for every figure and ``<out_dir>/report.html``; returns the HTML path."""
    from ..io import atomic_write, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {k: F.to_png(fig) for k, fig in ex.figures.items()}
    written = [atomic_write(out / f"{k}.png", lambda tmp, data=data: Path(tmp).write_bytes(data))
               for k, data in pngs.items()]
    written.append(atomic_write_text(out / "report.html", render_html(ex, pngs, title)))
    umask = os.umask(0)
    os.umask(umask)
    for p in written:  # atomic_write's temporary files are private (0600); reports are for sharing
        os.chmod(p, 0o666 & ~umask)
    return written[-1]
