"""Distillation from a teacher (issue 25, sections 2 and 5): the losses against hand-computed values,
the frozen teacher (no gradients, eval mode, its dtype, its own preprocessing as tensor ops), every mode
training a tiny digits student, exact resume with a teacher, DeiT's token averaged at evaluation, and
the refusals before training (classes, token, unreadable teacher, a changed teacher on resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.cli.main import main
from vitkit.errors import ConfigError
from vitkit.io import load_safetensors
from vitkit.train import distill
from vitkit.train.build import build_run, setup_process
from vitkit.train.checkpoint import load_state
from vitkit.train.config import TrainConfig
from vitkit.train.loop import train, train_step

TINY = dict(dim=32, depth=1, num_heads=2, subset=64, batch_size=16, epochs=2, progress=False, threads=1,
            deterministic=True, warmup_epochs=0)
TIMING = {"epoch_seconds", "images_per_second"}

pytestmark = pytest.mark.usefixtures("restore_torch_state")  # tests/conftest.py


def _quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny vitkit digits run (a few steps): a teacher with the digits' class names."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(TrainConfig(out=str(out), **{**TINY, "subset": 128, "epochs": 2, "lr": 1e-2}), log=_quiet)
    torch.use_deterministic_algorithms(False)
    return out


def _saved_vit(path, *, dim=48, labels=tuple(str(i) for i in range(10)), image=32, channels=3):
    """A random vitkit ViT saved with labels and ImageNet-style preprocessing (another size, channels, width)."""
    torch.manual_seed(1)
    m = vitkit.ViT(vitkit.ViTConfig(image_size=image, patch_size=8, in_channels=channels, dim=dim, depth=1,
                                    num_heads=2, num_classes=len(labels)))
    m.labels = list(labels)
    m.preprocess_cfg = {"input_size": [channels, image, image], "mean": [0.485, 0.456, 0.406][:channels],
                        "std": [0.229, 0.224, 0.225][:channels], "interpolation": "bicubic", "crop_pct": 1.0}
    m.save_pretrained(path)
    return path


def _build(**kw):
    cfg = TrainConfig(**{**TINY, **kw})
    device, dist = setup_process(cfg)
    return build_run(cfg, device, dist, _quiet)


# ------------------------------------------------------------------ losses vs hand-computed values
def test_soft_loss_is_hintons_kl_times_t_squared():
    s = np.array([[2.0, 0.0], [0.5, 1.5]])
    t = np.array([[0.0, 1.0], [1.0, -1.0]])
    T = 2.0

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(t / T), softmax(s / T)
    want = T * T * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))  # batch mean of KL(p || q)
    got = distill.soft_loss(torch.tensor(s), torch.tensor(t), T)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # row 1 by hand: p = softmax([0, .5]), q = softmax([1, 0])
    p1 = 1 / (1 + math.exp(0.5))
    q1 = 1 / (1 + math.exp(-1.0))
    row1 = p1 * math.log(p1 / q1) + (1 - p1) * math.log((1 - p1) / (1 - q1))
    assert distill.soft_loss(torch.tensor(s[:1]), torch.tensor(t[:1]), T).item() == pytest.approx(4 * row1)
    assert distill.soft_loss(torch.tensor(t), torch.tensor(t), T).item() == pytest.approx(0.0, abs=1e-12)


def test_hard_and_feature_losses_by_hand():
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[0.1, 3.0], [-1.0, 0.0]], dtype=torch.float64)  # argmax: class 1 for both
    want = (-math.log(math.exp(0) / (math.exp(2) + 1)) - math.log(math.e / (1 + math.e))) / 2
    assert distill.hard_loss(s, t).item() == pytest.approx(want)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -2.0]])  # cos 1/sqrt(2) and -1
    assert distill.feature_loss(a, b).item() == pytest.approx(((1 - 1 / math.sqrt(2)) + 2) / 2)


# ------------------------------------------------------------------ the teacher
@pytest.mark.parametrize("native", [True, False])
def test_teacher_is_frozen_in_eval_mode_in_its_dtype(native, monkeypatch, tmp_path):
    from vitkit import cpu

    monkeypatch.setattr(cpu, "bf16_native", lambda: native)
    model = vitkit.load_model(_saved_vit(tmp_path / "t", channels=1, image=16)).train()
    t = distill.Teacher(model, output="logits", mean=[0.5], std=[0.5], in_channels=1, image_hw=(16, 16),
                        device=torch.device("cpu"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert t.dtype == (torch.bfloat16 if native else None)
    x = torch.randn(3, 1, 16, 16, requires_grad=True)
    out = t(x)
    assert out.dtype == torch.float32 and out.grad_fn is None
    with torch.no_grad():
        ref = model(distill.normalize(x * 0.5 + 0.5, [0.485], [0.229]))
    if native:
        torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)
    else:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_teacher_preprocessing_is_tensor_ops_on_the_students_batch(tmp_path, monkeypatch):
    """Grey 16 px student batch, normalised 0.5 / 0.5 -> RGB 32 px, bicubic antialiased, ImageNet mean / std."""
    from vitkit import cpu

    monkeypatch.setattr(cpu, "bf16_native", lambda: False)
    model = vitkit.load_model(_saved_vit(tmp_path / "t"))
    t = distill.Teacher(model, output="features", mean=[0.5], std=[0.5], in_channels=1, image_hw=(16, 16),
                        device=torch.device("cpu"))
    x01 = torch.rand(2, 1, 16, 16)
    rgb = F.interpolate(x01.repeat(1, 3, 1, 1), size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    want = (rgb - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    torch.testing.assert_close(t.adapt((x01 - 0.5) / 0.5), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(want), pre_logits=True)
    torch.testing.assert_close(t((x01 - 0.5) / 0.5), feats, atol=1e-4, rtol=1e-4)


def test_teacher_frames_the_students_view_with_its_own_center_crop(tmp_path, monkeypatch):
    """A teacher whose preprocessing is resize to 56 / 0.875 = 64 then center crop 56 sees the central
    56 px of the student's 64 px view (no resampling: a plain crop), as it sees an image of its own."""
    from vitkit import cpu

    monkeypatch.setattr(cpu, "bf16_native", lambda: False)
    torch.manual_seed(0)
    m = vitkit.ViT(vitkit.ViTConfig(image_size=56, patch_size=8, dim=32, depth=1, num_heads=2, num_classes=10))
    m.preprocess_cfg = {"input_size": [3, 56, 56], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                        "interpolation": "bicubic", "crop_pct": 0.875}
    m.save_pretrained(tmp_path / "t")
    model = vitkit.load_model(tmp_path / "t")
    t = distill.Teacher(model, output="logits", mean=[0.5] * 3, std=[0.5] * 3, in_channels=3, image_hw=(64, 64),
                        device=torch.device("cpu"))
    x01 = torch.rand(2, 3, 64, 64)
    want = distill.normalize(x01[..., 4:60, 4:60], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(t.adapt((x01 - 0.5) / 0.5), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(t((x01 - 0.5) / 0.5), model(want), atol=1e-5, rtol=1e-5)


def test_a_training_step_leaves_the_teacher_untouched(teacher_run):
    run, state = _build(teacher=str(teacher_run), distill="soft", out=None)
    teacher = run.distill.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    state.model.train()
    x, y = next(iter(state.loader))
    train_step(run, state, x, y)
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(p.grad is None for p in state.model.parameters())  # zeroed after the step: it did step


# ------------------------------------------------------------------ every mode trains
@pytest.mark.parametrize("mode", ["soft", "hard", "token", "token-soft", "feature"])
def test_each_mode_trains_and_its_loss_decreases(mode, teacher_run, tmp_path):
    s = train(TrainConfig(out=str(tmp_path / "s"), teacher=str(teacher_run), distill=mode,
                          **{**TINY, "epochs": 4, "lr": 1e-2, "augment": False}), log=_quiet)
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert s["finished"] and losses[-1] < losses[0], losses
    config = (tmp_path / "s" / "config.yaml").read_text()
    assert f"distill: {mode}" in config and f"teacher: {teacher_run}" in config


def test_token_mode_adds_the_token_and_evaluates_the_mean_of_both_heads(teacher_run, tmp_path):
    train(TrainConfig(out=str(tmp_path / "s"), teacher=str(teacher_run), distill="token", **TINY), log=_quiet)
    model = vitkit.load_model(tmp_path / "s" / "best")
    assert model.config.dist_token and model.config.pooling == "cls"
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)
        want = (model.head(model.fc_norm(tokens[:, 0])) + model.head_dist(model.fc_norm(tokens[:, 1]))) / 2
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(model.head(model.fc_norm(tokens[:, 0])), want, atol=1e-4)  # the heads differ


# ------------------------------------------------------------------ exact resume with a teacher
def _metrics(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [dict(distill="feature", teacher_cache=True, augment=False),
                                   dict(distill="token")], ids=["feature-cached", "token"])
def test_resume_with_a_teacher_is_bit_exact(extra, tmp_path):
    teacher = _saved_vit(tmp_path / "wide", dim=48)  # 48 wide, RGB 32 px: a projection and a resize
    kw = dict(teacher=str(teacher), **extra, **TINY)
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(TrainConfig(out=str(ref), **kw), log=_quiet)
    s = train(TrainConfig(out=str(run), max_steps=3, **kw), log=_quiet)
    assert not s["finished"]
    saved = load_state(run / "train_state.pt")["distill"]
    assert (saved["projection"] is not None) == (extra["distill"] == "feature")
    if saved["projection"] is not None:
        assert tuple(saved["projection"]["weight"].shape) == (48, 32)
    assert main(["train", "--resume", str(run)]) == 0
    for sub in ("last", "best"):
        a, b = (load_safetensors(r / sub / "model.safetensors") for r in (ref, run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert _metrics(run) == _metrics(ref)
    pa, pb = (load_state(r / "train_state.pt")["distill"]["projection"] for r in (ref, run))
    assert (pa is None and pb is None) or all(torch.equal(pa[k], pb[k]) for k in pa)


def test_resume_refuses_another_teacher_or_mode(teacher_run, tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), teacher=str(teacher_run), max_steps=1, **TINY), log=_quiet)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--distill", "hard"]) == 2
    assert "--distill 'soft' -> 'hard' (the saved weights were distilled from that teacher" in capsys.readouterr().err
    # the same source path with other weights: the state's fingerprint refuses it
    state = load_state(run / "train_state.pt")
    state["distill"]["teacher"] = "0" * 64
    torch.save(state, run / "train_state.pt")
    assert main(["train", "--resume", str(run)]) == 2
    assert "the teacher's weights are not the ones the run started with" in capsys.readouterr().err


def test_teacher_cache_holds_the_teachers_outputs(tmp_path):
    run, _ = _build(teacher=str(_saved_vit(tmp_path / "t")), teacher_cache=True, augment=False)
    cache, data = run.distill.cache, run.data
    assert cache.shape == (len(data.train), 10) and not cache.isnan().any()
    from vitkit.eval.evaluate import eval_loader, normalize

    xb, _ = next(iter(eval_loader(data.train, 16)))  # the first rows, batched as the cache's pass batches them
    assert torch.equal(cache[:16], run.distill.teacher(normalize(xb, data.mean, data.std)))


# ------------------------------------------------------------------ refused before training
def test_teacher_with_other_classes_is_refused_but_teaches_features(tmp_path):
    other = _saved_vit(tmp_path / "t", labels=("cat", "dog", "car"))
    with pytest.raises(ConfigError) as e:
        _build(teacher=str(other))
    msg = str(e.value)
    assert "'0', '1', '2'" in msg and "'cat', 'dog', 'car'" in msg and "--distill feature" in msg
    run, _ = _build(teacher=str(other), distill="feature")
    assert run.distill.projection.in_features == 32 and run.distill.projection.out_features == 48


def test_unlabelled_teacher_with_another_class_count_is_refused(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.models import save_for_hf

    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1,
                                                           num_heads=2, num_classes=5)
    ref.pretrained_cfg = {"architecture": "vit_custom", "input_size": (3, 16, 16), "mean": (0.5,) * 3,
                          "std": (0.5,) * 3, "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 5}
    save_for_hf(ref, tmp_path / "timm", safe_serialization=True,
                model_args=dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5))
    with pytest.raises(ConfigError, match=r"the teacher has 5 outputs and no labels; the data has 10 classes"):
        _build(teacher=str(tmp_path / "timm"), distill="hard")


def test_token_mode_needs_a_student_with_the_token(teacher_run, tmp_path):
    with pytest.raises(ConfigError, match=r"--pretrained .* has none .* train from scratch \(--distill token adds"):
        _build(teacher=str(teacher_run), distill="token", pretrained=str(teacher_run), dim=None, depth=None,
               num_heads=None)
    with pytest.raises(ConfigError, match="needs class-token pooling, got --pooling mean"):
        TrainConfig(teacher=str(teacher_run), distill="token", pooling="mean")


def test_bad_teacher_options_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=f"--teacher {tmp_path / 'nothing'}: cannot read it as a model"):
        _build(teacher=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="--distill, --distill-alpha say how to distil from a teacher: add --teacher"):
        TrainConfig(distill="hard", distill_alpha=0.9)
    with pytest.raises(ConfigError, match="--teacher-cache reuses the teacher's outputs .* --no-augment"):
        _build(teacher=str(_saved_vit(tmp_path / "t")), teacher_cache=True)


def test_zeroshot_teacher_is_the_class_names_classifier(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from test_zeroshot import _clip_dir
    from vitkit import cpu
    from vitkit.features.zeroshot import ZeroShotClassifier

    monkeypatch.setattr(cpu, "bf16_native", lambda: False)
    clip = _clip_dir(tmp_path / "clip")
    run, state = _build(teacher=str(clip), teacher_zeroshot=True, distill="hard")
    teacher = run.distill.teacher
    assert isinstance(teacher.model, ZeroShotClassifier) and teacher.model.labels == [str(i) for i in range(10)]
    x, _ = next(iter(state.loader))
    x = distill.normalize(x, run.data.mean, run.data.std)
    pair = vitkit.load_image_text(clip)
    with torch.no_grad():
        want = ZeroShotClassifier(pair, [str(i) for i in range(10)])(teacher.adapt(x))
    torch.testing.assert_close(run.distill.targets(x, None), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="--teacher-zeroshot makes the teacher a classifier"):
        TrainConfig(teacher=str(clip), teacher_zeroshot=True, distill="feature")


# ------------------------------------------------------------------ function matching (Beyer et al. 2022)
def test_teacher_sees_the_students_augmented_mixed_view_at_every_step(teacher_run):
    """The teacher's targets are computed on exactly the batch the student trains on: after the batch
    affine and MixUp, not on the clean images (the teacher's own input is that batch, adapted)."""
    run, state = _build(teacher=str(teacher_run), distill="soft", out=None, mixup=0.8)
    assert run.affine is not None and run.mixer is not None
    seen = {}
    state.model.register_forward_pre_hook(lambda m, args: seen.setdefault("student", args[0].detach().clone()))
    call = run.distill.teacher.__class__.__call__
    run.distill.teacher.__class__.__call__ = lambda self, x: (seen.setdefault("teacher", x.clone()), call(self, x))[1]
    try:
        state.model.train()
        x, y = next(iter(state.loader))
        train_step(run, state, x, y)
    finally:
        run.distill.teacher.__class__.__call__ = call
    assert torch.equal(seen["teacher"], seen["student"])
    assert not torch.allclose(seen["student"], x.to(seen["student"].dtype))  # augmented: not the loader's batch


def test_teacher_accuracy_is_its_evaluation_on_the_students_validation_inputs(teacher_run, monkeypatch):
    """Same data, size and normalisation as the teacher run: its accuracy is the run's own validation
    accuracy of the weights it saved (fp32 teacher, so no CPU's bf16 enters)."""
    from vitkit import cpu

    monkeypatch.setattr(cpu, "bf16_native", lambda: False)
    logged = []
    cfg = TrainConfig(**{**TINY, "teacher": str(teacher_run), "distill": "soft"})
    device, dist = setup_process(cfg)
    run, _ = build_run(cfg, device, dist, logged.append)
    acc = distill.teacher_accuracy(run.distill.teacher, run.data.val, run.data, batch_size=16, device=device)
    want = json.loads((teacher_run / "summary.json").read_text())["best_val_accuracy"]
    assert acc == pytest.approx(want, abs=1e-9)
    line = next(m for m in logged if m.startswith("teacher on the student's"))
    assert f"{len(run.data.val)} validation images (16x16): accuracy {want:.4f}" in line


# ------------------------------------------------------------------ flips on image folders of characters
def test_auto_flips_stay_off_for_classes_named_as_characters():
    from vitkit.data.augment import AugmentChoice, glyph_classes

    digits, letters, animals = [str(i) for i in range(10)], list("abcdefXYZ"), ["cat", "dog"]
    assert glyph_classes(digits) and glyph_classes(letters)
    assert not glyph_classes(animals) and not glyph_classes(["1", "10"]) and not glyph_classes([])
    auto, on = TrainConfig(hflip="auto"), TrainConfig(hflip="on")
    pick = lambda cfg, classes: AugmentChoice.from_config(cfg, in_memory=False, hflip_ok=True,  # noqa: E731
                                                          classes=classes)
    off = pick(auto, digits)
    assert not off.sample.hflip and "single characters" in off.note
    assert pick(auto, animals).sample.hflip and "single characters" not in pick(auto, animals).note
    assert pick(on, digits).sample.hflip  # asked for: kept
    assert pick(auto, None).sample.hflip  # no names given: the dataset's answer stands
