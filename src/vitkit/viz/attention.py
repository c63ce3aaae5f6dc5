"""Attention maps, attention rollout and mean attention distance.

Every map here starts from the model's own attention path, ``model(x, return_attention=True)``
(the explicit softmax(QK^T * scale) that is tested to match the fused kernel), never from a
re-implementation of attention.

Token layout (as in :class:`vitkit.ViT`): ``[class token?] [register tokens x R?] [patches x N]``,
patches row-major over the (gh, gw) grid. Register tokens are excluded from every overlay; how much
attention goes to them is reported separately (:func:`prefix_attention`).

* :func:`attention_maps`: for chosen layers and heads, the attention of the *readout query* over
  the patch keys, on the patch grid. The readout query is the class token when the model pools it;
  with mean pooling (or no class token) it is the mean over the patch queries, which is what the
  pooled output averages; with attention pooling (SigLIP's MAP head) it is the pooling head's own
  latent query (:func:`pool_attention`), which attends once, after the last block. Maps that
  propagate through the layers (rollout, relevance) read it out as the mix of the token rows
  weighted by its head-averaged weights, as explore.html does.
* :func:`rollout`: Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020):
  average the heads, add the identity for the residual connection, renormalise the rows to sum to 1,
  and multiply across layers, ``R = A_L' ... A_2' A_1'``.
* :func:`mean_attention_distance`: Dosovitskiy et al. 2021, Figure 7 right / Appendix D.7: for
  every query patch, the distance in pixels to every key patch weighted by the attention weight,
  averaged over the query patches. Attention on prefix tokens has no position, so the weights over
  the patch keys are renormalised to sum to 1 first.

Shapes: attentions are a list (one per layer) of ``(B, heads, T, T)`` tensors or arrays, or one
array ``(L, heads, T, T)`` for a single image; T = prefix + N.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError


def _as_numpy_layers(attentions) -> np.ndarray:
    """List of (B, h, T, T) / (h, T, T) per layer, or an (L, [B,] h, T, T) array -> float64
    array (L, B, h, T, T)."""
    if isinstance(attentions, (torch.Tensor, np.ndarray)):
        layers = [attentions[i] for i in range(attentions.shape[0])]
    else:
        layers = list(attentions)
    if not layers:
        raise InputError("no attention maps given (expected one (B, heads, T, T) map per layer)")
    out = []
    for i, a in enumerate(layers):
        a = a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise InputError(f"attention map {i} has shape {a.shape}; expected (B, heads, T, T) or (heads, T, T)")
        out.append(a.astype(np.float64))
    shapes = {a.shape for a in out}
    if len(shapes) != 1:
        raise InputError(f"attention maps of all layers must have one shape, got {sorted(shapes)}")
    return np.stack(out)


def get_attentions(model, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(logits, [attention (B, heads, T, T) per layer])`` from the model's own attention path."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, attns = model(x, return_attention=True)
    finally:
        model.train(was_training)
    return logits, attns


def check_indices(values: Sequence[int] | None, size: int, what: str) -> list[int]:
    """Validate layer/head indices (negatives count from the end); None = all."""
    if values is None:
        return list(range(size))
    out = []
    for v in values:
        j = int(v) + size if int(v) < 0 else int(v)
        if not 0 <= j < size:
            raise InputError(f"{what} index {v} is out of range: this model has {size} {what}s "
                             f"(valid: 0..{size - 1}, or -{size}..-1 from the end)")
        if j not in out:
            out.append(j)
    if not out:
        raise InputError(f"no {what} indices given")
    return out


def readout_query(model) -> str:
    """What the model reads out: ``"cls"`` (class-token pooling), ``"map"`` (attention pooling:
    the pooling head's latent query) or ``"mean"`` (the mean over the patch queries)."""
    c = model.config
    if c.pooling == "map":
        return "map"
    return "cls" if (c.class_token and c.pooling == "cls") else "mean"


def pool_attention(model, x: torch.Tensor) -> np.ndarray | None:
    """The attention-pooling head's own weights for the first image as (heads, T) (zero on the
    prefix tokens: the head pools the patch tokens, as ``ViT.pool`` feeds it), or None without one.
    The one MAP readout of the report and explore.html."""
    pool = getattr(model, "attn_pool", None)
    if pool is None or model.config.pooling != "map":
        return None
    R = model.num_prefix_tokens
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tokens = model.forward_features(x[:1])
            _, w = pool(tokens[:, R:], return_attention=True)  # (1, heads, 1, N)
    finally:
        model.train(was_training)
    w = w[0].float().cpu().numpy().mean(axis=1)  # (heads, N); several latent queries: their mean
    return np.concatenate([np.zeros((w.shape[0], R), w.dtype), w], axis=1)


def _query_rows(a: np.ndarray, query: str, R: int, pool: np.ndarray | None = None) -> np.ndarray:
    """a (..., T, T) -> (..., T): the class-token row, the mean over the patch-query rows, or (map)
    the rows mixed by the pooling head's head-averaged weights ``pool`` (heads, T)."""
    if query == "cls":
        return a[..., 0, :]
    if query == "mean":
        return a[..., R:, :].mean(axis=-2)
    if query == "map":
        if pool is None:
            raise InputError("the 'map' readout needs the pooling head's weights (pool_attention(model, x))")
        return np.einsum("t,...tj->...j", pool.mean(axis=0).astype(np.float64), a)
    raise InputError(f"query must be 'cls', 'mean' or 'map', got {query!r}")


def readout_maps(model, A: np.ndarray, layers: Sequence[int], heads: Sequence[int], query: str,
                 pool: np.ndarray | None = None) -> np.ndarray:
    """(depth, heads, T, T) attention of one image -> the readout query's maps over the patches,
    ``(len(layers), len(heads), gh, gw)``; for ``"map"`` the pooling head's own weights ``pool``
    (heads, T) for the chosen heads, one row ``(1, len(heads), gh, gw)`` (it attends once, after
    the last block)."""
    R = model.num_prefix_tokens
    gh, gw = model.grid_size
    if query == "map":
        if pool is None:
            raise InputError("the 'map' readout needs the pooling head's weights (pool_attention(model, x))")
        return pool[list(heads), R:].reshape(1, len(heads), gh, gw).astype(np.float64)
    rows = _query_rows(A[list(layers)][:, list(heads)], query, R)  # (L, h, T)
    return rows[..., R:].reshape(len(layers), len(heads), gh, gw)


def attention_maps(model, x: torch.Tensor, layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None, query: str | None = None) -> np.ndarray:
    """Attention of the readout query over the patch keys, per chosen layer and head.

    Returns an array ``(len(layers), len(heads), gh, gw)`` for the first image of ``x``. Values
    are the raw attention weights (the part of the row that lands on patches; prefix keys left out).
    With attention pooling (``query="map"``) one row: the pooling head's own weights, per head.
    """
    c = model.config
    layers = check_indices(layers, c.depth, "layer")
    heads = check_indices(heads, c.num_heads, "head")
    _, attns = get_attentions(model, x)
    A = _as_numpy_layers(attns)[:, 0]  # (depth, h, T, T)
    query = query or readout_query(model)
    return readout_maps(model, A, layers, heads, query, pool_attention(model, x) if query == "map" else None)


def rollout(attentions, add_residual: bool = True, head_fusion: str = "mean",
            start_layer: int = 0, every_layer: bool = False) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020): ``R = A_L' ... A_1'`` with
    ``A' = rownorm(fuse_heads(A) + I)``.

    Args:
        attentions: one (B, heads, T, T) map per layer (or an (L, heads, T, T) array).
        add_residual: add the identity for the residual connection (the paper's rollout).
        head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"`` over heads.
        start_layer: first layer to include.
        every_layer: return the rollout after each layer, (L - start_layer, B, T, T), computed
            in the same one pass (the explorer's layer slider needs all of them).

    Returns (B, T, T) rollout matrices (float64); row q says how much of token q's output
    comes from each input token.
    """
    A = _as_numpy_layers(attentions)  # (L, B, h, T, T)
    if not 0 <= start_layer < A.shape[0]:
        raise InputError(f"start_layer {start_layer} out of range for {A.shape[0]} layers")
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}.get(head_fusion)
    if fuse is None:
        raise InputError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    L, B, _, T, _ = A.shape
    result = np.broadcast_to(np.eye(T), (B, T, T)).copy()
    every = []
    for layer in range(start_layer, L):
        a = fuse(A[layer], axis=1)  # (B, T, T)
        if add_residual:
            a = a + np.eye(T)
        a = a / a.sum(axis=-1, keepdims=True)
        result = a @ result  # later layers act on the mixed tokens of earlier ones
        if every_layer:
            every.append(result)
    return np.stack(every) if every_layer else result


def rollout_map(model, x: torch.Tensor, attentions=None, query: str | None = None, **kwargs) -> np.ndarray:
    """The rollout row of the readout query over the patches, as a (gh, gw) map for the first image."""
    c = model.config
    if attentions is None:
        _, attentions = get_attentions(model, x)
    Rm = rollout(attentions, **kwargs)[0]  # (T, T)
    R = c.num_prefix_tokens
    query = query or readout_query(model)
    row = _query_rows(Rm, query, R, pool_attention(model, x) if query == "map" else None)
    return row[R:].reshape(c.grid_size)


def patch_centers(grid: tuple[int, int], patch_size: tuple[int, int] | int) -> np.ndarray:
    """(N, 2) pixel coordinates (y, x) of the patch centres, row-major over the grid."""
    gh, gw = grid
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    ys, xs = np.meshgrid((np.arange(gh) + 0.5) * ph, (np.arange(gw) + 0.5) * pw, indexing="ij")
    return np.stack([ys.ravel(), xs.ravel()], axis=1)


def mean_attention_distance(attentions, grid: tuple[int, int], patch_size, num_prefix_tokens: int = 1,
                            eps: float = 1e-12) -> np.ndarray:
    """Mean attention distance in pixels, ``(L, heads)``, averaged over query patches and the batch.

    For query patch q: ``d_q = sum_k a_qk |c_q - c_k| / sum_k a_qk`` over the patch keys k
    (c = patch centre in pixels; non-square patches use their true pixel sizes).
    """
    A = _as_numpy_layers(attentions)  # (L, B, h, T, T)
    R = num_prefix_tokens
    gh, gw = grid
    N = gh * gw
    if A.shape[-1] != R + N:
        raise InputError(f"attention maps have {A.shape[-1]} tokens, expected {R} prefix + {gh}x{gw} = {R + N}")
    centers = patch_centers(grid, patch_size)
    dist = np.sqrt(((centers[:, None, :] - centers[None, :, :]) ** 2).sum(-1))  # (N, N)
    P = A[..., R:, R:]  # patch queries over patch keys
    mass = P.sum(-1)
    d = (P * dist).sum(-1) / np.maximum(mass, eps)  # (L, B, h, N)
    return d.mean(axis=(1, 3))


def model_attention_distance(model, x: torch.Tensor, attentions=None) -> np.ndarray:
    """:func:`mean_attention_distance` for a model and an input batch: (depth, heads) in pixels."""
    c = model.config
    if attentions is None:
        _, attentions = get_attentions(model, x)
    return mean_attention_distance(attentions, c.grid_size, c.patch_hw, c.num_prefix_tokens)


def prefix_attention(model, attentions, pool: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """How much attention the patch queries (and the readout query) put on each prefix token.

    Returns ``{"names": [...], "from_patches": (L, heads, R), "from_readout": (L, heads, R)}``
    for the first image: mean over the patch queries of the weight on each prefix key, and the
    readout query's weight on each (attention pooling: pass ``pool = pool_attention(model, x)``).
    Register tokens are left out of the overlays; this is where they are reported.
    """
    c = model.config
    R = c.num_prefix_tokens
    names = (["cls"] if c.class_token else []) + [f"reg{i}" for i in range(c.num_registers)]
    A = _as_numpy_layers(attentions)[:, 0]  # (L, h, T, T)
    from_patches = A[:, :, R:, :R].mean(axis=2)
    from_readout = _query_rows(A, readout_query(model), R, pool)[..., :R]
    return {"names": names, "from_patches": from_patches, "from_readout": from_readout}
