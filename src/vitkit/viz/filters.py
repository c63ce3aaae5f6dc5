"""Patch-embedding filters (Dosovitskiy et al. 2021, Figure 7 left).

The patch embedding is one linear map E: (P*P*C) -> D, stored as a conv kernel (D, C, ph, pw).
The paper shows the top principal components of E's D filters: the basis functions the first layer
uses to describe a patch. :func:`embedding_filters` centres the D filters, takes their SVD and
returns the first k right singular vectors (the principal axes, as sklearn's ``PCA.components_``),
each reshaped to a (ph, pw, C) image. The sign of a component is arbitrary; we fix it so that the
largest-magnitude entry is positive.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def embedding_filters(model, k: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """First ``k`` principal components of the patch-embedding filters.

    Returns ``(components (k, ph, pw, C), explained_variance_ratio (k,))``.
    """
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    w = model.patch_embed.proj.weight.detach().double().cpu().numpy()  # (D, C, ph, pw)
    D, C, ph, pw = w.shape
    X = w.reshape(D, C * ph * pw)
    X = X - X.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(X, full_matrices=False)
    k = min(k, vt.shape[0])
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * signs[:, None]
    var = s**2
    ratio = var[:k] / max(var.sum(), 1e-300)
    return comps.reshape(k, C, ph, pw).transpose(0, 2, 3, 1), ratio
