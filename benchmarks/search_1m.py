"""`vitkit search` over 1,000,000 synthetic 768-d vectors: index build time, query latency and
recall@10 of each backend against exact search.

The vectors are clustered (1,000 unit-norm centres plus noise, as embeddings of real images are;
see ``blocks``; pure noise in 768-d has no meaningful neighbours and makes every approximate index
look bad). They
are written once as an embeddings parquet table (streamed, 3 GB for 1M x 768 float32) and
searched through ``vitkit.features.EmbeddingIndex`` exactly as ``vitkit search`` does. At most one
copy of the vectors is in memory at a time: each backend is dropped before the next is built.

    python benchmarks/search_1m.py                      # ~3-4 min on 2 cores, ~4 GB RAM, 3 GB in $TMPDIR
    python benchmarks/search_1m.py --n 20000 --dim 64 --queries 100     # sanity run, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def blocks(n: int, dim: int, centers: np.ndarray, seed: int, block: int = 65536):
    """Unit-norm centres plus isotropic noise of norm ~1 (same-centre pairs at cosine ~0.5,
    strangers ~0; clusters touch, so an approximate index has work to do). Noise that swamps the
    centres (norm >> 1) makes every vector nearly equidistant in 768-d, where no index, and no
    user, finds meaningful neighbours; much smaller noise makes every index look perfect."""
    rng = np.random.default_rng(seed)
    sigma = np.float32(1.0 / np.sqrt(dim))
    for s in range(0, n, block):
        m = min(block, n - s)
        yield centers[rng.integers(0, len(centers), m)] + sigma * rng.standard_normal((m, dim), dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    ap.add_argument("--dim", type=int, default=768, help="vector width")
    ap.add_argument("--queries", type=int, default=500, help="query vectors (same distribution, not in the index)")
    ap.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    ap.add_argument("--nprobe", default="1,8,32", help="IVF cells searched per query (comma-separated sweep)")
    ap.add_argument("--hnsw", action="store_true", help="also build HNSW (slow to build on 2 cores: ~10+ min at 1M)")
    ap.add_argument("--tmp", default=None, help="folder for the parquet file (default: the system temp dir)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    import torch

    from vitkit.features import EmbeddingIndex, recall_at_k, write_embeddings

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((1000, args.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    queries = next(blocks(args.queries, args.dim, centers, seed=1, block=args.queries))
    res: dict = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k,
                 "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        path = Path(d) / "synthetic.parquet"
        t0 = time.perf_counter()
        write_embeddings(path, [f"v/{i}" for i in range(args.n)], [None] * args.n,
                         blocks(args.n, args.dim, centers, seed=2))
        res["write_parquet_s"] = time.perf_counter() - t0
        print(f"wrote {args.n} x {args.dim} vectors in {res['write_parquet_s']:.1f} s "
              f"({path.stat().st_size / 2**30:.2f} GiB)", flush=True)

        def latency(index, label):
            index.search(queries[:1], args.k)  # warm
            t = time.perf_counter()
            for q in queries[:10]:
                index.search(q[None], args.k)
            one = (time.perf_counter() - t) / 10
            t = time.perf_counter()
            _, ids = index.search(queries, args.k)
            batch = time.perf_counter() - t
            print(f"{label}: single query {one * 1e3:.1f} ms; {args.queries} queries batched {batch:.2f} s "
                  f"({batch / args.queries * 1e3:.2f} ms/query)", flush=True)
            return ids, {"single_query_ms": one * 1e3, "batched_ms_per_query": batch / args.queries * 1e3}

        # exact (torch): the ground truth
        t = time.perf_counter()
        exact = EmbeddingIndex(path, backend="exact")
        exact.matrix()
        load = time.perf_counter() - t
        truth, lat = latency(exact, "exact (torch)")
        res["exact"] = {"load_s": load, **lat, "recall": 1.0}
        del exact
        gc.collect()

        for backend in ["flat", "ivf"] + (["hnsw"] if args.hnsw else []):
            for p in Path(d).glob("*.faiss"):
                p.unlink()
            t = time.perf_counter()
            index = EmbeddingIndex(path, backend=backend)
            index.faiss_index()
            build = time.perf_counter() - t
            print(f"{backend}: built in {build:.1f} s", flush=True)
            if backend == "ivf":
                res["ivf"] = {"build_s": build, "nlist": index._nlist(), "by_nprobe": {}}
                for nprobe in [int(v) for v in args.nprobe.split(",")]:
                    index.nprobe = nprobe
                    index._tune(index.faiss_index())
                    ids, lat = latency(index, f"ivf nprobe={nprobe}")
                    r = recall_at_k(ids, truth)
                    print(f"ivf nprobe={nprobe}: recall@{args.k} {r:.4f}", flush=True)
                    res["ivf"]["by_nprobe"][nprobe] = {**lat, "recall": r}
            else:
                ids, lat = latency(index, backend)
                r = recall_at_k(ids, truth)
                print(f"{backend}: recall@{args.k} {r:.4f}", flush=True)
                res[backend] = {"build_s": build, **lat, "recall": r}
            del index
            gc.collect()
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
