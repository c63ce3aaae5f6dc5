"""``search``: nearest neighbours by cosine similarity in an embeddings parquet file.

One module on purpose (~430 lines): the index and the queries it answers (a stored row, a file
whose row is fresh, or an image embedded the table's way) are one feature, read together; the
table it reads is :mod:`vitkit.features.table`.

Backends:

* ``exact``: every vector in memory as one (N, D) float32 tensor, L2-normalised, scores = q @ X.T
  with torch, top-k. Exact; the default while the matrix fits in ``exact_max_bytes``.
* ``flat``: FAISS ``IndexFlatIP`` on the normalised vectors: exact as well (the same neighbours
  as ``exact``), built by streaming the parquet file row group by row group.
* ``ivf``: FAISS ``IndexIVFFlat`` (inner product), ``nlist`` ~ sqrt(N) cells trained by k-means on
  a sample, ``nprobe`` cells searched per query: approximate (see ``recall_at_k``).
* ``hnsw``: FAISS ``IndexHNSWFlat`` (inner product), graph search: approximate.

A FAISS index is saved beside the parquet file (``FILE.parquet.<backend>.faiss`` plus a small
``.json`` fingerprint: the parquet file's :class:`vitkit.freshness.Stamp`, rows, dim, parameters)
and reused while the stamp is fresh by :func:`vitkit.freshness.check`; a changed parquet file gets
a fresh index.

Every vector is checked finite as it is read (a NaN row would rank first for every query): an
index holding NaN or inf is refused, naming the row.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..deps import require
from ..errors import ConfigError, InputError
from ..freshness import CHANGED, FRESH, Stamp, check, file_key, stamp
from ..io import atomic_write, atomic_write_text
from .table import META_KEY, STAMP_COLUMNS, refuse_non_finite

BACKENDS = ("auto", "exact", "flat", "ivf", "hnsw")
EXACT_MAX_BYTES = 2 << 30  # auto: exact torch search up to a 2 GiB matrix (~700k x 768), FAISS IVF beyond


def _l2_normalize_(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows divided by their L2 norm, into ``out`` (default: in place). One pass, no (N, D) temporary."""
    n = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    np.maximum(n, 1e-12, out=n)  # F.normalize's eps: a zero vector stays zero
    return np.divide(x, n, out=x if out is None else out)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_i & truth_i| / k, both (Q, k) neighbour ids."""
    Q, k = truth.shape
    hits = sum(len(set(found[q].tolist()) & set(truth[q].tolist())) for q in range(Q))
    return hits / float(Q * k)


class EmbeddingIndex:
    """The rows of an embeddings parquet file, searchable. ``EmbeddingIndex(path).search(q, k)``."""

    def __init__(self, path: str | Path, backend: str = "auto", *, nlist: int | None = None, nprobe: int = 32,
                 hnsw_m: int = 32, ef_search: int = 128, exact_max_bytes: int = EXACT_MAX_BYTES,
                 note: Callable = lambda s: None) -> None:
        self.pa = require("pyarrow", "search", "features")
        self.pq = require("pyarrow.parquet", "search", "features")
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such index file (write one with `vitkit embed`)")
        self._opened = self.path.stat()  # what a saved FAISS index may be stamped with (see faiss_index)
        try:
            self.file = self.pq.ParquetFile(self.path)
        except (OSError, self.pa.ArrowException) as e:
            raise InputError(f"{self.path}: not a parquet file ({e})") from e
        names = self.file.schema_arrow.names
        if "embedding" not in names:
            raise InputError(f"{self.path} has no 'embedding' column (columns: {', '.join(names)}); "
                             "expected a table written by `vitkit embed`")
        raw = (self.file.schema_arrow.metadata or {}).get(META_KEY)
        self.meta = json.loads(raw) if raw else {}
        self._stamped = all(c in names for c in STAMP_COLUMNS)  # tables of vitkit embed; not older or foreign ones
        self._stamp_table = None  # the stamp columns, read when a query needs them
        self._row_of_file: dict[str, int] | None = None
        cols = [c for c in ("path", "label") if c in names]
        small = self.file.read(columns=cols)
        self.rows = self.file.metadata.num_rows
        if self.rows == 0:
            raise InputError(f"{self.path} has no rows")
        self.paths = small.column("path").to_pylist() if "path" in cols else [str(i) for i in range(self.rows)]
        self.labels = small.column("label").to_pylist() if "label" in cols else [None] * self.rows
        self._row_of = {p: i for i, p in enumerate(self.paths)}
        self.dim = int(self.meta.get("dim") or self._first_dim())
        self.nlist, self.nprobe, self.hnsw_m, self.ef_search = nlist, nprobe, hnsw_m, ef_search
        self.note = note
        if backend == "auto":
            backend = "exact" if self.rows * self.dim * 4 <= exact_max_bytes else "ivf"
        self.backend = backend
        self._matrix: torch.Tensor | None = None
        self._faiss = None

    # ------------------------------------------------------------------ reading vectors
    def _first_dim(self) -> int:
        batch = next(self.file.iter_batches(batch_size=1, columns=["embedding"]))
        return len(batch.column(0)[0])

    def iter_vectors(self, batch_rows: int = 65536, writable: bool = True):
        """(B, D) float32 numpy blocks in row order; checks every row has ``dim`` values.
        ``writable=False`` may return read-only views of Arrow's memory (one copy fewer)."""
        pc = require("pyarrow.compute", "search", "features")
        at = 0
        for batch in self.file.iter_batches(batch_size=batch_rows, columns=["embedding"]):
            col = batch.column(0)
            if not self.pa.types.is_list(col.type) and not self.pa.types.is_large_list(col.type) \
                    and not self.pa.types.is_fixed_size_list(col.type):
                raise InputError(f"{self.path}: column 'embedding' is {col.type}, expected a list of floats")
            lengths = pc.list_value_length(col)
            lo, hi = pc.min_max(lengths).values()
            if col.null_count or lo.as_py() != self.dim or hi.as_py() != self.dim:
                raise InputError(f"{self.path}: every embedding should have {self.dim} values; found lengths "
                                 f"{lo.as_py()}..{hi.as_py()} ({col.null_count} null)")
            values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            if writable and not values.flags.writeable:  # Arrow's memory is read-only; callers normalise in place
                values = values.copy()
            block = values.reshape(len(batch), self.dim)
            refuse_non_finite(block, self.paths[at:at + len(batch)], str(self.path), at)
            at += len(batch)
            yield block

    def matrix(self) -> torch.Tensor:
        """All vectors, L2-normalised, as one (N, D) float32 tensor (one copy in memory)."""
        if self._matrix is None:
            out = np.empty((self.rows, self.dim), dtype=np.float32)
            at = 0
            for block in self.iter_vectors(writable=False):
                _l2_normalize_(block, out=out[at:at + len(block)])  # normalised while copied: one pass
                at += len(block)
            self._matrix = torch.from_numpy(out)
        return self._matrix

    def vectors_of(self, paths: list[str]) -> np.ndarray:
        """Stored vectors of rows given by path (for queries that are rows of the index)."""
        return self.vectors_of_rows([self._row_of[p] for p in paths])

    def vectors_of_rows(self, rows: list[int]) -> np.ndarray:
        """Stored vectors of rows by number, (len(rows), D) float32, checked finite."""
        tbl = self.file.read(columns=["embedding"]).take(self.pa.array(rows, self.pa.int64()))
        X = tbl.column(0).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(
            len(rows), self.dim).astype(np.float32)
        for r, x in zip(rows, X):
            refuse_non_finite(x[None], [self.paths[r]], str(self.path), r)
        return X

    def row_of(self, path: str) -> int | None:
        """The row stored under this name (its ``path`` as written), or None."""
        if path in self._row_of:
            return self._row_of[path]
        return self._row_of.get(os.path.normpath(path))

    def _stamps(self):
        if self._stamp_table is None:
            self._stamp_table = self.file.read(columns=list(STAMP_COLUMNS))
        return self._stamp_table

    def stamp_of(self, row: int) -> Stamp | None:
        """What a row was computed from (None: not a file, or a table that does not say)."""
        if not self._stamped:
            return None
        values = [self._stamps().column(c)[row].as_py() for c in STAMP_COLUMNS]
        return None if values[0] is None else Stamp(*values)

    def row_of_file(self, file: str | Path) -> int | None:
        """The row computed from this file (filed by :func:`vitkit.freshness.file_key`), or None."""
        if not self._stamped:
            return None
        if self._row_of_file is None:
            files = self._stamps().column("file").to_pylist()
            self._row_of_file = {f: i for i, f in enumerate(files) if f is not None}
        return self._row_of_file.get(file_key(file))

    # ------------------------------------------------------------------ FAISS
    def _fingerprint(self) -> dict:
        """What a saved FAISS index must have been built with (the table's stamp apart)."""
        return {"rows": self.rows, "dim": self.dim, "backend": self.backend, "nlist": self._nlist(),
                "hnsw_m": self.hnsw_m}

    def _nlist(self) -> int:
        if self.backend != "ivf":
            return 0
        # ~sqrt(N) cells, each with >= 39 training points (FAISS's k-means minimum)
        return int(self.nlist or max(1, min(int(np.sqrt(self.rows)), self.rows // 39)))

    def faiss_paths(self) -> tuple[Path, Path]:
        base = self.path.with_name(f"{self.path.name}.{self.backend}")
        return base.with_suffix(base.suffix + ".faiss"), base.with_suffix(base.suffix + ".json")

    def faiss_index(self):
        """Load the saved FAISS index if its fingerprint matches this parquet file, else build and save it."""
        if self._faiss is not None:
            return self._faiss
        faiss = require("faiss", f"the {self.backend} search backend", "features")
        index_path, fp_path = self.faiss_paths()
        fp = self._fingerprint()
        if index_path.is_file() and fp_path.is_file():
            state = self._saved_state(fp_path, fp)
            if state is not None:
                self._faiss = faiss.read_index(str(index_path))
                self.note(f"reusing FAISS {self.backend} index {index_path}")
                if state != fp:  # the table was only touched (same bytes): record its new mtime
                    atomic_write_text(fp_path, json.dumps(state, indent=1) + "\n")
                self._tune(self._faiss)
                return self._faiss
            self.note(f"{self.path} changed since {index_path} was built: rebuilding it")
        self.note(f"building FAISS {self.backend} index of {self.rows} x {self.dim} vectors (once; saved beside "
                  f"{self.path.name})")
        before = stamp(self.path)
        t0 = time.perf_counter()
        index = self._build(faiss)
        self.build_seconds = time.perf_counter() - t0
        if (before.size, before.mtime_ns) != (self._opened.st_size, self._opened.st_mtime_ns):
            # replaced since this object opened it: the index is of the rows read, not of the file now there
            self.note(f"{self.path} changed while it was read: the FAISS index is used once, not saved")
        else:
            atomic_write(index_path, lambda tmp: faiss.write_index(index, tmp))
            atomic_write_text(fp_path, json.dumps({"parquet": before.to_dict(), **fp}, indent=1) + "\n")
            self.note(f"built FAISS {self.backend} index of {self.rows} vectors in {self.build_seconds:.1f} s -> "
                      f"{index_path}")
        self._tune(index)
        self._faiss = index
        return index

    def _saved_state(self, fp_path: Path, fp: dict) -> dict | None:
        """The saved fingerprint (with the table's current stamp) when the saved index is of this
        table as it is now, else None."""
        try:
            saved = json.loads(fp_path.read_text())
            was = Stamp(**saved.pop("parquet"))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None  # unreadable, or written before the stamp: rebuild
        if saved != fp:
            return None
        state, now = check(was)
        return {"parquet": (now or was).to_dict(), **fp} if state == FRESH else None

    def _tune(self, index) -> None:
        if self.backend == "ivf":
            index.nprobe = min(self.nprobe, index.nlist)
        elif self.backend == "hnsw":
            index.hnsw.efSearch = max(self.ef_search, 1)

    def _build(self, faiss):
        d = self.dim
        if self.backend == "flat":
            index = faiss.IndexFlatIP(d)
        elif self.backend == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 40
        elif self.backend == "ivf":
            nlist = self._nlist()
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            # k-means on an evenly spaced sample (64 points per cell), never the whole file
            want = min(self.rows, 64 * nlist)
            take = np.unique(np.linspace(0, self.rows - 1, want).astype(np.int64))
            sample, at = [], 0
            for block in self.iter_vectors():
                sel = take[(take >= at) & (take < at + len(block))] - at
                if len(sel):
                    sample.append(_l2_normalize_(block[sel].copy()))
                at += len(block)
            index.train(np.concatenate(sample))
        else:  # pragma: no cover
            raise ConfigError(f"no FAISS index for backend {self.backend!r}")
        for block in self.iter_vectors():  # streamed: the parquet file is never held whole
            index.add(_l2_normalize_(block))
        return index

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) query vectors -> (scores (Q, k) cosine similarity, row ids (Q, k)), best first."""
        q = np.asarray(queries.detach().cpu() if isinstance(queries, torch.Tensor) else queries, dtype=np.float32)
        if q.ndim != 2:
            raise InputError(f"queries should be (Q, D), got shape {q.shape}")
        if q.shape[1] != self.dim:
            raise InputError(f"query vectors have {q.shape[1]} dimensions, the index {self.path} has {self.dim} "
                             f"(made with model {self.meta.get('model')!r}, pool {self.meta.get('pool')!r}, "
                             f"layers {self.meta.get('layers')}); embed the queries the same way")
        if k < 1:
            raise InputError(f"top-k must be >= 1, got {k}")
        if not np.isfinite(q).all():
            raise InputError(f"query vector(s) {np.flatnonzero(~np.isfinite(q).all(1)).tolist()} hold NaN or inf; "
                             "a non-finite vector has no cosine similarity")
        k = min(k, self.rows)
        q = _l2_normalize_(q.copy())
        if self.backend == "exact":
            X = self.matrix()
            scores, ids = [], []
            for s in range(0, len(q), 256):  # bounded (256, N) score block
                sim = torch.from_numpy(q[s:s + 256]) @ X.T
                v, i = sim.topk(k, dim=1)
                scores.append(v.numpy())
                ids.append(i.numpy())
            return np.concatenate(scores), np.concatenate(ids)
        index = self.faiss_index()
        scores, ids = index.search(q, k)
        return scores, ids

    def search_streamed(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exact search reading the parquet file block by block (memory bounded whatever its size):
        the reference an approximate backend's recall is measured against."""
        q = torch.from_numpy(_l2_normalize_(np.array(queries, dtype=np.float32, copy=True)))
        if q.shape[1] != self.dim:
            raise InputError(f"query vectors have {q.shape[1]} dimensions, the index {self.path} has {self.dim}")
        k = min(k, self.rows)
        best_s = torch.full((len(q), 0), -float("inf"))
        best_i = torch.zeros((len(q), 0), dtype=torch.long)
        at = 0
        for block in self.iter_vectors():
            sim = q @ torch.from_numpy(_l2_normalize_(block)).T  # (Q, B)
            s = torch.cat([best_s, sim], 1)
            i = torch.cat([best_i, torch.arange(at, at + len(block)).expand(len(q), -1)], 1)
            best_s, pos = s.topk(min(k, s.shape[1]), dim=1)
            best_i = i.gather(1, pos)
            at += len(block)
        return best_s.numpy(), best_i.numpy()

    def neighbors(self, scores: np.ndarray, ids: np.ndarray) -> list[list[dict]]:
        return [[{"path": self.paths[i], "score": float(s), "label": self.labels[i]}
                 for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]


_BUILT_IN = ("sample:", "digits:")  # vitkit's bundled images: never files, never changing


def resolve_queries(index: EmbeddingIndex, queries: list[str]
                    ) -> tuple[dict[str, int], dict[str, str], list[tuple[str, str]]]:
    """Each query by the rule of :mod:`vitkit.freshness`: (query -> row whose stored vector it
    takes, query -> image to embed, [(query, why it cannot be used)]).

    * A path to an existing file is that file: the row computed from it (same absolute path)
      gives its vector while the file is unchanged since, else the file is embedded. A row that
      merely has the same relative name is never used: from another folder it is another picture.
    * Any other query names a row by its stored path. A row of a file stands for that file (its
      vector while fresh, the file embedded again when it changed, unusable when it is gone); a
      row of no file (a dataset row, a vector written by ``write_embeddings``, a table without
      stamps) gives its stored vector.
    * Anything else is embedded (``digits:N`` / ``sample:`` images; a missing file is then
      reported unreadable).
    """
    stored: dict[str, int] = {}
    to_embed: dict[str, str] = {}
    unusable: list[tuple[str, str]] = []
    for q in dict.fromkeys(queries):
        if not q.startswith(_BUILT_IN) and os.path.isfile(q):
            r = index.row_of_file(q)
            if r is not None and check(index.stamp_of(r))[0] == FRESH:
                stored[q] = r
            else:
                to_embed[q] = q
            continue
        r = index.row_of(q)
        st = None if r is None else index.stamp_of(r)
        if r is None:
            to_embed[q] = q
        elif st is None:
            stored[q] = r
        else:
            state = check(st)[0]
            if state == FRESH:
                stored[q] = r
            elif state == CHANGED:
                to_embed[q] = st.file
            else:  # gone
                unusable.append((q, f"{q}: no such file here, and {st.file}, which its row of the index was "
                                    "computed from, is gone"))
    return stored, to_embed, unusable


def query_vectors(index: EmbeddingIndex, queries: list[str], *, model=None, device: str = "cpu",
                  batch_size: int = 64, workers: int = 0) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """The vectors of queries resolved by :func:`resolve_queries`: stored vectors of fresh rows,
    images embedded the way the index was made (with ``model``, else the model recorded in the
    index's metadata, loaded onto ``device`` only when an image needs it).
    Returns (the queries that could be used, their vectors (Q, D), the others with why)."""
    stored, to_embed, skipped = resolve_queries(index, queries)
    vecs: dict[str, np.ndarray] = {}
    if stored:
        vecs.update(zip(stored, index.vectors_of_rows(list(stored.values()))))
    if to_embed:
        from .embed import file_dataset, iter_features
        from .extract import FeatureExtractor, FeatureSpec

        names, files = list(to_embed), list(to_embed.values())
        if model is None:
            source = index.meta.get("model")
            if not source:
                raise InputError(f"{index.path} does not record the model that made it; pass --model to embed "
                                 f"the query images ({', '.join(names[:3])})")
            from .. import from_pretrained

            model = from_pretrained(source, device=device).eval()
        m = index.meta
        spec = FeatureSpec(pool=m.get("pool", "model"), layers=int(m.get("layers", 1)),
                           normalize=bool(m.get("normalize", False)), dtype=m.get("dtype", "fp32"))
        for idx, f, failures in iter_features(FeatureExtractor(model, spec), file_dataset(model, files),
                                              batch_size=batch_size, workers=workers, progress=False):
            for i, row in zip(idx, f):
                bad = int((~np.isfinite(row)).sum())
                if bad:
                    skipped.append((names[i], f"{names[i]}: the model's output for it is not finite ({bad} of "
                                              f"{row.size} values are NaN or inf)"))
                else:
                    vecs[names[i]] = row
            skipped += [(names[i], msg) for i, msg in failures]
    found = [q for q in queries if q in vecs]
    X = np.stack([vecs[q] for q in found]) if found else np.zeros((0, index.dim), np.float32)
    return found, X, skipped


def search_images(index: EmbeddingIndex, queries: list[str], k: int = 10, *, model=None, device: str = "cpu",
                  batch_size: int = 64, workers: int = 0) -> tuple[list[dict], list[tuple[str, str]]]:
    """The JSON of ``vitkit search``: ``[{"query", "neighbors": [{"path", "score", "label"}]}]``,
    and the unreadable queries (see :func:`query_vectors`)."""
    found, X, skipped = query_vectors(index, queries, model=model, device=device, batch_size=batch_size,
                                      workers=workers)
    if not found:
        return [], skipped
    scores, ids = index.search(X, k)
    return [{"query": q, "neighbors": n} for q, n in zip(found, index.neighbors(scores, ids))], skipped
