"""Class-specific relevance: Chefer, Gur & Wolf, "Generic Attention-model Explainability for
Interpreting Bi-Modal and Encoder-Decoder Transformers" (ICCV 2021), the self-attention rule.

For the logit ``y_c`` of class c and every layer l with attention weights ``A_l`` (heads, T, T)::

    Abar_l = mean_heads( (dy_c/dA_l * A_l)^+ )           gradient-weighted attention, positive part
    R_0 = I (T x T);   R_l = R_{l-1} + Abar_l @ R_{l-1}  (layer 0 first)

Row q of ``R_L`` says how relevant each input token is to token q's output for class c; the
class-token row (or, with mean pooling, the mean over the patch rows, which is what the pooled
output averages) over the patches is the map the paper draws.

The attention weights are the ones the model's own attention path returns,
``model(x, return_attention=True)``: the explicit softmax whose output feeds ``attn @ v``, so
they are part of the autograd graph and ``torch.autograd.grad`` w.r.t. them is exact (no
re-implementation of the model, no hooks).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError


def attention_with_relevance(model, x: torch.Tensor, classes: Sequence[int] | None = None, topk: int = 3):
    """One forward with attention weights and one backward per class.

    Args:
        model: a :class:`vitkit.ViT` (put in eval mode for the call).
        x: (1, C, H, W) input (only the first image is used).
        classes: class indices to explain; None = the ``topk`` highest logits.

    Returns ``(logits (K_all,), attentions (L, heads, T, T) float32 numpy, classes (K,),
    relevance (K, L, T, T) float64 numpy)`` where ``relevance[k, l]`` is ``R_l`` for class
    ``classes[k]`` (after layers 0..l). Models without a classification head (num_classes == 0,
    regression) get an empty relevance array.
    """
    was_training = model.training
    model.eval()
    x = x[:1]
    try:
        with torch.enable_grad():
            logits, attns = model(x, return_attention=True)
            attns = list(attns)
            out = logits[0]
            c = model.config
            explain = c.num_classes > 0 and getattr(c, "task", "classification") != "regression"
            if not explain:
                classes = []
            elif classes is None:
                classes = out.detach().topk(min(topk, out.numel())).indices.tolist()
            classes = [int(k) for k in classes]
            for k in classes:
                if not 0 <= k < out.numel():
                    raise InputError(f"class index {k} out of range: the model has {out.numel()} outputs")
            L = len(attns)
            _, H, T, _ = attns[0].shape
            rel = np.zeros((len(classes), L, T, T))
            for i, k in enumerate(classes):
                grads = torch.autograd.grad(out[k], attns, retain_graph=i < len(classes) - 1)
                R = torch.eye(T, dtype=torch.float64)
                for layer, (a, g) in enumerate(zip(attns, grads)):
                    abar = (g[0] * a[0]).clamp(min=0).mean(dim=0).double().detach().cpu()  # (T, T)
                    R = R + abar @ R
                    rel[i, layer] = R.numpy()
    finally:
        model.train(was_training)
    A = np.stack([a[0].detach().float().cpu().numpy() for a in attns])
    return out.detach().float().cpu(), A, np.asarray(classes, dtype=np.int64), rel


def relevance_map(model, x: torch.Tensor, cls: int | None = None, query: str | None = None) -> np.ndarray:
    """The readout query's row of ``R_L`` over the patches, a (gh, gw) map, for class ``cls``
    (None = the predicted class). The readout query is the class token when the model pools it,
    else the mean over the patch rows (see :func:`vitkit.viz.readout_query`)."""
    from .attention import _query_rows, readout_query

    c = model.config
    _, _, _, rel = attention_with_relevance(model, x, None if cls is None else [cls], topk=1)
    if rel.shape[0] == 0:
        raise InputError("relevance needs a classification head (this model has num_classes=0 or regresses)")
    R = c.num_prefix_tokens
    row = _query_rows(rel[0, -1], query or readout_query(model), R)
    return row[R:].reshape(c.grid_size)
