"""Position-embedding similarity (Dosovitskiy et al. 2021, Figure 7 centre).

For every patch position (i, j), the cosine similarity of its position embedding to the embedding
of every other position, laid out on the patch grid: ``sim[i, j]`` is a (gh, gw) map. A learned
table that has understood 2-D layout shows bright blobs around (i, j) and stripes along its row
and column. Works for learned and fixed (sincos1d / sincos2d) tables and for RoPE (the kernel its
rotations put on equal queries and keys, see :func:`patch_pos_table`); ``pos_embed="none"`` without
RoPE has no table and gives None. Rows for prefix tokens (class / registers) are left out.

Output: ``(gh, gw, gh, gw)`` float64 array.
"""

from __future__ import annotations

import numpy as np
import torch


def patch_pos_table(model) -> torch.Tensor | None:
    """The (N, D) rows of the position table that are added to the patch tokens, or None. A RoPE
    model (``config.rope``, DINOv3) has no table: its rows are then ``[cos, sin]`` of each patch's
    rotation angles, whose cosine similarity is the mean ``cos(angle_i - angle_j)``: the relative
    position kernel RoPE puts on a query and key that are otherwise equal."""
    rope = getattr(model, "rope", None)
    if rope is not None:
        with torch.no_grad():
            cos, sin = rope(model.config.grid_size, torch.device("cpu"), torch.float64)
        return torch.cat([cos, sin], dim=1)
    pos = model.pos_embed
    if pos is None:
        return None
    pos = pos.detach().float().cpu()[0]  # (rows, D)
    N = model.config.num_patches
    if pos.shape[0] == N + model.num_prefix_tokens and model.num_prefix_tokens:
        pos = pos[model.num_prefix_tokens:]  # same rule as ViT._pos_embed: table covers the prefix
    return pos


def posemb_similarity(model) -> np.ndarray | None:
    """Cosine similarity of every patch position's embedding to every other: (gh, gw, gh, gw)."""
    pos = patch_pos_table(model)
    if pos is None:
        return None
    p = pos.double()
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = (p @ p.t()).numpy()  # (N, N)
    gh, gw = model.config.grid_size
    return sim.reshape(gh, gw, gh, gw)


def similarity_mosaic(sim: np.ndarray, pad: int = 1) -> np.ndarray:
    """(gh, gw, gh, gw) -> one image: a gh x gw grid of (gh, gw) tiles, NaN between tiles."""
    gh, gw = sim.shape[:2]
    H = gh * (gh + pad) - pad
    W = gw * (gw + pad) - pad
    out = np.full((H, W), np.nan)
    for i in range(gh):
        for j in range(gw):
            y, x = i * (gh + pad), j * (gw + pad)
            out[y:y + gh, x:x + gw] = sim[i, j]
    return out
