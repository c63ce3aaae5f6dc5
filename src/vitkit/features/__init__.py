"""Features: embed images into a parquet table, search it, and measure a backbone (k-NN, linear probe).

Python API (the ``vitkit embed / search / knn / probe`` commands call these)::

    from vitkit.features import FeatureSpec, FeatureExtractor, embed_files, EmbeddingIndex, search_images
    res = embed_files(model, ["photos/"], "photos.parquet", spec=FeatureSpec(pool="cls", normalize=True),
                      source="path/to/model")
    index = EmbeddingIndex("photos.parquet")               # exact torch search, FAISS when large
    results, skipped = search_images(index, ["query.jpg"], k=5)
    knn_on_dataset(model, "digits")                        # {"top1", "top5", ...}
    probe_on_dataset(model, "digits")                      # {"top1", "top5", "C", "sweep", ...}
    clf = ZeroShotClassifier(vitkit.load_image_text(src), ["cat", "dog"], "imagenet")  # zero-shot

pyarrow and faiss-cpu come with the ``vitkit[features]`` extra.
"""

from .embed import EmbedResult, embed_dataset, embed_files, labelled_features
from .extract import POOLS, FeatureExtractor, FeatureSpec
from .knn import knn_evaluate, knn_on_dataset, knn_scores, topk_accuracy
from .probe import DEFAULT_CS, linear_probe, probe_on_dataset
from .search import BACKENDS, EmbeddingIndex, query_vectors, recall_at_k, search_images
from .table import read_meta, write_embeddings
from .zeroshot import ZeroShotClassifier, ZeroShotHead, classify_files, encode_texts, zeroshot_weights

__all__ = [
    "FeatureSpec", "FeatureExtractor", "POOLS", "embed_files", "embed_dataset", "EmbedResult", "read_meta",
    "labelled_features", "write_embeddings", "EmbeddingIndex", "search_images", "query_vectors", "recall_at_k", "BACKENDS", "knn_scores",
    "knn_evaluate", "knn_on_dataset", "topk_accuracy", "linear_probe", "probe_on_dataset", "DEFAULT_CS",
    "ZeroShotHead", "ZeroShotClassifier", "zeroshot_weights", "classify_files", "encode_texts",
]
