"""``explore.html``: one self-contained interactive page (vanilla JS + canvas, no server, no CDN)
to poke at what every layer and head attends to, and at the patch features, for one image.

Everything drawn comes from one forward of the model's own attention path,
``model(x, return_attention=True)`` (with gradients, for the attribution) and from
``model.forward_intermediates`` (for the similarities and the dense views); the maps are computed
here in Python and shipped as data:

* ``attention``: the weights ``A_l[h]`` (L, heads, T, T) as returned by the model;
* ``rollout``: :func:`vitkit.viz.rollout` over layers 0..l, for every l (L, T, T);
* ``attribution``: Chefer et al. 2021 relevance ``R_l`` for the top-k classes (K, L, T, T),
  :func:`vitkit.viz.attribution.attention_with_relevance`;
* ``similarity``: cosine similarity between the tokens output by block l (L, T, T);
* ``pca`` / ``pca-fg``: :func:`vitkit.viz.dense.pca_rgb` of block l's (final-normed) patch tokens,
  all patches / the foreground only (L, N, 3), 8-bit per channel;
* ``norms``: :func:`vitkit.viz.dense.token_norms` (L, T), float32;
* ``correspond`` (with a second image B): each A patch's ``CORR_K`` most similar B patches at
  block l (cosine of the final-normed patch tokens), indices and 8-bit cosines (L, N, CORR_K).

Two encodings, chosen by size (:data:`DENSE_LIMIT` attention weights):

* dense (small models; a ViT-B/16 at 224 is under 8 MB): every row of every map. Non-negative
  rows are 8-bit codes ``q = round(255 * a / max(row))`` plus the row maximum as float32 (a decoded
  value is within ``max(row) / 510`` of the true one); similarities use ``q = round(255 (s + 1) / 2)``
  (error at most 1/255).
* compact (large token counts, e.g. DINOv2-S/14 at 518 px, 1,370 tokens: 102 MB dense): the
  head-mean attention, rollout and attribution rows as 4-bit codes of the row maximum (error at
  most ``max(row) / 30``); each head's attention as the ``TOPK`` largest weights of every row (uint16
  key indices, 8-bit codes of the row maximum) plus a bound: every key not shipped has a weight at
  most the row's ``TOPK+1``-th largest, which the page prints with the row; similarities likewise
  as each query's ``SIM_TOPK`` most similar tokens (codes of ``(s + 1) / 2``, error at most 1/255)
  and a bound for the rest. :func:`precision` words these for the page and the docs.

All arrays are packed into one buffer, compressed with zlib (deflate) and embedded in base64; the
page inflates it with the browser's own ``DecompressionStream`` (Chrome/Edge 80+, Firefox 113+,
Safari 16.4+).

The page state is its URL fragment: ``explore.html#layer=L&head=H&patch=P&mode=M&class=K``
(H an index or ``mean``; P a patch index, ``cls``, ``dist``, ``reg0``..., or the readout
pseudo-queries ``mean`` / ``map``; K a class index), read on load and rewritten on every change
(``history.replaceState``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .attention import pool_attention, readout_query, rollout
from .attribution import attention_with_relevance
from .explore_page import PAGE_SCRIPT, PAGE_STYLE
from .patches import sized_to_input

SIZE_BUDGET = 8_000_000  # bytes; the limit for a ViT-B/16 at 224x224
COMPACT_BUDGET = 10_000_000  # bytes; the compact encoding's limit for DINOv2-S/14 at 518 px
# Above this many attention weights (layers x heads x tokens^2) the compact encoding is used: a
# ViT-B/16 at 224 (5.6 M) stays dense, DINOv2-S/14 at 518 px (135 M) is compact (<= 10 MB).
DENSE_LIMIT = 20_000_000
TOPK = 16  # compact encoding: keys shipped per row of each head's attention
COMPACT_LEVELS = 15  # compact encoding: 4-bit codes
SIM_TOPK = 32  # compact encoding: most similar tokens shipped per query
CORR_K = 8  # correspondence: most similar B patches shipped per A patch


def quantise_rows(a: np.ndarray, levels: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative (..., T) -> (uint8 codes 0..levels (..., T), float32 row maxima (...)).

    ``codes * maxima[..., None] / levels`` is within ``maxima / (2 levels)`` of ``a`` (plus
    float32 rounding of the maximum). Rows that are all zero get maximum 0 and codes 0."""
    a = np.asarray(a, dtype=np.float64)
    if (a < 0).any():
        raise InputError(f"quantise_rows expects non-negative values, got a minimum of {a.min()}")
    s = a.max(axis=-1).astype(np.float32)
    safe = np.where(s > 0, s.astype(np.float64), 1.0)
    q = np.rint(a / safe[..., None] * levels).clip(0, levels).astype(np.uint8)
    return q, s


def dequantise_rows(q: np.ndarray, s: np.ndarray, levels: int = 255) -> np.ndarray:
    return q.astype(np.float64) * (s.astype(np.float64)[..., None] / levels)


def quantise_signed(a: np.ndarray, levels: int = 255) -> np.ndarray:
    """Values in [-1, 1] -> uint8 codes ``round(levels (a + 1) / 2)``; error at most 1/levels."""
    return np.rint((np.clip(a, -1.0, 1.0) + 1.0) * (levels / 2)).astype(np.uint8)


def dequantise_signed(q: np.ndarray, levels: int = 255) -> np.ndarray:
    return q.astype(np.float64) * (2 / levels) - 1.0


def topk_rows(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Non-negative (..., T) -> the k largest of every row: (uint16 key indices (..., k) ascending,
    uint8 codes of the row maximum (..., k), float32 row maxima (...), uint8 bound codes (...)).

    A shipped weight decodes to within ``max / 510``; every key not shipped has a weight at most
    ``bound * max / 255`` (the row's k+1-th largest, rounded up)."""
    a = np.asarray(a, dtype=np.float32)
    T = a.shape[-1]
    if T > 65536:
        raise InputError(f"topk_rows stores key indices as uint16: at most 65536 tokens, got {T}")
    k = min(k, T)
    part = np.argpartition(-a, k - 1, axis=-1) if k < T else np.broadcast_to(np.arange(T), a.shape)
    idx = np.sort(part[..., :k], axis=-1)
    vals = np.take_along_axis(a, idx, -1).astype(np.float64)
    s = a.max(axis=-1).astype(np.float32)
    safe = np.where(s > 0, s.astype(np.float64), 1.0)[..., None]
    q = np.rint(vals / safe * 255).clip(0, 255).astype(np.uint8)
    if k < T:
        rest = np.take_along_axis(a, part[..., k:], -1).max(-1, keepdims=True).astype(np.float64)
    else:
        rest = np.zeros(a.shape[:-1] + (1,))
    bound = np.ceil(rest / safe * 255 - 1e-9).clip(0, 255).astype(np.uint8)[..., 0]
    return idx.astype(np.uint16), q, s, bound


def precision(meta: dict[str, Any]) -> dict[str, str]:
    """How exactly each mode's values are shipped (shown on the page; docs/explain.md quotes it)."""
    if meta.get("encoding") == "served":
        return dict.fromkeys(("attention", "rollout", "attribution", "similarity"),
                             "exact (float32, computed by the local server for each view)")
    if meta.get("encoding") == "compact":
        k, lv = meta["topk"], meta["levels"]
        return {
            "attention": f"head mean: 4-bit per row (error at most {1 / (2 * lv):.1%} of the row maximum); one head: "
                         f"its {k} largest weights per row (error at most 0.2% of the row maximum), the other keys "
                         "shown as 0 (each at most the bound printed below the image)",
            "rollout": f"4-bit per row (error at most {1 / (2 * lv):.1%} of the row maximum)",
            "attribution": f"4-bit per row (error at most {1 / (2 * lv):.1%} of the row maximum)",
            "similarity": f"the {meta['sim_topk']} most similar tokens of each query (error at most 1/255); the "
                          "others shown at the bound printed below the image (each at most that)",
        }
    return {"attention": "8-bit per row (error at most 0.2% of the row maximum)",
            "rollout": "8-bit per row (error at most 0.2% of the row maximum)",
            "attribution": "8-bit per row (error at most 0.2% of the row maximum)",
            "similarity": "8-bit (error at most 1/255)"}


def prefix_names(model) -> list[str]:
    """Names of the prefix tokens in token order: ``cls``, ``dist`` (DeiT), ``reg0``..."""
    c = model.config
    names = ["cls"] if c.class_token else []
    if getattr(c, "dist_token", False):
        names.append("dist")
    names += [f"reg{i}" for i in range(c.num_registers)]
    if len(names) != model.num_prefix_tokens:
        raise InputError(f"prefix tokens {names} do not match the model's {model.num_prefix_tokens}")
    return names


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    a = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, mode="L" if a.shape[-1] == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _dense_views(model, hidden: torch.Tensor, compare: torch.Tensor | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """PCA colours, token norms and (with ``compare``) the correspondence to image B, every layer,
    from the block outputs ``hidden`` (L, T, D) of ``forward_intermediates(x, norm=False)``."""
    from .dense import block_tokens, correspondence, pca_views
    from .patches import display_image

    R = model.num_prefix_tokens
    grid = tuple(model.grid_size)
    norms = hidden.double().norm(dim=-1).numpy()  # (L, T), as vitkit.viz.dense.token_norms
    with torch.no_grad():  # forward_intermediates(norm=True), without a second forward
        feats = model.norm(hidden.to(next(model.parameters()).device)).double().cpu().numpy()  # (L, T, D)
    views = [pca_views([f[R:]], [grid]) for f in feats]
    pca, pca_fg = [v[0] for v in views], [v[1] for v in views]
    to_u8 = lambda a: np.rint(np.stack(a) * 255).clip(0, 255).astype(np.uint8)  # noqa: E731
    arrays = {"pca": to_u8(pca), "pca_fg": to_u8(pca_fg), "norms": norms.astype(np.float32)}
    meta: dict[str, Any] = {}
    if compare is not None:
        fb = block_tokens(model, compare, norm=True)
        gb = model.patch_embed.grid_for(compare[:1])
        tops, vals = [], []
        for fa_l, fb_l in zip(feats, fb):
            sim, top = correspondence(fa_l[R:], fb_l[R:], CORR_K)
            tops.append(top)
            vals.append(np.take_along_axis(sim, top, 1))
        arrays["corr_i"] = np.stack(tops).astype(np.uint16)  # (L, N, K)
        arrays["corr_v"] = quantise_signed(np.stack(vals))
        img_b = display_image(model, compare[:1])
        meta["compare"] = {"grid": list(gb), "image": list(img_b.shape[:2]), "k": CORR_K,
                           "image_png": "data:image/png;base64," + base64.b64encode(_png(img_b)).decode("ascii")}
    return meta, arrays


def explore_data(model, x: torch.Tensor, topk: int = 5, classes: int = 3, compare: torch.Tensor | None = None,
                 encoding: str | None = None, keep: dict[str, np.ndarray] | None = None
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Compute everything the page shows for the first image of ``x`` (preprocessed, (B, C, H, W)).

    ``compare``: a second preprocessed image for the correspondence view. ``encoding``: ``"dense"``,
    ``"compact"``, None (compact above :data:`DENSE_LIMIT` attention weights) or ``"served"`` (the
    maps are not encoded: ``keep`` receives them at full precision for :mod:`vitkit.viz.serve`,
    ``attention`` (L, H, T, T), ``rollout`` (L, T, T), ``attribution`` (K, L, T, T), ``similarity``
    (L, T, T)).
    Returns ``(meta, arrays)``: ``meta`` is JSON-ready (grid, tokens, predictions, ...),
    ``arrays`` the encoded maps (names -> uint8 / uint16 / float32 arrays)."""
    from .patches import display_image

    c = model.config
    x = x[:1].to(next(model.parameters()).device)
    if compare is not None:
        compare = compare[:1].to(x.device)
        if compare.shape[1] != x.shape[1]:
            raise InputError(f"the compared image has {compare.shape[1]} channels, the model expects {x.shape[1]}")
    logits, A, cls_idx, rel = attention_with_relevance(model, x, topk=classes)
    L, H, T, _ = A.shape
    gh, gw = model.grid_size
    R = model.num_prefix_tokens
    if T != R + gh * gw:
        raise InputError(f"the attention maps have {T} tokens, expected {R} prefix + {gh}x{gw} patches")
    if encoding is None:
        encoding = "compact" if L * H * T * T > DENSE_LIMIT else "dense"
    if encoding not in ("dense", "compact", "served"):
        raise InputError(f"encoding must be 'dense', 'compact' or 'served', got {encoding!r}")
    mean = A.mean(axis=1)  # (L, T, T) the head-mean attention
    roll = rollout(mean[:, None, None], every_layer=True)[:, 0]  # (L, T, T): layers 0..l for every l
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, hidden = model.forward_intermediates(x, norm=False)
        pool = pool_attention(model, x)
    finally:
        model.train(was_training)
    hidden = torch.stack([h[0].float().cpu() for h in hidden])  # (L, T, D)
    feats = torch.nn.functional.normalize(hidden.double(), dim=-1)
    sim = (feats @ feats.transpose(1, 2)).numpy()  # (L, T, T) cosine similarity

    lv = 255 if encoding == "dense" else COMPACT_LEVELS
    if keep is not None:
        keep.update(attention=A, rollout=roll.astype(np.float32), attribution=rel.astype(np.float32),
                    similarity=sim.astype(np.float32))
    arrays = _encode_maps(encoding, lv, A, mean, roll, rel if len(cls_idx) else None, sim)
    del sim
    if pool is not None:
        arrays["pool"] = pool.astype(np.float32)
    dense_meta, dense_arrays = _dense_views(model, hidden, compare)
    arrays.update(dense_arrays)

    name = _class_name(model.labels)
    preds = _page_predictions(c, logits, topk, name)
    img = display_image(model, x)
    meta = {
        "grid": [gh, gw], "patch": list(c.patch_hw), "image": list(img.shape[:2]), "channels": c.in_channels,
        "layers": L, "heads": H, "tokens": T, "prefix": prefix_names(model), "readout": readout_query(model),
        "pooling": c.pooling, "predictions": preds, "regression": getattr(c, "task", "") == "regression",
        "classes": [{"index": int(k), "name": name(int(k)), "p": float(logits.softmax(-1)[k])} for k in cls_idx],
        "model": c.name or "vit", "image_png": "data:image/png;base64," + base64.b64encode(_png(img)).decode("ascii"),
        "encoding": encoding, "levels": lv, "topk": TOPK if encoding == "compact" else None,
        "sim_topk": SIM_TOPK if encoding == "compact" else None, **dense_meta,
    }
    meta["precision"] = precision(meta)
    return meta, arrays


def _encode_maps(encoding: str, lv: int, A: np.ndarray, mean: np.ndarray, roll: np.ndarray,
                 rel: np.ndarray | None, sim: np.ndarray) -> dict[str, np.ndarray]:
    """The maps as the page stores them: ``dense`` 8-bit rows; ``compact`` the head mean at ``lv``
    levels, each head's :data:`TOPK` largest weights per row and each query's :data:`SIM_TOPK` most
    similar tokens; ``served`` nothing (the server computes each view's row)."""
    arrays: dict[str, np.ndarray] = {}
    if encoding == "served":
        return arrays
    if encoding == "dense":
        arrays["attn_q"], arrays["attn_s"] = quantise_rows(A)
    else:
        arrays["attnm_q"], arrays["attnm_s"] = quantise_rows(mean, lv)
        parts = [topk_rows(A[layer], TOPK) for layer in range(A.shape[0])]  # one layer at a time bounds the memory
        for i, name in enumerate(("attn_i", "attn_v", "attn_s", "attn_r")):
            arrays[name] = np.stack([p[i] for p in parts])
    arrays["roll_q"], arrays["roll_s"] = quantise_rows(roll, lv)
    if rel is not None:
        arrays["attr_q"], arrays["attr_s"] = quantise_rows(rel, lv)
    if encoding == "dense":
        arrays["sim_q"] = quantise_signed(sim, lv)
    else:  # the SIM_TOPK most similar tokens of each query, as (s + 1) / 2 >= 0
        for name, a in zip(("sim_i", "sim_v", "sim_s", "sim_r"), topk_rows((sim + 1) / 2, SIM_TOPK)):
            arrays[name] = a
    return arrays


def _class_name(labels):
    return lambda k: labels[k] if labels and k < len(labels) else f"class {k}"


def _page_predictions(c, logits: torch.Tensor, topk: int, name) -> list[dict[str, Any]]:
    """Top-k classes with probabilities, or every regression output."""
    if c.num_classes > 0 and getattr(c, "task", "classification") != "regression":
        p = logits.softmax(-1)
        vals, idx = p.topk(min(topk, p.numel()))
        return [{"index": int(i), "name": name(int(i)), "p": float(v)} for v, i in zip(vals, idx)]
    if c.num_classes > 0:
        return [{"index": i, "name": f"output {i}", "value": float(v)} for i, v in enumerate(logits.tolist())]
    return []


def pack(arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], bytes]:
    """Arrays -> (layout {name: {dtype, shape, offset, size}}, zlib-compressed little-endian buffer).
    Float32 arrays start at 4-byte offsets, uint16 at 2 (JS typed-array views need it)."""
    layout, chunks, off = {}, [], 0
    for name, a in arrays.items():
        if a.dtype == np.uint8:
            dtype, raw = "u8", np.ascontiguousarray(a).tobytes()
        elif a.dtype == np.uint16:  # a JS Uint16Array view needs a 2-byte offset
            dtype, raw = "u16", np.ascontiguousarray(a, dtype="<u2").tobytes()
            pad = -off % 2
            chunks.append(b"\0" * pad)
            off += pad
        elif a.dtype == np.float32:
            dtype, raw = "f32", np.ascontiguousarray(a, dtype="<f4").tobytes()
            pad = -off % 4
            chunks.append(b"\0" * pad)
            off += pad
        else:
            raise InputError(f"cannot pack {name} of dtype {a.dtype}")
        layout[name] = {"dtype": dtype, "shape": list(a.shape), "offset": off, "size": int(a.size)}
        chunks.append(raw)
        off += len(raw)
    return layout, zlib.compress(b"".join(chunks), 6)


def _page(meta: dict[str, Any], arrays: dict[str, np.ndarray], title: str) -> str:
    layout, blob = pack(arrays)
    meta = dict(meta, arrays=layout)
    meta_json = json.dumps(meta).replace("</", "<\\/")  # nothing in a <script> may close it
    data = base64.b64encode(blob).decode("ascii")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><div id='app'></div>"
            f"<script type='application/json' id='vitkit-meta'>{meta_json}</script>"
            f"<script type='application/octet-stream' id='vitkit-data'>{data}</script>"
            f"<script>{PAGE_SCRIPT}</script></body></html>")


def render_explore(meta: dict[str, Any], arrays: dict[str, np.ndarray], title: str = "vitkit explore",
                   budget: int | None = SIZE_BUDGET) -> str:
    """The self-contained page (str), at most ``budget`` bytes where it can be (the default
    :data:`SIZE_BUDGET` reads :data:`COMPACT_BUDGET` for the compact encoding).

    The attention weights are never reduced. When the page is over the budget, the attribution
    is shipped for the last layer only (the layer slider then does not move it), and then for the
    top class only; what was reduced is listed in ``meta["reduced"]`` and shown on the page. A page
    still over the budget after both is returned as it is (callers can compare its size)."""
    meta = dict(meta, reduced=[])
    if budget == SIZE_BUDGET and meta.get("encoding") == "compact":
        budget = COMPACT_BUDGET
    page = _page(meta, arrays, title)
    if budget is None or len(page.encode("utf-8")) <= budget or "attr_q" not in arrays:
        return page
    arrays = dict(arrays)
    arrays["attr_q"], arrays["attr_s"] = arrays["attr_q"][:, -1:].copy(), arrays["attr_s"][:, -1:].copy()
    meta["reduced"] = [f"attribution: last layer only (the page was over {budget / 1e6:g} MB)"]
    page = _page(meta, arrays, title)
    if len(page.encode("utf-8")) <= budget:
        return page
    arrays["attr_q"], arrays["attr_s"] = arrays["attr_q"][:1].copy(), arrays["attr_s"][:1].copy()
    meta["classes"] = meta["classes"][:1]
    meta["reduced"].append("attribution: the top class only")
    return _page(meta, arrays, title)


def explore(model, image, topk: int = 5, classes: int = 3, compare=None,
            encoding: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``explore_data`` for an image path / built-in spec (``digits:7``) / PIL image / tensor,
    preprocessed with the model's own transform (``compare`` likewise)."""
    from .report import prepare_image

    x, _ = prepare_image(model, image)
    xb = None if compare is None else prepare_image(model, compare)[0]
    return explore_data(sized_to_input(model, x), x, topk=topk, classes=classes, compare=xb, encoding=encoding)


def write_explore(model, image, out_dir: str | Path, topk: int = 5, classes: int = 3,
                  title: str = "vitkit explore", compare=None, encoding: str | None = None) -> Path:
    """Write ``<out_dir>/explore.html`` for one image (and ``compare``, for the correspondence view);
    returns its path."""
    from ..io import atomic_write_text

    meta, arrays = explore(model, image, topk=topk, classes=classes, compare=compare, encoding=encoding)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = atomic_write_text(out / "explore.html", render_explore(meta, arrays, title))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # atomic_write's temporary files are private; pages are for sharing
    return Path(path)
