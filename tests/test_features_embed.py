"""vitkit embed: vectors equal a direct computation with the model's own stages and preprocessing
(bit-exact fp32), labels from class folders, resumable after an interrupt, bad images skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from features_helpers import tiny_model, write_digits

pq = pytest.importorskip("pyarrow.parquet")

from vitkit.data.image import load_image  # noqa: E402
from vitkit.errors import ConfigError, InputError  # noqa: E402
from vitkit.features import FeatureSpec, embed_dataset, embed_files, read_meta  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed")
    files = write_digits(tmp / "imgs", per_class=3)  # 30 images in class folders
    model, mdir = tiny_model(tmp)
    return tmp, files, model, mdir


def direct(model, files, batch_size, pool="model", layers=1, normalize=False):
    """The oracle: the model's own preprocessing and stages, batch by batch, written out by hand."""
    x_all = torch.stack([model.preprocess(load_image(f, mode="RGB")) for f in files])
    out = []
    with torch.no_grad():
        for s in range(0, len(files), batch_size):
            x = x_all[s:s + batch_size]
            if layers == 1:
                tokens = [model.forward_features(x)]
            else:
                tokens = model.forward_intermediates(x, layers, norm=True, intermediates_only=True)
            per = []
            for t in tokens:
                if pool == "model":
                    per.append(model.forward_head(t, pre_logits=True))
                else:
                    cls, mean = t[:, 0], t[:, 1:].mean(1)
                    per.append({"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], 1)}[pool])
            f = torch.cat(per, 1)
            out.append(F.normalize(f, dim=1) if normalize else f)
    return torch.cat(out).numpy()


def read(path):
    t = pq.read_table(path)
    return t.column("path").to_pylist(), t.column("label").to_pylist(), np.asarray(t.column("embedding").to_pylist(),
                                                                                  dtype=np.float32)


@pytest.mark.parametrize("pool,layers,normalize", [("model", 1, False), ("cls", 1, True), ("mean", 2, False),
                                                   ("cls+mean", 2, True), ("model", 3, True), ("cls+mean", 1, False)])
def test_embed_equals_direct_forward(setup, pool, layers, normalize):
    tmp, files, model, mdir = setup
    out = tmp / f"e_{pool}_{layers}_{normalize}.parquet"
    res = embed_files(model, [tmp / "imgs"], out, spec=FeatureSpec(pool=pool, layers=layers, normalize=normalize),
                      source=str(mdir), batch_size=8, progress=False)
    paths, labels, emb = read(out)
    want_files = sorted(files)
    assert paths == [str(f) for f in want_files]
    assert labels == [f.parent.name for f in want_files]  # class-folder names
    ref = direct(model, want_files, 8, pool, layers, normalize)
    assert emb.shape == ref.shape == (30, res.dim)
    assert np.array_equal(emb, ref)  # bit-exact fp32
    meta = read_meta(out)
    assert meta == {"model": str(mdir), "pool": pool, "layers": layers, "normalize": normalize, "dtype": "fp32",
                    "dim": res.dim, "preprocess": meta["preprocess"]}
    # what the images went through: the model's own preprocessing
    assert {k: meta["preprocess"][k] for k in model.preprocess_cfg} == model.preprocess_cfg


def test_embed_in_worker_processes_and_labels(setup):
    """Decoding in DataLoader workers gives the same bytes; a file outside class folders has no label."""
    tmp, files, model, mdir = setup
    loose = tmp / "loose.png"
    loose.write_bytes(files[0].read_bytes())
    out = tmp / "w.parquet"
    embed_files(model, [tmp / "imgs", loose], out, batch_size=8, workers=2, progress=False)
    paths, labels, emb = read(out)
    assert paths[-1] == str(loose) and labels[-1] is None
    ref = direct(model, sorted(files) + [loose], 8)
    assert np.array_equal(emb, ref)


def test_sample_specs_and_skips_in_workers_pair_each_file_with_its_message(setup):
    """``digits:N`` specs (grey, repeated to RGB) read as predict reads them; with workers and small
    batches, every unreadable file is listed under its own path (not its neighbour's)."""
    tmp, files, model, mdir = setup
    bad = tmp / "bad_a.png"
    bad.write_bytes(b"not an image")
    bad2 = tmp / "bad_b.png"
    bad2.write_bytes(b"")
    specs = ["digits:5", str(bad), str(files[0]), str(bad2), "digits:7"]
    res = embed_files(model, specs, tmp / "specs.parquet", batch_size=2, workers=2, progress=False)
    paths, _, emb = read(tmp / "specs.parquet")
    good = ["digits:5", str(files[0]), "digits:7"]
    assert paths == good
    assert np.array_equal(emb, np.concatenate([direct(model, [g], 1) for g in good]))
    assert [p for p, _ in res.skipped] == [str(bad), str(bad2)]
    assert all(msg.startswith(p) for p, msg in res.skipped)


def test_interrupted_run_continues_without_redoing_rows(setup, monkeypatch):
    tmp, files, model, mdir = setup
    out = tmp / "resume.parquet"
    calls = {"n": 0, "stop_at": None}
    from vitkit.features.extract import FeatureExtractor

    real = FeatureExtractor.__call__

    def counting(self, x):  # one call per batch
        calls["n"] += 1
        if calls["stop_at"] is not None and calls["n"] > calls["stop_at"]:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(FeatureExtractor, "__call__", counting)
    calls["stop_at"] = 2  # 2 batches of 8 finish; the 3rd is interrupted
    with pytest.raises(KeyboardInterrupt):
        embed_files(model, [tmp / "imgs"], out, batch_size=8, row_group_size=8, progress=False)
    assert not out.exists()
    parts = sorted((tmp / "resume.parquet.parts").glob("part-*.parquet"))
    assert len(parts) == 2
    calls.update(n=0, stop_at=None)
    notes = []
    res = embed_files(model, [tmp / "imgs"], out, batch_size=8, row_group_size=8, progress=False, note=notes.append)
    assert calls["n"] == 2  # the 14 remaining images in 2 batches, nothing redone
    assert (res.rows, res.new_rows, res.resumed_rows) == (30, 14, 16)
    assert "16 of 30" in notes[0]
    assert not (tmp / "resume.parquet.parts").exists()
    paths, labels, emb = read(out)
    assert paths == [str(f) for f in sorted(files)]
    assert np.array_equal(emb, direct(model, sorted(files), 8))  # rows equal a fresh, uninterrupted run
    assert pq.ParquetFile(out).num_row_groups == 4  # row groups of 8, 8, 8, 6
    # a folder that gained an image: only that one is embedded
    extra = tmp / "imgs" / "3" / "9999.png"
    extra.write_bytes(files[0].read_bytes())
    calls["n"] = 0
    try:
        res = embed_files(model, [tmp / "imgs"], out, batch_size=8, progress=False)
        assert (res.rows, res.new_rows, calls["n"]) == (31, 1, 1)
    finally:
        extra.unlink()


def test_default_pooling_runs_the_predictor_engine_for_the_pooled_output(setup):
    """fp32 default pooling: vitkit.infer's exact engine asked for the pooled pre-logits of the
    model itself (no twin, no copy), the model untouched; the bit-exactness is
    test_embed_equals_direct_forward's."""
    tmp, files, model, mdir = setup
    from vitkit.features import FeatureExtractor

    pred = FeatureExtractor(model, FeatureSpec())._predictor
    assert pred is not None and pred.path == "engine"
    assert pred.model is model and pred.output == "pooled" and pred.exact
    assert model.last_block_prefix_only is True and model.config.num_classes == 10
    assert FeatureExtractor(model, FeatureSpec(pool="cls"))._predictor is None  # stage calls


def test_settings_mismatch_and_overwrite(setup):
    tmp, files, model, mdir = setup
    out = tmp / "mismatch.parquet"
    embed_files(model, [tmp / "imgs"], out, batch_size=16, progress=False)
    with pytest.raises(ConfigError, match="pool: 'model' there, 'cls' now"):
        embed_files(model, [tmp / "imgs"], out, spec=FeatureSpec(pool="cls"), progress=False)
    res = embed_files(model, [tmp / "imgs"], out, spec=FeatureSpec(pool="cls"), overwrite=True, progress=False)
    assert res.new_rows == 30 and read_meta(out)["pool"] == "cls"


def test_unreadable_images_are_skipped_and_listed(setup, capsys):
    tmp, files, model, mdir = setup
    bad_dir = tmp / "withbad"
    write_digits(bad_dir, per_class=1, classes=3)
    (bad_dir / "1" / "broken.png").write_bytes(b"not an image")
    (bad_dir / "2" / "empty.jpg").write_bytes(b"")
    from vitkit.cli.main import main

    out = tmp / "bad.parquet"
    assert main(["embed", str(bad_dir), "--model", str(mdir), "--out", str(out), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 unreadable image(s)" in err
    assert "broken.png" in err and "empty.jpg" in err
    paths, labels, _ = read(out)
    assert len(paths) == 3 and not any("broken" in p or "empty" in p for p in paths)


def test_embed_dataset_imagefolder(setup):
    """--dataset with the training syntax: every split's images, labels = class names."""
    tmp, files, model, mdir = setup
    root = tmp / "ds"
    write_digits(root / "train", per_class=2, classes=3)
    write_digits(root / "test", per_class=1, classes=3, start=500)
    out = tmp / "ds.parquet"
    res = embed_dataset(model, "imagefolder", out, data_dir=str(root), batch_size=4, progress=False)
    paths, labels, emb = read(out)
    assert res.rows == 9 and len(set(paths)) == 9
    # imagefolder has no val/: val comes out of train; every row is one of the files, labelled by its folder
    assert all(p.split("/")[-2] == lab for p, lab in zip(paths, labels))
    assert read_meta(out)["dataset"] == "imagefolder"
    i = paths.index(sorted(paths)[0])
    from pathlib import Path

    # a batch of 1 vs the batch of 4 it sat in: same numbers to float rounding
    np.testing.assert_allclose(emb[i:i + 1], direct(model, [Path(paths[i])], 1), rtol=1e-5, atol=1e-5)


def test_bad_options(setup):
    tmp, files, model, mdir = setup
    with pytest.raises(ConfigError, match="pool must be one of"):
        FeatureSpec(pool="max")
    with pytest.raises(ConfigError, match="only 3 blocks"):
        embed_files(model, [tmp / "imgs"], tmp / "x.parquet", spec=FeatureSpec(layers=4), progress=False)
    with pytest.raises(InputError, match="no such file or folder"):
        embed_files(model, [tmp / "nope"], tmp / "x.parquet", progress=False)
    junk = tmp / "junk"
    junk.mkdir(exist_ok=True)
    (junk / "a.png").write_bytes(b"x")
    with pytest.raises(InputError, match=r"no image could be read \(1 unreadable: .*a.png"):
        embed_files(model, [junk], tmp / "x.parquet", progress=False)
    assert not (tmp / "x.parquet").exists()
    from vitkit.cli.main import main

    assert main(["embed", "--model", str(mdir), "--out", str(tmp / "x.parquet")]) == 2  # nothing to embed


def test_missing_pyarrow_names_the_extra(setup, monkeypatch):
    import sys

    tmp, files, model, mdir = setup
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ConfigError, match=r"vitkit\[features\]"):
        embed_files(model, [tmp / "imgs"], tmp / "y.parquet", progress=False)


def test_cli_embed_records_metadata(setup, capsys):
    tmp, files, model, mdir = setup
    from vitkit.cli.main import main

    out = tmp / "cli.parquet"
    assert main(["embed", str(tmp / "imgs"), "--model", str(mdir), "--out", str(out), "--pool", "cls+mean",
                 "--layers", "2", "--normalize", "--batch-size", "8", "--workers", "0"]) == 0
    assert "30 rows of 128-d embeddings" in capsys.readouterr().out
    meta = read_meta(out)
    assert meta["pool"] == "cls+mean" and meta["layers"] == 2 and meta["normalize"] is True
    assert meta["model"] == str(mdir.resolve())
    raw = pq.read_schema(out).metadata[b"vitkit.features"]
    assert json.loads(raw)["dim"] == 128


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_fast_dtypes_run_through_the_predictor(setup, dtype):
    """bf16 / int8: vitkit.infer.Predictor's pooled output; close to the exact fp32 vectors."""
    pytest.importorskip("vitkit.infer")
    tmp, files, model, mdir = setup
    out = tmp / f"fast_{dtype}.parquet"
    embed_files(model, [tmp / "imgs"], out, spec=FeatureSpec(dtype=dtype), batch_size=8, progress=False)
    _, _, emb = read(out)
    ref = direct(model, sorted(files), 8)
    cos = np.sum(emb * ref, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.99
    assert read_meta(out)["dtype"] == dtype
    from vitkit.features import FeatureExtractor

    pred = FeatureExtractor(model, FeatureSpec(dtype=dtype))._predictor
    assert pred is not None and pred.output == "pooled"  # the pre-logits features, not model(x) logits
    if pred.dtype == dtype:  # (a CPU without native bf16 runs fp32, with a note)
        assert not np.array_equal(emb, ref)  # the fast path really ran
    with pytest.raises(ConfigError, match="pool='model' or 'head', layers=1"):
        embed_files(model, [tmp / "imgs"], out, spec=FeatureSpec(pool="cls", dtype=dtype), overwrite=True,
                    progress=False)


def test_pool_head_is_clips_joint_space_embedding(tmp_path, capsys):
    """--pool head = model(x): for a CLIP tower with its projection, Hugging Face's
    ``CLIPVisionModelWithProjection(...).image_embeds`` (the oracle), not the pre-projection vector
    that --pool model gives; through the CLI too; one layer only."""
    pytest.importorskip("transformers")
    from test_interop_clip import hf_image_output, hf_model
    from test_interop_common import images, load_saved_hf, max_diff
    from vitkit.features import FeatureExtractor

    ref = hf_model("projection", image_size=32, patch_size=16)
    model = load_saved_hf(ref, tmp_path / "clip")
    x = images(32)
    head = FeatureExtractor(model, FeatureSpec(pool="head"))(x)
    pre = FeatureExtractor(model, FeatureSpec(pool="model"))(x)
    assert head.shape == (len(x), 24) and pre.shape == (len(x), 32)
    assert max_diff(head, hf_image_output(ref, x)) <= 1e-5
    with torch.no_grad():
        assert torch.equal(head, model(x))  # the Predictor's exact walk: bit-identical to the model
    fast = FeatureExtractor(model, FeatureSpec(pool="head", dtype="int8"))(x)
    assert F.cosine_similarity(fast, head).min() > 0.99
    with pytest.raises(ConfigError, match="pool='head'.*layers=2"):
        FeatureSpec(pool="head", layers=2)
    from PIL import Image

    from vitkit.cli.main import main

    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "clip.parquet"
    assert main(["embed", str(tmp_path / "imgs"), "--model", str(tmp_path / "clip"), "--out", str(out),
                 "--pool", "head", "--workers", "0"]) == 0
    assert "3 rows of 24-d embeddings" in capsys.readouterr().out
    assert read_meta(out)["pool"] == "head"
