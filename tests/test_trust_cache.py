"""Caches that know when they are stale, and numbers that cannot be read as numbers (issue 22, §4 and §6).

Freshness (vitkit.freshness, one rule for embed's rows, search's queries and the saved FAISS index):
a re-run of ``vitkit embed`` equals a fresh table of the folder as it is now (oracle), embedding
only what changed; a search query that is a file is that file, never a row with the same relative
name. Non-finite numbers: weights refused at load naming the tensor, non-finite outputs an error
(valid JSON, no engine blamed), indexes refusing NaN rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from features_helpers import tiny_model

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import vitkit  # noqa: E402
from vitkit.cli.main import main  # noqa: E402
from vitkit.errors import CheckpointError, InputError  # noqa: E402
from vitkit.features import EmbeddingIndex, FeatureSpec, embed_files, read_meta, write_embeddings  # noqa: E402
from vitkit.freshness import CHANGED, FRESH, GONE, check, file_key, stamp  # noqa: E402

PHOTOS = {"coffee.png": "coffee", "flower.jpg": "immunohistochemistry", "china.jpg": "astronaut",
          "cat.png": "chelsea", "rocket.jpg": "rocket"}


def photo(name: str, size: int = 24):
    """A scikit-image sample photo, small (the model sees 16x16)."""
    from PIL import Image

    data = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size))


def write_photos(folder: Path) -> None:
    folder.mkdir(parents=True)
    for fname, src in PHOTOS.items():
        photo(src).save(folder / fname, quality=95)


def strict_json(text: str):
    """json.loads that fails on NaN / Infinity (which Python's json would accept)."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c} in output"))


def table_rows(path) -> dict:
    t = pq.read_table(path).to_pylist()
    return {r["path"]: r for r in t}


@pytest.fixture
def album(tmp_path, monkeypatch, capsys):
    """tmp/photos/ (5 photos) embedded into tmp/photos.parquet with relative paths, cwd = tmp;
    (tmp, model, model dir, the embed command, what it printed)."""
    model, mdir = tiny_model(tmp_path)
    write_photos(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    cmd = ["embed", "photos", "--model", str(mdir), "--out", "photos.parquet", "--workers", "0", "-b", "2"]
    assert main(cmd) == 0
    return tmp_path, model, mdir, cmd, capsys.readouterr().out


# ------------------------------------------------------------------------------ the rule itself
def test_freshness_rule_stat_then_digest(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    st = stamp(f)
    assert (st.file, st.size) == (str(f.resolve()), 1000)
    assert st.blake2b == hashlib.blake2b(b"x" * 1000, digest_size=16).hexdigest()  # the oracle: hashlib on the bytes
    assert check(st) == (FRESH, st)
    os.utime(f, ns=(st.mtime_ns + 10**9, st.mtime_ns + 10**9))  # touched: same bytes, new mtime
    state, now = check(st)
    assert state == FRESH and now.mtime_ns == st.mtime_ns + 10**9 and now.blake2b == st.blake2b
    f.write_bytes(b"y" * 1000)  # same size, other bytes
    os.utime(f, ns=(st.mtime_ns + 2 * 10**9,) * 2)
    assert check(st)[0] == CHANGED
    f.write_bytes(b"x" * 999)
    assert check(st)[0] == CHANGED
    f.unlink()
    assert check(st) == (GONE, None)
    # a symlinked folder is filed under the real one; a symlinked file keeps its own name, and
    # pointing it at another file reads as a change (its stat follows the link)
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "p.png").write_bytes(b"1")
    (tmp_path / "real" / "q.png").write_bytes(b"22")
    assert file_key(tmp_path / "alias" / "p.png") == str(tmp_path.resolve() / "real" / "p.png")
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "real" / "p.png")
    st = stamp(link)
    assert st.file == str(tmp_path.resolve() / "link.png")
    link.unlink()
    link.symlink_to(tmp_path / "real" / "q.png")
    assert check(st)[0] == CHANGED


# ------------------------------------------------------------------------------ embed
def test_embed_rerun_reembeds_changed_drops_gone_keeps_unchanged(album, capsys, monkeypatch):
    tmp, model, mdir, cmd, printed = album
    assert "5 new, 0 changed (re-embedded), 0 gone (dropped), 0 unchanged" in printed
    before = table_rows("photos.parquet")
    # the repro: another photo under coffee.png's name, flower.jpg deleted; plus cat.png
    # rewritten with its own bytes (a new mtime only: unchanged by the digest)
    photo("camera").save("photos/coffee.png")
    os.utime("photos/coffee.png", ns=(before["photos/coffee.png"]["mtime_ns"] + 10**9,) * 2)
    os.unlink("photos/flower.jpg")
    cat = Path("photos/cat.png")
    cat.write_bytes(cat.read_bytes())
    new_cat_mtime = before["photos/cat.png"]["mtime_ns"] + 10**9
    os.utime(cat, ns=(new_cat_mtime, new_cat_mtime))
    from vitkit.features.extract import FeatureExtractor

    seen = []
    real = FeatureExtractor.__call__
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, x: seen.append(len(x)) or real(self, x))
    assert main(cmd) == 0
    captured = capsys.readouterr()
    assert "photos.parquet: 4 rows" in captured.out
    assert "0 new, 1 changed (re-embedded), 1 gone (dropped), 3 unchanged" in captured.out
    assert sum(seen) == 1  # only the changed photo went through the model
    after = table_rows("photos.parquet")
    # the oracle: a fresh table of the folder as it is now
    assert main([*cmd[:5], "fresh.parquet", *cmd[6:]]) == 0
    capsys.readouterr()
    fresh = table_rows("fresh.parquet")
    assert set(after) == set(fresh) == {f"photos/{n}" for n in PHOTOS if n != "flower.jpg"}
    for p in after:
        np.testing.assert_allclose(after[p]["embedding"], fresh[p]["embedding"], rtol=1e-5, atol=1e-5)
        # each row records what it was computed from
        st = os.stat(p)
        assert after[p]["file"] == str((tmp / p).resolve())
        assert (after[p]["size"], after[p]["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
        assert after[p]["blake2b"] == hashlib.blake2b(Path(p).read_bytes(), digest_size=16).hexdigest()
    assert not np.allclose(after["photos/coffee.png"]["embedding"], before["photos/coffee.png"]["embedding"])
    assert after["photos/cat.png"]["embedding"] == before["photos/cat.png"]["embedding"]  # kept, not recomputed
    # search sees the new photo under coffee.png and never the deleted flower.jpg
    assert main(["search", "--index", "photos.parquet", "photos/coffee.png", "--json", "-k", "5"]) == 0
    got = strict_json(capsys.readouterr().out)
    assert [n["path"] for n in got[0]["neighbors"]][0] == "photos/coffee.png"
    assert got[0]["neighbors"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert "photos/flower.jpg" not in {n["path"] for n in got[0]["neighbors"]}


def test_rows_of_files_this_run_does_not_list_follow_the_same_rule(album, capsys):
    """A table filled from two folders: a run over one of them still re-embeds the other's changed
    files from their recorded path and drops its gone ones."""
    tmp, model, mdir, cmd, printed = album
    extra = tmp / "more"
    extra.mkdir()
    photo("coins").save(extra / "coins.png")
    photo("camera").save(extra / "camera.png")
    assert main(["embed", "more", *cmd[2:]]) == 0
    photo("coffee").save(extra / "coins.png")  # now the same pixels as photos/coffee.png
    os.utime(extra / "coins.png", ns=(os.stat(extra / "camera.png").st_mtime_ns + 10**9,) * 2)
    os.unlink(extra / "camera.png")
    capsys.readouterr()
    assert main(cmd) == 0  # over photos/ only
    assert "0 new, 1 changed (re-embedded), 1 gone (dropped), 5 unchanged" in capsys.readouterr().out
    rows = table_rows("photos.parquet")
    assert "more/camera.png" not in rows
    np.testing.assert_allclose(rows["more/coins.png"]["embedding"], rows["photos/coffee.png"]["embedding"],
                               rtol=1e-5, atol=1e-5)


def test_old_table_without_stamps_is_refused_for_embed_and_searched_by_file(album, capsys, monkeypatch):
    tmp, model, mdir, cmd, printed = album
    old = pq.read_table("photos.parquet").select(["path", "label", "embedding"])  # as vitkit wrote it before
    pq.write_table(old, "old.parquet")
    assert read_meta("old.parquet")["model"] == str(mdir.resolve())
    capsys.readouterr()
    assert main([*cmd[:5], "old.parquet", *cmd[6:]]) == 2
    err = capsys.readouterr().err
    assert "old.parquet has no columns saying what its rows were computed from" in err and "--overwrite" in err
    # search in it: a query that is a file is embedded, not matched to the row of the same relative name
    other = tmp / "other" / "photos"
    other.mkdir(parents=True)
    shutil.copy("photos/rocket.jpg", other / "china.jpg")  # another picture under a stored name
    monkeypatch.chdir(tmp / "other")
    assert main(["search", "--index", "../old.parquet", "photos/china.jpg", "--json", "-k", "1"]) == 0
    top = strict_json(capsys.readouterr().out)[0]["neighbors"][0]
    assert top["path"] == "photos/rocket.jpg" and top["score"] == pytest.approx(1.0, abs=1e-5)
    monkeypatch.chdir(tmp)
    assert main([*cmd[:5], "old.parquet", *cmd[6:], "--overwrite"]) == 0
    assert "5 new" in capsys.readouterr().out


def test_non_finite_model_outputs_are_not_stored(album, monkeypatch):
    tmp, model, mdir, cmd, printed = album
    from vitkit.features.extract import FeatureExtractor

    real = FeatureExtractor.__call__
    calls = []

    def nan_for_the_second_image(self, x):
        out = real(self, x)
        calls.append(len(x))
        if len(calls) == 2:
            out[0, 3] = float("nan")
        return out

    monkeypatch.setattr(FeatureExtractor, "__call__", nan_for_the_second_image)
    res = embed_files(model, ["photos"], "nan.parquet", batch_size=1, progress=False)
    second = sorted(str(p) for p in Path("photos").iterdir())[1]
    assert [p for p, _ in res.skipped] == [second] and "not finite (1 of 32 values" in res.skipped[0][1]
    rows = table_rows("nan.parquet")
    assert len(rows) == 4 and second not in rows
    assert all(np.isfinite(r["embedding"]).all() for r in rows.values())
    # an image whose row was refused is embedded on the next run (it has no row yet)
    calls.clear()
    res = embed_files(model, ["photos"], "nan.parquet", batch_size=1, progress=False)
    assert (res.new_rows, res.resumed_rows, calls) == (1, 4, [1])


# ------------------------------------------------------------------------------ search
def test_search_query_is_the_file_it_names(album, capsys, monkeypatch):
    tmp, model, mdir, cmd, printed = album
    other = tmp / "other" / "photos"
    other.mkdir(parents=True)
    shutil.copy("photos/rocket.jpg", other / "china.jpg")  # the issue: another picture under a stored name
    monkeypatch.chdir(tmp / "other")
    capsys.readouterr()
    assert main(["search", "--index", "../photos.parquet", "photos/china.jpg", "--json", "-k", "2"]) == 0
    top = strict_json(capsys.readouterr().out)[0]["neighbors"][0]
    assert top["path"] == "photos/rocket.jpg" and top["score"] == pytest.approx(1.0, abs=1e-5)
    # no such file here: the query names the row; its stored vector while its file is unchanged (no model needed)
    monkeypatch.setattr(vitkit, "from_pretrained", lambda *a, **k: pytest.fail("a fresh row needs no model"))
    assert main(["search", "--index", "../photos.parquet", "photos/cat.png", "--json", "-k", "1"]) == 0
    assert strict_json(capsys.readouterr().out)[0]["neighbors"][0]["path"] == "photos/cat.png"
    monkeypatch.undo()
    monkeypatch.chdir(tmp / "other")
    # the row's file changed since: that file is embedded again (it now holds coffee's pixels)
    shutil.copy(tmp / "photos" / "coffee.png", tmp / "photos" / "cat.png")
    os.utime(tmp / "photos" / "cat.png", ns=(os.stat(tmp / "photos" / "coffee.png").st_mtime_ns + 10**9,) * 2)
    assert main(["search", "--index", "../photos.parquet", "photos/cat.png", "--json", "-k", "1"]) == 0
    top = strict_json(capsys.readouterr().out)[0]["neighbors"][0]
    assert top["path"] == "photos/coffee.png" and top["score"] == pytest.approx(1.0, abs=1e-5)
    # the same through the file's own path: changed since its row was made, so embedded, not the stale row
    monkeypatch.chdir(tmp)
    assert main(["search", "--index", "photos.parquet", "photos/cat.png", "--json", "-k", "1"]) == 0
    assert strict_json(capsys.readouterr().out)[0]["neighbors"][0]["path"] == "photos/coffee.png"
    # the row's file is gone: the query cannot be used, and says why
    os.unlink(tmp / "photos" / "flower.jpg")
    monkeypatch.chdir(tmp / "other")
    assert main(["search", "--index", "../photos.parquet", "photos/flower.jpg"]) == 1
    assert "which its row of the index was computed from, is gone" in capsys.readouterr().err


def test_saved_faiss_index_follows_the_same_rule(tmp_path):
    pytest.importorskip("faiss")
    X = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)
    path = write_embeddings(tmp_path / "t.parquet", [f"r{i}" for i in range(60)], [None] * 60, X)
    notes = []
    EmbeddingIndex(path, backend="flat", note=notes.append).search(X[:1], 1)
    assert "built" in notes[-1]
    fp_file = EmbeddingIndex(path, backend="flat").faiss_paths()[1]
    was = json.loads(fp_file.read_text())["parquet"]
    os.utime(path, ns=(was["mtime_ns"] + 10**9,) * 2)  # touched: same bytes
    _, ids = EmbeddingIndex(path, backend="flat", note=notes.append).search(X[:1], 1)
    assert "reusing" in notes[-1] and ids[0, 0] == 0
    assert json.loads(fp_file.read_text())["parquet"]["mtime_ns"] == was["mtime_ns"] + 10**9


def test_indexes_refuse_non_finite_rows(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"path": ["a", "b", "c"], "embedding": [[1.0, 0.0], [math.nan, 1.0], [0.0, 1.0]]}), bad)
    with pytest.raises(InputError, match=r"bad.parquet: row 1 \(b\) holds NaN or inf"):
        EmbeddingIndex(bad).search(np.ones((1, 2), np.float32), 2)
    assert main(["search", "--index", str(bad), "a"]) == 2
    assert "row 1 (b) holds NaN or inf" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"row 1 \(b\) holds NaN or inf"):
        EmbeddingIndex(bad, backend="exact").vectors_of(["b"])
    with pytest.raises(InputError, match=r"row 2 \(z\) holds NaN or inf"):
        write_embeddings(tmp_path / "w.parquet", ["x", "y", "z"], [None] * 3, np.array([[1, 0], [0, 1], [math.inf, 0]],
                                                                                         np.float32))
    assert not (tmp_path / "w.parquet").exists()
    good = write_embeddings(tmp_path / "g.parquet", ["x"], [None], np.ones((1, 2), np.float32))
    with pytest.raises(InputError, match=r"query vector\(s\) \[0\] hold NaN or inf"):
        EmbeddingIndex(good).search(np.array([[math.nan, 1.0]], np.float32), 1)


# ------------------------------------------------------------------------------ weights and outputs
def _tampered(tmp_path, edit) -> Path:
    """tiny_model's folder with ``edit(state)`` applied to its saved weights."""
    from vitkit.io import save_state_dict

    model, mdir = tiny_model(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edit(state)
    save_state_dict(state, mdir / "model.safetensors", metadata={"format": "pt"})
    return mdir


def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, capsys):
    def edit(state):
        state["blocks.0.attn.qkv.weight"][0, :2] = math.nan
        state["head.weight"][1, 1] = -math.inf

    mdir = _tampered(tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"non-finite weights in blocks\.0\.attn\.qkv\.weight \(2 NaN, 0 inf of "
                                              r"3072 values\), head\.weight \(0 NaN, 1 inf of 320 values\)"):
        vitkit.from_pretrained(mdir)
    assert main(["predict", "digits:3", "--model", str(mdir), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "vitkit predict: error:" in captured.err and "qkv.weight (2 NaN" in captured.err


def test_non_finite_outputs_are_errors_in_valid_json(tmp_path, capsys, caplog):
    """Finite weights whose products overflow float32: the load passes (an overflowing weight sum is
    counted, not trusted), every output is inf / NaN, and predict says so per image, in valid JSON,
    without blaming the inference engine."""
    mdir = _tampered(tmp_path, lambda state: state["head.weight"].fill_(3e38))
    model = vitkit.from_pretrained(mdir)
    from vitkit.infer import Predictor

    with caplog.at_level(logging.WARNING, logger="vitkit.infer"):
        pred = Predictor(model)
    assert pred.path == "model" and "the model's own forward outputs NaN or inf" in " ".join(pred.notes)
    assert "please report" not in caplog.text
    assert main(["predict", "digits:3", "digits:5", "--model", str(mdir), "--json"]) == 1
    captured = capsys.readouterr()
    got = strict_json(captured.out)
    assert [r["file"] for r in got["results"]] == ["digits:3", "digits:5"]
    assert all("not finite" in r["error"] and "predictions" not in r for r in got["results"])
    assert "vitkit predict: error: digits:3: the model's output for it is not finite" in captured.err
    assert "please report" not in captured.err + caplog.text


def test_agreement_counts_non_finite_outputs_and_refuses_a_broken_reference():
    from vitkit.infer import agreement

    class Fixed:  # a Predictor stand-in returning fixed outputs
        def __init__(self, out, dtype="fp32"):
            self.out, self.dtype = torch.tensor(out), dtype

        def __call__(self, x):
            return self.out

    ref = Fixed([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    cand = Fixed([[2.0, 0.0], [math.nan, 0.0], [0.0, 2.5]], "bf16")
    a = agreement(None, [torch.zeros(3, 3, 2, 2)], "bf16", reference=ref, candidate=cand)
    # by hand: rows 0 and 2 agree, row 1 is NaN (a disagreement, out of the differences 1, 0, 0, 0.5)
    assert (a.n, a.nonfinite, a.top1, a.max_abs_diff, a.mean_abs_diff) == (3, 1, 2 / 3, 1.0, 0.375)
    assert "1 image(s) gave NaN or inf" in str(a)
    json.dumps(a.to_dict(), allow_nan=False)
    with pytest.raises(InputError, match="fp32 outputs of 1 of 3 images hold NaN or inf"):
        agreement(None, [torch.zeros(3, 3, 2, 2)], "bf16", reference=cand, candidate=ref)


def test_embed_refuses_when_every_output_is_non_finite(tmp_path):
    """pool=head runs the overflowing head: no row can be stored, and the error says why."""
    mdir = _tampered(tmp_path, lambda state: state["head.weight"].fill_(3e38))
    model = vitkit.from_pretrained(mdir)
    write_photos(tmp_path / "photos")
    with pytest.raises(InputError, match=r"no image could be read.*the model's output for it is not finite"):
        embed_files(model, [tmp_path / "photos"], tmp_path / "o.parquet", spec=FeatureSpec(pool="head"),
                    progress=False)
    assert not (tmp_path / "o.parquet").exists()


def test_rows_made_at_another_input_size_do_not_mix(album, capsys):
    """The table records the preprocessing its rows went through: adding to it at another
    --image-size is refused (its vectors would mean something else), naming both settings."""
    tmp, _, _, cmd, _ = album
    before = table_rows("photos.parquet")
    assert read_meta("photos.parquet")["preprocess"]["input_size"] == [3, 16, 16]
    assert main([*cmd, "--image-size", "24"]) == 2
    err = capsys.readouterr().err
    assert "preprocess" in err and "[3, 16, 16]" in err and "[3, 24, 24]" in err and "--overwrite" in err
    assert table_rows("photos.parquet") == before  # nothing written
    assert main(cmd) == 0  # the same settings add to it as before
