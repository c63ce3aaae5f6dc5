"""vitkit search: exact search returns the brute-force nearest neighbours; FAISS flat equals it;
IVF / HNSW report recall@k; the FAISS index is saved, reused and rebuilt when the table changes;
query images are embedded the way the index was made; bad indexes give clear errors."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from features_helpers import tiny_model, write_digits

pq = pytest.importorskip("pyarrow.parquet")

from vitkit.errors import ConfigError, InputError  # noqa: E402
from vitkit.features import (  # noqa: E402
    EmbeddingIndex,
    embed_files,
    recall_at_k,
    search_images,
    write_embeddings,
)


def clustered(n: int, d: int, seed: int = 0, centers: int = 20) -> np.ndarray:
    """Vectors around a few centres (embeddings have structure; uniform noise has no neighbours)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    return (c[rng.integers(0, centers, n)] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)


def brute_force(X: np.ndarray, Q: np.ndarray, k: int):
    """The oracle: cosine similarity of every pair in float64, sorted."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    sim = Qn.astype(np.float64) @ Xn.astype(np.float64).T
    ids = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, ids, 1), ids


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    X = clustered(3000, 24)
    paths = [f"img/{i:05d}.png" for i in range(len(X))]
    labels = [str(i % 7) for i in range(len(X))]
    path = write_embeddings(tmp / "t.parquet", paths, labels, X, meta={"pool": "model"}, row_group_size=1000)
    return tmp, path, X


def test_exact_returns_true_nearest_neighbours(table):
    tmp, path, X = table
    Q = clustered(40, 24, seed=1)
    index = EmbeddingIndex(path, backend="exact")
    scores, ids = index.search(Q, 10)
    ref_s, ref_i = brute_force(X, Q, 10)
    assert np.array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    assert EmbeddingIndex(path).backend == "exact"  # auto picks exact for a small table
    # a row used as a query finds itself first
    n = index.neighbors(*index.search(X[[17]], 3))[0]
    assert n[0]["path"] == "img/00017.png" and n[0]["label"] == str(17 % 7) and abs(n[0]["score"] - 1) < 1e-5


def test_faiss_flat_equals_exact_and_is_saved_reused_rebuilt(table):
    pytest.importorskip("faiss")
    tmp, path, X = table
    Q = clustered(40, 24, seed=2)
    notes = []
    exact = EmbeddingIndex(path, backend="exact").search(Q, 10)
    flat = EmbeddingIndex(path, backend="flat", note=notes.append)
    s, i = flat.search(Q, 10)
    assert np.array_equal(i, exact[1])
    np.testing.assert_allclose(s, exact[0], atol=1e-5)
    index_file, fp_file = flat.faiss_paths()
    assert index_file.is_file() and fp_file.is_file() and "built" in notes[-1]
    again = EmbeddingIndex(path, backend="flat", note=notes.append)
    assert np.array_equal(again.search(Q, 10)[1], i) and "reusing" in notes[-1]
    # the parquet file changes (new rows): the saved index is stale and gets rebuilt
    X2 = np.concatenate([X, Q[:1]])
    p2 = [f"img/{k:05d}.png" for k in range(len(X2))]
    write_embeddings(path, p2, [None] * len(X2), X2)
    os.utime(path, ns=(1, 1))  # distinct mtime even on coarse clocks
    fresh = EmbeddingIndex(path, backend="flat", note=notes.append)
    s3, i3 = fresh.search(Q[:1], 1)
    assert "rebuilding" in notes[-3] and "built" in notes[-1]
    assert i3[0, 0] == len(X) and abs(s3[0, 0] - 1) < 1e-5  # the added row is found
    write_embeddings(path, p2[:len(X)], [str(k % 7) for k in range(len(X))], X)  # restore for other tests


@pytest.mark.parametrize("backend,min_recall", [("ivf", 0.8), ("hnsw", 0.8)])
def test_approximate_backends_report_recall(table, backend, min_recall):
    pytest.importorskip("faiss")
    tmp, path, X = table
    Q = clustered(50, 24, seed=3)
    _, truth = brute_force(X, Q, 10)
    index = EmbeddingIndex(path, backend=backend, nprobe=8)
    _, ids = index.search(Q, 10)
    r = recall_at_k(ids, truth)
    assert min_recall <= r <= 1.0
    # the streamed exact search (the recall reference for tables too big for memory) is exact too
    _, streamed = EmbeddingIndex(path, backend=backend).search_streamed(Q, 10)
    assert np.array_equal(streamed, truth)
    # recall_at_k itself, on a hand-made case: 1 of 2 right for the first query, 2 of 2 for the second
    assert recall_at_k(np.array([[1, 9], [3, 4]]), np.array([[1, 2], [4, 3]])) == 0.75


def test_cli_reports_recall_of_an_approximate_backend(table, capsys):
    pytest.importorskip("faiss")
    tmp, path, X = table
    from vitkit.cli.main import main

    queries = [f"img/{i:05d}.png" for i in range(0, 3000, 100)]  # rows of the index as queries
    assert main(["search", "--index", str(path), *queries, "--backend", "ivf", "--nprobe", "1", "--top-k", "10",
                 "--report-recall", "--json"]) == 0
    cap = capsys.readouterr()
    got = json.loads(cap.out)
    _, truth = brute_force(X, X[::100], 10)
    found = np.array([[int(n["path"][4:9]) for n in r["neighbors"]] for r in got])
    want = recall_at_k(found, truth)
    assert f"recall@10 of ivf against exact search on these 30 queries: {want:.4f}" in cap.err


def test_bad_indexes_are_clear_errors(table, tmp_path):
    pa = pytest.importorskip("pyarrow")
    tmp, path, X = table
    no_emb = tmp_path / "noemb.parquet"
    pq.write_table(pa.table({"path": ["a"], "vector": [[1.0, 2.0]]}), no_emb)
    with pytest.raises(InputError, match="no 'embedding' column.*path, vector"):
        EmbeddingIndex(no_emb)
    with pytest.raises(InputError, match="query vectors have 5 dimensions, the index .* has 24"):
        EmbeddingIndex(path).search(np.ones((1, 5), np.float32), 3)
    with pytest.raises(InputError, match="no such index file"):
        EmbeddingIndex(tmp_path / "missing.parquet")
    with pytest.raises(ConfigError, match="backend must be one of"):
        EmbeddingIndex(path, backend="annoy")
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"path": ["a", "b"], "embedding": [[1.0, 2.0], [1.0]]}), ragged)
    with pytest.raises(InputError, match="every embedding should have 2 values"):
        EmbeddingIndex(ragged).search(np.ones((1, 2), np.float32), 1)


def test_missing_faiss_names_the_extra(table, monkeypatch):
    tmp, path, X = table
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ConfigError, match=r"faiss-cpu.*vitkit\[features\]"):
        EmbeddingIndex(path, backend="hnsw").search(X[:1], 1)


def test_image_queries_embedded_like_the_index_and_cli_json(tmp_path, capsys):
    files = write_digits(tmp_path / "imgs", per_class=2)
    model, mdir = tiny_model(tmp_path)
    out = tmp_path / "e.parquet"
    embed_files(model, [tmp_path / "imgs"], out, source=str(mdir), batch_size=8, progress=False)
    copy = tmp_path / "query.png"  # same pixels, a path the index does not hold
    copy.write_bytes(files[5].read_bytes())
    index = EmbeddingIndex(out)
    results, skipped = search_images(index, [str(copy)], k=3)  # model loaded from the index's metadata
    assert not skipped and results[0]["neighbors"][0]["path"] == str(files[5])
    assert results[0]["neighbors"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    from vitkit.cli.main import main

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    rc = main(["search", "--index", str(out), str(files[0]), str(copy), str(bad), "--top-k", "4", "--json"])
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert rc == 1 and "skipped 1 unreadable" in captured.err and "bad.png" in captured.err
    assert [r["query"] for r in got] == [str(files[0]), str(copy)]
    for r in got:
        assert len(r["neighbors"]) == 4 and set(r["neighbors"][0]) == {"path", "score", "label"}
        assert [n["score"] for n in r["neighbors"]] == sorted((n["score"] for n in r["neighbors"]), reverse=True)
    assert got[0]["neighbors"][0] == {"path": str(files[0]), "score": pytest.approx(1.0, abs=1e-5),
                                      "label": files[0].parent.name}
    # an index of another width than the model: a clear error, not garbage
    write_embeddings(tmp_path / "w.parquet", ["a"], [None], np.ones((1, 7), np.float32), meta={"model": str(mdir)})
    assert main(["search", "--index", str(tmp_path / "w.parquet"), str(copy)]) == 2
    assert "query vectors have 32 dimensions" in capsys.readouterr().err
