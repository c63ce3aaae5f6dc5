"""vitkit search: nearest neighbours (cosine) of query images in an embeddings parquet file."""

from __future__ import annotations

HELP = "find the nearest neighbours of images (or of a text: --text) in a table written by vitkit embed"
DESCRIPTION = ("Nearest neighbours by cosine similarity. A query that is an existing file is that file: the "
               "row computed from it (same absolute path) gives its vector while the file is unchanged since, "
               "else it is embedded with the model and settings recorded in the index. Any other query names a "
               "row of the index by its stored path (checked against its file the same way). A --text query is "
               "embedded by the text tower of the image-text model that made the index (CLIP, SigLIP: images "
               "embedded with --pool head, or texts with `vitkit embed --text`); an index of another model is refused. "
               "Exact torch search while the vectors fit in memory, FAISS beyond (saved beside the index and "
               "reused until the parquet file changes).")


def add_arguments(p) -> None:
    p.add_argument("queries", nargs="*", metavar="QUERY",
                   help="image files, or paths of rows in the index as stored (when no such file is here)")
    p.add_argument("--text", "-t", action="append", default=[], metavar="TEXT",
                   help="a text query (repeatable), embedded by the text tower of the image-text model that made the "
                        "index (CLIP, SigLIP; images embedded with --pool head)")
    p.add_argument("--tokenizer", default=None,
                   help="with --text: tokenizer files for checkpoints that ship none (see `vitkit zeroshot --help`)")
    p.add_argument("--index", "-i", required=True, help="parquet file written by vitkit embed")
    p.add_argument("--top-k", "-k", type=int, default=10, help="neighbours per query")
    p.add_argument("--json", action="store_true", help="print a JSON list of {query, neighbors: [{path, score, label}]}")
    p.add_argument("--backend", default="auto", choices=["auto", "exact", "flat", "ivf", "hnsw"],
                   help="auto = exact (torch) up to a 2 GiB matrix, else FAISS ivf; flat = FAISS exact; "
                        "ivf / hnsw = FAISS approximate")
    p.add_argument("--nprobe", type=int, default=32, help="ivf: cells searched per query (more = better recall)")
    p.add_argument("--ef-search", type=int, default=128, help="hnsw: search breadth (more = better recall)")
    p.add_argument("--report-recall", action="store_true",
                   help="with ivf / hnsw: also search exactly (streamed) and report recall@k of these queries")
    p.add_argument("--model", "-m", default=None,
                   help="model for query images (default: the one recorded in the index); text queries take the "
                        "index's own model only")
    p.add_argument("--device", default="cpu", help="torch device for embedding query images")
    p.add_argument("--batch-size", "-b", type=int, default=64, help="query images per forward pass")


def run(args) -> int:
    import json
    import sys

    import numpy as np

    from ..errors import ConfigError
    from ..features import EmbeddingIndex, query_vectors, recall_at_k
    from .embed import print_skipped, recorded_source

    if not args.queries and not args.text:
        raise ConfigError("nothing to search for: give query images, or --text \"a red car\"")
    note = lambda s: print(f"vitkit search: {s}", file=sys.stderr)  # noqa: E731
    index = EmbeddingIndex(args.index, backend=args.backend, nprobe=args.nprobe, ef_search=args.ef_search, note=note)
    model = None
    if args.model and args.queries:
        from .. import from_pretrained

        model = from_pretrained(args.model, device=args.device).eval()
    # without --model, the index's own model is loaded only if a query has to be embedded
    found, vecs, skipped = query_vectors(index, args.queries, model=model, device=args.device,
                                         batch_size=args.batch_size)
    if args.text:
        from ..features.zeroshot import text_query_vectors

        tv = text_query_vectors(index, args.text, source=recorded_source(args.model) if args.model else None,
                                device=args.device, tokenizer=args.tokenizer, note=note)
        found, vecs = found + list(args.text), np.concatenate([vecs, tv]) if len(vecs) else tv
    results = []
    if found:
        scores, ids = index.search(vecs, args.top_k)
        results = [{"query": q, "neighbors": n} for q, n in zip(found, index.neighbors(scores, ids))]
        if args.report_recall:
            if index.backend in ("exact", "flat"):
                note(f"{index.backend} search is exact: recall@{args.top_k} = 1")
            else:
                _, truth = index.search_streamed(vecs, args.top_k)
                note(f"recall@{args.top_k} of {index.backend} against exact search on these {len(found)} "
                     f"queries: {recall_at_k(ids, truth):.4f}")
    if args.json:
        print(json.dumps(results, indent=2, allow_nan=False))  # scores are finite: index and queries are checked
    else:
        for r in results:
            print(r["query"])
            for rank, n in enumerate(r["neighbors"], 1):
                label = f"  [{n['label']}]" if n["label"] is not None else ""
                print(f"  {rank:>3}. {n['score']:.4f}  {n['path']}{label}")
    print_skipped("search", skipped)
    return 1 if skipped else 0
