"""vitkit knn / probe: the weighted k-NN against the formula written out in numpy, the linear probe
against scikit-learn's LogisticRegression on the same features, and datasets without labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from features_helpers import tiny_model, write_digits
from vitkit.errors import InputError
from vitkit.features import (
    FeatureSpec,
    knn_evaluate,
    knn_on_dataset,
    knn_scores,
    labelled_features,
    linear_probe,
    probe_on_dataset,
    topk_accuracy,
)


def numpy_knn(train_x, train_y, test_x, C, k, T):
    """DINO's weighted k-NN, one test vector at a time, straight from the formula."""
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    out = np.zeros((len(test_x), C))
    for q, v in enumerate(test_x):
        sim = tr @ (v / np.linalg.norm(v))
        nn = np.argsort(-sim, kind="stable")[:k]
        for j in nn:
            out[q, train_y[j]] += np.exp(sim[j] / T)
    return out


def test_knn_matches_the_formula():
    rng = np.random.default_rng(0)
    C = 6
    centers = rng.standard_normal((C, 16))
    train_y = rng.integers(0, C, 300)
    test_y = rng.integers(0, C, 80)
    train_x = centers[train_y] + 1.5 * rng.standard_normal((300, 16))
    test_x = centers[test_y] + 1.5 * rng.standard_normal((80, 16))
    for k, T in [(20, 0.07), (5, 0.5), (1, 1.0)]:
        got = knn_scores(train_x, train_y, test_x, C, k=k, temperature=T, chunk=32).numpy()
        ref = numpy_knn(train_x, train_y, test_x, C, k, T)
        np.testing.assert_allclose(got, ref, rtol=1e-4)
        acc = knn_evaluate(train_x, train_y, test_x, test_y, C, k=k, temperature=T)
        ranked = np.argsort(-ref, axis=1)
        assert acc["top1"] == pytest.approx(np.mean(ranked[:, 0] == test_y))
        voted = [[c for c in r[:5] if ref[q, c] > 0] for q, r in enumerate(ranked)]  # no votes, no prediction
        assert acc["top5"] == pytest.approx(np.mean([t in v for t, v in zip(test_y, voted)]))
    assert 0.3 < knn_evaluate(train_x, train_y, test_x, test_y, C)["top1"] < 1.0  # informative, not trivial
    with pytest.raises(InputError, match="temperature must be > 0"):
        knn_scores(train_x, train_y, test_x, C, temperature=0)


def test_topk_accuracy_hand_case():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, [1, 1, 0], ks=(1, 2)) == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}


def test_probe_matches_sklearn_logistic_regression():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    X, y = d.data[:900] / 16.0, d.target[:900]
    tr, va, te = slice(0, 500), slice(500, 700), slice(700, 900)
    Cs = (0.001, 0.1, 10.0)
    res = linear_probe(X[tr], y[tr], X[va], y[va], X[te], y[te], 10, Cs=Cs)
    val_acc = [LogisticRegression(C=c, max_iter=1000).fit(X[tr], y[tr]).score(X[va], y[va]) for c in Cs]
    assert [s["val_top1"] for s in res["sweep"]] == pytest.approx(val_acc)
    best = Cs[int(np.argmax(val_acc))]
    assert res["C"] == best
    ref = LogisticRegression(C=best, max_iter=1000).fit(X[tr], y[tr])
    proba = ref.predict_proba(X[te])
    assert res["top1"] == pytest.approx(ref.score(X[te], y[te]))
    top5 = np.argsort(-proba, axis=1)[:, :5]
    assert res["top5"] == pytest.approx(np.mean([t in r for t, r in zip(y[te], top5)]))
    assert res["top1"] > 0.85  # the sweep picked a working C on real data


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalds")
    write_digits(tmp / "ds" / "train", per_class=6, classes=4)
    write_digits(tmp / "ds" / "val", per_class=2, classes=4, start=600)
    write_digits(tmp / "ds" / "test", per_class=3, classes=4, start=1200)
    model, mdir = tiny_model(tmp)
    return tmp, model, mdir


def test_knn_and_probe_on_a_dataset_use_the_models_features(folder, capsys):
    tmp, model, mdir = folder
    data = str(tmp / "ds")
    spec = FeatureSpec(pool="cls+mean", normalize=True)
    feats, splits = labelled_features(model, "imagefolder", data_dir=data, spec=spec, progress=False)
    (tx, ty, _), (ex, ey, _) = feats["train"], feats["test"]
    assert len(feats["val"][0]) == 8
    assert tx.shape == (24, 64) and ex.shape == (12, 64) and sorted(set(ty.tolist())) == [0, 1, 2, 3]
    r = knn_on_dataset(model, "imagefolder", data_dir=data, k=5, temperature=0.1, spec=spec, progress=False)
    ranked = np.argsort(-numpy_knn(tx, ty, ex, 4, 5, 0.1), axis=1)
    assert r["split"] == "test" and r["count"] == 12 and r["train_count"] == 24
    assert r["top1"] == pytest.approx(np.mean(ranked[:, 0] == ey))
    assert r["top5"] is None and "more than 5 classes" in r["top5_note"]  # 4 classes: top-5 would count any vote
    p = probe_on_dataset(model, "imagefolder", data_dir=data, Cs=(0.1, 1.0), spec=FeatureSpec(pool="cls+mean"),
                         progress=False)
    from sklearn.linear_model import LogisticRegression

    raw, _ = labelled_features(model, "imagefolder", data_dir=data, spec=FeatureSpec(pool="cls+mean"), progress=False)
    ref = LogisticRegression(C=p["C"], max_iter=1000).fit(raw["train"][0], raw["train"][1])
    assert p["top1"] == pytest.approx(ref.score(raw["test"][0], raw["test"][1]))
    from vitkit.cli.main import main

    assert main(["knn", "--model", str(mdir), "--dataset", "imagefolder", "--data-dir", data, "--k", "5",
                 "--workers", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"top1", "top5"} <= set(out) and 0 <= out["top1"] <= 1
    assert main(["probe", "--model", str(mdir), "--dataset", "imagefolder", "--data-dir", data, "--C", "1",
                 "--workers", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"top1", "top5", "C", "sweep"} <= set(out) and out["C"] == 1.0


def test_dataset_without_labels_says_so(folder, capsys):
    tmp, model, mdir = folder
    csv = tmp / "reg.csv"
    imgs = sorted((tmp / "ds" / "train").rglob("*.png"))[:6]
    csv.write_text("path,y\n" + "".join(f"{p.relative_to(tmp)},{i}.5\n" for i, p in enumerate(imgs)))
    with pytest.raises(InputError, match="no class labels"):
        knn_on_dataset(model, "csv", data_dir=str(csv), progress=False)
    from vitkit.cli.main import main

    assert main(["probe", "--model", str(mdir), "--dataset", "csv", "--data-dir", str(csv)]) == 2
    assert "no class labels" in capsys.readouterr().err
