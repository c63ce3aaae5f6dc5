"""Augmentation defaults per kind of data (issue 21, item 6): the digits recipe's batch affine on
in-memory small images; RandomResizedCrop + flip per image in the loader's workers, and nothing per
batch in the training process, on image files; explicit options win; the log says which and why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

TINY = dict(dim=16, depth=1, num_heads=2, epochs=1, batch_size=8, progress=False, threads=1, ema=False)


def _photos(root: Path, n: int = 8, classes: int = 2, prefix: str = "c") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        for split in ("train", "val"):
            d = root / split / f"{prefix}{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n if split == "train" else 2):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root


def _build(**kw):
    from vitkit.distributed import DistInfo
    from vitkit.train.build import build_run
    from vitkit.train.config import TrainConfig

    logs: list[str] = []
    run, state = build_run(TrainConfig(**{**TINY, **kw}), torch.device("cpu"), DistInfo(), logs.append)
    return run, state, [m for m in logs if m.startswith("augmentation:")]


def _sample(state):
    """The per-image augmentation the training loader's workers run."""
    tf = state.loader._ds.transform
    return [type(op).__name__ for op in tf.per_sample.transforms] if hasattr(tf, "per_sample") else []


def test_digits_keep_the_batch_affine_of_their_recipe():
    run, state, note = _build(subset=32)
    assert run.affine == (10.0, 0.1, 0.1, 0.0) and run.hflip is False  # a mirrored 2 is not a 2
    assert _sample(state) == []  # the in-memory batched fast path: no per-image work
    assert len(note) == 1 and "digits recipe" in note[0] and "batch random affine (10 deg" in note[0]
    assert run.cfg.affine_degrees is None  # config.yaml keeps "the default of the data", as --hflip auto


def test_a_photo_folder_gets_crop_and_flip_per_image_and_no_batch_affine(tmp_path):
    run, state, note = _build(dataset="imagefolder", data_dir=str(_photos(tmp_path)), image_size=32, workers=0)
    assert run.affine is None
    assert _sample(state) == ["_RandomResizedCrop", "RandomHorizontalFlip"]
    assert len(note) == 1 and "image files" in note[0] and "per image in the loader's workers" in note[0]
    assert "batch random affine" not in note[0]


def test_a_folder_of_digit_classes_gets_no_flips(tmp_path):
    """Classes named 0..9 written as image files: a mirrored 2 is no digit, so --hflip auto leaves flips
    off (what the folder's names say, through vitkit train's own build)."""
    run, state, note = _build(dataset="imagefolder", data_dir=str(_photos(tmp_path, prefix="")), image_size=32,
                              workers=0)
    assert _sample(state) == ["_RandomResizedCrop"]
    assert len(note) == 1 and "single characters" in note[0]


@pytest.mark.parametrize("kw, affine, sample, why", [
    # a photo folder with a rotation asked for: only what was asked, flips drawn with it (one op per batch)
    (dict(affine_degrees=5.0, random_resized_crop=False), (5.0, 0.0, 0.0, 0.0), ["_Resize"], "image files"),
    (dict(affine_degrees=0, affine_translate=0, affine_scale=0, random_resized_crop=True, hflip="off"), None,
     ["_RandomResizedCrop"], "as given"),
    (dict(augment=False), None, ["_Resize"], None),
])
def test_explicit_options_win_on_files(tmp_path, kw, affine, sample, why):
    run, state, note = _build(dataset="imagefolder", data_dir=str(_photos(tmp_path)), image_size=32, workers=0, **kw)
    assert run.affine == affine and run.hflip == (affine is not None)
    assert _sample(state) == sample
    assert (note == []) if why is None else (why in note[0])


def test_explicit_options_win_on_digits():
    run, state, note = _build(subset=32, affine_degrees=0, affine_translate=0, affine_scale=0,
                              random_resized_crop=True)
    assert run.affine is None and _sample(state) == ["_RandomResizedCrop"]
    assert "as given" in note[0]


def test_a_photo_folder_step_does_no_per_batch_augmentation_in_the_training_process(tmp_path, monkeypatch):
    """Counted: the batch affine and the step's normalisation are not called; the batch arrives
    normalised by the loader, equal to normalising its [0, 1] batch in the step (the former path)."""
    import vitkit.train.loop as loop
    from vitkit.data import make_loader
    from vitkit.eval.evaluate import normalize

    calls = {"sample_affine": 0, "apply_affine": 0, "normalize": 0}
    for name in calls:
        real = getattr(loop, name)
        monkeypatch.setattr(loop, name, lambda *a, _n=name, _f=real, **k: calls.__setitem__(_n, calls[_n] + 1)
                            or _f(*a, **k))
    run, state, _ = _build(dataset="imagefolder", data_dir=str(_photos(tmp_path)), image_size=32, workers=0)
    state.loader.set_epoch(0)
    x, y = next(iter(state.loader))
    loop.train_step(run, state, x, y)
    assert calls == {"sample_affine": 0, "apply_affine": 0, "normalize": 0}
    raw = make_loader(run.data.train, batch_size=8, train=True, seed=0, workers=0, normalize=False,
                      augment=_spec(run))  # the same per-image pipeline, the former [0, 1] output
    raw.set_epoch(0)
    x01, y01 = next(iter(raw))
    assert torch.equal(y, y01)
    torch.testing.assert_close(x, normalize(x01, run.data.mean, run.data.std), rtol=1e-5, atol=1e-5)

    # the control: the digits step does run the batch affine (then normalises) in the training process
    run, state, _ = _build(subset=32)
    state.loader.set_epoch(0)
    loop.train_step(run, state, *next(iter(state.loader)))
    assert calls == {"sample_affine": 1, "apply_affine": 1, "normalize": 1}


def _spec(run):
    from vitkit.data.augment import AugmentChoice

    return AugmentChoice.from_config(run.cfg, in_memory=False, hflip_ok=run.data.hflip_ok).sample


@pytest.mark.parametrize("kw, light, want", [
    (dict(workers=1), True, 3),  # light step, 1 worker: 4 cores - 1
    (dict(workers=3), True, 1),
    (dict(workers=1), False, 4),  # a heavy step keeps every core: the worker decodes ahead, mostly idle
    (dict(workers=1, threads=4), True, 4),  # asked for: kept
    (dict(workers=0), True, 4),  # no workers: nothing competes
])
def test_a_light_step_leaves_the_workers_their_cores(tmp_path, monkeypatch, restore_torch_state, kw, light, want):
    """Photo files with loader workers: the step's threads leave the workers' cores free when the model's
    step is light (issue 21: 2 threads + 1 worker on 2 cores ran 0.37x the bare loader, 1 thread 0.84x)."""
    from vitkit.train import build

    monkeypatch.setattr(build.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(build, "LIGHT_STEP_GFLOP", 1e9 if light else 0.0)
    from vitkit.distributed import DistInfo
    from vitkit.train.config import TrainConfig

    logs: list[str] = []
    cfg = TrainConfig(**{**TINY, "threads": 0, "dataset": "imagefolder", "data_dir": str(_photos(tmp_path)),
                         "image_size": 32, **kw})
    build.build_run(cfg, torch.device("cpu"), DistInfo(), logs.append)  # workers start at the first batch
    assert torch.get_num_threads() == want
    said = [m for m in logs if m.startswith("threads:")]
    assert bool(said) == (want < 4) and (not said or f"threads: {want} of 4 cores" in said[0])


def test_in_memory_digits_keep_every_core(monkeypatch, restore_torch_state):
    from vitkit.train import build

    monkeypatch.setattr(build.os, "cpu_count", lambda: 2)
    _build(subset=32, workers=1, threads=0)
    assert torch.get_num_threads() == 2
