"""See inside a ViT: patches, tokens, patch-embedding filters, position-embedding similarity,
attention maps, attention rollout, mean attention distance, and an HTML report.

Maps are numpy arrays; figures are matplotlib Figures on the Agg canvas (no pyplot state)::

    from vitkit import viz
    maps = viz.attention_maps(model, x, layers=[0, -1])      # (2, heads, gh, gw)
    _, attns = viz.get_attentions(model, x)                  # model(x, return_attention=True)
    R = viz.rollout(attns)                                   # (B, T, T)
    d = viz.mean_attention_distance(attns, grid, patch_size) # (depth, heads) pixels
    sim = viz.posemb_similarity(model)                       # (gh, gw, gh, gw)
    comps, ratio = viz.embedding_filters(model, k=28)        # (k, ph, pw, C)
    ex = viz.explain(model, "digits:0"); viz.write_report(ex, "explain_out")
    viz.write_explore(model, "digits:0", "explain_out")      # explore.html, the interactive page
    logits, A, classes, R = viz.attention_with_relevance(model, x, topk=3)  # Chefer et al. 2021
    (rgb,), (fg,), _ = viz.pca_rgb([feats], [grid])           # DINOv2-style PCA, foreground mask
    sim, top = viz.correspondence(feats_a, feats_b, k=5)     # patch matches A -> B
"""

from .attention import (
    attention_maps,
    check_indices,
    get_attentions,
    mean_attention_distance,
    model_attention_distance,
    patch_centers,
    pool_attention,
    prefix_attention,
    readout_maps,
    readout_query,
    rollout,
    rollout_map,
)
from .attribution import attention_with_relevance, relevance_map
from .dense import block_tokens, correspondence, pca_rgb, token_norms
from .explore import explore, explore_data, render_explore, write_explore
from .figures import (
    attention_figure,
    distance_figure,
    filters_figure,
    patch_grid_figure,
    posemb_figure,
    predictions_figure,
    rollout_figure,
    to_png,
    token_figure,
    upsample,
)
from .filters import embedding_filters
from .patches import display_image, patch_tokens
from .posemb import posemb_similarity
from .report import Explanation, explain, render_html, write_report

__all__ = [
    "attention_maps", "check_indices", "get_attentions", "mean_attention_distance", "model_attention_distance",
    "patch_centers", "pool_attention", "prefix_attention", "readout_maps", "readout_query", "rollout", "rollout_map", "attention_figure",
    "distance_figure", "filters_figure", "patch_grid_figure", "posemb_figure", "predictions_figure",
    "rollout_figure", "to_png", "token_figure", "upsample", "embedding_filters", "display_image",
    "patch_tokens", "posemb_similarity", "Explanation", "explain", "render_html", "write_report",
    "attention_with_relevance", "relevance_map", "explore", "explore_data", "render_explore", "write_explore",
    "block_tokens", "correspondence", "pca_rgb", "token_norms",
]
