"""``explore.html``: one self-contained interactive page (vanilla JS + canvas, no server, no CDN)
to poke at what every layer and head attends to, for one image.

Everything drawn comes from one forward of the model's own attention path,
``model(x, return_attention=True)`` (with gradients, for the attribution) and from
``model.forward_intermediates`` (for the similarities); the maps are computed here in Python
and shipped as data:

* ``attention``: the weights ``A_l[h]`` (L, heads, T, T) as returned by the model;
* ``rollout``: :func:`vitkit.viz.rollout` over layers 0..l, for every l (L, T, T);
* ``attribution``: Chefer et al. 2021 relevance ``R_l`` for the top-k classes (K, L, T, T),
  :func:`vitkit.viz.attribution.attention_with_relevance`;
* ``similarity``: cosine similarity between the tokens output by block l (L, T, T).

Encoding (:func:`quantise_rows`): every row of the attention, rollout and relevance matrices
(all non-negative) is stored as 8-bit codes ``q = round(255 * a / max(row))`` plus the row
maximum as float32, so a decoded value ``q * max / 255`` is within ``max(row) / 510`` of the
true one (half a code step; 0.2% of the row's largest value). Similarities are in [-1, 1] and
use the fixed code ``q = round(255 * (s + 1) / 2)``: error at most ``1 / 255``. All arrays are
packed into one buffer, compressed with zlib (deflate) and embedded in base64; the page inflates
it with the browser's own ``DecompressionStream`` (Chrome/Edge 80+, Firefox 113+, Safari 16.4+).
A ViT-B/16 at 224x224 (12 x 12 x 197 x 197 attention weights) stays under 8 MB.

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
from .attention import readout_query, rollout
from .attribution import attention_with_relevance
from .explore_page import PAGE_SCRIPT, PAGE_STYLE

SIZE_BUDGET = 8_000_000  # bytes; the limit for a ViT-B/16 at 224x224


def quantise_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative (..., T) -> (uint8 codes (..., T), float32 row maxima (...)).

    ``codes * maxima[..., None] / 255`` is within ``maxima / 510`` of ``a`` (plus float32
    rounding of the maximum). Rows that are all zero get maximum 0 and codes 0."""
    a = np.asarray(a, dtype=np.float64)
    if (a < 0).any():
        raise InputError(f"quantise_rows expects non-negative values, got a minimum of {a.min()}")
    s = a.max(axis=-1).astype(np.float32)
    safe = np.where(s > 0, s.astype(np.float64), 1.0)
    q = np.rint(a / safe[..., None] * 255.0).clip(0, 255).astype(np.uint8)
    return q, s


def dequantise_rows(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    return q.astype(np.float64) * (s.astype(np.float64)[..., None] / 255.0)


def quantise_signed(a: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> uint8 codes ``round(255 (a + 1) / 2)``; error at most 1/255."""
    return np.rint((np.clip(a, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def dequantise_signed(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float64) / 127.5 - 1.0


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


def readout_token(model) -> str:
    """What the model reads out, as a query name of the page: ``cls`` (class-token pooling),
    ``map`` (attention pooling: the pooling head's latent query) or ``mean`` (mean pooling: the
    mean over the patch queries, which is what the pooled output averages)."""
    if model.config.pooling == "map":
        return "map"
    return readout_query(model)


def _pool_attention(model, x: torch.Tensor) -> np.ndarray | None:
    """The attention-pooling head's weights for the first image as (heads, T) (zero on the prefix
    tokens: the head pools the patch tokens, as ``ViT.pool`` feeds it), or None without one."""
    pool = getattr(model, "attn_pool", None)
    if pool is None or model.config.pooling != "map":
        return None
    R = model.num_prefix_tokens
    with torch.no_grad():
        tokens = model.forward_features(x[:1])
        _, w = pool(tokens[:, R:], return_attention=True)  # (1, heads, 1, N)
    w = w[0].float().cpu().numpy().mean(axis=1)  # (heads, N); several latent queries: their mean
    return np.concatenate([np.zeros((w.shape[0], R), w.dtype), w], axis=1)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    a = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, mode="L" if a.shape[-1] == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def explore_data(model, x: torch.Tensor, topk: int = 5, classes: int = 3) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Compute everything the page shows for the first image of ``x`` (preprocessed, (B, C, H, W)).

    Returns ``(meta, arrays)``: ``meta`` is JSON-ready (grid, tokens, predictions, ...),
    ``arrays`` the encoded maps (names -> uint8 / float32 arrays)."""
    from .patches import display_image

    c = model.config
    x = x[:1].to(next(model.parameters()).device)
    logits, A, cls_idx, rel = attention_with_relevance(model, x, topk=classes)
    L, H, T, _ = A.shape
    gh, gw = model.grid_size
    R = model.num_prefix_tokens
    if T != R + gh * gw:
        raise InputError(f"the attention maps have {T} tokens, expected {R} prefix + {gh}x{gw} patches")
    roll = np.stack([rollout([A[i][None] for i in range(layer + 1)])[0] for layer in range(L)])  # (L, T, T)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, hidden = model.forward_intermediates(x, norm=False)
        pool = _pool_attention(model, x)
    finally:
        model.train(was_training)
    feats = torch.stack([h[0].double().cpu() for h in hidden])  # (L, T, D)
    feats = torch.nn.functional.normalize(feats, dim=-1)
    sim = (feats @ feats.transpose(1, 2)).numpy()  # (L, T, T) cosine similarity

    arrays: dict[str, np.ndarray] = {}
    arrays["attn_q"], arrays["attn_s"] = quantise_rows(A)
    arrays["roll_q"], arrays["roll_s"] = quantise_rows(roll)
    if len(cls_idx):
        arrays["attr_q"], arrays["attr_s"] = quantise_rows(rel)
    arrays["sim_q"] = quantise_signed(sim)
    if pool is not None:
        arrays["pool"] = pool.astype(np.float32)

    labels = model.labels
    name = lambda k: labels[k] if labels and k < len(labels) else f"class {k}"  # noqa: E731
    preds: list[dict[str, Any]] = []
    if c.num_classes > 0 and getattr(c, "task", "classification") != "regression":
        p = logits.softmax(-1)
        vals, idx = p.topk(min(topk, p.numel()))
        preds = [{"index": int(i), "name": name(int(i)), "p": float(v)} for v, i in zip(vals, idx)]
    elif c.num_classes > 0:
        preds = [{"index": i, "name": f"output {i}", "value": float(v)} for i, v in enumerate(logits.tolist())]
    img = display_image(model, x)
    meta = {
        "grid": [gh, gw], "patch": list(c.patch_hw), "image": list(img.shape[:2]), "channels": c.in_channels,
        "layers": L, "heads": H, "tokens": T, "prefix": prefix_names(model), "readout": readout_token(model),
        "pooling": c.pooling, "predictions": preds, "regression": getattr(c, "task", "") == "regression",
        "classes": [{"index": int(k), "name": name(int(k)), "p": float(logits.softmax(-1)[k])} for k in cls_idx],
        "model": c.name or "vit", "image_png": "data:image/png;base64," + base64.b64encode(_png(img)).decode("ascii"),
    }
    return meta, arrays


def pack(arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], bytes]:
    """Arrays -> (layout {name: {dtype, shape, offset, size}}, zlib-compressed little-endian buffer).
    Float32 arrays start at 4-byte offsets (a JS Float32Array view needs it)."""
    layout, chunks, off = {}, [], 0
    for name, a in arrays.items():
        if a.dtype == np.uint8:
            dtype, raw = "u8", np.ascontiguousarray(a).tobytes()
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
    """The self-contained page (str), at most ``budget`` bytes where it can be.

    The attention weights are never reduced. When the page is over the budget, the attribution
    is shipped for the last layer only (the layer slider then does not move it), and then for the
    top class only; what was reduced is listed in ``meta["reduced"]`` and shown on the page. A page
    still over the budget after both is returned as it is (callers can compare its size)."""
    meta = dict(meta, reduced=[])
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


def explore(model, image, topk: int = 5, classes: int = 3) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``explore_data`` for an image path / built-in spec (``digits:7``) / PIL image / tensor,
    preprocessed with the model's own transform."""
    from .report import prepare_image

    x, _ = prepare_image(model, image)
    return explore_data(model, x, topk=topk, classes=classes)


def write_explore(model, image, out_dir: str | Path, topk: int = 5, classes: int = 3,
                  title: str = "vitkit explore") -> Path:
    """Write ``<out_dir>/explore.html`` for one image; returns its path."""
    from ..io import atomic_write_text

    meta, arrays = explore(model, image, topk=topk, classes=classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = atomic_write_text(out / "explore.html", render_explore(meta, arrays, title))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # atomic_write's temporary files are private; pages are for sharing
    return Path(path)
