"""``vitkit train --teacher SRC --unlabeled DIR``: images without labels join the training set, the
teacher's outputs their only target. Checked: the data (counts, the UNLABELLED target, leaks and
duplicates refused or left out), the loss against a hand-computed case, the gradient of an unlabelled
row under a pure label loss (zero), training accuracy over labelled rows only, and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitkit
from vitkit.cli.main import main
from vitkit.data.datasets import UNLABELLED
from vitkit.errors import ConfigError, InputError
from vitkit.io import load_safetensors
from vitkit.train.build import build_run, setup_process
from vitkit.train.config import TrainConfig
from vitkit.train.loop import train, train_step

pytestmark = pytest.mark.usefixtures("restore_torch_state")  # tests/conftest.py

CLASSES = ("cat", "dog")
TINY = dict(dim=32, depth=1, num_heads=2, image_size=16, patch_size=8, batch_size=8, epochs=2, progress=False,
            threads=1, workers=0, deterministic=True, warmup_epochs=0, dataset="imagefolder")


def _quiet(*a, **k):
    pass


def _png(path, value: int, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value * 100 + i)
    px = np.clip(value + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(px).save(path)


@pytest.fixture()
def folders(tmp_path):
    """An imagefolder (train 6 per class, val 2, test 2; cats dark, dogs light), 10 unlabelled images in
    nested folders, and a saved 2-class teacher."""
    data = tmp_path / "data"
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        for c, value in zip(CLASSES, (60, 190)):
            for i in range(n):
                _png(data / split / c / f"{split}{i}.png", value, i + {"train": 0, "val": 10, "test": 20}[split])
    unl = tmp_path / "unlabeled"
    for i in range(10):
        _png(unl / ("a" if i % 2 else "b") / f"u{i}.png", 60 if i % 2 else 190, 40 + i)
    torch.manual_seed(1)
    t = vitkit.ViT(vitkit.ViTConfig(image_size=16, patch_size=8, dim=32, depth=1, num_heads=2,
                                    num_classes=len(CLASSES)))
    t.labels = list(CLASSES)
    t.save_pretrained(tmp_path / "teacher")
    return data, unl, tmp_path / "teacher"


def _build(data, **kw):
    cfg = TrainConfig(**{**TINY, "data_dir": str(data), **kw})
    device, dist = setup_process(cfg)
    return build_run(cfg, device, dist, _quiet)


def test_unlabelled_images_join_the_training_set_with_the_unlabelled_target(folders):
    data, unl, teacher = folders
    lines = []
    cfg = TrainConfig(**{**TINY, "data_dir": str(data), "teacher": str(teacher), "unlabeled": str(unl)})
    device, dist = setup_process(cfg)
    run, _ = build_run(cfg, device, dist, lines.append)
    train_set = run.data.train
    assert len(train_set) == 12 + 10
    assert train_set.targets[:12].tolist() == [0] * 6 + [1] * 6 and train_set.targets[12:].tolist() == [UNLABELLED] * 10
    assert sorted(p.name for p in train_set.paths[12:]) == sorted(f"u{i}.png" for i in range(10))
    assert any("unlabeled: 10 images from" in s and "12 labelled + 10 unlabelled" in s for s in lines)
    assert len(run.data.val) == 4 and len(run.data.test) == 4  # evaluation untouched


def test_training_images_in_the_folder_are_left_out_and_evaluation_images_refused(folders, tmp_path):
    data, unl, teacher = folders
    with pytest.raises(InputError, match="all of its 12 images are training images already"):
        _build(data, teacher=str(teacher), unlabeled=str(data / "train"))
    with pytest.raises(InputError, match=r"8 of its 20 images are evaluation images \(4 validation, 4 test; .* would leak the evaluation"):
        _build(data, teacher=str(teacher), unlabeled=str(data))  # train/ + val/ + test/
    copied = tmp_path / "copied"
    copied.mkdir()
    for f in [sorted((data / "test" / "dog").iterdir())[0], *sorted(unl.rglob("*.png"))[:2]]:
        (copied / f"c-{f.name}").write_bytes(f.read_bytes())  # a test image copied under other names
    (copied / "d-test0.png").write_bytes((copied / "c-test0.png").read_bytes())  # a second file of that size
    with pytest.raises(InputError, match=r"2 of its 4 images are evaluation images \(2 test; e.g. .*c-test0.png"):
        _build(data, teacher=str(teacher), unlabeled=str(copied))
    mixed = tmp_path / "mixed"
    for f in [*sorted((data / "train" / "cat").iterdir())[:2], *sorted(unl.rglob("*.png"))[:3]]:
        (mixed / f.name).parent.mkdir(exist_ok=True)
        (mixed / f.name).symlink_to(f.resolve())  # links to training images are the same images
    lines = []
    cfg = TrainConfig(**{**TINY, "data_dir": str(data), "teacher": str(teacher), "unlabeled": str(mixed)})
    run, _ = build_run(cfg, *setup_process(cfg), lines.append)
    assert len(run.data.train) == 12 + 3
    assert any("(2 of the folder's images are training images already: left out)" in s for s in lines)
    with pytest.raises(InputError, match="no images"):
        (tmp_path / "empty").mkdir()
        _build(data, teacher=str(teacher), unlabeled=str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no such folder"):
        _build(data, teacher=str(teacher), unlabeled=str(tmp_path / "nowhere"))


def test_unlabeled_needs_a_teacher_image_files_and_no_mixing(folders):
    data, unl, teacher = folders
    with pytest.raises(ConfigError, match="--unlabeled says how to distil from a teacher: add --teacher SRC"):
        TrainConfig(**{**TINY, "data_dir": str(data), "unlabeled": str(unl)})
    with pytest.raises(ConfigError, match=r"no label to mix: MixUp / CutMix \(--mixup 0.8"):
        TrainConfig(**{**TINY, "data_dir": str(data), "teacher": str(teacher), "unlabeled": str(unl), "mixup": 0.8})
    with pytest.raises(ConfigError, match="--dataset digits is classification data held as TensorImageDataset"):
        _build(None, dataset="digits", subset=32, image_size=0, teacher=str(teacher), unlabeled=str(unl))


def test_loss_sums_the_label_term_over_labelled_rows_divided_by_all_rows(folders):
    """Hand-computed: (1 - a) * sum_labelled CE / B + a * T^2 KL mean over every row; a batch without
    unlabelled rows gets exactly the run's plain loss."""
    data, unl, teacher = folders
    run, _ = _build(data, teacher=str(teacher), unlabeled=str(unl), distill_alpha=0.3, distill_temperature=2.0,
                    label_smoothing=0.1)
    torch.manual_seed(0)
    s, t = torch.randn(6, 2), torch.randn(6, 2)
    y = torch.tensor([0, UNLABELLED, 1, UNLABELLED, UNLABELLED, 1])
    _, loss = run.distill.loss(s, y, t)
    lab = y >= 0
    ce = F.cross_entropy(s[lab], y[lab], label_smoothing=0.1, reduction="sum") / 6
    kd = sum(4.0 * (F.softmax(t[i] / 2, -1) * (F.log_softmax(t[i] / 2, -1) - F.log_softmax(s[i] / 2, -1))).sum()
             for i in range(6)) / 6
    assert torch.allclose(loss, 0.7 * ce + 0.3 * kd, atol=1e-6)
    full = torch.tensor([0, 1, 1, 0, 0, 1])
    assert torch.equal(run.distill.label_loss(s, full), F.cross_entropy(s, full, label_smoothing=0.1))


def test_an_unlabelled_row_gets_no_gradient_from_the_label_loss(folders):
    """alpha 0 (the label loss only): a batch of unlabelled rows moves nothing; labelled rows do."""
    data, unl, teacher = folders
    run, state = _build(data, teacher=str(teacher), unlabeled=str(unl), distill_alpha=0.0, augment=False)
    model = state.model.train()
    x = torch.randn(4, 3, 16, 16)
    for y, moved in ((torch.full((4,), UNLABELLED), False), (torch.tensor([0, 1, UNLABELLED, 0]), True)):
        model.zero_grad(set_to_none=False)
        _, loss = run.distill.loss(model(x), y, run.distill.teacher(x))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert bool(grads.abs().sum() > 0) == moved


def test_training_accuracy_counts_labelled_rows_only(folders):
    data, unl, teacher = folders
    run, state = _build(data, teacher=str(teacher), unlabeled=str(unl), augment=False)
    state.model.train()
    x = torch.randn(5, 3, 16, 16)
    y = torch.tensor([0, UNLABELLED, 1, UNLABELLED, 1])
    state.reset_sums()
    train_step(run, state, x, y)
    _, correct, count, labelled = state.sums.tolist()
    assert (count, labelled) == (5, 3) and 0 <= correct <= 3
    state.reset_sums((1.0, 2.0, 3.0))  # a checkpoint saved before --unlabeled existed: all rows labelled
    assert state.sums.tolist() == [1.0, 2.0, 3.0, 3.0]


def test_a_run_with_unlabelled_images_trains_and_resumes_bit_exact(folders, tmp_path, capsys):
    data, unl, teacher = folders
    kw = {**TINY, "data_dir": str(data), "teacher": str(teacher), "unlabeled": str(unl), "epochs": 2}
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = train(TrainConfig(out=str(ref), **kw), log=_quiet)
    assert r["finished"]
    s = train(TrainConfig(out=str(run), max_steps=3, **kw), log=_quiet)  # 22 images, batch 8: 2 steps an epoch
    assert not s["finished"]
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--unlabeled", str(tmp_path / "other")]) == 2
    assert "--unlabeled" in capsys.readouterr().err  # the images an epoch holds are part of the run
    assert main(["train", "--resume", str(run)]) == 0
    for sub in ("last", "best"):
        a, b = (load_safetensors(d / sub / "model.safetensors") for d in (ref, run))
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    metrics = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(0 <= m["train_accuracy"] <= 1 for m in metrics)
