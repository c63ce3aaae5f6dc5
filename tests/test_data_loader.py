"""vitkit.data loaders: formats, checks before training, worker-count independence, exact resume,
rank sharding. Oracles: the same batches computed another way (workers 0 vs 1 vs 2, one rank vs
two, uninterrupted vs resumed), PIL / hand-made pixel values, and the files the tests write."""

from __future__ import annotations

import io
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import AugmentSpec, DataSpec, build_data, make_loader
from vitkit.data.loader import DataWorkerError, GlobalBatchSampler
from vitkit.errors import ConfigError, InputError

AUG = AugmentSpec(random_resized_crop=True, hflip=True, auto_augment="randaugment", random_erasing=0.5)


def _png(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def _folder(root, n=6, size=(12, 10), classes=("cat", "dog"), splits=("train",)):
    rng = np.random.RandomState(0)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3)).astype(np.uint8)).save(d / f"{i}.png")
    return root


def _epochs(data_split, workers, epochs=2, **kw):
    kw = {"batch_size": 4, "train": True, "seed": 3, "augment": AUG, **kw}
    loader = make_loader(data_split, workers=workers, **kw)
    out = []
    for e in range(epochs):
        loader.set_epoch(e)
        out += [(x.clone(), y.clone()) for x, y in loader]
    return out, loader


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


# --------------------------------------------------------------------------- sampler / sharding
def test_global_batches_split_by_rank_cover_the_epoch_once():
    one = GlobalBatchSampler(23, 6, shuffle=True, seed=1)
    ranks = [GlobalBatchSampler(23, 6, shuffle=True, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in [one, *ranks]:
        s.set_epoch(4)
    g, r0, r1 = list(one), list(ranks[0]), list(ranks[1])
    assert len(g) == len(one) == 3 and len(r0) == len(r1) == len(ranks[0]) == 3  # drop_last: equal batches
    assert [a + b for a, b in zip(r0, r1)] == g  # rank slices of the same global batches
    seen = [i for b in r0 + r1 for _, i in b]
    assert len(seen) == len(set(seen)) == 18
    one.set_epoch(5)
    assert list(one) != g  # order moves with the epoch
    ev = GlobalBatchSampler(5, 2, shuffle=False, seed=0, world_size=2, rank=1, drop_last=False)
    assert [[i for _, i in b] for b in ev] == [[1], [3]] and len(ev) == 2


# --------------------------------------------------------------------------- in memory
def test_in_memory_fast_path_matches_direct_indexing_and_keeps_the_callers_rng():
    d = build_data(DataSpec())
    loader = make_loader(d.train, batch_size=64, train=True, seed=0, workers=2)
    assert loader.workers == 0 and len(loader) == len(d.train) // 64
    loader.set_epoch(1)
    batches = list(loader)
    order = [i for b in loader.sampler for _, i in b]
    x, y = d.train.read_batch(order[:64])
    mean, std = torch.tensor(d.mean).view(1, -1, 1, 1), torch.tensor(d.std).view(1, -1, 1, 1)
    assert torch.equal(batches[0][1], y) and torch.allclose(batches[0][0], (x - mean) / std)
    # per-sample augmentation in the main process leaves the caller's RNG stream untouched
    torch.manual_seed(7)
    ref = torch.rand(3)
    torch.manual_seed(7)
    aug_loader = make_loader(d.train, batch_size=8, train=True, seed=0, workers=0,
                             augment=AugmentSpec(random_resized_crop=True))
    next(iter(aug_loader))
    assert torch.equal(torch.rand(3), ref)


# --------------------------------------------------------------------------- image folders
def test_imagefolder_batches_do_not_depend_on_workers_and_resume_exactly(tmp_path):
    d = build_data(DataSpec(dataset="imagefolder", data_dir=str(_folder(tmp_path)), val_fraction=0.2))
    a, _ = _epochs(d.train, 0)
    b, _ = _epochs(d.train, 1)
    c, loader = _epochs(d.train, 2)
    assert len(a) == 2 * len(loader) and _same(a, b) and _same(a, c)
    assert a[0][0].dtype == torch.float32 and a[0][0].shape == (4, 3, 10, 12)
    # take k batches of epoch 1, save, build a fresh loader, load, continue == uninterrupted
    per = len(loader)
    loader = make_loader(d.train, batch_size=4, train=True, seed=3, workers=2, augment=AUG)
    loader.set_epoch(1)
    it = iter(loader)
    head = [next(it) for _ in range(1)]
    state = loader.state_dict()
    del it, loader
    fresh = make_loader(d.train, batch_size=4, train=True, seed=3, workers=2, augment=AUG)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)
    assert _same(head + list(fresh), a[per:])
    fresh.set_epoch(2)
    assert len(list(fresh)) == per  # the next epoch is whole again


def test_imagefolder_pixels_and_size_follow_the_files(tmp_path):
    root = tmp_path / "f"
    for c, v in (("a", 10), ("b", 200)):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (v, v + i, 7)).save(root / "train" / c / f"{i}.png")
    d = build_data(DataSpec(dataset="imagefolder", data_dir=str(root), val_fraction=0.5))
    assert d.image_hw == (32, 32) and d.size_from_data and "32x32" in d.size_note  # not 224 (issue 11)
    x, y = next(iter(make_loader(d.val, batch_size=8, train=False, workers=0, normalize=False)))
    for xi, yi in zip(x, y):
        r = 10 if int(yi) == 0 else 200
        px = (xi * 255).round()
        assert torch.all(px[0] == r) and torch.all(px[2] == 7) and torch.all((px[1] - r >= 0) & (px[1] - r <= 2))
    # evaluation batches = what `vitkit predict` computes for the saved preprocessing (resize, normalise)
    from vitkit.data.transforms import eval_transform

    pre = {"input_size": [3, 16, 16], "mean": [0.2, 0.4, 0.6], "std": [0.3, 0.2, 0.1], "interpolation": "bilinear",
           "crop_pct": 1.0}
    noisy = _folder(tmp_path / "noisy", n=2, size=(37, 23), splits=("train", "val"))
    d16 = build_data(DataSpec(dataset="imagefolder", data_dir=str(noisy), image_size=16))
    x16, _ = next(iter(make_loader(d16.val, batch_size=8, train=False, workers=0, mean=pre["mean"], std=pre["std"])))
    ref = torch.stack([eval_transform(pre)(Image.open(p).convert("RGB")) for p in d16.val.paths])
    torch.testing.assert_close(x16, ref, atol=1e-5, rtol=0)
    Image.new("RGB", (40, 20)).save(root / "train" / "a" / "odd.png")
    d2 = build_data(DataSpec(dataset="imagefolder", data_dir=str(root), val_fraction=0.5))
    assert d2.image_hw == (224, 224) and not d2.size_from_data and "different sizes" in d2.size_note
    assert build_data(DataSpec(dataset="imagefolder", data_dir=str(root), image_size=16,
                               val_fraction=0.5)).image_hw == (16, 16)


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
    from vitkit.data.files import decode_file

    ramp = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    x = decode_file(tmp_path / "g16.png")
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16)
    want = np.floor(ramp.astype(np.float64) / 257 + 0.5).astype(np.uint8)  # round(v / 257): 65280 -> 254
    np.testing.assert_array_equal(x[0].numpy(), want)


def test_formats_torchvision_cannot_decode_go_through_pillow(tmp_path):
    from vitkit.data.files import decode_file

    rgb = np.random.RandomState(0).randint(0, 255, (6, 7, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.bmp")
    assert torch.equal(decode_file(tmp_path / "x.bmp"), torch.from_numpy(rgb).permute(2, 0, 1))
    grey16 = (np.arange(42).reshape(6, 7) * 1500).astype(np.uint16)  # 16-bit TIFF, Pillow mode I;16
    Image.fromarray(grey16).save(tmp_path / "g.tif")
    want = np.floor(grey16.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(decode_file(tmp_path / "g.tif")[1].numpy(), want)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")  # CMYK JPEG: same RGB as Pillow's
    ref = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB"))
    assert torch.equal(decode_file(tmp_path / "c.jpg"), torch.from_numpy(ref.copy()).permute(2, 0, 1))


def test_pixel_limit_from_the_environment_reaches_the_checks_and_workers(tmp_path, monkeypatch):
    root = _folder(tmp_path, n=2, size=(20, 12), splits=("train", "val"))
    monkeypatch.setenv("VITKIT_MAX_IMAGE_PIXELS", "200")  # 20x12 = 240 pixels
    with pytest.raises(InputError, match="240 pixels, over the limit of 200.*VITKIT_MAX_IMAGE_PIXELS"):
        build_data(DataSpec(dataset="imagefolder", data_dir=str(root)))
    d = build_data(DataSpec(dataset="imagefolder", data_dir=str(root), check_files=False))
    with pytest.raises(InputError, match="over the limit of 200"):
        list(make_loader(d.train, batch_size=2, train=True, workers=1))
    monkeypatch.setenv("VITKIT_MAX_IMAGE_PIXELS", "240")
    assert sum(len(y) for _, y in make_loader(d.train, batch_size=2, train=True, workers=1)) == 4


def test_bad_image_in_a_worker_names_the_file_or_is_skipped_and_counted(tmp_path):
    root = _folder(tmp_path, n=4, splits=("train", "val"))
    bad = root / "train" / "dog" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG not really")
    d = build_data(DataSpec(dataset="imagefolder", data_dir=str(root)))
    loader = make_loader(d.train, batch_size=3, train=True, seed=0, workers=1)
    with pytest.raises(InputError) as e:
        list(loader)
    assert str(e.value).startswith(str(bad)) and "Traceback" not in str(e.value)
    d = build_data(DataSpec(dataset="imagefolder", data_dir=str(root), skip_bad_images=True))
    loader = make_loader(d.train, batch_size=3, train=True, seed=0, workers=1, drop_last=False)
    got = sum(len(y) for _, y in loader)
    assert loader.skipped == 1 and got == len(d.train) - 1 == 8


def test_imagefolder_checks_before_training(tmp_path):
    root = _folder(tmp_path / "a", n=2, splits=("train", "val"))
    (root / "train" / "empty").mkdir()
    with pytest.raises(InputError, match="without images.*allow-empty-classes"):
        build_data(DataSpec(dataset="imagefolder", data_dir=str(root)))
    d = build_data(DataSpec(dataset="imagefolder", data_dir=str(root), allow_empty_classes=True))
    assert d.classes == ["cat", "dog", "empty"]
    # a broken validation image is reported as such before training (or dropped and recorded)
    broken = root / "val" / "dog" / "0.png"
    broken.write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match=r"imagefolder: validation image .*dog/0.png: not a readable image"):
        build_data(DataSpec(dataset="imagefolder", data_dir=str(root), allow_empty_classes=True))
    d = build_data(DataSpec(dataset="imagefolder", data_dir=str(root), allow_empty_classes=True, skip_bad_images=True))
    assert d.skipped_files == [str(broken)] and len(d.val) == 3 and d.test is d.val
    root = _folder(tmp_path / "b", n=2, splits=("train",))
    _folder(tmp_path / "b", n=2, classes=("cat", "owl"), splits=("val",))
    with pytest.raises(InputError, match="owl is not among the training classes"):
        build_data(DataSpec(dataset="imagefolder", data_dir=str(root)))


def test_a_dead_worker_is_a_clear_error(tmp_path):
    d = build_data(DataSpec(dataset="imagefolder", data_dir=str(_folder(tmp_path, n=4))))

    class Dying(type(d.train)):
        def read(self, i):
            if i == 0:  # the first batch: the training process is waiting for it when the worker dies
                os.kill(os.getpid(), signal.SIGKILL)
            return super().read(i)

    ds = Dying(d.train.paths, d.train.targets, d.train.image_hw)
    ds.mean, ds.std = d.mean, d.std
    with pytest.raises(DataWorkerError, match="worker died.*checkpoint is intact"):
        list(make_loader(ds, batch_size=2, train=False, workers=1))


# --------------------------------------------------------------------------- csv regression
def _csv(root, rows, extra=""):
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,t"]
    for i in range(rows):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / f"{i}.png")
        lines.append(f"{i}.png,{i / 10}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n" + extra)
    return root


def test_csv_checks_before_training(tmp_path):
    d = build_data(DataSpec(dataset="csv", data_dir=str(_csv(tmp_path / "ok", 10))))
    x, y = next(iter(make_loader(d.train, batch_size=4, train=True, seed=0, workers=0)))
    assert y.dtype == torch.float32 and y.shape == (4, 1) and d.image_hw == (8, 8)
    with pytest.raises(InputError, match="line 12: target.*not finite"):
        build_data(DataSpec(dataset="csv", data_dir=str(_csv(tmp_path / "nan", 10, "0.png,nan\n"))))
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    root = _csv(tmp_path / "esc", 10, "../outside.png,1.0\n")
    with pytest.raises(InputError, match="line 12: image path '../outside.png' is outside"):
        build_data(DataSpec(dataset="csv", data_dir=str(root)))
    assert len(build_data(DataSpec(dataset="csv", data_dir=str(root), allow_absolute_paths=True)).train) == 9
    root = _csv(tmp_path / "abs", 10, f"{outside},1.0\n")
    with pytest.raises(InputError, match="outside the CSV's folder"):
        build_data(DataSpec(dataset="csv", data_dir=str(root)))
    # a broken validation image is reported as such, before any training
    root = _csv(tmp_path / "badval", 20)
    spec = DataSpec(dataset="csv", data_dir=str(root))
    val_file = build_data(spec).val.paths[0]
    val_file.write_bytes(b"junk")
    with pytest.raises(InputError, match=r"line \d+: validation image .*" + val_file.name):
        build_data(spec)
    d = build_data(DataSpec(dataset="csv", data_dir=str(root), skip_bad_images=True))
    assert d.skipped_files == [str(val_file)] and len(d.val) == 1 and len(d.train) == 16
    (root / "3.png").unlink()
    with pytest.raises(InputError, match="3.png: no such file"):
        build_data(spec)


# --------------------------------------------------------------------------- webdataset shards
def _shards(root, per=(7, 7, 7), val=5, cls=True, classes_txt=True):
    import webdataset as wds

    rng = np.random.RandomState(0)
    k = 0
    for split, counts in (("train", per), ("val", (val,))):
        for s, n in enumerate(counts):
            with wds.TarWriter(str(root / f"{split}-{s:03d}.tar")) as w:
                for _ in range(n):
                    sample = {"__key__": f"s{k:05d}", "png": _png(rng.randint(0, 255, (10, 12, 3)).astype(np.uint8))}
                    if cls or k != 3:
                        sample["cls"] = str(k % 3).encode()
                    w.write(sample)
                    k += 1
    if classes_txt:
        (root / "classes.txt").write_text("a\nb\nc\n")
    return root


def test_webdataset_workers_ranks_resume_and_class_names(tmp_path):
    d = build_data(DataSpec(dataset="webdataset", data_dir=str(_shards(tmp_path))))
    assert d.classes == ["a", "b", "c"] and len(d.train) == 21 and d.image_hw == (10, 12)
    a, loader = _epochs(d.train, 0, augment=AugmentSpec(random_resized_crop=True, hflip=True))
    c, _ = _epochs(d.train, 2, augment=AugmentSpec(random_resized_crop=True, hflip=True))
    per = len(loader)
    assert per == 5 and len(a) == 10 and _same(a, c)
    # two ranks: slices of the same global batches, no sample twice
    r0, _ = _epochs(d.train, 1, rank=0, world_size=2, augment=AugmentSpec(hflip=True))
    r1, _ = _epochs(d.train, 0, rank=1, world_size=2, augment=AugmentSpec(hflip=True))
    g, _ = _epochs(d.train, 0, augment=AugmentSpec(hflip=True))
    assert all(torch.equal(torch.cat([p[0], q[0]]), b[0]) for p, q, b in zip(r0, r1, g)) and len(r0) == len(g)
    # exact mid-epoch resume
    aug = AugmentSpec(random_resized_crop=True, hflip=True)
    loader = make_loader(d.train, batch_size=4, train=True, seed=3, workers=2, augment=aug)
    loader.set_epoch(1)
    it = iter(loader)
    head = [next(it) for _ in range(2)]
    state = loader.state_dict()
    del it
    fresh = make_loader(d.train, batch_size=4, train=True, seed=3, workers=2, augment=aug)
    fresh.load_state_dict(state)
    assert _same(head + list(fresh), a[per:])
    # read in the training process, the stream leaves the caller's RNG draws between batches alone
    torch.manual_seed(5)
    ref = torch.rand(4)
    torch.manual_seed(5)
    it = iter(make_loader(d.train, batch_size=4, train=True, seed=3, workers=0, augment=aug))
    got = [(next(it), torch.rand(2))[1] for _ in range(2)]
    assert torch.equal(torch.cat(got), ref)
    # evaluation: every validation sample once, in shard order
    ys = [y for _, y in make_loader(d.val, batch_size=2, train=False, workers=0)]
    assert torch.cat(ys).tolist() == [k % 3 for k in range(21, 26)]


def test_webdataset_errors_before_training(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(InputError, match="sample 's00003' has no .cls label"):
        build_data(DataSpec(dataset="webdataset", data_dir=str(_shards(tmp_path / "a", cls=False))))
    (tmp_path / "b").mkdir()
    root = _shards(tmp_path / "b", classes_txt=False)
    assert build_data(DataSpec(dataset="webdataset", data_dir=str(root))).classes == ["0", "1", "2"]
    (root / "classes.json").write_text('{"0": "zero", "1": "one", "2": "two"}')
    assert build_data(DataSpec(dataset="webdataset", data_dir=str(root))).classes == ["zero", "one", "two"]
    (root / "classes.json").write_text('["zero", "one"]')
    with pytest.raises(InputError, match="names 2 classes but the shards use label 2"):
        build_data(DataSpec(dataset="webdataset", data_dir=str(root)))
    (tmp_path / "c").mkdir()
    with pytest.raises(InputError, match="no train-\\*.tar"):
        build_data(DataSpec(dataset="webdataset", data_dir=str(tmp_path / "c")))


def test_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch):
    import sys

    (tmp_path / "s").mkdir()
    root = _shards(tmp_path / "s", per=(4,), val=4)
    for name in ("webdataset", "datasets", "torchdata", "torchdata.stateful_dataloader"):
        monkeypatch.setitem(sys.modules, name, None)  # "import name" now raises ImportError
    d = build_data(DataSpec(dataset="webdataset", data_dir=str(root)))  # indexing needs only tarfile
    with pytest.raises(ConfigError, match=r"pip install 'vitkit\[data\]'"):
        list(make_loader(d.train, batch_size=2, train=True, workers=0))
    with pytest.raises(ConfigError, match=r"pip install 'vitkit\[data\]'"):
        build_data(DataSpec(dataset="hf", data_dir=str(tmp_path)))
    # without torchdata the loader is torch's DataLoader: same batches, same exact resume
    folder = build_data(DataSpec(dataset="imagefolder", data_dir=str(_folder(tmp_path / "f", n=4))))
    loader = make_loader(folder.train, batch_size=2, train=True, seed=3, workers=1, augment=AUG)
    assert not loader.stateful and type(loader._dl) is torch.utils.data.DataLoader
    loader.set_epoch(1)
    full = [(x.clone(), y.clone()) for x, y in loader]
    it = iter(loader)
    head = [next(it) for _ in range(2)]
    state = loader.state_dict()
    del it
    fresh = make_loader(folder.train, batch_size=2, train=True, seed=3, workers=1, augment=AUG)
    fresh.load_state_dict(state)
    assert _same(head + list(fresh), full)
    monkeypatch.undo()
    with_torchdata = make_loader(folder.train, batch_size=2, train=True, seed=3, workers=0, augment=AUG)
    with_torchdata.set_epoch(1)
    assert with_torchdata.stateful and _same(list(with_torchdata), full)


# --------------------------------------------------------------------------- Hugging Face datasets
def _hf(n, labels, names=("x", "y", "z")):
    import datasets

    rng = np.random.RandomState(n)
    imgs = [{"bytes": _png(rng.randint(0, 255, (9, 11, 3)).astype(np.uint8)), "path": None} for _ in range(n)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names)),
                               "other": datasets.Value("int32")})
    return datasets.Dataset.from_dict({"image": imgs, "label": labels, "other": list(range(n))}, features=feats)


def test_hf_save_to_disk_and_parquet(tmp_path):
    import datasets

    tr, va = _hf(12, [i % 3 for i in range(12)]), _hf(4, [0, 1, 2, 0])
    datasets.DatasetDict(train=tr, validation=va).save_to_disk(str(tmp_path / "dd"))
    d = build_data(DataSpec(dataset="hf", data_dir=str(tmp_path / "dd")))
    assert d.classes == ["x", "y", "z"] and (len(d.train), len(d.val)) == (12, 4) and d.image_hw == (9, 11)
    a, _ = _epochs(d.train, 0, augment=AugmentSpec(hflip=True))
    b, _ = _epochs(d.train, 2, augment=AugmentSpec(hflip=True))
    assert _same(a, b)
    x, y = next(iter(make_loader(d.val, batch_size=4, train=False, workers=0, normalize=False)))
    ref = torch.from_numpy(np.array(va.cast_column("image", datasets.Image())[0]["image"])).permute(2, 0, 1)
    assert y.tolist() == [0, 1, 2, 0] and torch.equal((x[0] * 255).round().to(torch.uint8), ref)
    # a folder of parquet files, class names from the stored features
    (tmp_path / "pq").mkdir()
    tr.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    va.to_parquet(str(tmp_path / "pq" / "validation-00000.parquet"))
    d = build_data(DataSpec(dataset="hf", data_dir=str(tmp_path / "pq")))
    assert d.classes == ["x", "y", "z"] and len(d.train) == 12 and len(d.test) == 4
    with pytest.raises(InputError, match=r"no column\(s\) \['img'\].*--image-column"):
        build_data(DataSpec(dataset="hf", data_dir=str(tmp_path / "pq"), image_column="img"))
    bad_val = _hf(3, [0, 1, 1], names=("x", "y", "z"))
    datasets.DatasetDict(train=_hf(6, [0] * 6), validation=bad_val).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(InputError, match=r"val split uses label\(s\) \[1\]"):
        build_data(DataSpec(dataset="hf", data_dir=str(tmp_path / "bad")))


def test_registry_and_spec_from_config():
    from vitkit.data.registry import dataset_names, get_builder
    from vitkit.train.config import TrainConfig

    assert {"digits", "imagefolder", "csv", "webdataset", "hf"} <= set(dataset_names())
    with pytest.raises(ConfigError, match="did you mean 'imagefolder'"):
        get_builder("imagefolders")
    spec = DataSpec.from_config(TrainConfig(progress=False, image_size=16, seed=4))
    assert (spec.dataset, spec.image_size, spec.seed) == ("digits", 16, 4)
    assert DataSpec.from_config({"dataset": "csv", "data_dir": "x"}).data_dir == "x"


def test_model_preprocessing_row_indices_and_skipped_files(tmp_path):
    """Feature extraction's needs: the model's own preprocessing (as `vitkit predict`), the row of
    each image, and which files could not be read."""
    from vitkit.data.transforms import eval_transform

    root = _folder(tmp_path, n=3, size=(30, 22), splits=("train", "val"))
    bad = root / "val" / "cat" / "1.png"
    bad.write_bytes(b"not a png")
    # check_files=False: leave the bad file to the loader (by default build_data drops it up front)
    d = build_data(DataSpec(dataset="imagefolder", data_dir=str(root), skip_bad_images=True, check_files=False))
    pre = {"input_size": [3, 16, 16], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "interpolation": "bicubic",
           "crop_pct": 0.875}
    loader = make_loader(d.val, batch_size=4, train=False, workers=1, preprocess=pre, with_index=True)
    rows, xs = [], []
    for x, _, idx in loader:
        rows += idx.tolist()
        xs.append(x)
    bad_row = d.val.paths.index(bad)
    assert rows == [i for i in range(len(d.val)) if i != bad_row]
    assert len(loader.skipped_files) == 1 and loader.skipped_files[0].startswith(str(bad))
    ref = torch.stack([eval_transform(pre)(Image.open(d.val.paths[i]).convert("RGB")) for i in rows])
    torch.testing.assert_close(torch.cat(xs), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cores,local,want", [(2, None, 1), (1, None, 1), (16, None, 15), (64, None, 16),
                                              (64, "8", 7), (16, "8", 1), (16, "x", 15)])
def test_default_workers_share_the_cores_among_local_ranks(monkeypatch, cores, local, want):
    """Cores - 1 for the training process, divided among torchrun's local ranks, at most 16."""
    from vitkit.data import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert default_workers() == want
