"""Data input a user can trust (issue 22, section 7): truncated shards / parquet named in one line,
EXIF orientation applied as PIL's exif_transpose in every decoder, webdataset keys / split folders /
class-name labels, HF text labels, distinct skipped files, ';' CSVs, flat class folders, and clean
warnings and argument errors."""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vitkit.data import DataSpec, build_data, make_loader
from vitkit.errors import InputError

ORIENTATION = 0x0112


def _pattern(h=16, w=24) -> np.ndarray:
    """Non-square and asymmetric in both axes: a bright top-left block and a horizontal ramp, so any
    wrong flip or rotation moves pixels far."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 4] = 255
    arr[:, :, 2] = np.linspace(0, 250, w, dtype=np.uint8)[None]
    arr[:, :, 1] = np.linspace(0, 200, h, dtype=np.uint8)[:, None]
    return arr


def _encode(arr, fmt, orientation=None, **kw) -> bytes:
    b = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        kw["exif"] = exif.tobytes()
    Image.fromarray(arr).save(b, fmt, **kw)
    return b.getvalue()


def _upright(data: bytes, mode="RGB") -> np.ndarray:
    """The oracle: PIL's own exif_transpose."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert(mode)).astype(int)


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# --------------------------------------------------------------------------- truncated files
def _shard(path, keys, labels, ext="png", size=(10, 12)):
    import webdataset as wds

    rng = np.random.RandomState(len(keys))
    with wds.TarWriter(str(path)) as w:
        for k, lab in zip(keys, labels):
            w.write({"__key__": k, ext: _encode(rng.randint(0, 255, (*size, 3)).astype(np.uint8), "PNG"),
                     "cls": str(lab).encode()})
    return path


def test_truncated_tar_shard_is_one_error_naming_the_shard(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    _shard(root / "train-000.tar", [f"a{i}" for i in range(4)], [0, 1, 0, 1])
    _shard(root / "val-000.tar", ["v0", "v1"], [0, 1])
    whole = _shard(tmp_path / "whole.tar", [f"b{i}" for i in range(4)], [0, 1, 0, 1]).read_bytes()
    # every kind of cut: mid-data, mid-header, right after a pax header (tarfile's "empty header"), and
    # at a member boundary (tarfile silently takes the file for complete)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        tf.getmembers()
        end = tf.offset  # where the members end and tar's end-of-archive zeros begin
    kinds = set()
    for cut in range(512, end + 1, 256):
        try:
            with tarfile.open(fileobj=io.BytesIO(whole[:cut])) as tf:
                for m in tf:
                    if m.isfile():
                        tf.extractfile(m).read()
            kinds.add("silent")
        except tarfile.TarError as e:
            kinds.add(str(e))
        (root / "train-001.tar").write_bytes(whole[:cut])
        with pytest.raises(InputError) as e:
            build_data(DataSpec(dataset="webdataset", data_dir=str(root)))
        msg = _one_line(e)
        assert "train-001.tar" in msg and "truncated or corrupt" in msg, (cut, msg)
        assert cut < 2048 or "the last member read: 'b" in msg
    assert {"empty header", "unexpected end of data", "silent"} <= kinds  # the cases the issue met, and more
    (root / "train-001.tar").write_bytes(whole)
    assert len(build_data(DataSpec(dataset="webdataset", data_dir=str(root))).train) == 8


def test_truncated_parquet_is_one_error_naming_the_file(tmp_path):
    import datasets

    rng = np.random.RandomState(0)
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": _encode(rng.randint(0, 255, (9, 11, 3)).astype(np.uint8), "PNG"), "path": None}
                   for _ in range(6)], "label": [0, 1, 2, 0, 1, 2]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])}))
    root = tmp_path / "pq"
    root.mkdir()
    ds.to_parquet(str(root / "train-00000.parquet"))
    ds.to_parquet(str(root / "validation-00000.parquet"))
    assert len(build_data(DataSpec(dataset="hf", data_dir=str(root))).train) == 6
    bad = root / "validation-00000.parquet"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(InputError) as e:
        build_data(DataSpec(dataset="hf", data_dir=str(root)))
    msg = _one_line(e)
    assert str(bad) in msg and "not a readable parquet file" in msg


# --------------------------------------------------------------------------- EXIF orientation
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_exif_orientation_as_pil_exif_transpose_in_both_decoders(tmp_path, fmt):
    from vitkit.data.files import decode_bytes, image_header
    from vitkit.data.image import load_image

    arr = _pattern()
    opts = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    # JPEG: libjpeg builds may round differently between Pillow and torchvision; a wrong orientation is
    # off by ~100 on average here, a right one by < 1
    tol = 3.0 if fmt == "JPEG" else 0.0
    for o in range(1, 9) if fmt != "JPEG" else (1, 3, 6, 8):
        data = _encode(arr, fmt, o, **opts)
        path = tmp_path / f"o{o}.{fmt.lower()}"
        path.write_bytes(data)
        ref = _upright(data)
        assert ref.shape[:2] == ((24, 16) if o >= 5 else (16, 24))
        train = decode_bytes(data, "x").permute(1, 2, 0).numpy().astype(int)  # training / eval / embed
        predict = np.asarray(load_image(path)).astype(int)  # predict / explain / summary
        assert train.shape == ref.shape == predict.shape, o
        assert np.abs(predict - ref).max() == 0, o  # the same PIL decode, the same transpose
        assert np.abs(train - ref).mean() <= tol, (o, np.abs(train - ref).mean())
        grey = decode_bytes(data, "x", channels=1)[0].numpy().astype(int)
        assert grey.shape == ref.shape[:2]
        assert image_header(data, "x")[1] == ref.shape[1::-1]  # (W, H) upright: what the size probe sees


def test_phone_photo_is_upright_in_training_predict_and_embed(tmp_path):
    """A folder of sideways-stored JPEGs (orientation 6): the probed input size is the upright one, and
    the training loader, the feature loader (embed) and predict's reader all see the upright image."""
    from vitkit.data.image import load_image
    from vitkit.features.inputs import file_source  # what embed / search read query files through

    arr = _pattern(16, 24)  # stored 24 wide, 16 high; upright 16 wide, 24 high
    for c in ("a", "b"):
        d = tmp_path / "train" / c
        d.mkdir(parents=True)
        for i in range(3):
            (d / f"{i}.jpg").write_bytes(_encode(arr, "JPEG", 6, quality=95))
    photo = tmp_path / "train" / "a" / "0.jpg"
    ref = _upright(photo.read_bytes())
    data = build_data(DataSpec(dataset="imagefolder", data_dir=str(tmp_path)))
    assert data.image_hw == (24, 16)
    x, _ = next(iter(make_loader(data.train, batch_size=2, train=False, workers=0, normalize=False)))
    got = (x[0] * 255).round().permute(1, 2, 0).numpy()
    assert got.shape == ref.shape and np.abs(got - ref).mean() < 3.0
    assert np.array_equal(np.asarray(load_image(photo)), ref)
    emb = file_source([str(photo)], 3).read(0)[0].permute(1, 2, 0).numpy().astype(int)
    assert emb.shape == ref.shape and np.abs(emb - ref).mean() < 3.0


def test_grey_webp_decodes_grey_without_a_cpp_warning(tmp_path, capfd):
    """torchvision's WebP decoder has no grey mode: it printed a C++ warning (with its source path) and
    returned 3 channels to a 1-channel model."""
    from vitkit.data.files import decode_bytes
    from vitkit.data.image import load_image

    path = tmp_path / "g.webp"
    path.write_bytes(_encode(_pattern(), "WEBP", lossless=True))
    x = decode_bytes(path.read_bytes(), "g.webp", channels=1)
    err = capfd.readouterr().err
    assert x.shape == (1, 16, 24) and ".cpp" not in err and "Warning" not in err
    assert np.array_equal(x[0].numpy(), np.asarray(load_image(path, mode="L")))


# --------------------------------------------------------------------------- webdataset
def test_webdataset_dotted_keys_explain_the_first_dot_rule_briefly(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    _shard(root / "train-000.tar", [f"img.v2.{i:05d}" for i in range(100)], [i % 2 for i in range(100)], ext="jpg")
    with pytest.raises(InputError) as e:
        build_data(DataSpec(dataset="webdataset", data_dir=str(root)))
    msg = _one_line(e)
    assert "FIRST dot" in msg
    assert re.search(r"'img\.v2\.00000\.(jpg|cls)' is sample 'img' with extension 'v2\.00000\.(jpg|cls)'", msg)
    assert msg.count("img.v2.") <= 6 and "and 196 more" in msg  # a few members, not 200


def test_webdataset_split_folders_one_level_down(tmp_path):
    root = tmp_path / "s"
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        (root / split).mkdir(parents=True)
        for k in range(n):
            _shard(root / split / f"{k:06d}.tar", [f"{split}{k}_{i}" for i in range(3)], [0, 1, 2])
    d = build_data(DataSpec(dataset="webdataset", data_dir=str(root)))
    assert (len(d.train), len(d.val), len(d.test)) == (6, 3, 3)
    assert d.train.shards == [str(root / "train" / "000000.tar"), str(root / "train" / "000001.tar")]
    (tmp_path / "deeper" / "x" / "train").mkdir(parents=True)
    _shard(tmp_path / "deeper" / "x" / "train" / "000000.tar", ["a"], [0])
    with pytest.raises(InputError, match=r"found: \['x/train/000000.tar'\]"):
        build_data(DataSpec(dataset="webdataset", data_dir=str(tmp_path / "deeper")))


def test_webdataset_class_name_labels(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    names = ["digit2", "digit0", "digit1", "digit0", "digit2", "digit1"]
    _shard(root / "train-000.tar", [f"t{i}" for i in range(6)], names)
    _shard(root / "val-000.tar", ["v0", "v1", "v2"], ["digit1", "digit1", "digit2"])  # not every class, another order
    d = build_data(DataSpec(dataset="webdataset", data_dir=str(root)))
    assert d.classes == ["digit0", "digit1", "digit2"]
    assert d.train.targets.tolist() == [2, 0, 1, 0, 2, 1] and d.val.targets.tolist() == [1, 1, 2]
    ys = [y for _, y in make_loader(d.val, batch_size=3, train=False, workers=0)]  # the stream maps the same way
    assert torch.cat(ys).tolist() == [1, 1, 2]
    (root / "classes.txt").write_text("digit2\ndigit1\ndigit0\n")  # a listed order wins
    d = build_data(DataSpec(dataset="webdataset", data_dir=str(root)))
    assert d.classes == ["digit2", "digit1", "digit0"] and d.val.targets.tolist() == [1, 1, 0]
    (root / "classes.txt").unlink()
    _shard(root / "val-000.tar", ["v0"], ["digit7"])
    with pytest.raises(InputError, match=r"val shards use class name\(s\) \['digit7'\] not used by the training"):
        build_data(DataSpec(dataset="webdataset", data_dir=str(root)))


# --------------------------------------------------------------------------- Hugging Face labels
def _hf_rows(labels, seed=0):
    import datasets

    rng = np.random.RandomState(seed)
    imgs = [{"bytes": _encode(rng.randint(0, 255, (9, 11, 3)).astype(np.uint8), "PNG"), "path": None}
            for _ in labels]
    return datasets.Dataset.from_dict({"image": imgs, "label": labels},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.Value("string")}))


def test_hf_text_labels_are_class_names_across_splits(tmp_path):
    import datasets

    tr = _hf_rows(["cat", "dog", "bird", "cat", "dog", "bird"])
    va = _hf_rows(["dog", "bird"], seed=1)
    datasets.DatasetDict(train=tr, validation=va).save_to_disk(str(tmp_path / "dd"))
    d = build_data(DataSpec(dataset="hf", data_dir=str(tmp_path / "dd")))
    assert d.classes == ["bird", "cat", "dog"] and d.num_outputs == 3
    assert d.train.targets.tolist() == [1, 2, 0, 1, 2, 0] and d.val.targets.tolist() == [2, 0]
    datasets.DatasetDict(train=tr, validation=_hf_rows(["fish"])).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(InputError, match=r"the val split uses class name\(s\) \['fish'\] that no training row has"):
        build_data(DataSpec(dataset="hf", data_dir=str(tmp_path / "bad")))


def test_hf_unusable_label_column_is_said_in_plain_words(tmp_path):
    import datasets

    ds = _hf_rows(["a"] * 4).cast_column("label", datasets.Value("string"))
    ds = ds.remove_columns("label").add_column("label", [0.5, 1.0, 0.0, 1.0])
    ds.save_to_disk(str(tmp_path / "f"))
    with pytest.raises(InputError) as e:
        build_data(DataSpec(dataset="hf", data_dir=str(tmp_path / "f")))
    msg = _one_line(e)
    assert "decimal numbers (e.g. 0.5)" in msg and "float64" not in msg and "dtype" not in msg


# --------------------------------------------------------------------------- image folders and CSVs
def _classes(root, n=4, size=(12, 10), bad=0):
    rng = np.random.RandomState(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3)).astype(np.uint8)).save(root / c / f"{i}.png")
    for i in range(bad):
        (root / "dog" / f"broken{i}.png").write_bytes(b"\x89PNG not really")
    return root


def test_skipped_bad_files_are_counted_once_over_epochs_and_resume(tmp_path):
    root = tmp_path / "f"
    _classes(root / "train", bad=2)
    (root / "val").mkdir()
    _classes(root / "val", n=1)
    d = build_data(DataSpec(dataset="imagefolder", data_dir=str(root), skip_bad_images=True))
    loader = make_loader(d.train, batch_size=2, train=True, workers=0)
    for epoch in range(3):
        loader.set_epoch(epoch)
        n = sum(len(y) for _, y in loader)
        assert n >= 8 - 2  # the good files (a last partial batch is dropped)
    assert loader.skipped == 2 and len(loader.skipped_files) == 2
    assert sorted(m.split(":")[0].rsplit("/", 1)[1] for m in loader.skipped_files) == ["broken0.png", "broken1.png"]
    fresh = make_loader(d.train, batch_size=2, train=True, workers=0)
    fresh.load_state_dict(loader.state_dict())
    fresh.set_epoch(3)
    list(fresh)
    assert fresh.skipped == 2  # a resumed run does not count them again


def test_semicolon_csv(tmp_path):
    rows = ["path;brightness"]
    for i in range(6):
        Image.new("L", (8, 8), i * 40).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png;{i * 40 / 255:.6f}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    d = build_data(DataSpec(dataset="csv", data_dir=str(tmp_path)))
    assert d.classes == ["brightness"] and len(d.train) + len(d.val) + len(d.test) == 6
    x, y = next(iter(make_loader(d.train, batch_size=1, train=False, workers=0, normalize=False)))
    assert x.mean().item() == pytest.approx(float(y[0, 0]), abs=1e-3)
    with pytest.raises(InputError, match=r"column\(s\) \['nope'\] not in header \['path', 'brightness'\] \(columns "
                                         r"split at ';'"):
        build_data(DataSpec(dataset="csv", data_dir=str(tmp_path), target_columns="nope"))


def test_flat_class_folder_is_train_with_a_held_out_validation_split(tmp_path):
    root = _classes(tmp_path / "flat", n=5)
    d = build_data(DataSpec(dataset="imagefolder", data_dir=str(root)))
    assert d.classes == ["cat", "dog"] and len(d.train) + len(d.val) == 10 and len(d.val) >= 2
    assert not set(map(str, d.train.paths)) & set(map(str, d.val.paths))
    assert any("no train/" in n for n in d.notes)
    (root / "test").mkdir()  # a test/ without train/ is not a flat folder: refused, as before
    with pytest.raises(InputError, match="expected .*train with one sub-folder per class"):
        build_data(DataSpec(dataset="imagefolder", data_dir=str(root)))


# --------------------------------------------------------------------------- warnings and arguments
def test_fine_tuning_a_pretrained_model_warns_nothing_from_vitkit_internals(tmp_path):
    from vitkit import ViT, ViTConfig
    from vitkit.io import save_pretrained
    from vitkit.train.arch import load_pretrained

    src = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=2, num_classes=10))
    save_pretrained(src, tmp_path / "m")
    _classes(tmp_path / "f" / "train", size=(16, 16))
    _classes(tmp_path / "f" / "val", n=1, size=(16, 16))
    data = build_data(DataSpec(dataset="imagefolder", data_dir=str(tmp_path / "f")))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = load_pretrained(str(tmp_path / "m"), data)
    assert model.head.out_features == 2
    assert [str(w.message) for w in seen if "vitkit" in w.filename or "re-initialised" in str(w.message)] == []


def test_train_takes_a_bool_word_and_refuses_a_bad_one_with_its_own_error(tmp_path, capsys):
    from vitkit.cli.main import build_parser, main
    from vitkit.cli.train import config_from_args

    parse = lambda *a: config_from_args(build_parser().parse_args(["train", *a]))  # noqa: E731
    assert parse("--progress", "false").progress is False and parse("--progress").progress is True
    assert parse("--no-progress").progress is False and parse("--progress=yes", "--no-ema").ema is False
    assert main(["train", "--progress", "maybe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitkit train: error: progress must be true or false, got 'maybe'")
    assert "usage: vitkit [-h]" not in err


def test_flat_folder_trains_and_counts_bad_files_once(tmp_path, capsys):
    """End to end: a flat class folder with two unreadable files, three epochs, --progress false."""
    from vitkit.cli.main import main

    root = _classes(tmp_path / "flat", n=6, size=(16, 16), bad=2)
    rc = main(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--skip-bad-images", "--progress",
               "false", "--epochs", "3", "--dim", "32", "--depth", "1", "--num-heads", "2", "--batch-size", "4",
               "--workers", "0", "--threads", "1", "--out", str(tmp_path / "run")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "no train/" in out.out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_images"] == 2
