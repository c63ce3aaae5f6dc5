"""Datasets: digits split, fake files in each standard format, bad images, label checks."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import DataSpec
from vitkit.data.datasets import build_data
from vitkit.data.validation import stratified_split
from vitkit.errors import ConfigError, InputError


def cfg(**kw):
    return DataSpec(**kw)


def build_datasets(spec):
    return build_data(spec)


def load_batch(ds, indices):
    """(x in [0, 1], y) of ``indices`` through the evaluation loader (workers decode)."""
    from vitkit.data.augment import SamplePipeline
    from vitkit.data.loader import EpochDataset

    pipe = SamplePipeline(ds.image_hw, ds.mean, ds.std, normalize=False)
    x, y, skipped, fatal, _ = EpochDataset(ds, pipe, 0, ds.skip_bad, False).__getitems__([(0, i) for i in indices])
    if fatal:
        raise InputError(fatal)
    return x, y


def test_digits_split_is_fixed_stratified_disjoint_and_scaled():
    from sklearn.datasets import load_digits

    d = build_datasets(cfg())
    sizes = [len(d.train), len(d.val), len(d.test)]
    assert sum(sizes) == 1797 and 340 <= sizes[2] <= 380  # ~20 % test
    # the default training input: the 8x8 digits upsampled 2x (bilinear) for 4x4 patches
    assert d.image_hw == (16, 16) and d.patch_size == 4
    x, y = d.test.read_batch(list(range(len(d.test))))
    assert x.shape[1:] == (1, 16, 16) and 0 <= x.min() and x.max() <= 1
    native = d.test.images
    up = torch.nn.functional.interpolate(native, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x, up.clamp(0, 1), rtol=0, atol=1e-6)
    # every test image is a real digit scaled by 1/16, and no image is in two splits
    ref = load_digits()
    keys = {tuple(np.round(im.ravel() / 16, 5)) for im in ref.images}
    sets = [{tuple(np.round(v.ravel().numpy(), 5)) for v in ds.images} for ds in (d.train, d.val, d.test)]
    assert sets[2] <= keys
    assert not (sets[0] & sets[2]) or len(sets[0] & sets[2]) < 5  # sklearn digits has a few exact duplicates
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= 33 and counts.max() <= 38  # stratified: ~36 per class
    assert torch.equal(build_datasets(cfg(seed=5)).test.targets, d.test.targets)  # split does not move with seed
    native_run = build_datasets(cfg(image_size=8))  # --image-size 8: the native size, auto patch
    assert torch.equal(native_run.test.targets, d.test.targets) and native_run.patch_size is None
    assert native_run.test.read_batch([0])[0].shape == (1, 1, 8, 8)


def test_stratified_split_proportions():
    t = np.repeat(np.arange(4), 50)
    a, b = stratified_split(t, [0.3], seed=0)
    assert len(a) == 60 and len(set(a) | set(b)) == 200
    assert (np.bincount(t[a]) == 15).all()


def _idx(path, arr, magic_type=0x08):
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, magic_type, arr.ndim))
        f.write(struct.pack(">" + "I" * arr.ndim, *arr.shape))
        f.write(arr.astype(np.uint8).tobytes())


def test_mnist_from_idx_files_and_missing_files_message(tmp_path):
    with pytest.raises(InputError, match="--download"):
        build_datasets(cfg(dataset="mnist", data_dir=str(tmp_path)))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.RandomState(0)
    imgs, labels = rng.randint(0, 255, (40, 28, 28)), np.arange(40) % 10
    for prefix, n in (("train", 40), ("t10k", 20)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", imgs[:n])
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels[:n])
    d = build_datasets(cfg(dataset="mnist", data_dir=str(tmp_path), val_fraction=0.25))
    assert (len(d.train), len(d.val), len(d.test), d.num_outputs, d.in_channels) == (30, 10, 20, 10, 1)
    x, y = d.test.read_batch([3])
    np.testing.assert_allclose(x[0, 0].numpy(), imgs[3] / 255.0, atol=1e-6)
    assert int(y[0]) == 3 and d.hflip_ok is False


def _cifar_files(root, labels_train, n_test=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    per = len(labels_train) // 5
    for i in range(5):
        lab = labels_train[i * per:(i + 1) * per]
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({b"data": rng.randint(0, 255, (len(lab), 3072)).astype(np.uint8), b"labels": list(lab)}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.full((n_test, 3072), 7, np.uint8), b"labels": [1] * n_test}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}" for i in range(10)]}, f)
    return folder


def test_cifar10_python_batches_and_label_range(tmp_path):
    _cifar_files(tmp_path / "ok", [i % 10 for i in range(50)])
    d = build_datasets(cfg(dataset="cifar10", data_dir=str(tmp_path / "ok")))
    assert (len(d.train) + len(d.val), len(d.test), d.in_channels, d.classes[2]) == (50, 6, 3, "c2")
    assert torch.allclose(d.test.read_batch([0])[0], torch.full((1, 3, 32, 32), 7 / 255))
    _cifar_files(tmp_path / "bad", [i % 10 for i in range(45)] + [12] * 5)
    with pytest.raises(InputError, match=r"outside the class range 0..9: \[12\]"):
        build_datasets(cfg(dataset="cifar10", data_dir=str(tmp_path / "bad")))
    with pytest.raises(ConfigError, match="disagrees with the data"):
        build_datasets(cfg(dataset="cifar10", data_dir=str(tmp_path / "ok"), num_classes=100))


def test_cifar_reader_refuses_arbitrary_pickles(tmp_path):
    folder = _cifar_files(tmp_path, [i % 10 for i in range(50)])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(InputError, match="refusing to load builtins.print"):
        build_datasets(cfg(dataset="cifar10", data_dir=str(tmp_path)))


def _imagefolder(root, n=3, bad=False):
    for split in ("train", "val"):
        for c, color in (("cat", 30), ("dog", 220)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 12), (color, color, i)).save(d / f"{i}.png")
    if bad:
        (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")


def test_imagefolder_and_bad_image_stop_or_skip(tmp_path):
    _imagefolder(tmp_path, bad=True)
    d = build_datasets(cfg(dataset="imagefolder", data_dir=str(tmp_path), image_size=16))
    assert d.classes == ["cat", "dog"] and len(d.train) == 7 and d.test is d.test and len(d.val) == 6
    x, y = load_batch(d.val, [0, 5])
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]
    assert x[0].mean() < 0.3 and x[1].mean() > 0.5
    bad_index = [str(p) for p in d.train.paths].index(str(tmp_path / "train" / "dog" / "broken.png"))
    with pytest.raises(InputError, match="broken.png"):
        load_batch(d.train, [0, bad_index])
    d2 = build_datasets(cfg(dataset="imagefolder", data_dir=str(tmp_path), image_size=16, skip_bad_images=True))
    x, y = load_batch(d2.train, [0, bad_index])
    assert len(x) == 1


def test_csv_regression_targets(tmp_path):
    rows = ["path,brightness,half"]
    for i in range(10):
        Image.new("L", (8, 8), i * 25).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{i * 25 / 255:.6f},{i / 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    d = build_datasets(cfg(dataset="csv", data_dir=str(tmp_path), image_size=8))
    assert d.task == "regression" and d.num_outputs == 2 and d.classes == ["brightness", "half"]
    assert len(d.train) + len(d.val) + len(d.test) == 10
    x, y = load_batch(d.train, [0])
    assert x.mean().item() == pytest.approx(float(y[0, 0]), abs=1e-3)  # target = grey level
    d1 = build_datasets(cfg(dataset="csv", data_dir=str(tmp_path / "labels.csv"), target_columns="half"))
    assert d1.num_outputs == 1
    (tmp_path / "labels.csv").write_text("path,y\n0.png,abc\n")
    with pytest.raises(InputError, match="line 2"):
        build_datasets(cfg(dataset="csv", data_dir=str(tmp_path)))
